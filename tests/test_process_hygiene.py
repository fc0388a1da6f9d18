"""Importing and calling lsync_jax changes nothing process-wide that it does not restore (issue 30,
part 3): a notebook, a sweep driver or a service that imports it keeps its environment, its
unraisable hook, its warnings filters, other libraries' loggers, fsspec's config and JAX's config.

What the third-party libraries change on their own import is theirs: the baseline is taken after
importing them. Process settings belong to the launch scripts (`lsync_jax.cli.run`).

The rule for JAX's config: the library updates it only where the run's config asks for exactly that
setting (`config.distributed.cpu_devices` > 0 splits the CPU backend, `config.distributed.enabled`
with `cpu_collectives` picks the collectives, both in `host.initialize_distributed`); the defaults
(-1, not enabled) change nothing, which the driver below checks.
"""

import copy
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh interpreter: import-time changes are invisible in a pytest process that imported
# lsync_jax long ago. SIGALRM's default action ends the driver if anything hangs.
_DRIVER = r"""
import builtins, copy, errno, logging, os, signal, sys, threading, warnings
signal.alarm(240)

# The third-party libraries lsync_jax uses, first: the baseline includes what their imports change.
import absl.logging, etils.epath, fsspec, jax, jax.numpy as jnp, numpy as np, orbax.checkpoint

def snapshot():
    return {
        "os.environ": dict(os.environ),
        "sys.unraisablehook": repr(sys.unraisablehook),
        "sys.excepthook": repr(sys.excepthook),
        "threading.excepthook": repr(threading.excepthook),
        "signal handlers": {s.name: repr(signal.getsignal(s)) for s in (signal.SIGTERM, signal.SIGINT)},
        "warnings.filters": [repr(f) for f in warnings.filters],
        "fsspec.config.conf": repr(copy.deepcopy(fsspec.config.conf)),
        "jax.config": {k: repr(v) for k, v in jax.config.values.items()},
        "loggers": {name: [repr(f) for f in logging.getLogger(name).filters] for name in ("", "absl", "asyncio")},
        "absl handler": [repr(f) for f in absl.logging.get_absl_handler().filters],
    }

before = snapshot()
import lsync_jax, lsync_jax.storage, lsync_jax.host as host, lsync_jax.workdir
import lsync_jax.train.checkpoint as ckpt
after_import = snapshot()

workdir = sys.argv[1]
state = {"w": jnp.arange(4.0), "b": jnp.ones((2, 3))}
abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)

# A save and a restore.
good = ckpt.Checkpointer(os.path.join(workdir, "good"))
good.save(1, state, {"note": "hygiene"})
good.wait()
restored = good.restore(1, abstract)
assert all(np.array_equal(restored[k], state[k]) for k in state), restored
good.close()
reader = ckpt.Checkpointer(os.path.join(workdir, "good"), read_only=True)
assert reader.latest_step() == 1 and reader.read_meta(1)["note"] == "hygiene"

# A failed save: the disk is full under its directory, at the I/O layer (as tests/faults does).
bad = os.path.abspath(os.path.join(workdir, "bad"))
broken = ckpt.Checkpointer(bad)
real_open, real_mkdir = builtins.open, os.mkdir
def hit(p):
    try:
        return os.path.abspath(os.fspath(p)).startswith(bad + os.sep)
    except TypeError:
        return False
def full_open(file, mode="r", *args, **kwargs):
    if any(m in mode for m in "wax+") and hit(file):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(file))
    return real_open(file, mode, *args, **kwargs)
def full_mkdir(p, *args, **kwargs):
    if hit(p):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(p))
    return real_mkdir(p, *args, **kwargs)
builtins.open, os.mkdir = full_open, full_mkdir
try:
    try:
        broken.save(1, state, {"note": "hygiene"})
        broken.wait()
    except ckpt.CheckpointSaveError:
        pass
    else:
        raise AssertionError("the save into a full disk did not fail")
    broken.close()
finally:
    builtins.open, os.mkdir = real_open, real_mkdir

# Distributed start-up with the config's defaults (cpu_devices -1, not enabled): nothing to change.
host.initialize_distributed({"enabled": False, "cpu_devices": -1, "cpu_collectives": "", "num_processes": -1,
                             "process_id": -1, "coordinator_address": ""})
after_calls = snapshot()

changed = []
for when, now in (("import", after_import), ("calls", after_calls)):
    for key in before:
        if now[key] != before[key]:
            if isinstance(before[key], dict):
                diff = {k: (before[key].get(k), now[key].get(k)) for k in set(before[key]) | set(now[key])
                        if before[key].get(k) != now[key].get(k)}
            else:
                diff = (before[key], now[key])
            changed.append(f"after the {when}: {key} changed: {diff}")
print("\n".join(changed) or "unchanged")
sys.stdout.flush()
os._exit(1 if changed else 0)  # at once: the failed save's leftovers are Orbax's, collected at exit
"""


def test_importing_saving_a_failed_save_and_restoring_leave_the_process_as_found(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("EPATH_USE_TF", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "TENSORSTORE_GCS_HTTP_URL",
                        "CLOUD_STORAGE_EMULATOR_ENDPOINT", "STORAGE_EMULATOR_HOST")}
    out = subprocess.run([sys.executable, "-c", _DRIVER, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("unchanged"), (out.stdout + out.stderr)[-4000:]


@pytest.mark.gcs
def test_gs_paths_leave_the_environment_and_fsspecs_config_as_found(bucket, tmp_path):
    """gs:// calls pass gcsfs's options per file system; fsspec's global config and the environment
    (here: as the emulator set it) stay as they were."""
    import fsspec

    from lsync_jax import storage

    environ, conf = dict(os.environ), copy.deepcopy(fsspec.config.conf)
    run = f"{bucket}/hygiene"
    storage.check_writable(run)
    storage.write_json_atomic(storage.join(run, "a.json"), {"x": 1})
    assert storage.read_json(storage.join(run, "a.json")) == {"x": 1}
    assert storage.listdir(run) == ["a.json"]
    storage.move(storage.join(run, "a.json"), storage.join(run, "b.json"))
    assert storage.listdir(run) == ["b.json"]  # no cached listing, through epath's file system too
    assert storage.find(run) == [storage.join(run, "b.json")]
    assert dict(os.environ) == environ
    assert fsspec.config.conf == conf


def test_the_launch_scripts_storage_settings_keep_the_users_own(monkeypatch):
    """`storage.configure_process` (what `cli.run` sets for a launch script's process): its defaults,
    the emulator for tensorstore and array-record too, and a user's own setting wins."""
    from lsync_jax import storage

    monkeypatch.setenv("EPATH_USE_TF", "1")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:9")
    for name in ("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "TENSORSTORE_GCS_HTTP_URL", "CLOUD_STORAGE_EMULATOR_ENDPOINT"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)  # undone after the test: absent again, or as it was
    storage.configure_process()
    assert os.environ["EPATH_USE_TF"] == "1" and os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "false"
    assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == os.environ["CLOUD_STORAGE_EMULATOR_ENDPOINT"] == "http://127.0.0.1:9"


def test_a_program_of_its_own_is_told_what_its_emulator_lacks(monkeypatch):
    """Without the launch scripts' settings an emulator reaches gcsfs only: one warning names the rest."""
    from lsync_jax import storage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:9")
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", "")
    monkeypatch.delenv("EPATH_USE_TF", raising=False)
    assert storage.emulator_settings_unset() == ["CLOUD_STORAGE_EMULATOR_ENDPOINT", "EPATH_USE_TF=0"]
    storage.configure_process()
    assert storage.emulator_settings_unset() == ["CLOUD_STORAGE_EMULATOR_ENDPOINT"]  # set empty: the user's own
