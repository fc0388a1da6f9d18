"""The Fashion-MNIST demo (configs/fashion_mnist.py: SiT, 6 blocks) with DiverseDiT: long residuals
(blocks 4, 5, 6 fuse the outputs of blocks 3, 2, 1) and the diversity loss over all blocks, weight
0.001, composed with LayerSync (block 2 <- 3) or alone.

    python launch/train.py --config=configs/fashion_mnist_diversedit.py --workdir=/tmp/fmnist_diverse
    python launch/train.py --config=configs/fashion_mnist_diversedit.py:alone --workdir=/tmp/fmnist_diverse_only

The formulas: lsync_jax/models/rerouting.py (long residuals), lsync_jax/objectives/diversity.py (loss).
"""

from lsync_jax.configs import fashion_mnist


def get_config(variant: str = "layersync"):
    if variant not in ("layersync", "alone"):
        raise ValueError(f"configs/fashion_mnist_diversedit.py:{variant}: expected ':layersync' or ':alone'")
    config = fashion_mnist.get_config("layersync" if variant == "layersync" else "baseline")
    config.model.overrides.long_skips = True
    config.objective.regularizers = tuple(config.objective.regularizers) + ("diversity",)
    # DiverseDiT's loss over every block (blocks=None) with its defaults: weight 0.001, parts 1, 1, 1, cap 5
    return config
