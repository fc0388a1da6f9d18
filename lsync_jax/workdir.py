"""Reading a run's workdir: its checkpoints' steps and meta, and the parameters of one step.

Below both training and evaluation, so that sampling, FID and block analysis load a run without
the training loop. A checkpoint's 'meta' item records what must match to resume or load it (the
model, the parameter and state shapes, the objective): `describe` writes it, `check_compatible`
compares it. Writing checkpoints (with the data iterator) is `lsync_jax.train.checkpoint`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from lsync_jax.builders import build_model, mesh_rules, model_fields
from lsync_jax.models import get_model
from lsync_jax.sharding import path_name, tree_shardings, with_shardings

ITEMS = ("state", "data", "meta")  # the items of every checkpoint step


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


def checkpoint_dir(workdir: str) -> str:
    """Where a run keeps its checkpoints."""
    return os.path.join(workdir, "checkpoints")


def checkpoint_manager(directory: str, *, read_only: bool = True, **options: Any) -> ocp.CheckpointManager:
    """Orbax's manager over a run's checkpoints/ directory, with the run's item names."""
    return ocp.CheckpointManager(os.path.abspath(directory),
                                 options=ocp.CheckpointManagerOptions(read_only=read_only, create=not read_only,
                                                                      **options),
                                 item_names=ITEMS)


def read_meta(checkpoint_dir: str, step: int) -> dict[str, Any]:
    """The 'meta' item of checkpoint `step` in `checkpoint_dir`."""
    manager = checkpoint_manager(checkpoint_dir)
    try:
        return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    finally:
        manager.close()


def latest_step(checkpoint_dir: str) -> int | None:
    """The latest step saved in `checkpoint_dir` (None: no directory or no checkpoint)."""
    if not os.path.isdir(checkpoint_dir):
        return None
    manager = checkpoint_manager(checkpoint_dir)
    try:
        return manager.latest_step()
    finally:
        manager.close()


def step_dir(path: str) -> str:
    """A checkpoint step directory from a workdir, its checkpoints/ directory or a step directory."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"train.init_from={path!r} does not exist")
    if os.path.isdir(os.path.join(path, "state")):
        return path
    ckpt_dir = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    step = latest_step(ckpt_dir)
    if step is None:
        raise FileNotFoundError(f"train.init_from={path!r} holds no checkpoint")
    return os.path.join(ckpt_dir, str(step))


def restore_matching(path: str, params: Any, include: str) -> tuple[Any, list[str]]:
    """`params` with every parameter whose path matches the regex `include` and exists in another
    run's checkpoint (a workdir, its checkpoints/ or a step dir) replaced by the saved one, for
    --config.train.init_from with --config.train.init_include (e.g. ERW's hand-off from a shallower
    model: its blocks 1..k into a deeper one). A selected parameter of another shape there is an
    error; the others keep `params`' values. Returns (params, the carried paths)."""
    pattern = re.compile(include)
    directory = step_dir(path)
    with open(os.path.join(directory, "meta", "metadata")) as f:
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
        os.path.join(directory, "state"),
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
    directory = step_dir(path)
    meta_file = os.path.join(directory, "meta", "metadata")
    if os.path.exists(meta_file):
        with open(meta_file) as f:
            saved_shapes = json.load(f).get("param_shapes", {})
        check_compatible({"model": {}, "param_shapes": saved_shapes},
                         {"model": {}, "param_shapes": param_shapes(abstract_params)}, path)
    # Only params and EMA params, restored straight into this run's layout (any device count).
    target = {"params": abstract_params, "ema_params": abstract_params}
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.join(directory, "state"),
        args=ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                    partial_restore=True))
    return restored["params"], restored["ema_params"]


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of the checkpoints in `workdir`/checkpoints (FileNotFoundError naming the directory if none)."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    steps = []
    if os.path.isdir(ckpt_dir):
        manager = checkpoint_manager(ckpt_dir)
        steps = sorted(manager.all_steps())
        manager.close()
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}: train first (launch/train.py --workdir=...)")
    return steps


def load_params(config: Any, workdir: str, mesh, *, step: int | None = None,
                which: str = "ema") -> tuple[Any, Any, int]:
    """(model, params laid out over `mesh`, step) of checkpoint `step` (default: the latest) in
    `workdir`; `which` = 'ema' (the weights that sample) or 'params' (the online weights)."""
    if which not in ("ema", "params"):
        raise ValueError(f"which must be 'ema' or 'params', got {which!r}")
    model = build_model(config)
    steps = checkpoint_steps(workdir)
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint of step {step} in {os.path.join(workdir, 'checkpoints')}; it holds "
                                f"steps {steps}")
    ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
    abstract = abstract_params(config, model, mesh)
    saved = read_meta(ckpt_dir, step)
    check_compatible({k: saved[k] for k in ("model", "param_shapes") if k in saved},
                     describe(model_fields(config), abstract), ckpt_dir)
    params, ema = restore_params(os.path.join(workdir, "checkpoints", str(step)), abstract)
    return model, (ema if which == "ema" else params), step


def abstract_params(config: Any, model: Any, mesh) -> Any:
    """The model's parameter shapes, placed over `mesh` as in training (the rules match paths of the
    whole state, 'params/...'): the target a checkpoint's weights are restored into."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *model.init_inputs(1))["params"]
    return with_shardings(shapes, tree_shardings({"params": shapes}, mesh, mesh_rules(config))["params"])
