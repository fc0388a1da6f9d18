"""Preprocessing a class-folder tree into latent shards: ADM crop, VAE moments, labels, resume; the
latent source and its loader (posterior samples, flips, errors)."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from lsync_jax.data import ImageFolderSource, LatentSource, LoaderSpec, make_loader
from lsync_jax.models.vae import SCALE_FACTOR, encode_images
from lsync_jax.porting import load_vae
from lsync_jax.tools.preprocess import PreprocessSpec, center_crop_adm, preprocess_latents
from tests.helpers import IMAGE_SIZES, make_image_tree


def test_center_crop_follows_adm():
    rng = np.random.default_rng(1)
    square = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(center_crop_adm(square, 32), square)  # already the size: untouched
    for h, w in IMAGE_SIZES + [(300, 200)]:
        out = center_crop_adm(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), 32)
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    gray = center_crop_adm(rng.integers(0, 256, (40, 60, 1), dtype=np.uint8), 32)
    assert gray.shape == (32, 32, 3) and np.array_equal(gray[..., 0], gray[..., 2])
    # a wide image keeps its centre: a bright central column band survives, the dark sides are cut
    wide = np.zeros((64, 192, 3), np.uint8)
    wide[:, 80:112] = 255
    out = center_crop_adm(wide, 32)  # 64 >= 2 * 32: box-halved to 32 x 96, then the centre 32 columns
    assert out[:, 9:23].min() > 200 and out[:, :6].max() == 0 and out[:, -6:].max() == 0  # band at 8:24


def test_image_folder_source_reads_classes_in_sorted_order(tmp_path):
    source = ImageFolderSource(make_image_tree(str(tmp_path / "train")))
    assert len(source) == 18 and source.classes == ["n01", "n02", "n03"]
    labels = [int(source[i]["label"]) for i in range(len(source))]
    assert labels == [0] * 6 + [1] * 6 + [2] * 6
    assert source[0]["image"].shape == (40, 50, 3)
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageFolderSource(str(tmp_path / "missing"))
    os.makedirs(tmp_path / "empty" / "cls")
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderSource(str(tmp_path / "empty"))


@pytest.fixture(scope="module")
def latents(tiny_latents):
    root, out, spec, summary = tiny_latents
    return ImageFolderSource(root), out, spec, summary


def test_preprocessing_writes_shards_with_the_vae_posterior(latents, tiny_vae_dir):
    source, out, _, summary = latents
    assert summary["written"] == 3 and summary["skipped"] == 0 and summary["images"] == 18
    meta = json.load(open(os.path.join(out, "metadata.json")))
    assert meta["latent_shape"] == [8, 8, 4] and meta["num_shards"] == 3 and meta["num_records"] == 18
    assert sorted(f for f in os.listdir(out) if f.endswith(".array_record")) == meta["shards"]
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    data = LatentSource(out)
    assert len(data) == 18 and data.latent_shape == (8, 8, 4) and data.image_size == 32 and data.has_flip
    module, params = load_vae(tiny_vae_dir)
    encode = jax.jit(lambda p, x: encode_images(module, p, x))
    tol = 1e-5 if jax.default_backend() == "cpu" else 2e-3  # GPUs convolve in TF32 by default, batch-dependent
    for i in (0, 9, 17):  # one record from each shard
        record = data[i]
        crop = center_crop_adm(source[i]["image"], 32)
        np.testing.assert_array_equal(record["image"], crop)
        assert int(record["label"]) == int(source[i]["label"]) and int(record["index"]) == i
        mean, std = encode(params, np.stack([crop, crop[:, ::-1]]))
        np.testing.assert_allclose(record["mean"], mean[0], rtol=tol, atol=tol)
        np.testing.assert_allclose(record["std"], std[0], rtol=tol, atol=tol)
        np.testing.assert_allclose(record["mean_flip"], mean[1], rtol=tol, atol=tol)
        assert not np.allclose(record["mean_flip"], record["mean"][:, ::-1], atol=1e-3)  # a real second encoding


def test_rerun_skips_finished_shards_and_redoes_a_missing_one(latents, tiny_vae_dir):
    source, out, spec, _ = latents
    paths = [os.path.join(out, f) for f in sorted(os.listdir(out)) if f.endswith(".array_record")]
    before = [open(p, "rb").read() for p in paths]
    stamps = [os.stat(p).st_mtime_ns for p in paths]
    os.remove(paths[1])
    open(paths[1] + ".tmp-0", "wb").write(b"partial")  # what an interrupted run leaves behind
    info = {"kind": "folder", "path": source.root, "num_classes": 3}
    summary = preprocess_latents(source, out, tiny_vae_dir, spec, info, log=lambda s: None)
    assert summary["written"] == 1 and summary["skipped"] == 2 and summary["images"] == 8
    assert [os.stat(p).st_mtime_ns for p in (paths[0], paths[2])] == [stamps[0], stamps[2]]
    assert [open(p, "rb").read() for p in paths] == before  # the redone shard is the same bytes
    assert not os.path.exists(paths[1] + ".tmp-0")
    with pytest.raises(ValueError, match="image_size"):  # other settings never mix into the directory
        preprocess_latents(source, out, tiny_vae_dir, PreprocessSpec(image_size=16, shard_size=8), info)


def test_hosts_share_the_shards(latents, tiny_vae_dir, tmp_path):
    source, out, spec, _ = latents
    info = {"kind": "folder", "path": source.root, "num_classes": 3}
    split = str(tmp_path / "split")
    written = [preprocess_latents(source, split, tiny_vae_dir, dataclasses.replace(spec, process_index=p,
                                                                                   process_count=2),
                                  info, log=lambda s: None)["written"] for p in (1, 0)]
    assert written == [1, 2]  # host 1 writes shard 1, host 0 shards 0 and 2
    whole, parts = LatentSource(out), LatentSource(split)
    for i in range(len(whole)):
        np.testing.assert_array_equal(parts[i]["mean"], whole[i]["mean"])
    with pytest.raises(ValueError, match="process_index=2"):
        preprocess_latents(source, split, tiny_vae_dir, dataclasses.replace(spec, process_index=2, process_count=2),
                           info)


def test_loader_draws_fresh_posterior_samples_and_uses_stored_flips(latents):
    _, out, _, _ = latents
    data = LatentSource(out)
    spec = LoaderSpec(global_batch_size=6, seed=0, shuffle=False)
    batches = list(make_loader(data, LoaderSpec(6, seed=0, shuffle=False, num_epochs=2), process_index=0,
                               process_count=1))
    assert len(batches) == 6 and batches[0]["x"].shape == (6, 8, 8, 4) and batches[0]["x"].dtype == np.float32
    record = data[0]
    eps_a = (batches[0]["x"][0] / SCALE_FACTOR - record["mean"]) / record["std"]
    eps_b = (batches[3]["x"][0] / SCALE_FACTOR - record["mean"]) / record["std"]  # record 0 again, epoch 2
    assert abs(eps_a.mean()) < 0.5 and 0.6 < eps_a.std() < 1.4  # a standard-normal draw
    assert not np.allclose(eps_a, eps_b)  # fresh noise every use
    np.testing.assert_array_equal(batches[0]["y"], [0] * 6)
    # flips: every example is a posterior sample of either the crop or its stored mirrored encoding
    flipped = list(make_loader(data, LoaderSpec(18, seed=1, shuffle=False, flip=True, num_epochs=1),
                               process_index=0, process_count=1))[0]["x"]
    kinds = []
    for i in range(18):
        r = data[i]
        z = flipped[i] / SCALE_FACTOR
        plain = np.abs((z - r["mean"]) / r["std"]).max()
        mirrored = np.abs((z - r["mean_flip"]) / r["std_flip"]).max()
        kinds.append(mirrored < plain)
    assert 0 < sum(kinds) < 18
    halves = [next(iter(make_loader(data, spec, process_index=p, process_count=2))) for p in range(2)]
    whole = next(iter(make_loader(data, spec, process_index=0, process_count=1)))
    np.testing.assert_array_equal(whole["x"], np.concatenate([h["x"] for h in halves]))


def test_latent_iterator_resumes_exactly(latents):
    _, out, _, _ = latents
    loader = make_loader(LatentSource(out), LoaderSpec(6, seed=5, flip=True), process_index=0, process_count=1)
    it = iter(loader)
    for _ in range(2):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]  # crosses an epoch boundary (3 batches per epoch)
    resumed = iter(loader)
    resumed.set_state(state)
    for a, b in zip(expected, (next(resumed) for _ in range(4))):
        np.testing.assert_array_equal(a["x"], b["x"])  # same records, flips and posterior noise
        np.testing.assert_array_equal(a["y"], b["y"])


def test_latent_source_errors_name_the_problem(latents, tmp_path):
    _, out, _, _ = latents
    with pytest.raises(FileNotFoundError, match="launch/preprocess.py"):
        LatentSource(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.data.dir"):
        LatentSource("")
    partial = tmp_path / "partial"
    os.makedirs(partial)
    meta = json.load(open(os.path.join(out, "metadata.json")))
    json.dump(meta, open(partial / "metadata.json", "w"))
    with pytest.raises(FileNotFoundError, match="3 of 3 latent shards are missing"):
        LatentSource(str(partial))


@pytest.mark.gcs
def test_images_vae_and_shards_in_a_bucket(latents, tiny_vae_dir, bucket):
    """The image tree, the VAE weights and the output all on gs://: the shards equal the local ones
    (written locally, then uploaded) and read back through array-record's own GCS client."""
    from lsync_jax import storage

    source, out, spec, _ = latents
    storage.copy_tree_up(source.root, f"{bucket}/train")
    storage.copy_tree_up(tiny_vae_dir, f"{bucket}/vae")
    remote = ImageFolderSource(f"{bucket}/train")
    assert remote.classes == source.classes and len(remote) == len(source)
    np.testing.assert_array_equal(remote[5]["image"], source[5]["image"])
    info = {"kind": "folder", "path": remote.root, "num_classes": 3}
    summary = preprocess_latents(remote, f"{bucket}/latents", f"{bucket}/vae", spec, info, log=lambda s: None)
    assert summary["written"] == 3
    assert not [n for n in storage.listdir(f"{bucket}/latents") if "tmp" in n]
    whole, shards = LatentSource(out), LatentSource(f"{bucket}/latents")
    for i in range(len(whole)):
        for key in ("mean", "std", "label"):
            np.testing.assert_allclose(shards[i][key], whole[i][key], rtol=1e-6, atol=1e-6)
    again = preprocess_latents(remote, f"{bucket}/latents", f"{bucket}/vae", spec, info, log=lambda s: None)
    assert again["written"] == 0 and again["skipped"] == 3
