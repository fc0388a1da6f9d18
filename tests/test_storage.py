"""Files anywhere (lsync_jax.storage): ADM sample batches streamed to disk, atomic writes."""

import os

import numpy as np
import pytest

from lsync_jax.eval.evaluator import iter_npz_batches
from lsync_jax.storage import write_adm_batch, write_json_atomic


def test_adm_batch_is_streamed_into_a_readable_npz(tmp_path):
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 256, (n, 8, 6, 3), dtype=np.uint8), rng.integers(0, 10, n)) for n in (60, 60, 7)]
    path = str(tmp_path / "out" / "samples.npz")
    first, labels = write_adm_batch(path, iter(batches))
    images = np.concatenate([x for x, _ in batches])
    with np.load(path) as saved:  # numpy reads it as any np.savez file
        np.testing.assert_array_equal(saved["arr_0"], images)
        np.testing.assert_array_equal(saved["arr_1"], np.concatenate([y for _, y in batches]))
    np.testing.assert_array_equal(first, images[:100])
    np.testing.assert_array_equal(labels, np.concatenate([y for _, y in batches]))
    np.testing.assert_array_equal(np.concatenate(list(iter_npz_batches(path, batch_size=50))), images)
    assert os.listdir(tmp_path / "out") == ["samples.npz"]  # no temporary files left


def test_a_failed_adm_batch_leaves_nothing_behind(tmp_path):
    def broken():
        yield np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4)
        raise RuntimeError("sampler failed")

    with pytest.raises(RuntimeError, match="sampler failed"):
        write_adm_batch(str(tmp_path / "samples.npz"), broken())
    with pytest.raises(ValueError, match="shapes"):
        write_adm_batch(str(tmp_path / "samples.npz"), iter([(np.zeros((2, 8, 8, 3), np.uint8), np.zeros(2)),
                                                             (np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2))]))
    assert os.listdir(tmp_path) == []


def test_json_is_written_whole(tmp_path):
    write_json_atomic(str(tmp_path / "a" / "m.json"), {"b": 1, "a": [1, 2]})
    assert (tmp_path / "a" / "m.json").read_text().startswith("{\n  \"a\"")
    assert os.listdir(tmp_path / "a") == ["m.json"]
