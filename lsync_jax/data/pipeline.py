"""grain input pipelines: deterministic for a seed, split per process, checkpointable.

Batches are defined globally: every process walks the same seeded order of record indices (a fresh
shuffle each epoch) cut into global batches, and loads only its own slice of each one. So the
global batch at step s is the same whatever the number of processes, and a run on one host
matches a run on many. Each process yields {'x': float32 (B/P, H, W, C) (images in [-1, 1], or
scaled VAE latents), 'y': int32 (B/P,)}; `global_batch` assembles the global array over the mesh.
Label dropout is the model's job (it needs the null class), not the pipeline's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import grain
import jax
import numpy as np

from lsync_jax.data.registry import DataSource, check_source


@dataclasses.dataclass(frozen=True)
class LoaderSpec:
    global_batch_size: int
    seed: int = 0
    shuffle: bool = True
    flip: bool = False  # random horizontal flips, p = 1/2
    num_epochs: int | None = None  # None: repeat forever
    read_threads: int = 2
    prefetch_batches: int = 4
    # Extra per-example fields beside 'x' and 'y': 'image' (the uint8 image, flipped with 'x') for an
    # encoder run in the step, or 'encoder_features' (precomputed tokens, latents only).
    fields: tuple[str, ...] = ()


EXTRA_FIELDS = ("image", "encoder_features")


def to_example(source: DataSource, record: Mapping[str, Any], rng: np.random.Generator, flip: bool,
               fields: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """A record as a training example {'x', 'y', *fields}: the source's `example` (latents draw a
    posterior sample, motions a crop)."""
    return source.example(record, rng, flip, fields)


class _LoadSlice:
    """Global batch of indices -> this process's records, as arrays. Each record's RNG (flip, latent
    noise) comes from the seed, the global batch number and the position in the batch, so it too is
    independent of the process count."""

    def __init__(self, source: DataSource, spec: LoaderSpec, process_index: int, local_batch: int):
        self.source, self.spec, self.start, self.local_batch = source, spec, process_index * local_batch, local_batch

    def __call__(self, batch_number: int, indices: np.ndarray) -> dict[str, np.ndarray]:
        examples = []
        for j in range(self.start, self.start + self.local_batch):
            rng = np.random.default_rng((self.spec.seed, batch_number, j))
            examples.append(to_example(self.source, self.source[int(indices[j])], rng, self.spec.flip,
                                       self.spec.fields))
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def make_loader(source: DataSource, spec: LoaderSpec, *, process_index: int | None = None,
                process_count: int | None = None) -> grain.IterDataset:
    """An iterable of this process's share of each global batch; `iter()` gives a checkpointable iterator."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if spec.global_batch_size % process_count:
        raise ValueError(f"data.batch_size={spec.global_batch_size} is not divisible by the "
                         f"{process_count} processes")
    unknown = sorted(set(spec.fields) - set(EXTRA_FIELDS))
    if unknown:
        raise ValueError(f"unknown loader field(s) {unknown}; available: {EXTRA_FIELDS}")
    check_source(source).check_fields(spec.fields, spec.flip)
    if len(source) < spec.global_batch_size:
        raise ValueError(f"the dataset has {len(source)} records: too few for a batch of {spec.global_batch_size}")
    local_batch = spec.global_batch_size // process_count
    indices = grain.MapDataset.range(len(source))
    if spec.shuffle:
        indices = indices.shuffle(seed=spec.seed)
    batches = indices.repeat(spec.num_epochs).batch(spec.global_batch_size, drop_remainder=True)
    # A few reader threads and a short prefetch: grain's defaults (16 threads, 500 batches) would hold
    # hundreds of batches in host memory for large images.
    read = grain.ReadOptions(num_threads=spec.read_threads, prefetch_buffer_size=spec.prefetch_batches)
    return batches.map_with_index(_LoadSlice(source, spec, process_index, local_batch)).to_iter_dataset(read)


def global_batch(local: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Assemble each process's local batch into one global array laid out by `sharding`."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
