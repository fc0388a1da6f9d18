"""Moving Fashion-MNIST: clips reproducible from (seed, split, index), items bouncing inside the
canvas, labels from the first item, the training example, the loader, and errors."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest

from lsync_jax.data import FASHION_MNIST_DIR, LoaderSpec, MovingFashionMNISTSource, make_loader
from lsync_jax.data.moving_fmnist import bounce


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def blocks(tmp_path_factory):
    """A Fashion-MNIST directory of 12 solid 28x28 blocks: image i is all 20 * (i + 1), label i % 10,
    so each item's place in a frame and its identity can be read off the clip."""
    directory = tmp_path_factory.mktemp("fmnist")
    n = 12
    images = np.repeat(20 * (np.arange(n) + 1), 28 * 28).reshape(n, 28, 28)
    labels = np.arange(n) % 10
    for prefix in ("train", "t10k"):
        write_idx(str(directory / f"{prefix}-images-idx3-ubyte.gz"), images)
        write_idx(str(directory / f"{prefix}-labels-idx1-ubyte.gz"), labels)
    return str(directory)


def test_clips_are_reproducible_in_any_order_and_process(blocks):
    source = MovingFashionMNISTSource(50, data_dir=blocks, canvas=40, items=2, speed=3.0, seed=7)
    forward = [source[i]["video"] for i in range(10)]
    again = MovingFashionMNISTSource(50, data_dir=blocks, canvas=40, items=2, speed=3.0, seed=7)
    backward = {i: again[i]["video"] for i in reversed(range(10))}
    unpickled = pickle.loads(pickle.dumps(source))  # as a grain worker process gets it
    for i in range(10):
        np.testing.assert_array_equal(forward[i], backward[i])
        np.testing.assert_array_equal(forward[i], unpickled[i]["video"])
    other_seed = MovingFashionMNISTSource(50, data_dir=blocks, canvas=40, items=2, speed=3.0, seed=8)
    assert any(not np.array_equal(forward[i], other_seed[i]["video"]) for i in range(10))
    test_split = MovingFashionMNISTSource(50, split="test", data_dir=blocks, canvas=40, items=2, speed=3.0, seed=7)
    assert any(not np.array_equal(forward[i], test_split[i]["video"]) for i in range(10))


def test_bounce_reflects_off_both_walls():
    """The closed form equals stepping a point and mirroring it at each wall, for speeds past the room."""
    room = 5.0
    for start, velocity in [(0.0, 1.3), (4.9, 2.7), (2.0, -11.0), (3.0, 0.0)]:
        p, v, stepped = start, velocity, []
        for _ in range(40):
            stepped.append(p)
            p += v
            while not 0 <= p <= room:  # several reflections in one step when |v| > room
                p, v = (-p, -v) if p < 0 else (2 * room - p, -v)
        np.testing.assert_allclose(bounce(start + velocity * np.arange(40.0), room), stepped, atol=1e-9)
    np.testing.assert_array_equal(bounce(np.arange(4.0), 0.0), np.zeros(4))


def test_items_stay_inside_the_canvas_and_are_drawn_where_they_are(blocks):
    source = MovingFashionMNISTSource(40, data_dir=blocks, canvas=36, items=1, frames=12, speed=5.0)
    for i in range(40):
        picks, positions = source.trajectory(i)
        assert positions.shape == (1, 12, 2)
        assert positions.min() >= 0 and positions.max() <= 36 - 28
        video = source[i]["video"]
        assert video.shape == (12, 36, 36, 1) and video.dtype == np.uint8
        for frame, (top, left) in zip(video[..., 0], np.rint(positions[0]).astype(int)):
            expected = np.zeros((36, 36), np.uint8)
            expected[top: top + 28, left: left + 28] = 20 * (picks[0] + 1)
            np.testing.assert_array_equal(frame, expected)


def test_items_move_and_bounce(blocks):
    source = MovingFashionMNISTSource(30, data_dir=blocks, canvas=44, items=1, frames=16, speed=2.0, item_size=14)
    for i in range(30):
        video = source[i]["video"]
        assert len({frame.tobytes() for frame in video}) > 1, f"clip {i} does not move"
        _, positions = source.trajectory(i)
        steps = np.linalg.norm(np.diff(positions[0], axis=0), axis=-1)
        assert steps.max() <= 2.0 + 1e-9  # the speed, less where a wall reflects the step
    # with room for only 4 px and 16 frames at 2 px/frame, every clip reflects off a wall
    small = MovingFashionMNISTSource(10, data_dir=blocks, canvas=32, frames=16, speed=2.0)
    for i in range(10):
        _, positions = small.trajectory(i)
        steps = np.abs(np.diff(positions[0], axis=0))
        assert (np.diff(np.sign(np.diff(positions[0], axis=0)), axis=0) != 0).any()  # a direction reversed
        assert steps.max() <= 2.0 + 1e-9 and positions.max() <= 4


def test_label_is_the_first_items_class(blocks):
    source = MovingFashionMNISTSource(30, data_dir=blocks, canvas=64, items=3, frames=4, speed=2.0)
    for i in range(30):
        picks, positions = source.trajectory(i)
        record = source[i]
        assert record["label"].dtype == np.int32 and int(record["label"]) == picks[0] % 10
        top, left = np.rint(positions[0, 0]).astype(int)
        # composited by max: the first item's block is at least its own brightness everywhere
        assert record["video"][0, top: top + 28, left: left + 28, 0].min() >= 20 * (picks[0] + 1)
        assert record["video"][0].max() == 20 * (max(picks) + 1)


def test_example_and_loader(blocks):
    source = MovingFashionMNISTSource(16, data_dir=blocks)  # the defaults: 8 frames of 32 x 32, one item
    assert (source.frames, source.frame_shape, source.num_classes) == (8, (32, 32, 1), 10)
    assert (source.kind, source.example_keys, source.num_tags, len(source)) == ("video", ("x", "y"), 0, 16)
    record = source[3]
    plain = source.example(record, np.random.default_rng(0), False)
    assert plain["x"].dtype == np.float32 and plain["x"].shape == (8, 32, 32, 1) and plain["y"].dtype == np.int32
    assert plain["x"].min() >= -1 and plain["x"].max() <= 1
    np.testing.assert_allclose(plain["x"], record["video"] / 127.5 - 1, atol=1e-6)
    flips = [source.example(record, np.random.default_rng(s), True)["x"] for s in range(8)]
    mirrored = [np.array_equal(x, plain["x"][:, :, ::-1]) for x in flips]
    kept = [np.array_equal(x, plain["x"]) for x in flips]
    assert any(mirrored) and any(kept) and all(m or k for m, k in zip(mirrored, kept))
    batch = next(iter(make_loader(source, LoaderSpec(global_batch_size=4, seed=1, flip=True), process_index=0,
                                  process_count=1)))
    assert batch["x"].shape == (4, 8, 32, 32, 1) and batch["y"].shape == (4,)
    with pytest.raises(ValueError, match="images and image latents only"):
        make_loader(source, LoaderSpec(global_batch_size=4, fields=("image",)), process_index=0, process_count=1)


def test_bad_settings_name_the_problem(blocks):
    with pytest.raises(ValueError, match="canvas=27 is smaller than the 28x28 items"):
        MovingFashionMNISTSource(10, data_dir=blocks, canvas=27)
    MovingFashionMNISTSource(10, data_dir=blocks, canvas=27, item_size=20)  # smaller items fit
    with pytest.raises(ValueError, match="frames=0"):
        MovingFashionMNISTSource(10, data_dir=blocks, frames=0)
    with pytest.raises(ValueError, match="items=0"):
        MovingFashionMNISTSource(10, data_dir=blocks, items=0)
    with pytest.raises(ValueError, match="num_clips=0"):
        MovingFashionMNISTSource(0, data_dir=blocks)
    with pytest.raises(ValueError, match="speed=-1"):
        MovingFashionMNISTSource(10, data_dir=blocks, speed=-1.0)
    with pytest.raises(ValueError, match="split 'val'"):
        MovingFashionMNISTSource(10, split="val", data_dir=blocks)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        MovingFashionMNISTSource(10, data_dir=os.path.join(blocks, "missing"))
    source = MovingFashionMNISTSource(10, data_dir=blocks)
    with pytest.raises(ValueError, match="10 classes"):
        source.check_labels(5)
    source.check_labels(10)
    with pytest.raises(IndexError, match="clip 10 out of range"):
        source[10]


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="Debian's dataset-fashion-mnist not installed")
def test_the_real_images():
    source = MovingFashionMNISTSource(100, split="test", items=2, item_size=16, speed=2.0)
    labels = [int(source[i]["label"]) for i in range(100)]
    assert set(labels) <= set(range(10)) and len(set(labels)) > 5
    video = source[0]["video"]
    assert video.shape == (8, 32, 32, 1) and video.max() > 100 and len({f.tobytes() for f in video}) > 1
