"""Orbax checkpoints: state and data iterator round trip, compatibility check, init_from."""

import json
import os

import jax
import numpy as np
import pytest

from lsync_jax.data import ArraySource, LoaderSpec, make_loader
from lsync_jax.models import get_model
from lsync_jax.sharding import make_mesh
from lsync_jax.train import create_train_state, make_optimizer, state_shardings
from lsync_jax.train.checkpoint import Checkpointer
from lsync_jax.train.state import init_state_fn
from lsync_jax.workdir import DamagedCheckpointError, check_compatible, describe, restore_params


def tiny(**kw):
    cfg = dict(depth=1, hidden_size=32, num_heads=2, input_size=8, in_channels=1, num_classes=2, learn_sigma=False)
    cfg.update(kw)
    return get_model("SiT-S/4", **cfg), cfg


def abstract(model, tx, mesh):
    shapes = jax.eval_shape(init_state_fn(model, tx), jax.random.key(0))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                        state_shardings(model, tx, mesh))


def loader():
    images = np.random.default_rng(0).integers(0, 255, (32, 8, 8, 1), dtype=np.uint8)
    return make_loader(ArraySource(images, np.arange(32) % 2), LoaderSpec(global_batch_size=4, seed=0),
                       process_index=0, process_count=1)


def test_state_and_iterator_round_trip(tmp_path):
    (model, cfg), mesh = tiny(), make_mesh()
    tx, _ = make_optimizer({})
    state = create_train_state(model, tx, jax.random.key(0), mesh)
    it = iter(loader())
    next(it)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2)
    ckpt.save(5, state, describe(cfg, state.params), it)
    expected = next(it)["x"]
    ckpt.wait()
    assert ckpt.latest_step() == 5
    it2 = iter(loader())
    restored = ckpt.restore(5, abstract(model, tx, mesh), it2)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert restored.params["blocks_0"]["attn"]["qkv"]["kernel"].sharding == \
        state.params["blocks_0"]["attn"]["qkv"]["kernel"].sharding
    np.testing.assert_array_equal(next(it2)["x"], expected)
    assert ckpt.read_meta(5)["model"]["depth"] == 1
    ckpt.close()


def test_the_data_position_is_one_global_count_and_old_per_process_files_still_resume(tmp_path):
    (model, cfg), mesh = tiny(), make_mesh()
    tx, _ = make_optimizer({})
    state = create_train_state(model, tx, jax.random.key(0), mesh)
    it = iter(loader())
    for _ in range(3):
        next(it)
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(3, state, describe(cfg, state.params), it)
    expected = next(it)["x"]
    ckpt.wait()
    data = tmp_path / "ckpt" / "3" / "data"
    assert "metadata" in os.listdir(data) and not [n for n in os.listdir(data) if n.startswith("process_")]
    assert json.loads((data / "metadata").read_text())["next_batch"] == 3
    # grain's layout before (one file per process, each holding the same global count): still resumes
    (data / "metadata").unlink()
    for i in range(2):
        (data / f"process_{i}-of-2.json").write_text(json.dumps({"next_index": 3}, indent=4))
    it2 = iter(loader())
    ckpt.restore(3, abstract(model, tx, mesh), it2)
    np.testing.assert_array_equal(next(it2)["x"], expected)
    (data / "process_1-of-2.json").write_text(json.dumps({"next_index": 5}))  # disagreeing files: damage
    with pytest.raises(DamagedCheckpointError, match="data position is missing or inconsistent"):
        ckpt.restore(3, abstract(model, tx, mesh), iter(loader()))
    ckpt.close()


def test_incompatible_model_is_named(tmp_path):
    (model, cfg), (other, other_cfg) = tiny(), tiny(hidden_size=64)
    shapes = lambda m: jax.eval_shape(m.init, jax.random.key(0), *m.init_inputs(1))["params"]
    with pytest.raises(ValueError, match="incompatible model.*model.hidden_size: checkpoint 32, config 64"):
        check_compatible(describe(cfg, shapes(model)), describe(other_cfg, shapes(other)), "WORKDIR")
    check_compatible(describe(cfg, shapes(model)), describe(dict(cfg, dtype="bfloat16"), shapes(model)), "W")


def test_init_from_another_run(tmp_path):
    (model, cfg), mesh = tiny(), make_mesh()
    tx, _ = make_optimizer({})
    state = create_train_state(model, tx, jax.random.key(1), mesh)
    ckpt = Checkpointer(str(tmp_path / "run" / "checkpoints"))
    ckpt.save(3, state, describe(cfg, state.params))
    ckpt.close()
    target = abstract(model, tx, mesh).params
    params, ema = restore_params(str(tmp_path / "run"), target)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        restore_params(str(tmp_path / "nothing"), target)
    other, _ = tiny(hidden_size=64)
    with pytest.raises(ValueError, match="incompatible"):
        shapes = jax.eval_shape(other.init, jax.random.key(0), *other.init_inputs(1))["params"]
        restore_params(str(tmp_path / "run"), shapes)


def test_a_switch_one_config_does_not_list_compares_as_the_models_default():
    # a run saved before its config listed `long_skips` resumes with long_skips=False, not with True
    saved = {"model": {"name": "SiT-S/4", "depth": 6}, "param_shapes": {}}
    check_compatible(saved, {"model": {"name": "SiT-S/4", "depth": 6, "long_skips": False}, "param_shapes": {}}, "w")
    with pytest.raises(ValueError, match="model.long_skips: checkpoint False, config True"):
        check_compatible(saved, {"model": {"name": "SiT-S/4", "depth": 6, "long_skips": True}, "param_shapes": {}},
                         "w")
    with pytest.raises(ValueError, match="model.self_condition: checkpoint 3, config 0"):
        check_compatible({"model": {"name": "SiT-S/4", "self_condition": 3}, "param_shapes": {}},
                         {"model": {"name": "SiT-S/4"}, "param_shapes": {}}, "w")
