"""REPA's projectors: the network side of REPA (Yu et al.; the loss is `lsync_jax.objectives.repa`).

The model switch is three SiT fields, named as REPA's constructor names them (`PROJECTOR_FIELDS`):
`z_dims` (one projector per entry, its output width; () is off), `encoder_depth` (the 1-indexed block
whose output they read) and `projector_dim` (their hidden width). Checkpoints, configs
(`model.overrides.z_dims`), run records and the official converter (`lsync_jax.porting.official`) use
these names, and the projectors' parameters sit at the top of the model's tree as `projectors_{k}`
(`fc_0`, `fc_1`, `fc_2`), so the names stay on the model: only the code lives here.

`sow_projections(model, h)` runs inside the model's compact call, so each projector is the model's
own child (`projectors_{k}`, as REPA's `projectors.{k}`), and sows `projection_{k}`: (N, T, z_dim)
per-token features for the alignment loss.
"""

from __future__ import annotations

import numbers
from typing import Any, MutableMapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from lsync_jax.models.layers import Dense, xavier_uniform

Dtype = Any
# The SiT fields that switch REPA's projectors on and shape them (see the module docstring).
PROJECTOR_FIELDS = ("z_dims", "encoder_depth", "projector_dim")


def projection_name(index: int) -> str:
    """Name of the sown output of REPA projector `index` (0-indexed, as `z_dims`): 'projection_0'."""
    return f"projection_{index}"


def projector_param_name(index: int) -> str:
    """Where projector `index`'s parameters sit in the model's tree: 'projectors_0' (REPA's `projectors.0`)."""
    return f"projectors_{index}"


class Projector(nn.Module):
    """REPA's per-token projector: Dense(projector_dim) - SiLU - Dense(projector_dim) - SiLU - Dense(z_dim),
    xavier-uniform kernels and zero biases as REPA initialises it."""

    projector_dim: int
    z_dim: int
    dtype: Dtype = jnp.float32
    layout: str = "accelerator"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = dict(kernel_init=xavier_uniform, dtype=self.dtype, layout=self.layout)
        h = nn.silu(Dense(self.projector_dim, name="fc_0", **dense)(x))
        h = nn.silu(Dense(self.projector_dim, name="fc_1", **dense)(h))
        return Dense(self.z_dim, name="fc_2", **dense)(h)


def sow_projections(model: nn.Module, h: jax.Array) -> None:
    """Project block `model.encoder_depth`'s output `h` with each of `model`'s projectors and sow the results.
    Called inside `model`'s compact `__call__`: the projectors are its children (`projectors_{k}`)."""
    for k, z_dim in enumerate(model.z_dims):
        z = Projector(model.projector_dim, z_dim, model.dtype, model.layout, name=projector_param_name(k))(h)
        model.sow("intermediates", projection_name(k), z)


def check_projector_fields(fields: MutableMapping[str, Any]) -> None:
    """Check (and normalise `z_dims` to a tuple of ints, in place) the projector fields of a model's
    fields, naming the key: before any compile."""
    z_dims = fields["z_dims"]
    if isinstance(z_dims, (str, numbers.Number)) or not all(
        isinstance(z, numbers.Integral) and not isinstance(z, bool) and z >= 1 for z in z_dims
    ):
        raise ValueError(f"model.z_dims must be a tuple of positive ints (one REPA projector each, e.g. (768,)), "
                         f"got {z_dims!r}")
    fields["z_dims"] = tuple(int(z) for z in z_dims)
    if fields["z_dims"]:
        encoder_depth = fields["encoder_depth"]
        if not 1 <= encoder_depth <= fields["depth"]:
            raise ValueError(f"model.encoder_depth={encoder_depth} (the block whose output the REPA projectors read, "
                             f"1-indexed) must be in [1, depth={fields['depth']}]")
        if fields["projector_dim"] < 1:
            raise ValueError(f"model.projector_dim must be positive, got {fields['projector_dim']}")
