"""A small U-ViT with LayerSync on Fashion-MNIST (28x28x1), on a CPU: ScaleLong's long-skip scalings.

    python launch/train.py --config=configs/fashion_mnist_uvit.py:cs --workdir=/tmp/fm_uvit_cs

Variants (`skip_scaling`; lsync_jax/models/uvit.py has the formulas):
    :none      plain U-ViT, skips merged as they are
    :constant  every skip times 1/sqrt(2)
    :cs        out-block i of N times kappa^(N - 1 - i) (kappa 0.7; --config.model.overrides.skip_kappa)
    :ls        a learned per-token sigmoid scale, one net for all out-blocks
               (--config.model.overrides.ls_shared=False: one per out-block)

Everything but the model is the SiT demo's (configs/fashion_mnist.py: AdamW 1e-3 with 100 warm-up
steps, batch 64, 800 steps, Euler 32 steps with CFG 2, FID-1K at the end), so runs compare with it.
"""

from lsync_jax.configs import fashion_mnist
from lsync_jax.configs.base import model_section

VARIANTS = ("none", "constant", "cs", "ls")


def get_config(variant: str = "none"):
    if variant not in VARIANTS:
        raise ValueError(f"configs/fashion_mnist_uvit.py:{variant}: expected one of "
                         f"{', '.join(':' + v for v in VARIANTS)}")
    config = fashion_mnist.get_config("layersync")
    # 7 blocks (3 in, mid, 3 out) of width 128: about the SiT demo's size and cost. 7 x 7 patches plus
    # the time and label tokens. Every U-ViT field is listed (model_section), so any can be overridden.
    config.model = model_section("UViT-S/4", depth=7, hidden_size=128, num_heads=2, input_size=28, in_channels=1,
                                 num_classes=10, learn_sigma=False, class_dropout_prob=0.1, skip_scaling=variant,
                                 skip_kappa=0.7, ls_shared=True)
    # LayerSync: pairs=None scales the paper's 8 -> 16 of 28 to 7 blocks: block 2 (the second
    # in-block) guided by block 4 (the mid block), weight 0.2.
    return config
