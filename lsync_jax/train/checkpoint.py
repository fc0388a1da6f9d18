"""Orbax checkpoints of the train state, the data iterator and a description of the run.

Each checkpoint holds three items: 'state' (the sharded TrainState, written by every process
without gathering), 'data' (the grain iterator's position, per process) and 'meta' (the model
config and parameter shapes, checked before a resume so that an incompatible workdir fails with a
clear error instead of a shape error deep in a compile). Saves are asynchronous; the preservation
policy keeps the latest `max_to_keep` plus every `keep_every`-th step.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import grain.python as grain
import jax
import orbax.checkpoint as ocp

from lsync_jax.train.sharding import path_name


def param_shapes(params: Any) -> dict[str, list[int]]:
    """{'/'-joined parameter path: shape} of a parameter tree (arrays or ShapeDtypeStructs)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {path_name(path): list(x.shape) for path, x in flat}


def _plain(value: Any) -> Any:
    return value if isinstance(value, (int, float, bool, str, type(None))) else str(value)


def describe(model_config: Mapping[str, Any], params: Any, state: Any = None,
             objective: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The 'meta' item: what must match for a checkpoint to be resumed into this run: the model, the
    parameter shapes, the shapes of the whole train state (optimizer structure, PRNG key) and the
    objective (resuming a LayerSync run as a baseline, say, is refused)."""
    meta = {"model": {k: _plain(v) for k, v in sorted(model_config.items())}, "param_shapes": param_shapes(params)}
    if state is not None:
        meta["state_shapes"] = param_shapes(state)
    if objective is not None:
        meta["objective"] = _plain(repr(objective))
    return meta


def _model_default(name: Any, key: str) -> Any:
    """The value model `name` has for field `key` when no override sets it (None if unknown)."""
    try:
        from lsync_jax.models import get_model

        return _plain(getattr(get_model(str(name)), key))
    except (ValueError, AttributeError, TypeError):
        return None


def check_compatible(saved: Mapping[str, Any], wanted: Mapping[str, Any], where: str) -> None:
    """Raise ValueError naming what differs between a checkpoint's meta and this run's."""
    problems = []
    saved_model, wanted_model = saved.get("model", {}), wanted["model"]
    for key in sorted(set(saved_model) | set(wanted_model)):
        a, b = saved_model.get(key), wanted_model.get(key)
        if a != b and (key not in saved_model or key not in wanted_model):
            # a field one side's config does not list has the model's default (configs gain switches)
            default = _model_default(saved_model.get("name") or wanted_model.get("name"), key)
            a, b = (default if key not in saved_model else a), (default if key not in wanted_model else b)
        if a != b and key not in ("dtype", "attention_impl", "remat"):  # compute options may change
            problems.append(f"model.{key}: checkpoint {a!r}, config {b!r}")
    shapes_a, shapes_b = saved.get("param_shapes", {}), wanted["param_shapes"]
    for key in sorted(set(shapes_a) | set(shapes_b)):
        if shapes_a.get(key) != shapes_b.get(key):
            problems.append(f"param {key}: checkpoint {shapes_a.get(key)}, config {shapes_b.get(key)}")
    for key in ("state_shapes", "objective"):
        if key in saved and key in wanted and saved[key] != wanted[key]:
            if key == "objective":
                problems.append(f"objective: checkpoint {saved[key]}, config {wanted[key]}")
            else:
                diff = sorted(k for k in set(saved[key]) | set(wanted[key]) if saved[key].get(k) != wanted[key].get(k))
                problems.append(f"train state (optimizer settings or PRNG implementation) differs at {diff[:3]}")
    if problems:
        shown = "; ".join(problems[:8]) + ("; ..." if len(problems) > 8 else "")
        raise ValueError(f"the checkpoint in {where} is from an incompatible model ({shown}). Use another "
                         "--workdir, or start from its weights where they fit with --config.train.init_from.")


class Checkpointer:
    """CheckpointManager over `directory` with the run's save/restore conventions."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, keep_every: int | None = None,
                 async_save: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, keep_period=keep_every,
                                               enable_async_checkpointing=async_save, create=not read_only,
                                               read_only=read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

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


def latest_step(checkpoint_dir: str) -> int | None:
    """The latest step saved in `checkpoint_dir` (None: no directory or no checkpoint)."""
    if not os.path.isdir(checkpoint_dir):
        return None
    checkpointer = Checkpointer(checkpoint_dir, read_only=True)
    try:
        return checkpointer.latest_step()
    finally:
        checkpointer.close()


def _step_dir(path: str) -> str:
    """A checkpoint step directory from a workdir, its checkpoints/ directory or a step directory."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"train.init_from={path!r} does not exist")
    if os.path.isdir(os.path.join(path, "state")):
        return path
    ckpt_dir = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True),
                                    item_names=("state", "data", "meta"))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"train.init_from={path!r} holds no checkpoint")
    return os.path.join(ckpt_dir, str(step))


def restore_matching(path: str, params: Any, include: str) -> tuple[Any, list[str]]:
    """`params` with every parameter whose path matches the regex `include` and exists in another
    run's checkpoint (a workdir, its checkpoints/ or a step dir) replaced by the saved one, for
    --config.train.init_from with --config.train.init_include (e.g. ERW's hand-off from a shallower
    model: its blocks 1..k into a deeper one). A selected parameter of another shape there is an
    error; the others keep `params`' values. Returns (params, the carried paths)."""
    import re

    import numpy as np

    pattern = re.compile(include)
    step_dir = _step_dir(path)
    with open(os.path.join(step_dir, "meta", "metadata")) as f:
        saved_shapes = json.load(f).get("param_shapes", {})
    wanted = {name: shape for name, shape in param_shapes(params).items()
              if pattern.search(name) and name in saved_shapes}
    if not wanted:
        raise ValueError(f"train.init_include={include!r} selects none of the parameters that the model and "
                         f"train.init_from={path!r} have in common")
    problems = [f"{n}: checkpoint {saved_shapes[n]}, model {s}" for n, s in wanted.items() if saved_shapes[n] != s]
    if problems:
        raise ValueError(f"train.init_from={path!r} cannot give what train.init_include={include!r} selects: "
                         + "; ".join(problems[:6]))
    tree: dict[str, Any] = {}
    for name in wanted:  # restore only the selected arrays, on the host
        *parents, leaf = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = jax.ShapeDtypeStruct(tuple(wanted[name]), np.float32)
    target = {"params": tree}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.join(step_dir, "state"),
        args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))["params"]
    flat = {}
    for key_path, value in jax.tree_util.tree_flatten_with_path(restored)[0]:
        flat[path_name(key_path)] = value

    def pick(key_path, current):
        name = path_name(key_path)
        if name not in flat:
            return current
        return jax.device_put(np.asarray(flat[name], current.dtype), current.sharding)

    return jax.tree_util.tree_map_with_path(pick, params), sorted(flat)


def restore_params(path: str, abstract_params: Any) -> tuple[Any, Any]:
    """(params, ema_params) from another run's checkpoint (a workdir's checkpoints/ dir or one step
    dir), for --config.train.init_from; shapes must match this run's model."""
    step_dir = _step_dir(path)
    meta_file = os.path.join(step_dir, "meta", "metadata")
    if os.path.exists(meta_file):
        with open(meta_file) as f:
            saved_shapes = json.load(f).get("param_shapes", {})
        check_compatible({"model": {}, "param_shapes": saved_shapes},
                         {"model": {}, "param_shapes": param_shapes(abstract_params)}, path)
    # Only params and EMA params, restored straight into this run's layout (any device count).
    target = {"params": abstract_params, "ema_params": abstract_params}
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.join(step_dir, "state"),
        args=ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                    partial_restore=True))
    return restored["params"], restored["ema_params"]
