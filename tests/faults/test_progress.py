"""Issue 17, row 13: every phase longer than a few seconds logs its start, its progress with an ETA
and its end; a command that loads weights says what and from where; one that does less than asked
says so."""

import jax
import pytest

from lsync_jax.builders import build_model
from lsync_jax.configs import tiny
from lsync_jax.eval.analysis import MeasureSettings, measure_model
from lsync_jax.host import Progress
from lsync_jax.porting import inception as weights


def test_progress_logs_start_rate_eta_and_end():
    lines = []
    progress = Progress("FID-1000", 1000, "samples", every_secs=0.0, log=lines.append)
    progress.update(250)
    progress.update(250)
    seconds = progress.finish()
    assert lines[0] == "FID-1000: 1,000 samples"
    assert lines[1].startswith("FID-1000: 250 / 1,000 samples (") and "s left)" in lines[1]
    assert lines[-1] == f"FID-1000: done, 500 samples in {seconds:.1f} s"


def test_progress_is_quiet_between_reports():
    lines = []
    progress = Progress("x", 10, every_secs=3600.0, log=lines.append)
    for _ in range(9):
        progress.update(1)
    assert len(lines) == 1  # the start only, until an hour has passed or the phase ends


def test_inception_weights_say_where_they_come_from(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LSYNC_JAX_CACHE", str(tmp_path))
    cached = tmp_path / weights.CACHED_NAME
    cached.write_bytes(b"converted earlier")
    with caplog.at_level("INFO"):
        assert weights.resolve_weights() == str(cached)
    assert f"FID Inception weights: {cached} (cached conversion)" in caplog.text


@pytest.mark.slow
def test_block_measurements_say_when_the_source_is_smaller_than_asked(caplog):
    config = tiny.get_config()
    config.data.synthetic_size = 24
    model = build_model(config)
    params = jax.jit(model.init)(jax.random.key(0), *model.init_inputs(1))["params"]
    with caplog.at_level("INFO"):
        measured = measure_model(config, model, params, MeasureSettings(num_samples=2048, t_values=(0.5,),
                                                                        batch_size=24, cka=False))
    assert measured["num_samples"] == 24
    assert "block measurements: 2048 examples requested but the source" in caplog.text
    assert "has 24: measuring 24" in caplog.text
    assert "block measurements at t = 0.5: done, 24 example passes" in caplog.text
