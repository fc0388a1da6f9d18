"""Periodic actions of the training loop, behind one interface.

After every step the loop hands each hook a `StepInfo`; a hook whose `due(info)` is true runs and
tells the loop what it did by returning an `Outcome` (scalars and images to log, whether it saved
the state, whether it paused training). No hook reaches into another: what a hook needs before it
runs it declares (`Hook.needs`: the metrics checked finite, the state saved, the workdir's hold
confirmed) and the loop provides it. The engine's own hooks are here: checkpoints and sample
grids, with `Metrics` (the writer every outcome goes to, owned by the loop). In-training evaluators
(`Evaluator`, e.g. FID from `lsync_jax.eval.fid`) run through `EvaluationHook`; the recipes register
them by name. Preemption is not a hook: the loop decides it once per step (`Preemption.agreed`) and
every hook reads it from `StepInfo.preempted`; after saving, the loop raises `Preempted`, which
launch/train.py turns into `PREEMPTED_EXIT_CODE`.
"""

from __future__ import annotations

import dataclasses
import enum
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
    last_saved: int | None = None  # the newest step in a checkpoint (the resumed one, or a save of this run)
    save_wanted: bool = False  # a hook due at this step needs the state saved first (Needs.SAVED_STATE)


class Needs(enum.Flag):
    """What a hook needs the loop to do before it runs."""

    NOTHING = 0
    FINITE_METRICS = enum.auto()  # every pending step's metrics written and checked finite (saves, evaluations)
    SAVED_STATE = enum.auto()  # this step's state in a checkpoint (an evaluation can fail: never at training's cost)
    HOLD = enum.auto()  # the workdir still this run's (`Run.hold`): it writes there (checkpoints, grids, evaluations)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a hook did, for the loop: scalars and images to log, a save, a pause of training (a hook that
    takes long: the throughput timer restarts after it)."""

    scalars: Mapping[str, float] = dataclasses.field(default_factory=dict)
    images: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)  # [N, H, W, C] in [0, 1]
    saved: bool = False
    paused_training: bool = False


class Hook(Protocol):
    needs: Needs
    phase: str | None  # a hook that takes long is a phase of its own in the time report (host.PHASES)

    def due(self, info: StepInfo) -> bool: ...

    def __call__(self, info: StepInfo) -> Outcome | None: ...

    def close(self) -> None: ...


class Evaluator(Protocol):
    """An in-training evaluation (registered by name in `lsync_jax.recipes.evaluators`)."""

    phase: str  # its name in the run's time report (host.PHASES)

    def due(self, step: int, num_steps: int) -> bool: ...  # a periodic evaluation inside the run

    def done(self, step: int) -> bool: ...  # whether step's evaluation is written (a resume's final one)

    def __call__(self, step: int, ema_params: Any) -> Mapping[str, float]: ...


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


class Metrics:
    """The loop's log: collects every step's metrics, and every `log_every` steps (and whenever a hook
    needs them checked: `Needs.FINITE_METRICS`) checks they are finite and writes their mean and the
    throughput (TensorBoard events + console lines, `writers.create_default_writer`); a progress report
    gives steps/s and ETA. Hooks' outcomes (scalars, images) are written through `write`."""

    def __init__(self, workdir: str, num_steps: int, log_every: int, batch_size: int, start: int):
        self.events = EventSync(workdir) if storage.is_remote(workdir) and jax.process_index() == 0 else None
        logdir = self.events.local if self.events else workdir
        self.writer = writers.create_default_writer(logdir, just_logging=jax.process_index() > 0)
        self.report = writers.report_progress(num_steps, self.writer, every_secs=30)
        self.log_every, self.batch_size = log_every, batch_size
        self.pending: list[tuple[int, Any]] = []
        self.last: dict[str, float] = {}
        self._timer = (time.perf_counter(), start)

    def collect(self, info: StepInfo) -> None:
        """Keep a step's metrics (device values: nothing waits for them here)."""
        if info.metrics is not None:
            self.pending.append((info.step, info.metrics))
            self.report(info.step)

    def due(self, info: StepInfo) -> bool:
        return info.step % self.log_every == 0 or info.last or info.preempted

    def flush(self, step: int, last_saved: int | None) -> None:
        """Write the pending steps' mean, after checking every one is finite (`last_saved` is named in the
        error: the checkpoint that is good)."""
        if not self.pending:
            return
        for s, m in jax.device_get(self.pending):
            check_finite(s, m, last_saved)
        self.last = {k: float(np.mean([np.asarray(m[k]) for _, m in self.pending])) for k in self.pending[-1][1]}
        started, first = self._timer
        self.last["images_per_second"] = (step - first) * self.batch_size / max(time.perf_counter() - started, 1e-9)
        self.writer.write_scalars(step, self.last)
        self.pending.clear()
        self._timer = (time.perf_counter(), step)
        if self.events:
            self.writer.flush()
            self.events.sync()

    def write(self, step: int, outcome: Outcome) -> None:
        """A hook's outcome: its scalars and images are logged; after a pause (sample grids, FID) the
        throughput counts training only from here."""
        if outcome.scalars:
            self.writer.write_scalars(step, outcome.scalars)
            self.last.update(outcome.scalars)
        if outcome.images:
            self.writer.write_images(step, outcome.images)
        if outcome.paused_training:
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
    """Saves every `every` steps, at the phase's last step, on preemption (forced, at once) and when a
    hook due at this step needs the state saved (`StepInfo.save_wanted`); never a state whose metrics
    were not finite (it needs them checked first) or whose parameters are not."""

    needs = Needs.FINITE_METRICS | Needs.HOLD
    phase = "checkpoints"

    def __init__(self, checkpointer: Any, meta: Mapping[str, Any], data_iterator: Any, every: int):
        self.checkpointer, self.meta, self.data_iterator, self.every = checkpointer, meta, data_iterator, every

    def due(self, info: StepInfo) -> bool:
        self.checkpointer.poll()  # a save that failed in the background ends the run now, not at the next save
        wanted = info.step % self.every == 0 or info.last or info.preempted or info.save_wanted
        return info.trained and wanted and info.last_saved != info.step

    def __call__(self, info: StepInfo) -> Outcome:
        check_state_finite(info.step, info.state, info.last_saved)
        saved = self.checkpointer.save(info.step, info.state, self.meta, self.data_iterator, force=info.preempted)
        return Outcome(saved=bool(saved))

    def close(self) -> None:
        self.checkpointer.close()  # waits for asynchronous saves: an error must not cut the last good one short


class SampleGridHook:
    """A grid of EMA samples every `every` steps (0: none) and at the end of the run, as PNG
    (WORKDIR/samples/step_*.png) and TensorBoard image. Video samples (N, F, H, W, C) are one clip per
    row, its frames along the row (`columns` = the frame count)."""

    needs = Needs.HOLD
    phase = "sample grids"

    def __init__(self, sample: Callable[[Any], np.ndarray], every: int, workdir: str, columns: int):
        self.sample, self.every, self.workdir, self.columns = sample, every, workdir, columns

    def due(self, info: StepInfo) -> bool:
        periodic = bool(self.every) and info.step % self.every == 0
        return info.trained and (periodic or (info.finished and not info.preempted))

    def __call__(self, info: StepInfo) -> Outcome:
        images = to_uint8(gather_to_host(self.sample(info.state.ema_params)))
        if images.ndim == 5:  # clips: frames along each row
            images = images.reshape(-1, *images.shape[2:])
        grid = make_grid(images, columns=self.columns)
        if jax.process_index() == 0:
            save_png(storage.join(self.workdir, "samples", f"step_{info.step:07d}.png"), grid)
        return Outcome(images={"samples_ema": grid[None].astype(np.float32) / 255.0}, paused_training=True)

    def close(self) -> None:
        pass


class EvaluationHook:
    """An `Evaluator` run periodically and once when the run finishes (also when a resumed run finds
    training done without it), never when preempted. It needs the state saved first: an evaluation can
    take minutes and can fail, never at the cost of training."""

    needs = Needs.FINITE_METRICS | Needs.SAVED_STATE | Needs.HOLD

    def __init__(self, evaluator: Evaluator, num_steps: int):
        self.evaluator, self.num_steps, self.phase = evaluator, num_steps, evaluator.phase

    def due(self, info: StepInfo) -> bool:
        if info.preempted:
            return False
        periodic = info.trained and self.evaluator.due(info.step, self.num_steps)
        return periodic or (info.finished and not self.evaluator.done(info.step))

    def __call__(self, info: StepInfo) -> Outcome:
        return Outcome(scalars=self.evaluator(info.step, info.state.ema_params), paused_training=True)

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
