"""Run records are data: checkpoints written by 4c355f9 and a7b283a (tests/fixtures/checkpoints, made by
tests/fixtures/make_old_checkpoints.sh) resume; a schema-1 record (the objective as a repr string) is
migrated into structured fields by one function; a missing key reads as the value that applied when
the record was written; a changed value is named by its key; every start writes what it ran."""

import glob
import json
import os
import shutil

import jax
import pytest

from lsync_jax import workdir as records
from lsync_jax.configs import tiny
from lsync_jax.recipes import train_and_evaluate

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "checkpoints")
COMMITS = ("4c355f9", "a7b283a")


def _config(steps):
    config = tiny.get_config()
    config.model.overrides.update(dict(depth=2, hidden_size=32, num_heads=2))
    config.train.update(dict(num_steps=steps, checkpoint_every=steps, log_every=1, num_grid_samples=0,
                             async_checkpoints=False))
    return config


@pytest.fixture
def threefry():
    """The fixtures were written with JAX's default PRNG (threefry: a key of 2 words); the suite runs 'rbg'."""
    previous = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "threefry2x32")
    yield
    jax.config.update("jax_default_prng_impl", previous)


def _fixture(commit, tmp_path):
    workdir = str(tmp_path / commit)
    shutil.copytree(os.path.join(FIXTURES, commit), workdir)
    return workdir


@pytest.mark.parametrize("commit", COMMITS)
def test_a_schema_1_record_is_migrated_into_structured_fields(commit):
    raw = json.load(open(os.path.join(FIXTURES, commit, "checkpoints", "2", "meta", "metadata")))
    assert "schema" not in raw and raw["objective"].startswith("Objective(transport=Transport(")
    meta = records.read_meta(os.path.join(FIXTURES, commit, "checkpoints"), 2)
    assert meta["schema"] == records.RECORD_SCHEMA
    assert meta["objective"] == {"transport_weight": 1.0, "clean_input": False,
                                 "regularizers": {"layersync": {"pairs": [[1, 2, 0.2]], "stop_gradient": True}}}
    model = meta["model"]  # completed with the values its unlisted fields had then
    assert model["depth"] == 2 and model["long_skips"] is False and model["patch_size"] == 4
    assert model["mlp_ratio"] == 4.0 and model["z_dims"] == []


@pytest.mark.slow
@pytest.mark.parametrize("commit", COMMITS)
def test_checkpoints_of_older_commits_resume(commit, tmp_path, threefry):
    workdir = _fixture(commit, tmp_path)
    train_and_evaluate(_config(3), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["2", "3"]
    meta = records.read_meta(os.path.join(workdir, "checkpoints"), 3)
    assert meta["schema"] == 2 and meta["objective"]["regularizers"]["layersync"]["pairs"] == [[1, 2, 0.2]]
    raw = json.load(open(os.path.join(workdir, "checkpoints", "3", "meta", "metadata")))
    assert isinstance(raw["objective"], dict) and "repr" not in json.dumps(raw)
    # what this start ran, one file per start
    (path,) = glob.glob(os.path.join(workdir, "runs", "*.json"))
    ran = json.load(open(path))
    assert ran["config"]["model"]["overrides"]["depth"] == 2 and ran["config"]["train"]["num_steps"] == 3
    assert {"lsync-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint"} <= set(ran["versions"])
    assert ran["argv"] and ran["devices"] >= 1 and ran["started"].endswith("+00:00")


@pytest.mark.slow
def test_a_changed_setting_is_named_by_its_key(tmp_path, threefry):
    workdir = _fixture("4c355f9", tmp_path)
    config = _config(3)
    config.objective.layersync.pairs = ((1, 2, 0.5),)
    with pytest.raises(ValueError, match=r"objective\.regularizers\.layersync\.pairs: checkpoint \[\[1, 2, 0\.2\]\], "
                                         r"config \[\[1, 2, 0\.5\]\]"):
        train_and_evaluate(config, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]  # nothing written


def test_a_field_added_with_a_default_never_refuses_an_old_record(monkeypatch):
    monkeypatch.setitem(records.ADDED_FIELDS, ("objective.regularizers.layersync", "new_knob"), 0.0)
    old = {"regularizers": {"layersync": {"pairs": [[1, 2, 0.2]]}}}
    same = {"regularizers": {"layersync": {"pairs": [[1, 2, 0.2]], "new_knob": 0.0}}}
    other = {"regularizers": {"layersync": {"pairs": [[1, 2, 0.2]], "new_knob": 1.0}}}
    assert records.record_differences(old, same, "objective") == []
    assert records.record_differences(old, other, "objective") == [
        "objective.regularizers.layersync.new_knob: checkpoint 0.0, config 1.0"]
    unregistered = {"regularizers": {"layersync": {"pairs": [[1, 2, 0.2]], "unknown": 1}}}
    assert records.record_differences(old, unregistered, "objective") == [
        "objective.regularizers.layersync.unknown: checkpoint absent, config 1"]


def test_a_record_that_no_schema_wrote_is_refused_not_accepted():
    with pytest.raises(ValueError, match="cannot be read"):
        records.parse_v1_objective("Objective(regularizers=(LayerSync(pairs=__import__('os')),))")
    with pytest.raises(ValueError, match="newer than this lsync-jax"):
        records.migrate_meta({"schema": records.RECORD_SCHEMA + 1})
