"""Training configs named after the paper protocols (`lsync_jax.configs.protocols`): the run that an
entry's number comes from, so that training, sampling and evaluation agree by construction.

    python launch/train.py --config=configs/paper.py:layersync-sit-xl2-400k-heun \
        --config.data.dir=/data/imagenet256_latents --workdir=/runs/layersync_xl2
    python launch/reproduce.py --protocol=layersync-sit-xl2-400k-heun --workdir=/runs/layersync_xl2 \
        --ref_batch=/data/VIRTUAL_imagenet256_labeled.npz

`python launch/reproduce.py --list` prints every protocol. Each config is the method's shipped config
(configs/imagenet256*.py) with the entry's model, learn_sigma, training steps, batch and sampler.
"""

from lsync_jax.configs.protocols import protocol_config


def get_config(protocol: str = ""):
    if not protocol:
        raise ValueError("configs/paper.py needs a protocol: --config=configs/paper.py:NAME "
                         "(python launch/reproduce.py --list prints them)")
    return protocol_config(protocol)
