"""Stable Diffusion's VAE (`AutoencoderKL`, as diffusers builds it) in flax.linen, NHWC.

The latent space of every ImageNet SiT/REPA/LayerSync result: `stabilityai/sd-vae-ft-ema`
(or `-mse`), images in [-1, 1] -> a diagonal Gaussian posterior over 4-channel latents at 1/8
resolution; latents are used times 0.18215. Module and parameter names follow diffusers'
(`encoder.down_blocks.0.resnets.1.conv2` is `encoder/down_blocks_0/resnets_1/conv2`), so the
converter in `lsync_jax.porting.vae` is a rename and a transpose.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

SCALE_FACTOR = 0.18215


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """diffusers' AutoencoderKL config fields that shape the network (defaults: SD's VAE)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> "VAEConfig":
        for kind in ("down_block_types", "up_block_types"):
            bad = [b for b in config.get(kind, ()) if b not in ("DownEncoderBlock2D", "UpDecoderBlock2D")]
            if bad:
                raise ValueError(f"VAE config {kind}={bad}: only DownEncoderBlock2D/UpDecoderBlock2D are supported")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in fields})


class ResnetBlock(nn.Module):
    out_channels: int
    groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.silu(nn.GroupNorm(self.groups, epsilon=1e-6, name="norm1")(x))
        h = nn.Conv(self.out_channels, (3, 3), padding=1, name="conv1")(h)
        h = nn.silu(nn.GroupNorm(self.groups, epsilon=1e-6, name="norm2")(h))
        h = nn.Conv(self.out_channels, (3, 3), padding=1, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), name="conv_shortcut")(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all positions with a residual (the VAE's mid block)."""

    groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        y = nn.GroupNorm(self.groups, epsilon=1e-6, name="group_norm")(x).reshape(n, h * w, c)
        q = nn.Dense(c, name="to_q")(y)
        k = nn.Dense(c, name="to_k")(y)
        v = nn.Dense(c, name="to_v")(y)
        weights = jax.nn.softmax(jnp.einsum("nqc,nkc->nqk", q, k) / jnp.sqrt(c).astype(q.dtype), axis=-1)
        y = nn.Dense(c, name="to_out_0")(jnp.einsum("nqk,nkc->nqc", weights, v))
        return x + y.reshape(n, h, w, c)


class MidBlock(nn.Module):
    groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = ResnetBlock(c, self.groups, name="resnets_0")(x)
        x = AttentionBlock(self.groups, name="attentions_0")(x)
        return ResnetBlock(c, self.groups, name="resnets_1")(x)


class Downsample(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # diffusers pads right/bottom, then a VALID stride-2 conv
        return nn.Conv(x.shape[-1], (3, 3), strides=2, padding="VALID", name="conv")(x)


class Upsample(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest
        return nn.Conv(x.shape[-1], (3, 3), padding=1, name="conv")(x)


class Encoder(nn.Module):
    config: VAEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = nn.Conv(cfg.block_out_channels[0], (3, 3), padding=1, name="conv_in")(x)
        for i, channels in enumerate(cfg.block_out_channels):
            for j in range(cfg.layers_per_block):
                x = ResnetBlock(channels, cfg.norm_num_groups, name=f"down_blocks_{i}_resnets_{j}")(x)
            if i < len(cfg.block_out_channels) - 1:
                x = Downsample(name=f"down_blocks_{i}_downsamplers_0")(x)
        x = MidBlock(cfg.norm_num_groups, name="mid_block")(x)
        x = nn.silu(nn.GroupNorm(cfg.norm_num_groups, epsilon=1e-6, name="conv_norm_out")(x))
        return nn.Conv(2 * cfg.latent_channels, (3, 3), padding=1, name="conv_out")(x)


class Decoder(nn.Module):
    config: VAEConfig

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        channels = list(reversed(cfg.block_out_channels))
        x = nn.Conv(channels[0], (3, 3), padding=1, name="conv_in")(z)
        x = MidBlock(cfg.norm_num_groups, name="mid_block")(x)
        for i, c in enumerate(channels):
            for j in range(cfg.layers_per_block + 1):
                x = ResnetBlock(c, cfg.norm_num_groups, name=f"up_blocks_{i}_resnets_{j}")(x)
            if i < len(channels) - 1:
                x = Upsample(name=f"up_blocks_{i}_upsamplers_0")(x)
        x = nn.silu(nn.GroupNorm(cfg.norm_num_groups, epsilon=1e-6, name="conv_norm_out")(x))
        return nn.Conv(cfg.out_channels, (3, 3), padding=1, name="conv_out")(x)


class AutoencoderKL(nn.Module):
    """`encode(images) -> (mean, std)` of the latent posterior, `decode(latents) -> images`.

    Images NHWC in [-1, 1]; latents unscaled (multiply by SCALE_FACTOR for the diffusion model,
    divide before decoding), as diffusers returns them.
    """

    config: VAEConfig = VAEConfig()

    def setup(self):
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quant_conv = nn.Conv(2 * self.config.latent_channels, (1, 1))
        self.post_quant_conv = nn.Conv(self.config.latent_channels, (1, 1))

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        moments = self.quant_conv(self.encoder(images))
        mean, logvar = jnp.split(moments, 2, axis=-1)
        logvar = jnp.clip(logvar, -30.0, 20.0)  # as diffusers' DiagonalGaussianDistribution
        return mean, jnp.exp(0.5 * logvar)

    def decode(self, latents: jax.Array) -> jax.Array:
        return self.decoder(self.post_quant_conv(latents))

    def __call__(self, images: jax.Array) -> jax.Array:
        """Reconstruction through the posterior mean (also what `init` traces)."""
        mean, _ = self.encode(images)
        return self.decode(mean)


def downsampling_factor(config: VAEConfig) -> int:
    """Pixels per latent cell along each side (8 for SD's VAE)."""
    return 2 ** (len(config.block_out_channels) - 1)


def encode_images(module: AutoencoderKL, params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint8 NHWC images -> the posterior (mean, std), unscaled, float32. Pure: jit and shard it."""
    x = images.astype(jnp.float32) / 127.5 - 1.0
    return module.apply({"params": params}, x, method=AutoencoderKL.encode)


def decode_latents(module: AutoencoderKL, params: Any, latents: jax.Array, scale_factor: float = SCALE_FACTOR,
                   chunk: int | None = None) -> jax.Array:
    """Scaled latents (the diffusion model's space) -> images in [-1, 1] (clipped), float32.

    `chunk`: decode at most `chunk` latents at a time (a `lax.map` over the batch), which bounds
    the decoder's activations whatever the batch. Run it per device (`shard_map`) on sharded
    batches, so that every chunk is local.
    """
    def decode(z: jax.Array) -> jax.Array:
        return jnp.clip(module.apply({"params": params}, z / scale_factor, method=AutoencoderKL.decode), -1.0, 1.0)

    n = latents.shape[0]
    if not chunk or chunk >= n:
        return decode(latents)
    chunk = max(d for d in range(1, chunk + 1) if n % d == 0)  # the largest chunk that divides the batch
    z = latents.reshape(n // chunk, chunk, *latents.shape[1:])
    images = jax.lax.map(decode, z)
    return images.reshape(n, *images.shape[2:])
