"""Reading a run's workdir: its checkpoints' steps and meta, and the parameters of one step.

Below both training and evaluation, so that sampling, FID and block analysis load a run without
the training loop. A checkpoint's 'meta' item records what must match to resume or load it (the
model, the parameter and state shapes, the objective, the transport, the data order): `describe`
writes it, `check_compatible` and `check_transport` compare it. Writing checkpoints (with the data
iterator) is `lsync_jax.train.checkpoint`.

A damaged checkpoint (a file of it missing, truncated or unreadable) is found by a cheap structural
check (`checkpoint_damage`: the expected files present, their metadata readable, no array read) and
by the restore itself failing; readers then fall back to the newest intact step with one warning
line (`newest_intact`). Only a training run sets a damaged step aside (`set_aside`, a rename), never
a reader, and nothing is ever deleted.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from lsync_jax import storage
from lsync_jax.builders import build_model, mesh_rules, model_fields
from lsync_jax.models import COMPUTE_OVERRIDES, get_model
from lsync_jax.sharding import path_name, tree_shardings, with_shardings
from lsync_jax.storage import read_json

ITEMS = ("state", "data", "meta")  # the items of every checkpoint step

# lsync-jax's one time convention (t = 0 noise, t = 1 data), recorded with the transport so that a
# checkpoint from another convention is never sampled as if it were ours.
TIME_CONVENTION = "t=0 noise, t=1 data"

# What a network's output means: compared when sampling, analysing or starting from a checkpoint.
# Resuming compares every transport key the checkpoint records (the loss weighting and time sampling too).
TRANSPORT_OF_WEIGHTS = ("path_type", "prediction", "time")


class DamagedCheckpointError(RuntimeError):
    """A checkpoint step is damaged (a file missing, truncated or unreadable, or its restore failing):
    one line naming the step directory (`path`) and what is wrong (`reason`)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"checkpoint {path} is damaged: {reason}")
        self.path, self.reason = path, reason


def param_shapes(params: Any) -> dict[str, list[int]]:
    """{'/'-joined parameter path: shape} of a parameter tree (arrays or ShapeDtypeStructs)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {path_name(path): list(x.shape) for path, x in flat}


def _plain(value: Any) -> Any:
    return value if isinstance(value, (int, float, bool, str, type(None))) else str(value)


def transport_record(transport: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint records of config.transport: every key, and the time convention."""
    return dict({k: _plain(v) for k, v in sorted(dict(transport).items())}, time=TIME_CONVENTION)


def describe(model_config: Mapping[str, Any], params: Any, state: Any = None,
             objective: Mapping[str, Any] | None = None, *, transport: Mapping[str, Any] | None = None,
             data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The 'meta' item: what must match for a checkpoint to be resumed into this run: the model, the
    parameter shapes, the shapes of the whole train state (optimizer structure, PRNG key), the
    objective (resuming a LayerSync run as a baseline, say, is refused), the transport the weights
    were trained with (`transport_record`) and what fixes the data order (`data`, training only)."""
    meta = {"model": {k: _plain(v) for k, v in sorted(model_config.items())}, "param_shapes": param_shapes(params)}
    if state is not None:
        meta["state_shapes"] = param_shapes(state)
    if objective is not None:
        meta["objective"] = _plain(repr(objective))
    if transport is not None:
        meta["transport"] = {k: _plain(v) for k, v in sorted(dict(transport).items())}
    if data is not None:
        meta["data"] = {k: _plain(v) for k, v in sorted(dict(data).items())}
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
        if a != b and key not in COMPUTE_OVERRIDES:  # compute options may change
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


def check_transport(saved: Mapping[str, Any], config: Any, where: str, *, doing: str,
                    keys: Sequence[str] | None = None, warn: bool = True) -> None:
    """Refuse (ValueError naming config.transport.<key>) a checkpoint whose recorded transport differs
    from `config`'s, unless config.train.allow_transport_change (then one warning line). Only what
    the checkpoint records is compared (older checkpoints record nothing; a converted one, what its
    file's training args said); `keys` limits the comparison (`TRANSPORT_OF_WEIGHTS` when sampling or
    starting from the weights; every recorded key when resuming). `doing` says what, for the message;
    `warn=False`: a check repeated after one that warned already."""
    recorded, wanted = saved.get("transport") or {}, transport_record(config.transport)
    differ = [k for k in sorted(recorded) if (keys is None or k in keys) and recorded[k] != wanted.get(k)]
    if not differ:
        return
    named = "; ".join(("time convention" if k == "time" else f"config.transport.{k}")
                      + f": checkpoint {recorded[k]!r}, config {wanted.get(k)!r}" for k in differ)
    if bool(config.train.allow_transport_change):
        if warn:
            logging.warning("%s with another transport than the checkpoint in %s was trained with (%s): allowed by "
                            "config.train.allow_transport_change", doing, where, named)
        return
    fix = " ".join(f"--config.transport.{k}={recorded[k]}" for k in differ if k != "time")
    raise ValueError(f"{doing}: the checkpoint in {where} was trained with another transport ({named}); its "
                     "weights would be used wrongly. " + (f"Use the checkpoint's: {fix}; or set " if fix else "Set ")
                     + "--config.train.allow_transport_change=True if the change is intended.")


def all_finite(tree: Any) -> bool:
    """Whether every floating-point leaf of `tree` is finite: one jitted reduction, on device."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return bool(_all_finite(leaves)) if leaves else True


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def checkpoint_dir(workdir: str) -> str:
    """Where a run keeps its checkpoints."""
    return storage.join(workdir, "checkpoints")


def checkpoint_manager(directory: str, *, read_only: bool = True, **options: Any) -> ocp.CheckpointManager:
    """Orbax's manager over a run's checkpoints/ directory, with the run's item names."""
    return ocp.CheckpointManager(storage.absolute(directory),
                                 options=ocp.CheckpointManagerOptions(read_only=read_only, create=not read_only,
                                                                      **options),
                                 item_names=ITEMS)


def checkpoint_damage(step_path: str) -> str | None:
    """What is wrong with checkpoint step directory `step_path` (None: structurally intact). Cheap: the
    files every checkpoint has are present and non-empty and their metadata parses; no array is read
    (a truncated array file is found by the restore itself)."""
    if not storage.isdir(step_path):
        return "the directory is missing"
    if storage.is_remote(step_path) and not storage.exists(storage.join(step_path, "commit_success.txt")):
        # GCS has no rename: Orbax writes a step in place and marks it complete last
        return "its save did not finish (no commit_success.txt)"
    items = ["meta", "state"]
    top = storage.join(step_path, "_CHECKPOINT_METADATA")
    if storage.exists(top):  # lists the items the checkpoint was saved with (data too, for training runs)
        try:
            items = sorted(set(items) | set(read_json(top).get("item_handlers") or {}))
        except (OSError, ValueError, AttributeError):
            return "_CHECKPOINT_METADATA is unreadable"
    for item in items:
        if not storage.isdir(storage.join(step_path, item)):
            return f"its item {item}/ is missing"
    for name in ("meta/metadata", "state/_METADATA"):
        try:
            if not isinstance(read_json(storage.join(step_path, name)), dict):
                return f"{name} is not a JSON object"
        except FileNotFoundError:
            return f"{name} is missing"
        except (OSError, ValueError) as e:
            return f"{name} is unreadable ({type(e).__name__})"
    if read_json(storage.join(step_path, "state", "_METADATA")).get("use_ocdbt", False):
        state = storage.join(step_path, "state")
        stores = [state] + [storage.join(state, d) for d in storage.listdir(state) if d.startswith("ocdbt.process_")]
        if not storage.exists(storage.join(state, "manifest.ocdbt")):
            return "state/manifest.ocdbt is missing"
        for store in stores:
            files = [storage.join(store, "manifest.ocdbt")] + [
                storage.join(store, "d", f) for f in (storage.listdir(storage.join(store, "d"))
                                                      if storage.isdir(storage.join(store, "d")) else ())]
            for file in files:
                if storage.exists(file) and storage.getsize(file) == 0:
                    return f"{os.path.relpath(file, step_path)} is empty"
    if "data" in items:
        data = storage.join(step_path, "data")
        files = [f for f in storage.listdir(data) if not f.startswith(".")]
        if not files:
            return "data/ (the data-iterator position) is empty"
        for name in files:
            try:
                if name.endswith(".json") or "process" in name or name == "metadata":
                    read_json(storage.join(data, name))
            except (OSError, ValueError):
                return f"data/{name} (the data-iterator position) is unreadable"
    return None


def is_damage(error: BaseException) -> bool:
    """Whether a restore's error says the checkpoint is damaged (not that memory or a device ran out)."""
    text = f"{type(error).__name__}: {error}"
    return not isinstance(error, MemoryError) and not any(
        s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM"))


def first_line(error: BaseException, limit: int = 300) -> str:
    """The root cause of an error (the end of its chain: what the file system or tensorstore said), as its
    type and first line, bounded: tensorstore's errors run to hundreds of lines."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    text = (str(error).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0]
    return f"{type(error).__name__}: {text[:limit]}" + ("..." if len(text) > limit else "")


def restore_or_damaged(step_path: str, restore: Callable[[], Any]) -> Any:
    """`restore()`, its errors (other than running out of memory) turned into one DamagedCheckpointError
    line naming `step_path`, without the restore's chained tracebacks."""
    try:
        return restore()
    except DamagedCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to read the files is damage, reported in one line
        if not is_damage(e):
            raise
        raise DamagedCheckpointError(step_path, f"its restore failed ({first_line(e)})") from None


def set_aside(step_path: str) -> str:
    """Rename a damaged checkpoint step to STEP.damaged-N beside it (never deleted; Orbax lists only
    numeric names, so it is ignored from now on); process 0 renames, every process waits for it.
    Returns the new path."""
    n = 1
    while storage.exists(f"{step_path}.damaged-{n}"):
        n += 1
    target = f"{step_path}.damaged-{n}"
    if jax.process_index() == 0:
        storage.move(step_path, target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"lsync_jax set aside {os.path.basename(step_path)}")
    return target


def newest_intact(candidates: Sequence[str], load: Callable[[str], Any], *, what: str,
                  explicit: bool = False) -> tuple[str, Any]:
    """(step directory, load(it)) for the first of `candidates` (newest first) that is intact: its
    structure checked (`checkpoint_damage`) and `load` not raising DamagedCheckpointError. Each damaged
    one is reported in one warning line and left in place (readers never move a run's files). With
    `explicit` (the user named this checkpoint) damage is an error instead of a fallback."""
    problems = []
    for directory in candidates:
        reason = checkpoint_damage(directory)
        if reason is None:
            try:
                return directory, load(directory)
            except DamagedCheckpointError as e:
                reason = e.reason
        if explicit:
            raise DamagedCheckpointError(directory, reason)
        problems.append(f"{os.path.basename(directory)}: {reason}")
        logging.warning("%s; %s uses the newest intact checkpoint before it (this one is left in place)",
                        DamagedCheckpointError(directory, reason), what)
    raise DamagedCheckpointError(os.path.dirname(candidates[0]) if candidates else "",
                                 f"{what} found no intact checkpoint (" + "; ".join(problems) + ")")


def read_meta(checkpoint_dir: str, step: int | str) -> dict[str, Any]:
    """The 'meta' item of checkpoint `step` in `checkpoint_dir` (DamagedCheckpointError if unreadable)."""
    path = storage.join(checkpoint_dir, str(step))
    try:
        meta = read_json(storage.join(path, "meta", "metadata"))
    except (OSError, ValueError) as e:
        raise DamagedCheckpointError(path, f"meta/metadata is unreadable ({first_line(e)})") from None
    if not isinstance(meta, dict):
        raise DamagedCheckpointError(path, "meta/metadata is not a JSON object")
    return meta


def all_steps(checkpoint_dir: str) -> list[int]:
    """Every step saved in `checkpoint_dir`, oldest first (none: no directory or no checkpoint): the
    directories named by a step number, as Orbax names finished saves (its unfinished ones carry an
    `.orbax-checkpoint-tmp` suffix, set-aside ones `.damaged-<n>`). Read by listing, so that looking
    opens no Orbax manager (which logs warnings about read-only directories)."""
    if not storage.isdir(checkpoint_dir):
        return []
    return sorted(int(name) for name in storage.listdir(checkpoint_dir)
                  if name.isdigit() and storage.isdir(storage.join(checkpoint_dir, name)))


def intact_steps(checkpoint_dir: str, *, warn: bool = False) -> list[int]:
    """The steps in `checkpoint_dir` whose checkpoints are structurally intact (`checkpoint_damage`),
    oldest first; with `warn`, one warning line for each damaged one skipped."""
    steps = []
    for step in all_steps(checkpoint_dir):
        problem = checkpoint_damage(storage.join(checkpoint_dir, str(step)))
        if problem is None:
            steps.append(step)
        elif warn:
            logging.warning("checkpoint %d in %s is damaged (%s): skipped (left in place)", step, checkpoint_dir,
                            problem)
    return steps


def latest_step(checkpoint_dir: str) -> int | None:
    """The newest structurally intact step in `checkpoint_dir` (None: no directory or no such checkpoint):
    where a run resumes, which is what the recipes' phase bookkeeping must see."""
    steps = intact_steps(checkpoint_dir)
    return steps[-1] if steps else None


def step_dirs(path: str) -> tuple[list[str], bool]:
    """(checkpoint step directories newest first, whether `path` named one step) of `path`: a workdir,
    its checkpoints/ directory or one step directory; for --config.train.init_from."""
    path = storage.absolute(path)
    if not storage.exists(path):
        raise FileNotFoundError(f"train.init_from={path!r} does not exist")
    if storage.isdir(storage.join(path, "state")):
        return [path], True
    ckpt_dir = storage.join(path, "checkpoints") if storage.isdir(storage.join(path, "checkpoints")) else path
    steps = all_steps(ckpt_dir)
    if not steps:
        raise FileNotFoundError(f"train.init_from={path!r} holds no checkpoint")
    return [storage.join(ckpt_dir, str(s)) for s in reversed(steps)], False


def step_dir(path: str) -> str:
    """The newest structurally intact checkpoint step directory of `path` (see `step_dirs`)."""
    candidates, explicit = step_dirs(path)
    return newest_intact(candidates, lambda d: None, what="train.init_from", explicit=explicit)[0]


def restore_matching(path: str, params: Any, include: str, *, config: Any = None) -> tuple[Any, list[str]]:
    """`params` with every parameter whose path matches the regex `include` and exists in another
    run's checkpoint (a workdir, its checkpoints/ or a step dir: the newest intact one) replaced by the
    saved one, for --config.train.init_from with --config.train.init_include (e.g. ERW's hand-off from
    a shallower model: its blocks 1..k into a deeper one). A selected parameter of another shape there
    is an error; the others keep `params`' values. With `config`, the checkpoint's transport must be
    the config's (`check_transport`). Returns (params, the carried paths); logs what came from where."""
    pattern = re.compile(include)
    candidates, explicit = step_dirs(path)

    def load(directory: str) -> tuple[Any, list[str]]:
        saved = read_meta(os.path.dirname(directory), os.path.basename(directory))
        if config is not None:
            check_transport(saved, config, directory, doing="train.init_from", keys=TRANSPORT_OF_WEIGHTS)
        saved_shapes = saved.get("param_shapes", {})
        wanted = {name: shape for name, shape in param_shapes(params).items()
                  if pattern.search(name) and name in saved_shapes}
        if not wanted:
            raise ValueError(f"train.init_include={include!r} selects none of the parameters that the model and "
                             f"train.init_from={path!r} have in common")
        problems = [f"{n}: checkpoint {saved_shapes[n]}, model {s}" for n, s in wanted.items()
                    if saved_shapes[n] != s]
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
        restored = restore_or_damaged(directory, lambda: ocp.PyTreeCheckpointer().restore(
            storage.join(directory, "state"),
            args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))["params"])
        flat = {path_name(key_path): value for key_path, value in jax.tree_util.tree_flatten_with_path(restored)[0]}
        if not all(np.all(np.isfinite(v)) for v in flat.values()):
            raise DamagedCheckpointError(directory, "it holds non-finite parameters")
        return flat, sorted(flat)

    directory, (flat, carried) = newest_intact(candidates, load, what="train.init_from", explicit=explicit)

    def pick(key_path, current):
        name = path_name(key_path)
        if name not in flat:
            return current
        return jax.device_put(np.asarray(flat[name], current.dtype), current.sharding)

    logging.info("loaded %d parameters (train.init_include=%r) from %s: %s", len(carried), include, directory,
                 ", ".join(carried))
    return jax.tree_util.tree_map_with_path(pick, params), carried


def _restore_params_from(directory: str, abstract_params: Any, where: str) -> tuple[Any, Any]:
    """(params, ema_params) of one step directory, its shapes checked against `abstract_params`."""
    meta_file = storage.join(directory, "meta", "metadata")
    if storage.exists(meta_file):
        saved_shapes = read_meta(os.path.dirname(directory), os.path.basename(directory)).get("param_shapes", {})
        check_compatible({"model": {}, "param_shapes": saved_shapes},
                         {"model": {}, "param_shapes": param_shapes(abstract_params)}, where)
    # Only params and EMA params, restored straight into this run's layout (any device count).
    target = {"params": abstract_params, "ema_params": abstract_params}
    restored = restore_or_damaged(directory, lambda: ocp.PyTreeCheckpointer().restore(
        storage.join(directory, "state"),
        args=ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                    partial_restore=True)))
    if not all_finite(restored):
        raise DamagedCheckpointError(directory, "it holds non-finite parameters")
    return restored["params"], restored["ema_params"]


def restore_params(path: str, abstract_params: Any, *, config: Any = None) -> tuple[Any, Any]:
    """(params, ema_params) from another run's checkpoint (a workdir, its checkpoints/ dir or one step
    dir; the newest intact one), for --config.train.init_from; shapes must match this run's model, and
    with `config` the transport (`check_transport`). Logs what was loaded from where."""
    candidates, explicit = step_dirs(path)

    def load(directory: str) -> tuple[Any, Any]:
        if config is not None and storage.exists(storage.join(directory, "meta", "metadata")):
            saved = read_meta(os.path.dirname(directory), os.path.basename(directory))
            check_transport(saved, config, directory, doing="train.init_from", keys=TRANSPORT_OF_WEIGHTS)
        return _restore_params_from(directory, abstract_params, path)

    directory, (params, ema) = newest_intact(candidates, load, what="train.init_from", explicit=explicit)
    leaves = jax.tree.leaves(params)
    logging.info("loaded params and EMA params (%d arrays, %s values each) from %s", len(leaves),
                 f"{sum(int(np.prod(x.shape)) for x in leaves):,}", directory)
    return params, ema


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of the intact checkpoints in `workdir`/checkpoints, a warning line for each damaged one
    (FileNotFoundError naming the directory if none)."""
    ckpt_dir = checkpoint_dir(workdir)
    steps = intact_steps(ckpt_dir, warn=True)
    if not steps:
        raise FileNotFoundError(f"no intact checkpoint in {ckpt_dir}: train first (launch/train.py --workdir=...)")
    return steps


def load_params(config: Any, workdir: str, mesh, *, step: int | None = None,
                which: str = "ema") -> tuple[Any, Any, int]:
    """(model, params laid out over `mesh`, step) of checkpoint `step` in `workdir` (default: the
    newest intact one; a damaged named step is an error); `which` = 'ema' (the weights that sample)
    or 'params' (the online weights). The checkpoint's model and transport must be the config's."""
    if which not in ("ema", "params"):
        raise ValueError(f"which must be 'ema' or 'params', got {which!r}")
    model = build_model(config)
    ckpt_dir = storage.absolute(checkpoint_dir(workdir))
    steps = all_steps(ckpt_dir)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}: train first (launch/train.py --workdir=...)")
    if step is not None and int(step) not in steps:
        raise FileNotFoundError(f"no checkpoint of step {step} in {ckpt_dir}; it holds steps {steps}")
    wanted = [int(step)] if step is not None else list(reversed(steps))
    abstract = abstract_params(config, model, mesh)

    def load(directory: str) -> tuple[Any, Any]:
        saved = read_meta(ckpt_dir, os.path.basename(directory))
        check_compatible({k: saved[k] for k in ("model", "param_shapes") if k in saved},
                         describe(model_fields(config), abstract), ckpt_dir)
        check_transport(saved, config, directory, doing=f"loading the {which} weights",
                        keys=TRANSPORT_OF_WEIGHTS)
        return _restore_params_from(directory, abstract, ckpt_dir)

    directory, (params, ema) = newest_intact([storage.join(ckpt_dir, str(s)) for s in wanted], load,
                                             what=f"loading the {which} weights of {workdir}",
                                             explicit=step is not None)
    loaded = int(os.path.basename(directory))
    logging.info("loaded the %s weights of step %d from %s", which, loaded, directory)
    return model, (ema if which == "ema" else params), loaded


def abstract_params(config: Any, model: Any, mesh) -> Any:
    """The model's parameter shapes, placed over `mesh` as in training (the rules match paths of the
    whole state, 'params/...'): the target a checkpoint's weights are restored into."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *model.init_inputs(1))["params"]
    return with_shardings(shapes, tree_shardings({"params": shapes}, mesh, mesh_rules(config))["params"])
