"""Interpolant paths x_t = alpha(t) * x1 + sigma(t) * eps between noise (t = 0) and data (t = 1).

lsync-jax uses the SiT/LayerSync time convention throughout: t = 0 is pure noise, t = 1 is
data (see `lsync_jax.transport.time` to convert from REPA/ERW's reversed convention). The
formulas follow SiT's `transport/path.py` (ICPlan, GVPCPlan, VPCPlan).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

Array = jax.Array


def expand_like(t: Array, x: Array) -> Array:
    """Broadcast a (N,) or scalar time against an (N, ...) array."""
    t = jnp.asarray(t, x.dtype)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


@dataclasses.dataclass(frozen=True)
class Path:
    """Base interpolant. Subclasses define alpha, sigma and their derivatives."""

    def alpha(self, t: Array) -> tuple[Array, Array]:
        """(alpha_t, d alpha_t / dt): the data coefficient."""
        raise NotImplementedError

    def sigma(self, t: Array) -> tuple[Array, Array]:
        """(sigma_t, d sigma_t / dt): the noise coefficient."""
        raise NotImplementedError

    def d_alpha_alpha_ratio(self, t: Array) -> Array:
        """d alpha_t / alpha_t, computed stably."""
        alpha, d_alpha = self.alpha(t)
        return d_alpha / alpha

    # -- the interpolant and its velocity ---------------------------------------------------------
    def interpolate(self, t: Array, x0: Array, x1: Array) -> tuple[Array, Array]:
        """(x_t, u_t): the point on the path and its velocity d x_t / dt, for noise x0, data x1."""
        te = expand_like(t, x1)
        alpha, d_alpha = self.alpha(te)
        sigma, d_sigma = self.sigma(te)
        return alpha * x1 + sigma * x0, d_alpha * x1 + d_sigma * x0

    # -- the probability-flow / reverse SDE quantities ------------------------------------------------
    def drift(self, x: Array, t: Array) -> tuple[Array, Array]:
        """(f, g2) of the forward SDE in score form: velocity = -f + g2 * score."""
        te = expand_like(t, x)
        ratio = self.d_alpha_alpha_ratio(te)
        sigma, d_sigma = self.sigma(te)
        return -ratio * x, ratio * sigma**2 - sigma * d_sigma

    def score_from_velocity(self, velocity: Array, x: Array, t: Array) -> Array:
        te = expand_like(t, x)
        alpha, d_alpha = self.alpha(te)
        sigma, d_sigma = self.sigma(te)
        reverse_ratio = alpha / d_alpha
        var = sigma**2 - reverse_ratio * d_sigma * sigma
        return (reverse_ratio * velocity - x) / var

    def noise_from_velocity(self, velocity: Array, x: Array, t: Array) -> Array:
        te = expand_like(t, x)
        alpha, d_alpha = self.alpha(te)
        sigma, d_sigma = self.sigma(te)
        reverse_ratio = alpha / d_alpha
        var = reverse_ratio * d_sigma - sigma
        return (reverse_ratio * velocity - x) / var

    def velocity_from_score(self, score: Array, x: Array, t: Array) -> Array:
        f, g2 = self.drift(x, t)
        return g2 * score - f

    def diffusion(self, x: Array, t: Array, form: str = "sigma", norm: float = 1.0) -> Array:
        """The SDE diffusion coefficient w(t) (the SDE noise is sqrt(2 w) dW), as SiT names the forms."""
        te = expand_like(t, x)
        if form == "constant":
            return jnp.full_like(te, norm)
        if form == "SBDM":
            return norm * self.drift(x, t)[1]
        if form == "sigma":
            return norm * self.sigma(te)[0]
        if form == "linear":
            return norm * (1 - te)
        if form == "decreasing":
            return 0.25 * (norm * jnp.cos(jnp.pi * te) + 1) ** 2
        if form == "increasing-decreasing":
            return norm * jnp.sin(jnp.pi * te) ** 2
        raise ValueError(f"unknown diffusion form {form!r}; expected one of {DIFFUSION_FORMS}")


DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")


@dataclasses.dataclass(frozen=True)
class LinearPath(Path):
    """Rectified-flow / SiT 'Linear': alpha = t, sigma = 1 - t; velocity target x1 - eps."""

    def alpha(self, t):
        return t, jnp.ones_like(t)

    def sigma(self, t):
        return 1 - t, -jnp.ones_like(t)

    def d_alpha_alpha_ratio(self, t):
        return 1 / t


@dataclasses.dataclass(frozen=True)
class GVPPath(Path):
    """Generalised variance-preserving: alpha = sin(pi t / 2), sigma = cos(pi t / 2)."""

    def alpha(self, t):
        return jnp.sin(t * math.pi / 2), math.pi / 2 * jnp.cos(t * math.pi / 2)

    def sigma(self, t):
        return jnp.cos(t * math.pi / 2), -math.pi / 2 * jnp.sin(t * math.pi / 2)

    def d_alpha_alpha_ratio(self, t):
        return math.pi / (2 * jnp.tan(t * math.pi / 2))


@dataclasses.dataclass(frozen=True)
class VPPath(Path):
    """Variance-preserving (score-SDE VP with a linear beta schedule), in flow-matching time."""

    sigma_min: float = 0.1
    sigma_max: float = 20.0

    def _log_mean_coeff(self, t):
        return -0.25 * (1 - t) ** 2 * (self.sigma_max - self.sigma_min) - 0.5 * (1 - t) * self.sigma_min

    def _d_log_mean_coeff(self, t):
        return 0.5 * (1 - t) * (self.sigma_max - self.sigma_min) + 0.5 * self.sigma_min

    def alpha(self, t):
        alpha = jnp.exp(self._log_mean_coeff(t))
        return alpha, alpha * self._d_log_mean_coeff(t)

    def sigma(self, t):
        p = 2 * self._log_mean_coeff(t)
        sigma = jnp.sqrt(1 - jnp.exp(p))
        return sigma, jnp.exp(p) * (2 * self._d_log_mean_coeff(t)) / (-2 * sigma)

    def d_alpha_alpha_ratio(self, t):
        return self._d_log_mean_coeff(t)

    def drift(self, x, t):
        te = expand_like(t, x)
        beta = self.sigma_min + (1 - te) * (self.sigma_max - self.sigma_min)
        return -0.5 * beta * x, beta / 2


PATHS: dict[str, type[Path]] = {"linear": LinearPath, "gvp": GVPPath, "vp": VPPath}


def get_path(name: str) -> Path:
    """'linear', 'gvp' or 'vp' (case-insensitive, SiT's 'Linear'/'GVP'/'VP' accepted)."""
    key = name.lower()
    if key not in PATHS:
        raise ValueError(f"unknown path type {name!r}; expected one of {sorted(PATHS)}")
    return PATHS[key]()
