"""Offline preprocessing: a folder of `.npy` sequences -> fixed-length ArrayRecord shards.

Input: `NPY_DIR/**/<id>.npy`, each float (L_i, C) (time first; any numeric dtype, stored as float32),
found recursively and ordered by their path relative to NPY_DIR; the id is that path without
`.npy` (`clips/0001` for NPY_DIR/clips/0001.npy). Optionally:
- a labels file, JSON {id: class number}: every file needs one; `num_classes` is max + 1 unless given;
- a tags file, JSON {id: [tag ids]} ([] allowed): every file needs an entry; stored multi-hot, of
  width `num_tags` (max + 1 unless given).
A key may carry the `.npy` ending; keys with no file are ignored (their count is logged).

Every sequence becomes exactly `length` steps: a longer one keeps its first `length` steps (a
deterministic crop from the start), a shorter one is zero-padded and its real length stored (the
loader's mask); with `pad=False` a shorter one is an error naming it. Every file's header (rank,
width, dtype, length) and the labels and tags are checked before anything is written.

Resumable as `lsync_jax.tools.preprocess` is: each shard is written under a temporary name (locally,
then uploaded, for gs://) and appears under its own name only when complete, so a rerun of the same
command keeps finished shards and redoes the rest; a rerun with other settings into the same
directory is refused. Process p of P writes shards p, p + P, ...
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import time
from typing import Any, Callable

import numpy as np

from lsync_jax import storage
from lsync_jax.data.latents import RecordCodec, shard_writer
from lsync_jax.data.sequences import (
    FORMAT,
    METADATA,
    VERSION,
    npy_header,
    read_metadata,
    read_npy,
    record_fields,
    shard_name,
)

# Metadata that must agree for a rerun to resume into an existing directory.
_RESUME_KEYS = ("length", "channels", "pad", "crop", "fields", "num_records", "shard_size", "num_shards", "shards",
                "num_classes", "label_range", "num_tags", "source")


@dataclasses.dataclass(frozen=True)
class SequenceSpec:
    length: int  # steps per stored sequence: longer ones are cut after it, shorter ones padded
    pad: bool = True  # False: a sequence shorter than `length` is an error
    shard_size: int = 1024
    num_classes: int = 0  # with labels: the class count (0: max label + 1)
    num_tags: int = 0  # with tags: the multi-hot width (0: max tag + 1)
    limit: int = 0  # > 0: only the first `limit` files
    num_workers: int = 8  # threads reading files
    process_index: int = 0  # several hosts: this one writes shards p, p + P, ...
    process_count: int = 1


def npy_files(folder: str) -> list[tuple[str, str]]:
    """(id, path) of every .npy under `folder` (recursively), sorted by id."""
    root = storage.absolute(folder)
    if not storage.is_remote(root):
        found = [os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root, followlinks=True)
                 for f in files if f.endswith(".npy")]
        found = [p.replace(os.sep, "/") for p in found]
    else:
        found = [str(p)[len(root) + 1:] for p in storage.path(root).rglob("*.npy") if p.is_file()]
    return sorted((rel[: -len(".npy")], storage.join(root, *rel.split("/"))) for rel in found)


def _keyed(path: str, what: str) -> dict[str, Any]:
    """A JSON object {id: value} with any `.npy` ending dropped from its keys."""
    if not storage.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    table = storage.read_json(path, what)
    if not isinstance(table, dict):
        raise ValueError(f"{what} {path} must be a JSON object {{id: value}}, got {type(table).__name__}")
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = key[: -len(".npy")] if key.endswith(".npy") else key
        if name in out and out[name] != value:
            raise ValueError(f"{what} {path}: {name!r} appears twice (with and without .npy) with different values")
        out[name] = value
    return out


def read_labels(path: str, ids: list[str], num_classes: int) -> tuple[np.ndarray, int]:
    """(label per id, num_classes) from a labels file; an error names the file and the id."""
    table = _keyed(path, "labels file")
    labels = np.zeros(len(ids), np.int64)
    for i, name in enumerate(ids):
        if name not in table:
            raise ValueError(f"labels file {path} has no label for {name!r} ({name}.npy); every file needs one")
        value = table[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"labels file {path}: the label of {name!r} is {value!r}; labels are class numbers >= 0")
        if num_classes and value >= num_classes:
            raise ValueError(f"labels file {path}: the label of {name!r} is {value}, outside 0..{num_classes - 1} "
                             f"(--num_classes={num_classes})")
        labels[i] = value
    return labels, num_classes or int(labels.max()) + 1


def read_tags(path: str, ids: list[str], num_tags: int) -> tuple[np.ndarray, int]:
    """(uint8 multi-hot (N, T), num_tags) from a tags file; an error names the file, the id and the tag."""
    table = _keyed(path, "tags file")
    lists = []
    for name in ids:
        if name not in table:
            raise ValueError(f"tags file {path} has no entry for {name!r} ({name}.npy); every file needs one "
                             "([] for none)")
        value = table[name]
        if not isinstance(value, list) or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in value):
            raise ValueError(f"tags file {path}: the tags of {name!r} are {value!r}; expected a list of tag ids >= 0")
        if num_tags and any(t >= num_tags for t in value):
            raise ValueError(f"tags file {path}: {name!r} has tag {max(value)}, outside 0..{num_tags - 1} "
                             f"(--num_tags={num_tags})")
        lists.append(value)
    num_tags = num_tags or 1 + max((max(v) for v in lists if v), default=-1)
    if num_tags < 1:
        raise ValueError(f"tags file {path} names no tag at all; give --num_tags or leave the tags out")
    multi_hot = np.zeros((len(ids), num_tags), np.uint8)
    for i, value in enumerate(lists):
        multi_hot[i, value] = 1
    return multi_hot, num_tags


def scan(files: list[tuple[str, str]], spec: SequenceSpec) -> tuple[np.ndarray, int]:
    """(every file's length, the shared width C), from the headers, before anything is written."""
    with concurrent.futures.ThreadPoolExecutor(max(1, spec.num_workers)) as pool:
        headers = list(pool.map(npy_header, [path for _, path in files]))
    first_path, (first_shape, _) = files[0][1], headers[0]
    for (_, path), (shape, dtype) in zip(files, headers):
        if len(shape) != 2:
            raise ValueError(f"{path} holds an array of shape {shape}; expected (length, channels), time first")
        if dtype.kind not in "fiu":
            raise ValueError(f"{path} holds {dtype} values; expected numbers (stored as float32)")
        if shape[1] != first_shape[1]:  # the first file's rank was checked first
            raise ValueError(f"{path} has {shape[1]} channels but {first_path} has {first_shape[1]}: every sequence "
                             "needs the same width")
        if shape[0] < 1:
            raise ValueError(f"{path} is empty (shape {shape})")
        if shape[0] < spec.length and not spec.pad:
            raise ValueError(f"{path} has {shape[0]} steps, fewer than --length={spec.length}; pad it (--pad) or "
                             "choose a shorter --length")
    return np.asarray([shape[0] for shape, _ in headers], np.int64), first_shape[1]


def load_sequence(path: str, length: int, channels: int) -> tuple[np.ndarray, int]:
    """(float32 (length, C): cut after `length` steps or zero-padded, the real steps kept) of one file."""
    array = read_npy(path)
    if array.ndim != 2 or array.shape[1] != channels:
        raise ValueError(f"{path} now holds shape {array.shape}; expected (steps, {channels}) (did it change?)")
    x = np.zeros((length, channels), np.float32)
    steps = min(len(array), length)
    x[:steps] = array[:steps]
    if not np.isfinite(x).all():
        step = int(np.argmax(~np.isfinite(x).all(axis=1)))
        raise ValueError(f"{path}: step {step} holds a non-finite value (NaN or inf, or too large for float32)")
    return x, steps


def preprocess_sequences(npy_dir: str, out_dir: str, spec: SequenceSpec, labels_path: str = "", tags_path: str = "",
                         log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the `.npy` sequences under `npy_dir` as shards in `out_dir` (format: `lsync_jax.data.sequences`).

    Returns a summary: shards written and skipped by this process, sequences written, seconds, the
    metadata's path.
    """
    if spec.length < 1 or spec.shard_size < 1 or spec.limit < 0 or spec.num_classes < 0 or spec.num_tags < 0:
        raise ValueError(f"bad preprocessing settings {spec}: length and shard_size >= 1; limit, num_classes and "
                         "num_tags >= 0")
    if not 0 <= spec.process_index < spec.process_count:
        raise ValueError(f"process_index={spec.process_index} must be in [0, process_count={spec.process_count})")
    storage.check_remote(npy_dir)
    if not storage.isdir(npy_dir):
        raise FileNotFoundError(f"--npy_dir={npy_dir!r} is not a directory (expected a folder of .npy files)")
    files = npy_files(npy_dir)
    if not files:
        raise FileNotFoundError(f"no .npy files under {npy_dir!r}")
    files = files[: spec.limit] if spec.limit else files
    ids = [name for name, _ in files]
    labels, num_classes = (read_labels(labels_path, ids, spec.num_classes) if labels_path
                           else (np.zeros(len(ids), np.int64), 0))
    tags, num_tags = read_tags(tags_path, ids, spec.num_tags) if tags_path else (None, 0)
    lengths, channels = scan(files, spec)
    log(f"{npy_dir}: {len(files):,} sequences of {lengths.min()}..{lengths.max()} steps x {channels} channels; "
        f"{int((lengths > spec.length).sum()):,} cut to {spec.length}, {int((lengths < spec.length).sum()):,} padded"
        + (f"; {num_classes} classes" if labels_path else "") + (f"; {num_tags} tags" if tags_path else ""))

    num_records = len(files)
    num_shards = max(1, math.ceil(num_records / spec.shard_size))
    fields = record_fields(spec.length, channels, num_tags)
    meta = {
        "format": FORMAT, "version": VERSION, "length": spec.length, "channels": channels, "pad": spec.pad,
        "crop": "start", "fields": [[k, d, list(s)] for k, (d, s) in fields.items()],  # a list: the order is the layout
        "num_records": num_records, "shard_size": spec.shard_size, "num_shards": num_shards,
        "shards": [shard_name(i, num_shards) for i in range(num_shards)],
        "num_classes": num_classes, "label_range": [int(labels.min()), int(labels.max())] if labels_path else None,
        "num_tags": num_tags,
        "steps": {"min": int(lengths.min()), "max": int(lengths.max()), "cut": int((lengths > spec.length).sum()),
                  "padded": int((lengths < spec.length).sum())},
        "source": {"kind": "npy", "path": storage.absolute(npy_dir),
                   "labels": storage.absolute(labels_path) if labels_path else None,
                   "tags": storage.absolute(tags_path) if tags_path else None},
    }
    storage.makedirs(out_dir)
    meta_path = storage.join(out_dir, METADATA)
    if storage.exists(meta_path):
        existing = read_metadata(out_dir)
        diffs = [k for k in _RESUME_KEYS if existing.get(k) != meta.get(k)]
        if diffs:
            shown = "; ".join(f"{k}: on disk {existing.get(k)!r}, now {meta.get(k)!r}" for k in diffs)[:1500]
            raise ValueError(f"{out_dir} already holds sequences made with other settings or inputs ({shown}). Use "
                             "another --out, or the same flags and inputs to resume.")
    elif spec.process_index == 0:
        storage.write_json_atomic(meta_path, meta)

    codec = RecordCodec(fields)
    mine = range(spec.process_index, num_shards, spec.process_count)
    present = set(storage.listdir(out_dir))  # one listing, not a request per shard on gs://
    todo = [k for k in mine if meta["shards"][k] not in present]
    skipped = len(mine) - len(todo)
    if skipped:
        log(f"{skipped} finished shard(s) kept, {len(todo)} to write")

    start, written = time.perf_counter(), 0
    with concurrent.futures.ThreadPoolExecutor(max(1, spec.num_workers)) as pool:
        for k in todo:
            indices = range(k * spec.shard_size, min((k + 1) * spec.shard_size, num_records))
            final = storage.join(out_dir, meta["shards"][k])
            with shard_writer(final, str(spec.process_index)) as writer:
                loaded = pool.map(lambda i: load_sequence(files[i][1], spec.length, channels), indices)
                for i, (x, steps) in zip(indices, loaded):
                    values = {"x": x, "length": np.int32(steps), "label": np.int32(labels[i]), "index": np.int64(i)}
                    if tags is not None:
                        values["tags"] = tags[i]
                    writer.write(codec.encode(values))
            written += len(indices)
            log(f"shard {k + 1}/{num_shards}: {len(indices):,} sequences -> {final}")
    return {"written": len(todo), "skipped": skipped, "sequences": written, "seconds": time.perf_counter() - start,
            "metadata": meta_path}
