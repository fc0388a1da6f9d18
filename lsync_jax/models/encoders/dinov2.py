"""DINOv2 ViT/14 (Oquab et al.) in flax.linen: the frozen encoder REPA aligns to.

Architecture (read from facebookresearch/dinov2 `dinov2/models/vision_transformer.py` and
`dinov2/layers/`; the Hugging Face `Dinov2Model` is the same network): a 14 x 14 patch Conv2d, a
CLS token, a learned position embedding for the native 37 x 37 grid (518 px), then `depth` pre-LN
blocks x + ls1 * Attn(LN(x)), x + ls2 * FFN(LN(x)) with LayerNorm eps 1e-6, fused qkv with bias,
LayerScale (`init_values=1.0` in every released model) and an FFN that is either Linear -> exact
(erf) GELU -> Linear, or for ViT-g/14 the "swiglufused" SwiGLU: w12 = Linear(D, 2H), x1, x2 =
chunk(w12(x), 2), w3(silu(x1) * x2), with H = (int(int(D * mlp_ratio) * 2 / 3) + 7) // 8 * 8
(4096 for ViT-g). A final LayerNorm; the forward returns its patch tokens without the CLS token,
the official `forward_features(x)['x_norm_patchtokens']` (HF: `last_hidden_state[:, 1:]`), (N, T, D).
Only the registers-free models (`dinov2_vit{s,b,l,g}14`) are implemented; `_reg` files are refused
by the loader. The block outputs (the float32 residual stream, CLS token first) are sown into
'intermediates' as `block_1` ... `block_depth`.

Position embedding at a grid other than the native one. Three references differ here, and
`pos_interpolation` picks one (every mode leaves the native grid untouched, as all three do):
- 'repa' (default): REPA (sihyun-yu/REPA `utils.load_encoders`) loads the torch-hub model, then
  replaces its `pos_embed` once by `timm.layers.pos_embed.resample_abs_pos_embed(pos_embed,
  [16 * (resolution // 256)] * 2)`, i.e. `F.interpolate(size=grid, mode='bicubic',
  antialias=True)` (timm's default antialias, unchanged since 2022); at the 224 / 448 px input the
  hub model then skips its own interpolation. Antialiased bicubic is a different kernel from
  plain bicubic (Keys a = -0.5, support widened by the downsampling factor, weights renormalised
  at the borders instead of clamping indices), so this is what a REPA port must do.
- 'hub': the torch-hub model's own forward (`interpolate_pos_encoding`, `interpolate_offset=0.1`,
  no antialias): `F.interpolate(scale_factor=((gh + 0.1) / 37, (gw + 0.1) / 37), mode='bicubic')`;
  with an explicit scale factor torch samples output index d at (d + 0.5) * 37 / (g + 0.1) - 0.5.
- 'hf': transformers' `Dinov2Model` as installed (5.x): `F.interpolate(size=(gh, gw),
  mode='bicubic', align_corners=False)`, i.e. source (d + 0.5) * 37 / g - 0.5 (older transformers
  releases used the hub's 0.1 offset).
All are computed by `bicubic_matrix`, the one home here of torch's bicubic: per axis a numpy
(out, in) matrix built as ATen builds its weights (float32 source coordinates; A = -0.75 with
clamped border indices, or the antialiased filter), applied to the (37, 37, D) table in float32.

`preprocess_images` is REPA's `preprocess_raw_image` for DINOv2 (train.py): x / 255, ImageNet
mean/std, then `F.interpolate(x, 224 * (resolution // 256), mode='bicubic')` (plain bicubic, no
antialias); `encoder_input_size(token_grid)` gives that size from the diffusion model's token grid.

Precision: parameters are float32; `dtype` is the compute dtype of the convolution and the
Linear layers (bfloat16 in the train step). As under REPA's torch autocast, LayerNorms, LayerScale
and the residual stream stay float32 and the output is float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lsync_jax.models.layers import Attention
from lsync_jax.models.sit import block_name

Dtype = Any

FFNS = ("mlp", "swiglu")
POS_INTERPOLATIONS = ("repa", "hub", "hf")
# torch hub's `interpolate_offset` of the registers-free models ("historical kludge", dino issue #8).
HUB_INTERPOLATE_OFFSET = 0.1
# timm's IMAGENET_DEFAULT_MEAN / _STD, which REPA normalises with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class DINOv2Config:
    """Architecture of a registers-free DINOv2 ViT (official names in comments).

    native_grid: side of the grid the position embedding was trained for (518 px / 14 = 37).
    ffn: 'mlp' (fc1 -> GELU -> fc2) or 'swiglu' (ViT-g/14's "swiglufused": w12 -> SiLU-gate -> w3).
    layerscale: LayerScale after attention and FFN (`init_values`; every released model has it).
    """

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    patch_size: int = 14
    ffn: str = "mlp"
    native_grid: int = 37
    layer_norm_eps: float = 1e-6
    layerscale: bool = True
    in_channels: int = 3

    def __post_init__(self):
        for key in ("embed_dim", "depth", "num_heads", "patch_size", "native_grid", "in_channels"):
            value = getattr(self, key)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DINOv2Config.{key} must be a positive int, got {value!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"DINOv2Config.embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.ffn not in FFNS:
            raise ValueError(f"DINOv2Config.ffn={self.ffn!r}; expected one of {FFNS}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"DINOv2Config.mlp_ratio must be positive, got {self.mlp_ratio}")

    @property
    def ffn_hidden(self) -> int:
        """Hidden width of the FFN: int(D * mlp_ratio), or for SwiGLU two thirds of it rounded up to 8
        (official `SwiGLUFFNFused`; H of w12 = Linear(D, 2H) and w3 = Linear(H, D))."""
        hidden = int(self.embed_dim * self.mlp_ratio)
        return (int(hidden * 2 / 3) + 7) // 8 * 8 if self.ffn == "swiglu" else hidden


# The four released registers-free models (torch hub dinov2_vit{s,b,l,g}14, HF facebook/dinov2-*).
CONFIGS: dict[str, DINOv2Config] = {
    "vits14": DINOv2Config(embed_dim=384, depth=12, num_heads=6),
    "vitb14": DINOv2Config(embed_dim=768, depth=12, num_heads=12),
    "vitl14": DINOv2Config(embed_dim=1024, depth=24, num_heads=16),
    "vitg14": DINOv2Config(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu"),
}


# ----------------------------------------------------------------------------------------------
# torch's bicubic interpolation as matrices
# ----------------------------------------------------------------------------------------------


def _cubic_weights(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel at distances x (ATen's cubic_convolution1/2)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(in_size: int, out_size: int, scale_factor: float | None = None,
                   antialias: bool = False) -> np.ndarray:
    """(out_size, in_size) float32 matrix M with M @ v == torch's 1-D bicubic resampling of v.

    Reproduces `F.interpolate(mode='bicubic', align_corners=False)` along one axis (the 2-D op is
    the product of its two axes), on float inputs, as ATen computes its weights:
    - `scale_factor` given (torch's explicit form): coordinates use 1 / scale_factor, and torch's
      output size floor(in_size * scale_factor) must equal `out_size`; else in_size / out_size.
      The source coordinate of output d is scale * (d + 0.5) - 0.5, in float32 as ATen does.
    - antialias=False: Keys' cubic with A = -0.75 on the 4 nearest inputs, indices clamped to
      the border (border samples repeat).
    - antialias=True (ATen's `_upsample_bicubic2d_aa`, PIL's filter): Keys' cubic with a = -0.5,
      its support widened by the scale when downsampling, taps outside the input dropped and the
      weights renormalised to sum to 1.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got in_size={in_size}, out_size={out_size}")
    if scale_factor is not None:
        if math.floor(float(in_size) * scale_factor) != out_size:
            raise ValueError(f"scale_factor={scale_factor} gives torch's output size "
                             f"{math.floor(in_size * scale_factor)} for {in_size} inputs, not {out_size}")
        scale = np.float32(1.0 / scale_factor)
    else:
        scale = np.float32(in_size) / np.float32(out_size)
    out = np.arange(out_size, dtype=np.float32)
    matrix = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    if not antialias:
        # scale * (d + 0.5) - 0.5 rounded once to float32, as the fused multiply-add compilers emit for
        # ATen's float expression (exact in float64 first); no clamp at 0 for cubic.
        src = (np.float64(scale) * (out.astype(np.float64) + 0.5) - 0.5).astype(np.float32)
        index = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
        t = np.clip(src - index.astype(np.float32), 0, 1).astype(np.float64)
        for offset in (-1, 0, 1, 2):
            weight = _cubic_weights(t - offset, -0.75)
            np.add.at(matrix, (rows, np.clip(index + offset, 0, in_size - 1)), weight)
        return matrix.astype(np.float32)
    support = np.float32(2.0) * scale if scale >= 1 else np.float32(2.0)
    invscale = np.float32(1.0) / scale if scale >= 1 else np.float32(1.0)
    max_taps = int(math.ceil(support)) * 2 + 1
    center = scale * (out + np.float32(0.5))
    for i in range(out_size):
        xmin = max(int(center[i] - support + np.float32(0.5)), 0)  # int() truncates, as the C++ cast
        xsize = min(int(center[i] + support + np.float32(0.5)), in_size) - xmin
        xsize = min(max(xsize, 0), max_taps)
        taps = np.arange(xsize)
        weight = _cubic_weights(((taps + xmin).astype(np.float32) - center[i] + np.float32(0.5)) * invscale, -0.5)
        total = weight.sum()
        matrix[i, xmin:xmin + xsize] = weight / total if total != 0 else weight
    return matrix.astype(np.float32)


def resize_bicubic(images: jax.Array, size: tuple[int, int], antialias: bool = False) -> jax.Array:
    """NHWC float images -> (N, size[0], size[1], C), as torch's `F.interpolate(x, size,
    mode='bicubic', align_corners=False, antialias=antialias)` on the NCHW layout (float32 math)."""
    height, width = images.shape[1:3]
    x = images.astype(jnp.float32)
    if (height, width) == tuple(size):
        return x  # torch's matrix is then the identity
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("ih,nhwc->niwc", bicubic_matrix(height, size[0], antialias=antialias), x, precision=hi)
    return jnp.einsum("jw,niwc->nijc", bicubic_matrix(width, size[1], antialias=antialias), x, precision=hi)


def resample_pos_embed(patch_pos: jax.Array, native_grid: int, grid: tuple[int, int],
                       mode: str = "repa") -> jax.Array:
    """(native_grid**2, D) position embeddings -> (grid[0] * grid[1], D) float32 (row-major tokens),
    as the reference named by `mode` resamples them (see the module docstring); unchanged at the
    native grid, where every reference skips the interpolation."""
    if mode not in POS_INTERPOLATIONS:
        raise ValueError(f"unknown position-embedding interpolation {mode!r}; expected one of {POS_INTERPOLATIONS}")
    patch_pos = patch_pos.astype(jnp.float32)
    gh, gw = grid
    if (gh, gw) == (native_grid, native_grid):
        return patch_pos
    if mode == "hub":
        rows = bicubic_matrix(native_grid, gh, scale_factor=(gh + HUB_INTERPOLATE_OFFSET) / native_grid)
        cols = bicubic_matrix(native_grid, gw, scale_factor=(gw + HUB_INTERPOLATE_OFFSET) / native_grid)
    else:
        rows = bicubic_matrix(native_grid, gh, antialias=mode == "repa")
        cols = bicubic_matrix(native_grid, gw, antialias=mode == "repa")
    table = patch_pos.reshape(native_grid, native_grid, -1)
    hi = jax.lax.Precision.HIGHEST
    table = jnp.einsum("ia,jb,abd->ijd", rows, cols, table, precision=hi)
    return table.reshape(gh * gw, -1)


def preprocess_images(images: jax.Array, size: int) -> jax.Array:
    """uint8 NHWC RGB images (values 0..255) -> float32 (N, size, size, 3) DINOv2 input, as REPA's
    `preprocess_raw_image` for 'dinov2': x / 255, ImageNet mean/std, then plain bicubic resize to
    size x size (torch `F.interpolate(x, size, mode='bicubic')`: align_corners False, no antialias)."""
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
    return resize_bicubic(x, (size, size))


def encoder_input_size(token_grid: int, patch_size: int = 14) -> int:
    """Encoder input side for a token grid equal to the diffusion model's: 16 -> 224 px, 32 -> 448 px
    (REPA: `224 * (resolution // 256)` for SiT's 16 / 32 token grids at 256 / 512 px)."""
    return token_grid * patch_size


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------

_linear_init = nn.initializers.truncated_normal(0.02)  # official init_weights_vit_timm


class LayerScale(nn.Module):
    """x * gamma, a learned per-channel scale (official `LayerScale`, HF `layer_scale.lambda1`)."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.param("gamma", nn.initializers.ones, (self.features,), jnp.float32)


class FeedForward(nn.Module):
    """fc1 -> exact GELU -> fc2, or SwiGLU w12 -> silu(x1) * x2 -> w3 (official names)."""

    config: DINOv2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config

        def dense(features, name):
            return nn.Dense(features, kernel_init=_linear_init, dtype=self.dtype, name=name)

        if cfg.ffn == "swiglu":
            x1, x2 = jnp.split(dense(2 * cfg.ffn_hidden, "w12")(x), 2, axis=-1)
            return dense(cfg.embed_dim, "w3")(nn.silu(x1) * x2)
        return dense(cfg.embed_dim, "fc2")(nn.gelu(dense(cfg.ffn_hidden, "fc1")(x), approximate=False))


class DINOv2Block(nn.Module):
    """Pre-LN block: x + ls1 * attn(norm1(x)), then x + ls2 * mlp(norm2(x)); float32 stream."""

    config: DINOv2Config
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config

        def norm(name):
            return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32, name=name)

        h = Attention(cfg.embed_dim, cfg.num_heads, self.dtype, self.attention_impl, name="attn")(norm("norm1")(x))
        x = x + (LayerScale(cfg.embed_dim, name="ls1")(h) if cfg.layerscale else h.astype(jnp.float32))
        h = FeedForward(cfg, self.dtype, name="mlp")(norm("norm2")(x))
        return x + (LayerScale(cfg.embed_dim, name="ls2")(h) if cfg.layerscale else h.astype(jnp.float32))


class DINOv2(nn.Module):
    """DINOv2 ViT: normalised NHWC images (H, W multiples of the patch size) -> float32 (N, T, D)
    final-LayerNorm patch tokens, T = (H / 14) * (W / 14) row-major, without the CLS token.

    `dtype`: compute dtype of the convolution and Linear layers (parameters stay float32).
    `pos_interpolation`: 'repa' (default), 'hub' or 'hf'; see the module docstring.
    `attention_impl`: 'auto', 'xla' or 'cudnn', as `lsync_jax.models.layers.Attention`.
    """

    config: DINOv2Config
    dtype: Dtype = jnp.float32
    pos_interpolation: str = "repa"
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        cfg = self.config
        p, dim, native = cfg.patch_size, cfg.embed_dim, cfg.native_grid
        if images.ndim != 4 or images.shape[-1] != cfg.in_channels:
            raise ValueError(f"DINOv2 takes NHWC images with {cfg.in_channels} channels, got shape {images.shape}")
        n, height, width, _ = images.shape
        if height % p or width % p:
            raise ValueError(f"DINOv2 input {height} x {width} is not a multiple of the patch size {p}")
        if self.pos_interpolation not in POS_INTERPOLATIONS:
            raise ValueError(f"pos_interpolation={self.pos_interpolation!r}; expected one of {POS_INTERPOLATIONS}")
        grid = (height // p, width // p)
        conv_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=-1)
        x = nn.Conv(dim, (p, p), strides=(p, p), padding="VALID", kernel_init=conv_init, dtype=self.dtype,
                    name="patch_embed")(images)
        x = x.reshape(n, grid[0] * grid[1], dim).astype(jnp.float32)
        cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, dim), jnp.float32)
        pos_embed = self.param("pos_embed", nn.initializers.truncated_normal(0.02), (1, 1 + native * native, dim),
                               jnp.float32)
        patch_pos = resample_pos_embed(pos_embed[0, 1:], native, grid, self.pos_interpolation)
        x = jnp.concatenate([jnp.broadcast_to(cls_token + pos_embed[:, :1], (n, 1, dim)), x + patch_pos[None]], axis=1)
        for i in range(cfg.depth):
            x = DINOv2Block(cfg, self.dtype, self.attention_impl, name=f"blocks_{i}")(x)
            self.sow("intermediates", block_name(i + 1), x)
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32, name="norm")(x)
        return x[:, 1:]


def random_dinov2(config: DINOv2Config, seed: int = 0, **module_options: Any) -> tuple[DINOv2, dict[str, Any]]:
    """(module, params) of a RANDOMLY INITIALISED DINOv2 (not pretrained: for CPU configs and tests
    only; REPA with it aligns to noise). `module_options`: dtype, pos_interpolation, attention_impl."""
    module = DINOv2(config, **module_options)
    p = config.patch_size
    images = jnp.zeros((1, p, p, config.in_channels), jnp.float32)
    params = jax.jit(module.init)(jax.random.key(seed), images)["params"]
    return module, params
