"""Issue 30, part 1: the workdir hold (lsync_jax.workdir.WorkdirHold), one module at a time: taken, refused
naming the holder, released on every exit, renewed, expired by the storage's clock, broken at once when
its processes on this host are gone, taken over with one line, waited for; on a local disk and on gs://
(the emulator). Anything that could hang runs under an alarm. Runs of launch/train.py: tests/faults/
test_hold.py."""

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from lsync_jax import workdir as workdir_module
from lsync_jax.workdir import (
    HOLD_FILE,
    HoldError,
    HoldLostError,
    WorkdirHold,
    hold_summary,
    process_identity,
    read_holder,
)
from tests.helpers import alarm


def other_host_hold(workdir, *, lease_s=120.0, pid=4242):
    """A hold as another machine's run writes it (hand-written, renewed now)."""
    me = {"host": "node-7.other", "boot_id": "0000", "pid": pid, "pid_start": "1"}
    record = dict(me, token="theirs", lease_s=lease_s, processes=[me], started="2026-01-01T00:00:00+00:00",
                  argv=["launch/train.py"])
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, HOLD_FILE), "w") as f:
        json.dump(record, f)
    return record


def snapshot(directory):
    """Every file and directory under `directory` with its size and mtime."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            stat = os.stat(path)
            out[os.path.relpath(path, directory)] = (stat.st_size, stat.st_mtime_ns)
    return out


def warnings_in(caplog, text):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


def dead_pid():
    """The pid of a process of this host that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_run_takes_the_hold_naming_itself_and_releases_it_leaving_nothing(tmp_path):
    workdir = str(tmp_path / "new" / "run")
    with WorkdirHold(workdir) as hold:
        holder = read_holder(workdir)
        assert holder.record["token"] == hold.token and holder.record["pid"] == os.getpid()
        assert holder.record["host"] == socket.gethostname() and holder.record["lease_s"] == 120
        assert holder.age is not None and holder.age < 60
        assert hold_summary(workdir).startswith(f"held by host {socket.gethostname()}, process {os.getpid()}")
    assert not os.path.exists(tmp_path / "new")  # the directories it made, empty again, are gone
    assert hold_summary(workdir) == "no hold"
    (tmp_path / "kept").mkdir()
    with WorkdirHold(str(tmp_path / "kept")):
        (tmp_path / "kept" / "written").write_text("a run's file")
    assert sorted(os.listdir(tmp_path / "kept")) == ["written"]


def test_the_hold_is_released_on_an_error_and_on_preemption(tmp_path):
    from lsync_jax.train.hooks import Preempted

    for error in (ValueError("a failed start"), Preempted(3, str(tmp_path)), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with WorkdirHold(str(tmp_path)):
                assert os.path.exists(tmp_path / HOLD_FILE)
                raise error
        assert not os.path.exists(tmp_path / HOLD_FILE)


def test_a_live_hold_of_another_host_is_refused_naming_it_and_nothing_is_written(tmp_path):
    workdir = str(tmp_path / "run")
    other_host_hold(workdir)
    before = snapshot(workdir)
    with alarm(60), pytest.raises(HoldError) as info:
        WorkdirHold(workdir, wait_s=0).__enter__()
    message = str(info.value)
    for part in (f"{workdir} is held by another run", "host node-7.other, process 4242",
                 "started 2026-01-01T00:00:00+00:00", "lease last renewed", "by the storage's clock",
                 "config.train.hold_wait_s=0", "--config.train.take_over_hold=True"):
        assert part in message, message
    assert snapshot(workdir) == before


def test_expiry_is_judged_by_the_storage_clock_not_the_hosts(tmp_path, monkeypatch, caplog):
    workdir = str(tmp_path)
    other_host_hold(workdir, lease_s=120)
    hold_file = os.path.join(workdir, HOLD_FILE)
    real_time = time.time
    monkeypatch.setattr(workdir_module.time, "time", lambda: real_time() + 86400)  # this host's clock is a day ahead
    with pytest.raises(HoldError, match="node-7.other"):
        WorkdirHold(workdir, wait_s=0).__enter__()
    monkeypatch.setattr(workdir_module.time, "time", real_time)
    os.utime(hold_file, (real_time() - 121, real_time() - 121))  # its last renewal: 121 s ago on the disk
    with caplog.at_level(logging.WARNING), WorkdirHold(workdir, wait_s=0) as hold:
        assert read_holder(workdir).record["token"] == hold.token
    lines = warnings_in(caplog, "broke the hold")
    assert len(lines) == 1 and "host node-7.other, process 4242" in lines[0]
    assert "it expired (not renewed for 121 s by the storage's clock; its lease is 120 s)" in lines[0]


def test_a_hold_of_this_host_whose_process_is_gone_is_broken_at_once(tmp_path, caplog):
    workdir = str(tmp_path)
    me = process_identity()
    gone = dict(me, pid=dead_pid(), pid_start="")
    record = dict(gone, token="old", lease_s=120.0, processes=[gone], started="2026-01-01T00:00:00+00:00")
    (tmp_path / HOLD_FILE).write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING), alarm(30), WorkdirHold(workdir, wait_s=600):  # no wait: broken now
        pass
    lines = warnings_in(caplog, "broke the hold")
    assert len(lines) == 1 and f"process {gone['pid']}" in lines[0] and "on this host are gone" in lines[0]
    # a live process of this host (here: a child) holds it: refused, not broken
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = dict(me, pid=child.pid, pid_start=workdir_module._process_start(child.pid))
        (tmp_path / HOLD_FILE).write_text(json.dumps(dict(record, **alive, processes=[alive])))
        with pytest.raises(HoldError, match=f"process {child.pid}"):
            WorkdirHold(workdir, wait_s=0).__enter__()
        child.kill()  # killed and not yet reaped (a zombie): gone
        with alarm(30), WorkdirHold(workdir, wait_s=600):
            pass
    finally:
        child.kill()
        child.wait()


def test_a_hold_that_names_a_reused_pid_is_stale(tmp_path):
    me = process_identity()
    reused = dict(me, pid_start="1")  # this process's pid, started at another time: not the holder
    (tmp_path / HOLD_FILE).write_text(json.dumps(dict(reused, token="old", lease_s=120.0, processes=[reused])))
    with alarm(30), WorkdirHold(str(tmp_path), wait_s=600):
        pass


def test_a_second_hold_in_the_same_process_is_refused(tmp_path):
    with WorkdirHold(str(tmp_path)):
        with pytest.raises(HoldError, match=f"process {os.getpid()}"):
            WorkdirHold(str(tmp_path), wait_s=0).__enter__()
        assert os.path.exists(tmp_path / HOLD_FILE)


def test_a_takeover_breaks_a_live_hold_with_one_line_and_the_holder_stops(tmp_path, caplog):
    workdir = str(tmp_path)
    with WorkdirHold(workdir, lease_s=1.0) as first:  # renewed every 0.25 s; released on any failure below
        step = first.guarded(lambda state: state + 1, every=1)
        assert step(1) == 2
        with caplog.at_level(logging.WARNING), WorkdirHold(workdir, take_over=True) as second:
            lines = warnings_in(caplog, "take_over_hold: took over the hold of")
            assert len(lines) == 1 and f"process {os.getpid()}" in lines[0]
            with alarm(30):
                while first.lost is None:  # its next renewal finds the hold taken
                    time.sleep(0.05)
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1 and "this run no longer holds its workdir: its hold was taken over by" in errors[0]
            with pytest.raises(HoldLostError, match="this run no longer holds its workdir"):
                step(2)  # the run's next step
            with pytest.raises(HoldLostError, match="this run no longer holds its workdir"):
                first.guard(2)  # and any write
            first.release()  # leaves the new holder's hold in place
            assert read_holder(workdir).record["token"] == second.token
    assert read_holder(workdir) is None


def test_the_guard_confirms_the_hold_before_a_write_without_waiting_for_a_renewal(tmp_path, caplog):
    """A takeover between two renewals (a lease of 10 minutes: no renewal comes) is found by the guard's
    own renewal, before the write."""
    workdir = str(tmp_path)
    with WorkdirHold(workdir, lease_s=600.0) as first:
        first.guard(1)  # still its own: nothing raised
        assert first.lost is None
        with caplog.at_level(logging.WARNING), WorkdirHold(workdir, take_over=True) as second:
            assert first.lost is None  # its renewal thread sleeps for 150 s more
            with pytest.raises(HoldLostError, match="this run no longer holds its workdir"):
                first.guard(2)
            assert "taken over by" in first.lost
            second.guard(2)  # the new holder writes
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1, errors


def test_a_renewal_after_the_release_says_nothing(tmp_path, caplog):
    """A renewal thread that outlived release()'s join (a slow storage) finds the hold gone: it must not
    log that the run lost its workdir."""
    hold = WorkdirHold(str(tmp_path), lease_s=1.0).__enter__()
    thread = hold._thread
    hold._thread = None  # as if its join had timed out
    with caplog.at_level(logging.WARNING):
        hold.release()
        thread.join(timeout=30)
        assert not hold.renew()  # what that thread's late renewal does
    assert hold.lost is None and [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_failed_verdict_of_a_multi_process_start_releases_the_hold(tmp_path, monkeypatch):
    """Process 0 took the hold, then could not tell the others: the run does not start and the hold goes."""
    from jax._src import distributed

    class Client:
        def blocking_key_value_get(self, key, timeout_ms):
            return json.dumps(dict(process_identity(), pid=1))

        def key_value_set(self, key, value):
            if key.endswith("/verdict"):
                raise RuntimeError("coordination service gone")

    monkeypatch.setattr(workdir_module.jax, "process_count", lambda: 2)
    monkeypatch.setattr(workdir_module.jax, "process_index", lambda: 0)
    monkeypatch.setattr(distributed.global_state, "client", Client())
    with pytest.raises(RuntimeError, match="coordination service gone"):
        WorkdirHold(str(tmp_path)).__enter__()
    assert read_holder(str(tmp_path)) is None


def test_the_lease_is_renewed_in_the_background(tmp_path):
    hold_file = tmp_path / HOLD_FILE
    with WorkdirHold(str(tmp_path), lease_s=1.0):
        old = time.time() - 100
        os.utime(hold_file, (old, old))
        with alarm(30):
            while os.stat(hold_file).st_mtime < old + 50:  # touched by the renewal thread within 0.25 s
                time.sleep(0.05)
        assert read_holder(str(tmp_path)).age < 50


def test_a_waiting_start_takes_a_hold_released_meanwhile_or_refuses_after_its_wait(tmp_path, caplog):
    workdir = str(tmp_path)
    other_host_hold(workdir)
    threading.Timer(0.5, os.remove, [os.path.join(workdir, HOLD_FILE)]).start()  # the other run ends
    with caplog.at_level(logging.WARNING), alarm(60), WorkdirHold(workdir, wait_s=120) as hold:
        assert read_holder(workdir).record["token"] == hold.token
    lines = warnings_in(caplog, "waiting up to 120 s (config.train.hold_wait_s)")
    assert len(lines) == 1 and "node-7.other" in lines[0]
    other_host_hold(workdir)
    with alarm(60), pytest.raises(HoldError, match=r"after waiting 0.5 s \(config.train.hold_wait_s\)"):
        WorkdirHold(workdir, wait_s=0.5).__enter__()


def test_every_process_of_a_run_takes_part_in_the_guard(tmp_path, monkeypatch):
    """Process 1 holds nothing itself, yet joins every agreement (a collective all processes must call),
    and stops when process 0 lost the hold."""
    from jax._src import distributed

    class Client:
        def blocking_key_value_get(self, key, timeout_ms):
            return "ok"  # process 0's verdict

        def key_value_set(self, key, value):
            pass

    agreements = []

    def all_processes(flag):
        agreements.append(flag)
        return len(agreements) == 1  # the second time, process 0 has lost the hold

    monkeypatch.setattr(workdir_module.jax, "process_count", lambda: 2)
    monkeypatch.setattr(workdir_module.jax, "process_index", lambda: 1)
    monkeypatch.setattr(distributed.global_state, "client", Client())
    monkeypatch.setattr(workdir_module, "all_processes", all_processes)
    with WorkdirHold(str(tmp_path)) as hold:
        assert hold.held is None  # process 0's
        hold.guard(4)
        with pytest.raises(HoldLostError, match="process 0 of this run lost its workdir hold.*at step 8"):
            hold.guard(8)
    assert agreements == [True, True]
    step = hold.guarded(lambda state: state, every=5, start=3)
    agreements.clear()
    for state in range(4, 10):  # steps 4..9: one agreement, before step 5
        step(state)
    assert agreements == [True]


def test_settings_outside_their_range_are_named():
    with pytest.raises(ValueError, match=r"config.train.hold_lease_s=0: expected a lease of at least 1 s"):
        WorkdirHold("/tmp/unused", lease_s=0)
    with pytest.raises(ValueError, match=r"config.train.hold_wait_s=-1: expected seconds >= 0"):
        WorkdirHold("/tmp/unused", wait_s=-1)


def test_the_config_checks_the_hold_settings():
    from lsync_jax.builders import validate_config
    from lsync_jax.configs import tiny

    for key, value, message in (("hold_lease_s", 0.5, "expected a lease of at least 1 s"),
                                ("hold_wait_s", -1.0, "expected seconds >= 0")):
        config = tiny.get_config()
        config.train[key] = value
        with pytest.raises(ValueError, match=rf"config.train.{key}={value}: {message}"):
            validate_config(config)


def test_check_refuses_hold_settings_outside_their_range(tmp_path):
    from lsync_jax.configs import tiny
    from lsync_jax.recipes import check_run

    config = tiny.get_config()
    config.train.hold_lease_s = 0.5
    with pytest.raises(ValueError, match=r"config.train.hold_lease_s=0.5: expected a lease of at least 1 s"):
        check_run(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_a_config_without_the_hold_keys_gets_the_schemas_error(tmp_path):
    from lsync_jax.configs import tiny
    from lsync_jax.train import train

    config = tiny.get_config()
    with config.unlocked():
        del config.train["hold_wait_s"]
    with pytest.raises(ValueError, match="config.train.hold_wait_s is missing"):
        train(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_a_storage_without_conditional_writes_is_not_held_with_one_line(caplog):
    """s3:// (and any fsspec URL but gs://): no hold, one warning line, the run goes on; --check says so.
    Nothing here reaches the network."""
    workdir = "s3://some-bucket/run"
    with caplog.at_level(logging.WARNING), WorkdirHold(workdir) as hold:
        hold.guard(1)
        assert hold.held is None and hold.lost is None
    lines = warnings_in(caplog, "no hold")
    assert lines == [f"{workdir}: no hold: s3:// has no conditional writes in lsync-jax; two trainers on this "
                     "workdir are not prevented"]
    assert hold_summary(workdir) == lines[0].split(": ", 1)[1]
    assert read_holder(workdir) is None


def test_the_config_defines_the_hold_settings_once():
    from lsync_jax.configs.base import base_config

    train = base_config().train
    assert (train.hold_lease_s, train.hold_wait_s, train.take_over_hold) == (120.0, 180.0, False)
    hold = WorkdirHold.of_config("/tmp/unused", train)
    assert (hold.lease_s, hold.wait_s, hold.take_over) == (120.0, 180.0, False)


# -- gs:// ------------------------------------------------------------------------------------------------


def many_processes(n):
    return [{"host": f"pod-worker-{i:04d}.a-long-cluster-domain.internal", "boot_id": "0123456789abcdef" * 2 + "-0000",
             "pid": 100000 + i, "pid_start": "123456789"} for i in range(n)]


def test_the_gcs_metadata_of_a_large_run_stays_under_the_8_kib_cap():
    """GCS caps an object's custom metadata at 8 KiB (keys and values); the emulator does not enforce it."""
    processes = many_processes(256)
    record = dict(processes[0], token="f" * 32, lease_s=120.0, processes=processes, started="2026-12-05T10:00:00+00:00",
                  argv=["launch/train.py", "--config=configs/imagenet256.py", "--workdir=gs://b/" + "x" * 200] * 3)
    assert len(json.dumps(record)) > 8192  # the whole record would not fit
    metadata = workdir_module._GcsHold.metadata(record)
    assert sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items()) < 1024
    summary = json.loads(metadata["hold"])
    assert summary["process_count"] == 256 and summary["token"] == "f" * 32 and "processes" not in summary




@pytest.mark.gcs
def test_the_emulator_and_gcsfs_honour_generation_preconditions(bucket):
    """What the hold relies on: a create with ifGenerationMatch=0 fails when the object exists; a write
    with ifGenerationMatch=<an old generation> fails; a read of the content at an old generation fails."""
    store = workdir_module._GcsHold(f"{bucket}/run")
    first = store.create({"token": "a"})
    assert first is not None and store.create({"token": "b"}) is None
    assert store.read().record == {"token": "a"}
    renewed = store.renew("a")
    assert renewed.version != first.version and renewed.renewed >= first.renewed
    with pytest.raises(FileNotFoundError):  # a read of the content at a generation replaced since
        store._content(first.version)
    assert store.replace({"token": "b"}, first.version) is None  # its generation moved on
    assert store.replace({"token": "b"}, renewed.version).record == {"token": "b"}
    assert store.renew("a") is None and not store.release("a")
    assert store.release("b") and store.read() is None


@pytest.mark.gcs
def test_on_gcs_the_hold_is_taken_refused_expired_and_released(bucket, caplog):
    workdir = f"{bucket}/run"
    with alarm(120):
        with WorkdirHold(workdir) as hold:
            assert read_holder(workdir).record["token"] == hold.token
            with pytest.raises(HoldError, match=rf"{workdir} is held by another run .*process {os.getpid()}"):
                WorkdirHold(workdir, wait_s=0).__enter__()
        assert read_holder(workdir) is None
        store = workdir_module._GcsHold(workdir)
        me = {"host": "node-7.other", "boot_id": "", "pid": 4242}
        assert store.create(dict(me, token="theirs", lease_s=1.0, processes=[me])) is not None
        while read_holder(workdir).age <= 1.0:  # the storage's clock passes its 1 s lease
            time.sleep(0.2)
        with caplog.at_level(logging.WARNING), WorkdirHold(workdir, wait_s=0) as hold:
            assert read_holder(workdir).record["token"] == hold.token
        assert len(warnings_in(caplog, "broke the hold of host node-7.other, process 4242")) == 1
        assert read_holder(workdir) is None
        assert hold_summary(workdir) == "no hold"
        from lsync_jax import storage

        assert storage.find(bucket) == []  # no clock probe left behind


@pytest.mark.gcs
def test_on_gcs_the_whole_record_of_a_large_run_is_read_back(bucket):
    workdir = f"{bucket}/run"
    processes = many_processes(256)
    store = workdir_module._GcsHold(workdir)
    with alarm(120):
        assert store.create(dict(processes[0], token="theirs", lease_s=120.0, processes=processes)) is not None
        holder = read_holder(workdir)
        assert holder.record["processes"] == processes
        assert "process 100000 (with 255 more processes of its run)" in hold_summary(workdir)
        with pytest.raises(HoldError, match="with 255 more processes"):
            WorkdirHold(workdir, wait_s=0).__enter__()
        assert store.renew("theirs").record["processes"] == processes
        assert store.release("theirs")


def test_an_unwritable_workdir_is_named_and_left_as_found(tmp_path, monkeypatch):
    def refuse(self, record):
        raise PermissionError(13, "Permission denied", self.workdir)

    monkeypatch.setattr(workdir_module._LocalHold, "_finished_file", refuse)
    workdir = str(tmp_path / "new" / "run")
    with pytest.raises(OSError, match=r"new/run is not writable \(Permission denied\): its hold \(hold.json\) cannot "
                                      r"be taken"):
        WorkdirHold(workdir).__enter__()
    assert list(tmp_path.iterdir()) == []


def test_check_reports_the_holder_and_takes_no_hold(tmp_path):
    from lsync_jax.configs import tiny
    from lsync_jax.recipes import check_run

    workdir = str(tmp_path / "run")
    assert check_run(tiny.get_config(), workdir).endswith("; workdir hold: no hold")
    other_host_hold(workdir)
    before = snapshot(workdir)
    summary = check_run(tiny.get_config(), workdir)
    assert "; workdir hold: held by host node-7.other, process 4242, started 2026-01-01" in summary
    assert snapshot(workdir) == before  # the clock probe and the storage probes are gone again
