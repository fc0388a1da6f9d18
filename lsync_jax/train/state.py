"""Train state (params, optimizer state, EMA params, step, RNG), optimizer, sharded initialisation."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from lsync_jax.configs.base import OPTIMIZER_DEFAULTS
from lsync_jax.objectives.sections import with_defaults
from lsync_jax.sharding import DEFAULT_RULES, tree_shardings, with_shardings


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly. `rng` holds raw key data (uint32), which
    checkpoints store as a plain array; `key` wraps it."""

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array

    @property
    def key(self) -> jax.Array:
        return jax.random.wrap_key_data(self.rng)


def learning_rate_schedule(lr: float, warmup_steps: int = 0) -> optax.Schedule:
    """Constant `lr` (the papers' setting), after an optional linear warmup from 0."""
    if warmup_steps > 0:
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)],
                                    [warmup_steps])
    return optax.constant_schedule(lr)


def scale_by_multipliers(multipliers: Any) -> optax.GradientTransformation:
    """Multiply each update by its factor in `multipliers` (a pytree like the params; 1.0: untouched)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u if m == 1.0 else u * m, updates, multipliers), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: Mapping[str, Any], prefix: str = "optimizer", lr_multipliers: Any = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW as the papers use it (lr 1e-4, betas (0.9, 0.999), weight decay 0), with optional
    warmup and global-norm gradient clipping (`grad_clip`: None or a positive max norm).

    `lr_multipliers` (muP, `lsync_jax.models.mup.mup_lr_multipliers`): per-parameter factors on the
    Adam step only, so lr * weight_decay stays the same for every parameter, as microsoft/mup's
    MuAdamW (decoupled_wd=False) scales lr by 1/m and weight decay by m. Keys `cfg` leaves out take
    `lsync_jax.configs.base.OPTIMIZER_DEFAULTS`."""
    cfg = with_defaults(dict(cfg), OPTIMIZER_DEFAULTS, prefix)
    lr = float(cfg["lr"])
    if lr <= 0:
        raise ValueError(f"{prefix}.lr must be positive, got {lr}")
    schedule = learning_rate_schedule(lr, int(cfg["warmup_steps"]))
    b1, b2, eps, weight_decay = cfg["b1"], cfg["b2"], cfg["eps"], cfg["weight_decay"]
    mu_dtype = cfg["mu_dtype"]
    if mu_dtype is not None:
        if str(mu_dtype) not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"{prefix}.mu_dtype={mu_dtype!r}: expected None (the parameters' dtype), 'float32', "
                             "'bfloat16' or 'float16'")
        mu_dtype = jnp.dtype(str(mu_dtype))
    if lr_multipliers is None:
        adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mu_dtype=mu_dtype)
    else:  # optax.adamw's own chain, with the factors between the Adam step and the weight decay
        adamw = optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype),
                            scale_by_multipliers(lr_multipliers),
                            optax.add_decayed_weights(weight_decay), optax.scale_by_learning_rate(schedule))
    clip = cfg["grad_clip"]
    if clip is not None:
        if clip <= 0:
            raise ValueError(f"{prefix}.grad_clip must be None or positive, got {clip}")
        adamw = optax.chain(optax.clip_by_global_norm(clip), adamw)
    return adamw, schedule


def init_state_fn(model: Any, tx: optax.GradientTransformation) -> Callable[[jax.Array], TrainState]:
    """key -> TrainState; EMA starts equal to the parameters (as the official update_ema(decay=0))."""

    def init(key: jax.Array) -> TrainState:
        key_init, key_state = jax.random.split(key)
        params = model.init(key_init, *model.init_inputs(1))["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=jax.tree.map(jnp.copy, params),
                          opt_state=tx.init(params), rng=jax.random.key_data(key_state))

    return init


def abstract_state(model: Any, tx: optax.GradientTransformation, mesh: Mesh,
                   rules: Sequence[tuple[str, str]] = DEFAULT_RULES) -> TrainState:
    """The train state's shapes with their shardings (traced once, nothing allocated): the target of
    a restore, the layout of a fresh state and of the jitted step."""
    shapes = jax.eval_shape(init_state_fn(model, tx), jax.random.key(0))
    return with_shardings(shapes, tree_shardings(shapes, mesh, rules))


def state_shardings(model: Any, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: Sequence[tuple[str, str]] = DEFAULT_RULES) -> Any:
    """Shardings of the whole train state, derived from its shapes (nothing is allocated)."""
    return shardings_of(abstract_state(model, tx, mesh, rules))


def shardings_of(abstract: Any) -> Any:
    return jax.tree.map(lambda s: s.sharding, abstract)


def create_train_state(model: Any, tx: optax.GradientTransformation, key: jax.Array, mesh: Mesh,
                       rules: Sequence[tuple[str, str]] = DEFAULT_RULES, abstract: Any = None) -> TrainState:
    """The train state initialised directly in its sharded layout (no full copy on one device);
    `abstract` (from `abstract_state`) saves tracing the shapes again."""
    abstract = abstract_state(model, tx, mesh, rules) if abstract is None else abstract
    return jax.jit(init_state_fn(model, tx), out_shardings=shardings_of(abstract))(key)
