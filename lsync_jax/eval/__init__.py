"""Evaluation: sampling for evaluation, in-training FID, the Inception evaluator and the ADM metrics
(FID, sFID, IS, precision, recall); block representation measurements (CKA, linear probes, mutual
k-NN / CKNNA) and the analysis of a run's checkpoints."""

from lsync_jax.eval.block_features import collect_block_features
from lsync_jax.eval.evaluator import (
                                      FeatureStats,
                                      InceptionEvaluator,
                                      batch_statistics,
                                      compute_metrics,
                                      reference_statistics,
                                      source_statistics,
)
from lsync_jax.eval.metrics import RunningStats, frechet_distance, inception_score, precision_recall
from lsync_jax.eval.representations import (
                                      cka_matrix,
                                      cknna,
                                      linear_cka,
                                      mutual_knn,
                                      pool_tokens,
                                      probe_blocks,
                                      ridge_probe,
                                      unbiased_cka,
)

__all__ = ["FeatureStats", "InceptionEvaluator", "RunningStats", "batch_statistics",
           "compute_metrics", "frechet_distance", "inception_score", "precision_recall",
           "reference_statistics", "source_statistics",
           "cka_matrix", "collect_block_features", "cknna", "linear_cka", "mutual_knn", "pool_tokens", "probe_blocks",
           "ridge_probe", "unbiased_cka"]
