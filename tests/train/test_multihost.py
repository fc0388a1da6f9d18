"""Multi-host for real: two processes on this machine (jax.distributed over localhost, gloo CPU
collectives) train the tiny config together, each feeding its half of every global batch, write one
checkpoint, and match a single-process run."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.train.test_loop import CLI_ENV, ROOT, final_params, train_cli

pytestmark = [pytest.mark.slow, pytest.mark.multihost]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    single = tmp_path / "single"
    train_cli(single, "--config.train.num_steps=4")

    multi = tmp_path / "multi"
    port = free_port()
    cmd = lambda pid: [
        sys.executable, os.path.join(ROOT, "launch", "train.py"),
        "--config=" + os.path.join(ROOT, "configs", "tiny.py"),
        f"--workdir={multi}", "--config.train.num_steps=4", "--config.distributed.enabled=True",
        f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2",
        f"--config.distributed.process_id={pid}", "--config.distributed.cpu_collectives=gloo"]
    procs = [subprocess.Popen(cmd(pid), cwd=ROOT, env=CLI_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for pid in (0, 1)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    for p, err in zip(procs, errors):
        assert p.returncode == 0, err[-3000:]
    (s1, p1), (s2, p2) = final_params(single), final_params(multi)
    assert s1 == s2 == 4
    assert sorted(os.listdir(multi / "checkpoints")) == ["3", "4"]
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
