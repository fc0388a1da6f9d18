"""Setting up a training run: every piece built once, every input checked before anything compiles.

`setup(config, workdir)` returns the `Run` (model, objective, optimizer, mesh, data, the state
resumed or initialised, the jitted step) and its hooks. The abstract state is traced once and
serves the restore, the fresh initialisation and the step's shardings. A phase of a longer run
(`lsync_jax.recipes`) passes `until` (its last step), `record` (what its checkpoints' meta adds)
and `accepts` (objectives of earlier phases in this workdir a resume may start from).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lsync_jax.builders import (
    build_decoder,
    build_mesh,
    build_model,
    build_sampler,
    build_source,
    build_transport,
    check_data_matches_model,
    mesh_rules,
    model_fields,
    validate_config,
)
from lsync_jax.data import LoaderSpec, global_batch, make_loader
from lsync_jax.host import initialize_distributed
from lsync_jax.models.mup import mup_lr_multipliers
from lsync_jax.objectives import Objective, build_objective
from lsync_jax.sharding import batch_sharding
from lsync_jax.train.checkpoint import Checkpointer
from lsync_jax.train.encoders import EncoderFeatures, build_encoder_features
from lsync_jax.train.hooks import CheckpointHook, Hook, MetricsHook, SampleGridHook
from lsync_jax.train.state import abstract_state, create_train_state, make_optimizer, shardings_of
from lsync_jax.train.step import make_train_step
from lsync_jax.transport import make_sample_fn
from lsync_jax.transport.samplers import validate_guidance
from lsync_jax.workdir import check_compatible, describe, restore_matching, restore_params


@dataclasses.dataclass
class Run:
    """A training run's pieces, built once by `setup`."""

    config: Any
    workdir: str
    model: Any
    objective: Objective
    mesh: Any
    sample_fn: Callable
    cfg_scale: float
    interval: tuple[float, float]
    decode: Callable | None  # latent models: the SD-VAE decoder
    data_iterator: Iterator
    encoder: EncoderFeatures | None
    state: Any = None
    start: int = 0
    end: int = 0  # the last step of this phase
    step_fn: Callable | None = None
    metrics: MetricsHook | None = None
    checkpoints: CheckpointHook | None = None

    @property
    def num_steps(self) -> int:
        return int(self.config.train.num_steps)

    @property
    def log_every(self) -> int:
        return int(self.config.train.log_every)

    def next_batch(self) -> dict[str, jax.Array]:
        batch = global_batch(next(self.data_iterator), batch_sharding(self.mesh))
        return self.encoder.add_to(batch) if self.encoder is not None else batch


HookFactory = Callable[[Run], Hook]


def setup(config: Any, workdir: str, *, until: int | None = None, record: Mapping[str, Any] | None = None,
          accepts: Sequence[str] = (), extra_hooks: Sequence[HookFactory] = ()) -> tuple[Run, list[Hook]]:
    """Build the run described by `config` in `workdir` and its hooks (metrics, checkpoints, sample
    grids, then `extra_hooks`, each built from the Run before the state exists, so that their inputs
    too fail before any model compiles)."""
    validate_config(config)
    initialize_distributed(config.distributed)
    model = build_model(config)
    transport = build_transport(config)
    objective = build_objective(config.objective, transport, depth=model.depth)
    tx, schedule = make_optimizer(dict(config.optimizer), lr_multipliers=mup_lr_multipliers(model))
    sampler_cfg, cfg_scale, interval = build_sampler(config)
    validate_guidance(model, cfg_scale, interval)  # now, not at the first sample grid hours later
    mesh, rules = build_mesh(config), mesh_rules(config)
    batch_size = int(config.data.batch_size)
    if batch_size % jax.device_count():
        raise ValueError(f"config.data.batch_size={batch_size} is not divisible by the {jax.device_count()} devices")
    source = build_source(config.data)
    check_data_matches_model(source, model, config.data)
    encoder = build_encoder_features(config, model, mesh)  # REPA's encoder: checked and loaded before compiling
    loader = make_loader(source, LoaderSpec(global_batch_size=batch_size, seed=int(config.seed),
                                            flip=bool(config.data.flip), fields=encoder.fields if encoder else ()))
    run = Run(config, workdir, model, objective, mesh, make_sample_fn(model, transport, sampler_cfg), cfg_scale,
              interval, build_decoder(config, mesh), iter(loader), encoder)
    run.end = run.num_steps if until is None else min(int(until), run.num_steps)
    built = [factory(run) for factory in extra_hooks]  # e.g. FID's reference statistics, before the state

    abstract = abstract_state(model, tx, mesh, rules)
    meta = dict(describe(model_fields(config), abstract.params, abstract, objective), **(record or {}))
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=int(config.train.keep_checkpoints),
                                keep_every=config.train.keep_every, async_save=bool(config.train.async_checkpoints))
    latest = checkpointer.latest_step()
    run.state = (_resume(checkpointer, latest, abstract, meta, accepts, run) if latest is not None
                 else _initialise(config, model, tx, mesh, rules, abstract))
    run.start = int(run.state.step)
    run.step_fn = make_train_step(model, objective, tx, schedule, mesh, ema_decay=float(config.train.ema_decay),
                                  rules=rules, shardings=shardings_of(abstract))
    run.metrics = MetricsHook(workdir, run.num_steps, run.log_every, batch_size, run.start)
    run.checkpoints = CheckpointHook(checkpointer, meta, run.data_iterator, int(config.train.checkpoint_every),
                                     run.metrics, latest)
    hooks: list[Hook] = [run.metrics, run.checkpoints]
    # A model trained without the transport loss (ERW's first stage) is no generator: no sample grids.
    if objective.transport_weight > 0 and int(config.train.num_grid_samples) > 0:
        hooks.append(SampleGridHook(_grid_sampler(run), int(config.train.sample_every), workdir,
                                    min(max(model.num_classes, 8), 16), run.metrics))
    return run, hooks + built


def _resume(checkpointer: Checkpointer, latest: int, abstract: Any, meta: Mapping[str, Any],
            accepts: Sequence[str], run: Run) -> Any:
    saved = checkpointer.read_meta(latest)
    if saved.get("objective") in accepts:  # an earlier phase of this run (a warm-up)
        saved["objective"] = meta["objective"]
    check_compatible(saved, meta, checkpointer.directory)
    state = checkpointer.restore(latest, abstract, run.data_iterator)
    logging.info("resumed from %s step %d", checkpointer.directory, latest)
    if run.config.train.init_from:
        logging.warning("train.init_from is ignored: the workdir's own checkpoint (step %d) takes precedence", latest)
    if latest >= run.num_steps:
        logging.warning("the checkpoint is at step %d >= train.num_steps=%d: nothing to train", latest, run.num_steps)
    return state


def _initialise(config: Any, model: Any, tx: Any, mesh: Any, rules: Any, abstract: Any) -> Any:
    """A fresh state, or one whose weights (all, or those `train.init_include` selects) come from
    `train.init_from`."""
    state = create_train_state(model, tx, jax.random.key(int(config.seed)), mesh, rules, abstract=abstract)
    source, include = config.train.init_from, config.train.init_include
    if source and include:
        params, carried = restore_matching(source, state.params, include)
        logging.info("initialised %d parameters from %s (train.init_include=%r), the rest fresh; EMA = these "
                     "weights, optimizer fresh: %s", len(carried), source, include, ", ".join(carried))
        state = state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))
    elif source:
        params, ema = restore_params(source, abstract.params)
        state = state.replace(params=params, ema_params=ema)
    return state


def _grid_sampler(run: Run) -> Callable[[Any], jax.Array]:
    """EMA params -> the sample grid's images: the same labels and noise every time."""
    labels = np.arange(int(run.config.train.num_grid_samples)) % max(run.model.num_classes, 1)
    key = jax.random.key(int(run.config.seed) + 1)

    def sample(ema_params: Any) -> jax.Array:
        images = run.sample_fn({"params": ema_params}, key, labels, run.cfg_scale, run.interval)
        return run.decode(images) if run.decode is not None else images

    return sample
