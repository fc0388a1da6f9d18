"""The layouts of `layers.Dense` and `layers.Attention`: the 'cpu' one (rows, heads-first attention)
gives the same numbers as flax's nn.Dense and jax.nn.dot_product_attention (the 'accelerator' one),
forward and backward, without the copies it exists to avoid; which one runs is the model's field,
not the host's backend."""

from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsync_jax.models.layers import Attention, Dense, heads_first_attention

N, T, IN, OUT = 8, 49, 24, 40
# The HLO checks are of XLA:CPU's compiled programs.
cpu_only = pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA:CPU's compiled program")


def _inputs(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


def _loss(module):
    return lambda p, x: jnp.sum(jnp.tanh(module.apply(p, x)) ** 2)


@pytest.mark.parametrize("shape", [(N, T, IN), (N * T, IN), (2, 3, 5, IN)])
@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_matches_flax_dense_forward_and_gradients(shape, use_bias):
    x = _inputs(shape)
    ours, flax_dense = Dense(OUT, use_bias=use_bias, layout="cpu"), nn.Dense(OUT, use_bias=use_bias)
    params = ours.init(jax.random.key(1), x)
    # Same parameter tree, shapes and initial values as flax's own Dense.
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, flax_dense.init(jax.random.key(1), x))
    jax.tree.map(np.testing.assert_array_equal, params, flax_dense.init(jax.random.key(1), x))
    params = jax.tree.map(lambda a: a + 0.1, params)  # a nonzero bias
    np.testing.assert_allclose(ours.apply(params, x), flax_dense.apply(params, x), rtol=1e-5, atol=1e-5)
    g_ours = jax.grad(_loss(ours), argnums=(0, 1))(params, x)
    g_flax = jax.grad(_loss(flax_dense), argnums=(0, 1))(params, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_ours, g_flax)


def test_dense_bfloat16_compute_with_float32_params_matches_flax():
    x = _inputs((N, T, IN))
    ours, flax_dense = Dense(OUT, dtype=jnp.bfloat16, layout="cpu"), nn.Dense(OUT, dtype=jnp.bfloat16)
    params = jax.tree.map(lambda a: a + 0.1, ours.init(jax.random.key(1), x))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
    out = ours.apply(params, x)
    assert out.dtype == jnp.bfloat16
    reference = flax_dense.apply(params, x).astype(np.float32)
    np.testing.assert_allclose(out.astype(np.float32), reference, rtol=2e-2, atol=2e-2)
    g_ours = jax.grad(_loss(ours))(params, x)
    g_flax = jax.grad(_loss(flax_dense))(params, x)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(g_ours))
    # flax sums the bias gradient in bfloat16; ours accumulates it in float32, so compare loosely.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=5e-2, atol=5e-1), g_ours, g_flax)


def test_dense_refuses_a_custom_dot_general():
    with pytest.raises(ValueError, match="dot_general"):
        Dense(OUT, dot_general=jax.lax.dot_general).init(jax.random.key(0), _inputs((N, IN)))


def test_dense_forward_mode_gives_the_bias_tangent():
    x = _inputs((N, T, IN))
    dense = Dense(OUT, layout="cpu")
    params = dense.init(jax.random.key(0), x)
    tangent = jax.tree.map(jnp.zeros_like, params)
    tangent["params"]["bias"] = jnp.arange(OUT, dtype=jnp.float32)
    _, out_dot = jax.jvp(lambda p: dense.apply(p, x), (params,), (tangent,))
    np.testing.assert_allclose(out_dot, jnp.broadcast_to(jnp.arange(OUT, dtype=jnp.float32), (N, T, OUT)))


@cpu_only
def test_dense_backward_on_cpu_has_no_transposed_activation():
    """The point of the layout: flax's Dense makes XLA:CPU copy an (OUT, N*T) transpose of the output
    gradient for the weight gradient; ours contracts the rows in place."""
    x = _inputs((N, T, IN))
    rows = f",{N * T}]"

    def transposed_activations(module):
        params = module.init(jax.random.key(0), x)
        hlo = jax.jit(jax.grad(_loss(module), argnums=(0, 1))).lower(params, x).compile().as_text()
        entry = hlo.split("ENTRY")[1]
        return [line for line in entry.splitlines() if " = " in line and rows in line.split(" = ")[1][:24]]

    assert transposed_activations(nn.Dense(OUT)), "flax's Dense no longer transposes here: the layout may be moot"
    assert transposed_activations(Dense(OUT, layout="cpu")) == []
    assert transposed_activations(Dense(OUT, layout="accelerator")), "the accelerator layout is flax's computation"


def test_dense_accelerator_layout_is_flax_computation_whatever_the_host():
    x = _inputs((N, T, IN))
    dense = Dense(OUT)  # 'accelerator' by default: what a GPU or TPU program is traced with
    params = dense.init(jax.random.key(0), x)
    jaxpr = str(jax.make_jaxpr(lambda p: dense.apply(p, x))(params))
    assert "custom_jvp_call" not in jaxpr and "reshape" not in jaxpr
    rows = Dense(OUT, layout="cpu")
    assert "custom_jvp_call" in str(jax.make_jaxpr(lambda p: rows.apply(p, x))(params))
    with pytest.raises(ValueError, match="layout"):
        Dense(OUT, layout="tpu").init(jax.random.key(0), x)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_heads_first_attention_matches_dot_product_attention(dtype):
    heads, head_dim = 3, 16
    qkv = _inputs((4, T, 3 * heads * head_dim)).astype(dtype)
    w = _inputs((4, T, heads * head_dim), seed=1).astype(dtype)

    def reference(qkv):
        q, k, v = jnp.split(qkv, 3, axis=-1)
        q, k, v = (z.reshape(4, T, heads, head_dim) for z in (q, k, v))
        return jax.nn.dot_product_attention(q, k, v, implementation="xla").reshape(4, T, -1)

    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    ours = heads_first_attention(qkv, heads)
    assert ours.dtype == dtype
    np.testing.assert_allclose(ours.astype(np.float32), reference(qkv).astype(np.float32), **tol)
    g_ours = jax.grad(lambda a: jnp.sum(heads_first_attention(a, heads) * w).astype(jnp.float32))(qkv)
    g_ref = jax.grad(lambda a: jnp.sum(reference(a) * w).astype(jnp.float32))(qkv)
    np.testing.assert_allclose(g_ours.astype(np.float32), g_ref.astype(np.float32), **tol)


def test_attention_module_uses_the_heads_first_path_only_in_the_cpu_layout_without_lengths():
    x = _inputs((2, T, 48))
    attn = Attention(48, 3, implementation="xla", layout="cpu")
    params = attn.init(jax.random.key(0), x)
    calls = []

    def spy(qkv, heads):
        calls.append(qkv.shape)
        return heads_first_attention(qkv, heads)

    with mock.patch("lsync_jax.models.layers.heads_first_attention", side_effect=spy):
        full = attn.apply(params, x)
        masked = attn.apply(params, x, jnp.full((2,), T))  # lengths: jax.nn.dot_product_attention's masks
        assert calls == [(2, T, 144)]
        plain = Attention(48, 3, implementation="auto", layout="accelerator").apply(params, x)
        assert len(calls) == 1
    np.testing.assert_allclose(full, masked, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(full, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["SiT-S/4", "UViT-S/4"])
def test_a_backbone_in_the_accelerator_layout_matches_the_cpu_layout_forward_and_backward(name):
    """What a GPU or TPU traces (the 'accelerator' layout), checked on the CPU against the CPU layout:
    the same outputs, sown blocks and gradients to float32 rounding."""
    from lsync_jax.models import get_model

    kw = dict(depth=3, hidden_size=48, num_heads=3, input_size=16, in_channels=3, num_classes=5)
    if name.startswith("SiT"):
        kw["learn_sigma"] = False
    cpu, accel = get_model(name, layout="cpu", **kw), get_model(name, layout="accelerator", **kw)
    x, t, y = _inputs((2, 16, 16, 3)), jnp.asarray([0.3, 0.8]), jnp.asarray([1, 4])
    params = cpu.init(jax.random.key(0), x, t, y)
    params = jax.tree.map(lambda a: a + 0.02 * jnp.cos(jnp.arange(a.size, dtype=a.dtype).reshape(a.shape)), params)

    def run(model):
        def loss(p):
            out, sown = model.apply(p, x, t, y, mutable=["intermediates"])
            return jnp.sum(out ** 2) + jnp.sum(sown["intermediates"]["block_2"][0] ** 2), (out, sown)
        (_, (out, sown)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return out, sown, grads

    for a, b in zip(run(cpu), run(accel)):
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=5e-5), a, b)


def test_splash_attention_matches_the_xla_path_forward_and_backward_in_pallas_interpreter():
    """The TPU kernel's numbers, checked on the CPU by Pallas's interpreter (the 'cpu' layout runs it):
    the same outputs and gradients as jax.nn.dot_product_attention's XLA path."""
    tokens, width = 128, 64
    x = _inputs((2, tokens, width))
    splash = Attention(width, 2, implementation="splash", layout="cpu")
    xla = Attention(width, 2, implementation="xla", layout="accelerator")
    params = jax.tree.map(lambda a: a + 0.05, splash.init(jax.random.key(0), x))
    np.testing.assert_allclose(splash.apply(params, x), xla.apply(params, x), rtol=1e-4, atol=1e-5)
    grads = [jax.grad(lambda p, m=m: jnp.sum(jnp.tanh(m.apply(p, x)) ** 2))(params) for m in (splash, xla)]
    # q's and k's bias gradients are ~0 (softmax ignores a shift shared by every key): rounding, to 1e-4
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), *grads)


def test_splash_attention_is_refused_where_it_cannot_run():
    from lsync_jax.models.layers import resolve_attention_impl

    with pytest.raises(ValueError, match="Pallas kernel for TPUs"):
        resolve_attention_impl("splash", "gpu", jnp.bfloat16, 72)
    assert resolve_attention_impl("splash", "tpu", jnp.bfloat16, 72) == "splash"
    with pytest.raises(ValueError, match="blocks of 128 tokens; this input has 49 tokens"):
        Attention(48, 3, implementation="splash", layout="cpu").init(jax.random.key(0), _inputs((2, 49, 48)))
