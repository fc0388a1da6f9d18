"""The training loop: steps, then hooks.

One code path for one CPU, a GPU node or a TPU pod: the state lives sharded over a (data, fsdp)
mesh, each process feeds its share of the global batch, checkpoints are written by every process
without gathering. `lsync_jax.recipes.train_and_evaluate` is the entry point that runs a config's
phases (ERW, automatic pairs) through `train`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from absl import logging

from lsync_jax.train.hooks import Hook, Preemption, StepInfo
from lsync_jax.train.setup import HookFactory, Run, setup


def train(config: Any, workdir: str, *, until: int | None = None, record: Mapping[str, Any] | None = None,
          accepts: Sequence[str] = (), extra_hooks: Sequence[HookFactory] = ()) -> dict[str, float]:
    """Train (or resume) `config` in `workdir` up to step `until` (default: train.num_steps); returns
    the last logged metrics. The keywords are a recipe phase's (see `setup`)."""
    run, hooks = setup(config, workdir, until=until, record=record, accepts=accepts, extra_hooks=extra_hooks)
    return train_loop(run, hooks)


def train_loop(run: Run, hooks: Sequence[Hook]) -> dict[str, float]:
    """Run the steps from `run.start` to `run.end`, handing each hook every step. A resume with nothing
    left to train still gives the hooks one call (`trained=False`), so a missing final FID is made."""
    state, step = run.state, run.start
    try:
        with Preemption(run.log_every) as preemption:
            for step in range(run.start + 1, run.end + 1):
                state, metrics = run.step_fn(state, run.next_batch())
                info = StepInfo(step, state, metrics, last=step == run.end, finished=step == run.num_steps,
                                preempted=preemption.agreed(step))
                _run_hooks(run, hooks, info)
                if info.preempted:
                    logging.warning("preempted at step %d; checkpoint saved", step)
                    break
            if run.start >= run.end:
                _run_hooks(run, hooks, StepInfo(step, state, None, last=True, finished=step == run.num_steps,
                                                preempted=False, trained=False))
    finally:
        for hook in hooks:
            hook.close()
    return run.metrics.last


def _run_hooks(run: Run, hooks: Sequence[Hook], info: StepInfo) -> None:
    for hook in hooks:
        if hook.due(info):
            scalars = hook(info)
            if scalars:
                run.metrics.log(info.step, scalars)
