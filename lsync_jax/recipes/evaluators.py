"""In-training evaluators, by name: what `config.eval` turns on in every phase that evaluates.

An evaluator is declared by `lsync_jax.train.hooks.Evaluator` (`due`, `done`, `__call__`) and runs in
the loop through `EvaluationHook`. A new one is a function registered here that says from the config
whether it is on and builds it from the phase's `Plan` (before the state exists: its inputs fail
before anything compiles; `check_only` for --check loads nothing long):

    @register_evaluator("mymetric", enabled=lambda config: bool(config.eval.mymetric_every))
    def mymetric(plan: Plan, check_only: bool) -> Evaluator: ...
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from lsync_jax.eval.fid import TrainingFID
from lsync_jax.train.setup import EvaluatorFactory, Plan


@dataclasses.dataclass(frozen=True)
class Registered:
    build: EvaluatorFactory
    enabled: Callable[[Any], bool]  # config -> whether this run evaluates it


EVALUATORS: dict[str, Registered] = {}


def register_evaluator(name: str, *, enabled: Callable[[Any], bool]) -> Callable[[EvaluatorFactory], EvaluatorFactory]:
    def wrap(build: EvaluatorFactory) -> EvaluatorFactory:
        if name in EVALUATORS:
            raise ValueError(f"evaluator {name!r} is registered twice")
        EVALUATORS[name] = Registered(build, enabled)
        return build

    return wrap


def evaluators_of(config: Any) -> Sequence[EvaluatorFactory]:
    """The factories of the evaluators `config` turns on, in registration order."""
    return tuple(entry.build for entry in EVALUATORS.values() if entry.enabled(config))


@register_evaluator("fid", enabled=lambda config: bool(int(config.eval.every)))
def fid(plan: Plan, check_only: bool) -> TrainingFID:
    """FID (and the metrics beside it) every `config.eval.every` steps and at the end (lsync_jax.eval.fid)."""
    return TrainingFID(plan.config, plan.model, plan.sample_fn, plan.mesh, plan.cfg_scale, plan.interval,
                       plan.workdir, plan.decode, check_only=check_only)
