"""FID while training: every `config.eval.every` steps, N EMA samples against a fixed reference.

The reference is the training data's `eval.reference_split` (first `reference_size` images, the
statistics cached on disk once) or an ADM reference batch (`eval.reference`, e.g.
VIRTUAL_imagenet256_labeled.npz). Labels and noise are the same at every evaluation, so the
curve moves only with the weights. The hook is built before the first train step compiles:
weights, sizes and the model's image channels are checked and the reference statistics are
loaded (or computed and cached) then, so nothing fails hours into a run.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
from absl import logging

from lsync_jax import storage
from lsync_jax.builders import build_source
from lsync_jax.eval.evaluator import (
    InceptionEvaluator,
    check_metric_counts,
    compute_metrics,
    reference_count,
    reference_statistics,
    source_statistics,
)
from lsync_jax.eval.sampling import sample_batches
from lsync_jax.host import PHASES, Progress, all_processes
from lsync_jax.storage import write_json_atomic


class TrainingFID:
    """In-training FID, run by the training loop's `EvaluationHook` (registered as 'fid' in
    `lsync_jax.recipes.evaluators`): `due(step, num_steps)`, `done(step)` and
    `__call__(step, ema_params) -> scalars`."""

    phase = "FID: Inception features and metrics"

    def __init__(self, config: Any, model: Any, sample_fn: Callable, mesh: Any, cfg_scale: float,
                 interval: tuple[float, float], workdir: str, decode: Callable | None = None, check_only: bool = False):
        """`check_only` (launch/train.py --check): the settings, weights and reference are checked, no
        reference statistics are computed."""
        ev: Mapping[str, Any] = config.eval
        self.every = int(ev.every)
        self.num_samples = int(ev.num_samples)
        self.batch_size = int(ev.batch_size)
        if self.every < 0:
            raise ValueError(f"config.eval.every must be >= 0 (0: no FID), got {self.every}")
        if decode is None and model.in_channels not in (1, 3):
            raise ValueError(f"config.eval: the model makes {model.in_channels}-channel samples; FID needs images "
                             "(1 or 3 channels) or, for latents, the VAE decoder (config.data.name='imagenet_latents' "
                             "and config.vae.path)")
        if self.batch_size < 1 or self.batch_size % jax.device_count():
            raise ValueError(f"config.eval.batch_size={self.batch_size} must be a positive multiple of the "
                             f"{jax.device_count()} devices")
        if config.data.name == "imagenet_latents" and not ev.reference:
            # the shards are in class order: their first N crops would be a few classes' images
            raise ValueError("config.eval.reference: FID on latent data needs an ADM reference batch (e.g. "
                             "VIRTUAL_imagenet256_labeled.npz for ImageNet 256)")
        self.model, self.sample_fn, self.mesh, self.decode = model, sample_fn, mesh, decode
        self.cfg_scale, self.interval = cfg_scale, interval
        self.seed = int(config.seed) + 2
        self.out_dir = storage.join(workdir, "eval")
        reference, source, size = ev.reference, None, int(ev.reference_size)
        if reference:  # the cheap checks first: the Inception weights may need a conversion (seconds)
            storage.check_remote(reference)
            if not storage.exists(reference):
                raise FileNotFoundError(f"config.eval.reference={reference!r} not found (an ADM reference batch .npz)")
            ref_count, ref_label = reference_count(reference), f"config.eval.reference={reference}"
        else:
            source = build_source(config.data, split=ev.reference_split)
            ref_count = reference_count(ref_source=source, ref_num=size)
            ref_label = f"config.eval.reference_size={size} of split {ev.reference_split!r} (0: all)"
        # every metric's minimum, from the header or the source's length: before the weights load or any sample
        _, notes = check_metric_counts(self.num_samples, ref_count, samples="config.eval.num_samples",
                                       reference=ref_label, skip_hint=None)
        for note in notes:
            logging.warning("in-training %s", note)
        with PHASES.phase("FID: Inception weights (load, or convert once)"):
            self.evaluator = InceptionEvaluator(ev.inception_weights or None, batch_size=self.batch_size)
        if check_only:
            return
        with PHASES.phase("FID: reference statistics (once, then cached)"):
            self.reference = (reference_statistics(self.evaluator, reference, self.batch_size, log=logging.info)
                              if reference else
                              source_statistics(self.evaluator, source, size, self.batch_size, log=logging.info))

    def due(self, step: int, num_steps: int) -> bool:
        """A periodic evaluation inside the run; the loop adds the final one (`done` tells)."""
        return bool(self.every) and step % self.every == 0 and step < num_steps

    def result_path(self, step: int) -> str:
        return storage.join(self.out_dir, f"metrics_step{step:07d}.json")

    def done(self, step: int) -> bool:
        """Whether step's evaluation was written (on every process's view of the workdir)."""
        return all_processes(storage.exists(self.result_path(step)))

    def __call__(self, step: int, ema_params: Any) -> dict[str, float]:
        batches = sample_batches(self.sample_fn, {"params": ema_params}, self.mesh, self.model.num_classes,
                                 self.num_samples, self.batch_size, self.seed, self.cfg_scale, self.interval,
                                 self.decode)
        progress = Progress(f"step {step}: FID-{self.num_samples} (EMA samples, then their Inception features)",
                            self.num_samples, "samples")

        def counted(images_and_labels):
            for images, _ in images_and_labels:
                progress.update(len(images))
                yield images

        stats = self.evaluator.statistics(counted(PHASES.timed(batches, "FID: sampling")))
        progress.finish()
        result = compute_metrics(self.reference, stats, fid_method="eigh")
        n = self.num_samples
        scalars = {f"eval/{name}_{n}": float(v) for name, v in result.items() if v is not None}
        if jax.process_index() == 0:
            write_json_atomic(self.result_path(step),
                              {"step": step, "num_samples": n, "num_reference": self.reference.count,
                               "metrics": result, "inception_weights": self.evaluator.weights_path})
        logging.info("step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in scalars.items()))
        return scalars
