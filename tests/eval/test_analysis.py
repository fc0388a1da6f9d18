"""measure_blocks: every number per block and t from collected features, in block order, JSON-clean;
the figures render."""

import json

import numpy as np
import pytest

from lsync_jax.eval.analysis import cka_figure, measure_blocks, probe_figure
from lsync_jax.eval.representations import cknna, linear_cka, mutual_knn


def planted(num=300, classes=3, seed=0):
    """Blocks 1..10 whose class signal grows with depth (block 1 is pure noise), reference = block 10."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, num)
    centres = rng.standard_normal((classes, 8))
    features = {}
    for b in range(1, 11):
        strength = (b - 1) / 9
        features[f"block_{b}"] = strength * centres[labels] + rng.standard_normal((num, 8))
    shuffled = dict(sorted(features.items()))  # 'block_10' sorts before 'block_2' as a string
    return {"labels": labels, "features": {0.5: shuffled, 1.0: features}, "reference": features["block_10"] * 2}


def test_measurements_follow_the_planted_signal_in_block_order():
    collected = planted()
    out = measure_blocks(collected, 3, k=10)
    assert out["blocks"] == list(range(1, 11)) and out["t_values"] == [0.5, 1.0] and out["num_samples"] == 300
    acc = out["probe_accuracy_mean"]
    assert out["num_test"] == 60  # 20% of 300
    np.testing.assert_allclose(out["probe_stderr"], np.sqrt(np.array(acc) * (1 - np.array(acc)) / 60))
    assert acc[0] < 0.5 and acc[-1] > 0.95 and np.mean(acc[:3]) < np.mean(acc[3:6]) < np.mean(acc[-3:])  # chance is 1/3
    per_t = out["per_t"][0]
    assert per_t["probe_accuracy"] == out["per_t"][1]["probe_accuracy"]  # same features, same split
    cka = np.array(per_t["cka_linear"])
    np.testing.assert_allclose(np.diag(cka), 1.0, rtol=1e-12)
    np.testing.assert_allclose(cka, cka.T)
    feats = collected["features"][1.0]
    assert cka[2, 9] == pytest.approx(linear_cka(feats["block_3"], feats["block_10"]), rel=1e-12)
    assert per_t["mutual_knn"][4] == pytest.approx(mutual_knn(feats["block_5"], collected["reference"], 10))
    assert per_t["cknna"][9] == pytest.approx(cknna(feats["block_10"], collected["reference"], 10))
    assert per_t["mutual_knn"][9] == pytest.approx(1.0)  # the reference is block 10 scaled
    json.dumps(out, allow_nan=False)


def test_without_a_reference_or_cka_those_numbers_are_absent_and_nan_becomes_null():
    collected = planted(num=60)
    del collected["reference"]
    collected["features"][1.0]["block_1"] = np.ones((60, 8))  # constant: CKA undefined
    out = measure_blocks(collected, 3)
    assert "cknna" not in out["per_t"][0] and "mutual_knn" not in out["per_t"][0]
    assert out["per_t"][1]["cka_linear"][0][1] is None
    json.dumps(out, allow_nan=False)
    assert "cka_linear" not in measure_blocks(collected, 3, cka=False)["per_t"][0]


@pytest.mark.parametrize("kwargs, match", [(dict(num_classes=2), r"outside \[0, 2\)"),
                                           (dict(num_classes=1), "at least 2 classes"),
                                           (dict(num_classes=3, k=300), "k=300")])
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        measure_blocks(planted(), kwargs.pop("num_classes"), **kwargs)


def test_figures_render_as_rgb():
    out = measure_blocks(planted(num=60), 3, k=5)
    heat = cka_figure(out["per_t"][0]["cka_linear"], out["blocks"], "cka")
    curve = probe_figure({"a": out["probe_accuracy_mean"], "b": [None] * 10}, out["blocks"], "probe", chance=1 / 3)
    for image in (heat, curve):
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
        assert image.std() > 10  # something was drawn


def test_measuring_one_t_at_a_time_and_merging_equals_measuring_all_at_once():
    from lsync_jax.eval.analysis import merge_measurements

    collected = planted(num=80)
    whole = measure_blocks(collected, 3, k=5)
    parts = [measure_blocks(dict(collected, features={t: f}), 3, k=5) for t, f in collected["features"].items()]
    assert merge_measurements(parts) == whole
    with pytest.raises(ValueError, match="differ in num_samples"):
        merge_measurements([parts[0], measure_blocks(planted(num=60), 3, k=5)])


def test_too_few_examples_for_k_neighbours_fail_before_the_passes(monkeypatch, alarm):
    """num_samples=10 passes the settings' own check, but k = 10 neighbours need 11 examples: said before
    any block pass (it failed after collecting every block's features)."""
    from lsync_jax.builders import build_model
    from lsync_jax.configs import tiny
    from lsync_jax.data import SyntheticSource
    from lsync_jax.eval import analysis

    def no_passes(*args, **kwargs):
        raise AssertionError("block passes started")

    monkeypatch.setattr(analysis, "collect_block_features", no_passes)
    config = tiny.get_config()
    source = SyntheticSource(10, tuple(config.data.synthetic_shape), num_classes=3, seed=0)
    settings = analysis.MeasureSettings(num_samples=10, k=10, t_values=(0.5,))
    with alarm(60), pytest.raises(ValueError, match=r"settings.k=10 nearest neighbours need 2 <= k <= N - 1 = 9"):
        analysis.measure_model(config, build_model(config), None, settings, reference=lambda x: x, source=source)
