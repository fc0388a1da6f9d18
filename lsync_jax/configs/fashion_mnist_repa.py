"""REPA, LayerSync + REPA and ERW on Fashion-MNIST, for a CPU: the mechanics, NOT the methods' results.

    python launch/train.py --config=configs/fashion_mnist_repa.py --workdir=/tmp/fm_repa            # REPA
    python launch/train.py --config=configs/fashion_mnist_repa.py:layersync --workdir=/tmp/fm_ls_repa
    python launch/train.py --config=configs/fashion_mnist_repa.py:erw --workdir=/tmp/fm_erw

The encoder is a RANDOMLY INITIALISED tiny DINOv2 (random:tiny, 64-d tokens): no pretrained weights
can be had offline, so this aligns to random features. For real REPA give DINOv2 weights:
--config.objective.repa.encoder_path=dinov2_vits14_pretrain.pth --config.model.overrides.z_dims="(384,)".
The 28 px images are resized to 98 px for the encoder, so that its 7 x 7 tokens meet the SiT's.
"""

from lsync_jax.configs import fashion_mnist


def get_config(variant: str = "repa"):
    if variant not in ("repa", "layersync", "erw"):
        raise ValueError(f"configs/fashion_mnist_repa.py:{variant}: expected ':repa', ':layersync' or ':erw'")
    config = fashion_mnist.get_config("layersync" if variant == "layersync" else "baseline")
    config.model.overrides.update(dict(z_dims=(64,), encoder_depth=2, projector_dim=256))
    config.objective.regularizers = tuple(config.objective.regularizers) + ("repa",)
    config.objective.repa.update(dict(weight=0.5, encoder_path="random:tiny", encoder_dtype="float32"))
    config.optimizer.grad_clip = 1.0
    if variant == "erw":  # 2 of 6 blocks warmed up for 100 steps, then REPA at block 4 decaying over 400 steps
        config.model.overrides.encoder_depth = 4
        config.objective.repa.update(dict(weight=1.0, half_life=400.0))
        config.erw.update(dict(enabled=True, warmup_steps=100, blocks=2, warmup_weight=0.5))
    return config
