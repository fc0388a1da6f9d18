"""Conversion between lsync-jax time (t = 1 data) and REPA/ERW time (t = 0 data)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsync_jax.transport import (
    DATA_AT_ONE,
    DATA_AT_ZERO,
    LinearPath,
    from_lsync_time,
    to_lsync_interval,
    to_lsync_time,
    to_lsync_velocity,
    velocity_model_to_lsync,
)
from tests.transport import gaussian


@pytest.mark.parametrize("convention", [DATA_AT_ONE, DATA_AT_ZERO])
def test_round_trips(convention):
    t = jnp.linspace(0, 1, 11)
    np.testing.assert_allclose(from_lsync_time(to_lsync_time(t, convention), convention), t, atol=1e-7)
    np.testing.assert_allclose(to_lsync_time(from_lsync_time(t, convention), convention), t, atol=1e-7)
    v = jnp.arange(4.0)
    np.testing.assert_allclose(to_lsync_velocity(to_lsync_velocity(v, convention), convention), v)


def test_data_at_zero_interpolant_maps_onto_ours():
    # REPA/ERW: x_t' = (1 - t') x + t' eps, target eps - x. Ours: x_t = t x + (1 - t) eps, target x - eps.
    x, eps = jnp.array([2.0, -1.0]), jnp.array([0.5, 0.3])
    for t_repa in (0.0, 0.25, 0.9, 1.0):
        t = to_lsync_time(t_repa, DATA_AT_ZERO)
        xt, ut = LinearPath().interpolate(jnp.float32(t), eps, x)
        np.testing.assert_allclose(xt, (1 - t_repa) * x + t_repa * eps, atol=1e-6)
        np.testing.assert_allclose(ut, to_lsync_velocity(eps - x, DATA_AT_ZERO), atol=1e-6)


class DataAtZeroLinear:
    """REPA/ERW's interpolant in its own time: x_t' = (1 - t') x + t' eps (data at t' = 0)."""

    def alpha(self, t):
        return 1 - t, -jnp.ones_like(t)

    def sigma(self, t):
        return t, jnp.ones_like(t)


def test_wrapped_data_at_zero_model_gives_our_velocity():
    # A REPA-convention model: the exact velocity d x_t' / dt' of the Gaussian data, derived in REPA
    # time from REPA's own interpolant (not from ours).
    def repa_model(x, t_repa):
        return gaussian.velocity(DataAtZeroLinear(), x, t_repa)

    ours = velocity_model_to_lsync(repa_model, DATA_AT_ZERO)
    x = jax.random.normal(jax.random.key(0), (5, 2))
    for t in (0.1, 0.3, 0.8):
        np.testing.assert_allclose(ours(x, t), gaussian.velocity(LinearPath(), x, t), rtol=1e-5, atol=1e-6)
    assert velocity_model_to_lsync(repa_model, DATA_AT_ONE) is repa_model


def test_guidance_interval_conversion():
    assert to_lsync_interval((0.0, 0.7), DATA_AT_ZERO) == pytest.approx((0.3, 1.0))
    assert to_lsync_interval((0.2, 0.6), DATA_AT_ONE) == (0.2, 0.6)
    with pytest.raises(ValueError, match="unknown time convention"):
        to_lsync_time(0.5, "t0_is_noise")
