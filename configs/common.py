"""Sections every training config shares, with the papers' values (LayerSync / SiT official training)."""

import ml_collections

from lsync_jax.train.auto_pairs import SELECTION_DEFAULTS


# SiT's method switches, listed in the SiT configs so that any of them can be set from the command line
# (e.g. --config.model.overrides.long_skips=True): muP, DiverseDiT's long residuals, DDAE++
# self-conditioning. Their values here are the model's defaults (the official SiT).
SIT_SWITCHES = dict(parametrization="sp", mup_base_width=288, output_multiplier=1.0, long_skips=False,
                    self_condition=0, self_condition_stop_gradient=False)


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.name = "SiT-XL/2"
    config.model.overrides = ml_collections.ConfigDict()

    # lsync-jax time: t = 0 noise, t = 1 data.
    config.transport = ml_collections.ConfigDict(dict(path_type="linear", prediction="velocity",
                                                      time_schedule="uniform"))

    config.objective = ml_collections.ConfigDict()
    config.objective.regularizers = ("layersync",)
    # pairs=None: the paper's block 8 -> 16 of 28 scaled to the depth, weight auto_weight.
    # Explicit: --config.objective.layersync.pairs="((8, 16, 0.2),)"
    config.objective.layersync = ml_collections.ConfigDict()
    config.objective.layersync.pairs = ml_collections.config_dict.placeholder(tuple)
    config.objective.layersync.auto_weight = 0.2
    config.objective.layersync.stop_gradient = True
    # pairs="auto" (--config.objective.layersync.pairs=auto): warm up without LayerSync, measure each
    # block's linear-probe accuracy, choose the pairs (lsync_jax/train/auto_pairs.py; the rule is in
    # lsync_jax.objectives.layersync.select_pairs). These settings are read only then.
    config.objective.layersync.selection = ml_collections.ConfigDict(SELECTION_DEFAULTS)

    # AdamW lr 1e-4, betas (0.9, 0.999), no weight decay, constant LR, no clipping (LayerSync/SiT).
    config.optimizer = ml_collections.ConfigDict(dict(lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                                                      warmup_steps=0))
    config.optimizer.grad_clip = ml_collections.config_dict.placeholder(float)

    config.sampler = ml_collections.ConfigDict(dict(method="euler_maruyama", num_steps=250, cfg_scale=1.0,
                                                    guidance_interval=(0.0, 1.0)))

    config.data = ml_collections.ConfigDict(dict(name="fashion_mnist", dir="", split="train", batch_size=256,
                                                 flip=True))
    config.data.image_size = ml_collections.config_dict.placeholder(int)  # latents: the crop size they came from

    config.train = ml_collections.ConfigDict(dict(
        num_steps=400_000, ema_decay=0.9999, log_every=100, checkpoint_every=10_000, keep_checkpoints=3,
        sample_every=10_000, num_grid_samples=64, async_checkpoints=True))
    config.train.keep_every = ml_collections.config_dict.placeholder(int)
    config.train.init_from = ""

    # FID-N of EMA samples every `every` steps (0: off) against the training data's reference split
    # (first reference_size images) or an ADM reference batch (`reference`: path to its .npz).
    # The paper protocol (FID-50K vs VIRTUAL_imagenet256_labeled.npz) is launch/sample.py + launch/evaluate.py.
    config.eval = ml_collections.ConfigDict(dict(every=0, num_samples=10_000, batch_size=250, reference="",
                                                 reference_split="test", reference_size=10_000,
                                                 inception_weights=""))

    # Latent data: the SD-VAE that decodes samples (sample grids, FID, launch/sample.py). Empty: the one
    # the latents were encoded with (their metadata records its path). decode_chunk: latents decoded at
    # a time per device (bounds decoder memory).
    config.vae = ml_collections.ConfigDict(dict(path="", decode_chunk=8))

    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, rules=()))

    # Multi-host: enabled=True calls jax.distributed.initialize(); empty/-1 values are auto-detected
    # (TPU pods, SLURM, ...). cpu_collectives='gloo' lets CPU processes talk (tests, CPU clusters).
    config.distributed = ml_collections.ConfigDict(dict(enabled=False, coordinator_address="", num_processes=-1,
                                                        process_id=-1, cpu_collectives=""))
    return config
