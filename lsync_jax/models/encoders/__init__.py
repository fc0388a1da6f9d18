"""Frozen pretrained encoders that representation-alignment regularisers (REPA) align to.

DINOv2 ViT/14 (`DINOv2`, `DINOv2Config`, the released sizes in `CONFIGS`), REPA's image
preprocessing for it (`preprocess_images`, `encoder_input_size`) and `random_dinov2(config, seed)`
for a randomly initialised one (CPU configs and tests only: not pretrained). Loading released weights
is `lsync_jax.porting.dinov2.load_dinov2`.
"""

from __future__ import annotations

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

__all__ = ["CONFIGS", "POS_INTERPOLATIONS", "DINOv2", "DINOv2Config", "bicubic_matrix", "encoder_input_size",
           "preprocess_images", "random_dinov2", "resample_pos_embed"]
