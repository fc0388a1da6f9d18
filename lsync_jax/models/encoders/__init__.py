"""Frozen pretrained encoders that representation-alignment regularisers (REPA) align to.

DINOv2 ViT/14 (`DINOv2`, `DINOv2Config`, the released sizes in `CONFIGS`), REPA's image
preprocessing for it (`preprocess_images`, `encoder_input_size`), `load_dinov2(path)` for local
torch-hub or Hugging Face weights and `random_dinov2(config, seed)` for a randomly initialised one
(CPU configs and tests only: not pretrained).
"""

from __future__ import annotations

from typing import Any

from lsync_jax.models.encoders.dinov2 import (
    CONFIGS,
    POS_INTERPOLATIONS,
    DINOv2,
    DINOv2Config,
    bicubic_matrix,
    encoder_input_size,
    preprocess_images,
    random_dinov2,
    resample_pos_embed,
)


def load_dinov2(path: str, num_heads: int | None = None, **module_options: Any) -> tuple[DINOv2, dict[str, Any]]:
    """(module, params) from local DINOv2 weights; see `lsync_jax.checkpoints.dinov2.load_dinov2`
    (imported here on use: models/ does not import checkpoints/ at module level)."""
    from lsync_jax.checkpoints.dinov2 import load_dinov2 as load

    return load(path, num_heads, **module_options)


__all__ = ["CONFIGS", "POS_INTERPOLATIONS", "DINOv2", "DINOv2Config", "bicubic_matrix", "encoder_input_size",
           "load_dinov2", "preprocess_images", "random_dinov2", "resample_pos_embed"]
