"""Sample-quality metrics on Inception features: FID, Inception Score, precision and recall.

Every definition follows ADM's evaluator (openai/guided-diffusion, `evaluations/evaluator.py`),
so numbers are comparable with the papers that report it:

- FID: Frechet distance between Gaussians fitted to pool features, |mu1 - mu2|^2
  + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), with ADM's eps-retry for singular products and its
  tolerance on imaginary parts (`FIDStatistics.frechet_distance`).
- Inception Score: exp E_x KL(p(y|x) || p(y)), averaged over consecutive chunks of 5000 samples
  (`compute_inception_score`).
- Precision / recall (Kynkaanniemi et al. 2019, k = 3): a sample counts as realistic if it falls
  inside the k-NN ball of some reference point, a reference point counts as covered if it falls
  inside the k-NN ball of some sample; distances are squared Euclidean (`ManifoldEstimator`).

Mean and covariance are accumulated on the host in float64 (`RunningStats`), so 50k x 2048
features never have to be held at once and the covariance does not lose digits to float32
sums. Pairwise distances for precision/recall run in JAX, in float32 blocks of
block_size x block_size, so a 50k x 50k matrix never materialises. ADM computes those distances
in float16 first and falls back to float32 only when float16 overflows; we use float32
throughout, which can flip points lying within float16 rounding of a ball's edge.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import scipy
from scipy import linalg, special

# SciPy 1.16 deprecated sqrtm's `disp` (and its error estimate); earlier versions print to stdout
# for singular inputs unless disp=False.
_SQRTM_HAS_DISP = tuple(int(part) for part in scipy.__version__.split(".")[:2]) < (1, 16)


class RunningStats:
    """Streaming mean and covariance of feature rows, merged exactly (Chan et al.) in float64.

    Each batch contributes its own mean and centred scatter, so the result equals np.mean and
    np.cov(rows, rowvar=False) of all rows up to float64 rounding, whatever the batch sizes.
    """

    def __init__(self, dim: int | None = None):
        self._dim = dim
        self._count = 0
        self._mean: np.ndarray | None = None
        self._scatter: np.ndarray | None = None  # sum of outer products of centred rows

    @property
    def count(self) -> int:
        """Number of rows seen."""
        return self._count

    @property
    def dim(self) -> int | None:
        """Feature dimension, fixed by the constructor or the first batch."""
        return self._dim

    def _check_dim(self, dim: int, what: str) -> None:
        if self._dim is None:
            self._dim = dim
        elif dim != self._dim:
            raise ValueError(f"RunningStats holds features of dim {self._dim}, got {what}")

    def _combine(self, count: int, mean: np.ndarray, scatter: np.ndarray) -> None:
        if count == 0:
            return
        if self._count == 0:
            self._count, self._mean, self._scatter = count, mean.copy(), scatter.copy()
            return
        total = self._count + count
        delta = mean - self._mean
        self._mean = self._mean + delta * (count / total)
        self._scatter = self._scatter + scatter + np.outer(delta, delta) * (self._count * count / total)
        self._count = total

    def update(self, features: np.ndarray) -> None:
        """Add a batch of rows, shape [n, dim], any float dtype."""
        features = np.asarray(features)
        if features.ndim != 2:
            raise ValueError(f"RunningStats.update expects features of shape [n, dim], got {features.shape}")
        self._check_dim(features.shape[1], f"a batch of shape {features.shape}")
        if features.shape[0] == 0:
            return
        features = features.astype(np.float64)
        mean = features.mean(axis=0)
        centred = features - mean
        self._combine(features.shape[0], mean, centred.T @ centred)

    def merge(self, other: RunningStats) -> None:
        """Fold `other`'s rows into these statistics, as if they had been streamed here."""
        if other.dim is not None:
            self._check_dim(other.dim, f"RunningStats of dim {other.dim}")
        if other.count:
            self._combine(other._count, other._mean, other._scatter)

    def mean(self) -> np.ndarray:
        """Mean row, shape [dim], float64."""
        if self._count == 0:
            raise ValueError("RunningStats.mean needs at least 1 row, got 0")
        return self._mean.copy()

    def cov(self) -> np.ndarray:
        """Unbiased covariance (N - 1, as np.cov), shape [dim, dim], float64."""
        if self._count < 2:
            raise ValueError(f"RunningStats.cov needs at least 2 rows, got {self._count}")
        return self._scatter / (self._count - 1)


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    """scipy's matrix square root without its version-dependent warnings or stdout prints.

    Callers check finiteness themselves, as ADM does with the error estimate discarded.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        if _SQRTM_HAS_DISP:
            root, _ = linalg.sqrtm(matrix, disp=False)
        else:
            root = linalg.sqrtm(matrix)
    return np.asarray(root)


FID_METHODS = ("sqrtm", "eigh")


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrt(S1 S2) for symmetric PSD S1, S2 through symmetric eigendecompositions.

    S1 S2 is similar to R S2 R with R = S1^(1/2), which is symmetric PSD, so the trace is the sum
    of the square roots of its (clipped non-negative) eigenvalues: no complex Schur form, no
    singular-product retry, and about 10x faster than sqrtm at 2048 dimensions.
    """
    w, v = linalg.eigh(sigma1)
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = root @ sigma2 @ root
    eig = linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(eig, 0.0, None)).sum())


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6,
    method: str = "sqrtm",
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), as ADM's FIDStatistics, in float64.

    method='sqrtm' is ADM's computation (scipy's matrix square root, eps retry); 'eigh' computes
    the same trace through symmetric eigendecompositions, which agrees to 1e-6 relative or better
    in the tests (full-rank and singular statistics), and is what the training loop uses.
    """
    if method not in FID_METHODS:
        raise ValueError(f"FID method {method!r}; expected one of {FID_METHODS}")
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"mean vectors must be 1-D of equal length, got {mu1.shape} and {mu2.shape}")
    if sigma1.shape != sigma2.shape:
        raise ValueError(f"covariances have different shapes: {sigma1.shape} and {sigma2.shape}")
    if sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"covariance shape {sigma1.shape} does not match mean shape {mu1.shape}")

    diff = mu1 - mu2
    if method == "eigh":
        return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2)
                     - 2 * _trace_sqrt_product(sigma1, sigma2))
    # The product of two covariances may be almost singular.
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))

    # Numerical error may leave a slight imaginary component.
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrt(sigma1 sigma2) has imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real

    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(probs: np.ndarray, split_size: int = 5000) -> float:
    """Inception Score of softmax outputs [n, num_classes]: exp E KL(p(y|x) || p(y)), averaged over chunks.

    As ADM, chunks are consecutive runs of `split_size` rows (the last may be shorter) and the
    score is the plain mean over chunks. Where ADM's np.log makes 0 * log 0 a NaN, we take it
    as 0 (its limit), so exactly-zero probabilities are allowed. Computed in float64.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"inception_score expects probabilities of shape [n > 0, num_classes], got {probs.shape}")
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    if not np.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("inception_score expects finite, non-negative probabilities (softmax outputs)")
    row_sums = probs.sum(axis=1)
    if not np.allclose(row_sums, 1.0, atol=1e-3):
        worst = int(np.argmax(np.abs(row_sums - 1.0)))
        raise ValueError(
            f"inception_score expects rows summing to 1 (softmax outputs, not logits); row {worst} sums to "
            f"{row_sums[worst]}"
        )

    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start : start + split_size]
        marginal = np.mean(part, axis=0, keepdims=True)
        kl = special.xlogy(part, part) - special.xlogy(part, marginal)
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


def _squared_distances(rows: jax.Array, cols: jax.Array) -> jax.Array:
    """max(|u|^2 - 2 u.v + |v|^2, 0) for every (row, col) pair, in float32."""
    row_norms = jnp.sum(jnp.square(rows), axis=1)[:, None]
    col_norms = jnp.sum(jnp.square(cols), axis=1)[None, :]
    inner = jnp.matmul(rows, cols.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(row_norms - 2 * inner + col_norms, 0.0)


@functools.partial(jax.jit, static_argnames="num_smallest")
def _smallest_distances(rows: jax.Array, col_blocks: jax.Array, col_valid: jax.Array, num_smallest: int) -> jax.Array:
    """The `num_smallest` smallest squared distances from each row to all valid columns, ascending.

    col_blocks [num_blocks, block, dim] is scanned one block at a time, keeping a running top-k,
    so only a [rows, block] distance matrix exists at once. Padded columns are +inf.
    """

    def merge_block(best: jax.Array, block: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        cols, valid = block
        distances = jnp.where(valid[None, :], _squared_distances(rows, cols), jnp.inf)
        candidates = jnp.concatenate([best, -jax.lax.top_k(-distances, num_smallest)[0]], axis=1)
        return -jax.lax.top_k(-candidates, num_smallest)[0], None

    init = jnp.full((rows.shape[0], num_smallest), jnp.inf, dtype=jnp.float32)
    best, _ = jax.lax.scan(merge_block, init, (col_blocks, col_valid))
    return best


@jax.jit
def _ball_membership(
    rows: jax.Array, row_radii: jax.Array, col_blocks: jax.Array, col_radii: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """For one block of rows against all column blocks: (row inside some column's ball [rows],
    column inside some row's ball [num_blocks, block]). Padded entries carry radius -inf, so no
    distance falls inside their balls; their own flags are sliced off by the caller."""

    def test_block(row_in: jax.Array, block: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        cols, radii = block
        distances = _squared_distances(rows, cols)
        row_in = row_in | jnp.any(distances <= radii[None, :], axis=1)
        col_in = jnp.any(distances <= row_radii[:, None], axis=0)
        return row_in, col_in

    init = jnp.zeros(rows.shape[0], dtype=bool)
    return jax.lax.scan(test_block, init, (col_blocks, col_radii))


def _blocked(values: np.ndarray, block: int, fill: float) -> tuple[np.ndarray, np.ndarray]:
    """Pad the leading axis to a multiple of `block` with `fill` and split it into
    [num_blocks, block, ...]; also return the validity mask [num_blocks, block]."""
    num_blocks = math.ceil(len(values) / block)
    padded = np.full((num_blocks * block, *values.shape[1:]), fill, dtype=values.dtype)
    padded[: len(values)] = values
    valid = np.arange(num_blocks * block) < len(values)
    return padded.reshape(num_blocks, block, *values.shape[1:]), valid.reshape(num_blocks, block)


def _check_features(features: np.ndarray, name: str, k: int) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"{name} must have shape [n, dim], got {features.shape}")
    if features.shape[0] < k + 1:
        raise ValueError(f"{name} needs at least k + 1 = {k + 1} rows for k-NN radii, got {features.shape[0]}")
    return features.astype(np.float32)


def _check_k_and_block(k: int, block_size: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if block_size < k + 1:
        raise ValueError(f"block_size must be >= k + 1 = {k + 1}, got {block_size}")


def manifold_radii(features: np.ndarray, k: int = 3, block_size: int = 10000) -> np.ndarray:
    """Squared distance from each row to its k-th nearest other row, shape [n], float32.

    As ADM's `np.partition(d, k)[:, k]` over the row's distances to the whole set: the row itself
    (distance 0) is the first of the k + 1 smallest.
    """
    _check_k_and_block(k, block_size)
    features = _check_features(features, "features", k)
    block = min(block_size, len(features))
    col_blocks, col_valid = _blocked(features, block, 0.0)
    col_blocks, col_valid = jnp.asarray(col_blocks), jnp.asarray(col_valid)
    radii = [
        np.asarray(_smallest_distances(jnp.asarray(rows), col_blocks, col_valid, num_smallest=k + 1))[:, k]
        for rows in _blocked(features, block, 0.0)[0]
    ]
    return np.concatenate(radii)[: len(features)]


def precision_recall(
    ref_features: np.ndarray, sample_features: np.ndarray, k: int = 3, block_size: int = 10000
) -> tuple[float, float]:
    """(precision, recall) of samples against reference features, as ADM's ManifoldEstimator with k-NN size k.

    precision: fraction of samples within the k-NN ball of some reference point;
    recall: fraction of reference points within the k-NN ball of some sample.
    """
    _check_k_and_block(k, block_size)
    ref_features = _check_features(ref_features, "ref_features", k)
    sample_features = _check_features(sample_features, "sample_features", k)
    if ref_features.shape[1] != sample_features.shape[1]:
        raise ValueError(
            f"ref_features and sample_features differ in feature dim: {ref_features.shape} vs {sample_features.shape}"
        )
    ref_radii = manifold_radii(ref_features, k, block_size)
    sample_radii = manifold_radii(sample_features, k, block_size)

    ref_block, sample_block = min(block_size, len(ref_features)), min(block_size, len(sample_features))
    ref_blocks, _ = _blocked(ref_features, ref_block, 0.0)
    ref_radii_blocks, _ = _blocked(ref_radii, ref_block, -np.inf)
    sample_blocks, _ = _blocked(sample_features, sample_block, 0.0)
    sample_radii_blocks, _ = _blocked(sample_radii, sample_block, -np.inf)
    sample_blocks, sample_radii_blocks = jnp.asarray(sample_blocks), jnp.asarray(sample_radii_blocks)

    ref_in, sample_in = [], np.zeros(sample_radii_blocks.shape, dtype=bool)
    for rows, row_radii in zip(ref_blocks, ref_radii_blocks):
        rows_in, cols_in = _ball_membership(jnp.asarray(rows), jnp.asarray(row_radii), sample_blocks,
                                            sample_radii_blocks)
        ref_in.append(np.asarray(rows_in))
        sample_in |= np.asarray(cols_in)
    recall = np.concatenate(ref_in)[: len(ref_features)].mean()
    precision = sample_in.reshape(-1)[: len(sample_features)].mean()
    return float(precision), float(recall)
