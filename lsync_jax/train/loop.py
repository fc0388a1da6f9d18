"""The training loop: `train_and_evaluate(config, workdir)`.

One code path for one CPU, a GPU node or a TPU pod: the state lives sharded over a (data, fsdp)
mesh, each process feeds its share of the global batch, checkpoints are written by every process
without gathering. The loop itself only sequences hooks: log, check for NaN, sample, checkpoint.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lsync_jax.data import LoaderSpec, global_batch, make_loader
from lsync_jax.objectives import build_objective
from lsync_jax.train import checkpoint as ckpt_lib
from lsync_jax.train.config import (
    build_model,
    build_sampler,
    build_source,
    build_transport,
    check_data_matches_model,
    mesh_rules,
    model_fields,
    validate_config,
)
from lsync_jax.train.encoders import build_encoder_features
from lsync_jax.train.images import make_grid, save_png, to_uint8
from lsync_jax.host import gather_to_host
from lsync_jax.train.sharding import batch_sharding, make_mesh, with_shardings
from lsync_jax.models.mup import mup_lr_multipliers
from lsync_jax.train.state import create_train_state, init_state_fn, make_optimizer, state_shardings
from lsync_jax.train.sample import make_decoder
from lsync_jax.train.step import make_train_step
from lsync_jax.transport import make_sample_fn
from lsync_jax.transport.samplers import validate_guidance


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or Inf; the message names the step and the term."""


def check_finite(step: int, metrics: Mapping[str, Any], last_saved: int | None) -> None:
    bad = [k for k, v in metrics.items() if (k == "loss" or k.startswith("loss/") or k == "grad_norm")
           and not np.all(np.isfinite(v))]
    if bad:
        raise NonFiniteLossError(
            f"non-finite values at step {step}: " + ", ".join(f"{k} = {float(np.asarray(metrics[k]))}" for k in bad)
            + f". The last good checkpoint (step {last_saved}) is kept; nothing later was saved.")


class _Preemption:
    """Turns SIGTERM into a flag the loop polls, so it can save before exiting."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, no preemption saves
            self._previous = None
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint before exiting")
        self.requested = True

    def any_process(self) -> bool:
        """With several processes all must stop at the same step: they agree at log boundaries
        (every process runs this at the same steps), so a preempted pod saves at the next one."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array([self.requested]))))

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def initialize_distributed(dist: Mapping[str, Any]) -> None:
    """jax.distributed.initialize() when config.distributed.enabled (before any other JAX call); once
    per process (ERW's two stages share it)."""
    if not dist.get("enabled", False) or jax.distributed.is_initialized():
        return
    if dist.get("cpu_collectives"):
        jax.config.update("jax_cpu_collectives_implementation", dist["cpu_collectives"])
    num, pid = dist.get("num_processes", -1), dist.get("process_id", -1)
    jax.distributed.initialize(coordinator_address=dist.get("coordinator_address") or None,
                               num_processes=None if num is None or num < 0 else num,
                               process_id=None if pid is None or pid < 0 else pid)


def train_and_evaluate(config: Any, workdir: str) -> dict[str, float]:
    """Train (or resume) the run described by `config` in `workdir`; returns the last metrics.

    With `config.erw.enabled`, ERW's two stages run one after the other (`lsync_jax.train.erw`)."""
    validate_config(config)
    initialize_distributed(config.get("distributed", {}))
    from lsync_jax.train.auto_pairs import uses_auto_pairs

    if config.get("erw", {}).get("enabled", False):
        if uses_auto_pairs(config):
            raise ValueError("objective.layersync.pairs='auto' with config.erw.enabled is not supported: set the "
                             "pairs explicitly (launch/analyze.py on a run shows the measurements)")
        from lsync_jax.train.erw import train_erw

        return train_erw(config, workdir)
    if uses_auto_pairs(config):
        from lsync_jax.train.auto_pairs import train_auto_pairs

        return train_auto_pairs(config, workdir)
    return train_run(config, workdir)


def train_run(config: Any, workdir: str, *, stop_at: int | None = None, meta_extra: Mapping[str, Any] | None = None,
              accept_objectives: tuple[str, ...] = ()) -> dict[str, float]:
    """One training run (see `train_and_evaluate`).

    `stop_at`: train only up to that step (saving it), as part of a longer run whose schedule is
    `train.num_steps` (no final samples or FID then). `meta_extra`: more entries for every
    checkpoint's meta (LayerSync's automatic pairs store their choice there). `accept_objectives`:
    objectives (their recorded repr) of an earlier phase of this run that a resume may start from."""
    validate_config(config)
    initialize_distributed(config.get("distributed", {}))
    model = build_model(config)
    transport = build_transport(config)
    objective = build_objective(config.objective, transport, depth=model.depth)
    tx, schedule = make_optimizer(dict(config.optimizer), lr_multipliers=mup_lr_multipliers(model))  # None: sp
    sampler_cfg, cfg_scale, interval = build_sampler(config)
    validate_guidance(model, cfg_scale, interval)  # now, not at the first sample grid hours later
    if config.train.get("init_include") and not config.train.get("init_from"):
        raise ValueError("config.train.init_include selects parameters of config.train.init_from, which is empty")
    for key in ("num_steps", "log_every", "checkpoint_every"):
        if int(config.train.get(key, 1)) < 1:
            raise ValueError(f"config.train.{key} must be >= 1, got {config.train.get(key)}")
    if int(config.train.get("num_grid_samples", 64)) < 0:
        raise ValueError(f"config.train.num_grid_samples must be >= 0 (0: no sample grids), got "
                         f"{config.train.get('num_grid_samples')}")
    if int(config.train.get("sample_every", 0)) < 0:
        raise ValueError("config.train.sample_every must be >= 0 (0: only at the end)")
    rules = mesh_rules(config)
    mesh = make_mesh(config.mesh.get("data", -1), config.mesh.get("fsdp", 1))
    batch_size = int(config.data.batch_size)
    if batch_size % jax.device_count():
        raise ValueError(f"config.data.batch_size={batch_size} is not divisible by the {jax.device_count()} devices")
    source = build_source(config.data)
    check_data_matches_model(source, model, config.data)
    sample_fn = make_sample_fn(model, transport, sampler_cfg)
    decode = make_decoder(config, mesh)  # latent models: the SD-VAE turns samples into images
    fid = None
    if int(config.get("eval", {}).get("every", 0)):
        # before the state exists: bad weights, sizes or reference fail before any model compile
        from lsync_jax.train.fid import TrainingFID  # Inception weights are needed only when FID is on

        fid = TrainingFID(config, model, sample_fn, mesh, cfg_scale, interval, workdir, decode)
    encoder = build_encoder_features(config, model, mesh)  # REPA's encoder: checked and loaded before compiling
    loader = make_loader(source, LoaderSpec(global_batch_size=batch_size, seed=int(config.seed),
                                            flip=bool(config.data.get("flip", False)),
                                            fields=encoder.fields if encoder else ()))
    data_iter = iter(loader)
    num_steps = int(config.train.num_steps)
    end = num_steps if stop_at is None else min(int(stop_at), num_steps)

    # -- state: resume, else init (optionally from another run's weights) -----------------------------
    shapes = jax.eval_shape(init_state_fn(model, tx), jax.random.key(0))
    abstract = with_shardings(shapes, state_shardings(model, tx, mesh, rules))
    meta = dict(ckpt_lib.describe(model_fields(config), shapes.params, shapes, objective), **(meta_extra or {}))
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                         max_to_keep=int(config.train.get("keep_checkpoints", 3)),
                                         keep_every=config.train.get("keep_every"),
                                         async_save=bool(config.train.get("async_checkpoints", True)))
    latest = checkpointer.latest_step()
    if latest is not None:
        saved_meta = checkpointer.read_meta(latest)
        if saved_meta.get("objective") in accept_objectives:  # an earlier phase of this run (a warm-up)
            saved_meta["objective"] = meta["objective"]
        ckpt_lib.check_compatible(saved_meta, meta, checkpointer.directory)
        state = checkpointer.restore(latest, abstract, data_iter)
        logging.info("resumed from %s step %d", checkpointer.directory, latest)
        if config.train.get("init_from"):
            logging.warning("train.init_from is ignored: the workdir's own checkpoint (step %d) takes precedence",
                            latest)
        if latest >= num_steps:
            logging.warning("the checkpoint is at step %d >= train.num_steps=%d: nothing to train", latest, num_steps)
    else:
        state = create_train_state(model, tx, jax.random.key(int(config.seed)), mesh, rules)
        if config.train.get("init_from") and config.train.get("init_include"):
            params, carried = ckpt_lib.restore_matching(config.train.init_from, state.params,
                                                        config.train.init_include)
            logging.info("initialised %d parameters from %s (train.init_include=%r), the rest fresh; EMA = these "
                         "weights, optimizer fresh: %s", len(carried), config.train.init_from,
                         config.train.init_include, ", ".join(carried))
            state = state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))
        elif config.train.get("init_from"):
            params, ema = ckpt_lib.restore_params(config.train.init_from, abstract.params)
            state = state.replace(params=params, ema_params=ema)
    start = int(state.step)

    step_fn = make_train_step(model, objective, tx, schedule, mesh, ema_decay=float(config.train.ema_decay),
                              rules=rules)
    writer, report = _writers(workdir, num_steps)
    sharding = batch_sharding(mesh)
    log_every = int(config.train.get("log_every", 50))
    ckpt_every = int(config.train.get("checkpoint_every", 1000))
    # A model trained without the transport loss (ERW's first stage) is no generator: no sample grids.
    grids = objective.transport_weight > 0 and int(config.train.get("num_grid_samples", 64)) > 0
    sample_every = int(config.train.get("sample_every", 0)) if grids else 0
    pending: list[tuple[int, dict]] = []
    last_saved = latest
    last_metrics: dict[str, float] = {}
    timer = (time.perf_counter(), start)

    def flush_metrics(step: int) -> None:
        nonlocal last_metrics, timer
        for s, m in jax.device_get(pending):
            check_finite(s, m, last_saved)
        if pending:
            last_metrics = {k: float(np.mean([np.asarray(m[k]) for _, m in pending])) for k in pending[-1][1]}
            elapsed = time.perf_counter() - timer[0]
            last_metrics["images_per_second"] = (step - timer[1]) * batch_size / max(elapsed, 1e-9)
            timer = (time.perf_counter(), step)
            writer.write_scalars(step, last_metrics)
        pending.clear()

    def save(step: int, force: bool = False) -> None:
        nonlocal last_saved
        flush_metrics(step)  # never save a state whose loss was not finite
        checkpointer.save(step, state, meta, data_iter, force=force)
        last_saved = step

    def evaluate(step: int) -> None:
        nonlocal timer
        if last_saved != step:
            save(step)  # the evaluation can take minutes and can fail: never at the cost of training
        scalars = fid(step, state.ema_params)
        writer.write_scalars(step, scalars)
        last_metrics.update(scalars)
        timer = (time.perf_counter(), step)  # evaluation time is not training throughput

    def sample_grid(step: int) -> None:
        labels = np.arange(int(config.train.get("num_grid_samples", 64))) % max(model.num_classes, 1)
        images = sample_fn({"params": state.ema_params}, jax.random.key(int(config.seed) + 1), labels,
                           cfg_scale, interval)
        if decode is not None:
            images = decode(images)
        grid = make_grid(to_uint8(gather_to_host(images)), columns=min(max(model.num_classes, 8), 16))
        if jax.process_index() == 0:
            save_png(os.path.join(workdir, "samples", f"step_{step:07d}.png"), grid)
        writer.write_images(step, {"samples_ema": grid[None].astype(np.float32) / 255.0})

    try:
        with _Preemption() as preemption:
            step = start
            for step in range(start + 1, end + 1):
                batch = global_batch(next(data_iter), sharding)
                if encoder is not None:
                    batch = encoder.add_to(batch)
                state, metrics = step_fn(state, batch)
                pending.append((step, metrics))
                report(step)
                if step % log_every == 0 or step == end:
                    flush_metrics(step)
                if step % ckpt_every == 0 or step == end:
                    save(step)
                if sample_every and step % sample_every == 0:
                    sample_grid(step)
                if fid is not None and fid.due(step, num_steps) and not (
                        jax.process_count() == 1 and preemption.requested):  # no minutes-long pass when asked to stop
                    evaluate(step)  # the final one runs after the loop
                if (preemption.requested if jax.process_count() == 1
                        else step % log_every == 0 and preemption.any_process()):
                    if last_saved != step:
                        save(step, force=True)
                    logging.warning("preempted at step %d; checkpoint saved", step)
                    break
            flush_metrics(step)
            if step == num_steps and num_steps > start and grids and not (sample_every and step % sample_every == 0):
                sample_grid(step)
            if fid is not None and step == num_steps and not fid.done(step) and not (
                    preemption.requested if jax.process_count() == 1 else preemption.any_process()):
                evaluate(step)  # the final FID, also when a resumed run finds training finished without it
    finally:
        checkpointer.close()  # waits for asynchronous saves: an error must not cut the last good one short
        writer.flush()
    return last_metrics


def _writers(workdir: str, num_steps: int):
    """clu's TensorBoard + console writer and ReportProgress (steps/s, ETA); clu imports TensorFlow."""
    from clu import metric_writers, periodic_actions

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer, every_secs=30)
    return writer, report
