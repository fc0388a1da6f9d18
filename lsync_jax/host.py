"""Host-side helpers shared by training and evaluation: whole arrays on every process, agreement
between processes, and files that are either complete or absent."""

from __future__ import annotations

import io
import json
import math
import os
import time
import uuid
import zipfile
from typing import Any, Iterable, Mapping

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


def initialize_distributed(dist: Mapping[str, Any]) -> None:
    """jax.distributed.initialize() when config.distributed.enabled (before any other JAX call); once
    per process (a recipe's phases share it). Empty / -1 values are auto-detected (TPU pods, SLURM)."""
    if not dist["enabled"] or jax.distributed.is_initialized():
        return
    if dist["cpu_collectives"]:
        jax.config.update("jax_cpu_collectives_implementation", dist["cpu_collectives"])
    num, pid = dist["num_processes"], dist["process_id"]
    jax.distributed.initialize(coordinator_address=dist["coordinator_address"] or None,
                               num_processes=None if num is None or num < 0 else num,
                               process_id=None if pid is None or pid < 0 else pid)


def check_writable(directory: str) -> None:
    """Write, read back and delete a probe file in `directory` (creating it and missing parents for the
    probe and, with one process, removing them again, so that a run refused later leaves the file
    system as found; several processes probing a shared disk keep them, not to remove one another's):
    a directory a run will write that it cannot (permissions, a full or read-only disk) fails at
    start, naming it, instead of at the first save after hours of training. OSError with the errno
    and the path."""
    path = epath.Path(directory)
    created = []
    parent = path
    while not parent.exists() and parent != parent.parent:
        created.append(parent)
        parent = parent.parent
    probe = path / f".lsync_jax_write_probe.{uuid.uuid4().hex}"
    payload = b"lsync-jax write probe\n"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(payload)
        if probe.read_bytes() != payload:
            raise OSError(f"the probe file {probe} read back differently")
        probe.unlink()
    except OSError as e:
        raise OSError(e.errno, f"{directory} is not writable ({e.strerror or e}); the run writes there. Check its "
                      "permissions and free space, or choose another --workdir") from None
    finally:
        for folder in created if jax.process_count() == 1 else ():  # deepest first; never hides the error
            try:
                folder.rmdir()
            except OSError:
                pass


# Whose INFO lines reach the console: lsync-jax's own, clu's metric lines and progress reports.
_CONSOLE_INFO_FROM = (os.sep + "lsync_jax" + os.sep, os.sep + "launch" + os.sep,
                      os.path.join("clu", "metric_writers"), os.path.join("clu", "periodic_actions"))


# Orbax warns each time a run's checkpoints are opened read-only (to list steps or read meta): noise.
_ORBAX_READ_ONLY = ("read_only=True, setting save_interval_steps=0", "Given directory is read only")


class _OwnInfoOnly:
    """A logging filter: warnings and errors from anyone, INFO only from the modules above."""

    def filter(self, record: Any) -> bool:
        if record.levelno >= 30:
            return not any(text in str(record.msg) for text in _ORBAX_READ_ONLY)
        return any(part in record.pathname for part in _CONSOLE_INFO_FROM)


def quiet_library_logs() -> None:
    """Keep the console to what a user needs: metric lines, progress, lsync-jax's own messages and every
    warning. Libraries' INFO logging (Orbax prints about 93 lines for 10 steps of the tiny config) is
    dropped; set LSYNC_JAX_LIBRARY_LOGS=1 to see it."""
    if os.environ.get("LSYNC_JAX_LIBRARY_LOGS", "") not in ("", "0"):
        return
    from absl import logging as absl_logging

    handler = absl_logging.get_absl_handler()
    if not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
        handler.addFilter(_OwnInfoOnly())


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """`x` with zero rows appended along axis 0 up to `rows` (one compiled shape for a short last
    batch, or whole shards per device; callers drop the padding from the results)."""
    if len(x) >= rows:
        return x
    return np.concatenate([x, np.zeros((rows - len(x), *x.shape[1:]), x.dtype)])


def _remove_quietly(path: Any) -> None:
    """Remove a temporary file after a failed write; a failure to remove must not hide the first error."""
    try:
        if path.exists():
            path.unlink()
    except OSError:
        pass


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write through a uniquely named temporary file and a replacing rename: readers (and concurrent
    writers of the same content, e.g. several hosts on a shared disk) never see a partial file, a rerun
    replaces the file it wrote before (os.replace on local disks; on gs:// and other epath backends
    their replace, which overwrites), and a write that fails or is interrupted leaves no temporary
    file behind."""
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    try:
        if "://" in str(path):
            tmp.write_bytes(data)
            tmp.replace(target)
        else:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # the bytes reach the disk before the name does
            os.replace(tmp, target)
    except BaseException:
        _remove_quietly(tmp)
        raise


def save_npz_atomic(path: str, **arrays: Any) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes_atomic(path, buffer.getvalue())


def read_json(path: str, what: str = "JSON file") -> Any:
    """A JSON file's content; a damaged or unreadable file is an error naming it."""
    try:
        return json.loads(epath.Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is damaged (not valid JSON: {e})") from None


def write_json_atomic(path: str, payload: Any) -> None:
    write_bytes_atomic(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def write_adm_batch(path: str, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Stream (uint8 images, labels) batches into an ADM-style .npz (arr_0 images, arr_1 labels) at a
    local `path`, never holding all images in memory (50,000 at 512 px are 39 GB); the file appears
    complete or not at all. Returns (the first 100 images, all labels)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    images_file = tmp + ".arr_0"
    first, labels, count, shape = [], [], 0, None
    try:
        with open(images_file, "wb") as raw:  # the images' bytes, then one header in front of them
            for images, batch_labels in batches:
                images = np.ascontiguousarray(images, np.uint8)
                if shape is not None and images.shape[1:] != shape:
                    raise ValueError(f"image batches of shapes {shape} and {images.shape[1:]}")
                shape = images.shape[1:]
                raw.write(images.tobytes())
                count += len(images)
                labels.append(np.asarray(batch_labels))
                if sum(map(len, first)) < 100:
                    first.append(images[: 100 - sum(map(len, first))])
        if shape is None:
            raise ValueError("no images to write")
        labels_all = np.concatenate(labels)
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as f, open(images_file, "rb") as raw:
                np.lib.format.write_array_header_2_0(
                    f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                        "shape": (count, *shape)})
                while chunk := raw.read(1 << 24):
                    f.write(chunk)
            with archive.open("arr_1.npy", "w") as f:
                np.lib.format.write_array(f, labels_all)
        os.replace(tmp, path)
    finally:
        for leftover in (images_file, tmp):
            if os.path.exists(leftover):
                os.remove(leftover)
    return np.concatenate(first), labels_all


# -- sample grids: model-space images in [-1, 1] -> one uint8 picture, saved as PNG --------------------
def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] float NHWC -> uint8 NHWC, as ADM sample batches store them."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 (N, H, W, C) -> one uint8 (rows * (H + pad) + pad, ..., C) grid, row-major."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = images[i]
    return grid


def save_png(path: str, grid: np.ndarray) -> None:
    """A PNG written whole or not at all (an interrupted run leaves no half picture)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())


# -- progress of long phases -----------------------------------------------------------------------------


class Progress:
    """Logs a long phase's start, its progress with rate and ETA (at most every `every_secs`), and its
    end, so that no phase longer than a few seconds runs silently (FID sampling, reference statistics,
    block measurements)."""

    def __init__(self, what: str, total: int, unit: str = "images", every_secs: float = 30.0,
                 log: Any = None):
        from absl import logging as absl_logging

        self.what, self.total, self.unit, self.every = what, int(total), unit, every_secs
        self.log = log or absl_logging.info
        self.done = 0
        self.start = self._last = time.perf_counter()
        self.log(f"{what}: {self.total:,} {unit}")

    def update(self, n: int) -> None:
        self.done += int(n)
        now = time.perf_counter()
        if now - self._last >= self.every and self.done < self.total:
            self._last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            self.log(f"{self.what}: {self.done:,} / {self.total:,} {self.unit} ({rate:.1f}/s, about {eta:.0f} s left)")

    def finish(self) -> float:
        seconds = time.perf_counter() - self.start
        self.log(f"{self.what}: done, {self.done:,} {self.unit} in {seconds:.1f} s")
        return seconds
