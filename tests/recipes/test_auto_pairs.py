"""LayerSync's automatic pairs in training: warm-up, measurement, choice stored in the checkpoints and kept
on resume (never re-measured), the same choice after an interruption between the phases, init_from
measured when there is no warm-up, and bad settings named before compiling."""

import json
import os
import shutil

import numpy as np
import pytest

from lsync_jax.configs import tiny
from lsync_jax.objectives.layersync import select_pairs
from lsync_jax.recipes import train_and_evaluate
from lsync_jax.recipes.auto_pairs import CHOICE_FILE, META_KEY
from lsync_jax.train.checkpoint import Checkpointer


def auto_config(steps=4, warmup=2):
    config = tiny.get_config()
    config.data.update(dict(name="fashion_mnist", dir="", split="train"))  # real classes: probes above chance
    config.train.update(dict(num_steps=steps, checkpoint_every=2, log_every=1, async_checkpoints=False,
                             num_grid_samples=0))
    config.objective.layersync.pairs = ("auto",)
    config.objective.layersync.selection.update(dict(warmup_steps=warmup, num_samples=60, t_values=(0.5, 1.0),
                                                     batch_size=32))
    return config


def meta(workdir, step):
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        return ckpt.read_meta(step)
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("auto"))
    metrics = train_and_evaluate(auto_config(), workdir)
    return workdir, metrics


@pytest.mark.slow
def test_warm_up_then_measured_pairs_then_layersync(auto_run):
    workdir, metrics = auto_run
    with open(os.path.join(workdir, CHOICE_FILE)) as f:
        choice = json.load(f)
    measured = choice["measurements"]
    assert measured["blocks"] == [1, 2, 3, 4] and measured["num_samples"] == 60 and measured["t_values"] == [0.5, 1.0]
    assert max(measured["probe_accuracy_mean"]) > 0.2  # Fashion-MNIST's 10 classes: chance is 0.1
    # the stored pairs are what the rule gives on the stored measurements, with weak < strong
    pairs, _ = select_pairs(measured["probe_accuracy_mean"])
    assert [list(p) for p in pairs] == choice["pairs"] and all(w < s for w, s, _ in pairs)
    assert choice["measured"] == f"step 2 of {workdir}"
    assert os.path.exists(os.path.join(workdir, CHOICE_FILE.replace(".json", ".png")))
    # step 2 is the warm-up (no LayerSync, no choice); step 4 trained with the pairs and records them
    warm, after = meta(workdir, 2), meta(workdir, 4)
    assert warm["objective"]["regularizers"] == {} and META_KEY not in warm
    assert after[META_KEY]["pairs"] == choice["pairs"]
    weak, strong, _ = pairs[0]
    assert after["objective"]["regularizers"]["layersync"]["pairs"] == [[weak, strong, 0.2]]
    assert f"layersync/block{weak}_block{strong}" in metrics and np.isfinite(metrics["loss/layersync"])


@pytest.mark.slow
def test_the_choice_survives_a_resume_and_is_never_remeasured(auto_run, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(auto_run[0], workdir)
    stored = meta(workdir, 4)[META_KEY]["pairs"]
    with open(os.path.join(workdir, CHOICE_FILE)) as f:
        accuracy = json.load(f)["measurements"]["probe_accuracy_mean"]
    # settings that would choose another pair now (another weight)
    other, _ = select_pairs(accuracy, weight=0.5)
    assert [list(p) for p in other] != stored
    os.remove(os.path.join(workdir, CHOICE_FILE))  # a re-measurement would write it again
    config = auto_config(steps=6)
    config.objective.layersync.auto_weight = 0.5
    train_and_evaluate(config, workdir)
    assert meta(workdir, 6)[META_KEY]["pairs"] == stored
    assert not os.path.exists(os.path.join(workdir, CHOICE_FILE))


@pytest.mark.slow
def test_an_interruption_between_the_phases_keeps_the_written_choice(auto_run, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(auto_run[0], workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))  # stopped after the warm-up's checkpoint
    path = os.path.join(workdir, CHOICE_FILE)
    with open(path) as f:
        written = json.load(f)
    written["pairs"] = [[1, 4, 0.3]]  # a choice measuring could not give: proves the file is used
    with open(path, "w") as f:
        json.dump(written, f)
    train_and_evaluate(auto_config(), workdir)
    assert meta(workdir, 4)[META_KEY]["pairs"] == [[1, 4, 0.3]]


@pytest.mark.slow
def test_an_interruption_without_the_written_choice_remeasures_the_same_choice(auto_run, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(auto_run[0], workdir)
    with open(os.path.join(workdir, CHOICE_FILE)) as f:
        before = json.load(f)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))  # stopped after the warm-up's checkpoint
    os.remove(os.path.join(workdir, CHOICE_FILE))
    train_and_evaluate(auto_config(), workdir)
    with open(os.path.join(workdir, CHOICE_FILE)) as f:
        after = json.load(f)
    assert after["pairs"] == before["pairs"]
    np.testing.assert_allclose(after["measurements"]["probe_accuracy_mean"],
                               before["measurements"]["probe_accuracy_mean"], rtol=1e-6)
    assert meta(workdir, 4)[META_KEY]["pairs"] == before["pairs"]


@pytest.mark.slow
def test_without_a_warm_up_the_init_from_weights_are_measured(auto_run, tmp_path):
    config = auto_config(steps=2, warmup=0)
    config.train.init_from = auto_run[0]
    train_and_evaluate(config, str(tmp_path))
    with open(tmp_path / CHOICE_FILE) as f:
        choice = json.load(f)
    assert choice["measured"] == f"train.init_from={auto_run[0]}"
    assert meta(str(tmp_path), 2)[META_KEY]["pairs"] == choice["pairs"]


@pytest.mark.parametrize("change, match", [
    (dict(warmup_steps=4), r"warmup_steps=4 must lie in \[0, train.num_steps=4\)"),
    (dict(warmup_steps=0), "measures the weights of config.train.init_from, which is empty"),
    (dict(middle=(0.9, 0.1)), "middle"),
    (dict(t_values=(2.0,)), "t_values"),
    (dict(condition="both"), "condition"),
    (dict(condition="null", class_dropout=0.0), "lacks"),
])
def test_bad_selection_settings_fail_before_training(tmp_path, change, match):
    config = auto_config()
    config.model.overrides.class_dropout_prob = change.pop("class_dropout", 0.1)
    config.objective.layersync.selection.update(change)
    with pytest.raises(ValueError, match=match):
        train_and_evaluate(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


def test_unknown_selection_key_and_erw_are_refused(tmp_path):
    config = auto_config()
    with config.unlocked():
        config.objective.layersync.selection.warmup = 3
    with pytest.raises(ValueError, match="selection.warmup"):
        train_and_evaluate(config, str(tmp_path))
    config = auto_config()
    config.erw.enabled = True
    with pytest.raises(ValueError, match="not supported"):
        train_and_evaluate(config, str(tmp_path))


@pytest.mark.slow
def test_a_longer_run_in_the_workdir_is_not_taken_for_a_warm_up(tmp_path):
    config = auto_config(steps=2)
    config.objective.regularizers = ()
    train_and_evaluate(config, str(tmp_path))  # a baseline run to step 2
    with pytest.raises(ValueError, match="beyond config.objective.layersync.selection.warmup_steps=1"):
        train_and_evaluate(auto_config(steps=4, warmup=1), str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
