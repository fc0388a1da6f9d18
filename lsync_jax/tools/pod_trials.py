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
"""

from __future__ import annotations

import json
import os
import random
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
from lsync_jax.tools.gcs_emulator import GcsEmulator

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.py")
_ENV = dict(os.environ, JAX_PLATFORMS="cpu")


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


def _train(workdir: str, processes: int, *overrides: str, env: dict | None = None, wait: bool = True) -> Any:
    base = [sys.executable, os.path.join(ROOT, "launch", "train.py"), f"--config={TINY}", f"--workdir={workdir}",
            *overrides]
    env = dict(env or _ENV, JAX_DEFAULT_PRNG_IMPL="threefry2x32")
    port = _free_port()
    cmds = [base] if processes == 1 else [
        base + ["--config.distributed.enabled=True", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                f"--config.distributed.num_processes={processes}", f"--config.distributed.process_id={pid}",
                "--config.distributed.cpu_collectives=gloo"] for pid in range(processes)]
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for c in cmds]
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
    for row in rows:
        print_fn(" | ".join(f"{k}={_fmt(v)}" for k, v in row.items()))
    import jax

    return {"device": f"{jax.devices()[0].device_kind} ({os.cpu_count()} cores)", "rows": rows,
            "date": time.strftime("%Y-%m-%d")}


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
