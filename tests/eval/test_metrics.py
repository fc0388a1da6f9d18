"""Metrics against closed forms and brute-force re-implementations of ADM's evaluator."""

import warnings

import numpy as np
import pytest

from lsync_jax.eval.metrics import (
    RunningStats,
    frechet_distance,
    inception_score,
    manifold_radii,
    precision_recall,
)

# --- RunningStats ---------------------------------------------------------------------------


def test_running_stats_over_uneven_batches_match_numpy():
    rng = np.random.default_rng(0)
    rows = (3.0 + 2.0 * rng.standard_normal((1000, 16))).astype(np.float32)
    stats = RunningStats()
    for start, stop in [(0, 1), (1, 38), (38, 39), (39, 500), (500, 1000)]:
        stats.update(rows[start:stop])
    assert stats.count == 1000
    expected = rows.astype(np.float64)
    np.testing.assert_allclose(stats.mean(), expected.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.cov(), np.cov(expected, rowvar=False), rtol=1e-10, atol=1e-12)
    assert stats.mean().dtype == stats.cov().dtype == np.float64


def test_running_stats_merge_equals_one_stream():
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((300, 8)) + np.arange(8)
    single, first, second, empty = RunningStats(), RunningStats(), RunningStats(), RunningStats()
    single.update(rows)
    first.update(rows[:70])
    second.update(rows[70:150])
    second.update(rows[150:])
    first.merge(second)
    first.merge(empty)
    assert first.count == single.count == 300
    np.testing.assert_allclose(first.mean(), single.mean(), rtol=1e-12)
    np.testing.assert_allclose(first.cov(), single.cov(), rtol=1e-10, atol=1e-13)

    empty.merge(single)  # merging into fresh statistics copies them
    np.testing.assert_allclose(empty.cov(), single.cov(), rtol=1e-12)


def test_running_stats_rejects_bad_shapes_and_too_few_rows():
    stats = RunningStats()
    stats.update(np.zeros((1, 4)))
    with pytest.raises(ValueError, match=r"dim 4.*\(2, 5\)"):
        stats.update(np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"\[n, dim\]"):
        stats.update(np.zeros(4))
    with pytest.raises(ValueError, match="at least 2 rows, got 1"):
        stats.cov()
    with pytest.raises(ValueError, match="dim 4.*dim 3"):
        other = RunningStats(dim=3)
        stats.merge(other)
    with pytest.raises(ValueError, match="at least 1 row"):
        RunningStats().mean()


# --- FID ------------------------------------------------------------------------------------


def random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    factor = rng.standard_normal((dim, dim))
    return factor @ factor.T / dim + 0.1 * np.eye(dim)


def symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigvals, eigvecs = np.linalg.eigh(matrix)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0, None))) @ eigvecs.T


def test_fid_of_a_set_against_itself_is_zero():
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((500, 32))
    mu, sigma = rows.mean(axis=0), np.cov(rows, rowvar=False)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


def test_fid_of_diagonal_gaussians_matches_closed_form():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    var1, var2 = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    np.testing.assert_allclose(frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)), expected, rtol=1e-10)


def test_fid_of_full_covariances_matches_an_independent_route():
    rng = np.random.default_rng(4)
    dim = 24
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    sigma1, sigma2 = random_spd(rng, dim), random_spd(rng, dim)
    # tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), the latter symmetric PSD.
    root1 = symmetric_sqrt(sigma1)
    tr_covmean = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ sigma2 @ root1), 0, None)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean
    np.testing.assert_allclose(frechet_distance(mu1, sigma1, mu2, sigma2), expected, rtol=1e-9)
    # float32 inputs are promoted, not computed in float32
    np.testing.assert_allclose(
        frechet_distance(mu1, sigma1.astype(np.float32), mu2, sigma2.astype(np.float32)), expected, rtol=1e-5
    )


def test_fid_with_rank_deficient_covariances_is_finite():
    rng = np.random.default_rng(5)
    rows1, rows2 = rng.standard_normal((10, 32)), rng.standard_normal((12, 32))  # fewer rows than dims
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the eps retry may warn, as in ADM
        value = frechet_distance(rows1.mean(0), np.cov(rows1, rowvar=False), rows2.mean(0), np.cov(rows2, rowvar=False))
    assert np.isfinite(value) and value > 0


def test_fid_retries_with_eps_when_the_square_root_is_not_finite():
    # A nilpotent product has no square root (scipy returns inf); ADM warns and adds eps * I.
    nilpotent = np.array([[0.0, 1.0], [0.0, 0.0]])
    with pytest.warns(UserWarning, match="singular product"):
        value = frechet_distance(np.zeros(2), nilpotent, np.zeros(2), np.eye(2))
    assert np.isfinite(value)


def test_fid_sqrtm_emits_no_deprecation_or_linalg_warnings():
    rng = np.random.default_rng(6)
    sigma = random_spd(rng, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frechet_distance(np.zeros(8), sigma, np.ones(8), 2 * sigma)


def test_fid_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="mean vectors"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(3))
    with pytest.raises(ValueError, match="covariances have different shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="does not match mean shape"):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(4))


# --- Inception Score ------------------------------------------------------------------------


def adm_inception_score(preds: np.ndarray, split_size: int) -> float:
    """ADM's compute_inception_score after the softmax, verbatim in numpy."""
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def test_inception_score_of_uniform_and_one_hot_predictions():
    assert inception_score(np.full((100, 10), 0.1)) == pytest.approx(1.0, abs=1e-12)
    one_hot = np.eye(10)[np.arange(200) % 10]  # every class equally often, zeros elsewhere
    assert inception_score(one_hot) == pytest.approx(10.0, rel=1e-12)


def test_inception_score_averages_over_chunks_as_adm():
    chunks = [np.eye(4)[np.arange(4)], np.full((4, 4), 0.25), np.eye(4)[[0, 1]]]  # scores 4, 1, 2
    assert inception_score(np.concatenate(chunks), split_size=4) == pytest.approx(7.0 / 3.0, rel=1e-12)

    rng = np.random.default_rng(7)
    logits = 3.0 * rng.standard_normal((1000, 20))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    for split_size in (1000, 300, 7):
        assert inception_score(probs, split_size) == pytest.approx(adm_inception_score(probs, split_size), rel=1e-10)


def test_inception_score_rejects_logits_and_bad_shapes():
    with pytest.raises(ValueError, match="sums to"):
        inception_score(np.random.default_rng(8).standard_normal((5, 3)) ** 2)
    with pytest.raises(ValueError, match="shape"):
        inception_score(np.full(10, 0.1))
    with pytest.raises(ValueError, match="non-negative"):
        inception_score(np.array([[1.5, -0.5]]))


# --- Precision / recall ---------------------------------------------------------------------


def adm_precision_recall(ref: np.ndarray, samples: np.ndarray, k: int = 3) -> tuple[float, float]:
    """ADM's ManifoldEstimator with one block: full distance matrices and np.partition."""

    def distances(u, v):
        u, v = u.astype(np.float64), v.astype(np.float64)
        return np.maximum((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None, :], 0)

    radii_ref = np.partition(distances(ref, ref), k, axis=1)[:, k]
    radii_sample = np.partition(distances(samples, samples), k, axis=1)[:, k]
    ref_to_sample = distances(ref, samples)
    precision = np.any(ref_to_sample <= radii_ref[:, None], axis=0).mean()
    recall = np.any(ref_to_sample <= radii_sample[None, :], axis=1).mean()
    return float(precision), float(recall)


def test_manifold_radii_match_partition_with_blocks_and_padding():
    rng = np.random.default_rng(9)
    features = rng.standard_normal((300, 16)).astype(np.float32)
    f64 = features.astype(np.float64)
    full = np.maximum((f64**2).sum(1)[:, None] - 2 * f64 @ f64.T + (f64**2).sum(1)[None, :], 0)
    for k in (1, 3):
        expected = np.partition(full, k, axis=1)[:, k]
        radii = manifold_radii(features, k=k, block_size=64)
        assert radii.shape == (300,)
        np.testing.assert_allclose(radii, expected, rtol=1e-5)
    np.testing.assert_allclose(manifold_radii(features, block_size=64), manifold_radii(features), rtol=1e-6)


def test_identical_sets_give_full_precision_and_recall():
    features = np.random.default_rng(10).standard_normal((200, 32))
    assert precision_recall(features, features, block_size=64) == (1.0, 1.0)


def test_separated_clusters_give_zero_precision_and_recall():
    rng = np.random.default_rng(11)
    ref = rng.standard_normal((150, 16))
    samples = rng.standard_normal((120, 16)) + 100.0
    assert precision_recall(ref, samples, block_size=50) == (0.0, 0.0)


@pytest.mark.parametrize("shift", [0.0, 0.6])
def test_precision_recall_match_brute_force_adm(shift: float):
    rng = np.random.default_rng(12)
    ref = rng.standard_normal((300, 8)).astype(np.float32)
    samples = (1.3 * rng.standard_normal((217, 8)) + shift).astype(np.float32)
    expected = adm_precision_recall(ref, samples)
    got = precision_recall(ref, samples, block_size=64)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0.0 < got[0] < 1.0 and 0.0 < got[1] < 1.0


def test_shifted_copy_gives_partial_precision_and_recall():
    rng = np.random.default_rng(13)
    ref = rng.standard_normal((300, 8)).astype(np.float32)
    samples = ref[:217] + np.float32(0.5)  # a shifted copy of part of the set
    expected = adm_precision_recall(ref, samples)
    got = precision_recall(ref, samples, block_size=64)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0.0 < got[0] < 1.0 and 0.0 < got[1] < 1.0


def test_precision_recall_rejects_bad_inputs():
    features = np.zeros((10, 4))
    with pytest.raises(ValueError, match="feature dim"):
        precision_recall(features, np.zeros((10, 5)))
    with pytest.raises(ValueError, match=r"sample_features needs at least k \+ 1 = 4 rows.*got 3"):
        precision_recall(features, np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"ref_features must have shape \[n, dim\]"):
        precision_recall(np.zeros(10), features)
    with pytest.raises(ValueError, match="block_size"):
        precision_recall(features, features, block_size=3)


def test_eigh_route_agrees_with_adm_sqrtm():
    rng = np.random.default_rng(7)
    for n, d in ((400, 64), (30, 64)):  # full rank, then singular (fewer rows than dims)
        a = rng.normal(size=(n, d))
        b = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + 0.2
        args = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
        adm = frechet_distance(*args, method="sqrtm")
        fast = frechet_distance(*args, method="eigh")
        np.testing.assert_allclose(fast, adm, rtol=1e-6)
    with pytest.raises(ValueError, match="FID method"):
        frechet_distance(*args, method="svd")
