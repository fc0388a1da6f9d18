"""ERW (Embedded Representation Warmup) on ImageNet 256 latents, SiT-XL/2: both stages in one command.

    python launch/train.py --config=configs/imagenet256_erw.py --config.data.dir=/data/imagenet256_latents \
        --config.objective.repa.encoder_path=/models/dinov2_vitb14_pretrain.pth --workdir=/runs/erw_xl2

Stage 1 (WORKDIR/erw_stage1): the first 4 blocks + REPA's projector, clean inputs, REPA loss only
(0.5), 100K steps. Stage 2 (WORKDIR): the full SiT-XL/2 from stage 1 (embedders, blocks 1-4,
projector), fresh optimizer and EMA, REPA at block 14 with coefficient c0 * 2^(-s / 50000), c0 = 6
for XL (ERW: 3 for L, 1 otherwise: set --config.objective.repa.weight). Otherwise REPA's settings.
"""

from lsync_jax.configs import imagenet256_repa


def get_config(variant: str = "repa"):
    config = imagenet256_repa.get_config(variant)
    config.model.overrides.encoder_depth = 14
    config.objective.repa.update(dict(weight=6.0, half_life=50_000.0))
    config.erw.update(dict(enabled=True, warmup_steps=100_000, blocks=4, warmup_weight=0.5))
    return config
