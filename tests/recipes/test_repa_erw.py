"""REPA and ERW in training: the Fashion-MNIST configs run; ERW hands exactly the intended weights to
stage 2 with a fresh optimizer and EMA; precomputed encoder tokens equal those computed in the loop;
bad REPA settings fail before compiling."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsync_jax.builders import build_model
from lsync_jax.configs import fashion_mnist_repa, tiny
from lsync_jax.configs.base import ERW_CARRY
from lsync_jax.data import ImageFolderSource, LatentSource, LoaderSpec, make_loader
from lsync_jax.objectives import repa_loss
from lsync_jax.recipes import train_and_evaluate
from lsync_jax.recipes.erw import STAGE1_DIR, erw_phases
from lsync_jax.sharding import batch_sharding, make_mesh
from lsync_jax.tools.preprocess import PreprocessSpec, preprocess_latents
from lsync_jax.train.checkpoint import Checkpointer
from lsync_jax.train.encoders import build_encoder_features
from lsync_jax.train.state import init_state_fn, make_optimizer
from lsync_jax.workdir import param_shapes, restore_matching
from tests.helpers import quick


@pytest.mark.parametrize("variant, terms", [("repa", {"loss/repa"}), ("layersync", {"loss/repa", "loss/layersync"})])
@pytest.mark.slow
def test_fashion_mnist_repa_configs_train(tmp_path, variant, terms):
    metrics = train_and_evaluate(quick(fashion_mnist_repa.get_config(variant)), str(tmp_path))
    assert terms <= set(metrics) and all(np.isfinite(metrics[k]) for k in terms)
    assert 0 < metrics["repa/cos"] <= 1 or -1 <= metrics["repa/cos"] <= 1
    assert os.listdir(tmp_path / "checkpoints") == ["2"]


def restore_state(workdir, config):
    model = build_model(config)
    tx, _ = make_optimizer(dict(config.optimizer))
    target = jax.eval_shape(init_state_fn(model, tx), jax.random.key(0))
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    state = checkpointer.restore(checkpointer.latest_step(), target)
    checkpointer.close()
    return state


@pytest.mark.slow
def test_erw_runs_both_stages_and_hands_over_exactly_the_intended_weights(tmp_path):
    config = quick(fashion_mnist_repa.get_config("erw"), steps=1)
    config.erw.warmup_steps = 2
    config.train.ema_decay = 0.5
    train_and_evaluate(config, str(tmp_path))
    stage1_dir = tmp_path / STAGE1_DIR
    stage1_steps = sorted(os.listdir(stage1_dir / "checkpoints"))
    assert stage1_steps[-1] == "2" and os.listdir(tmp_path / "checkpoints") == ["1"]
    first = erw_phases(config, str(tmp_path))[0].config
    assert first.model.overrides.depth == 2 and first.model.overrides.encoder_depth == 2
    assert first.objective.transport_weight == 0 and first.objective.clean_input
    warm = restore_state(str(stage1_dir), first)
    after = restore_state(str(tmp_path), config)
    # exactly the embedders, the two warmed blocks and the projector are carried; not the final layer
    names = set(param_shapes(after.params))
    carried = {n for n in names if n.split("/")[0] in ("x_embedder", "t_embedder", "y_embedder", "blocks_0",
                                                        "blocks_1", "projectors_0")}
    _, listed = restore_matching(str(stage1_dir), after.params, ERW_CARRY)
    assert set(listed) == carried and not any(n.startswith("final_layer") for n in listed)
    # stage 2's first step started from stage 1's weights (not its EMA), with EMA = those weights and a
    # fresh optimizer: ema_1 = d * w_0 + (1 - d) * w_1
    d = config.train.ema_decay
    flat_warm = dict(jax.tree_util.tree_flatten_with_path(warm.params)[0])
    flat_after = dict(jax.tree_util.tree_flatten_with_path(after.params)[0])
    flat_ema = dict(jax.tree_util.tree_flatten_with_path(after.ema_params)[0])
    warm_ema = dict(jax.tree_util.tree_flatten_with_path(warm.ema_params)[0])
    checked = 0
    for path, w0 in flat_warm.items():
        if path in flat_after:
            np.testing.assert_allclose(flat_ema[path], d * w0 + (1 - d) * flat_after[path], rtol=1e-5, atol=1e-6)
            checked += not np.allclose(w0, warm_ema[path])
    assert checked > 0  # the check tells the weights from stage 1's EMA
    assert int(after.step) == 1 and int(jax.tree.leaves(after.opt_state)[0]) == 1  # Adam's count restarted
    # a rerun resumes: stage 1 is not repeated, stage 2 continues
    config.train.num_steps = 2
    train_and_evaluate(config, str(tmp_path))
    assert sorted(os.listdir(stage1_dir / "checkpoints")) == stage1_steps
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]


@pytest.fixture(scope="module")
def latents_with_tokens(tmp_path_factory, tiny_latents, tiny_vae_dir):
    """The tiny latent tree again, with a random tiny DINOv2's 4x4 tokens (56 px input) stored, and flips."""
    root, _, _, _ = tiny_latents
    out = str(tmp_path_factory.mktemp("tokens") / "latents")
    spec = PreprocessSpec(image_size=32, shard_size=8, batch_size=4, store_flip=True, store_images=True,
                          num_workers=2, encoder_path="random:tiny", encoder_grid=4)
    preprocess_latents(ImageFolderSource(root), out, tiny_vae_dir, spec, {"kind": "folder", "path": root,
                                                                         "num_classes": 3}, log=lambda s: None)
    return out


def latent_repa_config(latent_dir, precomputed):
    config = tiny.get_config()
    config.model.name = "SiT-S/2"
    config.model.overrides.update(dict(input_size=8, in_channels=4, num_classes=3, z_dims=(64,), encoder_depth=2))
    config.objective.regularizers = ("repa",)
    config.objective.repa.update(dict(weight=0.5, encoder_path="random:tiny", encoder_dtype="float32",
                                      precomputed=precomputed))
    config.data.update(dict(name="imagenet_latents", dir=latent_dir, image_size=32, batch_size=6, flip=True))
    return config


@pytest.mark.slow
def test_precomputed_and_computed_tokens_give_the_same_loss(latents_with_tokens):
    mesh = make_mesh()
    source = LatentSource(latents_with_tokens)
    losses = []
    for precomputed in (False, True):
        config = latent_repa_config(latents_with_tokens, precomputed)
        encoder = build_encoder_features(config, build_model(config), mesh)
        loader = make_loader(source, LoaderSpec(6, seed=1, flip=True, fields=encoder.fields), process_index=0,
                             process_count=1)
        local = next(iter(loader))
        batch = encoder.add_to({k: jax.device_put(v, batch_sharding(mesh)) for k, v in local.items()})
        assert batch["encoder_features"].shape == (6, 16, 64) and "image" not in batch
        projected = jax.random.normal(jax.random.key(0), (6, 16, 64))
        losses.append((np.asarray(batch["encoder_features"]), float(repa_loss(projected, batch["encoder_features"]))))
    (computed, a), (stored, b) = losses
    np.testing.assert_allclose(stored, computed, rtol=2e-3, atol=2e-3)  # stored in float16
    assert abs(a - b) < 1e-3
    assert np.abs(computed).max() > 0.1


@pytest.mark.slow
def test_a_few_steps_on_latents_with_precomputed_tokens(latents_with_tokens, tmp_path):
    config = latent_repa_config(latents_with_tokens, True)
    config.train.update(dict(num_steps=2, checkpoint_every=2, log_every=1, num_grid_samples=4))
    config.sampler.num_steps = 2
    metrics = train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(metrics["loss/repa"])


@pytest.mark.parametrize("change, match", [
    (dict(z_dims=()), "REPA needs the model's projector"),
    (dict(z_dims=(32,)), "gives 64-d tokens but the model's projector 0 has z_dims"),
    ("precomputed", "precomputed=True reads tokens stored in latent shards"),
    ("no_encoder", "encoder_path is empty"),
    ("erw_blocks", "erw.blocks=6"),
    ("erw_carry", "erw.carry='nothing' selects nothing"),
    ("include_alone", "init_include selects parameters of config.train.init_from, which is empty"),
])
def test_bad_repa_settings_fail_before_compiling(tmp_path, change, match):
    config = quick(fashion_mnist_repa.get_config("erw" if str(change).startswith("erw") else "repa"))
    if change == "precomputed":
        config.objective.repa.precomputed = True
    elif change == "no_encoder":
        config.objective.repa.encoder_path = ""
    elif change == "erw_blocks":
        config.erw.blocks = 6
    elif change == "erw_carry":
        config.erw.carry = "nothing"
    elif change == "include_alone":
        config.train.init_include = "blocks_0"
    else:
        config.model.overrides.update(change)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        train_and_evaluate(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


def test_erw_stage1_keeps_the_config_types():
    config = fashion_mnist_repa.get_config("erw")
    config.objective.repa.weight = 1  # an int where stage 1 puts 0.5
    first = erw_phases(config, "workdir")[0].config
    assert first.objective.repa.weight == 0.5 and jnp.asarray(first.objective.repa.half_life) == 0
