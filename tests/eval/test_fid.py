"""FID while training: logged at eval.every and at the end, fixed samples, bad settings caught before training."""

import json
import os

import pytest

from lsync_jax.configs import tiny
from lsync_jax.recipes import train_and_evaluate
from tests.helpers import seed_inception_cache


@pytest.fixture()
def cache(tmp_path, monkeypatch, inception_npz):
    monkeypatch.setenv("LSYNC_JAX_CACHE", str(tmp_path / "cache"))
    seed_inception_cache(tmp_path / "cache", inception_npz)  # converted once per test process
    return tmp_path / "cache"


def fid_config(**eval_overrides):
    config = tiny.get_config()
    config.train.update(dict(num_steps=4, checkpoint_every=2, log_every=2))
    config.eval.update(dict(every=3, num_samples=6, batch_size=4, reference_size=5))
    config.eval.update(eval_overrides)
    return config


@pytest.mark.slow
def test_fid_is_logged_at_every_and_at_the_end(tmp_path, cache):
    metrics = train_and_evaluate(fid_config(), str(tmp_path / "run"))
    assert metrics["eval/fid_6"] > 0 and metrics["eval/sfid_6"] > 0
    assert 0 <= metrics["eval/precision_6"] <= 1 and 0 <= metrics["eval/recall_6"] <= 1
    assert "eval/inception_score_6" not in metrics  # fid-helper's weights have no classifier
    files = sorted(os.listdir(tmp_path / "run" / "eval"))
    assert files == ["metrics_step0000003.json", "metrics_step0000004.json"]
    payload = json.load(open(tmp_path / "run" / "eval" / files[-1]))
    assert payload["num_samples"] == 6 and payload["num_reference"] == 5
    assert payload["metrics"]["fid"] == pytest.approx(metrics["eval/fid_6"])
    # the reference statistics were computed once and cached under the weights' name
    assert [f for f in os.listdir(cache / "fid_stats") if f.startswith("src_SyntheticSource")]

    # a run resumed after training finished without its final evaluation runs it, and the
    # fixed labels and noise give the same number from the same weights
    first = payload["metrics"]["fid"]
    os.remove(tmp_path / "run" / "eval" / files[-1])
    again = train_and_evaluate(fid_config(), str(tmp_path / "run"))
    assert again["eval/fid_6"] == pytest.approx(first, rel=1e-6)
    assert sorted(os.listdir(tmp_path / "run" / "eval")) == files


@pytest.mark.parametrize("overrides, error, match", [
    (dict(reference="/nonexistent/VIRTUAL_imagenet256_labeled.npz"), FileNotFoundError, "config.eval.reference"),
    (dict(inception_weights="/nonexistent/inception.npz"), FileNotFoundError, "inception.npz not found"),
    (dict(batch_size=0), ValueError, "config.eval.batch_size"),
    (dict(num_samples=3), ValueError, "config.eval.num_samples"),
    (dict(reference_size=2), ValueError, "config.eval.reference_size"),
])
def test_bad_eval_settings_fail_before_training(tmp_path, cache, overrides, error, match):
    with pytest.raises(error, match=match):
        train_and_evaluate(fid_config(**overrides), str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists() or not os.listdir(tmp_path / "run" / "checkpoints")


def test_latent_models_are_refused_before_training(tmp_path, cache):
    config = fid_config()
    config.model.overrides.in_channels = 4
    config.data.synthetic_shape = (28, 28, 4)
    with pytest.raises(ValueError, match="4-channel samples"):
        train_and_evaluate(config, str(tmp_path / "run"))


def test_unknown_eval_key_is_named(tmp_path):
    config = fid_config()
    config.eval.fid_evry = 3
    with pytest.raises(ValueError, match="fid_evry"):
        train_and_evaluate(config, str(tmp_path / "run"))


def test_a_small_reference_batch_is_refused_before_any_inception_work(tmp_path, monkeypatch, alarm):
    """The count comes from the .npz header: the weights never load, no reference image is read."""
    import types

    import numpy as np

    from lsync_jax.eval import evaluator, fid

    def refuse(*args, **kwargs):
        raise AssertionError("Inception work started before the image counts were checked")

    monkeypatch.setattr(fid, "InceptionEvaluator", refuse)
    monkeypatch.setattr(evaluator, "iter_npz_batches", refuse)
    path = str(tmp_path / "ref.npz")
    np.savez(path, arr_0=np.zeros((3, 8, 8, 3), np.uint8))
    model = types.SimpleNamespace(in_channels=3, num_classes=10)
    for overrides, match in ((dict(reference=path), r"precision needs at least 4 reference images \(config.eval."
                                                     r"reference=.*ref.npz: 3\)"),
                             (dict(num_samples=3), r"precision needs at least 4 sample images \(config.eval."
                                                   r"num_samples: 3\)")):
        with alarm(60), pytest.raises(ValueError, match=match):
            fid.TrainingFID(fid_config(**overrides), model, None, None, 1.0, (0.0, 1.0), str(tmp_path / "run"))


def test_the_rank_deficient_covariance_is_logged_once(tmp_path, monkeypatch, caplog):
    import types

    from lsync_jax.eval import fid

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(fid, "InceptionEvaluator", stop)
    model = types.SimpleNamespace(in_channels=3, num_classes=10)
    with caplog.at_level("WARNING"), pytest.raises(Stop):
        fid.TrainingFID(fid_config(), model, None, None, 1.0, (0.0, 1.0), str(tmp_path / "run"))
    lines = [r.getMessage() for r in caplog.records if "rank-deficient" in r.getMessage()]
    assert len(lines) == 1 and "FID-6" in lines[0]
