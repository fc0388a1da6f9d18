"""The default demo: a small SiT with LayerSync on Fashion-MNIST (28x28x1), on a 2-core CPU in ~11.5 min
(5 min training, 2 min once for the reference statistics, 3.7 min for the final FID-1K).

    python launch/train.py --config=configs/fashion_mnist.py --workdir=/tmp/fmnist
    python launch/train.py --config=configs/fashion_mnist.py:baseline --workdir=/tmp/fmnist_base  # LayerSync off
    python launch/train.py --config=configs/fashion_mnist.py:auto --workdir=/tmp/fmnist_auto  # pairs measured

Data: Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist) or --config.data.dir.
"""

from lsync_jax.configs.base import base_config


def get_config(variant: str = "layersync"):
    if variant not in ("layersync", "baseline", "auto"):
        raise ValueError(f"configs/fashion_mnist.py:{variant}: expected ':layersync', ':baseline' or ':auto'")
    config = base_config()
    config.model.name = "SiT-S/4"
    config.model.overrides.update(dict(depth=6, hidden_size=128, num_heads=2, input_size=28, in_channels=1,
                                       num_classes=10, learn_sigma=False, class_dropout_prob=0.1))
    # 6 blocks: the paper's 8 -> 16 of 28 scales to block 2 guided by block 3 (weight 0.2).
    if variant == "baseline":
        config.objective.regularizers = ()
    if variant == "auto":  # 200 of the 800 steps without LayerSync, then the pair chosen from probe accuracy
        config.objective.layersync.pairs = ("auto",)
        config.objective.layersync.selection.update(dict(warmup_steps=200, num_samples=2000))
    config.optimizer.lr = 1e-3  # a small model and a short run tolerate (and need) a larger step
    config.optimizer.warmup_steps = 100
    config.data.update(dict(name="fashion_mnist", batch_size=64, flip=False))
    config.sampler.update(dict(method="euler", num_steps=32, cfg_scale=2.0, guidance_interval=(0.0, 1.0)))
    config.train.update(dict(num_steps=800, ema_decay=0.995, log_every=50, checkpoint_every=200,
                             sample_every=400, num_grid_samples=40))
    # The final FID-1K of EMA samples against the first 1,000 test images (on 2 CPU cores ~100 s of
    # sampling and ~120 s of Inception, plus ~115 s once for the cached reference). Small-N FID is
    # biased upwards: compare runs at the same N, not with published FID-50K numbers.
    config.eval.update(dict(every=800, num_samples=1000, batch_size=250, reference_split="test",
                            reference_size=1000))
    # Two CPU devices: on the 2-core machine the data-parallel halves of this small model's step keep
    # both cores busier (515 against 652 ms a step; docs/benchmarks.md). No effect on GPUs or TPUs.
    config.distributed.cpu_devices = 2
    return config
