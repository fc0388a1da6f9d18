"""A tiny SiT with LayerSync on 28x28x1 images (Fashion-MNIST shaped): CPU tests and demos.

Usage: `--config=configs/tiny.py`, overridable as `--config.model.depth=6`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.model = ml_collections.ConfigDict()
    config.model.name = "SiT-S/4"
    config.model.overrides = ml_collections.ConfigDict(
        dict(depth=4, hidden_size=64, num_heads=4, input_size=28, in_channels=1, num_classes=10,
             learn_sigma=False, class_dropout_prob=0.1)
    )

    # lsync-jax time: t = 0 noise, t = 1 data.
    config.transport = ml_collections.ConfigDict(
        dict(path_type="linear", prediction="velocity", time_schedule="uniform")
    )

    config.objective = ml_collections.ConfigDict()
    config.objective.regularizers = ("layersync",)
    # pairs=None: the paper's 8 -> 16 of 28 blocks scaled to the depth (1 -> 2 for depth 4), with
    # weight auto_weight. Explicit pairs: --config.objective.layersync.pairs="((1, 3, 0.2),)".
    config.objective.layersync = ml_collections.ConfigDict()
    config.objective.layersync.pairs = ml_collections.config_dict.placeholder(tuple)
    config.objective.layersync.auto_weight = 0.2
    config.objective.layersync.stop_gradient = True

    config.sampler = ml_collections.ConfigDict(
        dict(method="euler", num_steps=32, cfg_scale=1.0, guidance_interval=(0.0, 1.0))
    )
    return config
