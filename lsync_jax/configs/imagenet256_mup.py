"""SiT-XL/2 + LayerSync on ImageNet 256 latents in muP, as the muP-DiT paper trains DiT-XL-2-muP.

Base width 288 (4 heads of 72, the muP-DiT base shapes `width288_d28.bsh`); SiT-XL/2 is 16 heads of 72,
so hidden matrices (attention, MLP, adaLN, the timestep MLP's second Linear) take lr / 4 in Adam and
everything else lr. lr 2^-10 is the muP-DiT's rate transferred from its width-288 search; output
multiplier 1 (their logstd 0). Everything else is configs/imagenet256.py (the latents as made there):

    python launch/train.py --config=configs/imagenet256_mup.py --config.data.dir=/data/imagenet256_latents \
        --workdir=/runs/sit_xl2_layersync_mup
"""

from lsync_jax.configs import imagenet256


def get_config():
    config = imagenet256.get_config()
    config.model.overrides.update(dict(parametrization="mup", mup_base_width=288, output_multiplier=1.0))
    config.optimizer.lr = 2.0**-10
    return config
