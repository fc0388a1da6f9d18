"""Runs on top of the training engine: `train_and_evaluate(config, workdir)`, the entry point of
`launch/train.py`, turns a config into its phases and runs them (`phases.run_phases`):

- a plain run: one phase;
- ERW (`config.erw.enabled`): stage 1 (warm-up of a prefix on REPA) then stage 2 (`erw.py`);
- LayerSync's automatic pairs (`objective.layersync.pairs='auto'`): a warm-up, then the pairs
  measured and chosen, then LayerSync (`auto_pairs.py`).

In-training evaluators (`evaluators.py`: FID when `config.eval.every`) run in every phase whose
config turns them on. The config is validated once, here (`phases_of`); a phase's derived config once
where it is made (`builders.derived_config`).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax

from lsync_jax.builders import validate_config
from lsync_jax.host import all_processes, initialize_distributed
from lsync_jax.recipes.auto_pairs import auto_pairs_phases, uses_auto_pairs
from lsync_jax.recipes.erw import erw_phases
from lsync_jax.recipes.evaluators import EVALUATORS, evaluators_of, register_evaluator
from lsync_jax.recipes.phases import Phase, check_next_phase, log_time_report, run_phases
from lsync_jax.train.hooks import PREEMPTED_EXIT_CODE, Preempted
from lsync_jax.train.setup import EvaluatorFactory
from lsync_jax.workdir import hold_summary


def phases_of(config: Any, workdir: str) -> list[Phase]:
    """The phases `config` asks for, each checked (errors name the key) before anything trains."""
    validate_config(config)
    if config.erw.enabled:
        if uses_auto_pairs(config):
            raise ValueError("objective.layersync.pairs='auto' with config.erw.enabled is not supported: set the "
                             "pairs explicitly (launch/analyze.py on a run shows the measurements)")
        return erw_phases(config, workdir)
    if uses_auto_pairs(config):
        return auto_pairs_phases(config, workdir)
    return [Phase("train", workdir, config, int(config.train.num_steps))]


def phase_evaluators(phase: Phase) -> Sequence[EvaluatorFactory]:
    """The in-training evaluators a phase's config turns on (built when the phase is set up, before the
    model compiles)."""
    return evaluators_of(phase.config)


def check_run(config: Any, workdir: str) -> str:
    """launch/train.py --check: every check a start makes (config, data, weights, storage probes, a
    resume's compatibility, FID's inputs) on every process, then stop before compiling. Each process
    checks its own view (a pod's hosts have their own disks, credentials and network); all then agree,
    so a failure anywhere fails every process, naming the process. Returns a one-line summary."""
    initialize_distributed(config.distributed)
    error = None
    try:
        phase = check_next_phase(phases_of(config, workdir), phase_evaluators)
    except Exception as e:  # noqa: BLE001 - reported below, after every process has checked
        error = e
    if not all_processes(error is None):
        if error is not None:
            raise error
        raise RuntimeError("the check failed on another process (its log names the problem)")
    return (f"check passed on {jax.process_count()} process(es), {jax.device_count()} device(s): phase "
            f"{phase.name!r} of {workdir} can start (nothing compiled, nothing written but the storage probes); "
            f"workdir hold: {hold_summary(phase.workdir)}")


def train_and_evaluate(config: Any, workdir: str) -> dict[str, float]:
    """Train (or resume) the run described by `config` in `workdir`; returns the last metrics. Raises
    `Preempted` when SIGTERM stopped it after saving (launch/train.py exits with PREEMPTED_EXIT_CODE)."""
    initialize_distributed(config.distributed)
    metrics = run_phases(phases_of(config, workdir), phase_evaluators)
    log_time_report()
    return metrics


__all__ = ["EVALUATORS", "PREEMPTED_EXIT_CODE", "Phase", "Preempted", "check_run", "phases_of", "register_evaluator",
           "run_phases", "train_and_evaluate"]
