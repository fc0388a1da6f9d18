"""In-training evaluators by name (lsync_jax.recipes.evaluators): the config says which are on."""

import pytest

from lsync_jax.configs import tiny
from lsync_jax.recipes import evaluators


def test_fid_is_on_exactly_when_eval_every_is_set():
    config = tiny.get_config()
    config.eval.every = 0
    assert evaluators.fid not in evaluators.evaluators_of(config)
    config.eval.every = 5
    assert evaluators.fid in evaluators.evaluators_of(config)


def test_a_registered_evaluator_is_built_when_its_config_turns_it_on(monkeypatch):
    monkeypatch.setattr(evaluators, "EVALUATORS", dict(evaluators.EVALUATORS))

    @evaluators.register_evaluator("probe", enabled=lambda config: config.seed == 7)
    def probe(plan, check_only):
        return ("probe", plan, check_only)

    config = tiny.get_config()
    config.eval.every = 0
    assert probe not in evaluators.evaluators_of(config)
    config.seed = 7
    assert evaluators.evaluators_of(config) == (probe,)
    with pytest.raises(ValueError, match="'probe' is registered twice"):
        evaluators.register_evaluator("probe", enabled=lambda config: True)(probe)
