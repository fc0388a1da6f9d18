"""SiT / DiT: the diffusion transformer of Ma et al. (SiT) and Peebles & Xie (DiT), in flax.linen.

Inputs and outputs are NHWC. After every block the residual stream is sown into the
'intermediates' collection as `block_1` ... `block_D` (1-indexed, as the papers count), so that
regularisers such as LayerSync can ask for exactly the layers they align:

    out, state = model.apply(variables, x, t, y, train=True, mutable=['intermediates'],
                             rngs={'dropout': key})
    h8 = state['intermediates']['block_8'][0]        # (N, T, D)

With `z_dims` (REPA's projectors, `lsync_jax.models.projector`), the output of block `encoder_depth`
also goes through one MLP per entry of `z_dims`, sown as `projection_0`, ...: (N, T, z_dim) per-token
features for an alignment loss. The forward still returns the velocity.
"""

from __future__ import annotations

import math
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lsync_jax.models.layers import (
    AdaLNBlock,
    FinalLayer,
    LabelEmbedder,
    TagEmbedder,
    TimestepEmbedder,
    check_image_inputs,
    check_layout,
    dummy_inputs,
    fan_in_normal,
    patch_embed_init,
    remat_block,
    sincos_1d,
    sincos_2d,
    sincos_spacetime,
)
from lsync_jax.models.mup import check_parametrization
from lsync_jax.models.projector import sow_projections
from lsync_jax.models.rerouting import LongSkipFusion, SelfCondition

Dtype = Any


def block_name(index: int) -> str:
    """Name of the sown output of block `index` (1-indexed): 'block_8' for the 8th block."""
    return f"block_{index}"


class SiT(nn.Module):
    """Diffusion transformer with adaLN-Zero blocks, fixed 2-D sin-cos positions, class labels.

    Attributes follow the official constructor. `input_size` is only the default spatial size
    used by `init_inputs`; because the position embedding is fixed, the model accepts any
    H x W that `patch_size` divides. With `learn_sigma` the final layer has 2 * in_channels
    outputs (for official checkpoints) and, as the official forward does, only the first half
    (the velocity) is returned. `z_dims`, `encoder_depth`, `projector_dim`: REPA's switch, one
    projector per entry of `z_dims` (none by default) on the output of block `encoder_depth`
    (1-indexed), sown as `projection_{k}` (`lsync_jax.models.projector`). `dtype` is the compute
    dtype; parameters stay float32 and the output is float32. `attention_impl`: 'auto' (cuDNN flash
    attention on GPUs in bf16/fp16, as the builders resolve it from the mesh's platform; 'xla' when
    left unresolved), 'xla' or 'cudnn'.
    `layout`: 'accelerator' or 'cpu' (`layers.LAYOUTS`; the builders resolve it from the platform).
    `remat`: 'none', 'blocks' or 'dots' (`layers.REMAT_POLICIES`; True/False: 'blocks'/'none').
    `parametrization`: 'sp' (the official initialisation) or 'mup' (muP as the
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
    # REPA's switch (models/projector.py): projectors of these widths (none by default) on block encoder_depth
    z_dims: tuple[int, ...] = ()
    encoder_depth: int = 8
    projector_dim: int = 2048
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    remat: bool | str = False
    layout: str = "accelerator"
    parametrization: str = "sp"
    mup_base_width: int = 288  # the muP-DiT base: 4 heads of 72 (DiT-XL/2 is 16 of 72)
    output_multiplier: float = 1.0
    long_skips: bool = False  # DiverseDiT's long residuals (lsync_jax/models/rerouting.py)
    self_condition: int = 0  # DDAE++ self-conditioning from this block (1-indexed; 0: off)
    self_condition_stop_gradient: bool = False

    num_tags: int = 0  # > 0: y is a multi-hot (N, num_tags) tag vector instead of a class label
    tag_dropout_prob: float = 0.1

    kind = "image"  # what the model takes: 'image', 'sequence' or 'video' (not a field)

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def null_label(self) -> int:
        """The unconditional ("null") input guidance uses: the extra class `num_classes`, or with tags the
        all-zero tag vector (samplers fill a batch of it with this value)."""
        return 0 if self.num_tags else self.num_classes

    # -- the input's geometry: an image here; the sequence and video models override these ----------
    @property
    def patch_shape(self) -> tuple[int, ...]:
        return (self.patch_size, self.patch_size)

    @nn.nowrap
    def grid(self, x: jax.Array) -> tuple[int, ...]:
        """Patches along each axis of an input (N, *axes, C)."""
        return tuple(n // p for n, p in zip(x.shape[1:-1], self.patch_shape))

    @nn.nowrap
    def positions(self, grid: tuple[int, ...]) -> np.ndarray:
        return sincos_2d(self.hidden_size, *grid)

    @nn.nowrap
    def unpatchify(self, x: jax.Array, grid: tuple[int, ...]) -> jax.Array:
        p = self.patch_size
        return einops.rearrange(x, "n (h w) (p q c) -> n (h p) (w q) c", h=grid[0], w=grid[1], p=p, q=p)

    def init_inputs(self, batch_size: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Dummy (x, t, y) of the configured shape, for `init` and `jax.eval_shape`."""
        x, t, y = dummy_inputs(batch_size, self.input_size, self.in_channels)
        return x, t, self._dummy_condition(batch_size, y)

    @nn.nowrap
    def _dummy_condition(self, batch_size: int, y: jax.Array) -> jax.Array:
        return jnp.zeros((batch_size, self.num_tags), jnp.float32) if self.num_tags else y

    def check_inputs(self, x: jax.Array, t: jax.Array, y: jax.Array) -> None:
        """Raise a ValueError naming the problem for inputs this model cannot take."""
        check_image_inputs("SiT", x, t, y if not self.num_tags else y[:, 0], self.in_channels, self.patch_size)
        self._check_condition(x, y)

    @nn.nowrap
    def _check_condition(self, x: jax.Array, y: jax.Array) -> None:
        if self.num_tags and y.shape != (x.shape[0], self.num_tags):
            raise ValueError(f"the model takes tags of width num_tags={self.num_tags}: y must be a multi-hot "
                             f"({x.shape[0]}, {self.num_tags}) array, got shape {y.shape}")
        if self.num_tags and self.num_classes:
            raise ValueError("a model conditions on class labels (num_classes) or on tags (num_tags), not both")

    @nn.nowrap
    def token_lengths(self, mask: jax.Array | None, grid: tuple[int, ...]) -> jax.Array | None:
        """Valid tokens per example from a step mask (N, L) (True: real; padding at the end), or None."""
        return None

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, *, train: bool = False,
                 mask: jax.Array | None = None, drop_draws: jax.Array | None = None) -> jax.Array:
        """x: (N, *axes, C) inputs (an image: (N, H, W, C)); t: (N,) times (t = 1 is data); y: (N,)
        labels or (N, num_tags) tags; `mask`: (N, L) real steps of padded sequences -> like x.
        `drop_draws` (N,): per-example uniform numbers for the condition dropout in training
        (`LabelEmbedder`); None draws from the 'dropout' RNG stream."""
        self.check_inputs(x, t, y)
        check_parametrization(self.parametrization, self.hidden_size, self.num_heads, self.mup_base_width,
                              self.output_multiplier)
        grid, patch = self.grid(x), self.patch_shape
        x = nn.Conv(
            self.hidden_size,
            kernel_size=patch,
            strides=patch,
            padding="VALID",
            kernel_init=fan_in_normal if self.parametrization == "mup" else patch_embed_init,
            dtype=self.dtype,
            name="x_embedder",
        )(x.astype(self.dtype))
        x = x.reshape(x.shape[0], math.prod(grid), self.hidden_size)
        x = x + jnp.asarray(self.positions(grid), self.dtype)[None]
        lengths = self.token_lengths(mask, grid)
        if lengths is not None:  # for the regularisers' token averages
            self.sow("intermediates", "token_mask", jnp.arange(x.shape[1])[None, :] < lengths[:, None])

        check_layout(self.layout)
        mup = dict(parametrization=self.parametrization, layout=self.layout)
        c = TimestepEmbedder(self.hidden_size, dtype=self.dtype, name="t_embedder", **mup)(t)
        if self.num_classes > 0:
            c = c + LabelEmbedder(
                self.num_classes, self.hidden_size, self.class_dropout_prob, dtype=self.dtype, name="y_embedder",
                parametrization=self.parametrization)(y, train, drop_draws)
        if self.num_tags > 0:
            c = c + TagEmbedder(self.num_tags, self.hidden_size, self.tag_dropout_prob, dtype=self.dtype,
                                layout=self.layout, name="tag_embedder")(y, train, drop_draws)

        block_cls = remat_block(AdaLNBlock, self.remat)
        if not 0 <= self.self_condition < self.depth:
            raise ValueError(f"self_condition={self.self_condition} must name a block in 1..{self.depth - 1} that has "
                             "later blocks to condition (0: off)")
        outputs = []
        for i in range(self.depth):
            x = block_cls(
                self.hidden_size, self.num_heads, self.mlp_ratio, self.dtype, self.attention_impl, name=f"blocks_{i}",
                **mup
            )(x, c, lengths)
            if self.long_skips and 2 * i > self.depth - 1:  # the mirror block's output, U-ViT's pairing
                x = LongSkipFusion(self.hidden_size, self.dtype, name=f"long_skips_{i}", **mup)(
                    x, outputs[self.depth - 1 - i])
            outputs.append(x)
            self.sow("intermediates", block_name(i + 1), x)
            if i + 1 == self.self_condition:
                c = c + SelfCondition(self.hidden_size, self.self_condition_stop_gradient, self.dtype,
                                      name="self_condition", **mup)(x).astype(c.dtype)
            if i + 1 == self.encoder_depth:
                sow_projections(self, x)

        x = FinalLayer(self.hidden_size, self.patch_size, self.out_channels, dtype=self.dtype, name="final_layer",
                       output_multiplier=self.output_multiplier,
                       width_multiplier=self.hidden_size / self.mup_base_width, patch_elements=math.prod(patch),
                       **mup)(x, c)
        x = self.unpatchify(x, grid)
        if self.learn_sigma:
            x = x[..., : self.in_channels]
        return x.astype(jnp.float32)


class SiTSequence(SiT):
    """SiT over 1-D sequences (N, L, C): audio VAE latents, motion features, any per-step vectors.
    Patches of `patch_size` steps, 1-D sin-cos positions, any L that the patch divides (`input_size`
    is the default L). The blocks, their sown `block_i`, the conditioning and the options are the
    image SiT's. `mask` (N, L) marks real steps of padded sequences (padding at the end): padded
    tokens are never attended to, and their 'token_mask' (sown) keeps them out of the regularisers'
    averages; a token is real when its first step is."""

    kind = "sequence"

    @property
    def patch_shape(self) -> tuple[int, ...]:
        return (self.patch_size,)

    @nn.nowrap
    def positions(self, grid: tuple[int, ...]) -> np.ndarray:
        return sincos_1d(self.hidden_size, np.arange(grid[0], dtype=np.float32)).astype(np.float32)

    @nn.nowrap
    def unpatchify(self, x: jax.Array, grid: tuple[int, ...]) -> jax.Array:
        return einops.rearrange(x, "n l (p c) -> n (l p) c", l=grid[0], p=self.patch_size)

    def init_inputs(self, batch_size: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
        x = jnp.zeros((batch_size, self.input_size, self.in_channels), jnp.float32)
        return x, jnp.zeros((batch_size,), jnp.float32), self._dummy_condition(batch_size, jnp.zeros((batch_size,),
                                                                                                     jnp.int32))

    def check_inputs(self, x: jax.Array, t: jax.Array, y: jax.Array) -> None:
        if x.ndim != 3:
            raise ValueError(f"SiTSequence expects (N, L, C) inputs of rank 3, got shape {x.shape}")
        n, length, c = x.shape
        if c != self.in_channels:
            raise ValueError(f"SiTSequence has in_channels={self.in_channels} but the input has shape {x.shape} "
                             "(N, L, C)")
        if length % self.patch_size:
            raise ValueError(f"sequence length {length} is not divisible by patch_size={self.patch_size}")
        _check_batch(n, t, y, self.num_tags)
        self._check_condition(x, y)

    @nn.nowrap
    def token_lengths(self, mask: jax.Array | None, grid: tuple[int, ...]) -> jax.Array | None:
        if mask is None:
            return None
        if mask.ndim != 2 or mask.shape[1] != grid[0] * self.patch_size:
            raise ValueError(f"mask must be (N, L) with L = {grid[0] * self.patch_size}, got {mask.shape}")
        steps = jnp.sum(mask.astype(jnp.int32), axis=1)
        return jnp.maximum((steps + self.patch_size - 1) // self.patch_size, 1)


class SiTVideo(SiT):
    """SiT over video (N, F, H, W, C): spatio-temporal patches (`temporal_patch`, `patch_size`,
    `patch_size`) flattened frame-major into one token sequence, positions = each frame's 2-D table
    plus a 1-D table of the frame (`sincos_spacetime`). `input_size` is H = W, `num_frames` F (the
    defaults `init_inputs` uses; any F, H, W the patch divides work). Blocks, `block_i`, conditioning
    and options are the image SiT's."""

    kind = "video"

    num_frames: int = 8
    temporal_patch: int = 2

    @property
    def patch_shape(self) -> tuple[int, ...]:
        return (self.temporal_patch, self.patch_size, self.patch_size)

    @nn.nowrap
    def positions(self, grid: tuple[int, ...]) -> np.ndarray:
        return sincos_spacetime(self.hidden_size, *grid)

    @nn.nowrap
    def unpatchify(self, x: jax.Array, grid: tuple[int, ...]) -> jax.Array:
        a, p = self.temporal_patch, self.patch_size
        return einops.rearrange(x, "n (f h w) (a p q c) -> n (f a) (h p) (w q) c", f=grid[0], h=grid[1], w=grid[2],
                                a=a, p=p, q=p)

    def init_inputs(self, batch_size: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
        x = jnp.zeros((batch_size, self.num_frames, self.input_size, self.input_size, self.in_channels), jnp.float32)
        return x, jnp.zeros((batch_size,), jnp.float32), self._dummy_condition(batch_size, jnp.zeros((batch_size,),
                                                                                                     jnp.int32))

    def check_inputs(self, x: jax.Array, t: jax.Array, y: jax.Array) -> None:
        if x.ndim != 5:
            raise ValueError(f"SiTVideo expects (N, F, H, W, C) inputs of rank 5, got shape {x.shape}")
        n, f, h, w, c = x.shape
        if c != self.in_channels:
            raise ValueError(f"SiTVideo has in_channels={self.in_channels} but the input has shape {x.shape} "
                             "(N, F, H, W, C)")
        if f % self.temporal_patch or h % self.patch_size or w % self.patch_size:
            raise ValueError(f"video of {f} frames of {h}x{w} is not divisible by the patch "
                             f"({self.temporal_patch}, {self.patch_size}, {self.patch_size})")
        _check_batch(n, t, y, self.num_tags)
        self._check_condition(x, y)


def _check_batch(n: int, t: jax.Array, y: jax.Array, num_tags: int) -> None:
    if t.shape != (n,):
        raise ValueError(f"t must have shape ({n},) for a batch of {n}, got {t.shape}")
    if not num_tags and y.shape != (n,):
        raise ValueError(f"y must have shape ({n},) for a batch of {n}, got {y.shape}")
