"""Device mesh and parameter placement: one code path from one CPU to a TPU pod or GPU node.

The mesh has two named axes: 'data' (pure data parallelism) and 'fsdp' (data parallelism whose
devices also split the parameters and optimizer state). The batch is split over both. Parameter
placement comes from a short list of (regex, rule) pairs matched against the '/'-joined parameter
path; the first match wins:

    'replicate'  every device holds the whole tensor
    'fsdp'       shard the largest dimension that the fsdp axis divides (replicate if none does)
    'auto'       'replicate' below `min_shard_size` elements, else 'fsdp'
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)
DEFAULT_RULES: tuple[tuple[str, str], ...] = ((r".*", "auto"),)
RULES = ("replicate", "fsdp", "auto")


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all); -1 on one axis takes what is left."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    problem = mesh_problem(data, fsdp, n)
    if problem:
        raise ValueError(problem)
    data = n // fsdp if data == -1 else data
    fsdp = n // data if fsdp == -1 else fsdp
    return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)


def mesh_problem(data: int, fsdp: int, num_devices: int) -> str:
    """Why config.mesh.data x config.mesh.fsdp cannot tile `num_devices` devices, and what would ('' if
    it can): each is a positive size or -1 (what is left), and their product must be the device count."""
    divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
    given = f"config.mesh.data={data}, config.mesh.fsdp={fsdp}"
    hint = (f"with {num_devices} device(s), a fixed size must divide {num_devices} (one of "
            f"{', '.join(map(str, divisors))}) and data x fsdp must equal {num_devices}; set the other key to -1 "
            f"to take what is left (e.g. --config.mesh.data=-1 --config.mesh.fsdp=1)")
    for key, value in (("data", data), ("fsdp", fsdp)):
        if value != -1 and value < 1:
            return f"{given}: config.mesh.{key} must be >= 1 or -1 (what is left); {hint}"
    if data == -1 and fsdp == -1:
        return f"{given}: at most one of config.mesh.data and config.mesh.fsdp may be -1; {hint}"
    if data == -1 or fsdp == -1:
        key, value = ("fsdp", fsdp) if data == -1 else ("data", data)
        if num_devices % value:
            return f"{given}: config.mesh.{key}={value} does not divide the {num_devices} devices present; {hint}"
        return ""
    if data * fsdp != num_devices:
        return f"{given}: data x fsdp = {data * fsdp} does not cover the {num_devices} devices present; {hint}"
    return ""


def path_name(path: tuple) -> str:
    """'/'-joined names of a pytree key path, e.g. 'params/blocks_0/attn/qkv/kernel'."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def partition_spec(name: str, shape: tuple[int, ...], fsdp_size: int,
                   rules: Sequence[tuple[str, str]] = DEFAULT_RULES, min_shard_size: int = 2**18) -> P:
    """The PartitionSpec of one array, from the first rule whose regex matches `name`."""
    for pattern, rule in rules:
        if re.fullmatch(pattern, name):
            break
    else:
        rule = "replicate"
    if rule not in RULES:
        raise ValueError(f"sharding rule {rule!r} for {pattern!r}; expected one of {RULES}")
    size = int(np.prod(shape)) if shape else 1
    if rule == "replicate" or fsdp_size == 1 or (rule == "auto" and size < min_shard_size):
        return P()
    dims = sorted(range(len(shape)), key=lambda d: -shape[d])
    for d in dims:
        if shape[d] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[d] = FSDP
            return P(*spec)
    return P()


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, str]] = DEFAULT_RULES,
                   min_shard_size: int = 2**18) -> Any:
    """NamedShardings for every array leaf of `tree` (arrays or ShapeDtypeStructs)."""
    fsdp_size = mesh.shape[FSDP]

    def leaf(path, x):
        shape = tuple(getattr(x, "shape", ()))
        return NamedSharding(mesh, partition_spec(path_name(path), shape, fsdp_size, rules, min_shard_size))

    return jax.tree_util.tree_map_with_path(leaf, tree)


def with_shardings(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying their target shardings: the layout an Orbax restore fills in."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The batch's leading axis split over every device (data and fsdp)."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
