"""Setting up a training run: every piece built once, every input checked before anything compiles.

`plan(config, workdir)` builds and checks a start (model, objective, optimizer, mesh, data, sampler,
the abstract state, what checkpoints record, which checkpoint a resume takes) and creates nothing but
the storage probes: `check` (launch/train.py --check) stops there, after building the evaluators with
`check_only`. `setup(config, workdir)` continues from the plan to a complete `Run` (the state resumed
or initialised, the jitted step, the metrics log) and its hooks; nothing in the Run is filled in later.
A phase of a longer run (`lsync_jax.recipes`) passes `until` (its last step), `record` (what its
checkpoints' meta adds), `accepts` (objective records of earlier phases in this workdir a resume may
start from), `evaluators` (in-training evaluations, registered in `lsync_jax.recipes.evaluators`) and
`validated` (the recipe validated its configs once, before the first phase).

Before anything long (encoder weights, reference statistics, compiles) every directory the run
writes is probed (write, read back, delete). The resume policy is `lsync_jax.workdir`'s: a resume
takes the newest intact checkpoint, newer damaged ones are set aside (renamed, never deleted) once an
older one restores, one line each; it is refused, naming the key, when the config would change the
data order or batch (unless train.allow_data_change) or the transport (unless
train.allow_transport_change).
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
    mesh_platform,
    mesh_rules,
    model_fields,
    validate_config,
)
from lsync_jax.configs.protocols import config_protocol_differences
from lsync_jax.data import LoaderSpec, global_batch, make_loader
from lsync_jax.host import compiler_options, initialize_distributed
from lsync_jax.models.mup import mup_lr_multipliers
from lsync_jax.objectives import Objective, build_objective
from lsync_jax.objectives.batch import Batch
from lsync_jax.sharding import batch_sharding
from lsync_jax.storage import check_writable
from lsync_jax.train.checkpoint import Checkpointer
from lsync_jax.train.encoders import EncoderFeatures, build_encoder_features
from lsync_jax.train.hooks import CheckpointHook, EvaluationHook, Evaluator, Hook, Metrics, SampleGridHook
from lsync_jax.train.state import abstract_state, create_train_state, make_optimizer, shardings_of
from lsync_jax.train.step import make_train_step, microbatch_problem
from lsync_jax.transport import make_sample_fn
from lsync_jax.transport.samplers import validate_guidance
from lsync_jax.workdir import (
    all_steps,
    checkpoint_dir,
    data_record,
    describe,
    restore_matching,
    restore_params,
    resume_newest_intact,
    resume_target,
    transport_record,
    write_run_record,
)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A start of a run, built and checked: the config, data, weights, storage probes, a resume's
    compatibility and the evaluators' inputs. Everything but the state and the compiled step: what
    `launch/train.py --check` stops at, and what evaluator factories are built from."""

    config: Any
    workdir: str
    model: Any
    objective: Objective
    mesh: Any
    rules: Any
    tx: Any
    schedule: Any
    sample_fn: Callable
    cfg_scale: float
    interval: tuple[float, float]
    decode: Callable | None  # latent models: the SD-VAE decoder
    data_iterator: Iterator
    encoder: EncoderFeatures | None
    abstract: Any  # the state's shapes and shardings: the restore, the fresh state and the step use them
    meta: Mapping[str, Any]  # what each checkpoint of this start records
    end: int  # the last step of this phase
    resumes: int | None  # the checkpoint step a resume starts from (checked on its meta), else None
    grids: bool  # sample grids are on

    @property
    def num_steps(self) -> int:
        return int(self.config.train.num_steps)


@dataclasses.dataclass(frozen=True)
class Run:
    """A training run's pieces, built once and complete by `setup`: nothing is filled in later."""

    config: Any
    workdir: str
    model: Any
    objective: Objective
    mesh: Any
    data_iterator: Iterator
    encoder: EncoderFeatures | None
    state: Any
    start: int  # the step the state is at
    end: int  # the last step of this phase
    resumed: int | None  # the checkpoint step resumed from, else None
    step_fn: Callable
    metrics: Metrics  # the log every hook's outcome goes to
    # Called with the step before every hook that writes into the workdir (`Needs.HOLD`); raises HoldLostError
    # once this run no longer holds it. `setup` takes no hold; `lsync_jax.train.train` sets the hold's guard.
    hold: Callable[[int], None] = lambda step: None

    @property
    def num_steps(self) -> int:
        return int(self.config.train.num_steps)

    @property
    def log_every(self) -> int:
        return int(self.config.train.log_every)

    def next_batch(self) -> Batch:
        batch = global_batch(next(self.data_iterator), batch_sharding(self.mesh))
        return self.encoder.add_to(batch) if self.encoder is not None else batch


# An in-training evaluator's factory (lsync_jax.recipes.evaluators): built from the plan, before the
# state exists, so that its inputs fail before any model compiles; `check_only` (--check) loads nothing long.
EvaluatorFactory = Callable[[Plan, bool], Evaluator]


def plan(config: Any, workdir: str, *, until: int | None = None, record: Mapping[str, Any] | None = None,
         accepts: Sequence[Mapping[str, Any]] = (), validated: bool = False) -> Plan:
    """Build and check a start of `config` in `workdir` (see `Plan`) without creating anything in the
    workdir but the storage probes. `validated`: the caller (the recipes) checked the config already."""
    if not validated:
        validate_config(config)
    for difference in config_protocol_differences(config):
        logging.warning("this run is not protocol %r's: %s; its results will not be comparable with the paper's "
                        "value (launch/reproduce.py marks them)", config.protocol, difference)
    initialize_distributed(config.distributed)
    mesh, rules = build_mesh(config), mesh_rules(config)
    model = build_model(config, mesh_platform(mesh))
    transport = build_transport(config)
    objective = build_objective(config.objective, transport, depth=model.depth)
    tx, schedule = make_optimizer(dict(config.optimizer), lr_multipliers=mup_lr_multipliers(model))
    sampler_cfg, cfg_scale, interval = build_sampler(config)
    validate_guidance(model, cfg_scale, interval)  # now, not at the first sample grid hours later
    batch_size = int(config.data.batch_size)
    if batch_size % jax.device_count():
        raise ValueError(f"config.data.batch_size={batch_size} is not divisible by the {jax.device_count()} devices")
    problem = microbatch_problem(batch_size, int(config.train.microbatches), mesh.size, objective)
    if problem:
        raise ValueError(problem)
    source = build_source(config.data)
    check_data_matches_model(source, model, config.data)
    # sample grids are pictures: images, or video clips as rows of frames; sequences have none
    grids = (objective.transport_weight > 0 and int(config.train.num_grid_samples) > 0
             and model.kind != "sequence")
    for directory in writes(config, workdir, grids):  # now, not at the first save hours later
        check_writable(directory, cleanup=jax.process_count() == 1)  # several on a shared disk: not each other's
    encoder = build_encoder_features(config, model, mesh)  # REPA's encoder: checked and loaded before compiling
    loader = make_loader(source, LoaderSpec(global_batch_size=batch_size, seed=int(config.seed),
                                            flip=bool(config.data.flip), fields=encoder.fields if encoder else ()))
    sample_fn = make_sample_fn(model, transport, sampler_cfg,
                               compiler_options=compiler_options(mesh_platform(mesh)), mesh=mesh)
    abstract = abstract_state(model, tx, mesh, rules)
    meta = dict(describe(model_fields(config), abstract.params, abstract, objective,
                         transport=transport_record(config.transport), data=data_record(config, source),
                         optimizer=dict(config.optimizer)),
                **(record or {}))
    ckpt_dir = checkpoint_dir(workdir)
    saved_steps = all_steps(ckpt_dir)  # read only: a run refused below leaves the workdir as it found it
    resumes = resume_target(config, ckpt_dir, saved_steps, meta, accepts)  # meta only: cheap
    num_steps = int(config.train.num_steps)
    return Plan(config, workdir, model, objective, mesh, rules, tx, schedule, sample_fn, cfg_scale, interval,
                build_decoder(config, mesh), iter(loader), encoder, abstract, meta,
                num_steps if until is None else min(int(until), num_steps), resumes, grids)


def check(config: Any, workdir: str, *, until: int | None = None, record: Mapping[str, Any] | None = None,
          accepts: Sequence[Mapping[str, Any]] = (), evaluators: Sequence[EvaluatorFactory] = (),
          validated: bool = False) -> Plan:
    """launch/train.py --check: every check of a real start (config, data, weights, storage probes, a
    resume's compatibility, the evaluators' inputs) on this process, with nothing created in the
    workdir and nothing compiled."""
    start = plan(config, workdir, until=until, record=record, accepts=accepts, validated=validated)
    for factory in evaluators:
        factory(start, True)
    return start


def setup(config: Any, workdir: str, *, until: int | None = None, record: Mapping[str, Any] | None = None,
          accepts: Sequence[Mapping[str, Any]] = (), evaluators: Sequence[EvaluatorFactory] = (),
          validated: bool = False) -> tuple[Run, list[Hook]]:
    """Build the run described by `config` in `workdir` (see `plan`; `until`, `record` and `accepts` are
    a recipe phase's: its last step, what its checkpoints' meta adds, and objective records of earlier
    phases in this workdir a resume may start from) and its hooks: checkpoints, sample grids, then one
    per evaluator, each evaluator built before the state exists so that its inputs too fail before any
    model compiles."""
    start = plan(config, workdir, until=until, record=record, accepts=accepts, validated=validated)
    built = [factory(start, False) for factory in evaluators]  # e.g. FID's reference statistics, before the state
    if jax.process_index() == 0:  # what this start runs, beside the checkpoints (one file per start)
        logging.info("this start's config, versions and command line: %s", write_run_record(workdir, config))
    checkpointer = Checkpointer(checkpoint_dir(workdir), max_to_keep=int(config.train.keep_checkpoints),
                                keep_every=config.train.keep_every, async_save=bool(config.train.async_checkpoints))
    latest = checkpointer.latest_step()
    state = (resume_newest_intact(checkpointer, config, start.abstract, start.meta, accepts, start.data_iterator,
                                  checked=start.resumes) if latest is not None
             else _initialise(config, start.model, start.tx, start.mesh, start.rules, start.abstract))
    step = int(state.step)
    batch_size = int(config.data.batch_size)
    step_fn = make_train_step(start.model, start.objective, start.tx, start.schedule, start.mesh,
                              ema_decay=float(config.train.ema_decay), rules=start.rules,
                              shardings=shardings_of(start.abstract), microbatches=int(config.train.microbatches),
                              batch_size=batch_size)
    metrics = Metrics(workdir, start.num_steps, int(config.train.log_every), batch_size, step)
    run = Run(config, workdir, start.model, start.objective, start.mesh, start.data_iterator, start.encoder, state,
              step, start.end, step if latest is not None else None, step_fn, metrics)
    hooks: list[Hook] = [CheckpointHook(checkpointer, start.meta, start.data_iterator,
                                        int(config.train.checkpoint_every))]
    # A model trained without the transport loss (ERW's first stage) is no generator: no sample grids.
    if start.grids:
        model = start.model
        columns = model.num_frames if model.kind == "video" else min(max(model.num_classes, 8), 16)
        hooks.append(SampleGridHook(_grid_sampler(start), int(config.train.sample_every), workdir, columns))
    return run, hooks + [EvaluationHook(evaluator, start.num_steps) for evaluator in built]


def writes(config: Any, workdir: str, grids: bool) -> list[str]:
    """Every directory the run writes: the workdir (TensorBoard events, recipe files), its checkpoints,
    and its sample grids and FID results when those are on."""
    out = [workdir, os.path.join(workdir, "checkpoints")]
    if grids:  # periodic grids and the one at the end of the run
        out.append(os.path.join(workdir, "samples"))
    if int(config.eval.every):
        out.append(os.path.join(workdir, "eval"))
    return out


def _initialise(config: Any, model: Any, tx: Any, mesh: Any, rules: Any, abstract: Any) -> Any:
    """A fresh state, or one whose weights (all, or those `train.init_include` selects) come from
    `train.init_from` (its newest intact checkpoint, trained with this transport)."""
    state = create_train_state(model, tx, jax.random.key(int(config.seed)), mesh, rules, abstract=abstract)
    source, include = config.train.init_from, config.train.init_include
    if source and include:
        params, carried = restore_matching(source, state.params, include, config=config)  # logs which, from where
        logging.info("initialised %d parameters from train.init_from=%s, the rest fresh; EMA = these weights, "
                     "optimizer fresh, step 0", len(carried), source)
        state = state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))
    elif source:
        params, ema = restore_params(source, abstract.params, config=config)  # logs what it loaded from where
        logging.info("initialised params and EMA from train.init_from=%s; optimizer fresh, step 0", source)
        state = state.replace(params=params, ema_params=ema)
    return state


def _grid_sampler(run: Plan) -> Callable[[Any], jax.Array]:
    """EMA params -> the sample grid's images: the same labels and noise every time."""
    count = int(run.config.train.num_grid_samples)
    if getattr(run.model, "num_tags", 0):  # one tag on per sample, in turn
        labels = np.eye(run.model.num_tags, dtype=np.float32)[np.arange(count) % run.model.num_tags]
    else:
        labels = np.arange(count) % max(run.model.num_classes, 1)
    key = jax.random.key(int(run.config.seed) + 1)

    def sample(ema_params: Any) -> jax.Array:
        images = run.sample_fn({"params": ema_params}, key, labels, run.cfg_scale, run.interval)
        return run.decode(images) if run.decode is not None else images

    return sample
