"""U-ViT (Bao et al., "All are Worth Words", CVPR 2023) with ScaleLong's long-skip scaling
(Huang et al., NeurIPS 2023), in flax.linen, with the same interface as `lsync_jax.models.sit.SiT`.

Architecture (as baofff/U-ViT `libs/uvit.py`). Every input is a token: the patches
(conv, kernel = stride = patch), a time token and, for a class-conditional model, a label token,
in the order [label, time, patches], plus a position embedding. `depth` counts all blocks:
N = (depth - 1) / 2 in-blocks, one mid block and N out-blocks (U-ViT-S has 13; the official
constructor's `depth` is our depth - 1). Blocks are pre-LN transformer blocks,

    x <- x + Attn(LN(x)),    x <- x + MLP(LN(x)),

and out-block i (0-indexed in execution order) first merges the long skip from its mirror,
in-block N - 1 - i (the last in-block feeds the first out-block, the first in-block the last):

    x <- Linear_{2D -> D}([x ; lambda_i * h_{N-1-i}])

Then LayerNorm, Linear to p * p * C per patch token, unpatchify and (`final_conv`) a 3 x 3 conv.
The output is the velocity of lsync-jax's transport (t = 1 data, t = 0 noise).

ScaleLong's skip coefficients lambda_i (`skip_scaling`). ScaleLong shows that the oscillation
ranges of the hidden features and gradients, and the sensitivity to input perturbations, grow
with the long-skip coefficients; scaling them below 1 stabilises training:
- 'none':     lambda_i = 1 (plain U-ViT).
- 'constant': lambda_i = 1 / sqrt(2): the "1/sqrt(2)-CS" trick of Imagen, SR3, NCSN++ and
              StyleGAN (there it keeps the variance of a sum of two unit-variance streams at 1).
- 'cs':       lambda_i = kappa^(N - 1 - i), kappa = `skip_kappa` in [0.5, 0.95] (ScaleLong's range):
              the outermost skip (first in-block -> last out-block, i = N - 1) is kept as is and
              each skip nearer the middle is damped by one more factor kappa, so the total skip
              weight that ScaleLong's bounds grow with stays below 1 / (1 - kappa) at any depth.
- 'ls':       a learned per-token scale, as the official `Attentionlayer` (sail-sg/ScaleLong):
                  s = sigmoid(W2 ReLU(W1 mean_c(h) + b1) + b2),   lambda_i = s  (shape (B, L, 1)),
              with mean_c the mean over the D channels of each of the L tokens (extra tokens
              included), W1: L -> max(1, L // 16), W2: back to L. Squeeze-excitation style but, as
              the official code does, over tokens: the "squeeze" pools channels and the excitation
              gives one scale per token, learned from the features, in (0, 1) so it never amplifies
              a skip. `ls_shared`: one net for all out-blocks (ScaleLong's 'LS'), else one per
              out-block ('LS (non-share)'). Its Linears keep PyTorch's default init, as there.

Time and label tokens. The time token is the sinusoid [cos | sin] of width D of 1000 * t, then
(`mlp_time_embed`) Linear(D, 4D) - SiLU - Linear(4D, D). U-ViT feeds its timestep index (0..999)
to the sinusoid; t in [0, 1] would leave its low-frequency channels almost constant, so t is put
on that scale (the direction of time only relabels the embedding for a model trained from
scratch). The label token is `LabelEmbedder` (one home for label dropout with SiT): num_classes
rows plus a null row when class_dropout_prob > 0 (U-ViT's ImageNet models use num_classes = 1001
for the same purpose); in training, labels become the null class with probability
class_dropout_prob (RNG stream 'dropout'). `num_classes = 0`: no label token.

Position embedding (`pos_embed`). 'learned' (the official: trunc-normal, std 0.02, over the
extra tokens and the patches; inputs must be input_size x input_size) or 'sincos' (SiT's fixed
2-D table on the patches, none on the extra tokens; any H x W the patch divides, unless 'ls',
whose net is sized for the configured token count).

Sown intermediates. After every block (1-indexed in execution order: in-blocks, mid, out-blocks)
the PATCH tokens of the residual stream, (batch, T, D), are sown as `block_i` in 'intermediates', so
LayerSync and the block measurements read U-ViT exactly as they read SiT.

Differences from the official code, all deliberate: the blocks reuse `layers.Attention` and
`layers.Mlp` (one home with SiT): xavier-uniform Linears instead of trunc-normal(0.02) (the same
scale within a factor 1.5 at U-ViT widths), a zero-initialised qkv bias (U-ViT has qkv_bias=False;
3 D parameters per block) and tanh-GELU; the label table is N(0, 0.02) (PyTorch's default is
N(0, 1); every block normalises its input, so the token's scale barely matters).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from lsync_jax.models.layers import (
    ATTENTION_IMPLS,
    Attention,
    Dense,
    LabelEmbedder,
    Mlp,
    check_image_inputs,
    check_layout,
    dummy_inputs,
    remat_block,
    remat_policy,
    sincos_2d,
    timestep_frequencies,
)
from lsync_jax.models.sit import block_name

Dtype = Any

SKIP_SCALINGS = ("none", "constant", "cs", "ls")
POS_EMBEDS = ("learned", "sincos")
KAPPA_RANGE = (0.5, 0.95)  # ScaleLong's suggested range for CS
LS_REDUCTION = 16  # the official Attentionlayer's r
TIME_SCALE = 1000.0  # t in [0, 1] -> U-ViT's timestep scale for the sinusoid

# U-ViT initialises every Linear with timm's trunc_normal_(std=.02), whose cut at +-2 (absolute)
# never applies at this std: a plain N(0, 0.02).
normal_002 = nn.initializers.normal(0.02)
# PyTorch's default Linear/Conv weight init (kaiming_uniform, a = sqrt(5)): U(+-1 / sqrt(fan_in)).
torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default bias init for a layer with `fan_in` inputs: U(+-1 / sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def skip_scale_factors(skip_scaling: str, num_out_blocks: int, kappa: float = 0.7) -> tuple[float, ...]:
    """The constant coefficient lambda_i of each out-block's long skip (execution order).

    'none' -> 1, 'constant' -> 1 / sqrt(2), 'cs' -> kappa^(N - 1 - i); 'ls' has no constant factors.
    """
    n = num_out_blocks
    if skip_scaling == "none":
        return (1.0,) * n
    if skip_scaling == "constant":
        return (2.0**-0.5,) * n
    if skip_scaling == "cs":
        return tuple(float(kappa) ** (n - 1 - i) for i in range(n))
    raise ValueError(f"skip_scaling={skip_scaling!r} has no constant factors; expected one of "
                     f"{SKIP_SCALINGS[:3]} ('ls' learns them)")


class UViTBlock(nn.Module):
    """Pre-LN transformer block; with `long_skip`, first Linear(2D -> D) over [x ; skip]."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    long_skip: bool = False
    layout: str = "accelerator"

    @nn.compact
    def __call__(self, x: jax.Array, skip: jax.Array | None = None) -> jax.Array:
        if self.long_skip:
            x = Dense(self.hidden_size, kernel_init=normal_002, dtype=self.dtype, layout=self.layout,
                      name="skip_linear")(jnp.concatenate([x, skip], axis=-1))
        h = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm1")(x)
        x = x + Attention(self.hidden_size, self.num_heads, dtype=self.dtype, implementation=self.attention_impl,
                          layout=self.layout, name="attn")(h)
        h = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm2")(x)
        return x + Mlp(self.hidden_size, self.mlp_ratio, dtype=self.dtype, layout=self.layout, name="mlp")(h)


class SkipCalibration(nn.Module):
    """ScaleLong's LS net: (B, L, D) skip -> (B, L, 1) per-token scale in (0, 1) (module docstring)."""

    tokens: int
    dtype: Dtype = jnp.float32
    layout: str = "accelerator"

    @nn.compact
    def __call__(self, skip: jax.Array) -> jax.Array:
        hidden = max(1, self.tokens // LS_REDUCTION)
        pooled = jnp.mean(skip.astype(jnp.float32), axis=-1)  # (B, L): one number per token
        h = Dense(hidden, kernel_init=torch_default_kernel, bias_init=torch_default_bias(self.tokens),
                  dtype=self.dtype, layout=self.layout, name="layer1")(pooled)
        h = Dense(self.tokens, kernel_init=torch_default_kernel, bias_init=torch_default_bias(hidden),
                  dtype=self.dtype, layout=self.layout, name="layer2")(nn.relu(h))
        return nn.sigmoid(h.astype(jnp.float32))[..., None].astype(skip.dtype)


class UViT(nn.Module):
    """U-ViT with long skips between mirrored blocks and ScaleLong skip scaling (module docstring).

    Fields as `SiT` where they mean the same (`learn_sigma` must be False, `z_dims` empty: U-ViT
    predicts the velocity only and has no REPA projectors). Size defaults: U-ViT-H/2 on ImageNet
    256 latents (the official H/2 config also sets mlp_time_embed=False, final_conv=False).
    `dtype` is the compute dtype; parameters and the output are float32.
    `attention_impl`, `layout`: as SiT's. `remat`: as SiT's ('blocks' or True is the official
    `use_checkpoint`).
    """

    kind = "image"  # what the model takes (models.Backbone; not a field)

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 29
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = False
    z_dims: tuple[int, ...] = ()
    mlp_time_embed: bool = True
    pos_embed: str = "learned"
    final_conv: bool = True
    skip_scaling: str = "none"
    skip_kappa: float = 0.7
    ls_shared: bool = True
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    remat: bool | str = False
    layout: str = "accelerator"

    def __post_init__(self) -> None:
        self.validate()
        super().__post_init__()

    def validate(self) -> None:
        """Raise a ValueError naming the field for a configuration U-ViT cannot be built with."""
        for key in ("depth", "hidden_size", "num_heads", "input_size", "in_channels", "patch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"UViT {key}={value!r} must be a positive integer")
        if self.depth % 2 == 0:
            raise ValueError(f"UViT depth={self.depth} must be odd: depth counts (depth - 1) / 2 in-blocks, one "
                             f"mid block and as many out-blocks (U-ViT-S has depth 13, U-ViT-H 29)")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"UViT hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"UViT pos_embed={self.pos_embed!r}; expected one of {POS_EMBEDS}")
        if self.pos_embed == "sincos" and self.hidden_size % 4:
            raise ValueError(f"UViT hidden_size={self.hidden_size} must be a multiple of 4 for pos_embed='sincos'")
        if self.input_size % self.patch_size:
            raise ValueError(f"UViT input_size={self.input_size} is not divisible by patch_size={self.patch_size}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"UViT mlp_ratio={self.mlp_ratio} must be positive")
        if self.num_classes < 0:
            raise ValueError(f"UViT num_classes={self.num_classes} must be >= 0 (0: unconditional)")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"UViT class_dropout_prob={self.class_dropout_prob} must be in [0, 1)")
        if self.learn_sigma:
            raise ValueError("UViT learn_sigma=True is not supported: U-ViT predicts the velocity only "
                             "(set learn_sigma=False)")
        if tuple(self.z_dims):
            raise ValueError(f"UViT z_dims={tuple(self.z_dims)}: REPA projectors exist for SiT only; "
                             f"use z_dims=()")
        if self.skip_scaling not in SKIP_SCALINGS:
            raise ValueError(f"UViT skip_scaling={self.skip_scaling!r}; expected one of {SKIP_SCALINGS}")
        low, high = KAPPA_RANGE
        if self.skip_scaling == "cs" and not low <= self.skip_kappa <= high:  # read only by 'cs'
            raise ValueError(f"UViT skip_kappa={self.skip_kappa} must be in [{low}, {high}] (ScaleLong's range)")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"UViT attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
        check_layout(self.layout)
        remat_policy(self.remat)

    @property
    def out_channels(self) -> int:
        return self.in_channels

    @property
    def patch_shape(self) -> tuple[int, int]:
        """The patch along each input axis, as SiT's."""
        return (self.patch_size, self.patch_size)

    @property
    def null_label(self) -> int:
        """The label index of the unconditional ("null") class used for guidance."""
        return self.num_classes

    @property
    def num_extra_tokens(self) -> int:
        """Tokens before the patches: the time token and, if class-conditional, the label token."""
        return 2 if self.num_classes > 0 else 1

    @property
    def num_out_blocks(self) -> int:
        """N: in-blocks = out-blocks = long skips = (depth - 1) / 2."""
        return (self.depth - 1) // 2

    def init_inputs(self, batch_size: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Dummy (x, t, y) of the configured shape, for `init` and `jax.eval_shape`."""
        return dummy_inputs(batch_size, self.input_size, self.in_channels)

    def check_inputs(self, x: jax.Array, t: jax.Array, y: jax.Array) -> None:
        """Raise a ValueError naming the problem for inputs this model cannot take."""
        check_image_inputs("UViT", x, t, y, self.in_channels, self.patch_size)
        h, w = x.shape[1:3]
        fixed = self.pos_embed == "learned" or self.skip_scaling == "ls"
        if fixed and (h, w) != (self.input_size, self.input_size):
            raise ValueError(f"UViT with pos_embed={self.pos_embed!r}, skip_scaling={self.skip_scaling!r} takes "
                             f"{self.input_size}x{self.input_size} inputs (input_size), got {h}x{w}")

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, *, train: bool = False,
                 drop_draws: jax.Array | None = None) -> jax.Array:
        """x: (N, H, W, C) inputs; t: (N,) times (t = 1 is data); y: (N,) labels -> (N, H, W, C).
        `drop_draws`: as SiT's."""
        self.check_inputs(x, t, y)
        n, height, width, _ = x.shape
        p, d = self.patch_size, self.hidden_size
        gh, gw = height // p, width // p
        extras = self.num_extra_tokens

        patches = nn.Conv(d, kernel_size=(p, p), strides=(p, p), padding="VALID", kernel_init=torch_default_kernel,
                          dtype=self.dtype, name="patch_embed")(x.astype(self.dtype))
        patches = patches.reshape(n, gh * gw, d)

        time = timestep_frequencies(TIME_SCALE * t.astype(jnp.float32), d)
        if self.mlp_time_embed:
            time = Dense(4 * d, kernel_init=normal_002, dtype=self.dtype, layout=self.layout, name="time_embed_0")(time)
            time = Dense(d, kernel_init=normal_002, dtype=self.dtype, layout=self.layout,
                         name="time_embed_2")(nn.silu(time))
        tokens = [time.astype(self.dtype)[:, None]]
        if self.num_classes > 0:
            label = LabelEmbedder(self.num_classes, d, self.class_dropout_prob, dtype=self.dtype,
                                  name="label_emb")(y, train, drop_draws)
            tokens.insert(0, label.astype(self.dtype)[:, None])
        x = jnp.concatenate(tokens + [patches], axis=1)

        if self.pos_embed == "learned":
            pos = self.param("pos_embed", normal_002, (1, extras + gh * gw, d))
        else:
            pos = jnp.concatenate([jnp.zeros((extras, d)), jnp.asarray(sincos_2d(d, gh, gw))])[None]
        x = x + pos.astype(self.dtype)

        block_cls = remat_block(UViTBlock, self.remat)
        kw = dict(hidden_size=d, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, dtype=self.dtype,
                  attention_impl=self.attention_impl, layout=self.layout)
        index = 0

        def sow(h: jax.Array) -> None:
            nonlocal index
            index += 1
            self.sow("intermediates", block_name(index), h[:, extras:])

        skips = []
        for i in range(self.num_out_blocks):
            x = block_cls(**kw, name=f"in_blocks_{i}")(x)
            skips.append(x)
            sow(x)
        x = block_cls(**kw, name="mid_block")(x)
        sow(x)

        if self.skip_scaling == "ls":
            tokens_total = extras + gh * gw
            shared = (SkipCalibration(tokens_total, self.dtype, self.layout, name="skip_calibration")
                      if self.ls_shared else None)
        else:
            factors = skip_scale_factors(self.skip_scaling, self.num_out_blocks, self.skip_kappa)
        for i in range(self.num_out_blocks):
            skip = skips.pop()  # the mirror: in-block N - 1 - i
            if self.skip_scaling == "ls":
                calibrate = shared or SkipCalibration(tokens_total, self.dtype, self.layout,
                                                      name=f"skip_calibration_{i}")
                skip = skip * calibrate(skip)
            elif self.skip_scaling != "none":
                skip = skip * jnp.asarray(factors[i], skip.dtype)
            x = block_cls(**kw, long_skip=True, name=f"out_blocks_{i}")(x, skip)
            sow(x)

        x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(x)
        x = Dense(p * p * self.out_channels, kernel_init=normal_002, dtype=self.dtype, layout=self.layout,
                  name="decoder_pred")(x)
        x = einops.rearrange(x[:, extras:], "n (h w) (p q c) -> n (h p) (w q) c", h=gh, w=gw, p=p, q=p)
        if self.final_conv:
            x = nn.Conv(self.out_channels, kernel_size=(3, 3), padding="SAME", kernel_init=torch_default_kernel,
                        dtype=self.dtype, name="final_layer")(x)
        return x.astype(jnp.float32)
