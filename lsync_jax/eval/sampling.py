"""Samples for evaluation: class-balanced batches over every device, and EMA samples of a run's
workdir written as a PNG grid and an ADM-style .npz (arr_0: uint8 NHWC, arr_1: labels).

Latent models' samples are decoded to images by the SD-VAE (`lsync_jax.builders.build_decoder`).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging

from lsync_jax.builders import build_decoder, build_mesh, build_sampler, build_transport, validate_config
from lsync_jax.host import gather_to_host, initialize_distributed, make_grid, save_png, to_uint8
from lsync_jax.sharding import batch_sharding
from lsync_jax.storage import check_writable, write_adm_batch
from lsync_jax.transport import make_sample_fn
from lsync_jax.workdir import load_params


def sample_batches(sample_fn: Any, variables: Any, mesh: Any, num_classes: int, num_samples: int,
                   batch_size: int, seed: int, cfg_scale: float, interval: tuple[float, float],
                   decode: Callable[[jax.Array], jax.Array] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(uint8 images, labels) batches of class-conditional samples, labels uniform over the
    classes; split over every device; the same for the same seed (keys folded by batch start).
    `decode` maps model outputs to images (the VAE decoder of latent models)."""
    rng = np.random.default_rng(seed)
    for start in range(0, num_samples, batch_size):
        labels = rng.integers(0, max(num_classes, 1), batch_size).astype(np.int32)
        placed = jax.device_put(labels, batch_sharding(mesh))  # the batch is split over every device
        key = jax.random.fold_in(jax.random.key(seed), start)
        images = sample_fn(variables, key, placed, cfg_scale, interval)
        if decode is not None:
            images = decode(images)
        keep = num_samples - start
        yield to_uint8(gather_to_host(images))[:keep], labels[:keep]


def sample_from_workdir(config: Any, workdir: str, out_dir: str, num_samples: int, batch_size: int,
                        seed: int = 0) -> dict[str, str]:
    """Draw `num_samples` class-conditional samples (labels cycle over the classes) in batches sharded
    over every device; write samples_step<S>_seed<K>_<N>.npz and a grid PNG of the first 100 into `out_dir`."""
    validate_config(config)
    initialize_distributed(config.distributed)
    mesh = build_mesh(config)
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        if int(value) < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    if batch_size % jax.device_count():
        raise ValueError(f"--batch_size={batch_size} is not divisible by the {jax.device_count()} devices")
    if jax.process_index() == 0:  # the one writer: refused now, not after sampling 50,000 images
        check_writable(out_dir)
    model, ema, step = load_params(config, workdir, mesh)  # the newest intact checkpoint, its transport checked
    sampler_cfg, cfg_scale, interval = build_sampler(config)
    sample_fn = make_sample_fn(model, build_transport(config), sampler_cfg)
    decode = build_decoder(config, mesh)
    npz = os.path.join(out_dir, f"samples_step{step}_seed{seed}_{num_samples}.npz")
    png = os.path.join(out_dir, f"samples_step{step}_seed{seed}.png")

    def logged(batches: Iterator[tuple[np.ndarray, np.ndarray]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        done = 0
        for x, y in batches:
            done += len(x)
            logging.info("sampled %d / %d", done, num_samples)
            yield x, y

    batches = logged(sample_batches(sample_fn, {"params": ema}, mesh, model.num_classes, num_samples, batch_size,
                                    seed, cfg_scale, interval, decode))
    if jax.process_index() == 0:  # streamed to disk: 50,000 images at 512 px do not fit in host memory
        first, labels = write_adm_batch(npz, batches)
        order = np.argsort(labels[:100], kind="stable")
        save_png(png, make_grid(first[order], columns=10))
    else:
        for _ in batches:  # every process takes part in sampling
            pass
    return {"npz": npz, "png": png}
