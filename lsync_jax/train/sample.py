"""EMA samples from a run's workdir: a PNG grid and an ADM-style .npz (arr_0: uint8 NHWC, arr_1: labels)."""

from __future__ import annotations

import os
from typing import Any, Iterator

import jax
import numpy as np
from absl import logging

from lsync_jax.train import checkpoint as ckpt_lib
from lsync_jax.train.config import (
    build_model,
    build_sampler,
    build_transport,
    mesh_rules,
    model_fields,
    validate_config,
)
from lsync_jax.train.images import make_grid, save_png, to_uint8
from lsync_jax.host import gather_to_host
from lsync_jax.train.sharding import batch_sharding, make_mesh, tree_shardings, with_shardings
from lsync_jax.transport import make_sample_fn


def load_ema_params(config: Any, workdir: str, mesh) -> tuple[Any, Any, int]:
    """(model, EMA params laid out over `mesh`, step) of the latest checkpoint in `workdir`."""
    model = build_model(config)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}: train first (launch/train.py --workdir=...)")
    checkpointer = ckpt_lib.Checkpointer(ckpt_dir, read_only=True)
    step = checkpointer.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}: train first "
                                "(launch/train.py --workdir=...)")
    shapes = jax.eval_shape(model.init, jax.random.key(0), *model.init_inputs(1))["params"]
    saved = checkpointer.read_meta(step)
    ckpt_lib.check_compatible({k: saved[k] for k in ("model", "param_shapes") if k in saved},
                              ckpt_lib.describe(model_fields(config), shapes), checkpointer.directory)
    checkpointer.close()
    # placed as in training: the rules match paths of the whole state ('params/...')
    abstract = with_shardings(shapes, tree_shardings({"params": shapes}, mesh, mesh_rules(config))["params"])
    _, ema = ckpt_lib.restore_params(os.path.join(workdir, "checkpoints", str(step)), abstract)
    return model, ema, step


def sample_batches(sample_fn: Any, variables: Any, mesh: Any, num_classes: int, num_samples: int,
                   batch_size: int, seed: int, cfg_scale: float,
                   interval: tuple[float, float]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(uint8 images, labels) batches of class-conditional samples, labels uniform over the
    classes; split over every device; the same for the same seed (keys folded by batch start)."""
    rng = np.random.default_rng(seed)
    for start in range(0, num_samples, batch_size):
        labels = rng.integers(0, max(num_classes, 1), batch_size).astype(np.int32)
        placed = jax.device_put(labels, batch_sharding(mesh))  # the batch is split over every device
        key = jax.random.fold_in(jax.random.key(seed), start)
        images = sample_fn(variables, key, placed, cfg_scale, interval)
        keep = num_samples - start
        yield to_uint8(gather_to_host(images))[:keep], labels[:keep]


def sample_from_workdir(config: Any, workdir: str, out_dir: str, num_samples: int, batch_size: int,
                        seed: int = 0) -> dict[str, str]:
    """Draw `num_samples` class-conditional samples (labels cycle over the classes) in batches sharded
    over every device; write samples_step<S>_seed<K>_<N>.npz and a grid PNG of the first 100 into `out_dir`."""
    validate_config(config)
    from lsync_jax.train.loop import initialize_distributed

    initialize_distributed(config.get("distributed", {}))
    mesh = make_mesh()
    if batch_size % jax.device_count():
        raise ValueError(f"--batch_size={batch_size} is not divisible by the {jax.device_count()} devices")
    model, ema, step = load_ema_params(config, workdir, mesh)
    sampler_cfg, cfg_scale, interval = build_sampler(config)
    sample_fn = make_sample_fn(model, build_transport(config), sampler_cfg)
    images, labels = [], []
    for x, y in sample_batches(sample_fn, {"params": ema}, mesh, model.num_classes, num_samples, batch_size, seed,
                               cfg_scale, interval):
        images.append(x)
        labels.append(y)
        logging.info("sampled %d / %d", sum(map(len, images)), num_samples)
    images = np.concatenate(images)
    labels = np.concatenate(labels)
    os.makedirs(out_dir, exist_ok=True)
    npz = os.path.join(out_dir, f"samples_step{step}_seed{seed}_{num_samples}.npz")
    png = os.path.join(out_dir, f"samples_step{step}_seed{seed}.png")
    if jax.process_index() == 0:
        np.savez(npz, arr_0=images, arr_1=labels)
        order = np.argsort(labels[:100], kind="stable")
        save_png(png, make_grid(images[:100][order], columns=10))
    return {"npz": npz, "png": png}
