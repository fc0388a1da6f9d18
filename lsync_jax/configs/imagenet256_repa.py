"""REPA (Yu et al.) on ImageNet 256 latents, SiT-XL/2, as the official training; optionally with LayerSync.

    python launch/train.py --config=configs/imagenet256_repa.py --config.data.dir=/data/imagenet256_latents \
        --config.objective.repa.encoder_path=/models/dinov2_vitb14_pretrain.pth --workdir=/runs/repa_xl2
    python launch/train.py --config=configs/imagenet256_repa.py:layersync ...   # LayerSync 8 -> 16 + REPA

REPA's settings: projector (Linear 1152 -> 2048 -> 2048 -> 768, SiLU) on block 8 (depth 8 for L/XL, 4
for B), -cos to DINOv2-B/14's normalised patch tokens (images resized bicubic to 224, ImageNet
mean/std), coefficient 0.5, AdamW 1e-4 with gradient clipping at 1.0, batch 256, EMA 0.9999, no
flips, no learn_sigma. The encoder runs beside the step (its own jit, bfloat16) on the uint8 crops
stored with the latents (launch/preprocess.py --store_images), or its tokens are read from the shards
(--encoder_path at preprocessing, then --config.objective.repa.precomputed=True).
"""

from lsync_jax.configs import imagenet256


def get_config(variant: str = "repa"):
    if variant not in ("repa", "layersync"):
        raise ValueError(f"config variant {variant!r}: expected ':repa' or ':layersync' (LayerSync + REPA)")
    config = imagenet256.get_config()
    config.model.overrides.update(dict(learn_sigma=False, z_dims=(768,), encoder_depth=8, projector_dim=2048))
    config.objective.regularizers = ("layersync", "repa") if variant == "layersync" else ("repa",)
    config.objective.repa.update(dict(weight=0.5, half_life=0.0, encoder_dtype="bfloat16"))
    config.optimizer.grad_clip = 1.0
    config.data.flip = False
    return config
