"""Representation measurements against their formulas, written out directly, and known properties."""

import itertools

import numpy as np
import pytest

from lsync_jax.eval.representations import (
    cka_matrix,
    cknna,
    hsic_unbiased,
    linear_cka,
    mutual_knn,
    pool_tokens,
    probe_blocks,
    probe_split,
    ridge_probe,
    unbiased_cka,
)


def _related(rng, n, d1=12, d2=20, noise=0.5):
    """Two representations of the same n samples: y is a nonlinear map of x plus noise."""
    x = rng.standard_normal((n, d1))
    y = np.tanh(x @ rng.standard_normal((d1, d2))) + noise * rng.standard_normal((n, d2))
    return x, y


def _orthogonal(rng, d):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


# --- direct, slow implementations of the formulas ---------------------------------------------


def _direct_linear_cka(x, y, centre=True):
    """Kornblith et al. eq. 5 written out: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)."""
    if centre:
        x = x - x.mean(axis=0)
        y = y - y.mean(axis=0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def _loop_hsic_unbiased(k, l):
    """Song et al. 2012 Theorem 3 with explicit loops over entries (kernels need not be symmetric)."""
    n = k.shape[0]
    kt = [[0.0 if i == j else k[i, j] for j in range(n)] for i in range(n)]
    lt = [[0.0 if i == j else l[i, j] for j in range(n)] for i in range(n)]
    trace = sum(kt[i][j] * lt[j][i] for i in range(n) for j in range(n))
    sum_k = sum(kt[i][j] for i in range(n) for j in range(n))
    sum_l = sum(lt[i][j] for i in range(n) for j in range(n))
    mixed = sum(kt[i][m] * lt[m][j] for i in range(n) for m in range(n) for j in range(n))
    return (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 * mixed / (n - 2)) / (n * (n - 3))


def _u_statistic_hsic(k, l):
    """HSIC's U-statistic over ordered distinct quadruples, the estimator Theorem 3 simplifies."""
    n = k.shape[0]
    total = sum(k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2.0 * k[i, j] * l[i, q]
                for i, j, q, r in itertools.permutations(range(n), 4))
    return total / (n * (n - 1) * (n - 2) * (n - 3))


def _loop_unbiased_cka(x, y):
    k, l = x @ x.T, y @ y.T
    return _loop_hsic_unbiased(k, l) / np.sqrt(_loop_hsic_unbiased(k, k) * _loop_hsic_unbiased(l, l))


def _neighbour_sets(x, k):
    """Cosine k-NN of every sample by sorting each row of similarities (self excluded)."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sets = []
    for i in range(x.shape[0]):
        others = sorted((j for j in range(x.shape[0]) if j != i), key=lambda j: -float(x[i] @ x[j]))
        sets.append(set(others[:k]))
    return sets


def _direct_cknna(x, y, k, eps=1e-6, symmetric_mask=False):
    """platonic-rep's cknna (unbiased, normalised features) from neighbour sets and loops."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    n = x.shape[0]
    kx, ky = x @ x.T, y @ y.T
    nx, ny = _neighbour_sets(x, k), _neighbour_sets(y, k)

    def mask(keep):
        m = np.array([[1.0 if keep(i, j) else 0.0 for j in range(n)] for i in range(n)])
        return np.maximum(m, m.T) if symmetric_mask else m

    m_xy = mask(lambda i, j: j in nx[i] and j in ny[i])
    m_x = mask(lambda i, j: j in nx[i])
    m_y = mask(lambda i, j: j in ny[i])
    cross = _loop_hsic_unbiased(m_xy * kx, m_xy * ky)
    return cross / (np.sqrt(_loop_hsic_unbiased(m_x * kx, m_x * kx) * _loop_hsic_unbiased(m_y * ky, m_y * ky)) + eps)


# --- linear CKA -------------------------------------------------------------------------------


@pytest.mark.parametrize("n, d", [(200, 16), (10, 64)])  # feature-space and Gram branches (N < D)
def test_linear_cka_of_itself_is_one(n, d):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, rng.standard_normal((n, d))) < 0.99  # an unrelated representation is not


def test_linear_cka_invariant_to_orthogonal_maps_and_isotropic_scaling_only():
    rng = np.random.default_rng(1)
    x, y = _related(rng, 300)
    base = linear_cka(x, y)
    assert linear_cka(x @ _orthogonal(rng, 12), y) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x, 7.5 * y @ _orthogonal(rng, 20)) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x + 3.0, y - 2.0) == pytest.approx(base, abs=1e-12)  # centred
    # A general invertible map (anisotropic scaling of the columns) changes it.
    stretch = np.diag(np.geomspace(0.05, 20.0, 12))
    assert np.linalg.matrix_rank(stretch) == 12
    assert abs(linear_cka(x @ stretch, y) - base) > 0.05


@pytest.mark.parametrize("n, d1, d2", [(150, 8, 30), (12, 40, 50)])
def test_linear_cka_matches_direct_formula(n, d1, d2):
    rng = np.random.default_rng(2)
    x, y = _related(rng, n, d1, d2)
    x, y = x + 1.5, y - 0.7  # non-zero means, so forgetting to centre would show
    expected = _direct_linear_cka(x, y)
    assert linear_cka(x, y) == pytest.approx(expected, rel=1e-12)
    assert linear_cka(x.astype(np.float32), y.astype(np.float32)) == pytest.approx(expected, rel=1e-5)
    assert abs(_direct_linear_cka(x, y, centre=False) - expected) > 1e-3


# --- unbiased CKA -----------------------------------------------------------------------------


def test_unbiased_hsic_closed_form_is_the_u_statistic():
    rng = np.random.default_rng(3)
    x, y = _related(rng, 7, 3, 4)
    k, l = x @ x.T, y @ y.T
    u = _u_statistic_hsic(k, l)
    assert hsic_unbiased(k, l) == pytest.approx(u, rel=1e-12)
    assert _loop_hsic_unbiased(k, l) == pytest.approx(u, rel=1e-12)


@pytest.mark.parametrize("n, d1, d2", [(9, 3, 5), (20, 30, 6)])
def test_unbiased_cka_matches_loop_formula(n, d1, d2):
    rng = np.random.default_rng(4)
    x, y = _related(rng, n, d1, d2)
    expected = _loop_unbiased_cka(x, y)
    assert unbiased_cka(x, y) == pytest.approx(expected, rel=1e-10)
    assert unbiased_cka(x + 4.0, y - 9.0) == pytest.approx(expected, rel=1e-9)  # HSIC_u is shift invariant
    assert abs(linear_cka(x, y) - expected) > 1e-3  # the biased estimator is a different number
    with pytest.raises(ValueError, match="n >= 4"):
        unbiased_cka(x[:3], y[:3])


def test_unbiased_cka_of_independent_features_is_near_zero_where_biased_is_not():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((100, 50)), rng.standard_normal((100, 50))
    assert abs(unbiased_cka(x, y)) < 0.05
    assert linear_cka(x, y) > 0.2  # biased CKA's D/N floor


@pytest.mark.parametrize("kind, pair", [("linear", linear_cka), ("unbiased", unbiased_cka)])
def test_cka_matrix_is_symmetric_with_unit_diagonal(kind, pair):
    rng = np.random.default_rng(6)
    x, y = _related(rng, 60, 10, 70)
    features = {"block_1": x, "block_2": y, "block_3": rng.standard_normal((60, 5)), "block_4": y[:, :9] ** 2}
    names, matrix = cka_matrix(features, kind=kind)
    assert names == list(features)
    np.testing.assert_array_equal(matrix, matrix.T)
    np.testing.assert_allclose(np.diag(matrix), 1.0, rtol=0, atol=1e-12)
    for i, j in itertools.combinations(range(4), 2):
        assert matrix[i, j] == pytest.approx(pair(features[names[i]], features[names[j]]), rel=1e-10)
    assert matrix[0, 1] > matrix[0, 2] + 0.1  # related blocks score above an unrelated one
    with pytest.raises(ValueError, match="kind"):
        cka_matrix(features, kind="rbf")


# --- linear probe -----------------------------------------------------------------------------


def _planted(rng, n, d=32, num_classes=5, scale=4.0):
    labels = rng.integers(0, num_classes, n)
    means = scale * rng.standard_normal((num_classes, d))
    return means[labels] + rng.standard_normal((n, d)), labels


def test_probe_recovers_planted_linear_signal():
    rng = np.random.default_rng(7)
    x, labels = _planted(rng, 1000)
    x = x * np.geomspace(1e-3, 1e3, 32) + 100.0  # badly scaled features: standardisation matters
    result = ridge_probe(x[:800], labels[:800], x[800:], labels[800:], num_classes=5)
    assert result["accuracy"] > 0.95
    assert result["train_accuracy"] > 0.95


def test_probe_scores_chance_on_noise():
    rng = np.random.default_rng(8)
    num_classes, n = 10, 3000
    x, labels = rng.standard_normal((n, 32)), rng.integers(0, num_classes, n)
    result = ridge_probe(x[:2400], labels[:2400], x[2400:], labels[2400:], num_classes)
    # 600 test samples: chance is 0.1 with a standard error of 0.012.
    assert abs(result["accuracy"] - 1.0 / num_classes) < 0.05
    # Scoring the train split instead would not be chance: the probe fits noise.
    assert result["train_accuracy"] > result["accuracy"] + 0.02


def _closed_form_reference(train_x, train_y, test_x, num_classes, l2):
    """Ridge with an unpenalised bias as one augmented least-squares solve."""
    mean, std = train_x.mean(0), train_x.std(0)
    a, b = (train_x - mean) / std, (test_x - mean) / std
    n, d = a.shape
    a1 = np.hstack([a, np.ones((n, 1))])
    penalty = np.diag(np.r_[np.full(d, l2 * n), 0.0])
    w = np.linalg.solve(a1.T @ a1 + penalty, a1.T @ np.eye(num_classes)[train_y])
    return np.argmax(np.hstack([b, np.ones((len(b), 1))]) @ w, axis=1)


@pytest.mark.parametrize("d", [20, 150])  # primal and dual (D > n) solves
def test_probe_matches_augmented_least_squares(d):
    rng = np.random.default_rng(9)
    x, labels = _planted(rng, 200, d=d, num_classes=4, scale=0.3)
    l2 = 0.05
    predicted = _closed_form_reference(x[:100], labels[:100], x[100:], 4, l2)
    result = ridge_probe(x[:100], labels[:100], x[100:], labels[100:], 4, l2=l2)
    assert result["accuracy"] == pytest.approx(np.mean(predicted == labels[100:]), abs=1e-12)
    assert 0.3 < result["accuracy"] < 1.0  # a hard enough problem that a wrong solve would show


def test_probe_blocks_share_one_deterministic_split():
    rng = np.random.default_rng(10)
    x, labels = _planted(rng, 600, d=16, num_classes=4, scale=0.35)
    blocks = {"block_1": x, "block_2": x.copy(), "block_3": rng.standard_normal((600, 16))}
    first = probe_blocks(blocks, labels, num_classes=4, seed=3)
    assert first["block_1"] == first["block_2"]
    assert 0.4 < first["block_1"]["accuracy"] < 0.95  # neither trivial nor chance, so splits matter
    assert probe_blocks(blocks, labels, num_classes=4, seed=3) == first
    # The split is what makes them equal: other seeds move the accuracy.
    others = {probe_blocks({"b": x}, labels, 4, seed=s)["b"]["accuracy"] for s in range(4, 9)}
    assert len(others | {first["block_1"]["accuracy"]}) > 1
    train, test = probe_split(600, 0.2, seed=3)
    assert len(test) == 120 and len(np.union1d(train, test)) == 600 and not np.intersect1d(train, test).size


# --- nearest-neighbour alignment --------------------------------------------------------------


def test_mutual_knn_is_one_for_identical_and_chance_for_independent():
    rng = np.random.default_rng(11)
    n, k = 400, 10
    x = rng.standard_normal((n, 16))
    assert mutual_knn(x, x, k) == 1.0
    assert mutual_knn(x, 3.0 * x @ _orthogonal(rng, 16), k) == 1.0  # cosine neighbours
    independent = mutual_knn(x, rng.standard_normal((n, 16)), k)
    assert abs(independent - k / (n - 1)) < 0.01
    assert independent < 0.1


def test_mutual_knn_matches_neighbour_sets():
    rng = np.random.default_rng(12)
    x, y = _related(rng, 40, 6, 8, noise=1.0)
    k = 5
    nx, ny = _neighbour_sets(x, k), _neighbour_sets(y, k)
    expected = np.mean([len(a & b) / k for a, b in zip(nx, ny)])
    assert 0.05 < expected < 0.95
    assert mutual_knn(x, y, k) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="k must"):
        mutual_knn(x, y, 40)


def test_cknna_matches_direct_implementation():
    rng = np.random.default_rng(13)
    x, y = _related(rng, 14, 5, 7, noise=0.8)
    k = 4
    expected = _direct_cknna(x, y, k)
    assert cknna(x, y, k) == pytest.approx(expected, rel=1e-10)
    assert cknna(x, y, k, eps=0.0) == pytest.approx(_direct_cknna(x, y, k, eps=0.0), rel=1e-10)
    # The row-wise (asymmetric) mutual-neighbour mask is part of the definition.
    assert abs(_direct_cknna(x, y, k, symmetric_mask=True) - expected) > 1e-3
    with pytest.raises(ValueError, match="k must"):
        cknna(x, y, 1)


def test_cknna_with_all_neighbours_is_unbiased_cka_of_normalised_features():
    rng = np.random.default_rng(14)
    x, y = _related(rng, 50, 8, 6)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    assert cknna(x, y, 49, eps=0.0) == pytest.approx(unbiased_cka(unit(x), unit(y)), rel=1e-10)
    assert abs(cknna(x, y, 10, eps=0.0) - cknna(x, y, 49, eps=0.0)) > 1e-3  # restricting to neighbours matters


def test_pool_tokens_means_over_tokens():
    h = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    pooled = np.asarray(pool_tokens(h))
    assert pooled.shape == (2, 4)
    np.testing.assert_allclose(pooled, h.mean(axis=1))
    assert not np.allclose(pooled, h.mean(axis=2)[:, :1])
    with pytest.raises(ValueError, match="N, T, D"):
        pool_tokens(h[0])


def test_multilabel_probe_reads_tags_that_the_features_carry():
    from lsync_jax.eval.representations import average_precision, probe_blocks

    rng = np.random.default_rng(0)
    tags = (rng.random((200, 4)) < 0.3).astype(np.float32)
    informative = tags @ rng.standard_normal((4, 16)) + 0.1 * rng.standard_normal((200, 16))
    noise = rng.standard_normal((200, 16))
    result = probe_blocks({"block_1": noise, "block_2": informative}, tags, num_classes=4)
    assert result["block_2"]["accuracy"] > 0.95 > 0.6 > result["block_1"]["accuracy"]
    assert average_precision(tags, tags) == 1.0  # a perfect ranking
    assert np.isnan(average_precision(np.zeros((3, 1)), np.ones((3, 1))))  # no negative: no AP
