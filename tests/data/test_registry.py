"""The data-source registry: every shipped source registered and declaring the interface; build_source
looks the name up; a source of the Python API's own is checked against the interface."""

import numpy as np
import pytest

from lsync_jax.builders import build_model, build_source, check_data_matches_model
from lsync_jax.configs import base
from lsync_jax.data import SOURCES, ArraySource, DataSource, ImageRecords, LoaderSpec, make_loader, register_source
from lsync_jax.data.registry import KINDS, check_source

SHIPPED = ("fashion_mnist", "tfds", "synthetic", "imagenet_latents", "moving_fmnist", "sequences", "humanml3d")


def test_every_shipped_source_is_registered():
    assert set(SHIPPED) <= set(SOURCES)


def test_build_source_names_the_key_and_the_registered_sources():
    data = base.base_config().data
    data.name = "fashion_mnsit"
    with pytest.raises(ValueError, match=r"config.data.name='fashion_mnsit' is not a registered data source "
                                         r"\(did you mean 'fashion_mnist'\?\); registered: .*humanml3d"):
        build_source(data)


def test_a_built_source_declares_the_interface():
    data = base.base_config().data
    data.update(name="synthetic", synthetic_size=8, synthetic_shape=(4, 4, 3), num_classes=3)
    source = build_source(data)
    assert isinstance(source, DataSource) and source.kind in KINDS and source.example_keys == ("x", "y")
    example = source.example(source[0], np.random.default_rng(0), False)
    assert example["x"].shape == (4, 4, 3) and set(example) == set(source.example_keys)
    assert (source.num_classes, source.label_range, source.num_tags) == (3, (0, 2), 0)


class Squares(ImageRecords):
    """A source of the Python API's own: image records get the interface from ImageRecords."""

    name = "squares"

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return {"image": np.full((4, 4, 1), index * 30, np.uint8), "label": np.int32(index % 2)}

    def check_labels(self, num_classes):
        if num_classes < 2:
            raise ValueError("squares have 2 classes")


def test_a_registered_source_of_ones_own_trains_through_the_registry(monkeypatch):
    monkeypatch.delitem(SOURCES, "squares", raising=False)
    register_source("squares")(lambda data, split: Squares())
    with pytest.raises(ValueError, match="registered twice"):
        register_source("squares")(lambda data, split: Squares())
    config = base.base_config("SiT-S/2")
    config.data.name = "squares"
    config.model.overrides.update(input_size=4, in_channels=1, num_classes=2, depth=2)
    source = build_source(config.data)
    check_data_matches_model(source, build_model(config, "cpu"), config.data)
    batch = next(iter(make_loader(source, LoaderSpec(global_batch_size=4), process_index=0, process_count=1)))
    assert batch["x"].shape == (4, 4, 4, 1)
    with pytest.raises(ValueError, match="encoder features exist only in latent shards"):
        make_loader(source, LoaderSpec(global_batch_size=4, fields=("encoder_features",)), process_index=0,
                    process_count=1)


def test_a_source_without_the_interface_is_named():
    class Bare:
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return {"image": np.zeros((4, 4, 1), np.uint8), "label": np.int32(0)}

    with pytest.raises(TypeError, match=r"Bare is not a lsync_jax.data.DataSource: it lacks name, kind, what, "
                                        r"example_keys, .*subclassing lsync_jax.data.ImageRecords"):
        make_loader(Bare(), LoaderSpec(global_batch_size=4), process_index=0, process_count=1)
    arrays = ArraySource(np.zeros((4, 4, 4, 1), np.uint8), np.zeros(4, np.int32))
    assert check_source(arrays) is arrays


def test_a_source_of_another_kind_than_the_model_is_refused():
    config = base.base_config("SiT-S/2")
    config.data.update(name="synthetic", synthetic_size=4, synthetic_shape=(8, 8, 1), num_classes=2)
    config.model.overrides.update(input_size=8, in_channels=1, num_classes=2, depth=2)
    source = build_source(config.data)
    source.kind = "video"  # what a mislabelled source would declare
    with pytest.raises(ValueError, match=r"gives examples of shape \(8, 8, 1\), but the model SiT takes \(H, W, C\)"):
        check_data_matches_model(source, build_model(config, "cpu"), config.data)
