"""SiT-XL/2 on ImageNet 256 latents with DDAE++ self-conditioning from block 16 (LayerSync's strong
block) into the adaLN conditioning of blocks 17..28 and the final layer, and LayerSync (8 -> 16, 0.2);
`:alone` drops LayerSync. +0.7% parameters for XL (2 x 1152^2), FLOPs +0.01%.

    python launch/train.py --config=configs/imagenet256_selfcond.py --config.data.dir=/data/imagenet256_latents \
        --workdir=/runs/sit_xl2_selfcond
"""

from lsync_jax.configs import imagenet256


def get_config(variant: str = "layersync"):
    if variant not in ("layersync", "alone"):
        raise ValueError(f"configs/imagenet256_selfcond.py:{variant}: expected ':layersync' or ':alone'")
    config = imagenet256.get_config()
    config.model.overrides.self_condition = 16
    config.model.overrides.self_condition_stop_gradient = False
    if variant == "alone":
        config.objective.regularizers = ()
    return config
