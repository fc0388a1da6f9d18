"""LayerSync on video: a small video SiT on Moving Fashion-MNIST (8 frames of 32x32, one bouncing
Fashion-MNIST item per clip, labelled by its class), generated from the real images: no download.

    python launch/train.py --config=configs/moving_fmnist.py --workdir=/tmp/mfmnist
    python launch/train.py --config=configs/moving_fmnist.py:baseline --workdir=/tmp/mfmnist_base  # LayerSync off

(2, 8, 8) patches give 4 x 4 x 4 = 64 tokens per clip, within the 2-core CPU budget (SiT-S/2 at 256
tokens takes seconds per step there): 1,600 steps of batch 32 take about 13 minutes on 2 CPU cores.
The items are shrunk to 16 px and move 2 px per frame, so they cross half the canvas in a clip (full
28 px items on a 32 px canvas have 4 px of room). Data: Debian's dataset-fashion-mnist or
--config.data.dir.
"""

from lsync_jax.configs.base import base_config


def get_config(variant: str = "layersync"):
    if variant not in ("layersync", "baseline"):
        raise ValueError(f"configs/moving_fmnist.py:{variant}: expected ':layersync' or ':baseline'")
    config = base_config("SiT-Video-S/2x8")
    config.model.overrides.update(dict(depth=6, hidden_size=128, num_heads=2, input_size=32, num_frames=8,
                                       in_channels=1, num_classes=10, learn_sigma=False, class_dropout_prob=0.1))
    # 6 blocks: the paper's 8 -> 16 of 28 scales to block 2 guided by block 3 (weight 0.2), as the image demo.
    if variant == "baseline":
        config.objective.regularizers = ()
    config.optimizer.lr = 1e-3
    config.optimizer.warmup_steps = 100
    config.data.update(dict(name="moving_fmnist", batch_size=32, flip=False, num_clips=10_000, frames=8, canvas=32,
                            items=1, item_size=16, speed=2.0))
    config.sampler.update(dict(method="euler", num_steps=32, cfg_scale=2.0, guidance_interval=(0.0, 1.0)))
    config.train.update(dict(num_steps=1600, ema_decay=0.995, log_every=50, checkpoint_every=400,
                             sample_every=800, num_grid_samples=10))
    return config
