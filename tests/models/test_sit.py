"""SiT: shapes and parameter counts of the official sizes, forward pass, sown intermediates."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsync_jax.models import MODEL_NAMES, get_model, model_config
from lsync_jax.models.layers import AdaLNBlock, LabelEmbedder, TimestepEmbedder, resolve_attention_impl, sincos_2d
from tests.helpers import perturbed


def official_param_count(depth, hidden, patch, in_channels=4, learn_sigma=True, num_classes=1000, tokens=256):
    """Parameters of the official PyTorch SiT/DiT (pos_embed buffer included), counted by hand."""
    h = hidden
    out = in_channels * (2 if learn_sigma else 1)
    x_embedder = patch * patch * in_channels * h + h
    t_embedder = 256 * h + h + h * h + h
    y_embedder = (num_classes + 1) * h
    block = (h * 6 * h + 6 * h) + (h * 3 * h + 3 * h) + (h * h + h) + (h * 4 * h + 4 * h) + (4 * h * h + h)
    final = (h * 2 * h + 2 * h) + (h * patch * patch * out + patch * patch * out)
    return x_embedder + tokens * h + t_embedder + y_embedder + depth * block + final


def param_shapes(model, batch=2):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *model.init_inputs(batch)))


def count(tree):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_official_sizes_shapes_and_param_counts(name):
    model = get_model(name)
    cfg = model_config(name)
    variables = param_shapes(model)
    tokens = (32 // cfg["patch_size"]) ** 2
    expected = official_param_count(cfg["depth"], cfg["hidden_size"], cfg["patch_size"], tokens=tokens)
    # The official count includes the frozen pos_embed buffer; ours computes it on the fly.
    assert count(variables["params"]) == expected - tokens * cfg["hidden_size"]
    assert set(variables) == {"params"}
    x, t, y = model.init_inputs(2)
    out = jax.eval_shape(lambda v: model.apply(v, x, t, y), variables)
    assert out.shape == (2, 32, 32, 4) and out.dtype == jnp.float32


def test_sit_xl2_has_the_published_parameter_count():
    model = get_model("SiT-XL/2")
    n = count(param_shapes(model)["params"]) + 256 * 1152  # + the official pos_embed buffer
    assert n == 675_129_632  # DiT-XL/2 / SiT-XL/2 as published


def init(model, *args):
    """model.init under one jit: eager flax dispatches (and compiles) op by op, slowly on CPU."""
    return jax.jit(model.init)(jax.random.key(0), *args)


def apply(model, variables, *args, **kwargs):
    """model.apply under one jit (keyword arguments are closed over)."""
    return jax.jit(lambda v, *a: model.apply(v, *a, **kwargs))(variables, *args)


def tiny(**overrides):
    kw = dict(depth=3, hidden_size=32, num_heads=2, input_size=28, in_channels=1, num_classes=10)
    kw.update(overrides)
    return get_model("SiT-S/4", **kw)


def test_forward_tiny_model_and_every_block_is_sown():
    model = tiny()
    x = jax.random.normal(jax.random.key(1), (3, 28, 28, 1))
    t = jnp.array([0.1, 0.5, 0.9])
    y = jnp.array([0, 4, 10])  # 10 is the null class
    variables = init(model, x, t, y)
    out, state = apply(model, variables, x, t, y, train=True, mutable=["intermediates"],
                             rngs={"dropout": jax.random.key(2)})
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    sown = state["intermediates"]
    assert sorted(sown) == ["block_1", "block_2", "block_3"]
    for name in sown:
        assert sown[name][0].shape == (3, 49, 32)
    # adaLN-Zero: at initialisation every block is the identity and the output is exactly zero.
    np.testing.assert_array_equal(sown["block_1"][0], sown["block_3"][0])
    np.testing.assert_array_equal(out, 0.0)


def test_sown_block_is_the_residual_stream_after_that_block():
    model = tiny(depth=2)
    x, t, y = jax.random.normal(jax.random.key(1), (2, 28, 28, 1)), jnp.array([0.3, 0.7]), jnp.array([1, 2])
    variables = perturbed(init(model, x, t, y), 5)
    _, state = apply(model, variables, x, t, y, mutable=["intermediates"])
    h1, h2 = state["intermediates"]["block_1"][0], state["intermediates"]["block_2"][0]
    assert not np.allclose(h1, h2)
    # Re-run the second block by hand on block_1's output: it must give block_2.
    p = variables["params"]
    c = TimestepEmbedder(32).apply({"params": p["t_embedder"]}, t) + LabelEmbedder(10, 32, 0.1).apply(
        {"params": p["y_embedder"]}, y, False)
    again = AdaLNBlock(32, 2).apply({"params": p["blocks_1"]}, h1, c)
    np.testing.assert_allclose(again, h2, rtol=1e-3, atol=1e-5)


def test_any_shape_the_patch_divides_and_latents():
    """One set of parameters serves every H x W the patch divides (positions are fixed sin-cos)."""
    model = tiny(in_channels=4, depth=1)
    variables = perturbed(init(model, *model.init_inputs(1)), 3)
    fn = jax.jit(model.apply)
    for shape in [(2, 32, 32, 4), (2, 16, 24, 4), (1, 8, 8, 4)]:
        x = jnp.ones(shape)
        t, y = jnp.full((shape[0],), 0.5), jnp.zeros((shape[0],), jnp.int32)
        out = fn(variables, x, t, y)
        assert out.shape == shape and bool(jnp.all(jnp.isfinite(out)))


def test_bad_inputs_raise_clear_errors():
    model = tiny()
    v = init(model, *model.init_inputs(1))
    t, y = jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="not divisible by patch_size=4"):
        apply(model, v, jnp.zeros((1, 30, 28, 1)), t, y)
    with pytest.raises(ValueError, match="in_channels=1"):
        apply(model, v, jnp.zeros((1, 28, 28, 3)), t, y)
    with pytest.raises(ValueError, match="NHWC"):
        apply(model, v, jnp.zeros((1, 28, 28)), t, y)
    with pytest.raises(ValueError, match="t must have shape"):
        apply(model, v, jnp.zeros((1, 28, 28, 1)), jnp.zeros((2,)), y)


def test_get_model_rejects_bad_names_and_overrides():
    with pytest.raises(ValueError, match="unknown model name"):
        get_model("SiT-M/2")
    with pytest.raises(ValueError, match="unknown model override"):
        get_model("SiT-S/2", n_layers=3)
    with pytest.raises(ValueError, match="not divisible by model.num_heads"):
        get_model("SiT-S/2", num_heads=5)


def test_official_initialisation():
    model = get_model("SiT-S/2", depth=2)
    params = init(model, *model.init_inputs(1))["params"]
    for b in ("blocks_0", "blocks_1"):
        assert not np.any(params[b]["adaLN_modulation"]["kernel"])
        assert not np.any(params[b]["adaLN_modulation"]["bias"])
        # xavier-uniform: bound sqrt(6 / (fan_in + fan_out)), zero bias
        w = params[b]["attn"]["qkv"]["kernel"]
        assert np.abs(w).max() <= math.sqrt(6 / (384 + 3 * 384)) and np.abs(w).max() > 0.9 * math.sqrt(6 / (4 * 384))
        assert not np.any(params[b]["attn"]["qkv"]["bias"])
    for k in ("linear", "adaLN_modulation"):
        assert not np.any(params["final_layer"][k]["kernel"])
    # label table and timestep MLP: N(0, 0.02)
    assert abs(np.std(params["y_embedder"]["embedding_table"]["embedding"]) - 0.02) < 1e-3
    assert abs(np.std(params["t_embedder"]["mlp_0"]["kernel"]) - 0.02) < 1e-3
    # patch embedding: xavier over the flattened (p * p * C) -> hidden matrix, as nn.Linear
    w = params["x_embedder"]["kernel"]
    assert w.shape == (2, 2, 4, 384)
    bound = math.sqrt(6 / (2 * 2 * 4 + 384))
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound


@pytest.mark.slow
def test_label_dropout_uses_the_null_class_only_in_training():
    model = tiny(class_dropout_prob=0.5)
    x, t = jnp.ones((64, 28, 28, 1)), jnp.full((64,), 0.5)
    y = jnp.zeros((64,), jnp.int32)
    v = perturbed(init(model, x, t, y), 1)
    null = apply(model, v, x, t, jnp.full((64,), 10))
    cond = apply(model, v, x, t, y)
    trained = apply(model, v, x, t, y, train=True, rngs={"dropout": jax.random.key(3)})
    is_null = np.all(np.isclose(trained, null, atol=1e-6), axis=(1, 2, 3))
    is_cond = np.all(np.isclose(trained, cond, atol=1e-6), axis=(1, 2, 3))
    assert np.all(is_null ^ is_cond)
    assert 16 <= is_null.sum() <= 48
    np.testing.assert_allclose(apply(model, v, x, t, y, train=False), cond)


def test_sincos_matches_the_official_square_table():
    # MAE/DiT: meshgrid(w, h) -> first half encodes the column (w) index, second half the row.
    emb = sincos_2d(8, 3, 3)
    omega = 1.0 / 10000 ** (np.arange(2) / 2.0)
    row, col = 1, 2
    token = row * 3 + col
    expected = np.concatenate([np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)])
    np.testing.assert_allclose(emb[token], expected, rtol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_output():
    model = tiny(dtype=jnp.bfloat16)
    ref = tiny()
    x, t, y = jax.random.normal(jax.random.key(1), (2, 28, 28, 1)), jnp.array([0.2, 0.8]), jnp.array([1, 2])
    v = perturbed(init(ref, x, t, y), 4)
    assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(init(model, x, t, y)))
    out16, out32 = apply(model, v, x, t, y), apply(ref, v, x, t, y)
    assert out16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert 0 < rel < 3e-2


def test_auto_attention_picks_cudnn_only_where_it_applies():
    assert resolve_attention_impl("auto", "gpu", jnp.bfloat16, 72) == "cudnn"
    assert resolve_attention_impl("auto", "gpu", jnp.float16, 64) == "cudnn"
    assert resolve_attention_impl("auto", "gpu", jnp.float32, 64) == "xla"
    assert resolve_attention_impl("auto", "gpu", jnp.bfloat16, 100) == "xla"
    assert resolve_attention_impl("auto", "cpu", jnp.bfloat16, 64) == "xla"
    assert resolve_attention_impl("xla", "gpu", jnp.bfloat16, 64) == "xla"
    with pytest.raises(ValueError, match="unknown attention implementation"):
        resolve_attention_impl("flash", "gpu", jnp.bfloat16, 64)
    with pytest.raises(ValueError, match="model.attention_impl"):
        get_model("SiT-S/2", attention_impl="flash")


def test_attention_implementations_agree():
    """'auto' (cuDNN on a GPU in bfloat16) and plain XLA attention compute the same function."""
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    model, ref = tiny(dtype=dtype, hidden_size=64), tiny(dtype=dtype, hidden_size=64, attention_impl="xla")
    x, t, y = jax.random.normal(jax.random.key(1), (2, 28, 28, 1)), jnp.array([0.2, 0.8]), jnp.array([1, 2])
    v = perturbed(init(ref, x, t, y), 4)
    a, b = apply(model, v, x, t, y), apply(ref, v, x, t, y)
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < (2e-2 if dtype == jnp.bfloat16 else 1e-5)


@pytest.mark.parametrize("remat", [True, "blocks", "dots"])
def test_every_remat_policy_gives_the_same_gradients_and_sown_features(remat):
    """What LayerSync and REPA read (the sown blocks and projections) and the gradients through them
    are the same under every policy."""
    model, ref = tiny(remat=remat, z_dims=(8,), encoder_depth=1), tiny(z_dims=(8,), encoder_depth=1)
    assert model.remat == ("blocks" if remat is True else remat) and ref.remat == "none"
    x, t, y = jax.random.normal(jax.random.key(1), (2, 28, 28, 1)), jnp.array([0.2, 0.8]), jnp.array([1, 2])
    v = perturbed(init(ref, x, t, y), 4)

    def loss(p, m):
        out, sown = m.apply(p, x, t, y, mutable=["intermediates"])
        feats = sown["intermediates"]
        aligned = jnp.sum(feats["block_1"][0] * jax.lax.stop_gradient(feats["block_3"][0]))
        return jnp.sum(out ** 2) + aligned + jnp.sum(feats["projection_0"][0] ** 2), feats

    (_, fa), ga = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(v, model)
    (_, fb), gb = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(v, ref)
    assert sorted(fa) == sorted(fb)
    # GPUs run float32 matmuls in TF32 by default: compare at that precision
    for a, b in zip(jax.tree.leaves((fa, ga)), jax.tree.leaves((fb, gb))):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_an_unknown_remat_policy_is_refused_by_name():
    with pytest.raises(ValueError, match="model.remat='everything'"):
        tiny(remat="everything")
