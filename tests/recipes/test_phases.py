"""Runs made of phases (lsync_jax.recipes.phases): every phase's step range is checked before any
phase starts, the first one included."""

import os

import pytest

from lsync_jax.configs import tiny
from lsync_jax.recipes.phases import Phase, run_phases
from lsync_jax.workdir import HoldError
from tests.test_workdir_hold import other_host_hold


@pytest.mark.parametrize("until", [0, 7])
def test_a_phase_whose_last_step_is_out_of_range_is_refused_before_anything_runs(tmp_path, until):
    config = tiny.get_config()  # train.num_steps=6
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"phase 'only': its last step {until} must lie in \[1, "
                                         r"train.num_steps=6\]"):
        run_phases([Phase("only", str(workdir), config, until)])
    assert not workdir.exists()


def test_a_phase_that_resolves_its_settings_holds_the_workdir_while_it_writes_them(tmp_path):
    """The automatic pairs' choice is written between phases: by the run that holds the workdir only."""
    config = tiny.get_config()
    config.train.hold_wait_s = 0.0
    workdir = str(tmp_path / "run")
    other_host_hold(workdir)  # a live run on another machine holds it

    def resolve(phase):
        with open(os.path.join(phase.workdir, "choice.json"), "w") as f:
            f.write("{}")
        return phase

    with pytest.raises(HoldError, match="node-7.other"):
        run_phases([Phase("resolved", workdir, config, 6, resolve=resolve)])
    assert not os.path.exists(os.path.join(workdir, "choice.json"))
