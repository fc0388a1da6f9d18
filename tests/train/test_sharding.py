"""Mesh construction and parameter placement rules."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from lsync_jax.models import get_model
from lsync_jax.sharding import make_mesh, partition_spec, path_name, tree_shardings


def test_mesh_covers_the_devices():
    mesh = make_mesh()
    assert mesh.axis_names == ("data", "fsdp") and mesh.devices.size == jax.device_count()
    with pytest.raises(ValueError, match="does not cover"):
        make_mesh(data=jax.device_count() + 1, fsdp=1)
    with pytest.raises(ValueError, match="at most one"):
        make_mesh(data=-1, fsdp=-1)


def test_rules_replicate_small_and_shard_large_tensors():
    assert partition_spec("params/blocks_0/attn/qkv/kernel", (1152, 3456), 4) == P(None, "fsdp")
    assert partition_spec("params/blocks_0/attn/qkv/bias", (3456,), 4) == P()  # small
    assert partition_spec("params/x", (1000, 7), 4, min_shard_size=1) == P("fsdp", None)
    assert partition_spec("params/x", (7, 9), 4, min_shard_size=1) == P()  # nothing divisible
    assert partition_spec("params/x", (1152, 3456), 1) == P()  # no fsdp axis
    rules = ((r".*embedding.*", "replicate"), (r".*", "fsdp"))
    assert partition_spec("params/y_embedder/embedding_table/embedding", (1001, 1152), 4, rules) == P()
    assert partition_spec("params/t/bias", (8,), 4, rules) == P("fsdp")
    with pytest.raises(ValueError, match="sharding rule"):
        partition_spec("a", (8,), 4, ((r".*", "tensor"),))


def test_tree_shardings_follow_the_parameter_paths():
    model = get_model("SiT-S/2", depth=1)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *model.init_inputs(1)))
    mesh = make_mesh()
    shardings = tree_shardings(shapes, mesh, min_shard_size=1)
    assert shardings["params"]["blocks_0"]["attn"]["qkv"]["kernel"].mesh is mesh
    # rules see the full '/'-joined path
    names = {}
    jax.tree_util.tree_map_with_path(lambda p, x: names.setdefault(path_name(p), x.shape), shapes)
    assert "params/blocks_0/attn/qkv/kernel" in names and "params/y_embedder/embedding_table/embedding" in names
