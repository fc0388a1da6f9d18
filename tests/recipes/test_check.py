"""launch/train.py --check: every check of a start, then exit before compiling, creating nothing."""

import os
import subprocess
import sys

import pytest

from lsync_jax.configs import tiny
from lsync_jax.recipes import check_run, train_and_evaluate
from tests.train.test_loop import ROOT


def test_check_passes_and_leaves_the_workdir_as_found(tmp_path):
    summary = check_run(tiny.get_config(), str(tmp_path / "run"))
    assert "check passed on 1 process(es)" in summary and "phase 'train'" in summary
    assert not (tmp_path / "run").exists()  # the probes cleaned up after themselves; nothing was created


def test_check_names_the_problem(tmp_path):
    config = tiny.get_config()
    config.data.name = "fashion_mnist"
    config.data.dir = str(tmp_path / "no-such-dir")
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        check_run(config, str(tmp_path / "run"))
    config = tiny.get_config()
    config.eval.every = 2
    config.eval.reference = str(tmp_path / "missing_ref.npz")
    with pytest.raises(FileNotFoundError, match=r"config.eval.reference=.*missing_ref.npz.* not found"):
        check_run(config, str(tmp_path / "run"))


@pytest.mark.slow
def test_check_of_a_resume_compares_the_checkpoint_without_touching_it(tmp_path):
    config = tiny.get_config()
    config.train.num_steps = 3
    train_and_evaluate(config, str(tmp_path))
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    assert "can start" in check_run(config, str(tmp_path))
    other = tiny.get_config()
    other.model.overrides.hidden_size = 32
    with pytest.raises(ValueError, match="incompatible model"):
        check_run(other, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before


@pytest.mark.slow
@pytest.mark.gcs
def test_check_cli_probes_a_bucket_and_fails_in_seconds_naming_it(gcs_emulator, bucket):
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config=" + os.path.join(ROOT, "configs",
           "tiny.py"), "--check"]
    env = dict(gcs_emulator.env(), JAX_PLATFORMS="cpu")
    ok = subprocess.run(cmd + [f"--workdir={bucket}/run"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0 and "check passed" in ok.stderr, ok.stderr[-2000:]
    bad = subprocess.run(cmd + ["--workdir=gs://no-such-bucket-xyz/run"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and "gs://no-such-bucket-xyz does not exist" in bad.stderr
    assert "Compiling" not in bad.stderr


@pytest.mark.gcs
def test_a_typo_in_a_bucket_path_is_named_before_anything_runs(bucket):
    config = tiny.get_config()
    config.data.name = "fashion_mnist"
    config.data.dir = f"{bucket}/fashion-mnsit"  # the typo
    with pytest.raises(FileNotFoundError, match=f"not found in '{bucket}/fashion-mnsit'"):
        check_run(config, f"{bucket}/run")
    with pytest.raises(FileNotFoundError, match=f"not found in '{bucket}/fashion-mnsit'"):
        train_and_evaluate(config, f"{bucket}/run")


def test_a_run_that_leaves_its_protocol_is_warned_about(tmp_path, caplog):
    import logging

    from lsync_jax.configs import paper

    config = paper.get_config("lsync-demo-fmnist-fid1k")
    config.train.num_steps = 400
    with caplog.at_level(logging.WARNING):
        check_run(config, str(tmp_path / "run"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("not protocol 'lsync-demo-fmnist-fid1k'" in w and "800" in w for w in warnings), warnings
