"""Issue 30, part 1, end to end: two trainers on one workdir (launch/train.py, the tiny config). The second
refuses before it writes anything, naming the holder; a SIGTERM'd holder exits 75 and releases; a holder
killed with SIGKILL is replaced at once on its own host (its processes are gone); a holder on another
host that vanished is replaced once its lease expires by the storage's clock; a 2-process run holds one
hold for the run, and a refusal stops both its processes. Locally and on gs:// (the emulator). Unit tests
of the hold: tests/test_workdir_hold.py. Every wait is bounded (alarms, subprocess timeouts)."""

import os
import signal
import socket
import time

import pytest

from lsync_jax import storage
from lsync_jax.tools.pod_trials import start_trainers
from lsync_jax.train.hooks import PREEMPTED_EXIT_CODE
from lsync_jax.workdir import HOLD_FILE, read_holder
from tests.helpers import alarm
from tests.test_workdir_hold import other_host_hold, snapshot

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI_ENV = dict(os.environ, JAX_DEFAULT_PRNG_IMPL="threefry2x32", JAX_PLATFORMS="cpu")
FAST = ["--config.train.num_grid_samples=0", "--config.train.checkpoint_every=2", "--config.train.log_every=1"]


def start(workdir, log, *overrides, processes=1, env=None):
    """launch/train.py on the tiny config, its stderr into `log` (+ '.<process>'): never a full pipe."""
    return start_trainers(workdir, processes, log, *FAST, *overrides, env=env or CLI_ENV)


def finish(procs, log, timeout=600):
    """(return codes, stderr texts) once every process has ended; a process still running when the wait
    fails (a timeout, an interrupt) is killed on the way out."""
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return codes, [open(f"{log}.{i}").read() for i in range(len(procs))]


def wait_for(condition, what, seconds=300):
    with alarm(seconds):
        while not condition():
            time.sleep(0.2)


def holder_pid(workdir):
    holder = read_holder(workdir)
    return holder.record.get("pid") if holder is not None and holder.record else None


def stopped(pid):
    """Whether process `pid` is stopped (SIGSTOP delivered: no thread of it runs)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def checkpoints(workdir):
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []


def test_a_second_trainer_on_a_local_workdir_refuses_before_writing_and_a_sigterm_releases(tmp_path):
    workdir, log = str(tmp_path / "run"), str(tmp_path / "log")
    first = start(workdir, log + "1", "--config.train.num_steps=100000")[0]
    try:
        wait_for(lambda: checkpoints(workdir), "the first checkpoint")
        first.send_signal(signal.SIGSTOP)  # alive and holding, writing nothing while the second starts
        wait_for(lambda: stopped(first.pid), "the first run stopped", seconds=30)
        before = snapshot(workdir)
        codes, errors = finish(start(workdir, log + "2", "--config.train.num_steps=100000",
                                     "--config.train.hold_wait_s=0"), log + "2", timeout=300)
        assert codes == [1], errors[0][-3000:]
        for part in (f"{workdir} is held by another run", f"host {socket.gethostname()}, process {first.pid}",
                     "started 20", "lease last renewed", "--config.train.take_over_hold=True"):
            assert part in errors[0], errors[0][-3000:]
        after = snapshot(workdir)  # nothing written: no run record, no probe, no event file
        assert after == before, {k: (before.get(k), after.get(k)) for k in {*before, *after}
                                 if before.get(k) != after.get(k)}
        first.send_signal(signal.SIGCONT)
        first.send_signal(signal.SIGTERM)
        codes, errors = finish([first], log + "1", timeout=300)
        assert codes == [PREEMPTED_EXIT_CODE], errors[0][-3000:]
        assert not os.path.exists(os.path.join(workdir, HOLD_FILE))  # released on the way out
    finally:
        first.kill()
        first.wait()


def test_a_run_whose_hold_was_taken_over_stops_before_it_saves_again(tmp_path):
    workdir, log = str(tmp_path / "run"), str(tmp_path / "log")
    # synchronous saves: an asynchronous one passes the guard and may start writing only after the pause (a save
    # under way when the hold is taken is not the guard's to stop: docs/training.md), which the test cannot see
    first = start(workdir, log + "1", "--config.train.num_steps=100000", "--config.train.checkpoint_every=20",
                  "--config.train.async_checkpoints=False")[0]
    try:
        wait_for(lambda: checkpoints(workdir), "the first checkpoint")
        with alarm(120):
            while True:  # stopped between two saves, its renewals
                first.send_signal(signal.SIGSTOP)  # paused: the takeover comes unseen
                wait_for(lambda: stopped(first.pid), "the first run stopped", seconds=30)
                if not any("tmp" in name for name in os.listdir(os.path.join(workdir, "checkpoints"))):
                    break
                first.send_signal(signal.SIGCONT)
                time.sleep(0.3)
        end = checkpoints(workdir)[-1] + 4
        codes, errors = finish(start(workdir, log + "2", f"--config.train.num_steps={end}",
                                     "--config.train.take_over_hold=True"), log + "2", timeout=300)
        assert codes == [0], errors[0][-3000:]
        assert "take_over_hold: took over the hold of" in errors[0] and f"process {first.pid}" in errors[0]
        before = snapshot(os.path.join(workdir, "checkpoints"))
        first.send_signal(signal.SIGCONT)
        codes, errors = finish([first], log + "1", timeout=300)
        assert codes == [1], errors[0][-3000:]
        assert "HoldLostError" in errors[0] and "this run no longer holds its workdir" in errors[0], errors[0][-3000:]
        after = snapshot(os.path.join(workdir, "checkpoints"))
        assert checkpoints(workdir)[-1] == end  # the second run's last save is the newest
        changed = {k for k in {*before, *after} if before.get(k) != after.get(k)}
        assert not {k for k in changed if k.split(os.sep)[0] == str(end)}, sorted(changed)
    finally:
        first.kill()
        first.wait()


def test_a_two_process_run_holds_one_hold_and_a_killed_run_is_replaced_at_once(tmp_path):
    workdir, log = str(tmp_path / "run"), str(tmp_path / "log")
    other_host_hold(workdir)  # a live run elsewhere: both processes refuse, with its name
    codes, errors = finish(start(workdir, log + "0", "--config.train.num_steps=4", "--config.train.hold_wait_s=0",
                                 processes=2), log + "0", timeout=300)
    assert codes == [1, 1], errors[1][-3000:]
    assert all("is held by another run" in e and "host node-7.other, process 4242" in e for e in errors)
    assert "process 0 found this" in errors[1]
    os.remove(os.path.join(workdir, HOLD_FILE))
    procs = start(workdir, log + "1", "--config.train.num_steps=100000", processes=2)
    try:
        wait_for(lambda: holder_pid(workdir) == procs[0].pid, "the run's hold")
        holder = read_holder(workdir).record
        assert sorted(p["pid"] for p in holder["processes"]) == sorted(p.pid for p in procs)  # the run's processes
    finally:
        for p in procs:  # both killed (a lost allocation): the hold stays behind
            p.kill()
            p.wait()
    assert holder_pid(workdir) == procs[0].pid
    codes, errors = finish(start(workdir, log + "2", "--config.train.num_steps=1", "--config.train.hold_wait_s=0"),
                           log + "2")
    assert codes == [0], errors[0][-3000:]
    broke = [line for line in errors[0].splitlines() if "broke the hold of" in line]
    assert len(broke) == 1 and f"process {procs[0].pid} (with 1 more process of its run)" in broke[0]
    assert "its process(es) on this host are gone" in broke[0]
    assert checkpoints(workdir) == [1] and not os.path.exists(os.path.join(workdir, HOLD_FILE))


@pytest.mark.gcs
def test_on_gcs_a_vanished_holder_expires_and_a_second_trainer_refuses(bucket, gcs_emulator, tmp_path):
    from lsync_jax.workdir import _GcsHold

    workdir, log = f"{bucket}/run", str(tmp_path / "log")
    env = dict(gcs_emulator.env(), JAX_DEFAULT_PRNG_IMPL="threefry2x32", JAX_PLATFORMS="cpu")
    gone = {"host": "vm-lost", "boot_id": "", "pid": 4242}  # a VM that vanished: its lease runs out
    _GcsHold(workdir).create(dict(gone, token="lost", lease_s=8.0, processes=[gone], started="2026-01-01"))
    first = start(workdir, log + "1", "--config.train.num_steps=6", "--config.train.hold_wait_s=120", env=env)[0]
    try:
        wait_for(lambda: holder_pid(workdir) == first.pid, "the first's hold")
        codes, errors = finish(start(workdir, log + "2", "--config.train.num_steps=6",
                                     "--config.train.hold_wait_s=0", env=env), log + "2", timeout=300)
        assert codes == [1], errors[0][-3000:]
        assert f"{workdir} is held by another run" in errors[0] and f"process {first.pid}" in errors[0]
        codes, errors = finish([first], log + "1")
        assert codes == [0], errors[0][-3000:]
    finally:
        first.kill()
        first.wait()
    broke = [line for line in errors[0].splitlines() if "broke the hold of host vm-lost, process 4242" in line]
    assert len(broke) == 1 and "it expired (not renewed for" in broke[0], errors[0][-3000:]
    assert read_holder(workdir) is None
    records = storage.listdir(f"{workdir}/runs")
    assert len(records) == 1 and records[0].endswith(f"_{first.pid}.json")  # none of the refused one
