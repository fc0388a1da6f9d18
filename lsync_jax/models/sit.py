"""SiT / DiT: the diffusion transformer of Ma et al. (SiT) and Peebles & Xie (DiT), in flax.linen.

Inputs and outputs are NHWC. After every block the residual stream is sown into the
'intermediates' collection as `block_1` ... `block_D` (1-indexed, as the papers count), so that
regularisers such as LayerSync can ask for exactly the layers they align:

    out, state = model.apply(variables, x, t, y, train=True, mutable=['intermediates'],
                             rngs={'dropout': key})
    h8 = state['intermediates']['block_8'][0]        # (N, T, D)

With `z_dims` (REPA's projectors, as in sihyun-yu/REPA `models/sit.py`), the output of block
`encoder_depth` also goes through one MLP per entry of `z_dims`, sown as `projection_0`, ...:
(N, T, z_dim) per-token features for an alignment loss. The forward still returns the velocity.
"""

from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from lsync_jax.models.layers import (
    AdaLNBlock,
    FinalLayer,
    LabelEmbedder,
    TimestepEmbedder,
    check_image_inputs,
    dummy_inputs,
    fan_in_normal,
    patch_embed_init,
    sincos_2d,
    xavier_uniform,
)
from lsync_jax.models.mup import check_parametrization
from lsync_jax.models.rerouting import LongSkipFusion, SelfCondition

Dtype = Any


def block_name(index: int) -> str:
    """Name of the sown output of block `index` (1-indexed): 'block_8' for the 8th block."""
    return f"block_{index}"


def projection_name(index: int) -> str:
    """Name of the sown output of REPA projector `index` (0-indexed, as `z_dims`): 'projection_0'."""
    return f"projection_{index}"


class Projector(nn.Module):
    """REPA's per-token projector: Dense(projector_dim) - SiLU - Dense(projector_dim) - SiLU - Dense(z_dim),
    xavier-uniform kernels and zero biases as REPA initialises it."""

    projector_dim: int
    z_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.silu(nn.Dense(self.projector_dim, kernel_init=xavier_uniform, dtype=self.dtype, name="fc_0")(x))
        h = nn.silu(nn.Dense(self.projector_dim, kernel_init=xavier_uniform, dtype=self.dtype, name="fc_1")(h))
        return nn.Dense(self.z_dim, kernel_init=xavier_uniform, dtype=self.dtype, name="fc_2")(h)


class SiT(nn.Module):
    """Diffusion transformer with adaLN-Zero blocks, fixed 2-D sin-cos positions, class labels.

    Attributes follow the official constructor. `input_size` is only the default spatial size
    used by `init_inputs`; because the position embedding is fixed, the model accepts any
    H x W that `patch_size` divides. With `learn_sigma` the final layer has 2 * in_channels
    outputs (for official checkpoints) and, as the official forward does, only the first half
    (the velocity) is returned. `z_dims`, `encoder_depth`, `projector_dim`: REPA's projectors, one
    per entry of `z_dims` (none by default) on the output of block `encoder_depth` (1-indexed),
    sown as `projection_{k}`. `dtype` is the compute dtype; parameters stay float32 and the
    output is float32. `attention_impl`: 'auto' (cuDNN flash attention on GPUs in bf16/fp16),
    'xla' or 'cudnn'. `parametrization`: 'sp' (the official initialisation) or 'mup' (muP as the
    muP-DiT code: N(0, 1/fan_in) weights, adaLN not zero, readout input times
    `output_multiplier * mup_base_width / hidden_size`; the optimizer side is
    `lsync_jax.models.mup.mup_lr_multipliers`). `long_skips` (DiverseDiT) and `self_condition`
    (DDAE++) feed the model's own block outputs to later blocks (`lsync_jax.models.rerouting`).
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    z_dims: tuple[int, ...] = ()
    encoder_depth: int = 8
    projector_dim: int = 2048
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    remat: bool = False
    parametrization: str = "sp"
    mup_base_width: int = 288  # the muP-DiT base: 4 heads of 72 (DiT-XL/2 is 16 of 72)
    output_multiplier: float = 1.0
    long_skips: bool = False  # DiverseDiT's long residuals (lsync_jax/models/rerouting.py)
    self_condition: int = 0  # DDAE++ self-conditioning from this block (1-indexed; 0: off)
    self_condition_stop_gradient: bool = False

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def null_label(self) -> int:
        """The label index of the unconditional ("null") class used for guidance."""
        return self.num_classes

    def init_inputs(self, batch_size: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Dummy (x, t, y) of the configured shape, for `init` and `jax.eval_shape`."""
        return dummy_inputs(batch_size, self.input_size, self.in_channels)

    def check_inputs(self, x: jax.Array, t: jax.Array, y: jax.Array) -> None:
        """Raise a ValueError naming the problem for inputs this model cannot take."""
        check_image_inputs("SiT", x, t, y, self.in_channels, self.patch_size)

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, *, train: bool = False) -> jax.Array:
        """x: (N, H, W, C) inputs; t: (N,) times (t = 1 is data); y: (N,) labels -> (N, H, W, C)."""
        self.check_inputs(x, t, y)
        check_parametrization(self.parametrization, self.hidden_size, self.num_heads, self.mup_base_width,
                              self.output_multiplier)
        _, height, width, _ = x.shape
        p = self.patch_size
        gh, gw = height // p, width // p

        x = nn.Conv(
            self.hidden_size,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            kernel_init=fan_in_normal if self.parametrization == "mup" else patch_embed_init,
            dtype=self.dtype,
            name="x_embedder",
        )(x.astype(self.dtype))
        x = x.reshape(x.shape[0], gh * gw, self.hidden_size)
        x = x + jnp.asarray(sincos_2d(self.hidden_size, gh, gw), self.dtype)[None]

        mup = dict(parametrization=self.parametrization)
        c = TimestepEmbedder(self.hidden_size, dtype=self.dtype, name="t_embedder", **mup)(t)
        if self.num_classes > 0:
            c = c + LabelEmbedder(
                self.num_classes, self.hidden_size, self.class_dropout_prob, dtype=self.dtype, name="y_embedder", **mup
            )(y, train)

        block_cls = nn.remat(AdaLNBlock) if self.remat else AdaLNBlock
        if not 0 <= self.self_condition < self.depth:
            raise ValueError(f"self_condition={self.self_condition} must name a block in 1..{self.depth - 1} that has "
                             "later blocks to condition (0: off)")
        outputs = []
        for i in range(self.depth):
            x = block_cls(
                self.hidden_size, self.num_heads, self.mlp_ratio, self.dtype, self.attention_impl, name=f"blocks_{i}",
                **mup
            )(x, c)
            if self.long_skips and 2 * i > self.depth - 1:  # the mirror block's output, U-ViT's pairing
                x = LongSkipFusion(self.hidden_size, self.dtype, name=f"long_skips_{i}", **mup)(
                    x, outputs[self.depth - 1 - i])
            outputs.append(x)
            self.sow("intermediates", block_name(i + 1), x)
            if i + 1 == self.self_condition:
                c = c + SelfCondition(self.hidden_size, self.self_condition_stop_gradient, self.dtype,
                                      name="self_condition", **mup)(x).astype(c.dtype)
            if i + 1 == self.encoder_depth:
                for k, z_dim in enumerate(self.z_dims):
                    z = Projector(self.projector_dim, z_dim, self.dtype, name=f"projectors_{k}")(x)
                    self.sow("intermediates", projection_name(k), z)

        x = FinalLayer(self.hidden_size, p, self.out_channels, dtype=self.dtype, name="final_layer",
                       output_multiplier=self.output_multiplier,
                       width_multiplier=self.hidden_size / self.mup_base_width, **mup)(x, c)
        x = einops.rearrange(x, "n (h w) (p q c) -> n (h p) (w q) c", h=gh, w=gw, p=p, q=p)
        if self.learn_sigma:
            x = x[..., : self.in_channels]
        return x.astype(jnp.float32)
