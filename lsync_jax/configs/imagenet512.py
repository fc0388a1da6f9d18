"""SiT-XL/2 + LayerSync on ImageNet 512 latents (64x64x4): the 256 px recipe at 512 px.

The LayerSync paper reports ImageNet 256 only; this keeps its settings (block 8 -> 16, weight 0.2,
AdamW 1e-4, batch 256, EMA 0.9999) on 512 px crops, as SiT/REPA train their 512 px models with the
256 px hyperparameters. Latents from `launch/preprocess.py --image_size=512`.
"""

from lsync_jax.configs import imagenet256


def get_config():
    config = imagenet256.get_config()
    config.model.overrides.input_size = 64
    config.data.image_size = 512
    return config
