"""grain input pipelines: deterministic for a seed, sharded per process, checkpointable.

Each process reads its own shard of the records and yields its share of the global batch as
{'x': float32 (B, H, W, C) in [-1, 1], 'y': int32 (B,)}; `global_batch` assembles the global array
over the mesh. Label dropout is the model's job (it needs the null class), not the pipeline's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import grain.python as grain
import jax
import numpy as np


class ToFloat(grain.MapTransform):
    """uint8 [0, 255] -> float32 [-1, 1]; 'image'/'label' -> 'x'/'y'."""

    def map(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        x = np.asarray(record["image"], np.float32) / 127.5 - 1.0
        return {"x": x, "y": np.int32(record["label"])}


class RandomFlip(grain.RandomMapTransform):
    """Horizontal flip with probability 1/2 (the per-record RNG comes from grain: deterministic)."""

    def random_map(self, record: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        if rng.random() < 0.5:
            record = dict(record, x=record["x"][:, ::-1])
        return record


@dataclasses.dataclass(frozen=True)
class LoaderSpec:
    global_batch_size: int
    seed: int = 0
    shuffle: bool = True
    flip: bool = False
    num_epochs: int | None = None  # None: repeat forever
    worker_count: int = 0


def make_loader(source: Any, spec: LoaderSpec, *, process_index: int | None = None,
                process_count: int | None = None) -> grain.DataLoader:
    """A grain DataLoader yielding this process's share of each global batch (drop remainder)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if spec.global_batch_size % process_count:
        raise ValueError(f"data.batch_size={spec.global_batch_size} is not divisible by the "
                         f"{process_count} processes")
    local_batch = spec.global_batch_size // process_count
    shard = grain.ShardOptions(shard_index=process_index, shard_count=process_count, drop_remainder=True)
    if len(source) // process_count < local_batch:
        raise ValueError(f"the dataset has {len(source)} records: too few for a per-process batch of {local_batch}")
    sampler = grain.IndexSampler(num_records=len(source), shard_options=shard, shuffle=spec.shuffle,
                                 num_epochs=spec.num_epochs, seed=spec.seed)
    operations = [ToFloat()]
    if spec.flip:
        operations.append(RandomFlip())
    operations.append(grain.Batch(local_batch, drop_remainder=True))
    return grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                            worker_count=spec.worker_count)


def global_batch(local: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Assemble each process's local batch into one global array laid out by `sharding`."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
