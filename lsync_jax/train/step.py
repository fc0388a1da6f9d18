"""The train step: objective gradient, optimizer update, EMA, metrics; jitted over a mesh."""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lsync_jax.host import compiler_options
from lsync_jax.objectives import Objective, objective_loss
from lsync_jax.sharding import BATCH_AXES, DEFAULT_RULES, batch_sharding, replicated
from lsync_jax.train.state import TrainState, state_shardings


def microbatch_problem(batch_size: int, microbatches: int, num_devices: int, objective: Objective | None = None) -> str:
    """Why `train.microbatches` cannot split a global batch of `batch_size` over `num_devices` devices
    ('' if it can): each microbatch takes every k-th example, so every device's share of the batch
    must split into k whole parts; a regulariser whose statistics span the batch cannot be split."""
    if isinstance(microbatches, bool) or int(microbatches) != microbatches or microbatches < 1:
        return f"config.train.microbatches={microbatches!r} must be an integer >= 1 (1: no accumulation)"
    if batch_size % (microbatches * num_devices):
        return (f"config.train.microbatches={microbatches}: config.data.batch_size={batch_size} must be a multiple of "
                f"microbatches x devices = {microbatches} x {num_devices} (each device's share splits into "
                f"{microbatches} microbatches)")
    spanning = objective.spans_batch if objective is not None else ()
    if microbatches > 1 and spanning:
        return (f"config.train.microbatches={microbatches} with {', '.join(spanning)}: its statistics span the whole "
                "batch, which microbatches cannot reproduce; use microbatches=1 (or remat / fsdp for memory)")
    return ""


def _loss_and_grads(params: Any, batch: Mapping[str, jax.Array], key: jax.Array, step: jax.Array,
                    ids: jax.Array | None, apply_fn: Any, objective: Objective) -> tuple[Any, dict[str, jax.Array]]:
    return jax.grad(lambda p: objective_loss(p, apply_fn, batch, key, objective, step=step, example_ids=ids),
                    has_aux=True)(params)


def accumulated_grads(params: Any, batch: Mapping[str, jax.Array], key: jax.Array, step: jax.Array, *,
                      apply_fn: Any, objective: Objective, microbatches: int = 1,
                      constrain: Callable[[Any], Any] = lambda tree: tree) -> tuple[Any, dict[str, jax.Array]]:
    """The objective's gradient and metrics over `batch`, in `microbatches` sequential parts (a loop
    inside the step: peak activation memory is one microbatch's). Microbatch j takes examples j, j + k,
    ..., each drawing its randomness by its index in the whole batch, and the losses are means over
    examples, so the mean of the parts' gradients is the whole batch's (to float rounding). Gradients
    accumulate in the parameters' dtype. `constrain` places the (k, N / k, ...) split on the mesh."""
    if microbatches == 1:
        return _loss_and_grads(params, batch, key, step, None, apply_fn, objective)
    if "mask" in batch:  # the masked means weight examples by their real tokens: not a mean of parts
        raise ValueError("config.train.microbatches > 1 with padded sequences (a mask in the batch) is not supported: "
                         "their token-weighted means do not split into microbatches; use microbatches=1")
    n = jax.tree.leaves(batch)[0].shape[0]
    k, m = microbatches, n // microbatches
    split = constrain(jax.tree.map(lambda a: jnp.swapaxes(a.reshape(m, k, *a.shape[1:]), 0, 1), dict(batch)))
    ids = jnp.arange(n).reshape(m, k).T  # (k, m): microbatch j's examples' indices in the batch

    def body(carry: tuple[Any, Any], part: tuple[jax.Array, Any]) -> tuple[tuple[Any, Any], None]:
        grads, metrics = carry
        part_ids, part_batch = part
        g, mets = _loss_and_grads(params, part_batch, key, step, part_ids, apply_fn, objective)
        return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, metrics, mets)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    metric_shapes = jax.eval_shape(lambda: _loss_and_grads(params, jax.tree.map(lambda a: a[0], split), key, step,
                                                           ids[0], apply_fn, objective)[1])
    (grads, metrics), _ = jax.lax.scan(body, (zeros, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                                                 metric_shapes)), (ids, split))
    return jax.tree.map(lambda g: g / k, grads), jax.tree.map(lambda v: v / k, metrics)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, apply_fn: Any, objective: Objective,
               tx: optax.GradientTransformation, schedule: optax.Schedule, ema_decay: float, microbatches: int = 1,
               constrain: Callable[[Any], Any] = lambda tree: tree) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step. Pure: the step's randomness is fold_in(state.rng, state.step)."""
    key = jax.random.fold_in(state.key, state.step)
    grads, metrics = accumulated_grads(state.params, batch, key, state.step, apply_fn=apply_fn, objective=objective,
                                       microbatches=microbatches, constrain=constrain)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, params)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), learning_rate=jnp.asarray(schedule(state.step)))
    return state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), metrics


def make_train_step(model: Any, objective: Objective, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh: Mesh, *, ema_decay: float, rules: Sequence[tuple[str, str]] = DEFAULT_RULES,
                    shardings: Any = None, microbatches: int = 1, batch_size: int | None = None):
    """`train_step` jitted with NamedShardings over `mesh`: the state stays in its sharded layout and
    is donated, the batch is split over every device, metrics come back replicated. `shardings`: the
    state's (from `abstract_state`), else derived here. `microbatches` > 1 accumulates gradients over
    that many parts of each batch (`batch_size`, when given, is checked against it now)."""
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"train.ema_decay must be in [0, 1), got {ema_decay}")
    problem = microbatch_problem(batch_size if batch_size is not None else microbatches * mesh.size, microbatches,
                                 mesh.size, objective)
    if problem:
        raise ValueError(problem)
    shardings = state_shardings(model, tx, mesh, rules) if shardings is None else shardings
    split = NamedSharding(mesh, P(None, BATCH_AXES))
    step = functools.partial(train_step, apply_fn=model.apply, objective=objective, tx=tx, schedule=schedule,
                             ema_decay=ema_decay, microbatches=microbatches,
                             constrain=lambda tree: jax.lax.with_sharding_constraint(tree, split))
    jitted = jax.jit(step, in_shardings=(shardings, batch_sharding(mesh)),
                     out_shardings=(shardings, replicated(mesh)), donate_argnums=0,
                     compiler_options=compiler_options(mesh.devices.flat[0].platform))
    return MeshStep(jitted, mesh) if getattr(model, "attention_impl", "") == "splash" else jitted


class MeshStep:
    """A jitted step traced and run inside `jax.set_mesh(mesh)`: what a kernel that must be split over
    the mesh by hand (the splash attention's shard_map) reads the mesh from."""

    def __init__(self, jitted: Any, mesh: Mesh):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args: Any) -> Any:
        with jax.set_mesh(self.mesh):
            return self.jitted(*args)

    def lower(self, *args: Any) -> Any:
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args)
