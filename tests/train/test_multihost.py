"""Multi-host for real: two processes on this machine (jax.distributed over localhost, gloo CPU
collectives) train the tiny config together, each feeding its half of every global batch and
writing one checkpoint; a run moves 1 -> 2 -> 1 processes and matches an uninterrupted
single-process run (elastic resume), and a SIGTERM on one process stops both at one step."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lsync_jax.train.hooks import PREEMPTED_EXIT_CODE
from tests.train.test_loop import CLI_ENV, ROOT, final_params

pytestmark = [pytest.mark.slow, pytest.mark.multihost]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir, num_processes, *overrides):
    """Start `num_processes` train.py processes of the tiny config on `workdir` (over gloo when more than one)."""
    port = free_port()
    base = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config=" + os.path.join(ROOT, "configs",
            "tiny.py"), f"--workdir={workdir}", *overrides]
    if num_processes == 1:
        return [subprocess.Popen(base, cwd=ROOT, env=CLI_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True)]
    return [subprocess.Popen(base + ["--config.distributed.enabled=True",
                                     f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                                     f"--config.distributed.num_processes={num_processes}",
                                     f"--config.distributed.process_id={pid}",
                                     "--config.distributed.cpu_collectives=gloo"],
                             cwd=ROOT, env=CLI_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for pid in range(num_processes)]


def finish(procs, codes=(0,)):
    errors = [p.communicate(timeout=600)[1] for p in procs]
    for p, err in zip(procs, errors):
        assert p.returncode in codes, err[-3000:]
    return errors


def logged_losses(workdir):
    """{step: loss} from a run's TensorBoard events (every event file: resumed runs add one each)."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0})
    acc.Reload()
    return {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors("loss")}


def test_elastic_resume_one_to_two_to_one_process(tmp_path):
    """Checkpointed by 1 process, resumed on 2, then on 1 again: the same losses and weights as one
    uninterrupted run (batches are global; the checkpoint holds one global data position)."""
    every_step = ["--config.train.log_every=1", "--config.train.checkpoint_every=2"]
    straight, elastic = tmp_path / "straight", tmp_path / "elastic"
    finish(launch(straight, 1, "--config.train.num_steps=6", *every_step))
    finish(launch(elastic, 1, "--config.train.num_steps=2", *every_step))
    errors = finish(launch(elastic, 2, "--config.train.num_steps=4", *every_step))
    assert all(f"resumed from {elastic}/checkpoints step 2" in e for e in errors)
    errors = finish(launch(elastic, 1, "--config.train.num_steps=6", *every_step))
    assert f"resumed from {elastic}/checkpoints step 4" in errors[0]
    a, b = logged_losses(straight), logged_losses(elastic)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)
    (s1, p1), (s2, p2) = final_params(straight), final_params(elastic)
    assert s1 == s2 == 6
    for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_sigterm_on_one_process_stops_both_at_the_same_step(tmp_path):
    procs = launch(tmp_path, 2, "--config.train.num_steps=100000", "--config.train.checkpoint_every=50000")
    deadline = time.time() + 300
    while time.time() < deadline and not any(f.startswith("events") for f in os.listdir(tmp_path)):
        time.sleep(0.5)
    time.sleep(2)  # some steps
    procs[1].send_signal(signal.SIGTERM)  # the other process gets no signal
    errors = finish(procs, codes=(PREEMPTED_EXIT_CODE,))
    steps = [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
    assert len(steps) == 1 and 0 < steps[0] < 50000
    for err in errors:
        assert f"every process saves at step {steps[0]}" in err
        assert f"preempted at step {steps[0]}: checkpoint saved" in err
