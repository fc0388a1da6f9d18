"""Inception-v3 as the TensorFlow FID graph computes it (`inception-2015-12-05`), in flax.linen.

This is the network behind every FID, sFID, IS and precision/recall number in the diffusion
literature (the ADM evaluator feeds the 2015 TF graph). It is not torchvision's Inception: the
pooling branches average without the zero padding, the last block max-pools, batch norm has no
scale and eps 1e-3, and the classifier has 1008 outputs.

Module names are the TF graph's (`conv`, `conv_1`, ..., `mixed`, ..., `mixed_10`, towers inside),
which are also the names of the widely used TorchScript conversion, so a weight converter is a
transpose, and `mixed_6/conv` (sFID's spatial features) is the module of that name.

The input pipeline is the graph's own: uint8 images as float in [0, 255], resized to 299 x 299
with TF's legacy bilinear resize (`align_corners=False`, no half-pixel centres), then
`(x - 128) / 128`. Convolutions run at full float32 precision: TPUs and recent GPUs would
otherwise use bf16/TF32 passes and shift FID.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
POOL_DIM = 2048
NUM_LOGITS = 1008
# sFID (Nash et al. 2021, as ADM computes it): the first 7 channels of `mixed_6/conv` (17 x 17 x 192).
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
BN_EPS = 1e-3
HIGHEST = jax.lax.Precision.HIGHEST

Padding = tuple[tuple[int, int], tuple[int, int]]


def _pad(kernel: tuple[int, int], same: bool) -> Padding:
    """'Same' padding of an odd kernel (as the graph pads its stride-1 convs) or none."""
    if not same:
        return ((0, 0), (0, 0))
    return ((kernel[0] // 2, kernel[0] // 2), (kernel[1] // 2, kernel[1] // 2))


class ConvBN(nn.Module):
    """Conv (no bias) -> batch norm with frozen statistics -> ReLU: every conv of the graph.

    The statistics are inference-only, so they live in `params` with the rest; `scale` is 1 in
    the TF weights (the graph's BN has no gamma) but pytorch-fid's conversion stores one.
    """

    features: int
    kernel: tuple[int, int] = (1, 1)
    strides: int = 1
    same: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (*self.kernel, x.shape[-1], self.features), jnp.float32)
        scale = self.param("scale", nn.initializers.ones, (self.features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        mean = self.param("mean", nn.initializers.zeros, (self.features,), jnp.float32)
        var = self.param("var", nn.initializers.ones, (self.features,), jnp.float32)
        y = jax.lax.conv_general_dilated(
            x, kernel, (self.strides, self.strides), _pad(self.kernel, self.same),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)
        y = (y - mean) / jnp.sqrt(var + BN_EPS) * scale + bias
        return nn.relu(y)


def _avg_pool(x: jax.Array) -> jax.Array:
    # The graph's branch pools average over the valid window only (count_include_pad=False).
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x: jax.Array, strides: int = 2, same: bool = False) -> jax.Array:
    return nn.max_pool(x, (3, 3), (strides, strides), ((1, 1), (1, 1)) if same else "VALID")


class Tower(nn.Module):
    """A chain of ConvBN layers named conv, conv_1, ... as in the graph."""

    layers: Sequence[tuple[int, tuple[int, int], int, bool]]  # (features, kernel, strides, same)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, (features, kernel, strides, same) in enumerate(self.layers):
            x = ConvBN(features, kernel, strides, same, name="conv" if i == 0 else f"conv_{i}")(x)
        return x


class MixedA(nn.Module):
    """35 x 35 block (`mixed`, `mixed_1`, `mixed_2`)."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            ConvBN(64, name="conv")(x),
            Tower([(48, (1, 1), 1, False), (64, (5, 5), 1, True)], name="tower")(x),
            Tower([(64, (1, 1), 1, False), (96, (3, 3), 1, True), (96, (3, 3), 1, True)], name="tower_1")(x),
            Tower([(self.pool_features, (1, 1), 1, False)], name="tower_2")(_avg_pool(x)),
        ], axis=-1)


class MixedB(nn.Module):
    """35 -> 17 reduction (`mixed_3`)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            ConvBN(384, (3, 3), 2, name="conv")(x),
            Tower([(64, (1, 1), 1, False), (96, (3, 3), 1, True), (96, (3, 3), 2, False)], name="tower")(x),
            _max_pool(x),
        ], axis=-1)


class MixedC(nn.Module):
    """17 x 17 block with factorised 7 x 7 convolutions (`mixed_4` ... `mixed_7`)."""

    channels: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.channels
        row, col = (1, 7), (7, 1)
        return jnp.concatenate([
            ConvBN(192, name="conv")(x),
            Tower([(c, (1, 1), 1, False), (c, row, 1, True), (192, col, 1, True)], name="tower")(x),
            Tower([(c, (1, 1), 1, False), (c, col, 1, True), (c, row, 1, True), (c, col, 1, True),
                   (192, row, 1, True)], name="tower_1")(x),
            Tower([(192, (1, 1), 1, False)], name="tower_2")(_avg_pool(x)),
        ], axis=-1)


class MixedD(nn.Module):
    """17 -> 8 reduction (`mixed_8`)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            Tower([(192, (1, 1), 1, False), (320, (3, 3), 2, False)], name="tower")(x),
            Tower([(192, (1, 1), 1, False), (192, (1, 7), 1, True), (192, (7, 1), 1, True),
                   (192, (3, 3), 2, False)], name="tower_1")(x),
            _max_pool(x),
        ], axis=-1)


class MixedE(nn.Module):
    """8 x 8 block with split 1x3 / 3x1 heads (`mixed_9` averages its pool branch, `mixed_10` max-pools)."""

    max_pool: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        a = ConvBN(384, name="tower_conv")(x)
        b = ConvBN(448, name="tower_1_conv")(x)
        b = ConvBN(384, (3, 3), same=True, name="tower_1_conv_1")(b)
        pooled = _max_pool(x, strides=1, same=True) if self.max_pool else _avg_pool(x)
        return jnp.concatenate([
            ConvBN(320, name="conv")(x),
            ConvBN(384, (1, 3), same=True, name="tower_mixed_conv")(a),
            ConvBN(384, (3, 1), same=True, name="tower_mixed_conv_1")(a),
            ConvBN(384, (1, 3), same=True, name="tower_1_mixed_conv")(b),
            ConvBN(384, (3, 1), same=True, name="tower_1_mixed_conv_1")(b),
            ConvBN(192, name="tower_2_conv")(pooled),
        ], axis=-1)


class InceptionV3(nn.Module):
    """FID Inception on preprocessed 299 x 299 x 3 inputs (see `preprocess`).

    Returns `pool` (N, 2048: `pool_3`, for FID and precision/recall), `spatial` (N, 2023: the
    first 7 channels of `mixed_6/conv`, flattened in NHWC order as ADM does, for sFID) and, with
    `with_logits`, `logits` (N, 1008: `pool_3` times the classifier weights without its bias,
    which is what ADM's Inception Score uses).
    """

    with_logits: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        if x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(f"InceptionV3 takes preprocessed (N, 299, 299, 3) inputs, got {x.shape}; "
                             "use lsync_jax.models.inception.preprocess")
        x = ConvBN(32, (3, 3), 2, name="conv")(x)
        x = ConvBN(32, (3, 3), name="conv_1")(x)
        x = ConvBN(64, (3, 3), same=True, name="conv_2")(x)
        x = _max_pool(x)
        x = ConvBN(80, name="conv_3")(x)
        x = ConvBN(192, (3, 3), name="conv_4")(x)
        x = _max_pool(x)
        x = MixedA(32, name="mixed")(x)
        x = MixedA(64, name="mixed_1")(x)
        x = MixedA(64, name="mixed_2")(x)
        x = MixedB(name="mixed_3")(x)
        x = MixedC(128, name="mixed_4")(x)
        x = MixedC(160, name="mixed_5")(x)
        x = MixedC(160, name="mixed_6")(x)
        # The block's first 192 channels are its `conv` branch, i.e. `mixed_6/conv`.
        spatial = x[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
        x = MixedC(192, name="mixed_7")(x)
        x = MixedD(name="mixed_8")(x)
        x = MixedE(max_pool=False, name="mixed_9")(x)
        x = MixedE(max_pool=True, name="mixed_10")(x)
        pool = jnp.mean(x, axis=(1, 2))  # pool_3: 8 x 8 average, VALID
        out = {"pool": pool, "spatial": spatial}
        if self.with_logits:
            kernel = self.param("logits_kernel", nn.initializers.lecun_normal(), (POOL_DIM, NUM_LOGITS), jnp.float32)
            out["logits"] = jnp.dot(pool, kernel, precision=HIGHEST)
        return out


def _legacy_bilinear_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
    """TF1 `resize_bilinear(align_corners=False, half_pixel_centers=False)` along one axis.

    Source position i * (in / out) in float32, neighbours floor and ceil (clamped), lerp with
    TF's arithmetic (`a + (b - a) * t`), so the result matches the graph's ResizeBilinear.
    """
    in_size = x.shape[axis]
    scale = np.float32(in_size) / np.float32(out_size)
    pos = np.arange(out_size, dtype=np.float32) * scale
    lower = np.floor(pos)
    upper = np.minimum(np.ceil(pos), in_size - 1).astype(np.int32)
    lerp = (pos - lower).astype(np.float32)
    shape = [1] * x.ndim
    shape[axis] = out_size
    a = jnp.take(x, lower.astype(np.int32), axis=axis)
    b = jnp.take(x, upper, axis=axis)
    return a + (b - a) * jnp.asarray(lerp).reshape(shape)


def resize_like_tf(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """(N, H, W, C) float -> (N, size, size, C), as the FID graph's ResizeBilinear (width, then height)."""
    x = images
    if x.shape[2] != size:
        x = _legacy_bilinear_axis(x, 2, size)
    if x.shape[1] != size:
        x = _legacy_bilinear_axis(x, 1, size)
    return x


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 (or float in [0, 255]) NHWC images of any size -> the graph's 299 x 299 x 3 input.

    Grayscale is tiled to three channels (how FID is taken on MNIST-like data); values are not
    rescaled, so float inputs must already be in [0, 255] like the uint8 batches ADM reads.
    """
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected NHWC images with 1 or 3 channels, got shape {images.shape}")
    x = images.astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.tile(x, (1, 1, 1, 3))
    x = resize_like_tf(x)
    return (x - 128.0) / 128.0


def features(params: dict, images: jax.Array, with_logits: bool = True) -> dict[str, jax.Array]:
    """Preprocess and run the network: the pure function the evaluator jits and shards."""
    return InceptionV3(with_logits=with_logits).apply({"params": params}, preprocess(images))
