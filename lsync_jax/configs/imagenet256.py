"""The paper's setting: SiT-XL/2 + LayerSync (block 8 -> 16, weight 0.2) on ImageNet 256 latents.

Batch 256, AdamW lr 1e-4, constant, EMA 0.9999, label dropout 0.1, random flips, sd-vae-ft-ema
latents (32x32x4, scaled by 0.18215). Make the latents once, then train:

    python launch/preprocess.py --images=/data/ILSVRC2012/train --vae=/models/sd-vae-ft-ema \
        --image_size=256 --store_flip --out=/data/imagenet256_latents
    python launch/train.py --config=configs/imagenet256.py --config.data.dir=/data/imagenet256_latents \
        --workdir=/runs/sit_xl2_layersync

FID during training is off (the paper's FID-50K is launch/sample.py + launch/evaluate.py against
ADM's VIRTUAL_imagenet256_labeled.npz); to track it, set --config.eval.every=50000
--config.eval.reference=/data/VIRTUAL_imagenet256_labeled.npz.
"""

from lsync_jax.configs.base import base_config


def get_config():
    config = base_config()
    config.model.name = "SiT-XL/2"
    config.model.overrides.update(dict(input_size=32, in_channels=4, num_classes=1000, learn_sigma=True,
                                       class_dropout_prob=0.1, dtype="bfloat16"))
    config.objective.layersync.pairs = ((8, 16, 0.2),)
    config.data.update(dict(name="imagenet_latents", dir="", image_size=256, batch_size=256, flip=True))
    config.train.update(dict(num_steps=4_000_000, ema_decay=0.9999, log_every=100, checkpoint_every=50_000,
                             sample_every=50_000))
    config.eval.update(dict(every=0, num_samples=10_000, batch_size=250))
    # pairs="auto": 1,000 classes need more probe examples than the default 2,048 (20 per class;
    # a test split of 4,000 puts the accuracy's standard error under 0.8%)
    config.objective.layersync.selection.update(dict(warmup_steps=10_000, num_samples=20_000))
    return config
