"""EMA samples from a run's workdir: a PNG grid and an ADM-style .npz (arr_0: uint8 NHWC, arr_1: labels).

Latent models' samples are decoded to images by the SD-VAE (`make_decoder`), on every device.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator

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
    vae_path,
    validate_config,
)
from lsync_jax.train.images import make_grid, save_png, to_uint8
from lsync_jax.host import gather_to_host, write_adm_batch
from lsync_jax.train.sharding import BATCH_AXES, batch_sharding, make_mesh, replicated, tree_shardings, with_shardings
from lsync_jax.transport import make_sample_fn


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of the checkpoints in `workdir`/checkpoints (FileNotFoundError naming the directory if none)."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    steps = []
    if os.path.isdir(ckpt_dir):
        checkpointer = ckpt_lib.Checkpointer(ckpt_dir, read_only=True)
        steps = sorted(checkpointer.manager.all_steps())
        checkpointer.close()
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}: train first (launch/train.py --workdir=...)")
    return steps


def load_params(config: Any, workdir: str, mesh, *, step: int | None = None,
                which: str = "ema") -> tuple[Any, Any, int]:
    """(model, params laid out over `mesh`, step) of checkpoint `step` (default: the latest) in
    `workdir`; `which` = 'ema' (the weights that sample) or 'params' (the online weights)."""
    if which not in ("ema", "params"):
        raise ValueError(f"which must be 'ema' or 'params', got {which!r}")
    model = build_model(config)
    steps = checkpoint_steps(workdir)
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint of step {step} in {os.path.join(workdir, 'checkpoints')}; it holds "
                                f"steps {steps}")
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    abstract = abstract_params(config, model, mesh)
    saved = checkpointer.read_meta(step)
    ckpt_lib.check_compatible({k: saved[k] for k in ("model", "param_shapes") if k in saved},
                              ckpt_lib.describe(model_fields(config), abstract), checkpointer.directory)
    checkpointer.close()
    params, ema = ckpt_lib.restore_params(os.path.join(workdir, "checkpoints", str(step)), abstract)
    return model, (ema if which == "ema" else params), step


def abstract_params(config: Any, model: Any, mesh) -> Any:
    """The model's parameter shapes, placed over `mesh` as in training (the rules match paths of the
    whole state, 'params/...'): the target a checkpoint's weights are restored into."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *model.init_inputs(1))["params"]
    return with_shardings(shapes, tree_shardings({"params": shapes}, mesh, mesh_rules(config))["params"])


def load_ema_params(config: Any, workdir: str, mesh) -> tuple[Any, Any, int]:
    """(model, EMA params laid out over `mesh`, step) of the latest checkpoint in `workdir`."""
    return load_params(config, workdir, mesh)


def make_decoder(config: Any, mesh: Any) -> Callable[[jax.Array], jax.Array] | None:
    """For a latent model: scaled latents (sharded over the batch) -> images in [-1, 1], decoded by the
    SD-VAE on every device, `config.vae.decode_chunk` latents at a time per device. None for pixel models.
    The weights are loaded now, so a missing VAE fails before any model compiles."""
    path = vae_path(config)
    if path is None:
        return None
    from jax.sharding import PartitionSpec as P

    from lsync_jax.checkpoints.vae import load_vae
    from lsync_jax.models.vae import decode_latents

    module, params = load_vae(path)
    params = jax.device_put(params, replicated(mesh))
    chunk = int(config.get("vae", {}).get("decode_chunk", 8))
    if chunk < 1:
        raise ValueError(f"config.vae.decode_chunk must be >= 1, got {chunk}")
    logging.info("latent samples are decoded by the SD-VAE in %s", path)

    @jax.jit
    def decode(params: Any, latents: jax.Array) -> jax.Array:
        local = jax.shard_map(lambda p, z: decode_latents(module, p, z, chunk=chunk), mesh=mesh,
                              in_specs=(P(), P(BATCH_AXES)), out_specs=P(BATCH_AXES))
        return local(params, latents)

    def run(latents: jax.Array) -> jax.Array:
        n, pad = latents.shape[0], -latents.shape[0] % mesh.size  # shard_map needs whole shards
        if pad:
            latents = jax.numpy.concatenate([latents, jax.numpy.zeros((pad, *latents.shape[1:]), latents.dtype)])
        images = decode(params, latents)
        return images[:n] if pad else images

    return run


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
    from lsync_jax.train.loop import initialize_distributed

    initialize_distributed(config.get("distributed", {}))
    mesh = make_mesh()
    if batch_size % jax.device_count():
        raise ValueError(f"--batch_size={batch_size} is not divisible by the {jax.device_count()} devices")
    model, ema, step = load_ema_params(config, workdir, mesh)
    sampler_cfg, cfg_scale, interval = build_sampler(config)
    sample_fn = make_sample_fn(model, build_transport(config), sampler_cfg)
    decode = make_decoder(config, mesh)
    os.makedirs(out_dir, exist_ok=True)
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
