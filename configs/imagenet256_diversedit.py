"""SiT-XL/2 on ImageNet 256 latents with DiverseDiT (long residuals + diversity loss, weight 0.001) and
LayerSync (block 8 -> 16, weight 0.2); `:alone` drops LayerSync. Everything else is configs/imagenet256.py.

    python launch/train.py --config=configs/imagenet256_diversedit.py --config.data.dir=/data/imagenet256_latents \
        --workdir=/runs/sit_xl2_diversedit

The authors' code is unreleased; our formulas are in lsync_jax/models/rerouting.py and
lsync_jax/objectives/diversity.py (the public branch's coefficient 0.001 and cap 5, all block pairs).
"""

import ml_collections

from configs import imagenet256


def get_config(variant: str = "layersync"):
    if variant not in ("layersync", "alone"):
        raise ValueError(f"configs/imagenet256_diversedit.py:{variant}: expected ':layersync' or ':alone'")
    config = imagenet256.get_config()
    config.model.overrides.long_skips = True
    base = ("layersync",) if variant == "layersync" else ()
    config.objective.regularizers = base + ("diversity",)
    config.objective.diversity = ml_collections.ConfigDict(dict(
        weight=0.001, independence_weight=1.0, correlation_weight=1.0, dispersion_weight=1.0, cap=5.0))
    config.objective.diversity.blocks = ml_collections.config_dict.placeholder(tuple)  # None: every block
    return config
