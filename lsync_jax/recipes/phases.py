"""Runs made of phases, and the one routine that starts or resumes them.

A phase is a name, a workdir, the step it trains to, its whole config (which says what it
initialises from: `train.init_from` and `train.init_include`), what each of its checkpoints
records, and the objectives of earlier phases in the same workdir that it may resume from. A phase
whose settings depend on an earlier one (the automatic pairs' choice) has a `resolve` step that
fills them in just before it starts; its `config` is then a stand-in of the same structure, so
that every phase is checked before the first one trains. Every phase's config is validated once,
where it is made: the user's by `phases_of`, a recipe's by `builders.derived_config`.

`run_phases` skips the phases that are done (their last intact checkpoint exists, or a later phase
in another workdir has started), resumes the first one that is not, and stops after a phase that was
interrupted (preemption raises `lsync_jax.train.hooks.Preempted` out of it), so that running the
same command again continues where it stopped.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
from absl import logging

from lsync_jax.builders import build_model, build_transport
from lsync_jax.host import PHASES
from lsync_jax.objectives import build_objective
from lsync_jax.train import train
from lsync_jax.train.setup import EvaluatorFactory, check
from lsync_jax.workdir import WorkdirHold, checkpoint_dir, latest_step


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    workdir: str
    config: Any
    until: int  # the last step of this phase
    record: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # added to each checkpoint's meta
    accepts: tuple[dict[str, Any], ...] = ()  # objectives (`workdir.objective_record`) of earlier phases here
    resolve: Callable[["Phase"], "Phase"] | None = None  # fills in what an earlier phase decided


Evaluators = Callable[[Phase], Sequence[EvaluatorFactory]]


def check_phases(phases: Sequence[Phase]) -> None:
    """The model and objective of each phase build (errors name the key), before an earlier one trains.
    Their configs are validated already (where they were made)."""
    for phase in phases:
        model = build_model(phase.config)
        build_objective(phase.config.objective, build_transport(phase.config), depth=model.depth)


def _check_until(phase: Phase) -> None:
    if not 0 < phase.until <= int(phase.config.train.num_steps):
        raise ValueError(f"phase {phase.name!r}: its last step {phase.until} must lie in "
                         f"[1, train.num_steps={phase.config.train.num_steps}]")


def _is_done(phases: Sequence[Phase], i: int) -> bool:
    """Whether phase i is finished: it reached its last step, or a later phase in another workdir has
    started (the last phase is never skipped: a resume of a finished run still runs its final hooks)."""
    phase = phases[i]
    later = [p for p in phases[i + 1:] if p.workdir != phase.workdir]
    return i < len(phases) - 1 and ((latest_step(checkpoint_dir(phase.workdir)) or 0) >= phase.until or any(
        latest_step(checkpoint_dir(p.workdir)) is not None for p in later))


def _next(phases: Sequence[Phase]) -> int:
    """The index of the phase that runs next (the last one when all are done: its final hooks run)."""
    if not phases:
        raise ValueError("a run needs at least one phase")
    for phase in phases:  # cheap: every phase's step range, before anything reads the workdir
        _check_until(phase)
    return next((i for i in range(len(phases)) if not _is_done(phases, i)), len(phases) - 1)


def check_next_phase(phases: Sequence[Phase], evaluators: Evaluators = lambda p: ()) -> Phase:
    """Every check the phase that would run next makes at its start (`train.setup.check`), without
    training, compiling or writing anything but the storage probes; the phases after it are checked as
    configs (`check_phases`), since they start from what it will write. Returns that phase."""
    i = _next(phases)
    check_phases(phases[i + 1:])
    phase = phases[i]
    if phase.resolve is not None and i > 0:  # its settings come from a measurement (long): its warm-up's
        phase = phases[i - 1]                # start checks the same data, weights and storage
    check(phase.config, phase.workdir, until=phase.until, record=phase.record, accepts=phase.accepts,
          evaluators=evaluators(phase), validated=True)
    return phase


def run_phases(phases: Sequence[Phase], evaluators: Evaluators = lambda p: ()) -> dict[str, float]:
    """Start or resume the phases in order (see the module docstring); returns the last metrics. The
    phase that runs first is checked by its own start; the later ones are checked now (`check_phases`)."""
    first = _next(phases)
    check_phases(phases[first + 1:])
    metrics: dict[str, float] = {}
    for i, phase in enumerate(phases):
        if i < first or (i > first and _is_done(phases, i)):
            logging.info("phase %r is done (%s): skipped", phase.name, phase.workdir)
            continue
        if phase.resolve is not None:  # it may write into the workdir (the automatic pairs' choice): held too
            with WorkdirHold.of_config(phase.workdir, phase.config.train):
                phase = phase.resolve(phase)
        logging.info("phase %r: up to step %d in %s", phase.name, phase.until, phase.workdir)
        metrics = train(phase.config, phase.workdir, until=phase.until, record=phase.record, accepts=phase.accepts,
                        evaluators=evaluators(phase), validated=True)
        reached = latest_step(checkpoint_dir(phase.workdir)) or 0
        if reached < phase.until:
            logging.warning("phase %r stopped at step %d of %d; run the same command again to continue", phase.name,
                            reached, phase.until)
            return metrics
    return metrics


def log_time_report() -> None:
    """Where the run's wall time went, phase by phase (`host.PHASES`), on process 0: the demo's last lines."""
    if jax.process_index() == 0:
        for line in PHASES.report():
            logging.info("%s", line)
