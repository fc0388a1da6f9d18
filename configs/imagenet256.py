"""The paper's setting: SiT-XL/2 + LayerSync (block 8 -> 16, weight 0.2) on ImageNet 256 latents.

Batch 256, AdamW lr 1e-4, constant, EMA 0.9999, label dropout 0.1, random flips, SD-VAE latents
(32x32x4, scaled by 0.18215). Needs the preprocessed latents (launch/preprocess.py, not yet part of
lsync-jax): until then it stops with a message naming the missing data.
"""

from configs.common import base_config


def get_config():
    config = base_config()
    config.model.name = "SiT-XL/2"
    config.model.overrides.update(dict(input_size=32, in_channels=4, num_classes=1000, learn_sigma=True,
                                       class_dropout_prob=0.1, dtype="bfloat16"))
    config.objective.layersync.pairs = ((8, 16, 0.2),)
    config.data.update(dict(name="imagenet_latents", dir="", batch_size=256, flip=True))
    config.train.update(dict(num_steps=4_000_000, ema_decay=0.9999, log_every=100, checkpoint_every=50_000,
                             sample_every=50_000))
    return config
