"""An encoder's patch tokens of uint8 images, prepared as REPA prepares them (pure: jit and shard it).
Loading REPA's encoder: `lsync_jax.porting.dinov2.load_encoder`.

REPA feeds DINOv2 images resized so that its token grid equals the diffusion model's: encoder
input = SiT token grid x encoder patch size (256 px -> SiT-XL/2's 16 x 16 -> 224 px).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lsync_jax.models.encoders.dinov2 import encoder_input_size, preprocess_images


def encoder_tokens(module: Any, params: Any, images: jax.Array, token_grid: int) -> jax.Array:
    """uint8 NHWC images (grayscale tiled to RGB) -> float32 (N, token_grid**2, D) normalised patch
    tokens, never differentiated."""
    if images.shape[-1] == 1:
        images = jnp.repeat(images, 3, axis=-1)
    x = preprocess_images(images, encoder_input_size(token_grid, module.config.patch_size))
    tokens = module.apply({"params": params}, x.astype(module.dtype))
    return jax.lax.stop_gradient(tokens.astype(jnp.float32))
