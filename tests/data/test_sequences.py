"""Sequence shards from a folder of .npy files: round trip, crop and padding mask, labels and tags,
resume, the loader, and errors that name the file (preprocessing and reading)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lsync_jax.data import LoaderSpec, SequenceSource, make_loader
from lsync_jax.tools.preprocess_sequences import SequenceSpec, preprocess_sequences

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LENGTHS = {"a": 5, "b": 12, "c": 8, "d": 3, "sub/e": 10, "sub/f": 9, "g": 15}  # id -> steps
TAGS = {"a": [0, 2], "b": [], "c": [4], "d": [1], "sub/e": [0, 1, 2], "sub/f": [3], "g": [2]}


def make_npy_dir(directory, channels=3, dtype=np.float64):
    """LENGTHS' sequences (one in a sub-folder) with labels.json and tags.json beside them; returns
    {id: array}."""
    rng = np.random.default_rng(0)
    arrays = {}
    for name, steps in LENGTHS.items():
        arrays[name] = rng.standard_normal((steps, channels)).astype(dtype)
        path = os.path.join(directory, *name.split("/")) + ".npy"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.save(path, arrays[name])
    labels = {name + (".npy" if i % 2 else ""): i % 3 for i, name in enumerate(sorted(LENGTHS))}
    with open(os.path.join(directory, "labels.json"), "w") as f:
        json.dump(labels, f)
    with open(os.path.join(directory, "tags.json"), "w") as f:
        json.dump(TAGS, f)
    return arrays


@pytest.fixture
def npy_dir(tmp_path):
    directory = tmp_path / "npy"
    directory.mkdir()
    return str(directory), make_npy_dir(str(directory))


def preprocess(npy, out, labels=True, tags=True, log=None, **spec):
    spec = SequenceSpec(**{"length": 8, "shard_size": 3, "num_workers": 2, **spec})
    return preprocess_sequences(npy, out, spec, labels_path=os.path.join(npy, "labels.json") if labels else "",
                                tags_path=os.path.join(npy, "tags.json") if tags else "",
                                log=log or (lambda s: None))


def test_round_trip_crops_pads_and_masks(npy_dir, tmp_path):
    npy, arrays = npy_dir
    out = str(tmp_path / "seq")
    summary = preprocess(npy, out, num_tags=6)
    assert summary["written"] == 3 and summary["skipped"] == 0 and summary["sequences"] == 7
    meta = json.load(open(os.path.join(out, "metadata.json")))
    assert meta["format"] == "lsync_jax.sequences" and meta["num_shards"] == 3 and meta["crop"] == "start"
    assert sorted(f for f in os.listdir(out) if f.endswith(".array_record")) == meta["shards"]
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    source = SequenceSource(out)
    assert (len(source), source.length, source.channels, source.has_mask) == (7, 8, 3, True)
    assert (source.num_classes, source.label_range, source.num_tags) == (3, (0, 2), 6)
    ids = sorted(LENGTHS)  # records are in id order
    for i, name in enumerate(ids):
        record = source[i]
        steps = min(LENGTHS[name], 8)
        expected = np.zeros((8, 3), np.float32)
        expected[:steps] = arrays[name][:8]  # the first 8 steps: a crop from the start
        np.testing.assert_array_equal(record["x"], expected)
        assert int(record["length"]) == steps and int(record["index"]) == i and int(record["label"]) == i % 3
        example = source.example(record, np.random.default_rng(0), False)
        assert example["x"].dtype == np.float32 and example["x"].shape == (8, 3) and example["y"].dtype == np.int32
        assert example["mask"].dtype == bool and example["mask"].tolist() == [t < steps for t in range(8)]
        assert example["tags"].dtype == np.float32 and example["tags"].shape == (6,)  # the width given, not max + 1
        assert np.flatnonzero(example["tags"]).tolist() == sorted(TAGS[name])
    source.check_labels(3)
    source.check_tags(6)
    with pytest.raises(ValueError, match="labels 0..2, but the model's num_classes=2"):
        source.check_labels(2)
    with pytest.raises(ValueError, match="carry 6 tags per record, but the model takes tag vectors of width 5"):
        source.check_tags(5)


def test_unlabelled_untagged_unpadded(npy_dir, tmp_path):
    npy, arrays = npy_dir
    out = str(tmp_path / "seq")
    preprocess(npy, out, labels=False, tags=False, length=3, pad=False)
    source = SequenceSource(out)
    assert (source.has_mask, source.num_tags, source.num_classes, source.label_range) == (False, 0, 0, None)
    example = source.example(source[6], np.random.default_rng(0), False)
    assert sorted(example) == ["x", "y"] and int(example["y"]) == 0
    np.testing.assert_array_equal(example["x"], arrays[sorted(LENGTHS)[6]][:3].astype(np.float32))
    with pytest.raises(ValueError, match="carry no class labels"):
        source.check_labels(10)
    with pytest.raises(ValueError, match="has 3 steps, fewer than --length=4"):
        preprocess(npy, str(tmp_path / "seq4"), labels=False, tags=False, length=4, pad=False)
    assert not os.path.exists(tmp_path / "seq4")  # refused before anything is written


def test_loader_batches(npy_dir, tmp_path):
    npy, _ = npy_dir
    out = str(tmp_path / "seq")
    preprocess(npy, out)
    source = SequenceSource(out)
    assert source.num_tags == 5  # max tag + 1
    batch = next(iter(make_loader(source, LoaderSpec(global_batch_size=4, seed=0), process_index=0,
                                  process_count=1)))
    assert batch["x"].shape == (4, 8, 3) and batch["mask"].shape == (4, 8) and batch["tags"].shape == (4, 5)
    assert batch["y"].dtype == np.int32 and batch["mask"].dtype == bool
    with pytest.raises(ValueError, match="no mirror image; set --config.data.flip=False"):
        make_loader(source, LoaderSpec(global_batch_size=4, flip=True), process_index=0, process_count=1)
    with pytest.raises(ValueError, match="images and image latents only"):
        make_loader(source, LoaderSpec(global_batch_size=4, fields=("image",)), process_index=0, process_count=1)


def test_rerun_keeps_finished_shards_and_redoes_a_missing_one(npy_dir, tmp_path):
    npy, _ = npy_dir
    out = str(tmp_path / "seq")
    preprocess(npy, out)
    paths = [os.path.join(out, n) for n in json.load(open(os.path.join(out, "metadata.json")))["shards"]]
    stamps = [os.stat(p).st_mtime_ns for p in paths]
    content = open(paths[1], "rb").read()
    os.remove(paths[1])
    with pytest.raises(FileNotFoundError, match="1 of 3 sequence shards are missing.*00001-of-00003.*resumes"):
        SequenceSource(out)
    summary = preprocess(npy, out)
    assert summary["written"] == 1 and summary["skipped"] == 2 and summary["sequences"] == 3
    assert [os.stat(p).st_mtime_ns for p in (paths[0], paths[2])] == [stamps[0], stamps[2]]
    assert open(paths[1], "rb").read() == content  # the same bytes again
    assert preprocess(npy, out)["written"] == 0
    with pytest.raises(ValueError, match="other settings or inputs.*length: on disk 8, now 6"):
        preprocess(npy, out, length=6)


def test_hosts_share_the_shards(npy_dir, tmp_path):
    npy, _ = npy_dir
    out = str(tmp_path / "seq")
    first = preprocess(npy, out, process_index=0, process_count=2)
    second = preprocess(npy, out, process_index=1, process_count=2)
    assert (first["written"], second["written"]) == (2, 1)
    assert len(SequenceSource(out)) == 7


def test_damaged_or_missing_metadata_and_shards_are_named(npy_dir, tmp_path):
    npy, _ = npy_dir
    with pytest.raises(FileNotFoundError, match=r"nowhere/metadata.json is missing.*launch/preprocess_sequences.py"):
        SequenceSource(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no sequence directory given"):
        SequenceSource("")
    out = str(tmp_path / "seq")
    preprocess(npy, out)
    meta_path = os.path.join(out, "metadata.json")
    meta = open(meta_path).read()
    with open(meta_path, "w") as f:
        f.write(meta[:40])
    with pytest.raises(ValueError, match=f"{meta_path} is damaged"):
        SequenceSource(out)
    with open(meta_path, "w") as f:
        json.dump({**json.loads(meta), "format": "lsync_jax.latents"}, f)
    with pytest.raises(ValueError, match="not lsync-jax sequence metadata.*format='lsync_jax.latents'"):
        SequenceSource(out)
    with open(meta_path, "w") as f:
        json.dump({k: v for k, v in json.loads(meta).items() if k != "channels"}, f)
    with pytest.raises(ValueError, match=r"damaged: it lacks \['channels'\]"):
        SequenceSource(out)
    with open(meta_path, "w") as f:
        f.write(meta)
    shard = os.path.join(out, json.loads(meta)["shards"][2])
    data = open(shard, "rb").read()
    with open(shard, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{shard}: a sequence shard is damaged"):
        SequenceSource(out)


def test_bad_inputs_are_named_before_anything_is_written(npy_dir, tmp_path):
    npy, _ = npy_dir
    out = str(tmp_path / "seq")
    with pytest.raises(ValueError, match=r"tags file .*tags.json: 'a' has tag 2, outside 0..1 \(--num_tags=2\)"):
        preprocess(npy, out, num_tags=2)
    with pytest.raises(ValueError, match=r"labels file .*: the label of 'c' is 2, outside 0..1 \(--num_classes=2\)"):
        preprocess(npy, out, num_classes=2)
    labels = json.load(open(os.path.join(npy, "labels.json")))
    del labels["g"]
    json.dump(labels, open(os.path.join(npy, "labels.json"), "w"))
    with pytest.raises(ValueError, match=r"has no label for 'g' \(g.npy\)"):
        preprocess(npy, out)
    json.dump({**labels, "g": 1.5}, open(os.path.join(npy, "labels.json"), "w"))
    with pytest.raises(ValueError, match="the label of 'g' is 1.5; labels are class numbers >= 0"):
        preprocess(npy, out)
    json.dump({**labels, "g": 1}, open(os.path.join(npy, "labels.json"), "w"))
    np.save(os.path.join(npy, "sub", "f.npy"), np.zeros((9, 4)))
    with pytest.raises(ValueError, match=r"sub/f.npy has 4 channels but .*/a.npy has 3"):
        preprocess(npy, out)
    np.save(os.path.join(npy, "sub", "f.npy"), np.zeros(9))
    with pytest.raises(ValueError, match=r"sub/f.npy holds an array of shape \(9,\); expected \(length, channels\)"):
        preprocess(npy, out)
    with open(os.path.join(npy, "sub", "f.npy"), "wb") as f:
        f.write(b"not an array")
    with pytest.raises(ValueError, match="sub/f.npy is not a readable .npy file"):
        preprocess(npy, out)
    assert not os.path.exists(out)
    np.save(os.path.join(npy, "sub", "f.npy"), np.full((9, 3), np.nan))
    with pytest.raises(ValueError, match="sub/f.npy: step 0 holds a non-finite value"):
        preprocess(npy, out)
    assert not [f for f in os.listdir(out) if ".tmp" in f]  # the failed shard left no temporary file
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .npy files"):
        preprocess(str(tmp_path / "empty"), str(tmp_path / "other"), labels=False, tags=False)
    with pytest.raises(FileNotFoundError, match="--npy_dir=.*missing' is not a directory"):
        preprocess(str(tmp_path / "missing"), str(tmp_path / "other"), labels=False, tags=False)


@pytest.mark.slow
def test_command_line(npy_dir, tmp_path):
    npy, _ = npy_dir
    out = str(tmp_path / "seq")
    command = [sys.executable, os.path.join(ROOT, "launch", "preprocess_sequences.py"), f"--npy_dir={npy}",
               f"--out={out}", "--length=8", "--shard_size=4", f"--tags={os.path.join(npy, 'tags.json')}"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 0, done.stderr
    assert "2 shard(s) written, 0 kept, 7 sequences" in done.stdout
    source = SequenceSource(out)
    assert (len(source), source.num_tags, source.num_classes) == (7, 5, 0)


@pytest.mark.gcs
def test_sequences_in_a_bucket(npy_dir, bucket):
    npy, arrays = npy_dir
    out = f"{bucket}/seq"
    preprocess(npy, out)
    source = SequenceSource(out)
    np.testing.assert_array_equal(source[0]["x"], arrays["a"].astype(np.float32).tolist() + [[0, 0, 0]] * 3)
    assert preprocess(npy, out)["skipped"] == 3
