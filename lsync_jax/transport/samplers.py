"""Samplers for a trained transport: Euler / Heun / adaptive ODE, Euler-Maruyama SDE, guidance.

Every sampler integrates forward in lsync-jax time, from noise at t0 ~ 0 to data at t1 ~ 1, with
`jax.lax` loops (one compiled program, no Python loop per step), is deterministic for a given
key, and works on a whole batch at once.

Samplers take a *model field* `fn(x, t) -> model output` where t is a scalar time and the output
is what the transport's model predicts (velocity, score or noise); the transport turns it into
the ODE velocity or the SDE drift. `guided_field` builds such a field from a network with
classifier-free guidance.

Step counts: `num_steps` is the number of model evaluations per sample for Euler and for
Euler-Maruyama (whose final mean step counts as one, as in SiT and REPA, so 250 steps run 249
stochastic steps on linspace(t0, 1 - 0.04) and one deterministic step to t = 1). Heun takes
`num_steps` steps of two evaluations each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lsync_jax.extras import require
from lsync_jax.transport.paths import DIFFUSION_FORMS, expand_like
from lsync_jax.transport.transport import Transport

Array = jax.Array
ModelField = Callable[[Array, Array], Array]

FIXED_ODE_METHODS = ("euler", "heun")
ADAPTIVE_ODE_METHODS = ("dopri5", "tsit5", "dopri8", "bosh3")
SDE_METHODS = ("euler_maruyama",)
LAST_STEPS = ("mean", "euler", "tweedie", None)


# -- classifier-free guidance ---------------------------------------------------------------------------

def cfg_combine(cond: Array, uncond: Array, scale, channels: int | None = None) -> Array:
    """uncond + scale * (cond - uncond); scale 1 is the conditional output.

    On every channel by default; `channels=k` guides only the first k channels (last axis) and
    keeps the rest conditional, as official SiT/LayerSync sampling does with k = 3.
    """
    guided = uncond + scale * (cond - uncond)
    if channels is None:
        return guided
    return jnp.concatenate([guided[..., :channels], cond[..., channels:]], axis=-1)


def guided_field(apply_fn: Callable[[Array, Array, Array], Array], labels: Array, *, null_label: int,
                 cfg_scale=1.0, guidance_interval=(0.0, 1.0), channels: int | None = None) -> ModelField:
    """Model field with classifier-free guidance on all channels inside a guidance interval.

    apply_fn(x, t, y) is the network on a batch ((N,) times, (N,) labels). Inside
    `low <= t <= high` (lsync-jax time) and with a scale other than 1, the conditional and null-label
    passes run as one doubled batch and combine as `cfg_combine`; elsewhere only the conditional
    pass runs (a real branch, not a masked one, so unguided steps cost one pass). `cfg_scale`
    and the interval may be traced values: a sweep over them does not recompile. `channels`: see
    `cfg_combine`.
    """
    low, high = guidance_interval
    null = jnp.full_like(labels, null_label)

    def plain(x, t):
        return apply_fn(x, jnp.full((x.shape[0],), t, jnp.float32), labels)

    def guided(x, t):
        both = apply_fn(jnp.concatenate([x, x]), jnp.full((2 * x.shape[0],), t, jnp.float32),
                        jnp.concatenate([labels, null]))
        cond, uncond = jnp.split(both, 2)
        return cfg_combine(cond, uncond, cfg_scale, channels)

    if isinstance(cfg_scale, (int, float)) and cfg_scale == 1.0:
        return plain

    def field(x, t):
        on = (t >= low) & (t <= high) & (cfg_scale != 1.0)
        return jax.lax.cond(on, guided, plain, x, t)

    return field


# -- ODE ------------------------------------------------------------------------------------------------

def ode_sample(field: ModelField, transport: Transport, x: Array, *, method: str = "euler",
               num_steps: int = 50) -> Array:
    """Fixed-step probability-flow ODE from noise `x` to data (Euler or Heun)."""
    if method not in FIXED_ODE_METHODS:
        raise ValueError(f"unknown fixed-step ODE method {method!r}; expected one of {FIXED_ODE_METHODS}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t0, t1 = transport.sample_interval()
    ts = jnp.linspace(t0, t1, num_steps + 1, dtype=jnp.float32)

    def velocity(x, t):
        return transport.velocity(field(x, t), x, t)

    def step(x, i):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t
        v = velocity(x, t)
        x_euler = x + dt * v
        if method == "euler":
            return x_euler, None
        return x + 0.5 * dt * (v + velocity(x_euler, t_next)), None

    x, _ = jax.lax.scan(step, x, jnp.arange(num_steps))
    return x


def adaptive_ode_sample(field: ModelField, transport: Transport, x: Array, *, method: str = "dopri5",
                        rtol: float = 1e-3, atol: float = 1e-6, max_steps: int = 4096) -> tuple[Array, Array]:
    """Adaptive probability-flow ODE (diffrax, PID step control); returns (x1, number of steps)."""
    diffrax = require("diffrax", what="the adaptive ODE sampler")  # imported here: only this sampler needs it

    solvers = {"dopri5": diffrax.Dopri5, "tsit5": diffrax.Tsit5, "dopri8": diffrax.Dopri8, "bosh3": diffrax.Bosh3}
    if method not in solvers:
        raise ValueError(f"unknown adaptive ODE method {method!r}; expected one of {ADAPTIVE_ODE_METHODS}")
    t0, t1 = transport.sample_interval()

    def vector_field(t, y, args):
        return transport.velocity(field(y, t), y, t)

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        solvers[method](),
        t0=t0,
        t1=t1,
        dt0=None,
        y0=x,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        saveat=diffrax.SaveAt(t1=True),
        max_steps=max_steps,
    )
    return sol.ys[-1], sol.stats["num_steps"]


# -- SDE ------------------------------------------------------------------------------------------------

def euler_maruyama_sample(field: ModelField, transport: Transport, x: Array, key: Array, *,
                          num_steps: int = 250, diffusion_form: str = "sigma", diffusion_norm: float = 1.0,
                          last_step: str | None = "mean", last_step_size: float = 0.04) -> Array:
    """Euler-Maruyama on the reverse SDE dx = [v + w(t) s] dt + sqrt(2 w(t)) dW, then a last step.

    As SiT's `sample_sde` (and REPA's `euler_maruyama_sampler`): `num_steps - 1` stochastic steps on
    linspace(t0, 1 - last_step_size, num_steps), then the last step to t = 1: 'mean' (the drift
    step without noise, the default), 'euler' (the ODE velocity), 'tweedie' (the posterior mean)
    or None (stop at 1 - last_step_size).
    """
    if diffusion_form not in DIFFUSION_FORMS:
        raise ValueError(f"unknown diffusion form {diffusion_form!r}; expected one of {DIFFUSION_FORMS}")
    if last_step not in LAST_STEPS:
        raise ValueError(f"unknown last step {last_step!r}; expected one of {LAST_STEPS}")
    if num_steps < 2:
        raise ValueError(f"the SDE sampler needs num_steps >= 2, got {num_steps}")
    if last_step is None:
        last_step_size = 0.0
    elif not 0.0 < last_step_size < 1.0:
        raise ValueError(f"last_step_size must be in (0, 1), got {last_step_size}")
    t0, t1 = transport.sample_interval(sde=True, diffusion_form=diffusion_form, last_step_size=last_step_size)
    ts = jnp.linspace(t0, t1, num_steps, dtype=jnp.float32)
    dt = ts[1] - ts[0]

    def drift_and_output(x, t):
        out = field(x, t)
        w = transport.path.diffusion(x, t, diffusion_form, diffusion_norm)
        return transport.velocity(out, x, t) + w * transport.score(out, x, t), out, w

    def step(x, i):
        t = ts[i]
        drift, _, w = drift_and_output(x, t)
        noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        return x + drift * dt + jnp.sqrt(2 * w) * jnp.sqrt(dt) * noise, None

    x, _ = jax.lax.scan(step, x, jnp.arange(num_steps - 1))
    if last_step is None:
        return x
    drift, out, _ = drift_and_output(x, t1)
    if last_step == "mean":
        return x + drift * last_step_size
    if last_step == "euler":
        return x + transport.velocity(out, x, t1) * last_step_size
    alpha = transport.path.alpha(expand_like(t1, x))[0]
    sigma = transport.path.sigma(expand_like(t1, x))[0]
    return x / alpha + sigma**2 / alpha * transport.score(out, x, t1)


# -- configured, jitted entry point ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """How to sample. `method`: 'euler' | 'heun' | 'dopri5' | 'tsit5' | 'dopri8' | 'bosh3' | 'euler_maruyama'.

    Defaults are the paper protocol (REPA/SiT): Euler-Maruyama, 250 steps, 'sigma' diffusion,
    a final mean step of 0.04, guidance on all channels.
    """

    method: str = "euler_maruyama"
    num_steps: int = 250
    rtol: float = 1e-3
    atol: float = 1e-6
    max_steps: int = 4096
    diffusion_form: str = "sigma"
    diffusion_norm: float = 1.0
    last_step: str | None = "mean"
    last_step_size: float = 0.04
    guidance_channels: int | None = None  # None: guide all channels; 3: official SiT/LayerSync

    def __post_init__(self):
        methods = FIXED_ODE_METHODS + ADAPTIVE_ODE_METHODS + SDE_METHODS
        if self.method not in methods:
            raise ValueError(f"sampler.method={self.method!r}; expected one of {methods}")
        if self.num_steps < 1:
            raise ValueError(f"sampler.num_steps must be >= 1, got {self.num_steps}")
        if self.diffusion_form not in DIFFUSION_FORMS:
            raise ValueError(f"sampler.diffusion_form={self.diffusion_form!r}; expected one of {DIFFUSION_FORMS}")
        if self.last_step not in LAST_STEPS:
            raise ValueError(f"sampler.last_step={self.last_step!r}; expected one of {LAST_STEPS}")
        if self.guidance_channels is not None and self.guidance_channels < 1:
            raise ValueError(f"sampler.guidance_channels must be None or >= 1, got {self.guidance_channels}")


def sample(field: ModelField, transport: Transport, noise: Array, key: Array, config: SamplerConfig) -> Array:
    """Run the configured sampler on a model field from initial noise (not jitted by itself)."""
    if config.method in FIXED_ODE_METHODS:
        return ode_sample(field, transport, noise, method=config.method, num_steps=config.num_steps)
    if config.method in ADAPTIVE_ODE_METHODS:
        return adaptive_ode_sample(field, transport, noise, method=config.method, rtol=config.rtol,
                                   atol=config.atol, max_steps=config.max_steps)[0]
    return euler_maruyama_sample(field, transport, noise, key, num_steps=config.num_steps,
                                 diffusion_form=config.diffusion_form, diffusion_norm=config.diffusion_norm,
                                 last_step=config.last_step, last_step_size=config.last_step_size)


def validate_guidance(model: Any, cfg_scale=1.0, guidance_interval=(0.0, 1.0)) -> None:
    """Raise ValueError for guidance a model cannot do or an interval outside [0, 1] (concrete values only)."""
    dropout = model.tag_dropout_prob if getattr(model, "num_tags", 0) else model.class_dropout_prob
    if (not isinstance(cfg_scale, (int, float)) or cfg_scale != 1.0) and dropout <= 0:
        raise ValueError("classifier-free guidance needs a model trained with label dropout "
                         "(model.class_dropout_prob > 0 gives it a null class)")
    low, high = guidance_interval
    if isinstance(low, (int, float)) and isinstance(high, (int, float)) and not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"guidance_interval must satisfy 0 <= low <= high <= 1, got {guidance_interval}")


def make_sample_fn(model: Any, transport: Transport, config: SamplerConfig,
                   shape: tuple[int, int, int] | None = None,
                   compiler_options: Mapping[str, str] | None = None, mesh: Any = None) -> Callable[..., Array]:
    """A jitted `fn(variables, key, labels, cfg_scale=1.0, guidance_interval=(0., 1.)) -> samples`.

    `model` is a SiT-like flax module (`null_label`, `init_inputs`); samples have shape
    (len(labels), *shape), by default the model's own input shape (an image (H, W, C), a clip
    (F, H, W, C) or a sequence (L, C)). `labels` are classes (N,), or multi-hot tags (N, num_tags)
    for a tag-conditioned model. cfg_scale and guidance_interval (lsync-jax time) are runtime values.
    `compiler_options` go to its jax.jit (`lsync_jax.host.compiler_options` on CPU). `mesh`: the mesh the
    samples are split over; a model whose attention kernel is split over it by hand (attention_impl=
    'splash') is traced and run inside `jax.set_mesh(mesh)`. `fn.lower(...)` lowers the jitted program
    from shapes (`lsync_jax.tools.fit`).
    """
    in_mesh = mesh if getattr(model, "attention_impl", "") == "splash" and mesh is not None else None
    if shape is None:
        shape = tuple(model.init_inputs(1)[0].shape[1:])
    num_tags = int(getattr(model, "num_tags", 0))

    @functools.partial(jax.jit, compiler_options=dict(compiler_options or {}))
    def fn(variables, key: Array, labels: Array, cfg_scale=1.0, guidance_interval=(0.0, 1.0)) -> Array:
        key_noise, key_sde = jax.random.split(key)
        noise = jax.random.normal(key_noise, (labels.shape[0], *shape), jnp.float32)

        def apply_fn(x, t, y):
            return model.apply(variables, x, t, y, train=False)

        field = guided_field(apply_fn, labels, null_label=model.null_label, cfg_scale=cfg_scale,
                             guidance_interval=guidance_interval, channels=config.guidance_channels)
        return sample(field, transport, noise, key_sde, config)

    def mesh_context() -> Any:
        return jax.set_mesh(in_mesh) if in_mesh is not None else contextlib.nullcontext()

    def run(*args: Any) -> Array:
        with mesh_context():
            return fn(*args)

    def lower(*args: Any) -> Any:
        with mesh_context():
            return fn.lower(*args)

    def checked(variables, key, labels, cfg_scale=1.0, guidance_interval=(0.0, 1.0)):
        validate_guidance(model, cfg_scale, guidance_interval)
        if num_tags:
            host = np.asarray(labels)
            if host.ndim != 2 or host.shape[1] != num_tags or (host.size and not np.isin(host, (0, 1)).all()):
                raise ValueError(f"tags must be a multi-hot (N, {num_tags}) array of 0s and 1s, got shape {host.shape}")
            return run(variables, key, jnp.asarray(host, jnp.float32), cfg_scale, guidance_interval)
        if not isinstance(labels, jax.Array) or labels.is_fully_addressable:
            host = np.asarray(labels)
            if host.ndim != 1 or (host.size and (host.min() < 0 or host.max() >= max(model.num_classes, 1))):
                # an out-of-range label would read past the embedding table (NaN under jit), not fail
                raise ValueError(f"labels must be a 1-D array of classes in [0, {model.num_classes}), got {host}")
        # a jax.Array keeps its sharding: labels split over devices split the sampling batch
        labels = labels.astype(jnp.int32) if isinstance(labels, jax.Array) else jnp.asarray(labels, jnp.int32)
        return run(variables, key, labels, cfg_scale, guidance_interval)

    checked.lower = lower  # the jitted program lowered from shapes (lsync_jax.tools.fit)
    return checked
