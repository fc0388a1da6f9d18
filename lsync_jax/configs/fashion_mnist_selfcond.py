"""The Fashion-MNIST demo (configs/fashion_mnist.py: SiT, 6 blocks) with DDAE++ self-conditioning:
block 3's token mean, through LayerNorm + a zero-initialised 2-layer MLP, is added to the adaLN
conditioning of blocks 4..6 and the final layer. Block 3 is LayerSync's strong block at this depth
(the paper's 16 of 28 scaled). Composed with LayerSync (block 2 <- 3) or alone.

    python launch/train.py --config=configs/fashion_mnist_selfcond.py --workdir=/tmp/fmnist_selfcond
    python launch/train.py --config=configs/fashion_mnist_selfcond.py:alone --workdir=/tmp/fmnist_selfcond_only

The design choices (layer, pooling, injection, gradient): lsync_jax/models/rerouting.py.
"""

from lsync_jax.configs import fashion_mnist
from lsync_jax.objectives.layersync import default_pair


def get_config(variant: str = "layersync"):
    if variant not in ("layersync", "alone"):
        raise ValueError(f"configs/fashion_mnist_selfcond.py:{variant}: expected ':layersync' or ':alone'")
    config = fashion_mnist.get_config("layersync" if variant == "layersync" else "baseline")
    config.model.overrides.self_condition = default_pair(config.model.overrides.depth)[1]
    config.model.overrides.self_condition_stop_gradient = False
    return config
