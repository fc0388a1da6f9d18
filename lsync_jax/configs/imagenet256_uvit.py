"""U-ViT-H/2 + LayerSync on ImageNet 256 latents, with U-ViT's training recipe; ScaleLong variants.

    python launch/train.py --config=configs/imagenet256_uvit.py --config.data.dir=/data/imagenet256_latents \
        --workdir=/runs/uvit_h2_layersync
    python launch/train.py --config=configs/imagenet256_uvit.py:cs ...   # or :constant, :ls (ScaleLong)

From the U-ViT paper and its official configs/imagenet256_uvit_huge.py: U-ViT-H/2 (29 blocks, width
1152, 16 heads, no time MLP, no final conv; 501M parameters), batch 1024, AdamW lr 2e-4, betas
(0.99, 0.99), weight decay 0.03, 5K linear warm-up steps then constant, 500K steps, EMA 0.9999,
label dropout 0.1, random flips, 32x32x4 latents (scale 0.18215). The official trains in fp16
mixed precision with activation checkpointing: here bfloat16 compute and remat.

Chosen here (no paper value):
- The objective is lsync-jax's (linear path, velocity, t ~ U[0, 1]) where U-ViT trains discrete-
  time VP noise prediction, so that runs compare with configs/imagenet256.py.
- LayerSync's pair is the paper's SiT-XL/2 setting, block 8 guided by block 16, weight 0.2:
  U-ViT-H's 29 blocks are nearly SiT-XL's 28 (here block 16 is the first out-block, after the
  mid block 15).
- Latents are sd-vae-ft-ema's, as every lsync-jax ImageNet config (U-ViT encodes with Stable
  Diffusion's KL-f8 autoencoder, the same scale).
- Sampling keeps the SiT protocol (Euler-Maruyama, 250 steps, no guidance). U-ViT reports FID 2.29
  with DPM-Solver (50 steps) and guidance scale 0.4 in its convention (1 + s) eps_c - s eps_u,
  which is --config.sampler.cfg_scale=1.4 here.
- ScaleLong's CS uses kappa 0.7 (the model default; ScaleLong suggests [0.5, 0.95]).
"""

from lsync_jax.configs.base import base_config

VARIANTS = ("none", "constant", "cs", "ls")


def get_config(variant: str = "none"):
    if variant not in VARIANTS:
        raise ValueError(f"configs/imagenet256_uvit.py:{variant}: expected one of "
                         f"{', '.join(':' + v for v in VARIANTS)}")
    config = base_config("UViT-H/2")
    config.model.overrides.update(dict(input_size=32, in_channels=4, num_classes=1000, learn_sigma=False,
                                       class_dropout_prob=0.1, mlp_time_embed=False, final_conv=False,
                                       skip_scaling=variant, skip_kappa=0.7, ls_shared=True, dtype="bfloat16",
                                       remat="blocks"))
    config.objective.layersync.pairs = ((8, 16, 0.2),)
    config.optimizer.update(dict(lr=2e-4, b1=0.99, b2=0.99, weight_decay=0.03, warmup_steps=5000))
    config.data.update(dict(name="imagenet_latents", dir="", image_size=256, batch_size=1024, flip=True))
    config.train.update(dict(num_steps=500_000, ema_decay=0.9999, log_every=100, checkpoint_every=50_000,
                             sample_every=50_000))
    config.eval.update(dict(every=0, num_samples=10_000, batch_size=250))
    return config
