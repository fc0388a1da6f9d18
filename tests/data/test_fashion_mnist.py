"""IDX reading on files the test writes, and (where installed) the real Debian Fashion-MNIST."""

import gzip
import os
import struct

import numpy as np
import pytest

from lsync_jax.data import FASHION_MNIST_DIR, load_fashion_mnist, read_idx


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)


def make_split(directory, prefix, n, gz=True):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    ext = ".gz" if gz else ""
    write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte{ext}"), images)
    write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{ext}"), labels)
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
def test_reads_what_was_written(tmp_path, gz):
    images, labels = make_split(str(tmp_path), "train", 7, gz)
    x, y = load_fashion_mnist("train", str(tmp_path))
    assert x.shape == (7, 28, 28, 1) and x.dtype == np.uint8 and y.dtype == np.int32
    np.testing.assert_array_equal(x[..., 0], images)
    np.testing.assert_array_equal(y, labels)


def test_missing_files_and_bad_files_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", str(tmp_path / "nowhere"))
    bad = tmp_path / "x-idx"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(str(bad))
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation", str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="Debian's dataset-fashion-mnist not installed")
def test_the_real_dataset():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28, 1) and sorted(np.unique(y)) == list(range(10))
    assert np.bincount(y).tolist() == [1000] * 10
