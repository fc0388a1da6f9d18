"""Pooled block features of a diffusion transformer on data, at chosen noise levels (issue 8's input).

`collect_block_features` runs a model (any that sows `block_i`, e.g. SiT) on N examples of a data
source (the first N, or the given indices), each noised on the model's path at every requested t
(lsync-jax time: t = 1 is data) with a fixed seed, and returns the per-block token means as float32
host arrays, ready for `lsync_jax.eval.representations` (CKA, probes, k-NN alignment). With a
`reference` function (uint8 images -> (n, D), e.g. pooled DINOv2 tokens) it also returns the
reference encoder's features of the same examples. Batches are split over every device like the
evaluator's (padded to a multiple of the device count, padding dropped; on several processes every
process passes the same examples and reads back the whole result), and the forward is jitted once
per batch shape. Eval code: it imports no training code.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lsync_jax.data.pipeline import to_example
from lsync_jax.host import gather_to_host, pad_rows
from lsync_jax.transport.paths import Path


def _batches(source: Any, indices: np.ndarray, batch_size: int,
             fields: tuple[str, ...]) -> Iterator[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)  # latent sources draw their posterior sample from it
    for start in range(0, len(indices), batch_size):
        examples = [to_example(source, source[int(i)], rng, False, fields) for i in indices[start:start + batch_size]]
        yield {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def source_shape(source: Any) -> tuple[int, ...]:
    return tuple(to_example(source, source[0], np.random.default_rng(0), False)["x"].shape)


def sample_indices(num_examples: int, num_samples: int, seed: int = 0) -> np.ndarray:
    """`num_samples` distinct indices of a source of `num_examples`, drawn with `seed` (sorted): a
    class-ordered source (latent shards follow the class folders) is not measured on its first classes."""
    num = min(int(num_samples), int(num_examples))
    return np.sort(np.random.default_rng(seed).permutation(int(num_examples))[:num])


def collect_block_features(model: Any, params: Any, path: Path, source: Any, num_samples: int,
                           t_values: Sequence[float], *, blocks: Sequence[int] | None = None, batch_size: int = 256,
                           seed: int = 0, devices: Sequence[jax.Device] | None = None,
                           indices: Sequence[int] | None = None,
                           reference: Callable[[np.ndarray], np.ndarray] | None = None,
                           condition: str = "null") -> dict[str, Any]:
    """{'labels': (N,), 'indices': (N,), 'features': {t: {'block_i': (N, D) float32}}[, 'reference': (N, D)]}
    for the first `num_samples` examples of `source` (or those at `indices`), blocks 1..depth (or
    `blocks`), x_t = alpha(t) x + sigma(t) eps with eps drawn per sample from `seed` (the n-th
    collected sample gets the same noise at every t, for every block and batch size).

    `condition`: 'null' (default) feeds a class-conditional model its null ("unconditional") class,
    so the features depend on the image alone; 'label' feeds the true labels as in training, but
    then every block carries the label through its adaLN modulation and a probe reads it off
    (near-perfect accuracy that says nothing about the representation)."""
    if condition not in ("null", "label"):
        raise ValueError(f"condition must be 'null' or 'label', got {condition!r}")
    conditional = getattr(model, "num_classes", 0) > 0
    if condition == "null" and conditional and not getattr(model, "class_dropout_prob", 0.0) > 0:
        raise ValueError("the model was built without a null class (class_dropout_prob=0), so it cannot be run "
                         "unconditionally; pass condition='label' (probe accuracies then include the label)")
    if indices is None:
        indices = np.arange(min(int(num_samples), len(source)))
    indices = np.asarray(indices, np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= len(source)):
        raise ValueError(f"indices must lie in [0, {len(source)}) for this source")
    num = len(indices)
    blocks = tuple(blocks or range(1, model.depth + 1))
    bad = [b for b in blocks if not 1 <= b <= model.depth]
    if bad:
        raise ValueError(f"blocks {bad} are outside 1..{model.depth} (1-indexed)")
    if num < 2 or batch_size < 1:
        raise ValueError(f"need at least 2 samples and a positive batch size, got {num} of {len(source)} and "
                         f"{batch_size}")
    for t in t_values:
        if not 0.0 <= float(t) <= 1.0:
            raise ValueError(f"t={t} is outside [0, 1] (lsync-jax time: 1 is data)")
    devices = list(devices or jax.devices())
    mesh = Mesh(np.array(devices), ("data",))
    split, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    params = jax.device_put(params, replicated)

    def place(a: np.ndarray) -> jax.Array:  # the same host rows on every process; each device reads its slice
        return jax.make_array_from_callback(a.shape, split, lambda index: a[index])

    names = tuple(f"block_{b}" for b in blocks)

    @jax.jit
    def pooled(params, x, eps, t, y, mask=None):
        te = jnp.full((x.shape[0],), t, jnp.float32)
        shape = (-1,) + (1,) * (x.ndim - 1)  # images, clips and sequences alike
        alpha, _ = path.alpha(te.reshape(shape))
        sigma, _ = path.sigma(te.reshape(shape))
        extra = {"mask": mask} if mask is not None else {}
        _, state = model.apply({"params": params}, alpha * x + sigma * eps, te, y, mutable=["intermediates"],
                               **extra)
        sown = state["intermediates"]
        if "token_mask" not in sown:
            return {n: jnp.mean(sown[n][0].astype(jnp.float32), axis=1) for n in names}
        weight = sown["token_mask"][0].astype(jnp.float32)[:, :, None]  # padded tokens count in no mean
        return {n: jnp.sum(sown[n][0].astype(jnp.float32) * weight, axis=1) / jnp.maximum(jnp.sum(weight, axis=1), 1.0)
                for n in names}

    out: dict[float, dict[str, list]] = {float(t): {n: [] for n in names} for t in t_values}
    labels, refs = [], []
    key = jax.random.key(seed, impl="threefry2x32")  # threefry: a vmapped draw equals the per-sample one
    noise = jax.jit(jax.vmap(lambda i, shape=source_shape(source): jax.random.normal(jax.random.fold_in(key, i),
                                                                                    shape)))
    start = 0
    for batch in _batches(source, indices, batch_size, ("image",) if reference is not None else ()):
        x, y = batch["x"], batch["y"].astype(np.int32)
        fed = np.full_like(y, model.num_classes) if condition == "null" and conditional else y
        if getattr(model, "num_tags", 0):  # tags: the all-zero vector is the unconditional input
            tags = batch["tags"].astype(np.float32)
            fed, y = (np.zeros_like(tags) if condition == "null" else tags), tags
        n = len(x)
        eps = np.asarray(noise(jnp.arange(start, start + n)), np.float32)  # per sample: any batch size
        start += n
        rows = n + -n % len(devices)  # whole shards per device; the padding is dropped below
        placed = [place(pad_rows(a, rows)) for a in (x, eps, fed)]
        mask = place(pad_rows(batch["mask"], rows)) if "mask" in batch else None
        for t in t_values:
            features = pooled(params, placed[0], placed[1], jnp.float32(t), placed[2], mask)
            for name in names:
                out[float(t)][name].append(gather_to_host(features[name])[:n])
        labels.append(y)
        if reference is not None:
            refs.append(np.asarray(reference(batch["image"]), np.float32).reshape(n, -1))
    result = {"labels": np.concatenate(labels), "indices": indices,
              "features": {t: {name: np.concatenate(parts) for name, parts in per_t.items()}
                           for t, per_t in out.items()}}
    if reference is not None:
        result["reference"] = np.concatenate(refs)
    return result
