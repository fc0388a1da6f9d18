"""Orbax checkpoints of a training run: the train state, the data iterator and the run's meta.

Each checkpoint holds three items: 'state' (the sharded TrainState, written by every process
without gathering), 'data' (the grain iterator's position, per process) and 'meta' (what
`lsync_jax.workdir.describe` records, checked before a resume so that an incompatible workdir
fails with a clear error instead of a shape error deep in a compile). Saves are asynchronous; the
preservation policy keeps the latest `max_to_keep` plus every `keep_every`-th step. Reading a
run's parameters without training (sampling, analysis, init_from) is `lsync_jax.workdir`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import grain.python as grain
import orbax.checkpoint as ocp

from lsync_jax.workdir import ITEMS


class Checkpointer:
    """CheckpointManager over `directory` with the run's save/restore conventions."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, keep_every: int | None = None,
                 async_save: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, keep_period=keep_every,
                                               enable_async_checkpointing=async_save, create=not read_only,
                                               read_only=read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: Mapping[str, Any], data_iterator: Any = None,
             force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(dict(meta))}
        if data_iterator is not None:
            items["data"] = grain.PyGrainCheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def read_meta(self, step: int) -> dict[str, Any]:
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def restore(self, step: int, abstract_state: Any, data_iterator: Any = None) -> Any:
        """Restore 'state' into the layout of `abstract_state` (ShapeDtypeStructs with shardings) and,
        if given, the data iterator in place."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            if not os.path.isdir(os.path.join(self.directory, str(step), "data")):
                raise FileNotFoundError(f"checkpoint {step} in {self.directory} has no data-iterator position; "
                                        "resuming would replay the data from the start")
            items["data"] = grain.PyGrainCheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
