"""The video, sequence and motion configs train a few steps on small data the tests make, with
LayerSync on; what a modality lacks is refused before compiling."""

import json
import os

import numpy as np
import pytest

from lsync_jax.configs import humanml3d, moving_fmnist, sequences
from lsync_jax.data import fashion_mnist
from lsync_jax.recipes import check_run, train_and_evaluate
from lsync_jax.tools.preprocess_sequences import SequenceSpec, preprocess_sequences

TINY_MODEL = dict(depth=3, hidden_size=32, num_heads=2)
FEW_STEPS = dict(num_steps=2, log_every=1, checkpoint_every=2)


def shrink(config, **model):
    config.model.overrides.update(dict(TINY_MODEL, **model))
    config.train.update(FEW_STEPS)
    config.data.batch_size = 4
    config.objective.layersync.pairs = ((1, 2, 0.2),)
    return config


@pytest.mark.slow
def test_moving_fmnist_trains_with_layersync_and_writes_clip_strips(tmp_path):
    if not os.path.isdir(fashion_mnist.DEFAULT_DIR):
        pytest.skip("Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    config = shrink(moving_fmnist.get_config(), input_size=32, num_frames=4)
    config.data.update(dict(num_clips=64, frames=4, canvas=32, items=1, item_size=16))  # room to move
    config.train.num_grid_samples = 3
    metrics = train_and_evaluate(config, str(tmp_path))
    assert "loss/layersync" in metrics and np.isfinite(metrics["loss"])
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "samples" / "step_0000002.png"))
    assert grid.shape[:2] == (3 * (32 + 2) + 2, 4 * (32 + 2) + 2)  # one clip per row, 4 frames along it
    assert moving_fmnist.get_config("baseline").objective.regularizers == ()


def make_sequences(root, count=12, length=10, channels=6, num_tags=5):
    rng = np.random.default_rng(0)
    npy = root / "npy"
    npy.mkdir()
    tags = {}
    for i in range(count):
        np.save(npy / f"clip{i:02d}.npy", rng.standard_normal((length - i % 3, channels)).astype(np.float32))
        tags[f"clip{i:02d}"] = [i % num_tags, (i + 2) % num_tags]
    (root / "tags.json").write_text(json.dumps(tags))
    out = str(root / "seq")
    preprocess_sequences(str(npy), out, SequenceSpec(length=length, shard_size=8, num_tags=num_tags),
                         tags_path=str(root / "tags.json"), log=lambda s: None)
    return out


@pytest.mark.slow
def test_tagged_sequences_train_with_padding_masked(tmp_path):
    config = shrink(sequences.get_config(), input_size=10, in_channels=6, num_tags=5)
    config.model.name = "SiT-Seq-S/2"
    config.data.dir = make_sequences(tmp_path)
    metrics = train_and_evaluate(config, str(tmp_path / "run"))
    assert "loss/layersync" in metrics and np.isfinite(metrics["loss"])
    wrong = shrink(sequences.get_config(), input_size=10, in_channels=6, num_tags=7)
    wrong.model.name, wrong.data.dir = "SiT-Seq-S/2", config.data.dir
    with pytest.raises(ValueError, match="num_tags=7, but config.data .* gives tags of width 5"):
        check_run(wrong, str(tmp_path / "other"))
    odd = shrink(sequences.get_config(), input_size=10, in_channels=6, num_tags=5)
    odd.model.name, odd.data.dir = "SiT-Seq-S/4", config.data.dir
    with pytest.raises(ValueError, match=r"patch \(4,\) does not divide the length"):
        check_run(odd, str(tmp_path / "other"))


def make_humanml3d(root, lengths=(30, 12, 50, 8, 25, 40)):
    rng = np.random.default_rng(1)
    (root / "new_joint_vecs").mkdir(parents=True)
    ids = []
    for i, n in enumerate(lengths):
        np.save(root / "new_joint_vecs" / f"{i:06d}.npy", rng.standard_normal((n, 263)).astype(np.float32))
        ids.append(f"{i:06d}")
    np.save(root / "Mean.npy", np.zeros(263, np.float32))
    np.save(root / "Std.npy", np.ones(263, np.float32))
    for split in ("train", "val", "test"):
        (root / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return str(root)


@pytest.mark.slow
def test_humanml3d_trains_unconditionally_and_refuses_what_it_lacks(tmp_path):
    config = shrink(humanml3d.get_config(), input_size=32)
    config.data.update(dict(dir=make_humanml3d(tmp_path / "HumanML3D"), length=32))
    metrics = train_and_evaluate(config, str(tmp_path / "run"))
    assert "loss/layersync" in metrics and np.isfinite(metrics["loss"])
    auto = shrink(humanml3d.get_config(), input_size=32)
    auto.data.update(dict(dir=config.data.dir, length=32))
    auto.objective.layersync.pairs = ("auto",)
    with pytest.raises(ValueError, match="pairs='auto' probes class labels.*Set the pairs explicitly"):
        check_run(auto, str(tmp_path / "auto"))
    repa = shrink(humanml3d.get_config(), input_size=32, z_dims=(16,), encoder_depth=1)
    repa.data.update(dict(dir=config.data.dir, length=32))
    repa.objective.regularizers = ("layersync", "repa")
    with pytest.raises(ValueError, match="'repa'.*takes sequence data, for which lsync-jax has no encoder"):
        check_run(repa, str(tmp_path / "repa"))


def test_a_model_for_other_data_is_named(tmp_path):
    config = shrink(humanml3d.get_config(), input_size=32)
    config.data.update(dict(name="synthetic", synthetic_shape=(8, 8, 1)))
    with pytest.raises(ValueError, match=r"examples of shape \(8, 8, 1\), but the model SiTSequence takes \(L, C\)"):
        check_run(config, str(tmp_path / "run"))


@pytest.mark.slow
def test_tagged_sequences_get_the_multilabel_probe(tmp_path):
    from lsync_jax.builders import build_model, build_source
    from lsync_jax.eval.analysis import MeasureSettings, chance_level, measure_model

    config = shrink(sequences.get_config(), input_size=10, in_channels=6, num_tags=5)
    config.model.name = "SiT-Seq-S/2"
    config.data.dir = make_sequences(tmp_path, count=24)
    model = build_model(config)
    import jax

    params = jax.jit(model.init)(jax.random.key(0), *model.init_inputs(1))["params"]
    measured = measure_model(config, model, params, MeasureSettings(num_samples=20, t_values=(0.5,),
                                                                          batch_size=8, cka=False),
                             source=build_source(config.data))
    assert measured["probe"].startswith("multi-label") and chance_level(measured) is None
    assert len(measured["probe_accuracy_mean"]) == 3 and all(0 <= a <= 1 for a in measured["probe_accuracy_mean"])
