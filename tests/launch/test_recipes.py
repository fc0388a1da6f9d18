"""The pod launch recipes without a pod: launch/tpu_pod.sh and launch/slurm.sbatch parse, print the
commands they would run (DRY_RUN=1), and decide what to do with the training's exit code (rerun or
requeue on 75, nothing on 0, stop on anything else) with stub `gcloud`, `srun` and `scontrol` on PATH.
JAX's SLURM auto-detection is checked under a faked SLURM environment, and (slow) two processes start
jax.distributed from it with no address, count or rank given."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TPU_POD = ROOT / "launch" / "tpu_pod.sh"
SLURM = ROOT / "launch" / "slurm.sbatch"
TRAIN = ["launch/train.py", "--config=configs/imagenet256.py"]
# Variables of the cluster environments JAX detects; none may leak into these tests from the host.
FOREIGN = ("SLURM_", "OMPI_", "KUBERNETES_", "TPU_", "JAX_COORDINATOR", "JAX_LOCAL_DEVICE_IDS", "JAX_NUM_PROCESSES",
           "JAX_PROCESS_ID")


def clean_env(tmp_path: Path, stubs: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN)}
    if stubs is not None:
        env["PATH"] = f"{stubs}{os.pathsep}{env['PATH']}"
    env.update(TMPDIR=str(tmp_path), **extra)
    return env


def run_script(script: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def printed_commands(stdout: str) -> list[list[str]]:
    """The commands a DRY_RUN printed ('+ cmd args'), split as a shell would."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def write_stub(directory: Path, name: str, body: str) -> None:
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
    path.chmod(0o755)


def flag(argv: list[str], name: str) -> str:
    """The value of --name=value in argv."""
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def remote_words(command: str) -> list[str]:
    """A remote command line split into words, with ';' and '&&' as words of their own."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def train_invocation(words: list[str]) -> list[str]:
    """The words of the launch/train.py invocation in a command line (up to ';' or '&&')."""
    start = words.index("launch/train.py")
    end = next((i for i in range(start, len(words)) if words[i] in (";", "&&")), len(words))
    return words[start:end]


@pytest.mark.parametrize("script", [TPU_POD, SLURM], ids=lambda p: p.name)
def test_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "set -euo pipefail" in script.read_text()
    assert os.access(script, os.X_OK)


# -- launch/tpu_pod.sh ----------------------------------------------------------------------------
def test_tpu_pod_help_and_no_step(tmp_path):
    helped = run_script(TPU_POD, "--help", env=clean_env(tmp_path))
    assert helped.returncode == 0 and "Usage: launch/tpu_pod.sh" in helped.stdout
    assert "DRY_RUN=1" in helped.stdout and "WORKDIR" in helped.stdout
    bare = run_script(TPU_POD, env=clean_env(tmp_path))
    assert bare.returncode == 2 and "Usage:" in bare.stderr
    unknown = run_script(TPU_POD, "launch", env=clean_env(tmp_path))
    assert unknown.returncode != 0 and "unknown step: launch" in unknown.stderr


def test_tpu_pod_dry_run_creates_installs_and_trains_on_every_worker(tmp_path):
    env = clean_env(tmp_path, DRY_RUN="1", WORKDIR="gs://bucket/run", ACCELERATOR_TYPE="v5litepod-16",
                    ZONE="us-west4-a", TPU_NAME="pod", SPOT="1", PROJECT="proj", LOG_DIR=str(tmp_path / "logs"))
    result = run_script(TPU_POD, "run", "--", "--config.data.dir=gs://bucket/latents",
                        "--config.objective.layersync.pairs=((2, 4, 0.2),)", env=env)
    assert result.returncode == 0, result.stderr
    commands = printed_commands(result.stdout)
    gcloud = [c for c in commands if c[0] == "gcloud"]
    assert all(c[1:3] == ["compute", "tpus"] and "--project=proj" in c for c in gcloud)

    create = next(c for c in gcloud if c[3:5] == ["tpu-vm", "create"])
    assert create[5] == "pod" and flag(create, "zone") == "us-west4-a"
    assert flag(create, "accelerator-type") == "v5litepod-16"
    assert flag(create, "version") == "v2-alpha-tpuv5-lite" and "--spot" in create

    # The checkout's git HEAD goes to every worker and is pip-installed with JAX for TPUs.
    assert any(c[0] == "git" and "archive" in c and c[-1] == "HEAD" for c in commands)
    scp = next(c for c in gcloud if c[3:5] == ["tpu-vm", "scp"])
    assert "--worker=all" in scp
    ssh = [c for c in gcloud if c[3:5] == ["tpu-vm", "ssh"]]
    assert ssh and all(c[5] == "pod" and "--worker=all" in c for c in ssh)
    remote = [flag(c, "command") for c in ssh]
    assert "pip install" in remote[0] and "jax[tpu]" in remote_words(remote[0])

    # Then the --check run and the training run: the same command on every worker.
    check, train = (train_invocation(remote_words(r)) for r in remote[1:])
    expected = [*TRAIN, "--workdir=gs://bucket/run", "--config.distributed.enabled=True",
                "--config.data.dir=gs://bucket/latents", "--config.objective.layersync.pairs=((2, 4, 0.2),)"]
    assert train == expected
    assert check == [*expected, "--check"]
    assert remote_words(remote[2])[:3] == ["cd", "lsync-jax", "&&"]
    assert not (tmp_path / "logs").exists()  # a dry run runs nothing


def test_tpu_pod_dry_run_queued_resource_and_runtime_versions(tmp_path):
    env = clean_env(tmp_path, DRY_RUN="1", QUEUED="1", TPU_NAME="pod", ACCELERATOR_TYPE="v4-32")
    result = run_script(TPU_POD, "create", "delete", env=env)
    assert result.returncode == 0, result.stderr
    create, describe, delete = printed_commands(result.stdout)
    assert create[3:6] == ["queued-resources", "create", "pod-qr"]
    assert flag(create, "node-id") == "pod" and flag(create, "accelerator-type") == "v4-32"
    assert flag(create, "runtime-version") == "tpu-ubuntu2204-base" and "--spot" not in create
    assert describe[3:5] == ["queued-resources", "describe"]
    assert delete[3:6] == ["queued-resources", "delete", "pod-qr"] and "--force" in delete

    for accelerator, version in [("v5p-32", "v2-alpha-tpuv5"), ("v6e-16", "v2-alpha-tpuv6e")]:
        out = run_script(TPU_POD, "create", env=clean_env(tmp_path, DRY_RUN="1", ACCELERATOR_TYPE=accelerator))
        assert flag(printed_commands(out.stdout)[0], "version") == version


def test_tpu_pod_refuses_a_workdir_the_workers_do_not_share(tmp_path):
    missing = run_script(TPU_POD, "train", env=clean_env(tmp_path, DRY_RUN="1"))
    assert missing.returncode == 1 and "set WORKDIR" in missing.stderr
    local = run_script(TPU_POD, "train", env=clean_env(tmp_path, DRY_RUN="1", WORKDIR="/tmp/run"))
    assert local.returncode == 1 and "not a gs:// path" in local.stderr and "+ gcloud" not in local.stdout


# A stub gcloud: logs its arguments; `tpu-vm ssh` of a training command prints the next line of
# $OUTCOMES as worker exit codes ('lost': prints none and fails as a broken connection does);
# `tpu-vm describe` prints the next line of $STATES.
GCLOUD_STUB = """\
echo "$*" >>"$GCLOUD_LOG"
pop() { local first; first=$(head -n 1 "$1"); sed -i 1d "$1"; echo "$first"; }
case "$*" in
    *"tpu-vm describe"*) pop "$STATES" ;;
    *"tpu-vm ssh"*"--check"*) echo LSYNC_JAX_EXIT_CODE=0; echo LSYNC_JAX_EXIT_CODE=0 ;;
    *"tpu-vm ssh"*"launch/train.py"*)
        outcome=$(pop "$OUTCOMES")
        [[ $outcome != lost ]] || exit 255
        for code in $outcome; do echo "step 1 ..."; echo "LSYNC_JAX_EXIT_CODE=$code"; done
        for code in $outcome; do [[ $code == 0 ]] || exit "$code"; done ;;
esac
exit 0
"""


def tpu_train(tmp_path, outcomes: list[str], states: list[str] = (), **extra: str):
    """launch/tpu_pod.sh train with the stub gcloud; returns (result, the gcloud calls)."""
    stubs = tmp_path / "bin"
    write_stub(stubs, "gcloud", GCLOUD_STUB)
    (tmp_path / "outcomes").write_text("".join(o + "\n" for o in outcomes))
    (tmp_path / "states").write_text("".join(s + "\n" for s in states))
    log = tmp_path / "gcloud.log"
    env = clean_env(tmp_path, stubs, WORKDIR="gs://bucket/run", TPU_NAME="pod", LOG_DIR=str(tmp_path / "logs"),
                    GCLOUD_LOG=str(log), OUTCOMES=str(tmp_path / "outcomes"), STATES=str(tmp_path / "states"),
                    **extra)
    result = run_script(TPU_POD, "train", env=env)
    calls = log.read_text().splitlines() if log.exists() else []
    return result, calls


def kinds(calls: list[str]) -> list[str]:
    def kind(call):
        if "tpu-vm ssh" in call:
            return "check" if "--check" in call else "train" if "launch/train.py" in call else "install"
        return " ".join(call.split()[2:4])  # e.g. 'tpu-vm describe'
    return [kind(c) for c in calls]


def test_tpu_pod_reruns_the_same_command_while_preempted(tmp_path):
    result, calls = tpu_train(tmp_path, ["75 75", "0 75", "0 0"], ["READY", "READY"])
    assert result.returncode == 0, result.stderr
    assert kinds(calls) == ["check", "train", "tpu-vm describe", "train", "tpu-vm describe", "train"]
    assert len({c for c in calls if "launch/train.py" in c and "--check" not in c}) == 1  # the same command
    assert "running the same command again" in result.stderr
    assert (tmp_path / "logs" / "train-3.log").read_text().count("LSYNC_JAX_EXIT_CODE=0") == 2


def test_tpu_pod_stops_on_a_failure(tmp_path):
    result, calls = tpu_train(tmp_path, ["1 0"], CHECK="0")
    assert result.returncode == 1 and "training failed on some worker (exit 1" in result.stderr
    assert kinds(calls) == ["train"]


def test_tpu_pod_recreates_a_preempted_slice(tmp_path):
    result, calls = tpu_train(tmp_path, ["lost", "0 0"], ["PREEMPTED"], CHECK="0",
                              LSYNC_REPO="https://example.com/lsync-jax.git")
    assert result.returncode == 0, result.stderr
    assert kinds(calls) == ["train", "tpu-vm describe", "tpu-vm delete", "tpu-vm create", "install", "train"]
    assert "git clone" in calls[4]


def test_tpu_pod_does_not_start_twice_when_contact_is_lost(tmp_path):
    result, calls = tpu_train(tmp_path, ["lost"], ["READY"], CHECK="0")
    assert result.returncode == 1 and "training may still be running" in result.stderr
    assert kinds(calls) == ["train", "tpu-vm describe"]


def test_tpu_pod_without_recreate_exits_75(tmp_path):
    result, calls = tpu_train(tmp_path, ["75 75"], ["PREEMPTED"], CHECK="0", RECREATE="0")
    assert result.returncode == 75 and "rerun to resume" in result.stderr
    assert kinds(calls) == ["train", "tpu-vm describe"]


# -- launch/slurm.sbatch --------------------------------------------------------------------------
def slurm_env(tmp_path, stubs=None, ntasks=16, nodes=2, **extra):
    """The batch script's environment as sbatch sets it (no SLURM_STEP_* yet: srun sets those)."""
    batch = dict(SLURM_JOB_ID="4242", SLURM_NTASKS=str(ntasks), SLURM_JOB_NUM_NODES=str(nodes),
                 SLURM_NNODES=str(nodes), SLURM_SUBMIT_DIR=str(ROOT), SLURM_RESTART_COUNT="0")
    return clean_env(tmp_path, stubs, **{**batch, **extra})


def test_slurm_headers():
    headers = [line.split()[1] for line in SLURM.read_text().splitlines() if line.startswith("#SBATCH")]
    names = {h.split("=")[0] for h in headers}
    assert {"--nodes", "--ntasks-per-node", "--gpus-per-node", "--time", "--requeue", "--signal"} <= names
    assert next(h for h in headers if h.startswith("--signal=")).endswith("TERM@120")
    # sbatch reads #SBATCH lines only before the first command
    lines = SLURM.read_text().splitlines()
    last_header = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    assert all(line.startswith("#") for line in lines[1:last_header])


def test_slurm_dry_run_prints_srun(tmp_path):
    result = run_script(SLURM, env=slurm_env(tmp_path, DRY_RUN="1"))
    assert result.returncode == 0, result.stderr
    check, train = printed_commands(result.stdout)
    assert train == ["srun", "python", *TRAIN, "--workdir=runs/imagenet256", "--config.distributed.enabled=True"]
    assert check == [*train, "--check"]
    assert "scontrol requeue 4242" in result.stdout
    assert "JAX_LOCAL_DEVICE_IDS" not in result.stdout  # one process per GPU: JAX picks SLURM_LOCALID's GPU

    # Config and workdir from the environment or the arguments; the rest of the arguments are train flags.
    from_env = run_script(SLURM, env=slurm_env(tmp_path, DRY_RUN="1", CHECK="0", CONFIG="configs/tiny.py",
                                               WORKDIR="gs://bucket/run", PYTHON="python3"))
    assert printed_commands(from_env.stdout) == [["srun", "python3", "launch/train.py", "--config=configs/tiny.py",
                                                  "--workdir=gs://bucket/run", "--config.distributed.enabled=True"]]
    from_args = run_script(SLURM, "configs/tiny.py", "/shared/run", "--config.train.num_steps=10",
                           env=slurm_env(tmp_path, DRY_RUN="1", CHECK="0", SRUN_FLAGS="--label --kill-on-bad-exit=1"))
    assert printed_commands(from_args.stdout) == [[
        "srun", "--label", "--kill-on-bad-exit=1", "python", "launch/train.py", "--config=configs/tiny.py",
        "--workdir=/shared/run", "--config.distributed.enabled=True", "--config.train.num_steps=10"]]


def test_slurm_one_process_per_node_uses_every_gpu(tmp_path):
    result = run_script(SLURM, env=slurm_env(tmp_path, ntasks=2, nodes=2, DRY_RUN="1", SLURM_GPUS_ON_NODE="4"))
    assert result.returncode == 0, result.stderr
    assert "+ export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in result.stdout
    kept = run_script(SLURM, env=slurm_env(tmp_path, ntasks=2, nodes=2, DRY_RUN="1", SLURM_GPUS_ON_NODE="4",
                                           JAX_LOCAL_DEVICE_IDS="0,1"))
    assert "JAX_LOCAL_DEVICE_IDS" not in kept.stdout  # the user's choice stands


SRUN_STUB = """\
echo "$* JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-}" >>"$SRUN_LOG"
if [[ " $* " == *" --check "* ]]; then exit "${CHECK_EXIT:-0}"; fi
if [[ -n ${WAIT_FOR_TERM:-} ]]; then
    trap 'echo TERM >>"$SRUN_LOG"; exit 75' TERM
    touch "$WAIT_FOR_TERM"
    for _ in $(seq 100); do sleep 0.1; done
    exit 0
fi
exit "${TRAIN_EXIT:-0}"
"""
SCONTROL_STUB = 'echo "$*" >>"$SCONTROL_LOG"\n'


def slurm_with_stubs(tmp_path, **extra):
    stubs = tmp_path / "bin"
    write_stub(stubs, "srun", SRUN_STUB)
    write_stub(stubs, "scontrol", SCONTROL_STUB)
    srun_log, scontrol_log = tmp_path / "srun.log", tmp_path / "scontrol.log"
    env = slurm_env(tmp_path, stubs, SRUN_LOG=str(srun_log), SCONTROL_LOG=str(scontrol_log), **extra)
    read = lambda p: p.read_text().splitlines() if p.exists() else []
    return env, lambda: read(srun_log), lambda: read(scontrol_log)


@pytest.mark.parametrize("train_exit, requeued", [(75, True), (0, False), (1, False)])
def test_slurm_requeues_on_75_only(tmp_path, train_exit, requeued):
    env, sruns, scontrols = slurm_with_stubs(tmp_path, TRAIN_EXIT=str(train_exit))
    result = run_script(SLURM, env=env)
    assert result.returncode == train_exit, result.stderr
    assert len(sruns()) == 2 and " --check " in sruns()[0] + " " and "--check" not in sruns()[1]
    assert scontrols() == (["requeue 4242"] if requeued else [])


def test_slurm_check_failure_stops_before_training(tmp_path):
    env, sruns, scontrols = slurm_with_stubs(tmp_path, CHECK_EXIT="2", TRAIN_EXIT="75")
    result = run_script(SLURM, env=env)
    assert result.returncode == 2 and "the --check step failed" in result.stderr
    assert len(sruns()) == 1 and scontrols() == []


def test_slurm_stops_requeueing_after_max_requeues(tmp_path):
    env, _, scontrols = slurm_with_stubs(tmp_path, TRAIN_EXIT="75", SLURM_RESTART_COUNT="3", MAX_REQUEUES="3")
    result = run_script(SLURM, env=env)
    assert result.returncode == 75 and scontrols() == []
    assert "not requeueing" in result.stderr


def test_slurm_passes_sigterm_on_to_srun_and_requeues(tmp_path):
    """--signal=B:TERM@... signals only the batch shell: it passes SIGTERM on to srun (and srun to the
    tasks), waits for srun's own exit code (75 after the checkpoint) and requeues."""
    started = tmp_path / "started"
    env, sruns, scontrols = slurm_with_stubs(tmp_path, CHECK="0", WAIT_FOR_TERM=str(started))
    proc = subprocess.Popen(["bash", str(SLURM)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started.exists(), "the stub srun did not start"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, err
    assert sruns()[-1] == "TERM" and scontrols() == ["requeue 4242"]


# -- JAX's SLURM auto-detection -------------------------------------------------------------------
def call(method, **kwargs):
    """Call a ClusterEnv method with the keyword arguments its signature has (they moved across JAX
    versions)."""
    import inspect

    accepted = inspect.signature(method).parameters
    return method(**{k: v for k, v in kwargs.items() if k in accepted})


def fake_slurm(monkeypatch, **env: str) -> None:
    for key in list(os.environ):
        if key.startswith(FOREIGN):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


STEP_ENV = dict(SLURM_JOB_ID="123456", SLURM_STEP_NODELIST="node[001-002]", SLURM_NTASKS="16", SLURM_PROCID="9",
                SLURM_LOCALID="1", SLURM_STEP_NUM_NODES="2", SLURM_NNODES="2", SLURM_JOB_NUM_NODES="2")


def test_jax_detects_slurm(monkeypatch):
    from jax._src import clusters

    slurm = clusters.SlurmCluster
    fake_slurm(monkeypatch, **{k: v for k, v in STEP_ENV.items() if k != "SLURM_STEP_NODELIST"})
    assert not slurm.is_env_present()  # the batch script's own environment: no step yet, no detection
    fake_slurm(monkeypatch, **STEP_ENV)
    assert slurm.is_env_present()
    port = 123456 % 2**12 + (65535 - 2**12 + 1)  # JAX's port from the job id: the same on every task
    assert call(slurm.get_coordinator_address, timeout_secs=None, override_coordinator_port=None) == f"node001:{port}"
    assert call(slurm.get_coordinator_address, timeout_secs=None, override_coordinator_port="4000") == "node001:4000"
    assert (slurm.get_process_count(), slurm.get_process_id(), slurm.get_local_process_id()) == (16, 9, 1)
    for nodes, first in [("gpu-a,gpu-b", "gpu-a"), ("node[007,009-010],other", "node007"), ("localhost", "localhost")]:
        monkeypatch.setenv("SLURM_STEP_NODELIST", nodes)
        address = call(slurm.get_coordinator_address, timeout_secs=None, override_coordinator_port=None)
        assert address == f"{first}:{port}"

    # What jax.distributed.initialize() does with no arguments: SLURM is the environment found, and
    # JAX_COORDINATOR_PORT picks the port.
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node[001-002]")
    monkeypatch.setenv("JAX_COORDINATOR_PORT", "4001")
    detect = clusters.ClusterEnv.auto_detect_unset_distributed_params
    found = call(detect, coordinator_address=None, num_processes=None, process_id=None, local_device_ids=None,
                 cluster_detection_method=None, initialization_timeout=300)
    assert tuple(found) == ("node001:4001", 16, 9, [1])  # one process per GPU: task i drives GPU i of its node
    kept = call(detect, coordinator_address=None, num_processes=None, process_id=None, local_device_ids=[0, 1, 2, 3],
                cluster_detection_method=None, initialization_timeout=300)
    assert list(kept[3]) == [0, 1, 2, 3]  # one process per node: JAX_LOCAL_DEVICE_IDS, given, is kept


PROBE = """\
import json, sys
import numpy as np
import jax
from jax.experimental import multihost_utils
from lsync_jax.host import initialize_distributed

initialize_distributed(dict(enabled=True, coordinator_address="", num_processes=-1, process_id=-1,
                            cpu_collectives="gloo"))
ids = multihost_utils.process_allgather(np.int32(jax.process_index()))
print(json.dumps(dict(count=jax.process_count(), index=jax.process_index(), ids=ids.tolist(),
                      devices=jax.device_count())))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multihost
def test_two_processes_start_from_slurm_variables_alone(tmp_path):
    """What srun gives each task is enough: config.distributed.enabled=True with every other
    distributed setting empty starts both processes (lsync_jax.host.initialize_distributed)."""
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = clean_env(tmp_path, SLURM_JOB_ID="777", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                        SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_STEP_NUM_NODES="1", SLURM_NNODES="1",
                        JAX_COORDINATOR_PORT=port, JAX_PLATFORMS="cpu")
        procs.append(subprocess.Popen([sys.executable, "-c", PROBE], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    assert [(o["count"], o["index"], o["ids"]) for o in outputs] == [(2, 0, [0, 1]), (2, 1, [0, 1])]
    assert outputs[0]["devices"] == 2
