"""Fashion-MNIST read directly from its IDX files: real data with no download.

Debian's `dataset-fashion-mnist` package installs the original files (gzip re-compressed, so
tfds checksums differ) under /usr/share/datasets/fashion-mnist; any directory with the four
files, gzipped or not, works.
"""

from __future__ import annotations

import gzip
import zlib
from typing import Any, Mapping

import numpy as np

from lsync_jax import storage
from lsync_jax.data.registry import register_source
from lsync_jax.data.sources import ArraySource, check_label_array

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (optionally .gz): magic 0 0 <dtype> <ndim>, big-endian dims, data. A damaged
    file (truncated, bad gzip stream or checksum) is an error naming it."""
    try:
        data = storage.read_bytes(path)
        data = gzip.decompress(data) if path.endswith(".gz") else data
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path} is damaged ({type(e).__name__}: {e}): replace it with an intact copy "
                         "of the IDX file (gzipped or not)") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path} is truncated: it ends inside its header ({len(data)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    payload = len(data) - 4 - 4 * ndim
    if payload != int(np.prod(dims)) * dtype.itemsize:
        raise ValueError(f"{path}: header says {dims} values of {dtype} ({int(np.prod(dims)) * dtype.itemsize} "
                         f"bytes) but holds {payload} bytes (truncated or damaged)")
    return np.frombuffer(data, dtype, offset=4 + 4 * ndim).reshape(dims)


def _find(data_dir: str, name: str) -> str:
    for candidate in (name + ".gz", name):
        path = storage.join(data_dir, candidate)
        if storage.exists(path):
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST file {name}[.gz] not found in {data_dir!r}. Install Debian's package "
        f"(`apt-get install dataset-fashion-mnist`, files in {DEFAULT_DIR}) or point "
        "--config.data.dir at a directory holding the four IDX files."
    )


def files(split: str = "train", data_dir: str = DEFAULT_DIR) -> tuple[str, str]:
    """(images file, labels file) of the 'train' or 'test' split in `data_dir` (gzipped or not)."""
    if split not in FILES:
        raise ValueError(f"Fashion-MNIST split {split!r}; expected one of {sorted(FILES)}")
    image_file, label_file = FILES[split]
    return _find(data_dir, image_file), _find(data_dir, label_file)


def load_fashion_mnist(split: str = "train", data_dir: str = DEFAULT_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28, 1), labels int32 (N,)) of the 'train' (60k) or 'test' (10k) split.
    Every label is checked now: a label outside Fashion-MNIST's 10 classes names the file and index."""
    image_path, label_path = files(split, data_dir)
    images = read_idx(image_path)
    labels = read_idx(label_path)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"Fashion-MNIST in {data_dir!r}: images {images.shape} and labels {labels.shape} disagree")
    check_label_array(labels, len(CLASSES), label_path, f"Fashion-MNIST has {len(CLASSES)} classes")
    return images[..., None].astype(np.uint8), labels.astype(np.int32)


@register_source("fashion_mnist")
def fashion_mnist_source(data: Mapping[str, Any], split: str) -> ArraySource:
    """The 'train' or 'test' split from config.data.dir ('': Debian's dataset-fashion-mnist)."""
    images, labels = load_fashion_mnist(split, data["dir"] or DEFAULT_DIR)
    return ArraySource(images, labels, name=f"fashion_mnist/{split}")
