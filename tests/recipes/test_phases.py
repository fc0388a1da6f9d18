"""Runs made of phases (lsync_jax.recipes.phases): every phase's step range is checked before any
phase starts, the first one included."""

import pytest

from lsync_jax.configs import tiny
from lsync_jax.recipes.phases import Phase, run_phases


@pytest.mark.parametrize("until", [0, 7])
def test_a_phase_whose_last_step_is_out_of_range_is_refused_before_anything_runs(tmp_path, until):
    config = tiny.get_config()  # train.num_steps=6
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"phase 'only': its last step {until} must lie in \[1, "
                                         r"train.num_steps=6\]"):
        run_phases([Phase("only", str(workdir), config, until)])
    assert not workdir.exists()
