"""Reading a run's workdir: its checkpoints' steps and meta, and the parameters of one step.

Below both training and evaluation, so that sampling, FID and block analysis load a run without
the training loop. A checkpoint's 'meta' item records what must match to resume or load it (the
model, the parameter and state shapes, the objective with each regulariser's settings, the
transport, the data order, the optimizer) as structured fields with a schema version
(`RECORD_SCHEMA`): `describe` writes it, `read_meta` reads it (a record of an older schema is
migrated into today's by `migrate_meta`, the one place that knows old formats), and
`record_differences`, `check_compatible` and `check_transport` compare it key by key. A key a record
lacks reads as the value that applied when it was written (`ADDED_FIELDS`), so a field added with a
default never refuses an old checkpoint. `write_run_record` writes, once per start, what the run ran
(the resolved config, the versions, the commit, the command line). Writing checkpoints (with the
data iterator) is `lsync_jax.train.checkpoint`.

A damaged checkpoint (a file of it missing, truncated or unreadable) is found by a cheap structural
check (`checkpoint_damage`: the expected files present, their metadata readable, no array read) and
by the restore itself failing; readers then fall back to the newest intact step with one warning
line (`newest_intact`). Only a training run sets a damaged step aside (`set_aside`, a rename), never
a reader, and nothing is ever deleted.

A training start's resume policy is here too (`resume_target`, `check_resumable`,
`resume_newest_intact`, the data order `data_record` records), and the workdir's hold (`WorkdirHold`):
one module for a run on disk.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import importlib.metadata
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from lsync_jax import storage
from lsync_jax.builders import build_model, check_hold_settings, mesh_rules, model_fields
from lsync_jax.host import all_processes
from lsync_jax.models import COMPUTE_OVERRIDES, get_model, model_class, model_config, override_types
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


def _json(value: Any) -> Any:
    """A value as JSON keeps it: tuples as lists (recursively), numbers, bools, strings, None; else str."""
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json(v) for k, v in value.items()}
    return _plain(value)


# The record's format: 1, before 2026-12-05 (the objective as its repr string, the model as the
# overrides its config set); 2: every section a structured mapping, the model with every field.
RECORD_SCHEMA = 2

# A field added to a record section after records were first written: (section, key) -> the value that
# applied before it existed (what an older record lacking the key means). Add an entry with every new
# field of the model, a regulariser ('objective.regularizers.<name>'), the objective or the optimizer.
ADDED_FIELDS: dict[tuple[str, str], Any] = {
    ("optimizer", "mu_dtype"): None,  # 2026-12-05: Adam's first moment in the parameters' dtype before
}

# Schema 1's model record lists only the overrides a config set; the rest had these values (the model
# classes' defaults then; the sizes come from the model's name).
V1_MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "SiT": dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0,
                class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, z_dims=[], encoder_depth=8,
                projector_dim=2048, parametrization="sp", mup_base_width=288, output_multiplier=1.0,
                long_skips=False, self_condition=0, self_condition_stop_gradient=False, num_tags=0,
                tag_dropout_prob=0.1),
    "UViT": dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=29, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=False, z_dims=[],
                 mlp_time_embed=True, pos_embed="learned", final_conv=True, skip_scaling="none", skip_kappa=0.7,
                 ls_shared=True),
}
V1_MODEL_DEFAULTS["SiTSequence"] = V1_MODEL_DEFAULTS["SiT"]
V1_MODEL_DEFAULTS["SiTVideo"] = dict(V1_MODEL_DEFAULTS["SiT"], num_frames=8, temporal_patch=2)


def model_record(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Every field of the model `fields` names (its name and the overrides a config sets; the rest at the
    model's own values, the sizes from the name), so that a later change of a model default cannot
    change what a checkpoint means. A name lsync-jax does not know is recorded as given."""
    given = {k: _json(v) for k, v in sorted(fields.items())}
    name = str(fields.get("name"))
    try:
        model = get_model(name, **{k: v for k, v in fields.items() if k != "name"})
    except (ValueError, TypeError):
        return given
    keys = [*model_config(name), *(k for k in override_types(name) if k not in COMPUTE_OVERRIDES)]
    return dict(given, **{k: _json(getattr(model, k)) for k in keys})


def objective_record(objective: Any) -> dict[str, Any]:
    """An `Objective` as data: its own settings and each regulariser's dataclass fields by name (the
    transport is recorded beside it, `transport_record`)."""
    regularizers = {}
    for reg in objective.regularizers:
        regularizers[reg.name] = {f.name: _json(getattr(reg, f.name)) for f in dataclasses.fields(reg)
                                  if f.name != "name"}
    return {"transport_weight": float(objective.transport_weight), "clean_input": bool(objective.clean_input),
            "regularizers": regularizers}


def _literal(node: ast.AST, text: str) -> Any:
    """A schema-1 repr's expression as data: Name(k=v, ...) -> {'type': Name, k: v}; tuples as lists."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args:
        return dict({"type": node.func.id}, **{kw.arg: _literal(kw.value, text) for kw in node.keywords})
    if isinstance(node, (ast.Tuple, ast.List)):
        return [_literal(v, text) for v in node.elts]
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ValueError(f"a checkpoint's objective record {text!r} holds {ast.dump(node)[:80]}, which no "
                         "schema-1 record held; it cannot be read") from None


def parse_v1_objective(text: str) -> dict[str, Any]:
    """Schema 1's objective (the string `Objective(transport=..., regularizers=(...), ...)`) as a schema-2
    `objective_record`."""
    try:
        tree = _literal(ast.parse(text, mode="eval").body, text)
    except SyntaxError:
        raise ValueError(f"a checkpoint's objective record {text[:120]!r} is not an Objective(...) repr") from None
    if not isinstance(tree, dict) or tree.get("type") != "Objective":
        raise ValueError(f"a checkpoint's objective record {text[:120]!r} is not an Objective(...) repr")
    regularizers = {}
    for reg in tree.get("regularizers", []):
        fields = {k: v for k, v in reg.items() if k not in ("type", "name")}
        regularizers[reg.get("name", str(reg.get("type", "")).lower())] = fields
    return {"transport_weight": float(tree.get("transport_weight", 1.0)),
            "clean_input": bool(tree.get("clean_input", False)), "regularizers": regularizers}


def migrate_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's meta in today's schema: the one function that reads older formats. Schema 1 (no
    'schema' key): the objective's repr parsed into `objective_record`'s form; the model record
    completed with the values its unlisted fields had (`V1_MODEL_DEFAULTS`, the sizes from the name)."""
    out = dict(meta)
    schema = int(out.get("schema", 1))
    if schema > RECORD_SCHEMA:
        raise ValueError(f"a checkpoint record of schema {schema}, newer than this lsync-jax's {RECORD_SCHEMA}: "
                         "read it with the version that wrote it")
    if schema == 1:
        if isinstance(out.get("objective"), str):
            out["objective"] = parse_v1_objective(out["objective"])
        model = dict(out.get("model") or {})
        name = model.get("name")
        try:
            defaults = dict(V1_MODEL_DEFAULTS[model_class(str(name)).__name__], **model_config(str(name)))
        except (KeyError, ValueError):
            defaults = {}
        out["model"] = dict({k: v for k, v in defaults.items() if k not in model}, **model)
    out["schema"] = RECORD_SCHEMA
    return out


def _absent(section: str, key: str) -> Any:
    return ADDED_FIELDS.get((section, key), _ABSENT)


class _Absent:
    def __repr__(self) -> str:
        return "absent"


_ABSENT = _Absent()


def _same(a: Any, b: Any) -> bool:
    return _json(a) == _json(b) if not (isinstance(a, _Absent) or isinstance(b, _Absent)) else a is b


def record_differences(saved: Mapping[str, Any], wanted: Mapping[str, Any], section: str,
                       skip: Sequence[str] = ()) -> list[str]:
    """'section.key: checkpoint X, config Y' for every key whose values differ, recursing into mappings;
    a key one side lacks reads as `ADDED_FIELDS`' value for it (else 'absent')."""
    out = []
    for key in sorted(set(saved) | set(wanted)):
        if key in skip:
            continue
        a = saved[key] if key in saved else _absent(section, key)
        b = wanted[key] if key in wanted else _absent(section, key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(record_differences(a, b, f"{section}.{key}"))
        elif not _same(a, b):
            out.append(f"{section}.{key}: checkpoint {a!r}, config {b!r}")
    return out


def transport_record(transport: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint records of config.transport: every key, and the time convention."""
    return dict({k: _plain(v) for k, v in sorted(dict(transport).items())}, time=TIME_CONVENTION)


def describe(model_config: Mapping[str, Any], params: Any, state: Any = None, objective: Any = None, *,
             transport: Mapping[str, Any] | None = None, data: Mapping[str, Any] | None = None,
             optimizer: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The 'meta' item: what must match for a checkpoint to be resumed into this run: the model (every
    field, `model_record`), the parameter shapes, the shapes of the whole train state (optimizer
    structure, PRNG key), the objective (`objective_record`: resuming a LayerSync run as a baseline, say,
    is refused), the transport the weights were trained with (`transport_record`), what fixes the data
    order (`data`, training only) and the optimizer's settings (recorded; a resume may change them)."""
    meta = {"schema": RECORD_SCHEMA, "model": model_record(model_config), "param_shapes": param_shapes(params)}
    if state is not None:
        meta["state_shapes"] = param_shapes(state)
    if objective is not None:
        meta["objective"] = objective_record(objective)
    if transport is not None:
        meta["transport"] = {k: _plain(v) for k, v in sorted(dict(transport).items())}
    if data is not None:
        meta["data"] = {k: _plain(v) for k, v in sorted(dict(data).items())}
    if optimizer is not None:
        meta["optimizer"] = {k: _json(v) for k, v in sorted(dict(optimizer).items())}
    return meta


def check_compatible(saved: Mapping[str, Any], wanted: Mapping[str, Any], where: str) -> None:
    """Raise ValueError naming, key by key, what differs between a checkpoint's meta and this run's: the
    model (compute options may change), the parameter and state shapes, the objective."""
    saved, wanted = migrate_meta(saved), migrate_meta(wanted)
    problems = record_differences(saved.get("model", {}), wanted["model"], "model", skip=COMPUTE_OVERRIDES)
    shapes_a, shapes_b = saved.get("param_shapes", {}), wanted["param_shapes"]
    for key in sorted(set(shapes_a) | set(shapes_b)):
        if shapes_a.get(key) != shapes_b.get(key):
            problems.append(f"param {key}: checkpoint {shapes_a.get(key)}, config {shapes_b.get(key)}")
    if "state_shapes" in saved and "state_shapes" in wanted and saved["state_shapes"] != wanted["state_shapes"]:
        a, b = saved["state_shapes"], wanted["state_shapes"]
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        problems.append(f"train state (optimizer settings or PRNG implementation) differs at {diff[:3]}")
    if "objective" in saved and "objective" in wanted:
        problems.extend(record_differences(saved["objective"], wanted["objective"], "objective"))
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
    return migrate_meta(meta)


# --- resuming: what a checkpoint must match, which one a resume takes ---
# The resume policy of a training start (train/setup.py calls it): the data order a checkpoint records
# and its check, the compatibility of a checkpoint's meta with this config, the checkpoint a resume
# would take (checked on its meta before anything long), and the restore of the newest intact one with
# the damaged newer ones set aside.

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


def check_resumable(saved: dict[str, Any], config: Any, meta: Mapping[str, Any],
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


def resume_target(config: Any, ckpt_dir: str, saved_steps: Sequence[int], meta: Mapping[str, Any],
                 accepts: Sequence[Mapping[str, Any]]) -> int | None:
    """What the run starts from, checked on its meta before anything long (reference statistics, the
    restore, compiles): the newest structurally intact checkpoint a resume would take, or
    train.init_from's transport. The restore checks again, candidate by candidate. Returns the step
    checked (a resume), else None."""
    if saved_steps:
        for step in reversed(saved_steps):
            if checkpoint_damage(os.path.join(ckpt_dir, str(step))) is None:
                check_resumable(read_meta(ckpt_dir, step), config, meta, accepts, storage.absolute(ckpt_dir))
                return step
    elif config.train.init_from:
        for directory in step_dirs(config.train.init_from)[0]:  # damage is reported when it is restored
            if checkpoint_damage(directory) is None:
                saved = read_meta(os.path.dirname(directory), os.path.basename(directory))
                check_transport(saved, config, directory, doing="train.init_from", keys=TRANSPORT_OF_WEIGHTS,
                                warn=False)  # the restore says it
                return None
    return None


class Restorer(Protocol):
    """What the resume needs of a run's checkpointer (lsync_jax.train.checkpoint.Checkpointer)."""

    directory: str

    def all_steps(self) -> list[int]: ...

    def restore(self, step: int, abstract_state: Any, data_iterator: Any = None) -> Any: ...

    def reload(self) -> None: ...


def resume_newest_intact(checkpointer: Restorer, config: Any, abstract: Any, meta: Mapping[str, Any],
                         accepts: Sequence[Mapping[str, Any]], data_iterator: Any, *, checked: int | None) -> Any:
    """The state (and data position) of the newest intact checkpoint. Damaged newer ones are set aside
    (renamed, one line each) once an older one has restored; if none restores nothing is moved and
    the error says why."""
    directory, num_steps = checkpointer.directory, int(config.train.num_steps)
    damaged: list[tuple[int, str]] = []
    state = None
    for step in reversed(checkpointer.all_steps()):
        path = os.path.join(directory, str(step))
        problem = checkpoint_damage(path)
        if problem is None:
            try:
                check_resumable(read_meta(directory, step), config, meta, accepts, directory, warn=step != checked)
                if not storage.isdir(storage.join(path, "data")):
                    raise FileNotFoundError(f"checkpoint {step} in {directory} has no data-iterator position; "
                                            "resuming would replay the data from the start")
                state = restore_or_damaged(path, lambda s=step: checkpointer.restore(s, abstract, data_iterator))
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
    if step >= num_steps:
        logging.warning("the checkpoint is at step %d >= train.num_steps=%d: nothing to train", step, num_steps)
    return state


def run_record(config: Any, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """What a start ran, for a person or a script: the resolved config, the versions of lsync-jax and
    its numerical stack (libtpu or the CUDA plugin when present), the git commit of the package's
    checkout when it is one, the command line, the host and the time."""
    packages = ("lsync-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "libtpu", "jax-cuda12-plugin",
                "jax-cuda13-plugin")
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"schema": RECORD_SCHEMA, "config": config.to_dict() if hasattr(config, "to_dict") else dict(config),
            "versions": versions, "git": _git_commit(), "argv": list(sys.argv if argv is None else argv),
            "host": socket.gethostname(), "pid": os.getpid(), "processes": jax.process_count(),
            "devices": jax.device_count(), "platform": jax.devices()[0].platform,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _git_commit() -> dict[str, Any] | None:
    """The commit of the checkout lsync_jax is imported from, and whether it has uncommitted changes
    (None: not a git checkout, or no git)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def write_run_record(workdir: str, config: Any) -> str:
    """Write `run_record` as workdir/runs/<time>_<host>_<pid>.json (one file per start, nothing
    overwritten); returns its path."""
    record = run_record(config)
    stamp = record["started"].replace(":", "").replace("-", "").replace("+0000", "Z")
    path = storage.join(workdir, "runs", f"{stamp}_{record['host']}_{record['pid']}.json")
    storage.makedirs(storage.join(workdir, "runs"))
    storage.write_json_atomic(path, _json(record))
    return path


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


# --- the workdir hold ------------------------------------------------------------------------------------
# One run writes a workdir. A run holds it (`WorkdirHold`, taken by `lsync_jax.train.loop.train` before
# anything is probed, written or compiled) through one file, workdir/hold.json: who holds it (host, boot,
# process ids, start time) and the lease length. The hold is a lease: a background thread renews it
# every quarter lease (compiles take minutes, so not from the step loop). Expiry is judged by the storage's
# clock only: a file's mtime against a probe file's mtime locally, an object's `updated` against a probe
# object's on gs://; hosts' clocks are never compared. A hold that names this host (hostname and boot id)
# whose processes are all gone is stale at once (kill -9 then the same command on the same machine).
# Locally: an exclusive create (link(2) of a finished file), renewals and releases under flock(2) on the
# workdir; on gs://: a create with ifGenerationMatch=0, renewals and takeovers with ifGenerationMatch=<the
# generation read>, a release deleting with ifGenerationMatch (docs/training.md, "One writer per workdir").
HOLD_FILE = "hold.json"
_CLOCK_PROBE = ".hold-clock."
_ACTIVE_TOKENS: set[str] = set()  # the holds this process holds now
_ACQUIRED = [0]  # acquisitions in this process: one key per acquisition for a multi-process run's agreement


class HoldError(RuntimeError):
    """Another run holds the workdir: the message names the holder and how to take over."""


class HoldLostError(RuntimeError):
    """This run's hold was taken over (or could not be renewed): it must stop writing."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """The start time of process `pid` in clock ticks since boot (/proc/<pid>/stat's field 22), '' unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _process_alive(pid: int, start: str) -> bool:
    """Whether `pid` on this host is the process a hold recorded (not gone, not a zombie, not a reuse)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0] not in ("Z", "X") and (not start or fields[19] == start)
    except (OSError, IndexError):
        return True


def process_identity() -> dict[str, Any]:
    """This process as a hold records it."""
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(),
            "pid_start": _process_start(os.getpid())}


def _utc(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds")


def _rfc3339(text: str) -> float:
    """GCS's object times ('2026-12-05T10:49:45.78672Z', any number of fraction digits) in seconds."""
    whole, _, fraction = text.rstrip("Z").partition(".")
    stamp = datetime.datetime.fromisoformat(whole).replace(tzinfo=datetime.timezone.utc).timestamp()
    return stamp + (float("0." + fraction) if fraction else 0.0)


@dataclasses.dataclass(frozen=True)
class Holder:
    """A hold as read from storage: its record (None: unreadable), the storage time of its last renewal
    (seconds since the epoch by the storage's clock), its version (gs:// generation; locally inode and
    mtime) and, when measured, its age by the storage's clock."""

    record: Mapping[str, Any] | None
    renewed: float
    version: Any
    age: float | None = None

    @property
    def lease_s(self) -> float:
        return float((self.record or {}).get("lease_s", 0) or 0)

    def describe(self) -> str:
        """'host h, process 123 (with 1 more process), started ..., lease last renewed ...'."""
        r = self.record or {}
        if not r:
            who = "an unreadable hold file (a hold being written, or damaged)"
        else:
            more = _process_count(r) - 1
            who = (f"host {r.get('host', '?')}, process {r.get('pid', '?')}"
                   + (f" (with {more} more process{'es' if more > 1 else ''} of its run)" if more > 0 else "")
                   + f", started {r.get('started', '?')} by its clock")
        ago = f", {self.age:.0f} s ago" if self.age is not None else ""
        lease = f"; its lease is {self.lease_s:g} s" if self.lease_s else ""
        return f"{who}, lease last renewed {_utc(self.renewed)} by the storage's clock{ago}{lease}"


def _process_count(record: Mapping[str, Any]) -> int:
    processes = record.get("processes")
    return len(processes) if isinstance(processes, list) else int(record.get("process_count", 1) or 1)


def hold_summary_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    """A hold's record without its process list and command line (a size that does not grow with the run):
    the token, the holder (host and pid of process 0), the lease, the process count and the start time."""
    summary = {key: record[key] for key in ("token", "host", "pid", "lease_s", "started") if key in record}
    return dict(summary, process_count=_process_count(record))


class HoldStore(Protocol):
    """Where a hold lives: a file on a local disk (`_LocalHold`) or an object on gs:// (`_GcsHold`). Every
    write is conditional (None or False: another run's hold was there first, or it changed since read)."""

    def read(self) -> Holder | None: ...

    def create(self, record: Mapping[str, Any]) -> Holder | None: ...

    def replace(self, record: Mapping[str, Any], version: Any) -> Holder | None: ...

    def renew(self, token: str) -> Holder | None: ...

    def release(self, token: str) -> bool: ...

    def now(self) -> float: ...  # the storage's clock


class _LocalHold:
    """The hold file on a local (or mounted network) disk."""

    def __init__(self, workdir: str):
        self.workdir, self.file = workdir, os.path.join(workdir, HOLD_FILE)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """flock(2) on the workdir around a read-check-write, so that a renewal, a takeover and a release
        never interleave. A file system without flock: the exclusive create still holds."""
        fd = os.open(self.workdir, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                pass
            yield
        finally:
            os.close(fd)

    def _finished_file(self, record: Mapping[str, Any]) -> str:
        tmp = os.path.join(self.workdir, f".{HOLD_FILE}.{uuid.uuid4().hex}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return tmp

    def _read(self) -> Holder | None:
        try:
            with open(self.file, "rb") as f:
                stat, data = os.fstat(f.fileno()), f.read()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(data)
        except ValueError:
            record = None
        return Holder(record if isinstance(record, dict) else None, stat.st_mtime,
                      (stat.st_ino, stat.st_mtime_ns, stat.st_size))

    def read(self) -> Holder | None:
        return self._read()

    def create(self, record: Mapping[str, Any]) -> Holder | None:
        """Create the hold unless one exists (then None): link(2) of a finished file, atomic and exclusive."""
        tmp = self._finished_file(record)
        try:
            try:
                os.link(tmp, self.file)
            except FileExistsError:
                return None
            except OSError as e:  # no hard links here (some network or FUSE file systems)
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                try:
                    fd = os.open(self.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return None
                with open(tmp, "rb") as f:
                    os.write(fd, f.read())
                os.fsync(fd)
                os.close(fd)
        finally:
            os.unlink(tmp)
        return self._read()

    def replace(self, record: Mapping[str, Any], version: Any) -> Holder | None:
        """Replace the hold read as `version` (a takeover, a stale or expired hold broken); None when it
        changed since (renewed, released or taken by another)."""
        with self._locked():
            now = self._read()
            if now is None or now.version != version:
                return None
            os.replace(self._finished_file(record), self.file)
            return self._read()

    def renew(self, token: str) -> Holder | None:
        """Touch the hold if `token` still holds it (its mtime is the renewal's time); else None."""
        with self._locked():
            now = self._read()
            if now is None or (now.record or {}).get("token") != token:
                return None
            os.utime(self.file)
            return self._read()

    def release(self, token: str) -> bool:
        with self._locked():
            now = self._read()
            if now is None or (now.record or {}).get("token") != token:
                return False
            os.unlink(self.file)
            return True

    def now(self) -> float:
        """The storage's clock: the mtime of a probe file written now beside the hold."""
        fd, probe = tempfile.mkstemp(prefix=_CLOCK_PROBE, dir=self.workdir)
        try:
            os.write(fd, b"lsync-jax hold clock\n")
            return os.fstat(fd).st_mtime
        finally:
            os.close(fd)
            os.unlink(probe)


class _GcsHold:
    """The hold object on gs://, through gcsfs's JSON API calls with generation preconditions. gcsfs's
    own writes cannot set ifGenerationMatch=<generation> (only 0, as mode='create'), so the uploads are
    made here: multipart ones (fake-gcs-server, the tests' emulator, honours ifGenerationMatch on those
    and not on uploadType=media). The whole record (every process of the run) is the object's content,
    read at the generation its metadata names; the custom metadata 'hold' (GCS caps custom metadata at
    8 KiB an object) holds a fixed-size summary (`hold_summary_fields`), for people and tools listing the
    bucket, and the record's stand-in when the content is unreadable."""

    BOUNDARY = "lsync-jax-hold"

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.fs, self.bucket, self.prefix = storage.gcs_object(workdir)
        self.key = f"{self.prefix}/{HOLD_FILE}" if self.prefix else HOLD_FILE

    @staticmethod
    def metadata(record: Mapping[str, Any]) -> dict[str, str]:
        """The object's custom metadata for `record`: its summary, of a size that does not grow with the run."""
        return {"hold": json.dumps(hold_summary_fields(record), sort_keys=True)}

    def _holder(self, resource: Mapping[str, Any], record: Any) -> Holder:
        if not isinstance(record, dict):  # the content unreadable: the summary stands in
            try:
                record = json.loads((resource.get("metadata") or {}).get("hold", ""))
            except ValueError:
                record = None
        return Holder(record if isinstance(record, dict) else None, _rfc3339(resource["updated"]),
                      str(resource["generation"]))

    def _content(self, generation: str) -> Any:
        """The record stored as generation `generation` (FileNotFoundError: replaced or removed since)."""
        _, data = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, alt="media", generation=generation)
        try:
            return json.loads(data)
        except ValueError:
            return None

    def _put(self, key: str, record: Mapping[str, Any], if_generation: str) -> dict[str, Any]:
        """Upload `record` as `key` if the object's generation is `if_generation` ('0': absent)."""
        text = json.dumps(record, sort_keys=True)
        meta = json.dumps({"name": key, "contentType": "application/json", "metadata": self.metadata(record)})
        body = (f"--{self.BOUNDARY}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{meta}\r\n"
                f"--{self.BOUNDARY}\r\nContent-Type: application/json\r\n\r\n{text}\n\r\n--{self.BOUNDARY}--")
        return self.fs.call("POST", f"{self.fs._location}/upload/storage/v1/b/{urllib.parse.quote(self.bucket)}/o",
                            uploadType="multipart", ifGenerationMatch=if_generation, data=body.encode(),
                            headers={"Content-Type": f'multipart/related; boundary="{self.BOUNDARY}"'},
                            json_out=True)

    def read(self) -> Holder | None:
        """The hold with its whole record: the metadata, then the content of the generation it names."""
        for _ in range(10):
            try:
                resource = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, json_out=True)
            except FileNotFoundError:
                return None
            try:
                return self._holder(resource, self._content(str(resource["generation"])))
            except FileNotFoundError:
                continue  # renewed, replaced or released between the two reads: read again
        return self._holder(resource, None)

    def _conditional(self, record: Mapping[str, Any], generation: str) -> Holder | None:
        try:
            return self._holder(self._put(self.key, record, generation), dict(record))
        except FileExistsError:  # 412: the generation moved on, or a retried request already succeeded
            now = self.read()
            mine = now is not None and (now.record or {}).get("token") == record.get("token")
            return now if mine else None

    def create(self, record: Mapping[str, Any]) -> Holder | None:
        return self._conditional(record, "0")

    def replace(self, record: Mapping[str, Any], version: Any) -> Holder | None:
        return self._conditional(record, str(version))

    def renew(self, token: str) -> Holder | None:
        now = self.read()
        if now is None or (now.record or {}).get("token") != token:
            return None
        return self._conditional(now.record, now.version)

    def release(self, token: str) -> bool:
        now = self.read()
        if now is None or (now.record or {}).get("token") != token:
            return False
        try:  # the emulator ignores this precondition on DELETE; GCS honours it
            self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self.key, ifGenerationMatch=now.version)
        except (FileNotFoundError, FileExistsError):
            return False
        return True

    def now(self) -> float:
        """The storage's clock: the `updated` time of a probe object written now beside the hold."""
        key = f"{self.prefix}/{_CLOCK_PROBE}{uuid.uuid4().hex}" if self.prefix else f"{_CLOCK_PROBE}{uuid.uuid4().hex}"
        resource = self._put(key, {}, "0")
        try:
            return _rfc3339(resource["updated"])
        finally:
            try:
                self.fs.call("DELETE", "b/{}/o/{}", self.bucket, key)
            except FileNotFoundError:
                pass


def _no_hold(workdir: str) -> str:
    """Why `workdir` cannot be held ('': it can): a storage other than a local disk and gs://."""
    kind = storage.scheme(workdir)
    if not kind or kind in ("gs", "gcs"):
        return ""
    return f"no hold: {kind}:// has no conditional writes in lsync-jax; two trainers on this workdir are not prevented"


def _hold_store(workdir: str) -> HoldStore | None:
    if _no_hold(workdir):
        return None
    return _GcsHold(workdir) if storage.is_remote(workdir) else _LocalHold(workdir)


def read_holder(workdir: str) -> Holder | None:
    """Who holds `workdir` (None: nobody, or a storage that cannot be held), with the hold's age by the
    storage's clock (a probe file or object is written and removed to read that clock); for launch/train.py
    --check. Writes nothing else."""
    workdir = storage.absolute(workdir)
    if not storage.is_remote(workdir) and not os.path.isdir(workdir):
        return None
    store = _hold_store(workdir)
    seen = store.read() if store is not None else None
    if seen is None:
        return None
    return dataclasses.replace(seen, age=store.now() - seen.renewed)


def hold_summary(workdir: str) -> str:
    """One phrase for --check: 'no hold', who holds `workdir`, or why it cannot be held."""
    why = _no_hold(storage.absolute(workdir))
    if why:
        return why
    holder = read_holder(workdir)
    return "no hold" if holder is None else f"held by {holder.describe()}"


class WorkdirHold:
    """The hold of one run on its workdir, as a context manager (`with WorkdirHold(workdir, ...) as hold:`).

    Entering takes it: created if there is none; a stale one (this host, its processes gone) or an
    expired one (not renewed within its lease, by the storage's clock) is broken with one line; with
    `take_over` any hold is broken, with one warning line naming whose. Otherwise it waits up to `wait_s`
    for the holder to release it or its lease to expire, then raises HoldError naming the holder. While
    held, a thread renews it every `lease_s / 4`; if a renewal finds it taken over, `lost` says why (an
    error line) and `check()` raises HoldLostError; `guard(step)`, before every write into the workdir,
    renews it at once and raises HoldLostError on every process once it is lost. Leaving releases it (on
    any exit; the directories entering created are removed again when empty). In a run of several
    processes, process 0 takes and renews the hold for the run, recording every process; all processes
    share its verdict (a refusal raises on each) through jax.distributed's key-value store. A workdir on
    a storage other than a local disk and gs:// is not held (one warning line). `keys` names the config
    keys in messages."""

    def __init__(self, workdir: str, *, lease_s: float = 120.0, wait_s: float = 0.0, take_over: bool = False,
                 keys: str = "config.train"):
        self.workdir = storage.absolute(workdir)
        check_hold_settings(lease_s, wait_s, keys)
        self.lease_s, self.wait_s, self.take_over, self.keys = float(lease_s), float(wait_s), bool(take_over), keys
        self.token = uuid.uuid4().hex
        self.lost: str | None = None
        self.held: Holder | None = None
        self._store: HoldStore | None = None
        self._created: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_ok = 0.0  # time.monotonic() of the last renewal that confirmed the hold
        self._entered = False  # every process of the run: between a successful __enter__ and the release

    @classmethod
    def of_config(cls, workdir: str, train: Any) -> "WorkdirHold":
        """The hold config.train asks for (hold_lease_s, hold_wait_s, take_over_hold)."""
        return cls(workdir, lease_s=train.hold_lease_s, wait_s=train.hold_wait_s, take_over=train.take_over_hold)

    # -- entering and leaving ------------------------------------------------------------------------
    def __enter__(self) -> "WorkdirHold":
        _ACQUIRED[0] += 1
        if jax.process_count() == 1:
            self.acquire([process_identity()])
        else:
            self._acquire_together(f"lsync_jax/hold/{_ACQUIRED[0]}")
        self._entered = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _acquire_together(self, key: str) -> None:
        """Process 0 takes the hold for the run (recording every process); the others wait for its verdict."""
        from jax._src import distributed

        client = distributed.global_state.client
        timeout_ms = int(1000 * (self.wait_s + 4 * self.lease_s + 600))
        if jax.process_index() != 0:
            client.key_value_set(f"{key}/process/{jax.process_index()}", json.dumps(process_identity()))
            verdict = client.blocking_key_value_get(f"{key}/verdict", timeout_ms)
            if verdict != "ok":
                raise HoldError(f"{verdict} (process 0 found this; every process of the run stops)")
            return
        try:
            processes = [process_identity()] + [
                json.loads(client.blocking_key_value_get(f"{key}/process/{i}", timeout_ms))
                for i in range(1, jax.process_count())]
            self.acquire(processes)
        except BaseException as e:
            client.key_value_set(f"{key}/verdict", str(e) or type(e).__name__)
            raise
        try:
            client.key_value_set(f"{key}/verdict", "ok")
        except BaseException:  # the others cannot learn the verdict: the run does not start, its hold goes
            self.release()
            raise

    def acquire(self, processes: Sequence[Mapping[str, Any]]) -> None:
        """Take the hold for a run of `processes` (this process first), waiting as the class says."""
        self._store = _hold_store(self.workdir)
        if self._store is None:
            logging.warning("%s: %s", self.workdir, _no_hold(self.workdir))
            return
        me = processes[0]
        record = dict(me, token=self.token, lease_s=self.lease_s, processes=list(processes),
                      started=_utc(time.time()), argv=list(sys.argv[:8]))
        deadline, waited = time.monotonic() + self.wait_s, False
        try:
            if not storage.is_remote(self.workdir):
                self._make_workdir()
            while True:
                self.held = self._store.create(record)
                if self.held is not None:
                    break
                seen = self._store.read()
                if seen is None:
                    continue  # released in between
                seen = dataclasses.replace(seen, age=self._store.now() - seen.renewed)
                why = self._free(seen)
                if why or self.take_over:
                    self.held = self._store.replace(record, seen.version)
                    if self.held is None:
                        continue  # renewed, released or taken meanwhile: look again
                    if why:
                        logging.warning("%s: broke the hold of %s: %s", self.workdir, seen.describe(), why)
                    else:
                        logging.warning("%s: %s.take_over_hold: took over the hold of %s (that run stops at its "
                                        "next step)", self.workdir, self.keys, seen.describe())
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HoldError(self._refusal(seen, waited))
                if not waited:
                    logging.warning("%s is held by %s: waiting up to %g s (%s.hold_wait_s) for it to be released or "
                                    "to expire", self.workdir, seen.describe(), self.wait_s, self.keys)
                    waited = True
                time.sleep(min(left, max(0.2, min(seen.lease_s or self.lease_s, 16.0) / 8)))  # 2 s at most
        except OSError as e:
            self._remove_created()
            if isinstance(e, storage.StorageError) or storage.is_remote(self.workdir):
                raise storage.StorageError(f"{self.workdir}: its hold ({HOLD_FILE}) cannot be taken ({first_line(e)}); "
                                           "the run writes there. Check the bucket's name and permissions") from e
            raise OSError(e.errno, f"{self.workdir} is not writable ({e.strerror or e}): its hold ({HOLD_FILE}) "
                          "cannot be taken. Check its permissions and free space, or choose another --workdir") from e
        except BaseException:
            self._remove_created()
            raise
        _ACTIVE_TOKENS.add(self.token)
        self._last_ok = time.monotonic()
        self._thread = threading.Thread(target=self._renew_loop, name="lsync-jax workdir hold", daemon=True)
        self._thread.start()

    def _free(self, seen: Holder) -> str:
        """Why `seen` may be broken ('' : it is live): stale on this host, or expired by the storage's clock."""
        r, me = seen.record or {}, process_identity()
        same_boot = r.get("host") == me["host"] and (r.get("boot_id") or "") == me["boot_id"]
        processes = r.get("processes") or ([r] if r else [])
        if same_boot and processes and all(p.get("host") == me["host"] for p in processes):
            alive = [p for p in processes if _process_alive(int(p.get("pid", 0)), str(p.get("pid_start", "")))
                     and not (p.get("pid") == me["pid"] and r.get("token") not in _ACTIVE_TOKENS)]
            if not alive:
                return "its process(es) on this host are gone (killed, or crashed)"
        lease = seen.lease_s or self.lease_s
        if seen.age is not None and seen.age > lease:
            return f"it expired (not renewed for {seen.age:.0f} s by the storage's clock; its lease is {lease:g} s)"
        return ""

    def _refusal(self, seen: Holder, waited: bool) -> str:
        wait = f"after waiting {self.wait_s:g} s ({self.keys}.hold_wait_s)" if waited else \
            f"({self.keys}.hold_wait_s={self.wait_s:g}: no wait)"
        lease = seen.lease_s or self.lease_s
        return (f"{self.workdir} is held by another run {wait}: {seen.describe()}. Two trainers would write the same "
                f"checkpoints. Wait for that run to end (its hold is released then, or expires {lease:g} s after its "
                f"last renewal if it died), raise {self.keys}.hold_wait_s, or take over with "
                f"--{self.keys}.take_over_hold=True (that run stops at its next step)")

    def release(self) -> None:
        """Stop renewing and remove the hold (unless it was lost); never raises over the error in flight."""
        self._stop.set()
        self._entered = False
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        if self.held is None or self._store is None:
            return
        _ACTIVE_TOKENS.discard(self.token)
        try:
            if not self.lost:
                self._store.release(self.token)
        except Exception as e:  # noqa: BLE001 - it expires after its lease anyway
            logging.warning("%s: releasing its hold failed (%s); it expires %g s after its last renewal", self.workdir,
                            first_line(e), self.lease_s)
        self.held = None
        self._remove_created()

    # -- while held ----------------------------------------------------------------------------------
    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            if not self.renew():
                return

    def renew(self) -> bool:
        """Renew the hold now; False once it is lost (`lost` says why). A storage error is retried at the
        next renewal, until the hold has gone unconfirmed for a whole lease. Never called after `release`
        began: a renewal thread that outlived its join says nothing."""
        if self.lost:
            return False
        try:
            renewed = self._store.renew(self.token)
        except Exception as e:  # noqa: BLE001 - storage trouble: retried at the next quarter lease
            if time.monotonic() - self._last_ok > self.lease_s:
                self._lose(f"its hold could not be renewed for over its lease of {self.lease_s:g} s "
                           f"({first_line(e)}): another run may have taken the workdir")
                return False
            logging.warning("%s: renewing its hold failed (%s); retrying in %g s", self.workdir, first_line(e),
                            self.lease_s / 4)
            return True
        if renewed is None:
            now = self._store.read()
            self._lose(f"its hold was taken over by {now.describe()}" if now is not None else
                       f"its hold file {HOLD_FILE} was removed")
            return False
        self._last_ok = time.monotonic()
        return True

    def _lose(self, why: str) -> None:
        if self._stop.is_set() or self.lost:  # released meanwhile (a late renewal), or said already
            return
        self.lost = why
        logging.error("%s: this run no longer holds its workdir: %s. It stops before it writes there again",
                      self.workdir, why)

    def check(self) -> None:
        """Raise HoldLostError if the hold was lost (see `lost`)."""
        if self.lost:
            raise HoldLostError(f"{self.workdir}: this run no longer holds its workdir ({self.lost}); it stopped "
                                "before writing more. Another run writes there now: check which, before running "
                                "this one again")

    def guard(self, step: int) -> None:
        """Before a write into the workdir at `step` (the loop calls it before every hook that declares
        `Needs.HOLD`: checkpoints, sample grids, evaluations): process 0 renews the hold now, confirming it is
        still this run's, and every process agrees (one flag gathered: all processes run the same hooks at the
        same step), so that all raise HoldLostError before the write once it is lost. Without a hold (a
        storage that cannot be held, or not entered): nothing, on every process alike."""
        if not self._entered or _no_hold(self.workdir):
            return
        if jax.process_index() == 0:
            self.renew()
        if jax.process_count() == 1:
            self.check()
        elif not all_processes(not self.lost):
            self.check()
            raise HoldLostError(f"{self.workdir}: process 0 of this run lost its workdir hold (its log says to "
                                f"whom); every process stops at step {step}, before writing more")

    def guarded(self, step_fn: Callable, every: int, start: int = 0) -> Callable:
        """`step_fn` that first raises HoldLostError once the hold is known lost, so that a run stops at its
        next step rather than train on until its next write (which `guard` stops in any case). One process:
        checked at every step (a flag read). Several: the processes agree (one flag gathered) before each step
        `s` with s % every == 0 (`every`: the logging interval; `start`: the step the state is at), so that
        all stop at the same step."""
        steps = [int(start)]

        def step(*args: Any) -> Any:
            steps[0] += 1
            if jax.process_count() == 1:
                self.check()
            elif steps[0] % max(int(every), 1) == 0 and not all_processes(not self.lost):
                self.check()
                raise HoldLostError(f"{self.workdir}: process 0 of this run lost its workdir hold (its log says to "
                                    "whom); every process stops before writing more")
            return step_fn(*args)

        return step

    # -- directories ---------------------------------------------------------------------------------
    def _make_workdir(self) -> None:
        parent = self.workdir
        while not os.path.exists(parent) and os.path.dirname(parent) != parent:
            self._created.append(parent)
            parent = os.path.dirname(parent)
        os.makedirs(self.workdir, exist_ok=True)

    def _remove_created(self) -> None:
        """The directories entering created, when empty (a run refused at its start leaves nothing)."""
        for folder in self._created:  # deepest first
            try:
                os.rmdir(folder)
            except OSError:
                break
        self._created = []
