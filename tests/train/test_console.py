"""The console of a training run shows what a user needs: metric lines, progress, our own messages and
warnings; the libraries' INFO logging (Orbax: about 93 lines for 10 steps) stays off."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# absl's format: 'I1129 05:53:10.360512 139941210719936 logging_writer.py:48] ...'
INFO_LINE = re.compile(r"^I\d{4} [\d:.]+ +\d+ ([\w.]+\.py):\d+\]")


def _train(workdir, **env):
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"),
           "--config=" + os.path.join(ROOT, "configs", "tiny.py"), f"--workdir={workdir}",
           "--config.train.num_steps=2", "--config.train.checkpoint_every=1", "--config.train.log_every=1",
           "--config.train.num_grid_samples=0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=dict(os.environ, JAX_PLATFORMS="cpu", **env))
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr.splitlines()


def _info_sources(lines):
    return {m.group(1) for m in map(INFO_LINE.match, lines) if m}


@pytest.mark.slow
def test_library_info_stays_off_the_console_unless_asked(tmp_path):
    lines = _train(tmp_path / "quiet")
    ours = {"phases.py", "setup.py", "logging_writer.py", "periodic_actions.py", "hooks.py", "loop.py"}
    assert _info_sources(lines) <= ours, _info_sources(lines) - ours
    assert any("loss/velocity=" in line for line in lines)  # the metric lines are there
    assert not any("read only" in line for line in lines)  # nor orbax's read-only warnings
    verbose = _train(tmp_path / "verbose", LSYNC_JAX_LIBRARY_LOGS="1")
    assert "checkpoint_manager.py" in _info_sources(verbose) and len(verbose) > len(lines) + 20
