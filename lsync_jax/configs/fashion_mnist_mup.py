"""The Fashion-MNIST demo (configs/fashion_mnist.py: SiT, 6 blocks, LayerSync block 2 <- 3) in muP.

    python launch/train.py --config=configs/fashion_mnist_mup.py --workdir=/tmp/fmnist_mup
    python launch/train.py --config=configs/fashion_mnist_mup.py:baseline --workdir=/tmp/fmnist_mup_base

Width 128 = 2 heads of 64 over a base of 1 head (64): hidden matrices take lr / 2 in Adam, the rest lr
(lsync_jax/models/mup.py). lr 2^-10 is the muP-DiT's transferred rate, not tuned for this data; to
transfer your own, tune lr at hidden_size=64, num_heads=1 and keep it when widening by heads.
"""

from lsync_jax.configs import fashion_mnist


def get_config(variant: str = "layersync"):
    if variant not in ("layersync", "baseline"):
        raise ValueError(f"configs/fashion_mnist_mup.py:{variant}: expected ':layersync' or ':baseline'")
    config = fashion_mnist.get_config(variant)
    config.model.overrides.update(dict(parametrization="mup", mup_base_width=64, output_multiplier=1.0))
    config.optimizer.lr = 2.0**-10
    return config
