"""A run whose workdir and data live in a bucket (the GCS emulator on localhost), as on a TPU pod:
train -> SIGTERM -> resume -> sample -> evaluate, every file read and written through gs://."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lsync_jax import storage
from lsync_jax.data import fashion_mnist
from lsync_jax.porting import inception as weights
from lsync_jax.train.hooks import PREEMPTED_EXIT_CODE
from tests.train.test_loop import CLI_ENV, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.gcs]


def cli(script, *args):
    return [sys.executable, os.path.join(ROOT, "launch", script), *args]


def test_train_kill_resume_sample_evaluate_on_gs(gcs_emulator, bucket, inception_npz, tmp_path):
    if not os.path.isdir(fashion_mnist.DEFAULT_DIR):
        pytest.skip("Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    data, run, cache = f"{bucket}/fashion-mnist", f"{bucket}/run", f"{bucket}/cache"
    for name in os.listdir(fashion_mnist.DEFAULT_DIR):
        storage.upload(os.path.join(fashion_mnist.DEFAULT_DIR, name), f"{data}/{name}")
    storage.upload(inception_npz, f"{cache}/{weights.CACHED_NAME}")
    env = dict(gcs_emulator.env(), **{k: CLI_ENV[k] for k in ("JAX_DEFAULT_PRNG_IMPL", "JAX_PLATFORMS")},
               LSYNC_JAX_CACHE=cache)
    train = cli("train.py", "--config=" + os.path.join(ROOT, "configs", "tiny.py"), f"--workdir={run}",
                "--config.data.name=fashion_mnist", f"--config.data.dir={data}", "--config.train.checkpoint_every=4")

    # 1. train until the first checkpoint is in the bucket, then SIGTERM: it saves and exits 75
    proc = subprocess.Popen(train + ["--config.train.num_steps=100000"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and "4" not in (
            storage.listdir(f"{run}/checkpoints") if storage.isdir(f"{run}/checkpoints") else []):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    stopped = max(int(s) for s in storage.listdir(f"{run}/checkpoints") if s.isdigit())
    assert stopped >= 4 and f"preempted at step {stopped}: checkpoint saved in {run}/checkpoints" in err
    assert any(n.startswith("events.out.tfevents") for n in storage.listdir(run))  # synced before exiting

    # 2. the same command resumes from the bucket and finishes (a final sample grid in the bucket)
    out = subprocess.run(train + [f"--config.train.num_steps={stopped + 2}"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {run}/checkpoints step {stopped}" in out.stderr
    assert str(stopped + 2) in storage.listdir(f"{run}/checkpoints")
    assert storage.listdir(f"{run}/samples") == [f"step_{stopped + 2:07d}.png"]

    # 3. sample into the bucket, 4. evaluate there (Inception weights and statistics cache in the bucket too)
    tiny = "--config=" + os.path.join(ROOT, "configs", "tiny.py")
    out = subprocess.run(cli("sample.py", tiny, f"--workdir={run}", f"--out_dir={run}/out", "--num_samples=8",
                             "--batch_size=8"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    batch = f"{run}/out/samples_step{stopped + 2}_seed0_8.npz"
    assert storage.load_npz(batch)["arr_0"].shape == (8, 28, 28, 1)
    reference = f"{bucket}/reference.npz"
    storage.save_npz_atomic(reference, arr_0=np.random.default_rng(0).integers(0, 256, (8, 28, 28, 1), np.uint8))
    out = subprocess.run(cli("evaluate.py", f"--sample_batch={batch}", f"--ref_batch={reference}", "--batch_size=8",
                             "--fid_method=eigh"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = storage.read_json(batch[:-len(".npz")] + "_metrics.json")
    assert metrics["metrics"]["fid"] > 0 and metrics["num_samples"] == 8
    assert storage.listdir(f"{cache}/fid_stats")  # reference statistics cached in the bucket


def test_a_damaged_checkpoint_in_a_bucket_is_set_aside_and_the_run_resumes(bucket, caplog):
    from lsync_jax.configs import tiny
    from lsync_jax.recipes import train_and_evaluate

    run = f"{bucket}/run"
    config = tiny.get_config()
    train_and_evaluate(config, run)  # checkpoints 3 and 6
    storage.remove(f"{run}/checkpoints/6/state/_METADATA")  # a lost object: the newest checkpoint is damaged
    config.train.num_steps = 9
    with caplog.at_level("WARNING"):
        train_and_evaluate(config, run)
    assert "checkpoint 6 is damaged (state/_METADATA is missing): set aside as" in caplog.text
    names = storage.listdir(f"{run}/checkpoints")
    assert "6.damaged-1" in names and "9" in names  # kept, not deleted; the run went on from step 3
    assert storage.exists(f"{run}/checkpoints/6.damaged-1/meta/metadata")
