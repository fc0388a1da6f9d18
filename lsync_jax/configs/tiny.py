"""A tiny SiT with LayerSync on 28x28x1 images: CPU tests (few steps, seconds per run).

    python launch/train.py --config=configs/tiny.py --workdir=/tmp/tiny
"""

from lsync_jax.configs.base import base_config


def get_config():
    config = base_config()
    config.model.name = "SiT-S/4"
    config.model.overrides.update(dict(depth=4, hidden_size=64, num_heads=4, input_size=28, in_channels=1,
                                       num_classes=10, learn_sigma=False, class_dropout_prob=0.1))
    config.optimizer.lr = 1e-3
    config.data.update(dict(name="synthetic", synthetic_size=256, synthetic_shape=(28, 28, 1), num_classes=10,
                            batch_size=8, flip=False))
    config.sampler.update(dict(method="euler", num_steps=8, cfg_scale=1.0, guidance_interval=(0.0, 1.0)))
    config.train.update(dict(num_steps=6, ema_decay=0.9, log_every=2, checkpoint_every=3, sample_every=0,
                             num_grid_samples=10))
    return config
