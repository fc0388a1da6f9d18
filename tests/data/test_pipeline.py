"""grain pipelines: batches, determinism, per-process shards, flips, checkpointable iterators."""

import jax
import numpy as np
import pytest

from lsync_jax.data import ArraySource, LoaderSpec, SyntheticSource, global_batch, make_loader
from lsync_jax.sharding import batch_sharding, make_mesh


def source(n=64):
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 1), np.uint8)
    images[:, :, :2] = 0  # left half dark: a horizontal flip is visible
    return ArraySource(images, np.arange(n) % 10)


def ids(batch):
    return (batch["x"].max(axis=(1, 2, 3)) + 1) * 127.5


def test_batches_are_float_in_range_and_deterministic():
    spec = LoaderSpec(global_batch_size=8, seed=3)
    a = [b for _, b in zip(range(5), make_loader(source(), spec, process_index=0, process_count=1))]
    b = [b for _, b in zip(range(5), make_loader(source(), spec, process_index=0, process_count=1))]
    assert a[0]["x"].shape == (8, 4, 4, 1) and a[0]["x"].dtype == np.float32 and a[0]["y"].dtype == np.int32
    assert -1.0 <= a[0]["x"].min() and a[0]["x"].max() <= 1.0
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u["x"], v["x"])
    other = next(iter(make_loader(source(), LoaderSpec(global_batch_size=8, seed=4), process_index=0,
                                  process_count=1)))
    assert not np.array_equal(other["y"], a[0]["y"])


def test_processes_split_the_same_global_batches():
    spec = LoaderSpec(global_batch_size=8, num_epochs=1, flip=True, seed=2)
    single = list(make_loader(source(), spec, process_index=0, process_count=1))
    halves = [list(make_loader(source(), spec, process_index=p, process_count=2)) for p in range(2)]
    assert len(single) == len(halves[0]) == 8 and all(b["x"].shape[0] == 4 for b in halves[1])
    for whole, a, b in zip(single, *halves):  # process 0 holds the first half of each global batch
        np.testing.assert_array_equal(whole["x"], np.concatenate([a["x"], b["x"]]))
        np.testing.assert_array_equal(whole["y"], np.concatenate([a["y"], b["y"]]))
    seen = np.concatenate([np.round(ids(b)).astype(int) for b in single])
    assert sorted(seen) == list(range(64))  # one epoch visits every record once


def test_each_epoch_is_a_new_order():
    batches = list(make_loader(source(16), LoaderSpec(global_batch_size=16, num_epochs=2), process_index=0,
                               process_count=1))
    assert not np.array_equal(batches[0]["y"], batches[1]["y"]) or not np.array_equal(batches[0]["x"],
                                                                                      batches[1]["x"])


def test_flip_flips_about_half_of_the_images():
    batch = next(iter(make_loader(source(), LoaderSpec(global_batch_size=64, flip=True, num_epochs=1),
                                  process_index=0, process_count=1)))
    flipped = batch["x"][:, 0, 0, 0] > batch["x"][:, 0, 3, 0]  # dark half moved to the right
    assert 16 <= flipped.sum() <= 48


def test_iterator_state_resumes_exactly():
    loader = make_loader(source(), LoaderSpec(global_batch_size=8, seed=1, flip=True), process_index=0,
                         process_count=1)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    it2 = iter(loader)
    it2.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(it2)["x"], want["x"])


def test_bad_batch_sizes_raise():
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        make_loader(source(), LoaderSpec(global_batch_size=8), process_index=0, process_count=3)
    with pytest.raises(ValueError, match="too few"):
        make_loader(source(4), LoaderSpec(global_batch_size=8), process_index=0, process_count=1)


def test_synthetic_source_and_global_batch():
    src = SyntheticSource(16, (8, 8, 3), 5, seed=1)
    np.testing.assert_array_equal(src[3]["image"], SyntheticSource(16, (8, 8, 3), 5, seed=1)[3]["image"])
    batch = next(iter(make_loader(src, LoaderSpec(global_batch_size=4), process_index=0, process_count=1)))
    arrays = global_batch(batch, batch_sharding(make_mesh()))
    assert arrays["x"].shape == (4, 8, 8, 3) and isinstance(arrays["x"], jax.Array)


def test_unprepared_tfds_dataset_says_how_to_prepare_it(tmp_path):
    from lsync_jax.data import TfdsSource

    with pytest.raises(FileNotFoundError, match="tfds build cifar10 --file_format=array_record"):
        TfdsSource("cifar10", data_dir=str(tmp_path))
