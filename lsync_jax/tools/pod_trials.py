"""Measurements behind pod-scale training, on one machine: what the storage, the preemption agreement,
elastic resume and hard kills cost or do. `launch/pod_trials.py` prints a table and writes JSON.

- `storage`: round trips to a GCS endpoint (the localhost emulator by default): a small object's
  write, read and delete, and a large object's write and read throughput.
- `preemption`: two JAX processes (gloo) call JAX's preemption sync point every step; one gets
  SIGTERM. Rows: the cost of one call, the cost of the flag exchange it replaces
  (`process_allgather` of one flag), and how many steps and seconds after the signal both stop.
- `elastic`: the tiny config trained 2 steps on 1 process, 2 on 2, 2 on 1, against 6 straight:
  the largest difference between their losses and final weights.
- `kills`: runs SIGKILLed at random moments (often mid-save), then resumed with the same command,
  on a local disk and in a bucket: what each resume found and did.
- `hold`: the workdir hold under chaos (issue 30): a run in a bucket, 2 processes, SIGKILLed 20 times at
  random moments on a random one of its processes (the others killed after a moment, as a lost
  allocation ends), each restart on 1 or 2 processes at random; every few kills the hold is made to look
  like a vanished VM's, so that the restart must wait for its lease to expire. Every restart must take
  the hold; the losses and weights must equal an uninterrupted run's (the elastic row's tolerance).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any, Callable, Sequence

import numpy as np

from lsync_jax import storage
from lsync_jax.builders import build_mesh
from lsync_jax.configs import tiny
from lsync_jax.tools.gcs_emulator import GcsEmulator
from lsync_jax.workdir import _GcsHold, load_params, read_holder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.py")
_ENV = dict(os.environ, JAX_PLATFORMS="cpu")
PARTS = ("storage", "preemption", "elastic", "kills", "hold")  # what `run` measures, as named above


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def storage_rows(base: str, repeats: int = 30, large_mb: int = 64) -> list[dict[str, Any]]:
    """Median latency of small-object operations and the throughput of a large one under `base`."""
    small, large = storage.join(base, "roundtrip.bin"), storage.join(base, "large.bin")
    payload = os.urandom(1024)
    storage.write_bytes_atomic(small, payload)
    rows = [
        {"row": "storage", "what": "write 1 KiB", "where": base, "median_ms": 1e3 * _timed(
            lambda: storage.write_bytes_atomic(small, payload), repeats)},
        {"row": "storage", "what": "read 1 KiB", "where": base, "median_ms": 1e3 * _timed(
            lambda: storage.read_bytes(small), repeats)},
        {"row": "storage", "what": "exists", "where": base, "median_ms": 1e3 * _timed(
            lambda: storage.exists(small), repeats)},
        {"row": "storage", "what": "write+read+delete 1 KiB (the write probe)", "where": base,
         "median_ms": 1e3 * _timed(lambda: storage.check_writable(storage.join(base, "probe")), repeats)},
    ]
    blob = os.urandom(large_mb << 20)
    write = _timed(lambda: storage.write_bytes_atomic(large, blob), 3)
    read = _timed(lambda: storage.read_bytes(large), 3)
    rows += [{"row": "storage", "what": f"write {large_mb} MiB", "where": base, "median_ms": 1e3 * write,
              "MB_per_s": large_mb * 1.048576 / write},
             {"row": "storage", "what": f"read {large_mb} MiB", "where": base, "median_ms": 1e3 * read,
              "MB_per_s": large_mb * 1.048576 / read}]
    storage.remove(small)
    storage.remove(large)
    return rows


_PREEMPTION_WORKER = textwrap.dedent("""
    import json, os, signal, sys, time
    import jax
    import numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    pid, port, step_s = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    signal_at, calls = int(sys.argv[4]), int(sys.argv[5])
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    from jax.experimental import multihost_utils
    start = time.perf_counter()
    for i in range(calls):
        multihost_utils.reached_preemption_sync_point(10**8 + i)  # steps no sync point is at
    sync_call = (time.perf_counter() - start) / calls
    start = time.perf_counter()
    for _ in range(20):
        multihost_utils.process_allgather(np.array([False]))
    allgather = (time.perf_counter() - start) / 20
    sent = None
    for step in range(1, 100000):
        time.sleep(step_s)  # a training step
        if multihost_utils.reached_preemption_sync_point(10**9 + step):
            print(json.dumps(dict(pid=pid, stopped=step, signalled=sent, after_s=time.perf_counter() - sent_t,
                                  sync_call_s=sync_call, allgather_s=allgather)), flush=True)
            break
        if step == signal_at and pid == 1:
            sent, sent_t = step, time.perf_counter()
            os.kill(os.getpid(), signal.SIGTERM)
        elif step == signal_at:
            sent, sent_t = step, time.perf_counter()
""")


def preemption_rows(step_times: Sequence[float] = (0.05, 0.3), calls: int = 100000) -> list[dict[str, Any]]:
    """Two processes; SIGTERM to one at step 20; both must stop at the same step."""
    rows = []
    for step_s in step_times:
        port = _free_port()
        procs = [subprocess.Popen([sys.executable, "-c", _PREEMPTION_WORKER, str(pid), str(port), str(step_s), "20",
                                   str(calls)], env=_ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True) for pid in (0, 1)]
        out = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]
        stopped = {o["stopped"] for o in out}
        rows.append({"row": "preemption", "step_s": step_s, "signal_at_step": 20,
                     "stopped_at_steps": sorted(stopped), "same_step": len(stopped) == 1,
                     "steps_after_signal": max(stopped) - 20, "seconds_after_signal": max(o["after_s"] for o in out),
                     "sync_point_call_us": 1e6 * max(o["sync_call_s"] for o in out),
                     "flag_allgather_us": 1e6 * max(o["allgather_s"] for o in out)})
    return rows


def trainer_commands(workdir: str, processes: int, *overrides: str) -> list[list[str]]:
    """launch/train.py on the tiny config, one command per process (several: jax.distributed on localhost)."""
    base = [sys.executable, os.path.join(ROOT, "launch", "train.py"), f"--config={TINY}", f"--workdir={workdir}",
            *overrides]
    if processes == 1:
        return [base]
    port = _free_port()
    return [base + ["--config.distributed.enabled=True", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                    f"--config.distributed.num_processes={processes}", f"--config.distributed.process_id={pid}",
                    "--config.distributed.cpu_collectives=gloo"] for pid in range(processes)]


def _train(workdir: str, processes: int, *overrides: str, env: dict | None = None, wait: bool = True) -> Any:
    env = dict(env or _ENV, JAX_DEFAULT_PRNG_IMPL="threefry2x32")
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for c in trainer_commands(workdir, processes, *overrides)]
    if not wait:
        return procs
    errors = [p.communicate(timeout=900)[1] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(errors[0][-2000:])
    return errors


def _losses(workdir: str) -> dict[int, float]:
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
    acc.Reload()
    return {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors("loss")}


def elastic_rows() -> list[dict[str, Any]]:
    import jax
    import orbax.checkpoint as ocp

    flags = ["--config.train.log_every=1", "--config.train.checkpoint_every=2"]
    with tempfile.TemporaryDirectory() as tmp:
        straight, elastic = os.path.join(tmp, "straight"), os.path.join(tmp, "elastic")
        _train(straight, 1, "--config.train.num_steps=6", *flags)
        for processes, steps in ((1, 2), (2, 4), (1, 6)):
            _train(elastic, processes, f"--config.train.num_steps={steps}", *flags)
        a, b = _losses(straight), _losses(elastic)
        rel = max(abs(a[s] - b[s]) / abs(a[s]) for s in a)
        read = lambda w: ocp.PyTreeCheckpointer().restore(os.path.join(w, "checkpoints", "6", "state"))["params"]
        pa, pb = read(straight), read(elastic)
        diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(pa),
                                                                                          jax.tree.leaves(pb)))
    return [{"row": "elastic", "what": "1 -> 2 -> 1 processes (2 steps each) vs 6 straight", "steps": sorted(a),
             "max_rel_loss_diff": rel, "max_abs_param_diff": diff}]


def kill_rows(where: str, trials: int, seed: int = 0, env: dict | None = None) -> list[dict[str, Any]]:
    """SIGKILL a run at a random moment after its first checkpoint, then resume with the same command."""
    rng = random.Random(seed)
    rows = []
    for trial in range(trials):
        workdir = storage.join(where, f"kill{trial}")
        ckpts = storage.join(workdir, "checkpoints")
        procs = _train(workdir, 1, "--config.train.num_steps=100000", "--config.train.checkpoint_every=2",
                       env=env, wait=False)
        deadline = time.time() + 300
        while time.time() < deadline and not (storage.isdir(ckpts)
                                               and any(n.isdigit() for n in storage.listdir(ckpts))):
            time.sleep(0.2)
        delay = rng.uniform(0.0, 4.0)
        time.sleep(delay)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        before = storage.listdir(ckpts)
        newest = max(int(n) for n in before if n.isdigit())
        errors = _train(workdir, 1, f"--config.train.num_steps={newest + 2}", "--config.train.checkpoint_every=2",
                        env=env)
        after = storage.listdir(ckpts)
        err = errors[0]
        resumed = next((line.split("step ")[-1] for line in err.splitlines() if "resumed from" in line), "?")
        rows.append({"row": "kill", "where": where.split("://")[0] if "://" in where else "local disk",
                     "trial": trial, "killed_after_s": round(delay, 2), "dirs_after_kill": before,
                     "resumed_from": resumed, "set_aside": [n for n in after if "damaged" in n],
                     "finished_at": newest + 2, "ok": str(newest + 2) in after})
    return rows


# The elastic test's loss tolerance (tests/train/test_multihost.py): the reduction order changes with the
# process count.
ELASTIC_RTOL = 1e-5


def start_trainers(workdir: str, processes: int, log: str, *overrides: str, env: dict) -> list[subprocess.Popen]:
    """`trainer_commands` started, each process's stderr into `log`.<i> (a file: no pipe fills up)."""
    procs = []
    for i, cmd in enumerate(trainer_commands(workdir, processes, *overrides)):
        with open(f"{log}.{i}", "w") as err:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=dict(env, JAX_DEFAULT_PRNG_IMPL="threefry2x32"),
                                          stdout=subprocess.DEVNULL, stderr=err))
    return procs


def _events_losses(workdir: str, extra: Sequence[str] = ()) -> dict[int, float]:
    """{step: loss} of every event file of a run (local or remote) and of the folders `extra`."""
    with tempfile.TemporaryDirectory() as local:
        for name in storage.find(workdir):
            base = name.rsplit("/", 1)[-1]
            if base.startswith("events.out.tfevents") and name.count("/") == workdir.count("/") + 1:
                with open(os.path.join(local, base), "wb") as f:
                    f.write(storage.read_bytes(name))
        for folder in extra:
            for base in os.listdir(folder):
                if base.startswith("events.out.tfevents") and not os.path.exists(os.path.join(local, base)):
                    shutil.copyfile(os.path.join(folder, base), os.path.join(local, base))
        return _losses(local)


def _kill_all(procs: Sequence[subprocess.Popen]) -> None:
    """SIGKILL every process of `procs` still running, and reap them all."""
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


def hold_chaos_rows(where: str, local: str, kills: int = 20, seed: int = 0, lease_s: float = 4.0,
                    env: dict | None = None) -> list[dict[str, Any]]:
    """`kills` SIGKILLs of a run in `where` (a bucket) at random moments (0-25 s) after it took its hold, on
    a random one of its processes (the rest killed 0-3 s later); restarts on 1 or 2 processes at random;
    every fourth kill leaves a hold that names another host (a vanished VM), so that the restart waits for
    its lease (`lease_s`, short) to expire by the storage's clock. Then the run is finished 10 steps past its
    newest checkpoint and compared with
    uninterrupted ones in `local` (1 process: the losses within ELASTIC_RTOL; the weights' difference beside
    that of an uninterrupted 2-process run). A row per restart, and a summary row."""
    env = env or _ENV
    rng = random.Random(seed)
    workdir = storage.join(where, "hold_chaos")
    flags = ["--config.train.log_every=1", "--config.train.checkpoint_every=2", "--config.train.num_grid_samples=0",
             f"--config.train.hold_lease_s={lease_s}", f"--config.train.hold_wait_s={20 * lease_s}"]
    rows: list[dict[str, Any]] = []
    logs = tempfile.mkdtemp(prefix="lsync_jax_hold_chaos_")
    processes, vanished, done, target = 2, False, 0, 100_000  # the lives never finish on their own
    start_all = time.perf_counter()
    for life in range(3 * kills + 1):
        last = done == kills
        if last:  # the end: a few steps past the newest checkpoint, uninterrupted
            ckpts = storage.join(workdir, "checkpoints")
            target = max([int(n) for n in storage.listdir(ckpts) if n.isdigit()] or [0]) + 10
        log = os.path.join(logs, f"life{life}")
        started = time.perf_counter()
        procs = start_trainers(workdir, processes, log, f"--config.train.num_steps={target}", *flags, env=env)
        try:
            held_after = None
            deadline = time.time() + 600
            while time.time() < deadline and all(p.poll() is None for p in procs):
                holder = read_holder(workdir)
                if holder is not None and (holder.record or {}).get("pid") == procs[0].pid:
                    held_after = time.perf_counter() - started
                    break
                time.sleep(0.2)
            killed, delay = None, None
            if not last and held_after is not None:
                delay = rng.uniform(0.0, 25.0)  # start-up, compile, steps, saves
                end = time.perf_counter() + delay
                while time.perf_counter() < end and all(p.poll() is None for p in procs):
                    time.sleep(0.1)
                victim = rng.randrange(len(procs))
                if procs[victim].poll() is None:
                    procs[victim].send_signal(signal.SIGKILL)
                    killed, done = victim, done + 1
                    time.sleep(rng.uniform(0.0, 3.0))
                    for p in procs:  # the allocation ends: the others die too
                        if p.poll() is None:
                            p.send_signal(signal.SIGKILL)
            codes = [p.wait(timeout=900) for p in procs]
        finally:  # a trial that fails (a timeout, an interrupt) leaves no trainer running
            _kill_all(procs)
        text = open(f"{log}.0").read()
        got = ("after the lease expired" if "it expired (not renewed" in text else
               "its processes gone (same host)" if "on this host are gone" in text else
               "free" if held_after is not None else "refused or failed")
        resumed = next((line.split("step ")[-1] for line in text.splitlines() if "resumed from" in line), "-")
        rows.append({"row": "hold chaos", "life": life, "processes": processes, "took_hold_after_s":
                     None if held_after is None else round(held_after, 1), "hold": got, "expected_expiry": vanished,
                     "resumed_from": resumed, "killed_process": killed,
                     "killed_after_s": None if delay is None else round(delay, 1), "exit_codes": codes})
        if held_after is None:
            rows[-1]["error"] = (text.strip().splitlines() or ["(no output)"])[-1][:400]
            break
        if last:
            break
        vanished = False
        if killed is not None and done % 4 == 0:  # the hold left behind now names another host (a VM that
            store = _GcsHold(workdir)             # vanished): only its expiry frees it
            seen = store.read()
            if seen is not None and seen.record:
                record = dict(seen.record, host="vm-vanished", boot_id="",
                              processes=[dict(p, host="vm-vanished") for p in seen.record.get("processes", [])])
                vanished = store.replace(record, seen.version) is not None
        processes = rng.choice((1, 2))
    chaos_s = time.perf_counter() - start_all
    straight, straight2 = os.path.join(local, "hold_chaos_straight"), os.path.join(local, "hold_chaos_straight2")
    # Uninterrupted on 1 process, and on 2: how far the process count alone moves the weights.
    for folder, count in ((straight, 1), (straight2, 2)):
        procs = start_trainers(folder, count, os.path.join(logs, os.path.basename(folder)),
                       f"--config.train.num_steps={target}", *flags[:3], env=_ENV)
        try:
            for p in procs:
                p.wait(timeout=1800)
        finally:
            _kill_all(procs)
    # A killed process's last minute of events never reached the bucket (hooks.EventSync uploads every 60 s);
    # its local folder is still there: counted apart, read for the comparison, then removed.
    left = glob.glob(os.path.join(tempfile.gettempdir(), "lsync_jax_events_"
                                  f"{hashlib.sha1(workdir.encode()).hexdigest()[:12]}_*"))
    a, in_bucket, b = _losses(straight), _events_losses(workdir), _events_losses(workdir, left)
    c = _losses(straight2)
    for folder in left:
        shutil.rmtree(folder, ignore_errors=True)
    b = {step: loss for step, loss in b.items() if step <= target}  # a killed life may have logged a few more
    steps_ok = sorted(a) == sorted(b) == list(range(1, target + 1))
    rel = max(abs(a[s] - b[s]) / abs(a[s]) for s in a) if steps_ok else float("nan")
    import jax

    config = tiny.get_config()  # the checkpoints of 1 and 2 processes, read onto this process's devices
    read = lambda w: load_params(config, w, build_mesh(config), step=target, which="params")[1]
    pa, pb, p2 = read(straight), read(workdir), read(straight2)
    gap = lambda u, v: max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(u),
                                                                                                   jax.tree.leaves(v)))
    same = steps_ok and all(np.allclose(b[s], a[s], rtol=ELASTIC_RTOL) for s in a)
    lives = [r for r in rows if r["row"] == "hold chaos"]
    rows.append({"row": "hold chaos summary", "kills": sum(r["killed_process"] is not None for r in lives),
                 "restarts": len(lives) - 1, "every_restart_took_the_hold": all(r["took_hold_after_s"] is not None
                                                                              for r in lives),
                 "by_expiry": sum(r["hold"] == "after the lease expired" for r in lives),
                 "by_dead_processes": sum(r["hold"] == "its processes gone (same host)" for r in lives),
                 "expiry_when_expected": all(r["hold"] == "after the lease expired" for r in lives
                                             if r["expected_expiry"]),
                 "steps": target, "all_steps_logged": steps_ok,
                 "steps_missing_from_bucket_events": len(set(range(1, target + 1)) - set(in_bucket)),
                 "max_rel_loss_diff": rel, "losses_within_elastic_rtol": bool(same),
                 "max_rel_loss_diff_2_vs_1_process_uninterrupted": max(abs(a[s] - c[s]) / abs(a[s]) for s in a),
                 "max_abs_param_diff": gap(pa, pb), "max_abs_param_diff_2_vs_1_process_uninterrupted": gap(pa, p2),
                 "chaos_s": round(chaos_s, 1), "logs": logs})
    return rows


def run(parts: Sequence[str], trials: int = 5, print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    with GcsEmulator(buckets=()) as gcs, tempfile.TemporaryDirectory() as local:
        bucket = gcs.make_bucket("trials")
        if "storage" in parts:
            rows += storage_rows(local) + storage_rows(bucket)
        if "preemption" in parts:
            rows += preemption_rows()
        if "elastic" in parts:
            rows += elastic_rows()
        if "kills" in parts:
            rows += kill_rows(local, trials)
            rows += kill_rows(bucket, trials, seed=1, env=dict(gcs.env(), JAX_PLATFORMS="cpu"))
        if "hold" in parts:
            rows += hold_chaos_rows(bucket, local, env=dict(gcs.env(), JAX_PLATFORMS="cpu"))
    for row in rows:
        print_fn(" | ".join(f"{k}={_fmt(v)}" for k, v in row.items()))
    import jax

    return {"device": f"{jax.devices()[0].device_kind} ({os.cpu_count()} cores)", "rows": rows,
            "date": time.strftime("%Y-%m-%d")}


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
