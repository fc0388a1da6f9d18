"""Fashion-MNIST read directly from its IDX files: real data with no download.

Debian's `dataset-fashion-mnist` package installs the original files (gzip re-compressed, so
tfds checksums differ) under /usr/share/datasets/fashion-mnist; any directory with the four
files, gzipped or not, works.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (optionally .gz): magic 0 0 <dtype> <ndim>, big-endian dims, data."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    array = np.frombuffer(data, _IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {array.size} values")
    return array.reshape(dims)


def _find(data_dir: str, name: str) -> str:
    for candidate in (name + ".gz", name):
        path = os.path.join(data_dir, candidate)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST file {name}[.gz] not found in {data_dir!r}. Install Debian's package "
        f"(`apt-get install dataset-fashion-mnist`, files in {DEFAULT_DIR}) or point "
        "--config.data.dir at a directory holding the four IDX files."
    )


def load_fashion_mnist(split: str = "train", data_dir: str = DEFAULT_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28, 1), labels int32 (N,)) of the 'train' (60k) or 'test' (10k) split."""
    if split not in FILES:
        raise ValueError(f"Fashion-MNIST split {split!r}; expected one of {sorted(FILES)}")
    image_file, label_file = FILES[split]
    images = read_idx(_find(data_dir, image_file))
    labels = read_idx(_find(data_dir, label_file))
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"Fashion-MNIST in {data_dir!r}: images {images.shape} and labels {labels.shape} disagree")
    return images[..., None].astype(np.uint8), labels.astype(np.int32)
