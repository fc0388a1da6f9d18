#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: create it, install lsync-jax on every worker, check, train, requeue.
# Run `launch/tpu_pod.sh --help` for the steps and variables; docs/pods.md explains the whole recipe.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: launch/tpu_pod.sh STEP... [-- TRAIN_FLAGS...]

Steps (run in the order given):
  create   create the TPU VM slice (QUEUED=1: through a queued resource, waiting until it is ACTIVE)
  install  put lsync-jax on every worker (this checkout's git HEAD, or LSYNC_REPO, or LSYNC_WHEEL)
           and pip-install it with JAX_PIP
  check    launch/train.py ... --check on every worker: config, data, weights and storage, no compile
  train    check (unless CHECK=0), then the train command on every worker; while it exits 75
           (preempted, checkpoint saved) run it again; if the slice was preempted, recreate it
           (RECREATE=1) and resume
  run      create, install, train
  delete   delete the slice (and its queued resource)

Every worker runs the same command (JAX finds the pod's hosts itself):
  python3 launch/train.py --config=$CONFIG --workdir=$WORKDIR --config.distributed.enabled=True TRAIN_FLAGS...

Variables (environment):
  WORKDIR           the run's directory, a bucket: gs://BUCKET/RUN (required by check, train, run;
                    ALLOW_LOCAL_WORKDIR=1 for a path on a disk every worker mounts)
  CONFIG            configs/imagenet256.py
  TPU_NAME          lsync-jax
  ZONE              us-central2-b
  ACCELERATOR_TYPE  v4-32 (e.g. v5litepod-16, v5p-32, v6e-16)
  RUNTIME_VERSION   chosen from ACCELERATOR_TYPE: tpu-ubuntu2204-base (v4), v2-alpha-tpuv5-lite (v5e),
                    v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e)
  PROJECT           gcloud's default project unless set
  SPOT=1            a Spot slice (cheaper; preemptible)
  QUEUED=1          create through `gcloud compute tpus queued-resources` (QUEUED_ID: $TPU_NAME-qr)
  LSYNC_REPO        a git URL the workers clone (LSYNC_REF: a branch, tag or commit); unset: this
                    checkout's committed HEAD is copied to them (uncommitted changes are not)
  LSYNC_WHEEL       a wheel (local file, copied to every worker, or a URL) installed instead of the tree
  JAX_PIP           jax[tpu]  (pin it, e.g. 'jax[tpu]==0.10.2', to match the version you tested)
  PYTHON            python3
  REMOTE_ENV        prefixed to the train command on the workers, e.g. 'LSYNC_JAX_LIBRARY_LOGS=1'
  CHECK=0           train without the --check run first
  RECREATE=0        exit 75 instead of recreating a preempted slice
  MAX_RESTARTS      20 (reruns and recreations together)
  LOG_DIR           /tmp/lsync-jax-tpu-pod/$TPU_NAME: each remote step's output (all workers interleaved)
  DRY_RUN=1         print the commands instead of running them

Example:
  WORKDIR=gs://my-bucket/sit_xl_layersync ACCELERATOR_TYPE=v5litepod-16 ZONE=us-west4-a \
      launch/tpu_pod.sh run -- --config.data.dir=gs://my-bucket/imagenet256_latents
EOF
}

# -- settings -------------------------------------------------------------------------------------
TPU_NAME=${TPU_NAME:-lsync-jax}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
PROJECT=${PROJECT:-}
SPOT=${SPOT:-0}
QUEUED=${QUEUED:-0}
QUEUED_ID=${QUEUED_ID:-$TPU_NAME-qr}
QUEUED_POLL_S=${QUEUED_POLL_S:-60}
CONFIG=${CONFIG:-configs/imagenet256.py}
WORKDIR=${WORKDIR:-}
LSYNC_REPO=${LSYNC_REPO:-}
LSYNC_REF=${LSYNC_REF:-HEAD}
LSYNC_WHEEL=${LSYNC_WHEEL:-}
JAX_PIP=${JAX_PIP:-jax[tpu]}
PYTHON=${PYTHON:-python3}
REMOTE_DIR=${REMOTE_DIR:-lsync-jax}  # on each worker, relative to the home directory
REMOTE_ENV=${REMOTE_ENV:-}
CHECK=${CHECK:-1}
RECREATE=${RECREATE:-1}
MAX_RESTARTS=${MAX_RESTARTS:-20}
LOG_DIR=${LOG_DIR:-${TMPDIR:-/tmp}/lsync-jax-tpu-pod/$TPU_NAME}
DRY_RUN=${DRY_RUN:-0}
PREEMPTED_EXIT_CODE=75  # lsync_jax.train.hooks.PREEMPTED_EXIT_CODE: SIGTERM, checkpoint saved
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

default_runtime_version() {
    case $1 in
        v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
        v5p-*) echo v2-alpha-tpuv5 ;;
        v6e-*) echo v2-alpha-tpuv6e ;;
        *) echo tpu-ubuntu2204-base ;;
    esac
}
RUNTIME_VERSION=${RUNTIME_VERSION:-$(default_runtime_version "$ACCELERATOR_TYPE")}

# -- helpers --------------------------------------------------------------------------------------
die() { echo "tpu_pod.sh: $*" >&2; exit 1; }
dry() { [[ $DRY_RUN == 1 ]]; }

# Words quoted for a shell (plain words stay plain): for printed commands and the remote command line.
quote_words() {
    local out=() word
    for word in "$@"; do
        if [[ $word =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
            out+=("$word")
        else
            out+=("'${word//\'/\'\\\'\'}'")
        fi
    done
    echo "${out[*]}"
}

run() {  # print a command (on stdout with DRY_RUN=1, else on stderr), and run it unless DRY_RUN=1
    if dry; then
        echo "+ $(quote_words "$@")"
    else
        echo "+ $(quote_words "$@")" >&2
        "$@"
    fi
}

gc() {  # gcloud compute tpus ..., with --project when PROJECT is set
    local cmd=(gcloud compute tpus "$@")
    [[ -z $PROJECT ]] || cmd+=("--project=$PROJECT")
    run "${cmd[@]}"
}

# -- steps ----------------------------------------------------------------------------------------
create() {
    local spot=()
    [[ $SPOT != 1 ]] || spot=(--spot)
    if [[ $QUEUED == 1 ]]; then
        gc queued-resources create "$QUEUED_ID" --node-id="$TPU_NAME" --zone="$ZONE" \
            --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${spot[@]}"
        wait_until_active
    else
        gc tpu-vm create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR_TYPE" \
            --version="$RUNTIME_VERSION" "${spot[@]}"
    fi
}

wait_until_active() {  # a queued resource waits for capacity: ACCEPTED, WAITING_FOR_RESOURCES, ..., ACTIVE
    local state describe=(queued-resources describe "$QUEUED_ID" --zone="$ZONE" --format='value(state.state)')
    dry && { gc "${describe[@]}"; return 0; }
    while :; do
        state=$(gc "${describe[@]}") || state=""
        case $state in
            ACTIVE) return 0 ;;
            FAILED | SUSPENDED | SUSPENDING) die "queued resource $QUEUED_ID is $state" ;;
        esac
        echo "tpu_pod.sh: queued resource $QUEUED_ID is ${state:-unknown}; waiting ${QUEUED_POLL_S}s" >&2
        sleep "$QUEUED_POLL_S"
    done
}

delete() {
    if [[ $QUEUED == 1 ]]; then
        gc queued-resources delete "$QUEUED_ID" --zone="$ZONE" --force --quiet
    else
        gc tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet
    fi
}

on_all_workers() {  # one command line on every worker at once
    gc tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}

copy_to_all_workers() {  # a local file into every worker's home directory (as $2, default its name)
    gc tpu-vm scp "$1" "$TPU_NAME:${2:-$(basename "$1")}" --zone="$ZONE" --worker=all
}

install() {
    local fetch package
    if [[ -n $LSYNC_REPO ]]; then
        fetch="rm -rf $(quote_words "$REMOTE_DIR") && git clone -q $(quote_words "$LSYNC_REPO" "$REMOTE_DIR")"
        fetch+=" && git -C $(quote_words "$REMOTE_DIR") checkout -q $(quote_words "$LSYNC_REF")"
    else
        local tarball=${TMPDIR:-/tmp}/lsync-jax-$$.tar.gz
        if [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
            echo "tpu_pod.sh: uncommitted changes are not copied to the workers (git HEAD is)" >&2
        fi
        run git -C "$REPO_ROOT" archive --format=tar.gz --output="$tarball" HEAD
        copy_to_all_workers "$tarball" lsync-jax.tar.gz
        dry || rm -f "$tarball"
        fetch="rm -rf $(quote_words "$REMOTE_DIR") && mkdir -p $(quote_words "$REMOTE_DIR")"
        fetch+=" && tar -xzf lsync-jax.tar.gz -C $(quote_words "$REMOTE_DIR")"
    fi
    package=./$REMOTE_DIR
    if [[ -n $LSYNC_WHEEL ]]; then
        package=$LSYNC_WHEEL
        if [[ -f $LSYNC_WHEEL ]]; then
            copy_to_all_workers "$LSYNC_WHEEL"
            package=./$(basename "$LSYNC_WHEEL")
        fi
    fi
    on_all_workers "$fetch && $PYTHON -m pip install -q $(quote_words "$JAX_PIP" "$package")"
}

require_workdir() {
    [[ -n $WORKDIR ]] || die "set WORKDIR, e.g. WORKDIR=gs://BUCKET/RUN (a pod's workers share no disk)"
    [[ $WORKDIR == gs://* || ${ALLOW_LOCAL_WORKDIR:-0} == 1 ]] ||
        die "WORKDIR=$WORKDIR is not a gs:// path: a pod's workers share no disk, so checkpoints written" \
            "there would be split across them (ALLOW_LOCAL_WORKDIR=1 if it is a disk mounted on every worker)"
}

train_command() {  # the one command every worker runs, then a line with its exit code
    local words=("$PYTHON" launch/train.py "--config=$CONFIG" "--workdir=$WORKDIR" --config.distributed.enabled=True
                 "${TRAIN_FLAGS[@]}" "$@")
    echo "cd $(quote_words "$REMOTE_DIR") && ${REMOTE_ENV:+$REMOTE_ENV }$(quote_words "${words[@]}"); echo LSYNC_JAX_EXIT_CODE=\$?"
}

# Runs a command on every worker with its output also in $LOG_DIR/$1.log, and sums up how it ended:
# 0 every worker exited 0; 75 some were preempted (and the others finished); 255 a worker's exit code
# is unknown (its connection broke, or the slice went away); else the highest other exit code.
# (gcloud's own exit status is not enough: older releases return 0 whatever the workers return.)
remote_step() {
    local log=$LOG_DIR/$1.log rc=0 codes
    dry && { on_all_workers "$2"; return 0; }
    mkdir -p "$LOG_DIR"
    echo "tpu_pod.sh: $1: output in $log" >&2
    on_all_workers "$2" 2>&1 | tee "$log" || rc=$?
    codes=$(grep -oE 'LSYNC_JAX_EXIT_CODE=[0-9]+' "$log" | cut -d= -f2 | sort -nu | tr '\n' ' ') || true
    if [[ -z $codes ]]; then
        return 255
    fi
    local code worst=0
    for code in $codes; do
        [[ $code == 0 || $code == "$PREEMPTED_EXIT_CODE" ]] || worst=$code
    done
    ((worst == 0)) || return "$worst"
    [[ " $codes" != *" $PREEMPTED_EXIT_CODE "* ]] || return "$PREEMPTED_EXIT_CODE"
    ((rc == 0)) || return 255  # all reported 0 but gcloud failed: a worker never reported
    return 0
}

slice_state() {  # READY, PREEMPTED, ..., or MISSING when it no longer exists
    gc tpu-vm describe "$TPU_NAME" --zone="$ZONE" --format='value(state)' 2>/dev/null || echo MISSING
}

check() {
    require_workdir
    local rc=0
    remote_step check "$(train_command --check)" || rc=$?
    ((rc == 0)) || die "the --check run failed on some worker (exit $rc; see $LOG_DIR/check.log)"
}

train() {
    require_workdir
    [[ $CHECK == 0 ]] || check
    local attempt=0 rc state
    while :; do
        attempt=$((attempt + 1))
        rc=0
        remote_step "train-$attempt" "$(train_command)" || rc=$?
        dry && return 0
        ((rc != 0)) || { echo "tpu_pod.sh: training finished" >&2; return 0; }
        if ((rc != PREEMPTED_EXIT_CODE && rc != 255)); then
            die "training failed on some worker (exit $rc; see $LOG_DIR/train-$attempt.log)"
        fi
        ((attempt <= MAX_RESTARTS)) || { echo "tpu_pod.sh: $MAX_RESTARTS restarts used up" >&2; exit 75; }
        state=$(slice_state)
        if [[ $state == READY ]]; then
            ((rc == PREEMPTED_EXIT_CODE)) ||
                die "lost contact with a worker while the slice is READY; training may still be running" \
                    "there: look at $LOG_DIR/train-$attempt.log before starting it again"
            echo "tpu_pod.sh: preempted (exit 75, checkpoint saved); running the same command again" >&2
        else
            [[ $RECREATE == 1 ]] || { echo "tpu_pod.sh: the slice is $state; rerun to resume" >&2; exit 75; }
            echo "tpu_pod.sh: the slice is $state; recreating it and resuming from the last checkpoint" >&2
            delete || true
            create
            install
        fi
    done
}

# -- main -----------------------------------------------------------------------------------------
STEPS=()
TRAIN_FLAGS=()
while (($#)); do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --) shift; TRAIN_FLAGS=("$@"); break ;;
        create | install | check | train | delete) STEPS+=("$1") ;;
        run) STEPS+=(create install train) ;;
        *) usage >&2; die "unknown step: $1" ;;
    esac
    shift
done
((${#STEPS[@]})) || { usage >&2; exit 2; }
cd "$REPO_ROOT"
for step in "${STEPS[@]}"; do
    "$step"
done
