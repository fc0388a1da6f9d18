"""Periodic actions of the training loop, behind one interface.

After every step the loop hands each hook a `StepInfo`; a hook whose `due(info)` is true runs and
may return scalars, which the metrics hook logs. The engine's own hooks are here: metrics and
progress, checkpoints and sample grids. A layer above adds its own (the recipes add in-training
FID from `lsync_jax.eval.fid`) without the loop knowing them. Preemption is not a hook: the loop
decides it once per step (`Preemption.agreed`) and every hook reads it from `StepInfo.preempted`;
after saving, the loop raises `Preempted`, which launch/train.py turns into `PREEMPTED_EXIT_CODE`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import signal
import tempfile
import time
from typing import Any, Callable, Mapping, Protocol

import jax
import numpy as np
from absl import logging

from lsync_jax import storage
from lsync_jax.host import gather_to_host, make_grid, save_png, to_uint8
from lsync_jax.train import writers
from lsync_jax.workdir import all_finite

# The exit code of launch/train.py when SIGTERM stopped a run after saving a checkpoint: sysexits.h's
# EX_TEMPFAIL ("temporary failure, try again later"), neither 0 (finished) nor 1 (failed), so a
# scheduler (SLURM, a TPU pod's wrapper) can requeue on it. docs/training.md shows a requeue script.
PREEMPTED_EXIT_CODE = 75


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """Where the loop stands after a step (or, with `trained=False`, at a resume that had nothing to train)."""

    step: int
    state: Any
    metrics: Mapping[str, Any] | None  # the step's metrics (device values); None when nothing was trained
    last: bool  # the last step of this phase
    finished: bool  # step == train.num_steps: the whole run is done
    preempted: bool  # every process agreed to stop after this step (SIGTERM)
    trained: bool = True


class Hook(Protocol):
    def due(self, info: StepInfo) -> bool: ...

    def __call__(self, info: StepInfo) -> Mapping[str, float] | None: ...

    def close(self) -> None: ...


class NonFiniteLossError(FloatingPointError):
    """A loss term, or the state about to be saved, became NaN or Inf; the message names the step, what
    is not finite and the last checkpoint that is good."""


class Preempted(Exception):
    """SIGTERM stopped the run after its checkpoint was saved: run the same command again to continue
    (launch/train.py exits with PREEMPTED_EXIT_CODE)."""

    def __init__(self, step: int, directory: str):
        super().__init__(f"preempted at step {step}: checkpoint saved in {directory}; run the same command again to "
                         f"continue (exit code {PREEMPTED_EXIT_CODE})")
        self.step, self.directory = step, directory


def _last_good(last_saved: int | None) -> str:
    return (f"The last good checkpoint (step {last_saved}) is kept; nothing later was saved." if last_saved is not None
            else "No checkpoint was saved.")


def check_finite(step: int, metrics: Mapping[str, Any], last_saved: int | None) -> None:
    bad = [k for k, v in metrics.items() if (k == "loss" or k.startswith("loss/") or k == "grad_norm")
           and not np.all(np.isfinite(v))]
    if bad:
        raise NonFiniteLossError(
            f"non-finite values at step {step}: " + ", ".join(f"{k} = {float(np.asarray(metrics[k]))}" for k in bad)
            + ". " + _last_good(last_saved))


def check_state_finite(step: int, state: Any, last_saved: int | None) -> None:
    """A state with a NaN or Inf in its parameters or EMA is never saved (its losses can still be finite:
    the update that broke the weights is applied after the loss). One jitted reduction per save."""
    bad = [name for name, tree in (("params", state.params), ("ema_params", state.ema_params))
           if not all_finite(tree)]
    if bad:
        raise NonFiniteLossError(f"the state after step {step} has non-finite {' and '.join(bad)}: not saved. "
                                 + _last_good(last_saved))


class MetricsHook:
    """Collects every step's metrics, checks they are finite, and every `log_every` steps writes their
    mean and the throughput (TensorBoard events + console lines, `writers.create_default_writer`); a
    progress report gives steps/s and ETA.
    Other hooks' scalars go through `log`."""

    def __init__(self, workdir: str, num_steps: int, log_every: int, batch_size: int, start: int):
        self.events = EventSync(workdir) if storage.is_remote(workdir) and jax.process_index() == 0 else None
        logdir = self.events.local if self.events else workdir
        self.writer = writers.create_default_writer(logdir, just_logging=jax.process_index() > 0)
        self.report = writers.report_progress(num_steps, self.writer, every_secs=30)
        self.log_every, self.batch_size = log_every, batch_size
        self.pending: list[tuple[int, Any]] = []
        self.last: dict[str, float] = {}
        self.last_saved: int | None = None  # set by the checkpoint hook, for the non-finite message
        self._timer = (time.perf_counter(), start)

    def due(self, info: StepInfo) -> bool:
        if info.metrics is not None:
            self.pending.append((info.step, info.metrics))
            self.report(info.step)
        return info.step % self.log_every == 0 or info.last or info.preempted

    def __call__(self, info: StepInfo) -> None:
        self.flush(info.step)

    def flush(self, step: int) -> None:
        """Write the pending steps' mean (after checking every one is finite)."""
        if not self.pending:
            return
        for s, m in jax.device_get(self.pending):
            check_finite(s, m, self.last_saved)
        self.last = {k: float(np.mean([np.asarray(m[k]) for _, m in self.pending])) for k in self.pending[-1][1]}
        started, first = self._timer
        self.last["images_per_second"] = (step - first) * self.batch_size / max(time.perf_counter() - started, 1e-9)
        self.writer.write_scalars(step, self.last)
        self.pending.clear()
        self.restart_timer(step)
        if self.events:
            self.writer.flush()
            self.events.sync()

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        self.writer.write_scalars(step, scalars)
        self.last.update(scalars)

    def restart_timer(self, step: int) -> None:
        """Throughput counts training only: hooks that take long (FID) restart it after they run."""
        self._timer = (time.perf_counter(), step)

    def close(self) -> None:
        self.writer.flush()
        if self.events:
            self.events.sync(force=True)
            self.events.remove_local()


class EventSync:
    """TensorBoard events of a run whose workdir is remote (gs://): TensorFlow's gfile, behind clu's
    writer, has no way to reach a GCS emulator (and every test runs against one), so events are written
    to a local folder and uploaded into the workdir, at most every `every_secs` and when the run ends.
    A run killed between uploads loses at most the last `every_secs` of events, never a checkpoint."""

    def __init__(self, workdir: str, every_secs: float = 60.0):
        digest = hashlib.sha1(workdir.encode()).hexdigest()[:12]
        self.local = os.path.join(tempfile.gettempdir(), f"lsync_jax_events_{digest}_{os.getpid()}")
        self.workdir, self.every = workdir, every_secs
        self.uploaded: dict[str, float] = {}
        self._last = time.monotonic()

    def sync(self, force: bool = False) -> None:
        if force or time.monotonic() - self._last >= self.every:
            storage.copy_tree_up(self.local, self.workdir, only_newer_than=self.uploaded)
            self._last = time.monotonic()

    def remove_local(self) -> None:
        """After the last upload: the local copy is not needed (a resumed run writes a new event file)."""
        shutil.rmtree(self.local, ignore_errors=True)


class CheckpointHook:
    phase = "checkpoints"
    """Saves every `every` steps, at the phase's last step and on preemption (forced, at once); never a
    state whose metrics were not finite (the metrics are flushed first)."""

    def __init__(self, checkpointer: Any, meta: Mapping[str, Any], data_iterator: Any, every: int,
                 metrics: MetricsHook, last_saved: int | None):
        self.checkpointer, self.meta, self.data_iterator, self.every = checkpointer, meta, data_iterator, every
        self.metrics = metrics
        self.metrics.last_saved = self.last_saved = last_saved

    def due(self, info: StepInfo) -> bool:
        self.checkpointer.poll()  # a save that failed in the background ends the run now, not at the next save
        return info.trained and (info.step % self.every == 0 or info.last or info.preempted)

    def __call__(self, info: StepInfo) -> None:
        self.save(info, force=info.preempted)

    def save(self, info: StepInfo, force: bool = False) -> None:
        """Save `info.state` unless this step is saved already (or it is not finite: an error)."""
        if self.last_saved == info.step:
            return
        self.metrics.flush(info.step)
        check_state_finite(info.step, info.state, self.last_saved)
        self.checkpointer.save(info.step, info.state, self.meta, self.data_iterator, force=force)
        self.metrics.last_saved = self.last_saved = info.step

    def close(self) -> None:
        self.checkpointer.close()  # waits for asynchronous saves: an error must not cut the last good one short


class SampleGridHook:
    phase = "sample grids"
    """A grid of EMA samples every `every` steps (0: none) and at the end of the run, as PNG
    (WORKDIR/samples/step_*.png) and TensorBoard image. Video samples (N, F, H, W, C) are one clip per
    row, its frames along the row (`columns` = the frame count)."""

    def __init__(self, sample: Callable[[Any], np.ndarray], every: int, workdir: str, columns: int,
                 metrics: MetricsHook):
        self.sample, self.every, self.workdir, self.columns, self.metrics = sample, every, workdir, columns, metrics

    def due(self, info: StepInfo) -> bool:
        periodic = bool(self.every) and info.step % self.every == 0
        return info.trained and (periodic or (info.finished and not info.preempted))

    def __call__(self, info: StepInfo) -> None:
        images = to_uint8(gather_to_host(self.sample(info.state.ema_params)))
        if images.ndim == 5:  # clips: frames along each row
            images = images.reshape(-1, *images.shape[2:])
        grid = make_grid(images, columns=self.columns)
        if jax.process_index() == 0:
            save_png(storage.join(self.workdir, "samples", f"step_{info.step:07d}.png"), grid)
        self.metrics.writer.write_images(info.step, {"samples_ema": grid[None].astype(np.float32) / 255.0})
        self.metrics.restart_timer(info.step)

    def close(self) -> None:
        pass


class EvaluationHook:
    phase = "FID: Inception features and metrics"
    """An evaluator (e.g. `lsync_jax.eval.fid.TrainingFID`: `due(step, num_steps)`, `done(step)`,
    `__call__(step, ema_params) -> scalars`) run periodically and once when the run finishes (also
    when a resumed run finds training done without it), never when preempted. The state is saved
    first: an evaluation can take minutes and can fail, never at the cost of training."""

    def __init__(self, evaluator: Any, run: Any):
        self.evaluator, self.run = evaluator, run

    def due(self, info: StepInfo) -> bool:
        if info.preempted:
            return False
        periodic = info.trained and self.evaluator.due(info.step, self.run.num_steps)
        return periodic or (info.finished and not self.evaluator.done(info.step))

    def __call__(self, info: StepInfo) -> Mapping[str, float]:
        self.run.checkpoints.save(info)
        scalars = self.evaluator(info.step, info.state.ema_params)
        self.run.metrics.restart_timer(info.step)  # evaluation time is not training throughput
        return scalars

    def close(self) -> None:
        pass


def _preemption_service() -> bool:
    """Whether JAX's preemption sync manager runs (jax.distributed initialised with the service on)."""
    try:
        from jax._src import distributed

        return distributed.global_state.preemption_sync_manager is not None
    except (ImportError, AttributeError):
        return False


class Preemption:
    """Turns SIGTERM on any one process into a decision every process takes at the same step, so all
    save together.

    Several processes (jax.distributed with its preemption service, JAX's default): JAX's own
    SIGTERM handler tells the coordination service, which picks the step all processes stop at
    (`multihost_utils.reached_preemption_sync_point`, asked every step: a local flag read, well under
    a microsecond; the agreement runs in the background). One process: the step after the signal.
    Without the preemption service, processes exchange their flags at `log_every` boundaries."""

    def __init__(self, log_every: int):
        self.log_every = log_every
        self.requested = False
        self._previous = None
        self.service = jax.process_count() > 1 and _preemption_service()

    def __enter__(self) -> "Preemption":
        if self.service:
            return self  # JAX's handler is installed: a Python one would replace it
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, no preemption saves
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        logging.warning("SIGTERM: saving a checkpoint before exiting")
        self.requested = True

    def agreed(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        if self.service:
            if multihost_utils.reached_preemption_sync_point(step):
                logging.warning("SIGTERM on a process: every process saves at step %d before exiting", step)
                return True
            return False
        if step % self.log_every:
            return False
        return bool(np.any(multihost_utils.process_allgather(np.array([self.requested]))))

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
