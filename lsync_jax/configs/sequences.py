"""LayerSync on 1-D sequences: the paper's audio setting, a SiT-XL over Stable Audio Open VAE latents
with patch size 1, conditioned on multi-label tags (MTG-Jamendo genres and instruments).

    python launch/preprocess_sequences.py --npy_dir=/data/jamendo_latents --length=256 --out=/data/jamendo_seq
    python launch/train.py --config=configs/sequences.py --config.data.dir=/data/jamendo_seq --workdir=/runs/audio

The latents' length, channels and tag count come from your preprocessing: set
--config.model.overrides.input_size (L), in_channels (C) and num_tags to match (the run refuses a
mismatch before compiling, naming the key). The defaults are placeholders for 10 s clips of 64-channel
latents; the paper's exact latent shape, tag set and block pair are not published in a form we could read.
"""

from lsync_jax.configs.base import base_config


def get_config(variant: str = "layersync"):
    if variant not in ("layersync", "baseline"):
        raise ValueError(f"configs/sequences.py:{variant}: expected ':layersync' or ':baseline'")
    config = base_config("SiT-Seq-XL/1")
    config.model.overrides.update(dict(input_size=256, in_channels=64, num_classes=0, num_tags=50,
                                       tag_dropout_prob=0.1, learn_sigma=False))
    if variant == "baseline":
        config.objective.regularizers = ()
    config.data.update(dict(name="sequences", flip=False, batch_size=1024))
    config.train.update(dict(num_grid_samples=0))  # sequences have no picture grid
    return config
