"""SiT-XL/2 on ImageNet 256 latents with DiverseDiT (long residuals + diversity loss, weight 0.001) and
LayerSync (block 8 -> 16, weight 0.2); `:alone` drops LayerSync. Everything else is configs/imagenet256.py.

    python launch/train.py --config=configs/imagenet256_diversedit.py --config.data.dir=/data/imagenet256_latents \
        --workdir=/runs/sit_xl2_diversedit

The authors' code is unreleased; our formulas are in lsync_jax/models/rerouting.py and
lsync_jax/objectives/diversity.py (the public branch's coefficient 0.001 and cap 5, all block pairs).
"""

from lsync_jax.configs import imagenet256


def get_config(variant: str = "layersync"):
    if variant not in ("layersync", "alone"):
        raise ValueError(f"configs/imagenet256_diversedit.py:{variant}: expected ':layersync' or ':alone'")
    config = imagenet256.get_config()
    config.model.overrides.long_skips = True
    base = ("layersync",) if variant == "layersync" else ()
    config.objective.regularizers = base + ("diversity",)
    # DiverseDiT's loss over every block (blocks=None) with its defaults: weight 0.001, parts 1, 1, 1, cap 5
    return config
