"""The training loop: steps, then hooks.

One code path for one CPU, a GPU node or a TPU pod: the state lives sharded over a (data, fsdp)
mesh, each process feeds its share of the global batch, checkpoints are written by every process
without gathering. `lsync_jax.recipes.train_and_evaluate` is the entry point that runs a config's
phases (ERW, automatic pairs) through `train`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Mapping, Sequence

import jax
from absl import logging

from lsync_jax.builders import validate_config
from lsync_jax.host import PHASES, initialize_distributed
from lsync_jax.train.hooks import Hook, Needs, Outcome, Preempted, Preemption, StepInfo
from lsync_jax.train.setup import EvaluatorFactory, Run, setup
from lsync_jax.workdir import WorkdirHold, checkpoint_dir, first_line


def train(config: Any, workdir: str, *, until: int | None = None, record: Mapping[str, Any] | None = None,
          accepts: Sequence[Mapping[str, Any]] = (), evaluators: Sequence[EvaluatorFactory] = (),
          validated: bool = False) -> dict[str, float]:
    """Train (or resume) `config` in `workdir` up to step `until` (default: train.num_steps); returns
    the last logged metrics, or raises `Preempted` once SIGTERM's checkpoint is saved. The keywords
    are a recipe phase's (see `setup`). The run holds `workdir` throughout (`WorkdirHold`: taken before
    anything is probed, written or compiled; released on every exit). A run that lost its hold (taken
    over, or not renewable for a lease) raises `HoldLostError` before it writes into the workdir again:
    before every checkpoint, sample grid and evaluation process 0 renews the hold and every process
    agrees (`Run.hold`, `Needs.HOLD`). It also stops before its next step on one process, and on several
    before the next step that is a multiple of train.log_every, if its next write has not stopped it."""
    if not validated:  # before any key is read: a config missing one gets the schema's error
        validate_config(config)
    initialize_distributed(config.distributed)  # the processes of a run agree on its hold through it
    with WorkdirHold.of_config(workdir, config.train) as hold:
        with PHASES.phase("start-up (config, data, model, state, hooks)"):
            run, hooks = setup(config, workdir, until=until, record=record, accepts=accepts, evaluators=evaluators,
                               validated=True)
        run = dataclasses.replace(run, step_fn=hold.guarded(run.step_fn, every=run.log_every, start=run.start),
                                  hold=hold.guard)
        return train_loop(run, hooks)


def train_loop(run: Run, hooks: Sequence[Hook]) -> dict[str, float]:
    """Run the steps from `run.start` to `run.end`, handing each hook every step. A resume with nothing
    left to train still gives the hooks one call (`trained=False`), so a missing final FID is made.
    After an error the hooks are closed quietly (a failure to close is one warning line), so that
    the first error is the last thing printed."""
    state, step, preempted, last_saved = run.state, run.start, False, run.resumed
    closing = [*hooks, run.metrics]
    try:
        with Preemption(run.log_every) as preemption, PHASES.phase("training (steps, data, logging)"):
            for step in range(run.start + 1, run.end + 1):
                if step == run.start + 1:
                    with PHASES.phase("first train step (compile)"):
                        state, metrics = run.step_fn(state, run.next_batch())
                        jax.block_until_ready(state)
                else:
                    state, metrics = run.step_fn(state, run.next_batch())
                info = StepInfo(step, state, metrics, last=step == run.end, finished=step == run.num_steps,
                                preempted=preemption.agreed(step), last_saved=last_saved)
                last_saved = _run_hooks(run, hooks, info)
                if info.preempted:
                    preempted = True
                    break
            if run.start >= run.end:
                _run_hooks(run, hooks, StepInfo(step, state, None, last=True, finished=step == run.num_steps,
                                                preempted=False, trained=False, last_saved=last_saved))
    except BaseException:
        for hook in closing:
            try:
                hook.close()
            except Exception as e:  # noqa: BLE001 - the error in flight is the one to report
                logging.warning("closing %s after the error below: %s", type(hook).__name__, first_line(e))
        raise
    errors = []
    for hook in closing:  # every hook is closed; the first failure (e.g. the last save's) is raised
        try:
            hook.close()
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    if errors:
        raise errors[0]
    if preempted:
        error = Preempted(step, checkpoint_dir(run.workdir))
        logging.warning("%s", error)
        raise error
    return run.metrics.last


def _run_hooks(run: Run, hooks: Sequence[Hook], info: StepInfo) -> int | None:
    """Hand `info` to the hooks in order, giving each what it `needs` first (the metrics checked finite,
    the state saved, the workdir's hold confirmed), and write their outcomes; returns the newest saved step."""
    metrics = run.metrics
    metrics.collect(info)
    due = [hook.due(info) for hook in hooks]
    if any(d and Needs.SAVED_STATE in hook.needs for d, hook in zip(due, hooks)):
        info = dataclasses.replace(info, save_wanted=True)  # a saving hook not due yet may be now
        due = [d or hook.due(info) for d, hook in zip(due, hooks)]
    if metrics.due(info):
        metrics.flush(info.step, info.last_saved)
    for hook, is_due in zip(hooks, due):
        if not is_due:
            continue
        if Needs.FINITE_METRICS in hook.needs:
            metrics.flush(info.step, info.last_saved)
        if Needs.SAVED_STATE in hook.needs and info.trained and info.last_saved != info.step:
            raise RuntimeError(f"{type(hook).__name__} needs step {info.step}'s state saved, and no hook before it "
                               "saved it: the checkpoint hook must come first in the hooks' order")
        if Needs.HOLD in hook.needs:
            run.hold(info.step)  # raises HoldLostError before the write once another run holds the workdir
        with PHASES.phase(hook.phase) if hook.phase else contextlib.nullcontext():
            outcome = hook(info) or Outcome()
        metrics.write(info.step, outcome)
        if outcome.saved:
            info = dataclasses.replace(info, last_saved=info.step)
    return info.last_saved
