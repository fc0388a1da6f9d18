"""DINOv2 in flax reproduces Hugging Face's PyTorch `Dinov2Model` (small random configurations saved
as `save_pretrained` saves them, and the same weights in the torch-hub layout), with each reference's
position-embedding resampling; the torch-bicubic matrices and REPA's image preprocessing reproduce
torch's `F.interpolate`."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsync_jax.models.encoders import (
    CONFIGS,
    DINOv2,
    DINOv2Config,
    bicubic_matrix,
    encoder_input_size,
    preprocess_images,
    random_dinov2,
)
from lsync_jax.porting.dinov2 import load_dinov2
from tests.helpers import import_torchvision

pytestmark = pytest.mark.torch_parity

torch = pytest.importorskip("torch", reason="torch runs the reference DINOv2 and F.interpolate")
F = torch.nn.functional
TOL = 1e-5  # max |ours - ref| / max |ref|, float32
NATIVE = 5  # 70 px / 14


def _hf_model(swiglu: bool):
    import_torchvision()  # transformers imports torchvision; PyPI's CUDA build needs a hand next to CPU torch
    transformers = pytest.importorskip("transformers", reason="transformers defines the reference Dinov2Model")
    config = transformers.Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=70,
                                       patch_size=14, use_swiglu_ffn=swiglu)
    torch.manual_seed(1 + swiglu)
    model = transformers.Dinov2Model(config).eval()
    with torch.no_grad():  # every tensor random, LayerScale and LayerNorms too; positions large enough to matter
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (2.0 if "position" in name else 0.3))
    return model


@pytest.fixture(scope="module", params=[False, True], ids=["mlp", "swiglu"])
def reference(request, tmp_path_factory):
    """(HF Dinov2Model with random weights, the directory save_pretrained wrote it to)."""
    model = _hf_model(request.param)
    directory = tmp_path_factory.mktemp("dinov2-swiglu" if request.param else "dinov2")
    model.save_pretrained(str(directory))
    return model, str(directory)


def _hf_tokens(model, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).last_hidden_state[:, 1:].numpy()


def _tokens(module, params, images: np.ndarray) -> np.ndarray:
    with jax.default_matmul_precision("highest"):  # GPUs otherwise multiply float32 in TF32 (about 1e-4 here)
        return np.asarray(jax.jit(module.apply)({"params": params}, images))


def _rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


def _images(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, height, width, 3)).astype(np.float32)


def _hub_state(model) -> dict:
    """The HF model's tensors renamed to the torch-hub layout (fused qkv and w12), as the official
    `DinoVisionTransformer.state_dict()` names them. transformers 5.23 names its modules q_proj,
    gate_proj, ... in memory, 5.17 as its files do (attention.attention.query, mlp.weights_in)."""
    renames = [("embeddings.patch_embeddings.projection", "patch_embed.proj"),
               ("embeddings.position_embeddings", "pos_embed"), ("embeddings.", ""), ("layernorm.", "norm."),
               ("layer_scale1.lambda1", "ls1.gamma"), ("layer_scale2.lambda1", "ls2.gamma"),
               ("attention.output.dense", "attn.proj"), ("attention.o_proj", "attn.proj"),
               ("mlp.weights_in", "mlp.w12"), ("mlp.weights_out", "mlp.w3"), ("mlp.down_proj", "mlp.w3"),
               ("attention.attention.query", "q"), ("attention.attention.key", "k"),
               ("attention.attention.value", "v"), ("attention.q_proj", "q"), ("attention.k_proj", "k"),
               ("attention.v_proj", "v"), ("mlp.gate_proj", "gate"), ("mlp.up_proj", "up")]
    out = {}
    for key, value in model.state_dict().items():
        name = re.sub(r"^encoder\.layer\.", "blocks.", key)
        for old, new in renames:
            name = name.replace(old, new)
        out[name] = value.detach().clone()
    for i in range(model.config.num_hidden_layers):
        for suffix in ("weight", "bias"):
            b = f"blocks.{i}."
            out[f"{b}attn.qkv.{suffix}"] = torch.cat([out.pop(f"{b}{n}.{suffix}") for n in "qkv"])
            if f"{b}gate.{suffix}" in out:
                out[f"{b}mlp.w12.{suffix}"] = torch.cat([out.pop(f"{b}{n}.{suffix}") for n in ("gate", "up")])
    return out


# ---------------------------------------------------------------------------------------------
# Parity with Hugging Face Dinov2Model
# ---------------------------------------------------------------------------------------------


def test_config_read_from_the_saved_model(reference):
    model, directory = reference
    module, params = load_dinov2(directory)
    swiglu = model.config.use_swiglu_ffn
    assert module.config == DINOv2Config(embed_dim=64, depth=2, num_heads=4, native_grid=NATIVE,
                                         ffn="swiglu" if swiglu else "mlp")
    assert module.pos_interpolation == "repa" and module.dtype == jnp.float32
    assert params["blocks_1"]["mlp"]["w12" if swiglu else "fc1"]["kernel"].shape == (64, 2 * 176 if swiglu else 256)


@pytest.mark.parametrize("size", [(70, 70), (42, 42), (112, 112), (42, 84), (98, 56)])
def test_tokens_match_hf_at_native_and_other_grids(reference, size):
    """HF (transformers 5) resamples with F.interpolate(size=grid): our 'hf' mode."""
    model, directory = reference
    module, params = load_dinov2(directory, pos_interpolation="hf")
    images = _images(*size)
    ref = _hf_tokens(model, images)
    ours = _tokens(module, params, images)
    assert ours.shape == ref.shape == (2, size[0] // 14 * size[1] // 14, 64) and ours.dtype == np.float32
    err = _rel_err(ours, ref)
    print(f"{size}: relative error {err:.2e}")
    assert err < TOL, err
    if size != (70, 70):  # the position embedding matters here: another resampling is caught
        other = _tokens(module.clone(pos_interpolation="hub"), params, images)
        assert _rel_err(other, ref) > 100 * TOL


def _resampled_reference(model, grid: int, mode: str):
    """A copy of `model` whose position table was resampled to grid x grid by the reference code of
    `mode` (REPA: timm's resample_abs_pos_embed; hub: DinoVisionTransformer.interpolate_pos_encoding),
    so that the HF forward at that grid uses it as is (it skips interpolation at its native grid)."""
    import copy

    clone = copy.deepcopy(model)
    pos = clone.embeddings.position_embeddings.data
    table = pos[:, 1:].reshape(1, NATIVE, NATIVE, -1).permute(0, 3, 1, 2)
    if mode == "repa":  # timm.layers.pos_embed.resample_abs_pos_embed, as REPA's load_encoders calls it
        table = F.interpolate(table, size=[grid, grid], mode="bicubic", antialias=True)
    else:  # the torch-hub forward: interpolate_offset=0.1, interpolate_antialias=False
        scale = float(grid + 0.1) / NATIVE
        table = F.interpolate(table, mode="bicubic", antialias=False, scale_factor=(scale, scale))
    table = table.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
    clone.embeddings.position_embeddings = torch.nn.Parameter(torch.cat([pos[:, :1], table], dim=1))
    return clone


@pytest.mark.parametrize("mode,grid", [("repa", 3), ("repa", 8), ("hub", 3), ("hub", 8)])
def test_tokens_match_repa_and_hub_resampling(reference, mode, grid):
    model, directory = reference
    module, params = load_dinov2(directory, pos_interpolation=mode)
    images = _images(14 * grid, 14 * grid, seed=grid)
    ref = _hf_tokens(_resampled_reference(model, grid, mode), images)
    err = _rel_err(_tokens(module, params, images), ref)
    print(f"{mode} grid {grid}: relative error {err:.2e}")
    assert err < TOL, err
    for other in {"repa", "hub", "hf"} - {mode}:
        assert _rel_err(_tokens(module.clone(pos_interpolation=other), params, images), ref) > 100 * TOL, other


def test_hub_layout_and_in_memory_names_load_the_same_weights(reference, tmp_path):
    model, directory = reference
    _, params = load_dinov2(directory)
    hub_file = tmp_path / "dinov2_vit_tiny14_pretrain.pth"
    torch.save(_hub_state(model), hub_file)
    module, hub_params = load_dinov2(str(hub_file), num_heads=4)  # width 64 is not a released one
    assert module.config.num_heads == 4 and module.config.ffn == ("swiglu" if model.config.use_swiglu_ffn else "mlp")
    # the in-memory names (transformers 5.23: q_proj, gate_proj, ...) in a .bin beside the config.json
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    (bin_dir / "config.json").write_text(open(f"{directory}/config.json").read())
    _, bin_params = load_dinov2(str(bin_dir))
    for other in (hub_params, bin_params):
        assert jax.tree.structure(other) == jax.tree.structure(params)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(params)))
    images = _images(70, 70)
    assert _rel_err(_tokens(module, hub_params, images), _hf_tokens(model, images)) < TOL


def test_bfloat16_compute_stays_close_and_returns_float32(reference):
    model, directory = reference
    module, params = load_dinov2(directory, dtype=jnp.bfloat16)
    images = _images(42, 42)
    ours = _tokens(module, params, images)
    assert ours.dtype == np.float32
    assert jax.tree.leaves(params)[0].dtype == jnp.float32
    assert _rel_err(ours, _tokens(module.clone(dtype=jnp.float32), params, images)) < 0.1


# ---------------------------------------------------------------------------------------------
# torch bicubic, REPA preprocessing
# ---------------------------------------------------------------------------------------------


def _apply_2d(x_nchw: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    return rows.astype(np.float64) @ x_nchw.astype(np.float64) @ cols.astype(np.float64).T


@pytest.mark.parametrize("in_hw,out_hw", [((37, 37), (16, 16)), ((37, 37), (32, 32)), ((37, 37), (64, 64)),
                                           ((5, 5), (3, 8)), ((256, 200), (224, 240)), ((7, 1), (20, 3))])
def test_bicubic_matrix_matches_torch_interpolate(in_hw, out_hw):
    x = np.random.default_rng(0).standard_normal((1, 3, *in_hw)).astype(np.float32)
    t = torch.from_numpy(x)
    for antialias in (False, True):  # size form: F.interpolate(size=...)
        ref = F.interpolate(t, size=out_hw, mode="bicubic", align_corners=False, antialias=antialias).numpy()
        ours = _apply_2d(x, bicubic_matrix(in_hw[0], out_hw[0], antialias=antialias),
                         bicubic_matrix(in_hw[1], out_hw[1], antialias=antialias))
        assert _rel_err(ours, ref) < TOL, (antialias, _rel_err(ours, ref))
    # scale_factor form, with the hub's 0.1 offset: coordinates follow 1 / scale_factor, not in / out
    scales = [(o + 0.1) / i for i, o in zip(in_hw, out_hw)]
    ref = F.interpolate(t, scale_factor=scales, mode="bicubic", align_corners=False).numpy()
    ours = _apply_2d(x, *(bicubic_matrix(i, o, scale_factor=s) for i, o, s in zip(in_hw, out_hw, scales)))
    assert ref.shape[2:] == out_hw
    err = _rel_err(ours, ref)
    print(f"{in_hw} -> {out_hw}: scale_factor form relative error {err:.2e}")
    assert err < TOL, err
    with pytest.raises(ValueError, match="output size"):
        bicubic_matrix(in_hw[0], out_hw[0] + 1, scale_factor=scales[0])


@pytest.mark.parametrize("in_size,out_size", [(257, 226), (37, 16), (37, 64), (5, 3)])
def test_bicubic_weights_equal_torchs(in_size, out_size):
    """The matrices themselves, read from torch by resampling one-hot rows: equal up to float32
    rounding of the weights (this also pins torch's single rounding of its source coordinates)."""
    eye = torch.eye(in_size).reshape(in_size, 1, 1, in_size)
    forms = {"size": dict(size=(1, out_size)), "size, antialias": dict(size=(1, out_size), antialias=True),
             "scale_factor": dict(scale_factor=(1.0, (out_size + 0.1) / in_size))}
    for name, kwargs in forms.items():
        ref = F.interpolate(eye, mode="bicubic", align_corners=False, **kwargs)[:, 0, 0, :].numpy().T
        ours = bicubic_matrix(in_size, out_size, scale_factor=kwargs.get("scale_factor", (0, None))[1],
                              antialias=kwargs.get("antialias", False))
        assert np.abs(ours - ref).max() < 1e-6, (name, np.abs(ours - ref).max())


def test_jax_image_resize_is_not_torch_bicubic():
    """The planted bug the checks above would catch: jax.image.resize's bicubic (Keys a = -0.5) and
    torch's (A = -0.75, clamped borders) differ far beyond the tolerance."""
    x = np.random.default_rng(0).standard_normal((1, 3, 37, 37)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x), size=(16, 16), mode="bicubic", align_corners=False).numpy()
    jax_resize = np.asarray(jax.image.resize(x, (1, 3, 16, 16), "bicubic", antialias=False))
    assert _rel_err(jax_resize, ref) > 100 * TOL


@pytest.mark.parametrize("shape,size", [((3, 256, 256, 3), 224), ((2, 40, 60, 3), 70), ((1, 512, 512, 3), 448)])
def test_preprocess_images_matches_repa(shape, size):
    """REPA's preprocess_raw_image('dinov2'): x / 255, Normalize(ImageNet), F.interpolate(x, size, 'bicubic')."""
    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2) / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    ref = F.interpolate((x - mean) / std, size, mode="bicubic").permute(0, 2, 3, 1).numpy()
    ours = jax.jit(preprocess_images, static_argnums=1)(images, size)
    assert ours.shape == (shape[0], size, size, 3) and ours.dtype == jnp.float32
    err = _rel_err(ours, ref)
    print(f"{shape} -> {size}: relative error {err:.2e}")
    assert err < TOL, err


def test_encoder_input_size_follows_the_token_grid():
    assert encoder_input_size(16) == 224 and encoder_input_size(32) == 448  # REPA at 256 and 512 px
    assert encoder_input_size(8, patch_size=16) == 128


# ---------------------------------------------------------------------------------------------
# Configurations, random weights, errors
# ---------------------------------------------------------------------------------------------


def test_released_sizes():
    """Parameter counts of the official DinoVisionTransformer (img_size 518, patch 14, LayerScale,
    block_chunks 0) less its unused mask_token, counted from facebookresearch/dinov2's code."""
    expected = {"vits14": 22_056_192, "vitb14": 86_579_712, "vitl14": 304_367_616, "vitg14": 1_136_479_232}
    assert CONFIGS["vitg14"].ffn == "swiglu" and CONFIGS["vitg14"].ffn_hidden == 4096
    for name, config in CONFIGS.items():
        shapes = jax.eval_shape(DINOv2(config).init, jax.random.key(0), jnp.zeros((1, 14, 14, 3)))["params"]
        count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
        assert count == expected[name], (name, count)
        assert shapes["pos_embed"].shape == (1, 1 + 37 * 37, config.embed_dim)


def test_random_dinov2_runs_at_any_multiple_of_the_patch():
    module, params = random_dinov2(DINOv2Config(embed_dim=32, depth=1, num_heads=2), seed=3)
    tokens = _tokens(module, params, _images(28, 42))
    assert tokens.shape == (2, 6, 32) and np.isfinite(tokens).all()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        module.apply({"params": params}, jnp.zeros((1, 30, 28, 3)))
    with pytest.raises(ValueError, match="divisible"):
        DINOv2Config(embed_dim=30, depth=1, num_heads=4)


def test_missing_weights_say_what_to_get(tmp_path):
    with pytest.raises(FileNotFoundError, match="dinov2_vitb14_pretrain.pth.*facebook/dinov2-base"):
        load_dinov2(str(tmp_path / "nowhere.pth"))
    with pytest.raises(FileNotFoundError, match="no DINOv2 weights under"):
        load_dinov2(str(tmp_path))


def test_bad_files_are_refused(reference, tmp_path):
    model, _ = reference
    state = _hub_state(model)

    def load(tensors, **kw):
        path = tmp_path / "dinov2.pth"
        torch.save(tensors, path)
        return load_dinov2(str(path), num_heads=4, **kw)

    with pytest.raises(ValueError, match=r"unexpected \['blocks.0.attn.extra.weight'\]"):
        load({**state, "blocks.0.attn.extra.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"missing \['blocks.1.norm2.bias'\]"):
        load({k: v for k, v in state.items() if k != "blocks.1.norm2.bias"})
    with pytest.raises(ValueError, match="register tokens.*not supported"):
        load({**state, "register_tokens": torch.zeros(1, 4, 64)})
    with pytest.raises(ValueError, match="wrong shapes.*blocks_0/norm1/scale"):
        load({**state, "blocks.0.norm1.weight": torch.zeros(63)})
    with pytest.raises(ValueError, match="number of heads is unknown"):
        path = tmp_path / "no_heads.pth"
        torch.save(state, path)
        load_dinov2(str(path))


def test_hf_registers_model_is_refused(tmp_path):
    import_torchvision()
    transformers = pytest.importorskip("transformers", reason="transformers defines Dinov2WithRegistersModel")
    config = transformers.Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                    image_size=28, patch_size=14, num_register_tokens=4)
    transformers.Dinov2WithRegistersModel(config).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="registers"):
        load_dinov2(str(tmp_path))
