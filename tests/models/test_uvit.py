"""U-ViT: paper sizes, forward pass, sown patch tokens, label dropout, ScaleLong's skip scaling
(checked by re-running each out-block by hand on its captured inputs), validation, LayerSync grads."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsync_jax.models import UVIT_MODEL_NAMES, get_model, model_config
from lsync_jax.models.sit import block_name
from lsync_jax.models.uvit import LS_REDUCTION, UViT, UViTBlock, skip_scale_factors
from lsync_jax.objectives.layersync import layersync_loss

WIDTH, HEADS, PATCH_TOKENS = 32, 2, 49  # 28 x 28 inputs, patch 4


def tiny(**overrides) -> UViT:
    kw = dict(depth=5, hidden_size=WIDTH, num_heads=HEADS, input_size=28, in_channels=1, num_classes=10)
    kw.update(overrides)
    return get_model("UViT-S/4", **kw)


def count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def random_params(model: UViT, seed: int, scale: float = 0.1) -> dict:
    """Parameters drawn on the host (no init compile): N(0, scale^2), LayerNorm scales 1 + N(0, scale^2)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *model.init_inputs(1))
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        base = 1.0 if path[-1].key == "scale" else 0.0
        return base + scale * rng.standard_normal(s.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


BATCH = (jax.random.normal(jax.random.key(1), (2, 28, 28, 1)), jnp.array([0.2, 0.7]), jnp.array([3, 10]))


def official_param_count(depth, d, p, c, label_rows, tokens, conv, mlp_time):
    """Parameters of the official PyTorch U-ViT, by hand (qkv_bias=False, affine LayerNorms)."""
    extras = 2 if label_rows else 1
    block = 2 * d + 3 * d * d + (d * d + d) + 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)
    n_out = (depth - 1) // 2
    return ((p * p * c * d + d) + (8 * d * d + 5 * d if mlp_time else 0) + label_rows * d + (extras + tokens) * d
            + depth * block + n_out * (2 * d * d + d) + 2 * d + (d * p * p * c + p * p * c)
            + (c * c * 9 + c if conv else 0))


# name, overrides, the U-ViT paper's parameter count (millions)
PAPER = [
    ("UViT-S/2", dict(input_size=32, in_channels=3, num_classes=0, mlp_time_embed=False), 44),  # CIFAR-10
    ("UViT-H/2", dict(mlp_time_embed=False, final_conv=False), 501),  # ImageNet 256 latents
]


@pytest.mark.parametrize("name, overrides, millions", PAPER)
def test_paper_sizes_match_the_official_parameter_count(name, overrides, millions):
    model = get_model(name, **overrides)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *model.init_inputs(2)))
    cfg = model_config(name)
    d, p, c = cfg["hidden_size"], cfg["patch_size"], model.in_channels
    rows = model.num_classes + 1 if model.num_classes else 0
    expected = official_param_count(cfg["depth"], d, p, c, rows, (model.input_size // p) ** 2, model.final_conv,
                                     model.mlp_time_embed)
    # Ours reuses layers.Attention, whose qkv has a bias: 3 D more per block.
    assert count(variables["params"]) == expected + cfg["depth"] * 3 * d
    assert round(expected / 1e6) == millions
    assert {"UViT-S/2", "UViT-L/2", "UViT-H/2", "UViT-M/4"} <= set(UVIT_MODEL_NAMES)
    assert model_config("UViT-L/2") == dict(depth=21, hidden_size=1024, num_heads=16, patch_size=2)


def block_order(model):
    """Module names in execution order: block_i is the output of the i-th of these."""
    n = model.num_out_blocks
    return [f"in_blocks_{i}" for i in range(n)] + ["mid_block"] + [f"out_blocks_{i}" for i in range(n)]


def captured(model, variables, x, t, y):
    """(output, intermediates): sown blocks and, per module, its captured full-token output."""
    out, state = jax.jit(lambda v: model.apply(v, x, t, y, capture_intermediates=True,
                                               mutable=["intermediates"]))(variables)
    return out, state["intermediates"]


OUT_BLOCK = UViTBlock(WIDTH, HEADS, long_skip=True)
run_out_block = jax.jit(lambda p, x, skip: OUT_BLOCK.apply({"params": p}, x, skip))


def check_out_blocks(model, params, inter, scale_of):
    """Re-run out-block i on (previous block's output, scale_of(i, skip) * mirror in-block's output)
    and compare with the model's; yields how far the unscaled skip would have been."""
    n = model.num_out_blocks
    for i in range(n):
        prev = inter["mid_block" if i == 0 else f"out_blocks_{i - 1}"]["__call__"][0]
        skip = inter[f"in_blocks_{n - 1 - i}"]["__call__"][0]
        got = inter[f"out_blocks_{i}"]["__call__"][0]
        np.testing.assert_allclose(run_out_block(params[f"out_blocks_{i}"], prev, scale_of(i, skip) * skip), got,
                                   rtol=1e-4, atol=1e-5)
        yield i, float(jnp.abs(run_out_block(params[f"out_blocks_{i}"], prev, skip) - got).max())


def test_skip_scale_factors():
    np.testing.assert_allclose(skip_scale_factors("cs", 4, 0.6), [0.6**3, 0.6**2, 0.6, 1.0])
    np.testing.assert_allclose(skip_scale_factors("constant", 3), [1 / math.sqrt(2)] * 3)
    assert skip_scale_factors("none", 2) == (1.0, 1.0)


@pytest.mark.parametrize("depth, scaling, kappa, num_classes, factors", [
    (7, "cs", 0.6, 10, [0.36, 0.6, 1.0]),  # kappa^(N - 1 - i), N = 3 out-blocks; the last one is 1
    (3, "constant", 0.7, 0, [2**-0.5]),  # and an unconditional model: one extra token
])
def test_forward_sown_patch_tokens_and_scaled_skips(depth, scaling, kappa, num_classes, factors):
    model = tiny(depth=depth, skip_scaling=scaling, skip_kappa=kappa, num_classes=num_classes)
    variables = random_params(model, 2)
    x, t, y = BATCH
    out, inter = captured(model, variables, x, t, y)
    assert out.shape == x.shape and out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    # every block sows its patch tokens (time/label tokens dropped) as block_1 ... block_depth
    assert sorted(k for k in inter if k.startswith("block_")) == sorted(block_name(i) for i in range(1, depth + 1))
    extras = 2 if num_classes else 1
    assert model.num_extra_tokens == extras
    for i, module in enumerate(block_order(model), start=1):
        full = inter[module]["__call__"][0]
        assert full.shape == (2, extras + PATCH_TOKENS, WIDTH)
        assert inter[block_name(i)][0].shape == (2, PATCH_TOKENS, WIDTH)
        np.testing.assert_array_equal(inter[block_name(i)][0], full[:, extras:])
    # out-block i merges lambda_i * (its mirror in-block's output)
    for i, diff in check_out_blocks(model, variables["params"], inter, lambda i, skip: factors[i]):
        assert (diff > 1e-3) == (factors[i] != 1.0)  # the check tells scaled from unscaled skips


@pytest.mark.parametrize("shared", [True, False])
def test_ls_calibration_is_a_per_token_sigmoid_scale_shared_or_per_block(shared):
    model = tiny(skip_scaling="ls", ls_shared=shared)
    n, tokens = model.num_out_blocks, 2 + PATCH_TOKENS
    variables = random_params(model, 3, scale=0.3)
    hidden = tokens // LS_REDUCTION
    per_net = tokens * hidden + hidden + hidden * tokens + tokens
    assert count(variables) - count(jax.eval_shape(tiny().init, jax.random.key(0), *BATCH)) == (
        (1 if shared else n) * per_net)
    params = variables["params"]
    names = ["skip_calibration"] * n if shared else [f"skip_calibration_{i}" for i in range(n)]
    assert sorted(k for k in params if k.startswith("skip_calibration")) == sorted(set(names))
    _, inter = captured(model, variables, *BATCH)
    outputs = ([inter["skip_calibration"]["__call__"][i] for i in range(n)] if shared
               else [inter[name]["__call__"][0] for name in names])

    def scale_of(i, skip):  # sigmoid(W2 relu(W1 mean_c(skip) + b1) + b2), one scale per token
        p = params[names[i]]
        h = jax.nn.relu(skip.mean(-1) @ p["layer1"]["kernel"] + p["layer1"]["bias"])
        s = jax.nn.sigmoid(h @ p["layer2"]["kernel"] + p["layer2"]["bias"])[..., None]
        assert s.shape == (2, tokens, 1)
        np.testing.assert_allclose(outputs[i], s, rtol=1e-5, atol=1e-6)
        assert bool(jnp.all((s > 0) & (s < 1))) and float(s.std()) > 1e-2
        return s

    for _, diff in check_out_blocks(model, params, inter, scale_of):
        assert diff > 1e-3


def test_label_dropout_uses_the_null_class_only_in_training():
    model = tiny(class_dropout_prob=0.5, depth=1)
    x, t = jnp.ones((64, 28, 28, 1)), jnp.full((64,), 0.5)
    y = jnp.zeros((64,), jnp.int32)
    v = random_params(model, 1)
    def outputs(v):  # one compile for the three
        fwd = lambda y, train: model.apply(v, x, t, y, train=train, rngs={"dropout": jax.random.key(3)})  # noqa: E731
        return fwd(jnp.full((64,), 10), False), fwd(y, False), fwd(y, True)

    null, cond, trained = jax.jit(outputs)(v)
    assert np.all(np.abs(null - cond).max(axis=(1, 2, 3)) > 1e-4)  # the label token matters
    is_null = np.all(np.isclose(trained, null, atol=1e-6), axis=(1, 2, 3))
    is_cond = np.all(np.isclose(trained, cond, atol=1e-6), axis=(1, 2, 3))
    assert np.all(is_null ^ is_cond)
    assert 16 <= is_null.sum() <= 48
    assert model.null_label == 10 and v["params"]["label_emb"]["embedding_table"]["embedding"].shape == (11, WIDTH)


def test_bad_fields_raise_value_errors_naming_them():
    with pytest.raises(ValueError, match="depth=12 must be odd"):
        get_model("UViT-S/2", depth=12)
    with pytest.raises(ValueError, match="depth=6 must be odd"):
        UViT(depth=6)
    for kappa in (0.3, 0.99):
        with pytest.raises(ValueError, match=f"skip_kappa={kappa} must be in"):
            get_model("UViT-S/2", skip_scaling="cs", skip_kappa=kappa)
    with pytest.raises(ValueError, match="skip_scaling='learned'"):
        get_model("UViT-S/2", skip_scaling="learned")
    with pytest.raises(ValueError, match="learn_sigma=True"):
        get_model("UViT-S/2", learn_sigma=True)
    with pytest.raises(ValueError, match="z_dims"):
        get_model("UViT-S/2", z_dims=(768,))
    with pytest.raises(ValueError, match="pos_embed='rope'"):
        get_model("UViT-S/2", pos_embed="rope")
    with pytest.raises(ValueError, match="not divisible by num_heads=5"):
        get_model("UViT-S/2", num_heads=5)
    with pytest.raises(ValueError, match="unknown model override"):
        get_model("UViT-S/2", kappa=0.5)
    with pytest.raises(ValueError, match="unknown model name"):
        get_model("UViT-XL/2")


def test_inputs_learned_positions_fix_the_size_sincos_take_any():
    x, t, y = jnp.zeros((2, 16, 24, 1)), jnp.full((2,), 0.5), jnp.zeros((2,), jnp.int32)
    model = tiny(depth=3)
    with pytest.raises(ValueError, match="takes 28x28 inputs"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, y))
    with pytest.raises(ValueError, match="in_channels=1"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 28, 28, 3)), t, y))
    sincos = tiny(depth=3, pos_embed="sincos")
    variables = jax.eval_shape(lambda: sincos.init(jax.random.key(0), *sincos.init_inputs(1)))
    assert "pos_embed" not in variables["params"]
    assert jax.eval_shape(lambda v: sincos.apply(v, x, t, y), variables).shape == x.shape


def test_layersync_on_uvit_trains_the_early_blocks_only():
    """Block 1 (the in-block) guided by block 2 (the mid block, stop-gradient): gradients reach the
    embeddings and the in-block, nothing after it."""
    model = tiny(depth=3, skip_scaling="cs")
    variables = random_params(model, 4)

    def loss(params):
        _, state = model.apply({"params": params}, *BATCH, mutable=["intermediates"])
        sown = state["intermediates"]
        return layersync_loss(sown[block_name(1)][0], sown[block_name(2)][0])

    grads = jax.jit(jax.grad(loss))(variables["params"])
    norms = {k: sum(float(np.abs(np.asarray(g)).sum()) for g in jax.tree.leaves(v)) for k, v in grads.items()}
    for k in ("patch_embed", "pos_embed", "time_embed_0", "label_emb", "in_blocks_0"):
        assert norms[k] > 0, k
    for k in ("mid_block", "out_blocks_0", "norm", "decoder_pred", "final_layer"):
        assert norms[k] == 0, k


def test_bfloat16_compute_keeps_float32_params_and_output():
    model, ref = tiny(depth=1, dtype=jnp.bfloat16), tiny(depth=1)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *BATCH)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
    variables = random_params(ref, 5)
    out16, out32 = jax.jit(lambda v: (model.apply(v, *BATCH), ref.apply(v, *BATCH)))(variables)
    assert out16.dtype == jnp.float32
    out16, out32 = np.asarray(out16), np.asarray(out32)
    rel = np.linalg.norm(out16 - out32) / np.linalg.norm(out32)
    assert 0 < rel < 3e-2
