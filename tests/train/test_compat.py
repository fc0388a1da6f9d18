"""Checkpoints written before the layered redesign (a7b283a and earlier) still resume.

The train state and the data-iterator state are unchanged, and the objective record is migrated; what
changed is the model record in the meta: configs then listed SiT's switches by value (the
hand-copied SIT_SWITCHES), now they leave them None (the model's own value) and record only what
they set. A record with the switches at their defaults must resume; one with another value must not.
"""

import json
import os

import pytest

from lsync_jax.configs import tiny
from lsync_jax.recipes import train_and_evaluate
from tests.helpers import quick

# What configs/tiny.py recorded before the redesign, beyond the fields it sets.
OLD_SWITCHES = dict(parametrization="sp", mup_base_width=288, output_multiplier=1.0, long_skips=False,
                    self_condition=0, self_condition_stop_gradient=False)

pytestmark = pytest.mark.slow


def _rewrite_model_record(workdir, step, **fields):
    path = os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")
    with open(path) as f:
        meta = json.load(f)
    meta["model"].update(fields)
    with open(path, "w") as f:
        json.dump(meta, f)


def test_a_pre_redesign_model_record_resumes_and_a_different_one_is_refused(tmp_path):
    config = quick(tiny.get_config(), steps=2)
    train_and_evaluate(config, str(tmp_path))
    _rewrite_model_record(str(tmp_path), 2, **OLD_SWITCHES)
    config.train.num_steps = 4
    config.train.checkpoint_every = 2
    train_and_evaluate(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]

    _rewrite_model_record(str(tmp_path), 4, long_skips=True)
    config.train.num_steps = 6
    with pytest.raises(ValueError, match=r"model\.long_skips: checkpoint True, config False"):
        train_and_evaluate(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
