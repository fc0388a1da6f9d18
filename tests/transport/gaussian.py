"""A Gaussian data distribution, for which every transport quantity has a closed form.

Data x1 ~ N(mu, Sigma), noise x0 ~ N(0, I), x_t = alpha_t x1 + sigma_t x0 ~ N(alpha_t mu, C_t) with
C_t = alpha_t^2 Sigma + sigma_t^2 I. Then E[x1 | x_t] = mu + alpha_t Sigma C_t^-1 (x - alpha_t mu),
E[x0 | x_t] = sigma_t C_t^-1 (x - alpha_t mu), the velocity is their d/dt-weighted sum and the
score is -C_t^-1 (x - alpha_t mu). The probability-flow map from noise to data is
x1 = mu + Sigma^(1/2) x0 (symmetric root).
"""

import jax
import jax.numpy as jnp
import numpy as np

# GPUs default to TF32 matmuls; the closed forms serve as references, so compute them exactly.
HIGHEST = jax.lax.Precision.HIGHEST

MU = jnp.array([1.0, -2.0])
_A = np.array([[1.0, 0.0], [0.8, 0.3]])
SIGMA = jnp.asarray(_A @ _A.T)
_w, _v = np.linalg.eigh(_A @ _A.T)
SIGMA_SQRT = jnp.asarray(_v @ np.diag(np.sqrt(_w)) @ _v.T)


def _terms(path, x, t):
    a, da = path.alpha(jnp.asarray(t, jnp.float32))
    s, ds = path.sigma(jnp.asarray(t, jnp.float32))
    cov = a**2 * SIGMA + s**2 * jnp.eye(2)
    r = jnp.linalg.solve(cov, (x - a * MU).T).T
    return a, da, s, ds, r


def _mm(a, b):
    return jnp.matmul(a, b, precision=HIGHEST)


def velocity(path, x, t):
    a, da, s, ds, r = _terms(path, x, t)
    return da * (MU + a * _mm(r, SIGMA.T)) + ds * (s * r)


def score(path, x, t):
    return -_terms(path, x, t)[-1]


def noise(path, x, t):
    _, _, s, _, r = _terms(path, x, t)
    return s * r


def flow_map(x0):
    """The exact ODE map from noise to data."""
    return MU + _mm(x0, SIGMA_SQRT.T)


def field(transport):
    """The exact model field for what `transport` predicts."""
    fn = {"velocity": velocity, "score": score, "noise": noise}[transport.prediction]
    return lambda x, t: fn(transport.path, x, t)
