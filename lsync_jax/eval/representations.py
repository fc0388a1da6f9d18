"""Representation measurements for sown block features: CKA, linear probes, kNN alignment.

Every function is pure and takes features already pulled to the host: rows are samples,
columns are feature dimensions. A block's sown output is (N, T, D) tokens; `pool_tokens`
averages the tokens into the (N, D) vector the other functions expect.

Definitions (X is N x D1, Y is N x D2, rows paired by sample):

- **Linear CKA** (Kornblith et al. 2019, "Similarity of Neural Network Representations
  Revisited", eq. 5 and Sec. 3): with column-centred X and Y,
  CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F). It equals the biased HSIC estimator
  with linear kernels, tr(K H L H) / sqrt(tr(K H K H) tr(L H L H)), K = X X^T, L = Y Y^T,
  H = I - 11^T/N. Invariant to orthogonal transforms and isotropic scaling of either side,
  not to general invertible linear maps.
- **Unbiased CKA** (Song et al. 2012, JMLR 13, Theorem 3; Nguyen et al. 2021, "Do Wide and Deep
  Networks Learn the Same Things?", eq. 3): with the Gram diagonals zeroed (K~, L~),
  HSIC_u(K, L) = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1]
  / (n (n-3)), and CKA_u = HSIC_u(K, L) / sqrt(HSIC_u(K, K) HSIC_u(L, L)). Needs n >= 4. It is
  the U-statistic of HSIC, so it is exactly invariant to translating the features (no
  centring needed); it is not bounded by [0, 1] and can be slightly negative for unrelated
  features, where the biased CKA is pulled up towards a positive floor by D/N.
- **Mutual k-NN** (Huh et al. 2024, "The Platonic Representation Hypothesis", Sec. 2 / App. A):
  mean over samples i of |NN_k^X(i) ∩ NN_k^Y(i)| / k, neighbours by cosine similarity, a sample
  never its own neighbour. Chance level for unrelated representations is k / (N - 1).
- **CKNNA** (Huh et al. 2024, eq. in App. A; the implementation `AlignmentMetrics.cknna` in
  minyoungg/platonic-rep `metrics.py`, commit dcd76ba3, with its defaults `unbiased=True`,
  `distance_agnostic=False`, features L2-normalised as `measure_alignment.compute_score` does
  with `normalize=True`). With K = X X^T, L = Y Y^T on the normalised rows:
  M_K[i, j] = 1 if j is among the k largest entries of row i of K with its diagonal excluded,
  likewise M_L, and M = M_K * M_L (elementwise; M is not symmetric);
  sim(K, L) = HSIC_u(M * K, M * L), using the HSIC_u above with tr(A~ B~) = sum(A~ * B~^T)
  and 1^T A~ B~ 1 as written (the masked matrices are not symmetric, so the order matters);
  CKNNA = sim(K, L) / (sqrt(sim(K, K) sim(L, L)) + eps), where sim(K, K) uses M = M_K and
  eps = 1e-6 as in the reference (eps=0 gives the ratio itself; with normalised features and
  small k/N the sims are O(k/N), so eps is not negligible for large N: keep the default when
  comparing with published numbers). With k = N - 1 every pair is kept and CKNNA equals
  unbiased CKA of the normalised features (up to eps). The reference also clips each feature
  tensor at its 0.95 quantile of |value| before measuring (`prepare_features`); that is a
  preprocessing step, not part of the metric, and is not done here.
- **Ridge probe**: standardise features with the train split's mean and std (a dimension with
  zero train std is left unscaled), then minimise (1/n) ||X W + 1 b^T - Y||_F^2 + l2 ||W||_F^2
  over W and an unpenalised bias b, Y the one-hot labels. Since the standardised train X has
  zero column means, b = mean(Y) and W = (X^T X / n + l2 I)^{-1} X^T (Y - 1 b^T) / n, solved in
  the primal (D x D) or the dual (n x n, by the push-through identity) whichever is smaller.
  Predictions are argmax over classes (ties to the lower class index). `probe_blocks` draws
  one seeded permutation and applies the same train/test split to every block.

Numerics: everything except `pool_tokens` runs in float64 NumPy on the host. These are O(N^2 D)
or O(N D^2) reductions on a few thousand samples; float64 keeps CKA ratios of nearly equal
quantities (and the differences inside HSIC_u) exact to ~1e-12, which JAX on default settings
(float32, x64 disabled) would not. The cross term ||Y^T X||_F^2 is computed in feature space
(O(N D1 D2)) or from Grams (O(N^2 (D1 + D2))), whichever costs less; unbiased HSIC with linear
kernels is computed Gram-free from the same cross term plus O(N D) row statistics. Constant
features (zero HSIC) give NaN rather than a division warning. Neighbour ties are broken
towards the lower sample index (stable sort); the reference uses torch.topk / argsort, so on
exactly tied similarities the neighbour sets may differ.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["cka_matrix", "cknna", "hsic_unbiased", "linear_cka", "mutual_knn", "pool_tokens",
           "probe_blocks", "probe_split", "ridge_probe", "unbiased_cka"]


@jax.jit
def pool_tokens(h: jax.Array) -> jax.Array:
    """Mean over tokens: (N, T, D) block features -> (N, D), in the input's dtype."""
    if h.ndim != 3:
        raise ValueError(f"expected (N, T, D) tokens, got shape {h.shape}")
    return jnp.mean(h, axis=1)


def _as_rows(x, name: str = "x") -> np.ndarray:
    """Features as a float64 (N, D) host array."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be (N, D) features, got shape {x.shape}; pool tokens first")
    return x


def _paired(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_rows(x, "x"), _as_rows(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same samples, got {x.shape[0]} and {y.shape[0]} rows")
    return x, y


def _centre(x: np.ndarray) -> np.ndarray:
    return x - x.mean(axis=0, keepdims=True)


def _cross(x: np.ndarray, y: np.ndarray) -> float:
    """||Y^T X||_F^2 = tr(X X^T Y Y^T), from the features or the Grams, whichever is cheaper."""
    n, d1 = x.shape
    d2 = y.shape[1]
    if d1 * d2 <= n * (d1 + d2):
        return float(np.sum(np.square(y.T @ x)))
    return float(np.sum((x @ x.T) * (y @ y.T)))


def _ratio(cross: float, self_x: float, self_y: float, eps: float = 0.0) -> float:
    if self_x <= 0.0 or self_y <= 0.0:
        return float("nan")  # a constant representation has no HSIC to normalise by
    return cross / (np.sqrt(self_x * self_y) + eps)


def linear_cka(x, y) -> float:
    """Linear CKA (Kornblith et al. 2019) of (N, D1) and (N, D2) features, in float64."""
    x, y = _paired(x, y)
    x, y = _centre(x), _centre(y)
    return _ratio(_cross(x, y), _cross(x, x), _cross(y, y))


def hsic_unbiased(k, l) -> float:
    """Song et al.'s unbiased HSIC of two n x n kernel matrices (need not be symmetric), n >= 4.

    [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n (n-3)),
    K~ and L~ the matrices with zeroed diagonals. O(n^2): 1^T K~ L~ 1 = colsum(K~) . rowsum(L~).
    """
    k = np.array(k, dtype=np.float64)
    l = np.array(l, dtype=np.float64)
    n = k.shape[0]
    if k.shape != (n, n) or l.shape != (n, n):
        raise ValueError(f"expected two square kernels of one size, got {k.shape} and {l.shape}")
    if n < 4:
        raise ValueError(f"unbiased HSIC needs n >= 4 samples, got {n}")
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    trace = np.sum(k * l.T)
    sums = k.sum() * l.sum() / ((n - 1) * (n - 2))
    mixed = k.sum(axis=0) @ l.sum(axis=1)
    return float((trace + sums - 2.0 * mixed / (n - 2)) / (n * (n - 3)))


class _LinearStats:
    """Per-representation terms of the Gram-free unbiased HSIC for linear kernels.

    With K = X X^T: diag(K) = row norms^2, rowsum(K~) = X (sum of rows) - diag(K),
    1^T K~ 1 = ||sum of rows||^2 - tr K. Features are centred first (HSIC_u is translation
    invariant) so the subtractions below cancel less.
    """

    def __init__(self, x: np.ndarray):
        self.x = _centre(x)
        self.diag = np.sum(np.square(self.x), axis=1)
        total = self.x.sum(axis=0)
        self.rowsum = self.x @ total - self.diag
        self.sum = float(total @ total - self.diag.sum())


def _hsic_unbiased_linear(a: _LinearStats, b: _LinearStats) -> float:
    n = a.x.shape[0]
    trace = _cross(a.x, b.x) - float(a.diag @ b.diag)
    sums = a.sum * b.sum / ((n - 1) * (n - 2))
    mixed = float(a.rowsum @ b.rowsum)
    return (trace + sums - 2.0 * mixed / (n - 2)) / (n * (n - 3))


def _linear_stats(x) -> _LinearStats:
    x = _as_rows(x)
    if x.shape[0] < 4:
        raise ValueError(f"unbiased CKA needs n >= 4 samples, got {x.shape[0]}")
    return _LinearStats(x)


def unbiased_cka(x, y) -> float:
    """CKA with Song et al.'s unbiased HSIC and linear kernels (Nguyen et al. 2021); n >= 4."""
    x, y = _paired(x, y)
    a, b = _linear_stats(x), _linear_stats(y)
    return _ratio(_hsic_unbiased_linear(a, b), _hsic_unbiased_linear(a, a), _hsic_unbiased_linear(b, b))


def cka_matrix(features: Mapping[str, object], kind: str = "linear") -> tuple[list[str], np.ndarray]:
    """CKA between every pair of named (N, D_i) representations: (names, B x B float64 matrix).

    Names keep the mapping's order. The matrix is symmetric by construction; its diagonal is 1
    up to float64 rounding (NaN for a constant representation). Per-block terms are computed
    once; each pair then costs one cross term.
    """
    if kind not in ("linear", "unbiased"):
        raise ValueError(f"kind must be 'linear' or 'unbiased', got {kind!r}")
    names = list(features)
    if kind == "linear":
        stats = [_centre(_as_rows(features[name], name)) for name in names]
        pair = _cross
    else:
        stats = [_linear_stats(features[name]) for name in names]
        pair = _hsic_unbiased_linear
    rows = {s.shape[0] if kind == "linear" else s.x.shape[0] for s in stats}
    if len(rows) > 1:
        raise ValueError(f"all representations must have the same samples, got row counts {sorted(rows)}")
    self_terms = [pair(s, s) for s in stats]
    matrix = np.empty((len(names), len(names)), dtype=np.float64)
    for i in range(len(names)):
        for j in range(i, len(names)):
            value = _ratio(pair(stats[i], stats[j]), self_terms[i], self_terms[j])
            matrix[i, j] = matrix[j, i] = value
    return names, matrix


# --- Linear probe ---------------------------------------------------------------------------


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 0.0, std, 1.0)
    return (train - mean) / std, (test - mean) / std


def _ridge(x: np.ndarray, targets: np.ndarray, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """(weights, bias) of (1/n) ||X W + 1 b^T - Y||_F^2 + l2 ||W||_F^2, the bias unpenalised; solved in
    the smaller of the feature and sample dimensions."""
    n, d = x.shape
    bias = targets.mean(axis=0)
    centred = targets - bias
    if d <= n:
        return np.linalg.solve(x.T @ x / n + l2 * np.eye(d), x.T @ centred / n), bias
    return x.T @ np.linalg.solve(x @ x.T / n + l2 * np.eye(n), centred / n), bias


def ridge_probe(train_x, train_y, test_x, test_y, num_classes: int, l2: float = 1e-3) -> dict[str, float]:
    """Closed-form ridge regression onto one-hot labels; accuracy of its argmax on both splits.

    Features are standardised with the train split's statistics; the bias is not penalised.
    Objective: (1/n) ||X W + 1 b^T - Y||_F^2 + l2 ||W||_F^2 (see the module docstring).
    Deterministic: no randomness, float64 throughout.
    """
    if l2 <= 0.0:
        raise ValueError(f"l2 must be positive, got {l2}")
    train_x, test_x = _as_rows(train_x, "train_x"), _as_rows(test_x, "test_x")
    train_y = np.asarray(train_y).astype(np.int64).reshape(-1)
    test_y = np.asarray(test_y).astype(np.int64).reshape(-1)
    if train_x.shape[0] != train_y.shape[0] or test_x.shape[0] != test_y.shape[0]:
        raise ValueError("features and labels must have the same number of rows")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train and test features differ in width: {train_x.shape[1]} vs {test_x.shape[1]}")
    for labels in (train_y, test_y):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes})")
    train_x, test_x = _standardise(train_x, test_x)
    weights, bias = _ridge(train_x, np.eye(num_classes, dtype=np.float64)[train_y], l2)

    def accuracy(x: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(np.argmax(x @ weights + bias, axis=1) == y)) if y.size else float("nan")

    return {"accuracy": accuracy(test_x, test_y), "train_accuracy": accuracy(train_x, train_y)}


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean over tags (columns with a positive and a negative) of each tag's average precision: the
    usual multi-label tagging score (MTG-Jamendo's PR-AUC); a tag's chance level is its positive rate."""
    values = []
    for j in range(targets.shape[1]):
        positives = targets[:, j] > 0.5
        if not positives.any() or positives.all():
            continue
        order = np.argsort(-scores[:, j], kind="stable")
        hits = positives[order]
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        values.append(float(np.sum(precision[hits]) / hits.sum()))
    return float(np.mean(values)) if values else float("nan")


def ridge_probe_multilabel(train_x, train_t, test_x, test_t, l2: float = 1e-3) -> dict[str, float]:
    """Closed-form ridge regression onto multi-hot tags (as `ridge_probe`, one output per tag); its
    score on both splits is the mean average precision (`average_precision`), reported as 'accuracy'
    so that the per-block curves and the pair selector read it as they read class accuracy."""
    if l2 <= 0.0:
        raise ValueError(f"l2 must be positive, got {l2}")
    train_x, test_x = _standardise(_as_rows(train_x, "train_x"), _as_rows(test_x, "test_x"))
    train_t, test_t = np.asarray(train_t, np.float64), np.asarray(test_t, np.float64)
    if train_x.shape[0] != train_t.shape[0] or test_x.shape[0] != test_t.shape[0]:
        raise ValueError("features and tags must have the same number of rows")
    weights, bias = _ridge(train_x, train_t, l2)
    return {"accuracy": average_precision(test_x @ weights + bias, test_t),
            "train_accuracy": average_precision(train_x @ weights + bias, train_t)}


def probe_split(num_samples: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, test) index arrays: a permutation's first round(f N) samples are the test set."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    num_test = int(round(test_fraction * num_samples))
    if not 0 < num_test < num_samples:
        raise ValueError(f"{num_samples} samples leave an empty split at test_fraction={test_fraction}")
    order = np.random.default_rng(seed).permutation(num_samples)
    return np.sort(order[num_test:]), np.sort(order[:num_test])


def probe_blocks(features_by_block: Mapping[str, object], labels, num_classes: int,
                 test_fraction: float = 0.2, seed: int = 0, l2: float = 1e-3) -> dict[str, dict[str, float]]:
    """Ridge-probe accuracy of every block on one seeded train/test split shared by all blocks;
    `labels` (N, T) multi-hot tags get the multi-label probe (mean average precision)."""
    labels = np.asarray(labels)
    multilabel = labels.ndim == 2
    labels = labels if multilabel else labels.reshape(-1)
    train, test = probe_split(labels.shape[0], test_fraction, seed)
    results = {}
    for name, feats in features_by_block.items():
        feats = _as_rows(feats, name)
        if feats.shape[0] != labels.shape[0]:
            raise ValueError(f"block {name!r} has {feats.shape[0]} rows for {labels.shape[0]} labels")
        results[name] = (ridge_probe_multilabel(feats[train], labels[train], feats[test], labels[test], l2)
                         if multilabel else
                         ridge_probe(feats[train], labels[train], feats[test], labels[test], num_classes, l2))
    return results


# --- Nearest-neighbour alignment (Huh et al. 2024) -------------------------------------------


def _normalise_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.finfo(np.float64).tiny)


def _knn_mask(similarity: np.ndarray, k: int) -> np.ndarray:
    """M[i, j] = 1 where j is among the k most similar to i, never i itself; ties to lower j."""
    scores = similarity.copy()
    np.fill_diagonal(scores, -np.inf)
    neighbours = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    mask = np.zeros_like(scores)
    np.put_along_axis(mask, neighbours, 1.0, axis=1)
    return mask


def _check_k(n: int, k: int, least: int = 1) -> None:
    if not least <= k <= n - 1:
        raise ValueError(f"k must lie in [{least}, N - 1 = {n - 1}], got {k}")


def mutual_knn(x, y, k: int) -> float:
    """Mean fraction of each sample's k cosine nearest neighbours shared by X and Y (self excluded)."""
    x, y = _paired(x, y)
    _check_k(x.shape[0], k)
    x, y = _normalise_rows(x), _normalise_rows(y)
    overlap = _knn_mask(x @ x.T, k) * _knn_mask(y @ y.T, k)
    return float(np.mean(overlap.sum(axis=1) / k))


def cknna(x, y, k: int, normalize: bool = True, eps: float = 1e-6) -> float:
    """Centred kernel nearest-neighbour alignment, as platonic-rep's `AlignmentMetrics.cknna`.

    Unbiased HSIC of the linear kernels restricted to mutual k-NN pairs, normalised by each
    side's own restricted HSIC (formula in the module docstring). `normalize` L2-normalises
    rows first, as the reference's measuring script does; k >= 2 as the reference requires.
    """
    x, y = _paired(x, y)
    n = x.shape[0]
    if n < 4:
        raise ValueError(f"CKNNA needs n >= 4 samples, got {n}")
    _check_k(n, k, least=2)
    if normalize:
        x, y = _normalise_rows(x), _normalise_rows(y)
    kx, ky = x @ x.T, y @ y.T
    mask_x, mask_y = _knn_mask(kx, k), _knn_mask(ky, k)

    def similarity(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
        return hsic_unbiased(mask * a, mask * b)

    cross = similarity(kx, ky, mask_x * mask_y)
    self_x = similarity(kx, kx, mask_x)
    self_y = similarity(ky, ky, mask_y)
    return _ratio(cross, self_x, self_y, eps)
