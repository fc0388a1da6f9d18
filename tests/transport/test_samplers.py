"""Samplers on a Gaussian-to-Gaussian problem with the exact field; guidance; jit and determinism.

Tolerances: fixed-step ODE samplers are compared per sample with the exact flow map (no Monte
Carlo error); the SDE sampler is compared by mean and covariance of 8192 samples, whose Monte
Carlo error is about 0.02 on these entries.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsync_jax.models import get_model
from lsync_jax.transport import (
    SamplerConfig,
    adaptive_ode_sample,
    cfg_combine,
    create_transport,
    euler_maruyama_sample,
    guided_field,
    make_sample_fn,
    ode_sample,
)
from tests.helpers import perturbed
from tests.transport import gaussian

X0 = jax.random.normal(jax.random.key(0), (8192, 2))


def map_error(x):
    return float(jnp.sqrt(jnp.mean(jnp.sum((x - gaussian.flow_map(X0)) ** 2, -1))))


def moment_errors(x):
    x = np.asarray(x, np.float64)
    return np.abs(x.mean(0) - gaussian.MU).max(), np.abs(np.cov(x.T) - gaussian.SIGMA).max()


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_fixed_step_ode_converges_to_the_exact_map(method):
    tr = create_transport()
    run = jax.jit(lambda x, n: ode_sample(gaussian.field(tr), tr, x, method=method, num_steps=n), static_argnums=1)
    errors = [map_error(run(X0, n)) for n in (4, 16, 64)]
    # first order: 4x smaller error for 4x the steps; second order: 16x
    order = 1 if method == "euler" else 2
    assert errors[1] / errors[2] > 0.8 * 4**order and errors[0] / errors[1] > 0.8 * 4**order
    assert errors[2] < (0.04 if method == "euler" else 1e-3)
    mean_err, cov_err = moment_errors(run(X0, 64))
    assert mean_err < 0.05 and cov_err < (0.06 if method == "euler" else 0.03)


@pytest.mark.parametrize("path,prediction", [("gvp", "velocity"), ("linear", "score"), ("vp", "noise")])
def test_heun_on_other_paths_and_predictions(path, prediction):
    tr = create_transport(path, prediction)
    x = jax.jit(lambda x: ode_sample(gaussian.field(tr), tr, x, method="heun", num_steps=100))(X0)
    mean_err, cov_err = moment_errors(x)
    assert mean_err < 0.06 and cov_err < 0.06


@pytest.mark.slow
def test_adaptive_ode_matches_the_exact_map():
    tr = create_transport()
    x, steps = jax.jit(lambda x: adaptive_ode_sample(gaussian.field(tr), tr, x, rtol=1e-5, atol=1e-5))(X0)
    assert map_error(x) < 1e-3 and 1 <= int(steps) < 200
    loose, loose_steps = jax.jit(lambda x: adaptive_ode_sample(gaussian.field(tr), tr, x, rtol=1e-2, atol=1e-2))(X0)
    assert int(loose_steps) <= int(steps)


def test_euler_maruyama_matches_the_target_moments_and_improves_with_steps():
    tr = create_transport()
    run = jax.jit(lambda x, key, n: euler_maruyama_sample(gaussian.field(tr), tr, x, key, num_steps=n),
                  static_argnums=2)
    coarse = moment_errors(run(X0, jax.random.key(1), 5))
    fine = moment_errors(run(X0, jax.random.key(1), 250))
    assert fine[0] < 0.05 and fine[1] < 0.08
    assert sum(fine) < 0.5 * sum(coarse)


def test_euler_maruyama_is_deterministic_for_a_key():
    tr = create_transport()
    run = jax.jit(lambda key: euler_maruyama_sample(gaussian.field(tr), tr, X0[:64], key, num_steps=20))
    np.testing.assert_array_equal(run(jax.random.key(3)), run(jax.random.key(3)))
    assert not np.allclose(run(jax.random.key(3)), run(jax.random.key(4)))


def test_last_steps_match_their_formulas():
    """Each last step, applied to the same pre-final state (same key), is the formula it names."""
    tr = create_transport()
    f, key, x0 = gaussian.field(tr), jax.random.key(0), X0[:256]
    run = lambda last: euler_maruyama_sample(f, tr, x0, key, num_steps=20, last_step=last, last_step_size=0.04)
    # Without a last step SiT integrates to 1 - sample_eps; with sample_eps = 0.04 that is the same
    # grid, linspace(0, 0.96, 20), and the same noise: the state the last steps start from.
    before = euler_maruyama_sample(f, create_transport(sample_eps=0.04), x0, key, num_steps=20, last_step=None)
    t1, h = jnp.float32(0.96), 0.04
    v, s = gaussian.velocity(tr.path, before, t1), gaussian.score(tr.path, before, t1)
    w = 1 - t1  # the 'sigma' diffusion form on the linear path
    np.testing.assert_allclose(run("mean"), before + (v + w * s) * h, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(run("euler"), before + v * h, rtol=1e-4, atol=1e-5)
    # Tweedie: the posterior mean E[x1 | x_t], in closed form for Gaussian data
    a, sig = t1, 1 - t1
    cov = a**2 * gaussian.SIGMA + sig**2 * jnp.eye(2)
    r = jnp.linalg.solve(cov, (before - a * gaussian.MU).T).T
    posterior_mean = gaussian.MU + a * jnp.matmul(r, gaussian.SIGMA.T, precision=gaussian.HIGHEST)
    np.testing.assert_allclose(run("tweedie"), posterior_mean, rtol=1e-3, atol=1e-4)


def test_sbdm_diffusion_needs_a_positive_sample_eps():
    f_tr = create_transport()
    with pytest.raises(ValueError, match="SBDM.*sample_eps"):
        euler_maruyama_sample(gaussian.field(f_tr), f_tr, X0, jax.random.key(0), diffusion_form="SBDM")
    tr = create_transport(sample_eps=1e-3)
    x = jax.jit(lambda x: euler_maruyama_sample(gaussian.field(tr), tr, x, jax.random.key(1), num_steps=250,
                                                diffusion_form="SBDM"))(X0)
    mean_err, cov_err = moment_errors(x)
    assert mean_err < 0.05 and cov_err < 0.1


def test_bad_sampler_settings_raise():
    tr = create_transport()
    f, key = gaussian.field(tr), jax.random.key(0)
    with pytest.raises(ValueError, match="unknown last step"):
        euler_maruyama_sample(f, tr, X0, key, last_step="median")
    with pytest.raises(ValueError, match="unknown diffusion form"):
        euler_maruyama_sample(f, tr, X0, key, diffusion_form="cosine")
    with pytest.raises(ValueError, match="empty sampling interval"):
        euler_maruyama_sample(f, create_transport(sample_eps=0.3), X0, key, diffusion_form="SBDM",
                              last_step_size=0.8)
    with pytest.raises(ValueError, match="sampler.method"):
        SamplerConfig(method="ddim")


def test_samplers_compile_to_a_loop_not_an_unrolled_graph():
    tr = create_transport()

    def size(n, fn):
        return len(jax.make_jaxpr(fn(n))(X0[:4]).jaxpr.eqns)

    ode = lambda n: lambda x: ode_sample(gaussian.field(tr), tr, x, method="heun", num_steps=n)
    sde = lambda n: lambda x: euler_maruyama_sample(gaussian.field(tr), tr, x, jax.random.key(0), num_steps=n)
    assert size(10, ode) == size(500, ode)
    assert size(10, sde) == size(500, sde)


# -- guidance ---------------------------------------------------------------------------------------

NULL = 9


def fake_apply(x, t, y):
    """A 'network' whose conditional and null outputs differ: x + 1 for labels, x - 1 for the null class."""
    return x + jnp.where(y == NULL, -1.0, 1.0)[:, None]


def test_guided_field_inside_and_outside_the_interval():
    x, y = jnp.zeros((3, 2)), jnp.array([0, 1, 2])
    field = jax.jit(guided_field(fake_apply, y, null_label=NULL, cfg_scale=4.0, guidance_interval=(0.3, 0.8)))
    cond, uncond = x + 1.0, x - 1.0
    np.testing.assert_allclose(field(x, jnp.float32(0.5)), cfg_combine(cond, uncond, 4.0))  # = x + 7
    np.testing.assert_allclose(field(x, jnp.float32(0.5)), x + 7.0)
    for t in (0.1, 0.29, 0.81, 1.0):  # outside: the conditional output alone
        np.testing.assert_allclose(field(x, jnp.float32(t)), cond)


def test_guidance_on_the_first_channels_only():
    cond, uncond = jnp.ones((2, 3, 3, 4)), jnp.zeros((2, 3, 3, 4))
    out = cfg_combine(cond, uncond, 2.0, channels=3)  # official SiT/LayerSync: eps[:, :3] only
    np.testing.assert_allclose(out[..., :3], 2.0)
    np.testing.assert_allclose(out[..., 3:], 1.0)
    np.testing.assert_allclose(cfg_combine(cond, uncond, 2.0), 2.0)


def test_guidance_scale_one_is_no_guidance():
    x, y = jnp.ones((3, 2)), jnp.array([0, 1, 2])
    unguided = guided_field(fake_apply, y, null_label=NULL)
    np.testing.assert_allclose(cfg_combine(x + 1, x - 1, 1.0), x + 1)
    # a traced scale of 1 takes the same path as no guidance
    traced = jax.jit(lambda s, t: guided_field(fake_apply, y, null_label=NULL, cfg_scale=s)(x, t))
    np.testing.assert_allclose(traced(1.0, 0.5), unguided(x, 0.5))
    assert not np.allclose(traced(2.0, 0.5), unguided(x, 0.5))


def tiny_model():
    return get_model("SiT-S/4", depth=2, hidden_size=32, num_heads=2, input_size=8, in_channels=1,
                     num_classes=4, learn_sigma=False)


@pytest.mark.slow
def test_make_sample_fn_on_a_network_with_guidance():
    model = tiny_model()
    variables = jax.jit(model.init)(jax.random.key(0), *model.init_inputs(1))
    # random non-zero weights so that labels change the output
    variables = perturbed(variables, 0, 0.1)
    labels = jnp.array([0, 1, 2, 3])
    key = jax.random.key(7)
    fn = make_sample_fn(model, create_transport(), SamplerConfig(method="euler_maruyama", num_steps=8))
    plain = fn(variables, key, labels)
    assert plain.shape == (4, 8, 8, 1) and bool(jnp.all(jnp.isfinite(plain)))
    np.testing.assert_array_equal(plain, fn(variables, key, labels))  # deterministic for a key
    np.testing.assert_allclose(fn(variables, key, labels, cfg_scale=1.0), plain, rtol=1e-6)
    guided = fn(variables, key, labels, cfg_scale=4.0)
    assert not np.allclose(guided, plain, atol=1e-4)
    # an interval that contains no sampling time turns guidance off
    np.testing.assert_allclose(fn(variables, key, labels, cfg_scale=4.0, guidance_interval=(0.99, 0.995)), plain,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="guidance_interval"):
        fn(variables, key, labels, cfg_scale=2.0, guidance_interval=(0.8, 0.2))
    with pytest.raises(ValueError, match=r"labels must be .* in \[0, 4\)"):
        fn(variables, key, jnp.array([0, 4]))


def test_guidance_needs_a_null_class():
    model = get_model("SiT-S/4", depth=1, hidden_size=32, num_heads=2, input_size=8, in_channels=1,
                      num_classes=4, class_dropout_prob=0.0)
    variables = jax.jit(model.init)(jax.random.key(0), *model.init_inputs(1))
    fn = make_sample_fn(model, create_transport(), SamplerConfig(method="euler", num_steps=2))
    with pytest.raises(ValueError, match="label dropout"):
        fn(variables, jax.random.key(0), jnp.array([0]), cfg_scale=2.0)
