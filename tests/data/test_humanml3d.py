"""HumanML3D in its own layout, on a tiny fake tree: normalisation, crop or pad with a mask, the
loader, and errors naming the missing or malformed file."""

import os

import numpy as np
import pytest

from lsync_jax import storage
from lsync_jax.data import HumanML3DSource, LoaderSpec, make_loader

FRAMES = {"000001": 14, "000002": 30, "M000001": 6, "000003": 10, "000004": 25}  # id -> frames
SPLITS = {"train": ["000001", "000002", "M000001"], "val": ["000003"], "test": ["000003", "000004"]}


def make_tree(root, width=263):
    """ROOT/new_joint_vecs/<id>.npy, Mean.npy, Std.npy and the split lists; returns {id: motion}."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "new_joint_vecs"))
    motions = {}
    for name, frames in FRAMES.items():
        motions[name] = rng.standard_normal((frames, width)).astype(np.float32) * 3 + 1
        np.save(os.path.join(root, "new_joint_vecs", name + ".npy"), motions[name])
    np.save(os.path.join(root, "Mean.npy"), np.full(width, 1.0, np.float32))
    np.save(os.path.join(root, "Std.npy"), np.linspace(1, 4, width).astype(np.float32))
    for split, ids in SPLITS.items():
        with open(os.path.join(root, f"{split}.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
    return motions


@pytest.fixture
def tree(tmp_path):
    root = str(tmp_path / "HumanML3D")
    return root, make_tree(root)


def normalised(motion):
    return (motion - 1.0) / np.linspace(1, 4, 263).astype(np.float32)


def test_records_are_normalised_motions_of_the_split(tree):
    root, motions = tree
    source = HumanML3DSource(root, "train", length=12)
    assert len(source) == 3 and source.ids == SPLITS["train"] and source.frames.tolist() == [14, 30, 6]
    assert (source.length, source.channels, source.example_keys, source.num_tags, source.num_classes) == (
        12, 263, ("x", "y", "mask"), 0, 0)
    for i, name in enumerate(SPLITS["train"]):
        record = source[i]
        assert record["motion"].dtype == np.float32 and int(record["index"]) == i
        np.testing.assert_allclose(record["motion"], normalised(motions[name]), rtol=1e-6)
    assert len(HumanML3DSource(root, "test")) == 2


def test_examples_crop_or_pad_with_a_mask(tree):
    root, motions = tree
    source = HumanML3DSource(root, "train", length=12)
    short = source.example(source[2], np.random.default_rng(0), False)  # 6 frames: padded
    assert short["x"].shape == (12, 263) and short["x"].dtype == np.float32 and short["y"] == 0
    assert short["y"].dtype == np.int32 and short["mask"].dtype == bool
    assert short["mask"].tolist() == [True] * 6 + [False] * 6 and not short["x"][6:].any()
    np.testing.assert_allclose(short["x"][:6], normalised(motions["M000001"]), rtol=1e-6)
    full = normalised(motions["000002"])  # 30 frames: a random window of 12
    starts = set()
    for seed in range(12):
        x = source.example(source[1], np.random.default_rng(seed), False)
        assert x["mask"].all()
        start = [s for s in range(19) if np.allclose(x["x"], full[s: s + 12], rtol=1e-6)]
        assert len(start) == 1
        starts.add(start[0])
        again = source.example(source[1], np.random.default_rng(seed), False)
        np.testing.assert_array_equal(x["x"], again["x"])  # the same rng, the same window
    assert len(starts) > 3
    fixed = HumanML3DSource(root, "train", length=12, crop="start")
    np.testing.assert_allclose(fixed.example(fixed[1], np.random.default_rng(5), False)["x"], full[:12], rtol=1e-6)


def test_loader_batches(tree):
    root, _ = tree
    source = HumanML3DSource(root, "train", length=8)
    batch = next(iter(make_loader(source, LoaderSpec(global_batch_size=2, seed=0), process_index=0, process_count=1)))
    assert batch["x"].shape == (2, 8, 263) and batch["mask"].shape == (2, 8) and batch["y"].tolist() == [0, 0]
    with pytest.raises(ValueError, match="set --config.data.flip=False"):
        make_loader(source, LoaderSpec(global_batch_size=2, flip=True), process_index=0, process_count=1)
    with pytest.raises(ValueError, match="has no class labels.*train an unconditional model"):
        source.check_labels(10)


def test_missing_files_are_named(tree):
    root, _ = tree
    for name in ("Mean.npy", "Std.npy"):
        os.rename(os.path.join(root, name), os.path.join(root, name + ".bak"))
        with pytest.raises(FileNotFoundError, match=f"normalisation file {root}/{name} is missing"):
            HumanML3DSource(root)
        os.rename(os.path.join(root, name + ".bak"), os.path.join(root, name))
    with pytest.raises(FileNotFoundError, match=rf"split list {root}/train_val.txt is missing \(splits present: "
                                                r"\['test', 'train', 'val'\]\)"):
        HumanML3DSource(root, "train_val")
    os.remove(os.path.join(root, "new_joint_vecs", "000002.npy"))
    with pytest.raises(FileNotFoundError, match=f"split list {root}/train.txt names 1 motion.*'000002': "
                                                f"{root}/new_joint_vecs/000002.npy does not exist"):
        HumanML3DSource(root)
    HumanML3DSource(root, "test")  # a split that does not need it opens
    with pytest.raises(FileNotFoundError, match="HumanML3D root .*nowhere not found"):
        HumanML3DSource(os.path.join(root, "nowhere"))


def test_malformed_files_are_named(tree):
    root, _ = tree
    np.save(os.path.join(root, "new_joint_vecs", "000002.npy"), np.zeros((30, 251), np.float32))
    with pytest.raises(ValueError, match=r"new_joint_vecs/000002.npy has shape \(30, 251\); expected "
                                         r"\(frames, 263\) \(HumanML3D's 263 features per frame\)"):
        HumanML3DSource(root)
    np.save(os.path.join(root, "Mean.npy"), np.zeros(251, np.float32))
    with pytest.raises(ValueError, match=r"Mean.npy has shape \(251,\); expected \(263,\)"):
        HumanML3DSource(root)
    np.save(os.path.join(root, "Mean.npy"), np.zeros(263, np.float32))
    std = np.ones(263, np.float32)
    std[7] = 0
    np.save(os.path.join(root, "Std.npy"), std)
    with pytest.raises(ValueError, match="Std.npy: entry 7 is 0.0; the normalisation divides by it"):
        HumanML3DSource(root)
    np.save(os.path.join(root, "Std.npy"), np.ones(263, np.float32))
    source = HumanML3DSource(root, "val")
    motion = np.ones((10, 263), np.float32)
    motion[4, 3] = np.nan
    np.save(os.path.join(root, "new_joint_vecs", "000003.npy"), motion)
    with pytest.raises(ValueError, match="000003.npy: frame 4 holds a non-finite value"):
        source[0]
    with open(os.path.join(root, "val.txt"), "w") as f:
        f.write("\n\n")
    with pytest.raises(ValueError, match="val.txt names no motion"):
        HumanML3DSource(root, "val")
    with pytest.raises(ValueError, match="crop='middle'"):
        HumanML3DSource(root, crop="middle")


def test_another_feature_width(tmp_path):
    """KIT-ML keeps the same layout with 251 features per frame."""
    root = str(tmp_path / "KIT-ML")
    make_tree(root, width=251)
    source = HumanML3DSource(root, "val", length=16, feature_dim=251)
    assert source.example(source[0], np.random.default_rng(0), False)["x"].shape == (16, 251)


@pytest.mark.gcs
def test_a_tree_in_a_bucket(tree, bucket):
    root, motions = tree
    storage.copy_tree_up(root, f"{bucket}/HumanML3D")
    source = HumanML3DSource(f"{bucket}/HumanML3D", "train", length=12)
    assert source.frames.tolist() == [14, 30, 6]
    np.testing.assert_allclose(source[2]["motion"], normalised(motions["M000001"]), rtol=1e-6)
