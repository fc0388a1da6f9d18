"""End to end on the tiny config: a run writes checkpoints, samples and TensorBoard events; resume is
exact; NaN stops the run naming the step; bad input fails before compiling and overwrites nothing."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lsync_jax.builders import build_model
from lsync_jax.configs import tiny
from lsync_jax.eval.sampling import sample_from_workdir
from lsync_jax.recipes import PREEMPTED_EXIT_CODE, train_and_evaluate
from lsync_jax.train.checkpoint import Checkpointer
from lsync_jax.train.hooks import NonFiniteLossError
from lsync_jax.train.state import init_state_fn, make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# Runs compared across processes use JAX's default generator in every process (tests/conftest.py
# switches the test process itself to 'rbg', whose bits are not sharding-invariant).
CLI_ENV = dict(os.environ, JAX_DEFAULT_PRNG_IMPL="threefry2x32", JAX_PLATFORMS="cpu")


def final_params(workdir):
    """(step, params) of a CLI tiny-config run's latest checkpoint, restored onto this process's device."""
    config = tiny.get_config()
    model, (tx, _) = build_model(config), make_optimizer(dict(config.optimizer))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                          jax.eval_shape(init_state_fn(model, tx), jax.random.key(0, impl="threefry2x32")))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    step = ckpt.latest_step()
    state = ckpt.restore(step, target)
    ckpt.close()
    return step, state.params


def train_cli(workdir, *overrides, check=True):
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config=" + os.path.join(ROOT, "configs",
                                                                                                "tiny.py"),
           "--workdir=" + str(workdir), *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=CLI_ENV)
    if check and out.returncode:
        raise AssertionError(out.stderr[-3000:])
    return out


@pytest.mark.slow
def test_run_writes_checkpoints_samples_and_events(tmp_path):
    config = tiny.get_config()
    config.train.sample_every = 3
    metrics = train_and_evaluate(config, str(tmp_path))
    expected = {"loss", "loss/velocity", "loss/layersync", "grad_norm", "learning_rate", "images_per_second"}
    assert expected <= set(metrics)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
    assert sorted(os.listdir(tmp_path / "samples")) == ["step_0000003.png", "step_0000006.png"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))


@pytest.mark.slow
def test_resume_in_a_fresh_process_is_exact(tmp_path):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    train_cli(straight)  # 6 steps
    train_cli(halves, "--config.train.num_steps=3")
    out = train_cli(halves)  # a fresh process picks up step 3 and runs to 6
    assert "resumed from" in out.stderr
    (s1, p1), (s2, p2) = final_params(straight), final_params(halves)
    assert s1 == s2 == 6
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny.get_config()
    config.optimizer.lr = 1e38  # the first update overflows the weights
    config.train.update(dict(num_steps=6, log_every=1, checkpoint_every=1))
    with pytest.raises(NonFiniteLossError, match=r"non-finite values at step 2: .*loss/velocity = (nan|inf)"):
        train_and_evaluate(config, str(tmp_path))
    assert os.listdir(tmp_path / "checkpoints") == ["1"]


@pytest.mark.slow
def test_bad_input_fails_before_compiling_and_keeps_the_workdir(tmp_path):
    config = tiny.get_config()
    config.train.num_steps = 3
    train_and_evaluate(config, str(tmp_path))
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    other = tiny.get_config()
    other.model.overrides.hidden_size = 32
    with pytest.raises(ValueError, match="incompatible model.*model.hidden_size: checkpoint 64, config 32"):
        train_and_evaluate(other, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before

    baseline = tiny.get_config()  # the same model, but LayerSync off: not a resume of this run
    baseline.objective.regularizers = ()
    with pytest.raises(ValueError, match=r"incompatible model.*objective\.regularizers\.layersync: checkpoint \{"):
        train_and_evaluate(baseline, str(tmp_path))
    clipped = tiny.get_config()  # another optimizer state structure
    clipped.optimizer.grad_clip = 1.0
    with pytest.raises(ValueError, match="optimizer settings or PRNG implementation"):
        train_and_evaluate(clipped, str(tmp_path))
    zero = tiny.get_config()
    zero.train.log_every = 0
    with pytest.raises(ValueError, match="config.train.log_every must be >= 1"):
        train_and_evaluate(zero, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before

    bad = tiny.get_config()
    with bad.unlocked():
        bad.train.num_stepz = 5
    with pytest.raises(ValueError, match="config.train.num_stepz"):
        train_and_evaluate(bad, str(tmp_path / "x"))
    missing = tiny.get_config()
    missing.data.name, missing.data.dir = "fashion_mnist", str(tmp_path / "no-data")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        train_and_evaluate(missing, str(tmp_path / "y"))
    shape = tiny.get_config()
    shape.data.synthetic_shape = (32, 32, 1)
    with pytest.raises(ValueError, match="gives 32x32 images but config.model.overrides.input_size=28"):
        train_and_evaluate(shape, str(tmp_path / "z"))


def test_imagenet_config_names_the_missing_data(tmp_path):
    from lsync_jax.configs import imagenet256

    config = imagenet256.get_config()
    with pytest.raises(FileNotFoundError, match="launch/preprocess.py"):
        train_and_evaluate(config, str(tmp_path))
    assert config.objective.layersync.pairs == ((8, 16, 0.2),) and config.data.batch_size == 256
    assert config.optimizer.lr == 1e-4 and config.train.ema_decay == 0.9999


@pytest.mark.slow
def test_sigterm_saves_before_exiting(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config=" + os.path.join(ROOT, "configs",
                                                                                                "tiny.py"),
           f"--workdir={tmp_path}", "--config.train.num_steps=100000", "--config.train.checkpoint_every=50000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=CLI_ENV)
    events_dir = tmp_path
    deadline = time.time() + 300
    while time.time() < deadline and not any(f.startswith("events") for f in os.listdir(events_dir)):
        time.sleep(0.5)
    time.sleep(3)  # let it take some steps
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE == 75, err[-2000:]  # "preempted, checkpoint saved": requeue me
    steps = [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
    assert len(steps) == 1 and 0 < steps[0] < 50000
    assert f"preempted at step {steps[0]}: checkpoint saved" in err


@pytest.mark.slow
def test_sample_cli_writes_an_adm_batch_and_a_grid(tmp_path):
    config = tiny.get_config()
    config.train.num_steps = 2
    train_and_evaluate(config, str(tmp_path))
    out = sample_from_workdir(tiny.get_config(), str(tmp_path), str(tmp_path / "out"), num_samples=12,
                              batch_size=8)
    batch = np.load(out["npz"])
    assert batch["arr_0"].shape == (12, 28, 28, 1) and batch["arr_0"].dtype == np.uint8
    assert batch["arr_1"].shape == (12,) and batch["arr_1"].max() < 10
    assert os.path.getsize(out["png"]) > 0
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        sample_from_workdir(tiny.get_config(), str(tmp_path / "empty"), str(tmp_path / "o2"), 4, 4)


def test_fashion_mnist_config_and_its_baseline():
    from lsync_jax.configs import fashion_mnist

    with_ls, base = fashion_mnist.get_config(), fashion_mnist.get_config("baseline")
    assert with_ls.objective.regularizers == ("layersync",) and base.objective.regularizers == ()
    assert with_ls.data.name == "fashion_mnist" and with_ls.model.overrides.input_size == 28
    with pytest.raises(ValueError, match="baseline"):
        fashion_mnist.get_config("repa")
