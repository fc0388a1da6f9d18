"""Modules that feed a transformer's own intermediate features to its later blocks.

- `LongSkipFusion`, DiverseDiT's long residual (arXiv 2603.04239; code unreleased, design from
  the paper's diagram f_l = Linear(Norm([f_{l-i} ; f_i])) and the public branch in REFERENCE.md):
  x <- Linear_{2D -> D}(LayerNorm_{2D}([x ; skip])), LayerNorm with affine and eps 1e-6 in float32,
  the Linear xavier-uniform with zero bias. In SiT with `long_skips=True`, 0-indexed block i with
  2 i > D - 1 fuses, after it runs, the output of its mirror block D - 1 - i (U-ViT's pairing: the
  last block gets the first block's output); the middle block of an odd depth has no partner.
  The fused value replaces x and is what the block sows.
- `SelfCondition`, DDAE++'s self-conditioning (arXiv 2505.10999; code unreleased). Our design,
  which the paper's description ("aggregates and reroutes intermediate features to guide
  subsequent decoding layers", ~1% compute, a semantic bottleneck) leaves open:
  * which layer: one block s (`SiT.self_condition`, 1-indexed), meant to be the semantically
    strongest one; our configs use LayerSync's strong block (round(4 D / 7), 16 of 28), where
    the LayerSync paper finds the probe-accuracy peak;
  * pooling: the mean over tokens of block s's output (N, D): a global, position-free summary,
    the same pooling our linear probes measure;
  * mapping: LayerNorm (no affine) -> Linear(D, D) -> SiLU -> Linear(D, D), the last Linear
    zero-initialised so a new model equals the baseline at step 0;
  * injection: added to the adaLN conditioning vector c (time + label embedding) of every block
    after s and of the final layer, which is where SiT already routes global information;
  * gradient: flows through by default (the velocity loss shapes the summary as it does every
    feature); `self_condition_stop_gradient=True` detaches block s's pooled feature instead.
  Cost: 2 D^2 parameters and 2 D^2 multiply-adds per sample (SiT-B/2: 1.2M of 131M parameters,
  0.9%; FLOPs about 0.01%; tests/models/test_rerouting.py computes both).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lsync_jax.models.layers import Dense, fan_in_normal

Dtype = Any


class LongSkipFusion(nn.Module):
    """[x ; skip] (N, T, 2D) -> LayerNorm -> Linear -> (N, T, D)."""

    hidden_size: int
    dtype: Dtype = jnp.float32
    parametrization: str = "sp"  # 'mup': a hidden matrix, N(0, 1/fan_in) (lsync_jax/models/mup.py)
    layout: str = "accelerator"  # layers.LAYOUTS

    @nn.compact
    def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
        joined = jnp.concatenate([x, skip], axis=-1).astype(jnp.float32)
        joined = nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, name="norm")(joined)
        init = fan_in_normal if self.parametrization == "mup" else nn.initializers.xavier_uniform()
        return Dense(self.hidden_size, kernel_init=init, bias_init=nn.initializers.zeros, dtype=self.dtype,
                     layout=self.layout, name="linear")(joined.astype(self.dtype))


class SelfCondition(nn.Module):
    """Block features (N, T, D) -> a (N, D) addition to the adaLN conditioning vector (zero at init)."""

    hidden_size: int
    stop_gradient: bool = False
    dtype: Dtype = jnp.float32
    parametrization: str = "sp"  # 'mup': fc_0 is a hidden matrix, N(0, 1/fan_in); fc_1 starts at zero either way
    layout: str = "accelerator"  # layers.LAYOUTS

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        pooled = jnp.mean(h.astype(jnp.float32), axis=1)
        if self.stop_gradient:
            pooled = jax.lax.stop_gradient(pooled)
        z = nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=jnp.float32, name="norm")(pooled)
        init = fan_in_normal if self.parametrization == "mup" else nn.linear.default_kernel_init
        z = Dense(self.hidden_size, kernel_init=init, dtype=self.dtype, layout=self.layout, name="fc_0")(
            z.astype(self.dtype))
        z = nn.silu(z)
        return Dense(self.hidden_size, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
                     dtype=self.dtype, layout=self.layout, name="fc_1")(z)
