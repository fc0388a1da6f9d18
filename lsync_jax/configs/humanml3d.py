"""LayerSync on motion: a SiT over HumanML3D's 263-dimensional frame features (the paper trains MDM
on them), unconditional, motions cropped or padded to 196 frames with padding masked everywhere.

    python launch/train.py --config=configs/humanml3d.py --config.data.dir=/data/HumanML3D --workdir=/runs/motion

The data is the dataset's own layout: new_joint_vecs/*.npy (frames, 263), Mean.npy, Std.npy and the
split lists. There are no labels, so automatic pairs are refused; the pair is the image default (8 -> 16
of 28) scaled to the depth. The model follows MDM's size (8 layers of width 512, 4 heads).
"""

from lsync_jax.configs.base import base_config


def get_config(variant: str = "layersync"):
    if variant not in ("layersync", "baseline"):
        raise ValueError(f"configs/humanml3d.py:{variant}: expected ':layersync' or ':baseline'")
    config = base_config("SiT-Seq-B/1")
    config.model.overrides.update(dict(depth=8, hidden_size=512, num_heads=4, input_size=196, in_channels=263,
                                       num_classes=0, learn_sigma=False))
    if variant == "baseline":
        config.objective.regularizers = ()
    config.data.update(dict(name="humanml3d", flip=False, batch_size=64, length=196, crop="random"))
    config.train.update(dict(num_steps=600_000, num_grid_samples=0))
    return config
