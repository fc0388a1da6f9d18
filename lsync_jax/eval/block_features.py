"""Pooled block features of a diffusion transformer on data, at chosen noise levels (issue 8's input).

`collect_block_features` runs a model (any that sows `block_i`, e.g. SiT) on the first N examples
of a data source, each noised on the model's path at every requested t (lsync-jax time: t = 1 is
data) with a fixed seed, and returns the per-block token means as float32 host arrays, ready for
`lsync_jax.eval.representations` (CKA, probes, k-NN alignment). Batches are split over every
device like the evaluator's (padded to a multiple of the device count, padding dropped), and the
forward is jitted once per batch shape. Eval code: it imports no training code.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lsync_jax.host import pad_rows
from lsync_jax.transport.paths import Path


def _batches(source: Any, num: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    from lsync_jax.data.pipeline import to_example

    rng = np.random.default_rng(0)  # latent sources draw their posterior sample from it
    for start in range(0, num, batch_size):
        examples = [to_example(source, source[i], rng, False) for i in range(start, min(start + batch_size, num))]
        yield np.stack([e["x"] for e in examples]), np.stack([e["y"] for e in examples]).astype(np.int32)


def source_shape(source: Any) -> tuple[int, ...]:
    from lsync_jax.data.pipeline import to_example

    return tuple(to_example(source, source[0], np.random.default_rng(0), False)["x"].shape)


def collect_block_features(model: Any, params: Any, path: Path, source: Any, num_samples: int,
                           t_values: Sequence[float], *, blocks: Sequence[int] | None = None, batch_size: int = 256,
                           seed: int = 0, devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
    """{'labels': (N,), 'features': {t: {'block_i': (N, D) float32}}} for the first `num_samples`
    examples of `source`, blocks 1..depth (or `blocks`), x_t = alpha(t) x + sigma(t) eps with eps
    drawn per sample from `seed` (the same noise at every t, for every block and batch size)."""
    num = min(int(num_samples), len(source))
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
    names = tuple(f"block_{b}" for b in blocks)

    @jax.jit
    def pooled(params, x, eps, t, y):
        te = jnp.full((x.shape[0],), t, jnp.float32)
        alpha, _ = path.alpha(te[:, None, None, None])
        sigma, _ = path.sigma(te[:, None, None, None])
        _, state = model.apply({"params": params}, alpha * x + sigma * eps, te, y, mutable=["intermediates"])
        sown = state["intermediates"]
        return {n: jnp.mean(sown[n][0].astype(jnp.float32), axis=1) for n in names}

    out: dict[float, dict[str, list]] = {float(t): {n: [] for n in names} for t in t_values}
    labels = []
    key = jax.random.key(seed, impl="threefry2x32")  # threefry: a vmapped draw equals the per-sample one
    noise = jax.jit(jax.vmap(lambda i, shape=source_shape(source): jax.random.normal(jax.random.fold_in(key, i),
                                                                                    shape)))
    start = 0
    for x, y in _batches(source, num, batch_size):
        n = len(x)
        eps = np.asarray(noise(jnp.arange(start, start + n)), np.float32)  # per sample: any batch size
        start += n
        rows = n + -n % len(devices)  # whole shards per device; the padding is dropped below
        placed = [jax.device_put(pad_rows(a, rows), split) for a in (x, eps, y)]
        for t in t_values:
            features = jax.device_get(pooled(params, placed[0], placed[1], jnp.float32(t), placed[2]))
            for name in names:
                out[float(t)][name].append(np.asarray(features[name])[:n])
        labels.append(y[:n])
    return {"labels": np.concatenate(labels),
            "features": {t: {name: np.concatenate(parts) for name, parts in per_t.items()} for t, per_t in out.items()}}
