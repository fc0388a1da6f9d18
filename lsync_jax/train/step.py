"""The train step: objective gradient, optimizer update, EMA, metrics; jitted over a mesh."""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from lsync_jax.host import compiler_options
from lsync_jax.objectives import Objective, objective_loss
from lsync_jax.sharding import DEFAULT_RULES, batch_sharding, replicated
from lsync_jax.train.state import TrainState, state_shardings


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, apply_fn: Any, objective: Objective,
               tx: optax.GradientTransformation, schedule: optax.Schedule, ema_decay: float
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step. Pure: the step's randomness is fold_in(state.rng, state.step)."""
    key = jax.random.fold_in(state.key, state.step)
    grad_fn = jax.grad(lambda p: objective_loss(p, apply_fn, batch, key, objective, step=state.step), has_aux=True)
    grads, metrics = grad_fn(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, params)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), learning_rate=jnp.asarray(schedule(state.step)))
    return state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), metrics


def make_train_step(model: Any, objective: Objective, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh: Mesh, *, ema_decay: float, rules: Sequence[tuple[str, str]] = DEFAULT_RULES,
                    shardings: Any = None):
    """`train_step` jitted with NamedShardings over `mesh`: the state stays in its sharded layout and
    is donated, the batch is split over every device, metrics come back replicated. `shardings`: the
    state's (from `abstract_state`), else derived here."""
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"train.ema_decay must be in [0, 1), got {ema_decay}")
    shardings = state_shardings(model, tx, mesh, rules) if shardings is None else shardings
    step = functools.partial(train_step, apply_fn=model.apply, objective=objective, tx=tx, schedule=schedule,
                             ema_decay=ema_decay)
    return jax.jit(step, in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, replicated(mesh)),
                   donate_argnums=0, compiler_options=compiler_options(mesh.devices.flat[0].platform))
