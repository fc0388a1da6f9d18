"""Host-side helpers shared by training and evaluation: whole arrays on every process, agreement
between processes, and files that are either complete or absent."""

from __future__ import annotations

import io
import json
import uuid
from typing import Any

import jax
import numpy as np
from etils import epath


def gather_to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process) array as numpy, on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def all_processes(flag: bool) -> bool:
    """True only if `flag` is true on every process (so all take the same branch of a collective)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(bool(flag)))))


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write through a uniquely named temporary file and a rename: readers (and concurrent
    writers of the same content, e.g. several hosts on a shared disk) never see a partial file."""
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    tmp.write_bytes(data)
    tmp.rename(target)


def save_npz_atomic(path: str, **arrays: Any) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes_atomic(path, buffer.getvalue())


def write_json_atomic(path: str, payload: Any) -> None:
    write_bytes_atomic(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())
