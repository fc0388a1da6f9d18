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
    # 'auto': the paper's 8 -> 16 of 28 scaled to the depth (1 -> 2 for depth 4).
    config.objective.layersync = ml_collections.ConfigDict(
        dict(pairs="auto", weight=0.2, stop_gradient=True)
    )

    config.sampler = ml_collections.ConfigDict(
        dict(method="euler", num_steps=32, cfg_scale=1.0, guidance_interval=(0.0, 1.0))
    )
    return config
