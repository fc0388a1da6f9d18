"""Official SiT / LayerSync / REPA checkpoints: the converted flax model reproduces a PyTorch
re-implementation of the official forward (official parameter names, every weight re-randomised),
block by block; REPA's time convention is folded into the weights; files, errors and the launcher."""

import argparse
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsync_jax.builders import for_platform
from lsync_jax.models import get_model
from lsync_jax.models.layers import timestep_frequencies
from lsync_jax.porting import convert_state_dict, from_official
from lsync_jax.porting.official import detect_convention, time_reversal_matrix
from lsync_jax.tools.convert import convert_to_workdir

torch = pytest.importorskip("torch", reason="torch runs the official reference forward")
from tests.porting.official_torch import OfficialSiT, randomize  # noqa: E402

pytestmark = pytest.mark.torch_parity

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAME = "SiT-S/2"
ARCH = dict(depth=4, hidden_size=64, num_heads=4)  # with the reference's input 8x8x4, patch 2, 10 classes
REPA = dict(repa=True, z_dims=(16, 8), encoder_depth=2, projector_dim=32)
TOL = 1e-4  # relative to the output's scale; float32 flax against a float64 reference


def official(seed=0, **kwargs):
    return randomize(OfficialSiT(**kwargs), seed).double().eval()


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8, 8, 4)).astype(np.float32)
    t = np.array([0.0, 0.37, 1.0], np.float32)
    y = np.array([1, 10, 7], np.int32)  # 10: the null class
    return x, t, y


def ours(model, params, x, t, y):
    out, state = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y, mutable=["intermediates"]))(
        params, x, t, y)
    return np.asarray(out), {k: np.asarray(v[0]) for k, v in state["intermediates"].items()}


def reference(module, x, t, y):
    """The official forward on NCHW; returns NHWC output, block outputs and projections as numpy."""
    with torch.no_grad():
        out, blocks, zs = module(torch.from_numpy(x.transpose(0, 3, 1, 2)).double(), torch.from_numpy(t),
                                 torch.from_numpy(y).long())
    return out.numpy().transpose(0, 2, 3, 1), [b.numpy() for b in blocks], [z.numpy() for z in zs]


def rel(a, b):
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_sit_checkpoint_matches_the_official_forward_block_by_block(inputs, learn_sigma):
    module = official(learn_sigma=learn_sigma)
    model, params = convert_state_dict(module.state_dict(), NAME, **ARCH)
    assert (model.learn_sigma, model.in_channels, model.num_classes, model.input_size) == (learn_sigma, 4, 10, 8)
    out, inter = ours(model, params, *inputs)
    ref, blocks, _ = reference(module, *inputs)
    errors = [rel(out, ref)] + [rel(inter[f"block_{i + 1}"], b) for i, b in enumerate(blocks)]
    print(f"learn_sigma={learn_sigma}: output {errors[0]:.1e}, blocks {max(errors[1:]):.1e}")
    assert max(errors) < TOL, errors


def test_repa_checkpoint_folds_its_time_convention_into_the_weights(inputs):
    x, t_repa, y = inputs
    module = official(**REPA)
    state = module.state_dict()
    assert detect_convention(state) == "repa"
    model, params = convert_state_dict(state, NAME, encoder_depth=2, **ARCH)
    assert (model.z_dims, model.encoder_depth, model.projector_dim, model.learn_sigma) == ((16, 8), 2, 32, False)
    out, inter = ours(model, params, x, 1 - t_repa, y)  # ours(x, 1 - t_R) = -REPA(x, t_R)
    ref, blocks, zs = reference(module, x, t_repa, y)
    errors = {"output": rel(out, -ref)}
    errors.update({f"block_{i + 1}": rel(inter[f"block_{i + 1}"], b) for i, b in enumerate(blocks)})
    errors.update({f"projection_{k}": rel(inter[f"projection_{k}"], z) for k, z in enumerate(zs)})
    assert inter["projection_1"].shape == (3, 16, 8)
    print("REPA: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors.values()) < TOL, errors


def test_the_parity_tests_detect_a_missing_time_fold_or_a_permuted_final_layer(inputs):
    x, t, y = inputs
    module = official(**REPA)
    ref, _, _ = reference(module, x, t, y)
    # Mapped as a SiT checkpoint: right at the same t (the plain mapping), wrong at 1 - t even once negated.
    model, params = convert_state_dict(module.state_dict(), NAME, convention="sit", encoder_depth=2, **ARCH)
    assert rel(ours(model, params, x, t, y)[0], ref) < TOL
    unfolded = rel(-ours(model, params, x, 1 - t, y)[0], -ref)
    # The final Linear's features read in (c, p, q) order instead of the official (p, q, c).
    sit = official(learn_sigma=False)
    model, params = convert_state_dict(sit.state_dict(), NAME, **ARCH)
    permuted = dict(params, final_layer=dict(params["final_layer"]))
    permuted["final_layer"]["linear"] = {
        name: np.moveaxis(v.reshape(*v.shape[:-1], 2, 2, 4), -1, -3).reshape(v.shape)
        for name, v in params["final_layer"]["linear"].items()}
    wrong_order = rel(ours(model, permuted, x, t, y)[0], reference(sit, x, t, y)[0])
    print(f"without the time fold {unfolded:.2f}, permuted final layer {wrong_order:.2f}")
    assert unfolded > 100 * TOL and wrong_order > 100 * TOL


def test_time_reversal_matrix_maps_features_of_t_to_features_of_one_minus_t():
    t = jnp.asarray(np.random.default_rng(1).uniform(0, 1, 16), jnp.float32)
    m = time_reversal_matrix(256)
    np.testing.assert_allclose(np.asarray(timestep_frequencies(t, 256)) @ m.T,
                               np.asarray(timestep_frequencies(1 - t, 256)), atol=2e-6)
    np.testing.assert_allclose(m @ m, np.eye(256), atol=1e-6)  # a reflection per frequency


def test_mismatches_and_unknown_keys_raise_naming_the_key():
    state = official().state_dict()
    with pytest.raises(ValueError, match=r"x_embedder\.proj\.weight has shape \(64, 4, 2, 2\).*\(384, in_channels"):
        convert_state_dict(state, NAME, depth=4, num_heads=4)  # SiT-S hidden size 384
    with pytest.raises(ValueError, match=r"4 blocks \(blocks\.0 \.\.\. blocks\.3\).*depth=12"):
        convert_state_dict(state, NAME, hidden_size=64, num_heads=4)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1\.weight has shape \(256, 64\).*expects \(128, 64\)"):
        convert_state_dict(state, NAME, mlp_ratio=2.0, **ARCH)
    with pytest.raises(ValueError, match=r"unexpected \['extra\.weight'\]"):
        convert_state_dict(dict(state, **{"extra.weight": torch.zeros(3)}), NAME, **ARCH)
    with pytest.raises(ValueError, match=r"missing \['blocks\.1\.attn\.qkv\.bias'\]"):
        convert_state_dict({k: v for k, v in state.items() if k != "blocks.1.attn.qkv.bias"}, NAME, **ARCH)
    with pytest.raises(ValueError, match="qk-norm"):
        convert_state_dict(dict(state, **{"blocks.0.attn.q_norm.weight": torch.ones(16)}), NAME, **ARCH)
    with pytest.raises(ValueError, match="learn_sigma=False was given but the checkpoint has learn_sigma=True"):
        convert_state_dict(state, NAME, learn_sigma=False, **ARCH)
    with pytest.raises(ValueError, match="embedding_table.weight has 11 rows"):
        convert_state_dict(state, NAME, num_classes=5, **ARCH)
    with pytest.raises(ValueError, match="pos_embed in the file differs"):
        convert_state_dict(dict(state, pos_embed=state["pos_embed"] + 0.1), NAME, **ARCH)
    repa = official(**REPA).state_dict()
    with pytest.raises(ValueError, match=r"encoder_depth=8 .* must be in \[1, depth=4\]"):
        convert_state_dict(repa, NAME, **ARCH)  # REPA's default encoder_depth, without args to tell
    with pytest.raises(ValueError, match="expected one of"):
        convert_state_dict(state, NAME, convention="edm", **ARCH)


def test_training_checkpoints_prefixes_and_safetensors(tmp_path):
    ema, raw = official(seed=0).state_dict(), official(seed=1).state_dict()
    _, expected = convert_state_dict(ema, NAME, **ARCH)
    path = str(tmp_path / "0400000.pt")
    torch.save({"model": raw, "ema": ema, "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model=NAME, path_type="Linear", prediction="velocity")}, path)
    assert_trees_equal(from_official(path, NAME, **ARCH)[1], expected)  # default: the EMA weights
    assert_trees_equal(from_official(path, NAME, which="model", **ARCH)[1], convert_state_dict(raw, NAME, **ARCH)[1])
    torch.save({"module._orig_mod." + k: v for k, v in ema.items()}, path)  # DDP + torch.compile names
    assert_trees_equal(from_official(path, NAME, **ARCH)[1], expected)
    from safetensors.torch import save_file

    save_file({k: v.float().contiguous() for k, v in ema.items()}, str(tmp_path / "ema.safetensors"))
    assert_trees_equal(from_official(str(tmp_path / "ema.safetensors"), NAME, **ARCH)[1], expected)
    torch.save({"model": raw}, path)
    with pytest.raises(ValueError, match="no 'ema' entry"):
        from_official(path, NAME, **ARCH)
    # REPA's train.py checkpoint: encoder_depth comes from its saved args.
    torch.save({"model": {}, "ema": official(**REPA).state_dict(), "opt": {}, "steps": 10,
                "args": argparse.Namespace(encoder_depth=2, qk_norm=False, path_type="linear", prediction="v")}, path)
    model, _ = from_official(path, NAME, **ARCH)
    assert (model.encoder_depth, model.z_dims) == (2, (16, 8))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_repa_variants_legacy_names_dropped_and_empty_projectors():
    state = official(**REPA).state_dict()
    _, expected = convert_state_dict(state, NAME, encoder_depth=2, **ARCH)
    # REPA's older layout numbers the blocks after encoder_depth (2 here) as decoder_blocks.0, 1, ...
    legacy = {k.replace("blocks.2.", "decoder_blocks.0.").replace("blocks.3.", "decoder_blocks.1."): v
              for k, v in state.items()}
    assert "decoder_blocks.1.mlp.fc2.bias" in legacy and "blocks.3.mlp.fc2.bias" not in legacy
    assert_trees_equal(convert_state_dict(legacy, NAME, encoder_depth=2, **ARCH)[1], expected)
    model, dropped = convert_state_dict(state, NAME, z_dims=(), **ARCH)  # a plain SiT, time still folded
    assert model.z_dims == () and detect_convention(state) == "repa"
    assert_trees_equal(dropped, {k: v for k, v in expected.items() if not k.startswith("projectors_")})
    no_encoder = official(repa=True, z_dims=(0,), encoder_depth=2, projector_dim=32).state_dict()  # --enc-type=None
    model, params = convert_state_dict(no_encoder, NAME, **ARCH)
    assert model.z_dims == () and "projectors_0" not in params


def test_without_torch_reading_a_pt_file_says_how_to_install_it(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="pip install torch"):
        from_official(str(path), NAME, **ARCH)


@pytest.mark.slow
def test_launcher_writes_a_workdir_that_training_and_sampling_read(tmp_path, inputs):
    from lsync_jax.configs.tiny import get_config
    from lsync_jax.sharding import make_mesh
    from lsync_jax.workdir import load_params, restore_params

    module = official(learn_sigma=True)
    path, out = str(tmp_path / "SiT-XL-2-256x256.pt"), str(tmp_path / "converted")
    torch.save(module.state_dict(), path)  # as SiT's release: a raw EMA state dict
    command = [sys.executable, "launch/convert_checkpoint.py", f"--checkpoint={path}", f"--model={NAME}",
               f"--out={out}"] + [f"--override={k}={v}" for k, v in ARCH.items()]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--config.model.overrides.learn_sigma=True" in result.stdout, result.stdout
    print(result.stdout)

    model, params = convert_state_dict(module.state_dict(), NAME, **ARCH)
    abstract = jax.eval_shape(model.init, jax.random.key(0), *model.init_inputs(1))["params"]
    restored, restored_ema = restore_params(out, abstract)  # what --config.train.init_from reads
    assert_trees_equal(restored, params)
    assert_trees_equal(restored_ema, params)

    config = get_config()  # what launch/sample.py reads, with the overrides the launcher printed
    config.model.name = NAME
    config.model.overrides.update(dict(input_size=8, in_channels=4, num_classes=10, learn_sigma=True))
    loaded, ema, step = load_params(config, out, make_mesh())
    # the same network, laid out for this process's devices (the builders resolve the compute fields)
    assert step == 0 and loaded == for_platform(model, jax.devices()[0].platform)
    assert rel(ours(loaded, ema, *inputs)[0], reference(module, *inputs)[0]) < TOL

    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        convert_to_workdir(path, NAME, out, **ARCH)
    assert not os.path.exists(os.path.join(out, "hold.json"))  # released


def test_a_conversion_into_a_held_workdir_is_refused_and_writes_nothing(tmp_path):
    """A trainer (here: another machine's) holds OUT: the conversion would write its checkpoints."""
    from lsync_jax.tools.convert import save_converted
    from lsync_jax.workdir import HoldError
    from tests.test_workdir_hold import other_host_hold

    module = official(learn_sigma=True)
    model, params = convert_state_dict(module.state_dict(), NAME, **ARCH)
    out = str(tmp_path / "converted")
    other_host_hold(out)
    with pytest.raises(HoldError, match="node-7.other"):
        save_converted(model, params, out, {"name": NAME, "overrides": ARCH})
    assert os.listdir(out) == ["hold.json"]


@pytest.mark.gcs
def test_a_checkpoint_in_a_bucket_converts_into_a_workdir_in_a_bucket(tmp_path, bucket):
    from lsync_jax import storage
    from lsync_jax.workdir import restore_params

    module = official(learn_sigma=True)
    local = str(tmp_path / "SiT-XL-2-256x256.pt")
    torch.save(module.state_dict(), local)
    storage.upload(local, f"{bucket}/SiT-XL-2-256x256.pt")
    convert_to_workdir(f"{bucket}/SiT-XL-2-256x256.pt", NAME, f"{bucket}/converted", **ARCH)
    model, params = convert_state_dict(module.state_dict(), NAME, **ARCH)
    abstract = jax.eval_shape(model.init, jax.random.key(0), *model.init_inputs(1))["params"]
    restored, restored_ema = restore_params(f"{bucket}/converted", abstract)
    assert_trees_equal(restored, params)
    assert_trees_equal(restored_ema, params)


def test_repa_projectors_in_sit():
    model = get_model(NAME, input_size=8, z_dims=(16,), encoder_depth=2, projector_dim=32, **ARCH)
    params = jax.jit(model.init)(jax.random.key(0), *model.init_inputs(1))["params"]
    fc = params["projectors_0"]
    assert fc["fc_0"]["kernel"].shape == (64, 32) and fc["fc_2"]["kernel"].shape == (32, 16)
    for layer, (fan_in, fan_out) in zip(("fc_0", "fc_1", "fc_2"), ((64, 32), (32, 32), (32, 16))):
        assert not np.any(fc[layer]["bias"])  # REPA: xavier-uniform kernels, zero biases
        assert 0 < np.abs(fc[layer]["kernel"]).max() <= np.sqrt(6 / (fan_in + fan_out))
    plain = get_model(NAME, input_size=8, **ARCH)
    x, t, y = model.init_inputs(2)
    without = {k: v for k, v in params.items() if k != "projectors_0"}
    np.testing.assert_array_equal(jax.jit(model.apply)({"params": params}, x, t, y),
                                  jax.jit(plain.apply)({"params": without}, x, t, y))
    with pytest.raises(ValueError, match=r"encoder_depth=5 .* \[1, depth=4\]"):
        get_model(NAME, z_dims=(16,), encoder_depth=5, **ARCH)
    with pytest.raises(ValueError, match="z_dims must be a tuple of positive ints"):
        get_model(NAME, z_dims=768, **ARCH)
    assert get_model(NAME, encoder_depth=99, **ARCH).z_dims == ()  # no projectors: encoder_depth unused
