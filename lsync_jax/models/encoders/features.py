"""REPA's encoder: loading it (pretrained weights, or a random one for CPU tests), and its patch tokens
of uint8 images prepared as REPA prepares them (`encoder_tokens`, pure: jit and shard it).

REPA feeds DINOv2 images resized so that its token grid equals the diffusion model's: encoder
input = SiT token grid x encoder patch size (256 px -> SiT-XL/2's 16 x 16 -> 224 px).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from absl import logging


def encoder_tokens(module: Any, params: Any, images: jax.Array, token_grid: int) -> jax.Array:
    """uint8 NHWC images (grayscale tiled to RGB) -> float32 (N, token_grid**2, D) normalised patch
    tokens, never differentiated."""
    from lsync_jax.models.encoders.dinov2 import encoder_input_size, preprocess_images

    if images.shape[-1] == 1:
        images = jnp.repeat(images, 3, axis=-1)
    x = preprocess_images(images, encoder_input_size(token_grid, module.config.patch_size))
    tokens = module.apply({"params": params}, x.astype(module.dtype))
    return jax.lax.stop_gradient(tokens.astype(jnp.float32))


# A small randomly initialised DINOv2 for CPU configs and tests ("random:tiny"): NOT a pretrained encoder.
TINY_DINOV2 = dict(embed_dim=64, depth=2, num_heads=2)


def load_encoder(path: str, dtype: Any = jnp.bfloat16) -> tuple[Any, Any, str]:
    """(module, params, description) of DINOv2 from weights (torch hub or Hugging Face files), or
    'random:<vits14|vitb14|vitl14|vitg14|tiny>' for a randomly initialised one (clearly not REPA)."""
    from lsync_jax.models.encoders import CONFIGS, DINOv2Config, load_dinov2, random_dinov2

    if not path:
        raise FileNotFoundError("config.objective.repa.encoder_path is empty: give DINOv2 weights (torch hub's "
                                "dinov2_vitb14_pretrain.pth or a Hugging Face facebook/dinov2-base directory), or "
                                "'random:tiny' for a randomly initialised encoder (tests and CPU demos only)")
    if path.startswith("random:"):
        name = path.split(":", 1)[1]
        if name != "tiny" and name not in CONFIGS:
            raise ValueError(f"encoder_path={path!r}: expected random:tiny or random:<{'|'.join(CONFIGS)}>")
        config = DINOv2Config(**TINY_DINOV2) if name == "tiny" else CONFIGS[name]
        module, params = random_dinov2(config, seed=0)
        description = f"DINOv2-{name}, RANDOMLY INITIALISED (not pretrained: for tests and CPU demos)"
        logging.warning("REPA encoder: %s", description)
    else:
        module, params = load_dinov2(path)
        description = f"DINOv2 from {path}"
    return module.clone(dtype=jnp.dtype(dtype)), params, description
