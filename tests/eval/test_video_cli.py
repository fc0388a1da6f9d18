"""Sampling and evaluating video and sequence runs: launch/sample.py's clip batches and strips,
launch/evaluate.py's per-frame FID of clips and Frechet distance of sequences, and its errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lsync_jax.data import SyntheticSource, fashion_mnist
from lsync_jax.eval.sample_batch import evaluate_sample_batch
from lsync_jax.eval.sampling import VIDEO_STRIP_CLIPS, sample_batches, write_samples

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def clips(n, frames=3, size=8, channels=1, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, frames, size, size, channels)).astype(np.uint8)


def test_sequences_are_sampled_as_floats_with_tags_and_written_without_a_picture(tmp_path):
    import jax.numpy as jnp

    from lsync_jax.sharding import make_mesh

    def sample_fn(variables, key, labels, cfg_scale, interval):  # sequences (N, 6, 2) outside [-1, 1]
        return 3.0 * jnp.ones((len(labels), 6, 2)) + jnp.asarray(labels, jnp.float32)[:, :1, None]

    batches = list(sample_batches(sample_fn, {}, make_mesh(-1, 1), 0, 5, 4, 0, 1.0, (0.0, 1.0), num_tags=3,
                                  quantize=False))
    assert [x.shape for x, _ in batches] == [(4, 6, 2), (1, 6, 2)] and batches[0][0].dtype == np.float32
    tags = np.concatenate([y for _, y in batches])
    assert tags.shape == (5, 3) and (tags.sum(axis=1) == 1).all()  # one tag on per sample
    assert np.allclose(np.concatenate([x for x, _ in batches])[:, 0, 0], 3.0 + tags[:, 0])  # not clipped
    write_samples("sequence", str(tmp_path / "seq.npz"), None, iter(batches))
    saved = np.load(tmp_path / "seq.npz")
    assert saved["arr_0"].shape == (5, 6, 2) and saved["arr_0"].dtype == np.float32 and saved["arr_0"].max() > 3
    assert saved["arr_1"].dtype == np.uint8 and (saved["arr_1"] == tags).all()
    assert os.listdir(tmp_path) == ["seq.npz"]


def test_clips_are_written_with_a_strip_of_the_first_ten_by_class(tmp_path):
    from PIL import Image

    n = VIDEO_STRIP_CLIPS + 2
    labels = np.arange(n)[::-1] % 3
    batch = np.broadcast_to(labels[:, None, None, None, None] * 50, (n, 3, 4, 4, 1)).astype(np.uint8)
    write_samples("video", str(tmp_path / "clips.npz"), str(tmp_path / "clips.png"), iter([(batch, labels)]))
    assert np.load(tmp_path / "clips.npz")["arr_0"].shape == (n, 3, 4, 4, 1)
    strip = np.asarray(Image.open(tmp_path / "clips.png"))
    assert strip.shape[:2] == (VIDEO_STRIP_CLIPS * (4 + 2) + 2, 3 * (4 + 2) + 2)
    rows = strip[2::6, 2]  # each row's first pixel: its clip's class x 50, in class order
    assert list(rows.reshape(-1)) == sorted(labels[:VIDEO_STRIP_CLIPS] * 50)


def test_wrong_inputs_are_named_before_any_weights_load(tmp_path):
    no_weights = str(tmp_path / "no_inception_weights.npz")  # reaching the Inception would fail otherwise

    def evaluate(sample, **kw):
        kw.setdefault("ref_batch", str(tmp_path / "ref_clips.npz"))
        return evaluate_sample_batch(str(sample), weights_path=no_weights, output=str(tmp_path / "m.json"),
                                     log=lambda s: None, **kw)

    np.savez(tmp_path / "clips.npz", arr_0=clips(4))
    np.savez(tmp_path / "ref_clips.npz", arr_0=clips(4, seed=1))
    np.savez(tmp_path / "images.npz", arr_0=clips(4)[:, 0])
    np.savez(tmp_path / "seq.npz", arr_0=np.zeros((4, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"holds video clips \(N, F, H, W, C\), but the reference .*images.npz "
                                         r"holds images \(N, H, W, C\)"):
        evaluate(tmp_path / "clips.npz", ref_batch=str(tmp_path / "images.npz"))
    with pytest.raises(ValueError, match=r"holds video clips .* but the reference data 'SyntheticSource'"):
        evaluate(tmp_path / "clips.npz", ref_batch=None, ref_source=SyntheticSource(4, (8, 8, 1), 2))
    with pytest.raises(ValueError, match="holds images .* but the reference .*ref_clips.npz holds video clips"):
        evaluate(tmp_path / "images.npz")
    np.savez(tmp_path / "float_clips.npz", arr_0=clips(2).astype(np.float32))
    with pytest.raises(ValueError, match=r"must be uint8 video clips \(N, F, H, W, C\) with 1 or 3 channels"):
        evaluate(tmp_path / "float_clips.npz")
    np.savez(tmp_path / "flat.npz", arr_0=np.zeros((4, 16), np.float32))
    with pytest.raises(ValueError, match=r"shape \(4, 16\); a sample batch holds images .*, video clips"):
        evaluate(tmp_path / "flat.npz")
    with pytest.raises(ValueError, match=r"holds sequences \(4, 16, 3\) .* needs an embedding model; pass "
                                         "--embedder=SPEC"):
        evaluate(tmp_path / "seq.npz", ref_batch=str(tmp_path / "seq.npz"))
    with pytest.raises(ValueError, match="--embedder=mean_std applies to sequence batches"):
        evaluate(tmp_path / "clips.npz", embedder="mean_std")
    with pytest.raises(ValueError, match=r"holds sequences \(N, L, C\), but the reference .* holds video clips"):
        evaluate(tmp_path / "seq.npz", embedder="mean_std")
    np.savez(tmp_path / "seq5.npz", arr_0=np.zeros((4, 16, 5), np.float32))
    with pytest.raises(ValueError, match=r"have 3 channels .*, the reference .*seq5.npz 5"):
        evaluate(tmp_path / "seq.npz", ref_batch=str(tmp_path / "seq5.npz"), embedder="mean_std")
    with pytest.raises(FileNotFoundError, match="reference batch .*missing.npz not found"):
        evaluate(tmp_path / "clips.npz", ref_batch=str(tmp_path / "missing.npz"))
    assert not os.path.exists(tmp_path / "m.json")


def test_sequence_batches_get_a_frechet_distance_over_the_embedder(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "seq.npz", arr_0=rng.normal(size=(16, 12, 3)).astype(np.float32))
    mask = np.arange(12)[None] < rng.integers(4, 13, 20)[:, None]
    np.savez(tmp_path / "ref.npz", arr_0=rng.normal(1.0, 2.0, (20, 12, 3)).astype(np.float32), mask=mask)
    lines = []
    result = evaluate_sample_batch(str(tmp_path / "seq.npz"), ref_batch=str(tmp_path / "ref.npz"),
                                   embedder="mean_std", output=str(tmp_path / "m.json"), log=lines.append)
    assert result["kind"] == "sequence" and result["metrics"]["fd"] > 1.0 and result["metrics"]["dim"] == 6
    assert (result["num_samples"], result["num_reference"]) == (16, 20)
    assert lines[0].startswith("sequence FD ") and "over 16 sequences (reference: 20)" in lines[0]
    assert json.load(open(tmp_path / "m.json"))["embedder"] == "mean_std"
    same = evaluate_sample_batch(str(tmp_path / "seq.npz"), ref_batch=str(tmp_path / "seq.npz"),
                                 embedder="mean_std", log=lambda s: None)
    assert abs(same["metrics"]["fd"]) < 1e-6


@pytest.mark.slow
def test_a_video_run_samples_clip_strips_and_gets_a_per_frame_fid(tmp_path, cache):
    if not os.path.isdir(fashion_mnist.DEFAULT_DIR):
        pytest.skip("Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    from PIL import Image

    from lsync_jax.configs import moving_fmnist
    from lsync_jax.eval.sampling import sample_from_workdir
    from lsync_jax.recipes import train_and_evaluate

    def config():
        c = moving_fmnist.get_config()
        c.model.overrides.update(dict(depth=3, hidden_size=32, num_heads=2, input_size=32, num_frames=4))
        c.data.update(dict(num_clips=64, frames=4, canvas=32, batch_size=4))
        c.train.update(dict(num_steps=2, log_every=1, checkpoint_every=2, num_grid_samples=0))
        c.objective.layersync.pairs = ((1, 2, 0.2),)
        c.sampler.num_steps = 4
        return c

    train_and_evaluate(config(), str(tmp_path / "run"))
    out = sample_from_workdir(config(), str(tmp_path / "run"), str(tmp_path / "samples"), num_samples=4,
                              batch_size=4)
    batch = np.load(out["npz"])
    assert batch["arr_0"].shape == (4, 4, 32, 32, 1) and batch["arr_0"].dtype == np.uint8
    assert batch["arr_1"].shape == (4,) and batch["arr_1"].max() < 10
    strip = np.asarray(Image.open(out["png"]))
    assert strip.shape[:2] == (4 * (32 + 2) + 2, 4 * (32 + 2) + 2)  # one clip per row, its 4 frames along it

    env = dict(os.environ, LSYNC_JAX_CACHE=cache, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "evaluate.py"), f"--sample_batch={out['npz']}",
                           "--ref_config=configs/moving_fmnist.py", "--ref_config.data.num_clips=64",
                           "--ref_config.data.frames=4", "--ref_split=train", "--ref_num=3", "--batch_size=8",
                           "--fid_method=eigh"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "per-frame FID" in proc.stdout and "over 16 frames from 4 clips (reference: 12 frames from 3 clips)" \
        in proc.stdout
    payload = json.load(open(os.path.splitext(out["npz"])[0] + "_metrics.json"))
    assert payload["kind"] == "video" and payload["metrics"]["frame_fid"] > 0
    assert (payload["num_samples"], payload["num_frames"], payload["num_reference"],
            payload["num_reference_frames"]) == (4, 16, 3, 12)
    assert payload["metrics"]["temporal_consistency"] is not None and payload["metrics"]["motion_ratio"] is not None


def test_too_few_frames_fail_before_any_weights_load(tmp_path, alarm):
    no_weights = str(tmp_path / "no_inception_weights.npz")  # reaching the Inception would fail otherwise
    np.savez(tmp_path / "one_frame.npz", arr_0=clips(1)[:, :1])
    np.savez(tmp_path / "ref_clips.npz", arr_0=clips(4, seed=1))
    with alarm(60), pytest.raises(ValueError, match=r"FID and sFID need at least 2 sample images .*the frames of "
                                                    r".*one_frame.npz: 1\)"):
        evaluate_sample_batch(str(tmp_path / "one_frame.npz"), ref_batch=str(tmp_path / "ref_clips.npz"),
                              weights_path=no_weights, log=lambda s: None)
