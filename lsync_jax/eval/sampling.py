"""Samples for evaluation: class-balanced batches over every device, and EMA samples of a run's
workdir written as an ADM-style .npz (arr_0 samples, arr_1 labels) and a picture:

- images: arr_0 uint8 (N, H, W, C) and a PNG grid;
- video clips: arr_0 uint8 (N, F, H, W, C) and a PNG strip, one clip per row with its frames along it;
- sequences: arr_0 float32 (N, L, C) in the data's own units (no picture).

Latent models' samples are decoded to images by the SD-VAE (`lsync_jax.builders.build_decoder`).
Tag-conditioned models get one tag on per sample, uniform over the tags (arr_1: uint8 multi-hot (N, T)).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
from absl import logging

from lsync_jax.builders import build_decoder, build_mesh, build_sampler, build_transport, validate_config
from lsync_jax.eval.video import video_grid
from lsync_jax.host import gather_to_host, initialize_distributed, make_grid, save_png, to_uint8
from lsync_jax.sharding import batch_sharding
from lsync_jax.storage import check_writable, save_npz_atomic, write_adm_batch
from lsync_jax.transport import make_sample_fn
from lsync_jax.workdir import load_params

VIDEO_STRIP_CLIPS = 10  # rows of a video run's PNG strip


def sample_conditions(rng: np.random.Generator, n: int, num_classes: int, num_tags: int = 0) -> np.ndarray:
    """n class labels uniform over the classes (int32 (n,)), or for a tag-conditioned model n multi-hot
    vectors with one tag on each, uniform over the tags (float32 (n, num_tags))."""
    if num_tags:
        return np.eye(num_tags, dtype=np.float32)[rng.integers(0, num_tags, n)]
    return rng.integers(0, max(num_classes, 1), n).astype(np.int32)


def sample_batches(sample_fn: Any, variables: Any, mesh: Any, num_classes: int, num_samples: int,
                   batch_size: int, seed: int, cfg_scale: float, interval: tuple[float, float],
                   decode: Callable[[jax.Array], jax.Array] | None = None, *, num_tags: int = 0,
                   quantize: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(samples, labels) batches of class-conditional samples, labels uniform over the classes (or one
    tag on per sample, `num_tags`); split over every device; the same for the same seed (keys folded by
    batch start). `decode` maps model outputs to images (the VAE decoder of latent models). Samples are
    uint8 (`to_uint8`, images and clips) or, without `quantize`, the float32 outputs (sequences)."""
    rng = np.random.default_rng(seed)
    for start in range(0, num_samples, batch_size):
        labels = sample_conditions(rng, batch_size, num_classes, num_tags)
        # class labels are split over every device, and with them the batch; tags are checked on the host
        placed = labels if num_tags else jax.device_put(labels, batch_sharding(mesh))
        key = jax.random.fold_in(jax.random.key(seed), start)
        samples = sample_fn(variables, key, placed, cfg_scale, interval)
        if decode is not None:
            samples = decode(samples)
        keep = num_samples - start
        host = gather_to_host(samples)[:keep]
        yield (to_uint8(host) if quantize else host.astype(np.float32)), labels[:keep]


def sample_from_workdir(config: Any, workdir: str, out_dir: str, num_samples: int, batch_size: int,
                        seed: int = 0) -> dict[str, str | None]:
    """Draw `num_samples` class-conditional samples (labels uniform over the classes) in batches sharded
    over every device; write samples_step<S>_seed<K>_<N>.npz into `out_dir`, with a PNG of the first 100
    images, or a strip of the first 10 clips (sequences have no picture: 'png' is None)."""
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
    kind = getattr(model, "kind", "image")
    sampler_cfg, cfg_scale, interval = build_sampler(config)
    sample_fn = make_sample_fn(model, build_transport(config), sampler_cfg)
    decode = build_decoder(config, mesh)
    npz = os.path.join(out_dir, f"samples_step{step}_seed{seed}_{num_samples}.npz")
    png = None if kind == "sequence" else os.path.join(out_dir, f"samples_step{step}_seed{seed}.png")

    def logged(batches: Iterator[tuple[np.ndarray, np.ndarray]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        done = 0
        for x, y in batches:
            done += len(x)
            logging.info("sampled %d / %d", done, num_samples)
            yield x, y

    batches = logged(sample_batches(sample_fn, {"params": ema}, mesh, model.num_classes, num_samples, batch_size,
                                    seed, cfg_scale, interval, decode, num_tags=int(getattr(model, "num_tags", 0)),
                                    quantize=kind != "sequence"))
    if jax.process_index() == 0:
        write_samples(kind, npz, png, batches)
    else:
        for _ in batches:  # every process takes part in sampling
            pass
    return {"npz": npz, "png": png}


def write_samples(kind: str, npz: str, png: str | None, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
    """(samples, labels) batches of a model of `kind` ('image', 'video', 'sequence') into the .npz and its
    picture: images and clips streamed to disk (`write_adm_batch`: 50,000 images at 512 px do not fit in
    host memory) with a grid of the first 100 images or a strip of the first 10 clips, by class; sequences
    (float) gathered and written with one np.savez, no picture. Multi-hot tags are stored as uint8."""
    def stored(labels: np.ndarray) -> np.ndarray:
        return labels.astype(np.uint8) if labels.ndim == 2 else labels

    if kind == "sequence":
        samples, labels = zip(*batches)
        save_npz_atomic(npz, arr_0=np.concatenate(samples).astype(np.float32),
                        arr_1=stored(np.concatenate(labels)))
        return
    first, labels = write_adm_batch(npz, ((x, stored(y)) for x, y in batches))
    shown = VIDEO_STRIP_CLIPS if kind == "video" else 100
    order = np.argsort(labels[:shown], kind="stable") if labels.ndim == 1 else np.arange(min(shown, len(first)))
    picture = first[:shown][order]
    save_png(png, video_grid(picture) if kind == "video" else make_grid(picture, columns=10))
