"""The console of a training run shows what a user needs: metric lines, progress, our own messages and
warnings; the libraries' INFO logging (Orbax: about 93 lines for 10 steps) stays off
(LSYNC_JAX_LIBRARY_LOGS=1 turns it back on: `quiet_library_logs` then installs no filter)."""

import logging
import os
import re
import subprocess
import sys

import pytest

from lsync_jax.host import _OwnInfoOnly, quiet_library_logs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# absl's format: 'I1129 05:53:10.360512 139941210719936 logging_writer.py:48] ...'
INFO_LINE = re.compile(r"^I\d{4} [\d:.]+ +\d+ ([\w.]+\.py):\d+\]")


def _train(workdir):
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"),
           "--config=" + os.path.join(ROOT, "configs", "tiny.py"), f"--workdir={workdir}",
           "--config.train.num_steps=2", "--config.train.checkpoint_every=1", "--config.train.log_every=1",
           "--config.train.num_grid_samples=0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr.splitlines()


def _info_sources(lines):
    return {m.group(1) for m in map(INFO_LINE.match, lines) if m}


@pytest.mark.slow
def test_library_info_stays_off_the_console(tmp_path):
    lines = _train(tmp_path / "quiet")
    ours = {"phases.py", "setup.py", "logging_writer.py", "periodic_actions.py", "writers.py", "hooks.py", "loop.py"}
    assert _info_sources(lines) <= ours, _info_sources(lines) - ours
    assert any("loss/velocity=" in line for line in lines)  # the metric lines are there
    assert not any("read only" in line for line in lines)  # nor orbax's read-only warnings


def _record(pathname, level, msg="x"):
    return logging.LogRecord("absl", level, pathname, 1, msg, None, None)


def test_the_console_filter_keeps_our_info_and_every_real_warning(monkeypatch):
    monkeypatch.delenv("LSYNC_JAX_LIBRARY_LOGS", raising=False)
    keep = _OwnInfoOnly()
    site = "/venv/lib/python3.11/site-packages"
    assert keep.filter(_record(f"/repo{os.sep}lsync_jax{os.sep}train{os.sep}setup.py", logging.INFO))
    assert keep.filter(_record(f"{site}/clu/metric_writers/logging_writer.py", logging.INFO))
    assert not keep.filter(_record(f"{site}/orbax/checkpoint/checkpoint_manager.py", logging.INFO))
    assert keep.filter(_record(f"{site}/orbax/checkpoint/checkpoint_manager.py", logging.WARNING, "disk full"))
    assert not keep.filter(_record(f"{site}/orbax/checkpoint/checkpoint_manager.py", logging.WARNING,
                                   "Given directory is read only=/run/checkpoints"))


def test_library_logs_come_back_on_request(monkeypatch):
    from absl import logging as absl_logging

    handler = absl_logging.get_absl_handler()
    for f in [f for f in handler.filters if isinstance(f, _OwnInfoOnly)]:
        handler.removeFilter(f)
    monkeypatch.setenv("LSYNC_JAX_LIBRARY_LOGS", "1")
    quiet_library_logs()
    assert not any(isinstance(f, _OwnInfoOnly) for f in handler.filters)
    monkeypatch.delenv("LSYNC_JAX_LIBRARY_LOGS")
    quiet_library_logs()
    try:
        assert sum(isinstance(f, _OwnInfoOnly) for f in handler.filters) == 1
    finally:
        for f in [f for f in handler.filters if isinstance(f, _OwnInfoOnly)]:
            handler.removeFilter(f)
