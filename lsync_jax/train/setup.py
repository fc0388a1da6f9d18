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
writes is probed (write, read back, delete). A resume takes the newest intact checkpoint: newer
damaged ones are set aside (renamed, never deleted) once an older one restores, one line each. It
is refused, naming the key, when the config would change the data order or batch (unless
train.allow_data_change) or the transport (unless train.allow_transport_change).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lsync_jax import storage
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
    TRANSPORT_OF_WEIGHTS,
    DamagedCheckpointError,
    all_finite,
    all_steps,
    check_compatible,
    check_transport,
    checkpoint_damage,
    checkpoint_dir,
    describe,
    read_meta,
    record_differences,
    restore_matching,
    restore_or_damaged,
    restore_params,
    set_aside,
    step_dirs,
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

    @property
    def num_steps(self) -> int:
        return int(self.config.train.num_steps)

    @property
    def log_every(self) -> int:
        return int(self.config.train.log_every)

    def next_batch(self) -> dict[str, jax.Array]:
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
    resumes = _check_start(config, ckpt_dir, saved_steps, meta, accepts)  # meta only: cheap
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
    state = (_resume(checkpointer, start, accepts) if latest is not None
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


# What fixes the order and content of the batches: a resume with another value would continue with
# other data than an uninterrupted run (the data iterator's state is only the next index).
DATA_ORDER = ("name", "dir", "split", "tfds_name", "batch_size", "flip")
# ... and the keys that shape the examples of generated or cropped data
DATA_SHAPE = {"moving_fmnist": ("num_clips", "frames", "canvas", "items", "item_size", "speed"),
              "humanml3d": ("length", "crop")}


def data_record(config: Any, source: Any) -> dict[str, Any]:
    """What a checkpoint records of the data order: DATA_ORDER's config.data keys, config.seed and the
    number of examples in the source."""
    record = {key: config.data[key] for key in DATA_ORDER + DATA_SHAPE.get(config.data.name, ())}
    if record["dir"]:
        record["dir"] = storage.absolute(record["dir"])
    return dict(record, seed=int(config.seed), size=len(source))


def check_data_order(saved: Mapping[str, Any], wanted: Mapping[str, Any], where: str, allow: bool,
                     warn: bool = True) -> None:
    """Refuse a resume whose data order or batch would differ from the checkpoint's (only what it
    records is compared: older checkpoints record nothing), unless train.allow_data_change (then one
    warning line, unless `warn` is False: a repeated check)."""
    recorded = saved.get("data") or {}
    differ = [k for k in sorted(recorded) if k in wanted and recorded[k] != wanted[k]]
    if not differ:
        return
    name = {"seed": "config.seed", "size": "the dataset size (examples in config.data's source)"}
    named = "; ".join(f"{name.get(k, 'config.data.' + k)}: checkpoint {recorded[k]!r}, config {wanted[k]!r}"
                      for k in differ)
    if allow:
        if warn:
            logging.warning("resuming %s with another data order or batch (%s): allowed by "
                            "config.train.allow_data_change; the run no longer matches an uninterrupted one", where,
                            named)
        return
    raise ValueError(f"resuming {where} would silently change the data order or batch ({named}). Resume with the "
                     "checkpoint's values, use another --workdir, or set --config.train.allow_data_change=True if "
                     "the change is intended.")


def _check_resumable(saved: dict[str, Any], config: Any, meta: Mapping[str, Any],
                     accepts: Sequence[Mapping[str, Any]], directory: str, warn: bool = True) -> None:
    """Whether a checkpoint's meta (migrated to today's schema by `read_meta`) lets this config resume
    it: the model and state, the transport, the objective, the data order (ValueError naming the key;
    the transport is recorded on its own, so allow_transport_change needs nothing from the objective).
    Changed optimizer settings are allowed, one line each. `warn=False`: repeated, said already."""
    if saved.get("objective") in accepts:  # an earlier phase of this run (a warm-up)
        saved["objective"] = meta["objective"]
    check_transport(saved, config, directory, doing="resuming", warn=warn)  # first: it names the key
    check_compatible(saved, meta, directory)
    check_data_order(saved, meta["data"], directory, bool(config.train.allow_data_change), warn=warn)
    if warn and "optimizer" in saved:
        for change in record_differences(saved["optimizer"], meta["optimizer"], "config.optimizer"):
            logging.warning("resuming %s with another optimizer setting (%s)", directory, change)


def _check_start(config: Any, ckpt_dir: str, saved_steps: Sequence[int], meta: Mapping[str, Any],
                 accepts: Sequence[Mapping[str, Any]]) -> int | None:
    """What the run starts from, checked on its meta before anything long (reference statistics, the
    restore, compiles): the newest structurally intact checkpoint a resume would take, or
    train.init_from's transport. The restore checks again, candidate by candidate. Returns the step
    checked (a resume), else None."""
    if saved_steps:
        for step in reversed(saved_steps):
            if checkpoint_damage(os.path.join(ckpt_dir, str(step))) is None:
                _check_resumable(read_meta(ckpt_dir, step), config, meta, accepts, storage.absolute(ckpt_dir))
                return step
    elif config.train.init_from:
        for directory in step_dirs(config.train.init_from)[0]:  # damage is reported when it is restored
            if checkpoint_damage(directory) is None:
                saved = read_meta(os.path.dirname(directory), os.path.basename(directory))
                check_transport(saved, config, directory, doing="train.init_from", keys=TRANSPORT_OF_WEIGHTS,
                                warn=False)  # the restore says it
                return None
    return None


def _resume(checkpointer: Checkpointer, start: Plan, accepts: Sequence[Mapping[str, Any]]) -> Any:
    """The state (and data position) of the newest intact checkpoint. Damaged newer ones are set aside
    (renamed, one line each) once an older one has restored; if none restores nothing is moved and
    the error says why."""
    config, directory, abstract, meta, checked = (start.config, checkpointer.directory, start.abstract, start.meta,
                                                  start.resumes)
    damaged: list[tuple[int, str]] = []
    state = None
    for step in reversed(checkpointer.all_steps()):
        path = os.path.join(directory, str(step))
        problem = checkpoint_damage(path)
        if problem is None:
            try:
                _check_resumable(read_meta(directory, step), config, meta, accepts, directory, warn=step != checked)
                if not storage.isdir(storage.join(path, "data")):
                    raise FileNotFoundError(f"checkpoint {step} in {directory} has no data-iterator position; "
                                            "resuming would replay the data from the start")
                state = restore_or_damaged(path, lambda s=step: checkpointer.restore(s, abstract, start.data_iterator))
                if not all_finite((state.params, state.ema_params)):
                    raise DamagedCheckpointError(path, "it holds non-finite parameters")
                break
            except DamagedCheckpointError as e:
                problem, state = e.reason, None
        damaged.append((step, problem))
    if state is None:
        raise DamagedCheckpointError(directory, "no checkpoint in it can be resumed (" + "; ".join(
            f"step {s}: {p}" for s, p in damaged) + "). Nothing was moved; move them away (or use another "
            "--workdir) to start over")
    for bad, problem in damaged:
        target = set_aside(os.path.join(directory, str(bad)))
        logging.warning("checkpoint %d is damaged (%s): set aside as %s (not deleted); resuming from step %d", bad,
                        problem, target, step)
    if damaged:
        checkpointer.reload()
    logging.info("resumed from %s step %d", directory, step)
    if config.train.init_from:
        logging.warning("train.init_from is ignored: the workdir's own checkpoint (step %d) takes precedence", step)
    if step >= start.num_steps:
        logging.warning("the checkpoint is at step %d >= train.num_steps=%d: nothing to train", step, start.num_steps)
    return state


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
