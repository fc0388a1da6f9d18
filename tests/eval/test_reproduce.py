"""launch/reproduce.py's engine and launch/make_reference.py's on a tiny model and a tiny reference:
a protocol run is deterministic and resumable after a kill, prints the right comparison, and a missing
reference or weights file fails before the first sample."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lsync_jax import storage
from lsync_jax.builders import build_model, build_source, model_fields
from lsync_jax.configs import protocols
from lsync_jax.eval import reproduce as reproduce_module, sampling
from lsync_jax.eval.evaluator import npz_keys
from lsync_jax.eval.reproduce import reproduce
from lsync_jax.tools.convert import save_converted
from lsync_jax.tools.reference import choose, make_reference_batch, open_source
from tests.helpers import perturbed

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAME = "test-tiny"


@pytest.fixture(scope="module")
def tiny_protocol():
    """A registered protocol over configs/tiny.py: 12 samples of Euler 4 steps with CFG 1.5, balanced."""
    entry = protocols.Protocol(
        name=NAME, paper="the test suite", table="none", source="measured", where="tests/eval/test_reproduce.py",
        method="layersync", model="SiT-S/4", learn_sigma=False, train_steps=6, train_batch=8, value=300.0,
        num_samples=12, class_balance="balanced", seed=3, sampler=dict(method="euler", num_steps=4), cfg_scale=1.5,
        guidance_interval=(0.2, 1.0), reference="adm:tiny_ref.npz", base_config="tiny")
    protocols.register(entry)
    yield entry
    del protocols.PROTOCOLS[NAME]


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_protocol):
    """A tiny model's random (perturbed) weights as a converted workdir (step 0, no recorded training)."""
    config = protocols.protocol_config(NAME)
    model = build_model(config)
    params = jax.eval_shape(model.init, jax.random.key(0), *model.init_inputs(1))["params"]
    params = perturbed(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), params), seed=1, scale=0.2)
    workdir = str(tmp_path_factory.mktemp("converted"))
    save_converted(model, params, workdir, model_fields(config))
    return workdir


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache, tiny_protocol):
    """A 16-image ADM reference batch made by make_reference_batch from the tiny config's data."""
    out = str(tmp_path_factory.mktemp("ref") / "tiny_ref.npz")
    source = build_source(protocols.protocol_config(NAME).data, split="test")
    info = make_reference_batch(out, source, num=16, order="random", seed=0, batch_size=8, log=lambda _: None)
    assert info["num"] == 16
    return out


def _arrays(path):
    arrays = storage.load_npz(path)
    return arrays["arr_0"], arrays["arr_1"]


def test_reference_batch_holds_images_labels_and_statistics(reference, cache):
    assert set(npz_keys(reference)) >= {"arr_0", "arr_1", "mu", "sigma", "mu_s", "sigma_s"}
    images, labels = _arrays(reference)
    source = build_source(protocols.protocol_config(NAME).data, split="test")
    picked = choose(len(source), 16, "random", 0)
    np.testing.assert_array_equal(images, np.stack([source[int(i)]["image"] for i in picked]))
    np.testing.assert_array_equal(labels, [int(source[int(i)]["label"]) for i in picked])
    stats = storage.load_npz(reference)
    assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048)


def test_reference_from_class_folders_uses_adm_crops(tmp_path, cache):
    from lsync_jax.tools.preprocess import center_crop_adm
    from tests.helpers import make_image_tree

    root = make_image_tree(str(tmp_path / "tree"))
    source, what = open_source(images=root)
    out = str(tmp_path / "folder_ref.npz")
    make_reference_batch(out, source, num=5, image_size=32, order="first", batch_size=4, log=lambda _: None)
    images, labels = _arrays(out)
    assert images.shape == (5, 32, 32, 3) and "class folders" in what
    np.testing.assert_array_equal(images[2], center_crop_adm(source[2]["image"], 32))
    with pytest.raises(ValueError, match="pass --image_size"):  # images of several sizes, no crop
        make_reference_batch(str(tmp_path / "x.npz"), source, num=5, order="first", log=lambda _: None)
    with pytest.raises(ValueError, match="exactly one source"):
        open_source(images=root, tfds="cifar10")
    with pytest.raises(ValueError, match="source has 18 images"):
        make_reference_batch(str(tmp_path / "y.npz"), source, num=50, image_size=32, log=lambda _: None)
    with pytest.raises(FileExistsError, match="folder_ref.npz exists; it is kept"):
        make_reference_batch(out, source, num=5, image_size=32, order="first", log=lambda _: None)
    assert not os.path.exists(tmp_path / "x.npz") and not os.path.exists(tmp_path / "y.npz")


def test_reference_from_stored_crops_and_latents_without_them(tiny_latents, cache, tmp_path):
    import shutil

    from lsync_jax.data.latents import METADATA

    _, latents, _, _ = tiny_latents
    source, what = open_source(latents=latents)
    out = str(tmp_path / "crops.npz")
    make_reference_batch(out, source, num=6, order="first", batch_size=4, log=lambda _: None)
    images, labels = _arrays(out)
    np.testing.assert_array_equal(images, np.stack([source[i]["image"] for i in range(6)]))
    assert images.shape == (6, 32, 32, 3) and "stored crops" in what
    bare = str(tmp_path / "bare")
    shutil.copytree(latents, bare)
    meta = json.load(open(os.path.join(bare, METADATA)))
    meta["fields"] = [f for f in meta["fields"] if f[0] != "image"]
    json.dump(meta, open(os.path.join(bare, METADATA), "w"))
    with pytest.raises(ValueError, match="hold no images: preprocess with --store_images"):
        open_source(latents=bare)


def test_protocol_run_is_deterministic_and_resumable(converted, reference, cache, tmp_path, monkeypatch):
    logs = []
    whole = reproduce(NAME, converted, ref_batch=reference, out_dir=str(tmp_path / "whole"), batch_size=4,
                      eval_batch_size=8, fid_method="eigh", log=logs.append)
    assert whole["comparable"] and whole["ours"] > 0 and whole["paper"] == 300.0
    assert any("converted checkpoint" in line for line in logs)
    assert any(line.startswith("FID: ours") for line in logs)
    samples, labels = _arrays(whole["samples"])
    assert samples.shape == (12, 28, 28, 1) and np.bincount(labels, minlength=10).max() == 2  # balanced: 12 over 10
    saved = json.load(open(tmp_path / "whole" / "result.json"))
    assert saved["ours"] == pytest.approx(whole["ours"]) and saved["comparable"] is True

    # a kill after the second of three batches: the parts written so far stay, the rerun finishes them
    real_save = sampling.save_npz_atomic
    written = []

    def killed_after_two(path, **arrays):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        written.append(path)
        real_save(path, **arrays)

    monkeypatch.setattr(sampling, "save_npz_atomic", killed_after_two)
    out = str(tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        reproduce(NAME, converted, ref_batch=reference, out_dir=out, batch_size=4, eval_batch_size=8,
                  fid_method="eigh", log=lambda _: None)
    assert sorted(os.listdir(os.path.join(out, "parts"))) == ["manifest.json", "part_000000000.npz",
                                                              "part_000000004.npz"]
    monkeypatch.setattr(sampling, "save_npz_atomic", real_save)
    logs = []
    resumed = reproduce(NAME, converted, ref_batch=reference, out_dir=out, batch_size=4, eval_batch_size=8,
                        fid_method="eigh", log=logs.append)
    assert any("resuming: 2 of 3 batches" in line for line in logs)
    for a, b in zip(_arrays(resumed["samples"]), (samples, labels)):
        np.testing.assert_array_equal(a, b)  # the arrays, not the .npz bytes (zip entries carry times)
    assert resumed["ours"] == pytest.approx(whole["ours"])
    assert not os.path.exists(os.path.join(out, "parts"))

    # a rerun of a finished run evaluates the samples it has; another batch size is refused mid-way
    logs = []
    reproduce(NAME, converted, ref_batch=reference, out_dir=out, batch_size=4, eval_batch_size=8, fid_method="eigh",
              log=logs.append)
    assert any("holds this protocol's samples already" in line for line in logs)
    os.makedirs(tmp_path / "other" / "parts")
    with open(tmp_path / "other" / "parts" / "manifest.json", "w") as f:
        json.dump({"protocol": NAME, "batch_size": 6}, f)
    with pytest.raises(ValueError, match="parts of another sampling run.*batch_size"):
        reproduce(NAME, converted, ref_batch=reference, out_dir=str(tmp_path / "other"), batch_size=4,
                  log=lambda _: None)


def test_overrides_and_differences_are_not_comparable(converted, reference, cache, tmp_path):
    result = reproduce(NAME, converted, ref_batch=reference, out_dir=str(tmp_path / "o"), batch_size=4,
                       eval_batch_size=8, fid_method="eigh", overrides={"num_samples": 8, "sampler.num_steps": 2},
                       log=lambda _: None)
    assert result["comparable"] is False and len(result["not_comparable_because"]) == 2
    assert json.load(open(tmp_path / "o" / "result.json"))["comparable"] is False
    assert _arrays(result["samples"])[0].shape[0] == 8
    # samples of other settings in the output directory are kept: the run is refused, naming what differs
    with pytest.raises(ValueError, match="holds samples of other settings .*settings"):
        reproduce(NAME, converted, ref_batch=reference, out_dir=str(tmp_path / "o"), batch_size=4,
                  overrides={"num_samples": 8, "sampler.num_steps": 3}, log=lambda _: None)
    assert _arrays(result["samples"])[0].shape[0] == 8
    os.makedirs(tmp_path / "p" / "parts")
    with pytest.raises(ValueError, match="holds no sampling manifest"):
        reproduce(NAME, converted, ref_batch=reference, out_dir=str(tmp_path / "p"), batch_size=4, log=lambda _: None)


def test_missing_inputs_fail_before_sampling(converted, reference, cache, tmp_path, monkeypatch):
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(reproduce_module, "run_sampler", no_sampling)
    kwargs = dict(out_dir=str(tmp_path / "out"), batch_size=4, log=lambda _: None)
    with pytest.raises(ValueError, match="pass --ref_batch=PATH/tiny_ref.npz"):
        reproduce(NAME, converted, **kwargs)
    with pytest.raises(FileNotFoundError, match="reference batch .*missing.npz not found"):
        reproduce(NAME, converted, ref_batch=str(tmp_path / "missing.npz"), **kwargs)
    with pytest.raises(FileNotFoundError, match="no_weights.npz"):
        reproduce(NAME, converted, ref_batch=reference, weights_path=str(tmp_path / "no_weights.npz"), **kwargs)
    with pytest.raises(FileNotFoundError, match="no intact checkpoint"):
        reproduce(NAME, str(tmp_path / "empty_run"), ref_batch=reference, **kwargs)
    with pytest.raises(ValueError, match="unknown protocol"):
        reproduce("no-such-protocol", converted, ref_batch=reference, **kwargs)
    assert not os.path.exists(tmp_path / "out" / "parts")


def test_too_few_samples_or_reference_images_fail_before_sampling(converted, reference, cache, tmp_path,
                                                                  monkeypatch, alarm):
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(reproduce_module, "run_sampler", no_sampling)
    kwargs = dict(out_dir=str(tmp_path / "out"), batch_size=1, log=lambda _: None)
    with alarm(120), pytest.raises(ValueError, match=r"precision needs at least 4 sample images \(the protocol's "
                                                     r"num_samples: 3\).*--skip_small_metrics"):
        reproduce(NAME, converted, ref_batch=reference, overrides={"num_samples": 3}, **kwargs)
    small_ref = str(tmp_path / "small" / "tiny_ref.npz")
    os.makedirs(os.path.dirname(small_ref))
    arrays = storage.load_npz(reference)
    np.savez(small_ref, arr_0=arrays["arr_0"][:3], arr_1=arrays["arr_1"][:3])
    with alarm(120), pytest.raises(ValueError, match=r"recall needs at least 4 reference images \(the reference "
                                                     r".*tiny_ref.npz: 3\)"):
        reproduce(NAME, converted, ref_batch=small_ref, **kwargs)
    # asked to skip: the count check passes (sampling starts); the protocol's own metric is never skipped
    with alarm(120), pytest.raises(AssertionError, match="sampling started"):
        reproduce(NAME, converted, ref_batch=reference, overrides={"num_samples": 3}, skip_small_metrics=True,
                  **kwargs)
    with alarm(120), pytest.raises(ValueError, match="FID and sFID need at least 2 sample images"):
        reproduce(NAME, converted, ref_batch=reference, overrides={"num_samples": 1}, skip_small_metrics=True,
                  **kwargs)
    assert not os.path.exists(tmp_path / "out" / "parts")


def test_a_trained_run_is_compared_setting_by_setting(tiny_protocol, tmp_path, alarm):
    """Real checkpoints, as training writes them: the protocol's own run is comparable; a run with another
    batch and LayerSync pair is not, each named by key (the verdict said "comparable" before)."""
    from lsync_jax.recipes import train_and_evaluate

    def train(workdir, **data):
        config = protocols.protocol_config(NAME)
        config.train.update(dict(num_steps=2, checkpoint_every=2, log_every=1, num_grid_samples=0))
        config.eval.every = 0
        config.data.update(data)
        if data:
            config.objective.layersync.pairs = ((1, 2, 0.5),)
        with alarm(600):
            train_and_evaluate(config, workdir)
        return workdir

    entry = dataclasses.replace(tiny_protocol, train_steps=2)
    same = reproduce_module.run_differences(entry, protocols.protocol_config(NAME), train(str(tmp_path / "a")))
    assert same[0] == [] and same[2] == 2
    differences = reproduce_module.run_differences(entry, protocols.protocol_config(NAME),
                                                   train(str(tmp_path / "b"), batch_size=4))[0]
    assert sorted(differences) == ["data.batch_size: run 4, protocol 8",
                                   "objective.regularizers.layersync.pairs: run [[1, 2, 0.5]], protocol [[1, 2, 0.2]]"]


def test_cli_lists_every_protocol():
    out = subprocess.run([sys.executable, "launch/reproduce.py", "--list"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for name in protocols.PROTOCOLS:
        assert f"{name}\n" in out.stdout or name == NAME  # the tiny one is registered in this process only
    assert "FID-50K 1.42" in out.stdout


def test_protocol_dataclass_round_trips_its_settings(tiny_protocol):
    settings = tiny_protocol.settings()
    assert settings["sampler"]["method"] == "euler" and settings["guidance_interval"] == [0.2, 1.0]
    assert dataclasses.replace(tiny_protocol).settings() == settings


def test_a_converted_official_checkpoint_runs_a_protocol(tmp_path, tiny_vae_dir, reference, cache):
    """An official-layout SiT state dict (learn_sigma, 4 latent channels) through convert_to_workdir (what
    launch/convert_checkpoint.py runs), sampled as a protocol with guidance on the first 3 channels and
    decoded by the SD-VAE, then evaluated."""
    torch = pytest.importorskip("torch", reason="the official layout is written by torch")
    from lsync_jax.tools.convert import convert_to_workdir
    from tests.porting.official_torch import OfficialSiT, randomize

    arch = dict(depth=4, hidden_size=64, num_heads=4)
    path, workdir = str(tmp_path / "SiT-S-2.pt"), str(tmp_path / "converted")
    torch.save(randomize(OfficialSiT(learn_sigma=True), 0).eval().state_dict(), path)
    convert_to_workdir(path, "SiT-S/2", workdir, **arch)
    entry = protocols.Protocol(
        name="test-official", paper="the test suite", table="none", source="measured", where="tests", method="baseline",
        model="SiT-S/2", learn_sigma=True, train_steps=7_000_000, train_batch=256, value=200.0, num_samples=4,
        sampler=dict(method="heun", num_steps=2, guidance_channels=3), cfg_scale=1.5, reference="adm:tiny_ref.npz",
        base_config="imagenet256",
        model_overrides=dict(input_size=8, in_channels=4, num_classes=10, dtype="float32", **arch))
    protocols.register(entry)
    try:
        config = protocols.protocol_config("test-official")
        config.vae.path = tiny_vae_dir  # the ImageNet configs' latents name their VAE; here there are none
        logs = []
        result = reproduce("test-official", workdir, config=config, ref_batch=reference, out_dir=str(tmp_path / "o"),
                           batch_size=4, eval_batch_size=8, fid_method="eigh", log=logs.append)
    finally:
        del protocols.PROTOCOLS["test-official"]
    assert result["step"] == 0 and result["comparable"], result["not_comparable_because"]
    assert result["ours"] > 0
    assert any("converted checkpoint" in line for line in logs)
    images, _ = _arrays(result["samples"])
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8  # decoded by the VAE
