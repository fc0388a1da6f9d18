"""Flow-matching transport: what the model predicts, how t is drawn, the training loss.

Semantics follow SiT's `transport/transport.py` (velocity / score / noise prediction, the
`train_eps`/`sample_eps` interval rules, the optional loss weights) in lsync-jax time
(t = 0 noise, t = 1 data). All methods are pure and jit-friendly; the dataclass is hashable so it
can be a static argument.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lsync_jax.transport.paths import DIFFUSION_FORMS, LinearPath, Path, VPPath, expand_like, get_path

Array = jax.Array

PREDICTIONS = ("velocity", "score", "noise")
LOSS_WEIGHTS = (None, "velocity", "likelihood")
TIME_SCHEDULES = ("uniform", "logit_normal")


def mean_flat(x: Array, mask: Array | None = None) -> Array:
    """Mean over every axis but the first; with `mask` ((N, L), True: a real step of a padded
    sequence), over the real steps only."""
    axes = tuple(range(1, x.ndim))
    if mask is None:
        return jnp.mean(x, axis=axes)
    weight = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim)), x.shape).astype(x.dtype)
    return jnp.sum(x * weight, axis=axes) / jnp.maximum(jnp.sum(weight, axis=axes), 1.0)


@dataclasses.dataclass(frozen=True)
class Transport:
    """A flow-matching problem: path, prediction target, time distribution, loss weighting.

    `time_schedule='logit_normal'` draws t = sigmoid(n), n ~ N(logit_normal_mean, logit_normal_std)
    in lsync-jax time, so a positive mean favours times near the data.
    `train_eps` / `sample_eps` = None take SiT's defaults (`default_eps`): 0 for a velocity model on
    the Linear or GVP path, 1e-3 otherwise (1e-5 for training on VP).
    """

    path: Path = LinearPath()
    prediction: str = "velocity"
    loss_weight: str | None = None
    train_eps: float | None = None
    sample_eps: float | None = None
    time_schedule: str = "uniform"
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"transport.prediction={self.prediction!r}; expected one of {PREDICTIONS}")
        if self.loss_weight not in LOSS_WEIGHTS:
            raise ValueError(f"transport.loss_weight={self.loss_weight!r}; expected one of {LOSS_WEIGHTS}")
        if self.time_schedule not in TIME_SCHEDULES:
            raise ValueError(f"transport.time_schedule={self.time_schedule!r}; expected one of {TIME_SCHEDULES}")
        if self.logit_normal_std <= 0:
            raise ValueError(f"transport.logit_normal_std must be positive, got {self.logit_normal_std}")
        for key in ("train_eps", "sample_eps"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value < 0.5:
                raise ValueError(f"transport.{key} must be in [0, 0.5), got {value}")

    def default_eps(self) -> tuple[float, float]:
        """SiT's (train_eps, sample_eps) for this path and prediction, used where the field is None."""
        if isinstance(self.path, VPPath):
            return 1e-5, 1e-3
        if self.prediction != "velocity":
            return 1e-3, 1e-3
        return 0.0, 0.0

    @property
    def resolved_train_eps(self) -> float:
        return self.default_eps()[0] if self.train_eps is None else self.train_eps

    @property
    def resolved_sample_eps(self) -> float:
        return self.default_eps()[1] if self.sample_eps is None else self.sample_eps

    # -- time intervals -----------------------------------------------------------------------------
    def interval(self, *, eps: float, sde: bool = False, diffusion_form: str = "sigma",
                 last_step_size: float = 0.0) -> tuple[float, float]:
        """[t0, t1] to train or integrate on, avoiding the singular ends as SiT's `check_interval`."""
        t0, t1 = 0.0, 1.0
        end = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
        if isinstance(self.path, VPPath):
            t1 = end
        elif self.prediction != "velocity" or sde:
            t0 = eps if (diffusion_form == "SBDM" and sde) or self.prediction != "velocity" else 0.0
            t1 = end
        return t0, t1

    def train_interval(self) -> tuple[float, float]:
        return self.interval(eps=self.resolved_train_eps)

    def sample_interval(self, *, sde: bool = False, diffusion_form: str = "sigma",
                        last_step_size: float = 0.0) -> tuple[float, float]:
        """[t0, t1] for a sampler; raises where the SDE would start on a singularity or run backwards."""
        if diffusion_form not in DIFFUSION_FORMS:
            raise ValueError(f"unknown diffusion form {diffusion_form!r}; expected one of {DIFFUSION_FORMS}")
        t0, t1 = self.interval(eps=self.resolved_sample_eps, sde=sde, diffusion_form=diffusion_form,
                               last_step_size=last_step_size)
        if sde and diffusion_form == "SBDM" and t0 == 0.0 and not isinstance(self.path, VPPath):
            # d alpha / alpha = 1 / t (linear) is infinite at t = 0; SiT has the same trap for velocity
            # models, whose sample_eps defaults to 0.
            raise ValueError("diffusion_form='SBDM' is singular at t = 0 on this path: "
                             "set transport.sample_eps > 0 (e.g. 1e-3)")
        if not t0 < t1:
            raise ValueError(f"empty sampling interval [{t0}, {t1}]: check transport.sample_eps and last_step_size")
        return t0, t1

    # -- training -----------------------------------------------------------------------------------
    def sample_time(self, key: jax.Array, batch_size: int) -> Array:
        """Training times, (batch_size,) float32 in the training interval."""
        t0, t1 = self.train_interval()
        if self.time_schedule == "uniform":
            u = jax.random.uniform(key, (batch_size,), jnp.float32)
        else:
            n = self.logit_normal_mean + self.logit_normal_std * jax.random.normal(key, (batch_size,), jnp.float32)
            u = jax.nn.sigmoid(n)
        return t0 + (t1 - t0) * u

    def prepare(self, key: jax.Array, x1: Array) -> tuple[Array, Array, Array, Array]:
        """Draw (t, x0) for data x1 and return (t, x0, x_t, u_t)."""
        key_t, key_noise = jax.random.split(key)
        t = self.sample_time(key_t, x1.shape[0])
        x0 = jax.random.normal(key_noise, x1.shape, x1.dtype)
        xt, ut = self.path.interpolate(t, x0, x1)
        return t, x0, xt, ut

    def prepare_examples(self, keys: jax.Array, x1: Array) -> tuple[Array, Array, Array, Array]:
        """`prepare` with one key per example (`keys`: (N,)): example i's t and noise depend on its key
        alone, so a batch split into microbatches draws what the whole batch draws."""
        def draw(key: jax.Array, x: Array) -> tuple[Array, Array]:
            key_t, key_noise = jax.random.split(key)
            return self.sample_time(key_t, 1)[0], jax.random.normal(key_noise, x.shape, x.dtype)

        t, x0 = jax.vmap(draw)(keys, x1)
        xt, ut = self.path.interpolate(t, x0, x1)
        return t, x0, xt, ut

    def loss(self, model_output: Array, t: Array, x0: Array, xt: Array, ut: Array, mask: Array | None = None
             ) -> Array:
        """Per-example loss (N,) of `model_output` against this transport's target (over the real steps
        only, with a padded sequence's `mask`)."""
        if model_output.shape != xt.shape:
            raise ValueError(f"model output shape {model_output.shape} != input shape {xt.shape}")
        if self.prediction == "velocity":
            return mean_flat((model_output - ut) ** 2, mask)
        _, g2 = self.path.drift(xt, t)
        sigma, _ = self.path.sigma(expand_like(t, xt))
        if self.loss_weight == "velocity":
            weight = (g2 / sigma) ** 2
        elif self.loss_weight == "likelihood":
            weight = g2 / sigma**2
        else:
            weight = 1.0
        if self.prediction == "noise":
            return mean_flat(weight * (model_output - x0) ** 2, mask)
        return mean_flat(weight * (model_output * sigma + x0) ** 2, mask)

    # -- sampling -----------------------------------------------------------------------------------
    def velocity(self, model_output: Array, x: Array, t: Array) -> Array:
        """The probability-flow velocity d x_t / dt implied by a model output."""
        if self.prediction == "velocity":
            return model_output
        return self.path.velocity_from_score(self.score(model_output, x, t), x, t)

    def score(self, model_output: Array, x: Array, t: Array) -> Array:
        """The score grad log p_t(x) implied by a model output."""
        if self.prediction == "score":
            return model_output
        if self.prediction == "noise":
            return model_output / -self.path.sigma(expand_like(t, x))[0]
        return self.path.score_from_velocity(model_output, x, t)


def create_transport(path_type: str = "linear", prediction: str = "velocity", loss_weight: str | None = None,
                     train_eps: float | None = None, sample_eps: float | None = None,
                     time_schedule: str = "uniform", logit_normal_mean: float = 0.0,
                     logit_normal_std: float = 1.0) -> Transport:
    """Transport from config-friendly strings, as SiT's `create_transport`."""
    return Transport(get_path(path_type), prediction, loss_weight, train_eps, sample_eps, time_schedule,
                     logit_normal_mean, logit_normal_std)
