"""FID while training: every `config.eval.every` steps, N EMA samples against a fixed reference.

The reference is the training data's `eval.reference_split` (first `reference_size` images, the
statistics cached on disk once) or an ADM reference batch (`eval.reference`, e.g.
VIRTUAL_imagenet256_labeled.npz). Labels and noise are the same at every evaluation, so the
curve moves only with the weights. Everything that can be wrong (weights, reference, sizes) is
checked when the hook is built, before the first train step compiles.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from absl import logging
from etils import epath

from lsync_jax.eval.evaluator import (FeatureStats, InceptionEvaluator, compute_metrics, reference_statistics,
                                      source_statistics, write_json)
from lsync_jax.train.config import build_source
from lsync_jax.train.images import to_uint8
from lsync_jax.train.sharding import batch_sharding, gather_to_host


class TrainingFID:
    """The periodic FID hook: `due(step)` and `__call__(step, ema_params) -> scalars`."""

    def __init__(self, config: Any, model: Any, sample_fn: Callable, mesh: Any, cfg_scale: float,
                 interval: tuple[float, float], workdir: str):
        ev: Mapping[str, Any] = config.eval
        self.every = int(ev.get("every", 0))
        self.num_samples = int(ev.get("num_samples", 10_000))
        self.batch_size = int(ev.get("batch_size", 250))
        if self.every < 0:
            raise ValueError(f"config.eval.every must be >= 0 (0: no FID), got {self.every}")
        if self.num_samples < 2:
            raise ValueError(f"config.eval.num_samples must be >= 2, got {self.num_samples}")
        if self.batch_size < 1 or self.batch_size % jax.device_count():
            raise ValueError(f"config.eval.batch_size={self.batch_size} must be a positive multiple of the "
                             f"{jax.device_count()} devices")
        self.model, self.sample_fn, self.mesh = model, sample_fn, mesh
        self.cfg_scale, self.interval = cfg_scale, interval
        self.seed = int(config.seed) + 2
        self.out_dir = os.path.join(workdir, "eval")
        self.evaluator = InceptionEvaluator(ev.get("inception_weights") or None, batch_size=self.batch_size)
        reference = ev.get("reference") or ""
        if reference:
            if not epath.Path(reference).exists():
                raise FileNotFoundError(f"config.eval.reference={reference!r} not found (an ADM reference batch .npz)")
            self._load_reference = lambda: reference_statistics(self.evaluator, reference, self.batch_size,
                                                                log=logging.info)
        else:
            split = ev.get("reference_split", "test")
            source = build_source(config.data, split=split)  # a missing split fails now, not after hours
            size = int(ev.get("reference_size", 10_000))
            self._load_reference = lambda: source_statistics(self.evaluator, source, size, self.batch_size,
                                                             log=logging.info)
        self._reference: FeatureStats | None = None

    def due(self, step: int, num_steps: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == num_steps)

    def _samples(self, ema_params: Any) -> Iterator[np.ndarray]:
        rng = np.random.default_rng(self.seed)
        classes = max(self.model.num_classes, 1)
        for start in range(0, self.num_samples, self.batch_size):
            labels = rng.integers(0, classes, self.batch_size).astype(np.int32)
            labels = jax.device_put(labels, batch_sharding(self.mesh))
            key = jax.random.fold_in(jax.random.key(self.seed), start)
            images = self.sample_fn({"params": ema_params}, key, labels, self.cfg_scale, self.interval)
            yield to_uint8(gather_to_host(images))[: self.num_samples - start]

    def __call__(self, step: int, ema_params: Any) -> dict[str, float]:
        if self._reference is None:
            self._reference = self._load_reference()
        stats = self.evaluator.statistics(self._samples(ema_params))
        result = compute_metrics(self._reference, stats, fid_method="eigh")
        n = self.num_samples
        scalars = {f"eval/{name}_{n}": float(v) for name, v in result.items() if v is not None}
        if jax.process_index() == 0:
            write_json(os.path.join(self.out_dir, f"metrics_step{step:07d}.json"),
                       {"step": step, "num_samples": n, "num_reference": self._reference.count,
                        "metrics": result, "inception_weights": self.evaluator.weights_path})
        logging.info("step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in scalars.items()))
        return scalars
