"""Interpolants, targets, conversions between predictions, time sampling, loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsync_jax.transport import GVPPath, LinearPath, Transport, VPPath, create_transport, get_path
from tests.transport import gaussian

PATHS = [LinearPath(), GVPPath(), VPPath()]


@pytest.mark.parametrize("path", PATHS, ids=lambda p: type(p).__name__)
def test_data_at_one_and_noise_at_zero(path):
    x0, x1 = jnp.full((2, 3), 5.0), jnp.full((2, 3), -1.0)
    xt, _ = path.interpolate(jnp.ones((2,)), x0, x1)
    np.testing.assert_allclose(xt, x1, atol=1e-6)
    xt, _ = path.interpolate(jnp.zeros((2,)), x0, x1)
    a0, _ = path.alpha(jnp.float32(0.0))
    assert float(a0) < 0.01  # VP keeps a tiny data coefficient at t = 0, as in SiT
    np.testing.assert_allclose(xt, x0 * path.sigma(jnp.float32(0.0))[0] + a0 * x1, atol=1e-6)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: type(p).__name__)
def test_target_is_the_time_derivative_of_the_interpolant(path):
    key0, key1 = jax.random.split(jax.random.key(0))
    x0, x1 = jax.random.normal(key0, (4, 5)), jax.random.normal(key1, (4, 5))
    t = jnp.array([0.1, 0.3, 0.6, 0.9])
    xt, ut = path.interpolate(t, x0, x1)
    _, dxt = jax.jvp(lambda s: path.interpolate(s, x0, x1)[0], (t,), (jnp.ones_like(t),))
    np.testing.assert_allclose(ut, dxt, rtol=1e-5, atol=1e-5)
    for fn in (path.alpha, path.sigma):
        value, deriv = fn(t)
        np.testing.assert_allclose(deriv, jax.vmap(jax.grad(lambda s: fn(s)[0]))(t), rtol=1e-4)


def test_linear_target_is_data_minus_noise():
    x0, x1 = jnp.arange(6.0).reshape(2, 3), -jnp.arange(6.0).reshape(2, 3)
    _, ut = LinearPath().interpolate(jnp.array([0.2, 0.7]), x0, x1)
    np.testing.assert_allclose(ut, x1 - x0)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: type(p).__name__)
def test_prediction_conversions_match_the_closed_form(path):
    x = jax.random.normal(jax.random.key(1), (16, 2)) * 2
    for t in (0.2, 0.5, 0.8):
        v, s, n = (f(path, x, t) for f in (gaussian.velocity, gaussian.score, gaussian.noise))
        tb = jnp.full((16,), t)
        np.testing.assert_allclose(path.score_from_velocity(v, x, tb), s, rtol=2e-3, atol=2e-4)
        np.testing.assert_allclose(path.noise_from_velocity(v, x, tb), n, rtol=2e-3, atol=2e-4)
        np.testing.assert_allclose(path.velocity_from_score(s, x, tb), v, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("prediction", ["velocity", "score", "noise"])
def test_transport_velocity_and_score_from_any_prediction(prediction):
    tr = Transport(GVPPath(), prediction)
    x = jax.random.normal(jax.random.key(2), (8, 2))
    out = gaussian.field(tr)(x, 0.4)
    np.testing.assert_allclose(tr.velocity(out, x, jnp.float32(0.4)), gaussian.velocity(tr.path, x, 0.4),
                               rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(tr.score(out, x, jnp.float32(0.4)), gaussian.score(tr.path, x, 0.4),
                               rtol=2e-3, atol=2e-4)


def test_velocity_loss_is_zero_for_the_target_and_mse_otherwise():
    tr = create_transport()
    x1 = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    t, x0, xt, ut = tr.prepare(jax.random.key(1), x1)
    np.testing.assert_allclose(xt, t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0, atol=1e-6)
    np.testing.assert_allclose(tr.loss(ut, t, x0, xt, ut), 0.0)
    np.testing.assert_allclose(tr.loss(ut + 2.0, t, x0, xt, ut), 4.0, rtol=1e-6)
    with pytest.raises(ValueError, match="model output shape"):
        tr.loss(ut[..., :2], t, x0, xt, ut)


def test_noise_and_score_losses_are_zero_at_their_targets():
    x1 = jax.random.normal(jax.random.key(0), (4, 6))
    for prediction in ("noise", "score"):
        tr = create_transport("linear", prediction)
        t, x0, xt, ut = tr.prepare(jax.random.key(1), x1)
        sigma = (1 - t)[:, None]
        target = x0 if prediction == "noise" else -x0 / sigma
        np.testing.assert_allclose(tr.loss(target, t, x0, xt, ut), 0.0, atol=1e-9)
        assert float(jnp.min(tr.loss(target + 1, t, x0, xt, ut))) > 0


def test_time_sampling_uniform_and_logit_normal():
    t = create_transport().sample_time(jax.random.key(0), 20000)
    assert t.shape == (20000,) and float(t.min()) >= 0 and float(t.max()) <= 1
    assert abs(float(t.mean()) - 0.5) < 0.01 and abs(float(t.std()) - (1 / 12) ** 0.5) < 0.01
    ln = create_transport(time_schedule="logit_normal", logit_normal_mean=1.0, logit_normal_std=0.5)
    t = ln.sample_time(jax.random.key(0), 20000)
    np.testing.assert_allclose(np.median(t), jax.nn.sigmoid(1.0), atol=0.01)
    logits = np.log(t / (1 - t))
    assert abs(logits.std() - 0.5) < 0.02


def test_sit_epsilon_rules():
    assert create_transport().train_interval() == (0.0, 1.0)
    assert create_transport("linear", "noise").train_interval() == (1e-3, 1 - 1e-3)
    assert create_transport("vp").train_interval() == (0.0, 1 - 1e-5)
    # SDE with a last step: integrate to 1 - last_step_size; SBDM starts at sample_eps.
    assert create_transport().sample_interval(sde=True, last_step_size=0.04) == (0.0, 0.96)
    assert create_transport(sample_eps=0.01).sample_interval(sde=True, diffusion_form="SBDM",
                                                             last_step_size=0.04) == (0.01, 0.96)
    # defaults are resolved per path and prediction, also after dataclasses.replace
    vp = dataclasses.replace(create_transport(), path=VPPath())
    assert vp.train_interval() == (0.0, 1 - 1e-5) and vp.sample_interval() == (0.0, 1 - 1e-3)


def test_bad_transport_settings_raise():
    with pytest.raises(ValueError, match="unknown path type"):
        get_path("cosine")
    with pytest.raises(ValueError, match="transport.prediction"):
        create_transport(prediction="x0")
    with pytest.raises(ValueError, match="transport.time_schedule"):
        create_transport(time_schedule="lognormal")
