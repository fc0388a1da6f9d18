"""Orbax checkpoints of a training run: the train state, the data iterator and the run's meta.

Each checkpoint holds three items: 'state' (the sharded TrainState, written by every process
without gathering), 'data' (the data position: one global batch count, `DATA_FORMAT`) and 'meta' (what
`lsync_jax.workdir.describe` records, checked before a resume so that an incompatible workdir
fails with a clear error instead of a shape error deep in a compile). Saves are asynchronous; the
preservation policy keeps the latest `max_to_keep` (at least 1) plus every `keep_every`-th step.

Elastic resume: batches are global (`lsync_jax.data.pipeline`), so the data position is one number,
the global batches consumed, written once (not one grain iterator state per process), and the state
is restored straight into the new run's mesh. A run checkpointed by N processes resumes on M.
Checkpoints from before (grain's `process_<i>-of-<n>.json` files, which all hold that same number)
resume too, on any process count.
Reading a run's parameters without training (sampling, analysis, init_from) is `lsync_jax.workdir`.

A save that fails ends the run at once with one `CheckpointSaveError` naming the directory and the
root cause: the step directory is created before `save` returns (not in the background, where a
failure left the writers waiting 300 s for it), and a background write's error is raised at the
next step (`poll`, one process), the next save or `close`. After a failure `close` does not wait on
the broken save again. In the launch scripts Orbax's own reports of it (thousands of lines after a
disk-full save) are filtered, so the error is the last thing printed (`quiet_failed_saves`); the
library itself installs no hook or filter in its host process.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from absl import logging

from lsync_jax import storage
from lsync_jax.storage import read_json
from lsync_jax.workdir import ITEMS, DamagedCheckpointError, first_line, migrate_meta

# What the 'data' item holds: {"format": DATA_FORMAT, "next_batch": global batches consumed}.
DATA_FORMAT = "lsync_jax global batch position v1"


def data_position(data_iterator: Any) -> dict[str, Any]:
    """The 'data' item of a checkpoint: the global batch count of the iterator (the same on every
    process, since each walks the same global batches), written by one process."""
    return {"format": DATA_FORMAT, "next_batch": int(data_iterator.get_state()["next_index"]),
            "process_count": jax.process_count()}


def read_data_position(step_path: str) -> int:
    """The global batch a run resumed from checkpoint `step_path` continues with: the 'data' item this
    module writes, or grain's per-process files of older checkpoints (they all hold the same global
    count; disagreeing ones are damage). DamagedCheckpointError naming the file otherwise."""
    data = storage.join(step_path, "data")
    if not storage.isdir(data):
        raise DamagedCheckpointError(step_path, "it has no data position (data/); resuming would replay the data "
                                     "from the start")
    names = storage.listdir(data)
    try:
        if "metadata" in names:
            record = read_json(storage.join(data, "metadata"), "the data position")
            if not isinstance(record, dict) or not isinstance(record.get("next_batch"), int):
                raise ValueError(f"{storage.join(data, 'metadata')} holds no next_batch")
            return int(record["next_batch"])
        per_process = [n for n in names if n.startswith("process_") and n.endswith(".json")]
        positions = {n: read_json(storage.join(data, n), "the data position") for n in per_process}
        counts = {int(state["next_index"]) for state in positions.values()}
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise DamagedCheckpointError(step_path, f"its data position is unreadable ({first_line(e)})") from None
    if len(counts) != 1:
        raise DamagedCheckpointError(step_path, f"its data position is missing or inconsistent ({sorted(names)})")
    return counts.pop()


class CheckpointSaveError(OSError):
    """Saving a checkpoint failed; the message names the directory and the first error."""


# -- Orbax's noise around a failed save ---------------------------------------------------------------
# A failed save is raised once, as CheckpointSaveError naming the directory and the root cause. Orbax
# and tensorstore also report it, from every thread and task the save ran in, and again when the
# process exits and collects them: a disk-full save printed thousands of lines after the real error.
# These narrow filters drop exactly those reports; every other message passes. They act on the whole
# process (other libraries' loggers, the unraisable hook, warnings), so only the launch scripts install
# them (`quiet_failed_saves`, from `lsync_jax.cli.run`); a program of its own may call it too.

# What Orbax logs, with a traceback, from each thread a failed save runs in, before it raises the error.
_ORBAX_SAVE_ERRORS = ("background save thread", "Save Finalize thread", "Checkpointer failed",
                      "Failed to write metadata", "_SignalingThread.run() raised")
_SAVE_FAILED: list[str] = []  # the directories whose save failed in this process
_QUIET: list[bool] = []  # set by `quiet_failed_saves`: this process asked for the filters


class _OrbaxSaveErrors:
    """For absl's logger: Orbax's error records of a failed save."""

    def filter(self, record: Any) -> bool:
        return not (record.levelno >= 40 and "orbax" in record.pathname  # 40: the standard library's ERROR
                    and any(s in str(record.msg) for s in _ORBAX_SAVE_ERRORS))


class _OrbaxTasks:
    """For asyncio's logger: "Task exception was never retrieved" of Orbax's tasks."""

    def filter(self, record: Any) -> bool:
        return not ("never retrieved" in str(record.msg) and "orbax" in record.getMessage())


def _quiet_logger(name: str, log_filter: Any) -> None:
    import logging as std_logging  # the standard library's, under absl: where absl's and asyncio's records pass

    logger = std_logging.getLogger(name)
    if not any(isinstance(f, type(log_filter)) for f in logger.filters):
        logger.addFilter(log_filter)


def _orbax_noise(unraisable: Any) -> bool:
    """Tensorstore finishing a failed save's writes calls back into the event loop Orbax ran it on, which
    the failure closed: an unraisable 'RuntimeError: Event loop is closed' per write, from no object.
    Once a save has failed, its coroutines collected at exit raise unraisables from Orbax's code too."""
    value = unraisable.exc_value
    if unraisable.object is None and isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
        return True
    frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback is not None else []
    return bool(_SAVE_FAILED) and any(os.sep + "orbax" + os.sep in frame.filename for frame in frames)


def quiet_failed_saves() -> None:
    """For a launch script's process (`lsync_jax.cli.run`): a failed save's error is the last thing
    printed. Installs the absl logger's filter and the unraisable hook now, and after a failed save the
    warnings and asyncio filters for its leftovers. Process-wide, so never called by the library."""
    if not _QUIET:
        _QUIET.append(True)
    _quiet_logger("absl", _OrbaxSaveErrors())
    previous = sys.unraisablehook
    if getattr(previous, "drops_orbax_noise", False):
        return

    def hook(unraisable: Any) -> None:
        if not _orbax_noise(unraisable):
            previous(unraisable)

    hook.drops_orbax_noise = True
    sys.unraisablehook = hook


def _after_failed_save(directory: str) -> None:
    """From now on the failed save's leftovers, collected when the process exits, are noise as well (in a
    process that asked for `quiet_failed_saves`)."""
    _SAVE_FAILED.append(directory)
    if not _QUIET:
        return
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
    _quiet_logger("asyncio", _OrbaxTasks())


class Checkpointer:
    """CheckpointManager over `directory` with the run's save/restore conventions."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, keep_every: int | None = None,
                 async_save: bool = True, read_only: bool = False):
        # A keep policy below one checkpoint deletes what was saved (Orbax keeps none): refused here too,
        # not only by the config check (config.train.keep_checkpoints / keep_every).
        if int(max_to_keep) < 1:
            raise ValueError(f"max_to_keep (config.train.keep_checkpoints) must be >= 1, got {max_to_keep}")
        if keep_every is not None and int(keep_every) < 1:
            raise ValueError(f"keep_every (config.train.keep_every) must be >= 1 or None, got {keep_every}")
        self.directory = storage.absolute(directory)
        self.failed: str | None = None  # the first save error: later saves and close() do not wait on it again
        self.pending: int | None = None  # the step whose save may still run in the background
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, keep_period=keep_every, enable_async_checkpointing=async_save,
            create=not read_only, read_only=read_only,
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def reload(self) -> None:
        """Forget what was listed: after a damaged step was set aside."""
        self.manager.reload()

    def _fail(self, step: int | str, error: BaseException) -> CheckpointSaveError:
        logging.debug("checkpoint save error", exc_info=error)
        _after_failed_save(self.directory)
        self.failed = (f"saving checkpoint {step} into {self.directory} failed: {first_line(error)}. The "
                       "checkpoints saved before it are kept.")
        return CheckpointSaveError(self.failed)

    def save(self, step: int, state: Any, meta: Mapping[str, Any], data_iterator: Any = None,
             force: bool = False) -> bool:
        """Save `step` (asynchronously); raises CheckpointSaveError if this save, or the previous one in
        the background, failed."""
        if self.failed:
            raise CheckpointSaveError(self.failed)
        self.wait()  # the previous save's background error, now (Orbax would wait for it anyway)
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(dict(meta))}
        if data_iterator is not None:
            items["data"] = ocp.args.JsonSave(data_position(data_iterator))
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:  # noqa: BLE001 - any failure to write ends the run with one line naming the path
            raise self._fail(step, e) from None
        self.pending = step if saved else self.pending
        return saved

    def poll(self) -> None:
        """Raise CheckpointSaveError now if the asynchronous save in flight has already failed, without
        waiting for one still running. One process only: with several, the error is raised at the next
        save or at close, where every process meets it at the same step."""
        if self.pending is not None and jax.process_count() == 1 and not self.manager.is_saving_in_progress():
            self.wait()

    def read_meta(self, step: int) -> dict[str, Any]:
        """Step `step`'s meta in today's record schema (`workdir.migrate_meta`)."""
        return migrate_meta(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def restore(self, step: int, abstract_state: Any, data_iterator: Any = None) -> Any:
        """Restore 'state' into the layout of `abstract_state` (ShapeDtypeStructs with shardings) and,
        if given, the data iterator in place."""
        position = None
        if data_iterator is not None:  # read (and checked) before the state: it is the cheap part
            position = read_data_position(storage.join(self.directory, str(step)))
        state = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        if data_iterator is not None:
            data_iterator.set_state({"next_index": position})
        return state["state"]

    def wait(self) -> None:
        """Wait for the asynchronous save in flight; CheckpointSaveError if it failed."""
        if self.failed:
            raise CheckpointSaveError(self.failed)
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._fail(self.pending if self.pending is not None else "(in the background)", e) from None
        self.pending = None

    def close(self) -> None:
        """Wait for the save in flight (an error must not cut the last good one short) and close. After a
        failed save (raised once already) the manager is left to the process's exit instead of waiting
        on the broken save again, which would only repeat the error."""
        if self.failed:
            return
        self.wait()
        self.manager.close()
