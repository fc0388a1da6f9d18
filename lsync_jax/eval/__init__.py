"""Evaluation: the FID Inception in JAX and the ADM metrics (FID, sFID, IS, precision, recall); block
representation measurements (CKA, linear probes, mutual k-NN / CKNNA)."""

from lsync_jax.eval.block_features import collect_block_features
from lsync_jax.eval.evaluator import (FeatureStats, InceptionEvaluator, batch_statistics, compute_metrics,
                                      reference_statistics, source_statistics)
from lsync_jax.eval.inception import InceptionV3, preprocess
from lsync_jax.eval.metrics import RunningStats, frechet_distance, inception_score, precision_recall
from lsync_jax.eval.representations import (cka_matrix, cknna, linear_cka, mutual_knn, pool_tokens, probe_blocks,
                                            ridge_probe, unbiased_cka)
from lsync_jax.eval.weights import load_weights, resolve_weights

__all__ = ["FeatureStats", "InceptionEvaluator", "InceptionV3", "RunningStats", "batch_statistics",
           "compute_metrics", "frechet_distance", "inception_score", "load_weights", "precision_recall",
           "preprocess", "reference_statistics", "resolve_weights", "source_statistics",
           "cka_matrix", "collect_block_features", "cknna", "linear_cka", "mutual_knn", "pool_tokens", "probe_blocks", "ridge_probe",
           "unbiased_cka"]
