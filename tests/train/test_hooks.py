"""The loop's contract with its hooks (lsync_jax.train.loop._run_hooks): a hook gets what it `needs`
before it runs, tells the loop what it did through its `Outcome`, and never reaches into another."""

import types

import pytest

from lsync_jax.train.hooks import Needs, Outcome, StepInfo
from lsync_jax.train.loop import _run_hooks


class FakeMetrics:
    def __init__(self, log):
        self.log = log

    def collect(self, info):
        self.log.append(("collect", info.step))

    def due(self, info):
        return False

    def flush(self, step, last_saved):
        self.log.append(("flush", step, last_saved))

    def write(self, step, outcome):
        if outcome.scalars or outcome.images or outcome.paused_training:
            self.log.append(("write", step, dict(outcome.scalars), outcome.paused_training))


class Saver:
    """Like CheckpointHook: due every 10 steps or when a hook due now wants the state saved."""

    needs = Needs.FINITE_METRICS
    phase = None

    def __init__(self, log):
        self.log = log

    def due(self, info):
        return info.trained and (info.step % 10 == 0 or info.save_wanted) and info.last_saved != info.step

    def __call__(self, info):
        self.log.append(("save", info.step))
        return Outcome(saved=True)


class Evaluation:
    """Like EvaluationHook: due at step 3, needs the state saved first."""

    needs = Needs.FINITE_METRICS | Needs.SAVED_STATE
    phase = None

    def __init__(self, log):
        self.log = log

    def due(self, info):
        return info.step == 3

    def __call__(self, info):
        self.log.append(("evaluate", info.step, info.last_saved))
        return Outcome(scalars={"eval/fid": 1.5}, paused_training=True)


class GridWriter:
    """Like SampleGridHook: writes into the workdir every step, so it needs the hold confirmed first."""

    needs = Needs.HOLD
    phase = None

    def __init__(self, log):
        self.log = log

    def due(self, info):
        return info.trained

    def __call__(self, info):
        self.log.append(("grid", info.step))
        return Outcome()


class HoldingSaver(Saver):
    needs = Needs.FINITE_METRICS | Needs.HOLD


def run_of(log, hold=None):
    return types.SimpleNamespace(metrics=FakeMetrics(log), hold=hold or (lambda step: log.append(("hold", step))))


def info(step, last_saved=None, trained=True):
    return StepInfo(step, None, {"loss": 0.0}, last=False, finished=False, preempted=False, trained=trained,
                    last_saved=last_saved)


def test_an_evaluation_gets_the_state_saved_and_the_metrics_checked_first():
    log = []
    last = _run_hooks(run_of(log), [Saver(log), Evaluation(log)], info(3, last_saved=0))
    assert last == 3
    assert log == [("collect", 3), ("flush", 3, 0), ("save", 3), ("flush", 3, 3), ("evaluate", 3, 3),
                   ("write", 3, {"eval/fid": 1.5}, True)]


def test_a_step_nobody_needs_saved_is_not_saved():
    log = []
    assert _run_hooks(run_of(log), [Saver(log), Evaluation(log)], info(4, last_saved=0)) == 0
    assert log == [("collect", 4)]


def test_a_hook_that_needs_a_save_before_the_saver_is_an_error():
    log = []
    with pytest.raises(RuntimeError, match="Evaluation needs step 3's state saved.*checkpoint hook must come first"):
        _run_hooks(run_of(log), [Evaluation(log), Saver(log)], info(3, last_saved=0))
    assert ("evaluate", 3, 0) not in log


def test_a_resume_with_nothing_to_train_evaluates_without_saving():
    """The state is the checkpoint's already (last_saved == step): the final evaluation runs, no save."""
    log = []
    assert _run_hooks(run_of(log), [Saver(log), Evaluation(log)], info(3, last_saved=3, trained=False)) == 3
    assert ("save", 3) not in log and ("evaluate", 3, 3) in log


def test_every_hook_that_writes_into_the_workdir_gets_the_hold_confirmed_first():
    log = []
    assert _run_hooks(run_of(log), [HoldingSaver(log), GridWriter(log), Evaluation(log)], info(10, last_saved=0)) == 10
    assert log == [("collect", 10), ("flush", 10, 0), ("hold", 10), ("save", 10), ("hold", 10), ("grid", 10)]


def test_a_lost_hold_prevents_the_save():
    from lsync_jax.workdir import HoldLostError

    def lost(step):
        raise HoldLostError(f"another run holds the workdir (step {step})")

    log = []
    with pytest.raises(HoldLostError, match="step 10"):
        _run_hooks(run_of(log, hold=lost), [HoldingSaver(log), GridWriter(log)], info(10, last_saved=0))
    assert ("save", 10) not in log and ("grid", 10) not in log


def test_the_engines_writing_hooks_declare_the_hold():
    from lsync_jax.train.hooks import CheckpointHook, EvaluationHook, SampleGridHook

    assert all(Needs.HOLD in hook.needs for hook in (CheckpointHook, SampleGridHook, EvaluationHook))
