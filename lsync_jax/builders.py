"""From a checked `get_config()` ConfigDict to the run's pieces: model, transport, sampler, data
source, mesh and the SD-VAE decoder of latent models.

Every entry point (training, sampling, analysis, the recipes) builds its pieces here, so that they
agree. Everything here runs in Python before anything is traced: a typo or a bad value fails in
seconds with the config key named. The keys and their defaults are `lsync_jax.configs.base`'s;
nothing here carries a default of its own.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, PartitionSpec as P

from lsync_jax import storage
from lsync_jax.configs.base import check_config
from lsync_jax.data.latents import read_metadata
from lsync_jax.data.registry import KINDS, DataSource, check_source, source_builder
from lsync_jax.models import get_model
from lsync_jax.models.layers import resolve_attention_impl, resolve_layout
from lsync_jax.models.vae import decode_latents
from lsync_jax.porting.vae import load_vae
from lsync_jax.sharding import BATCH_AXES, DEFAULT_RULES, make_mesh, replicated
from lsync_jax.transport import SamplerConfig, Transport, create_transport


def validate_config(config: Mapping[str, Any]) -> None:
    """The config's keys against the schema (`check_config`) and the values no builder checks."""
    check_config(config)
    source_builder(config.data.name)  # a registered data source (the error names them)
    train = config.train
    for key in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "microbatches"):
        if int(train[key]) < 1:
            raise ValueError(f"config.train.{key} must be >= 1, got {train[key]}")
    for key in ("num_grid_samples", "sample_every"):
        if int(train[key]) < 0:
            raise ValueError(f"config.train.{key} must be >= 0 (0: off), got {train[key]}")
    if train.keep_every is not None and int(train.keep_every) < 1:
        raise ValueError(f"config.train.keep_every must be >= 1 or None (off), got {train.keep_every}")
    if train.init_include and not train.init_from:
        raise ValueError("config.train.init_include selects parameters of config.train.init_from, which is empty")
    check_hold_settings(train.hold_lease_s, train.hold_wait_s)
    if int(config.vae.decode_chunk) < 1:
        raise ValueError(f"config.vae.decode_chunk must be >= 1, got {config.vae.decode_chunk}")


def check_hold_settings(lease_s: Any, wait_s: Any, keys: str = "config.train") -> None:
    """The workdir hold's settings (hold_lease_s, hold_wait_s): checked by `validate_config` for a config
    and by `lsync_jax.workdir.WorkdirHold` for a direct caller, with the same message naming the key."""
    if not float(lease_s) >= 1:
        raise ValueError(f"{keys}.hold_lease_s={lease_s}: expected a lease of at least 1 s (renewed every quarter "
                         "of it)")
    if not float(wait_s) >= 0:
        raise ValueError(f"{keys}.hold_wait_s={wait_s}: expected seconds >= 0")


def mesh_rules(config: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """config.mesh.rules as (regex, rule) pairs, or the default placement when empty."""
    return tuple(tuple(r) for r in config.mesh.rules) or DEFAULT_RULES


def build_mesh(config: Mapping[str, Any], devices: Any = None) -> Mesh:
    """The (data, fsdp) device mesh of config.mesh over `devices` (default: all of this run's): the one
    mesh every entry point uses; `lsync_jax.tools.fit` passes the devices of a TPU topology."""
    return make_mesh(int(config.mesh.data), int(config.mesh.fsdp), devices=devices)


def mesh_platform(mesh: Mesh) -> str:
    """The platform ('cpu', 'gpu', 'tpu') of the devices a mesh spans: what the model is traced for."""
    return mesh.devices.flat[0].platform


def model_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """The model's name and the overrides the config sets (None: the model's own value) as one
    plain dict: what `get_model` takes, and what checkpoints record."""
    return dict(name=config.model.name, **{k: v for k, v in dict(config.model.overrides).items() if v is not None})


def build_model(config: Mapping[str, Any], platform: str | None = None):
    """The model of config.model, laid out for devices of `platform` (default: this process's devices):
    `layout` (unless the config sets it) and `attention_impl='auto'` are resolved from it, so the
    program traced is the one those devices run, whatever the host's own backend."""
    overrides = model_fields(config)
    name = overrides.pop("name")
    if "dtype" in overrides:
        overrides["dtype"] = jnp.dtype(overrides["dtype"])
    return for_platform(get_model(name, **overrides), platform or jax.devices()[0].platform,
                        layout=overrides.get("layout"))


def for_platform(model: Any, platform: str, layout: str | None = None) -> Any:
    """`model` with its compute fields resolved for devices of `platform`: `layout` (unless given) and
    `attention_impl='auto'` (cuDNN on GPUs where it applies, else XLA)."""
    impl = resolve_attention_impl(model.attention_impl, platform, model.dtype, model.hidden_size // model.num_heads)
    return model.clone(layout=layout or resolve_layout(platform), attention_impl=impl)


def build_transport(config: Mapping[str, Any]) -> Transport:
    return create_transport(**dict(config.transport))


def build_sampler(config: Mapping[str, Any]) -> tuple[SamplerConfig, float, tuple[float, float]]:
    """(SamplerConfig, cfg_scale, guidance_interval) from config.sampler."""
    cfg = dict(config.sampler)
    scale = float(cfg.pop("cfg_scale"))
    interval = tuple(float(v) for v in cfg.pop("guidance_interval"))
    return SamplerConfig(**cfg), scale, interval


def build_source(data: Mapping[str, Any], split: str | None = None) -> DataSource:
    """The grain source config.data.name names, built by its registered builder (`lsync_jax.data.registry`)
    from config.data and `split` (default config.data.split). Never downloads; missing data says what to do."""
    return source_builder(data["name"])(data, split or data["split"])


def check_data_matches_model(source: DataSource, model: Any, data: Mapping[str, Any]) -> None:
    """The examples' kind and shape and every label must fit the model (before any compile). Labels are
    checked over the whole source by its `check_labels` (all of them at open for arrays, the class count
    for folders, synthetic data and tfds, the recorded range for latents, which otherwise check each record
    as it is read); label num_classes is the model's null class, never a data label."""
    check_source(source)
    example = source.example(source[0], np.random.default_rng(0), False)
    x = example["x"]
    if source.kind != model.kind or x.ndim != KINDS[model.kind]:
        shape = {"image": "(H, W, C) images", "video": "(F, H, W, C) clips", "sequence": "(L, C) sequences"}
        raise ValueError(f"config.data ({data['name']}) gives examples of shape {x.shape}, but the model "
                         f"{type(model).__name__} takes {shape[model.kind]}: choose a model for this data "
                         "(SiT-<size>/<p> for images, SiT-Video-... for video, SiT-Seq-... for sequences)")
    if model.kind != "image":
        _check_sequence_or_video(source, example, model, data)
    else:
        _check_image(x, model, data, source.what)
    _check_labels(source, model, data)


def _check_image(x: np.ndarray, model: Any, data: Mapping[str, Any], kind: str) -> None:
    h, w, c = x.shape
    if c != model.in_channels or h % model.patch_size or w % model.patch_size:
        raise ValueError(f"config.data ({data['name']}) gives {h}x{w}x{c} {kind} but the model takes "
                         f"in_channels={model.in_channels} with patch_size={model.patch_size}")
    if h != model.input_size or w != model.input_size:
        raise ValueError(f"config.data ({data['name']}) gives {h}x{w} {kind} but "
                         f"config.model.overrides.input_size={model.input_size}")


def _check_sequence_or_video(source: DataSource, example: Mapping[str, np.ndarray], model: Any,
                             data: Mapping[str, Any]) -> None:
    """Channels, the patch dividing every axis, the tags' width, a mask only for sequence models."""
    x, name = example["x"], data["name"]
    if x.shape[-1] != model.in_channels:
        raise ValueError(f"config.data ({name}) gives {x.shape[-1]} channels (examples {x.shape}) but the model "
                         f"takes in_channels={model.in_channels} (config.model.overrides.in_channels)")
    patch = model.patch_shape
    if any(n % p for n, p in zip(x.shape[:-1], patch)):
        raise ValueError(f"config.data ({name}) gives examples of shape {x.shape}; the model's patch {patch} does "
                         "not divide " + ("the length" if model.kind == "sequence" else "frames, height and width"))
    if model.num_tags and source.num_tags != model.num_tags:
        raise ValueError(f"the model takes tags of width num_tags={model.num_tags}, but config.data ({name}) gives "
                         + (f"tags of width {source.num_tags}" if source.num_tags else "none"))
    if "mask" in source.example_keys and model.kind != "sequence":
        raise ValueError(f"config.data ({name}) pads its examples (a mask) but only sequence models take masks")


def _check_labels(source: DataSource, model: Any, data: Mapping[str, Any]) -> None:
    if not model.num_classes:  # an unconditional (or tag-conditioned) model reads no labels
        return
    source.check_labels(model.num_classes)
    if source.num_classes > model.num_classes:
        raise ValueError(f"config.data ({data['name']}) has {source.num_classes} classes but the model "
                         f"num_classes={model.num_classes} (config.model.overrides.num_classes)")


def vae_path(config: Mapping[str, Any]) -> str | None:
    """The SD-VAE that decodes a latent model's samples: config.vae.path, else the one the latents in
    config.data.dir were encoded with (their metadata records it); None for pixel data."""
    if config.data.name != "imagenet_latents":
        return None
    path = config.vae.path
    if not path and config.data.dir:
        try:
            path = read_metadata(config.data.dir)["vae"]["path"]
        except FileNotFoundError:
            path = ""
    if not path:
        raise FileNotFoundError("a latent model's samples are decoded by the SD-VAE: set --config.vae.path to the "
                                "diffusers AutoencoderKL weights (file or directory), or --config.data.dir to "
                                "latents whose metadata names them")
    if not storage.is_remote(path) and not os.path.exists(path):
        raise FileNotFoundError(f"the SD-VAE weights {path!r} (config.vae.path or the latents' metadata) not found")
    return path


def build_decoder(config: Mapping[str, Any], mesh: Mesh) -> Callable[[jax.Array], jax.Array] | None:
    """For a latent model: scaled latents (sharded over the batch) -> images in [-1, 1], decoded by the
    SD-VAE on every device, `config.vae.decode_chunk` latents at a time per device. None for pixel models.
    The weights are loaded now, so a missing VAE fails before any model compiles."""
    path = vae_path(config)
    if path is None:
        return None
    module, params = load_vae(path)
    params = jax.device_put(params, replicated(mesh))
    logging.info("latent samples are decoded by the SD-VAE in %s", path)
    decode = decode_program(module, mesh, int(config.vae.decode_chunk))

    def run(latents: jax.Array) -> jax.Array:
        n, pad = latents.shape[0], -latents.shape[0] % mesh.size  # shard_map needs whole shards
        if pad:
            latents = jnp.concatenate([latents, jnp.zeros((pad, *latents.shape[1:]), latents.dtype)])
        images = decode(params, latents)
        return images[:n] if pad else images

    return run


def decode_program(module: Any, mesh: Mesh, chunk: int) -> Callable[[Any, jax.Array], jax.Array]:
    """The jitted SD-VAE decode: (params, scaled latents split over the batch) -> images, each device
    decoding its share `chunk` latents at a time (`lsync_jax.tools.fit` lowers it from shapes)."""
    @jax.jit
    def decode(params: Any, latents: jax.Array) -> jax.Array:
        local = jax.shard_map(lambda p, z: decode_latents(module, p, z, chunk=chunk), mesh=mesh,
                              in_specs=(P(), P(BATCH_AXES)), out_specs=P(BATCH_AXES))
        return local(params, latents)

    return decode


def derived_config(config: Any, changes: Mapping[str, Any]) -> Any:
    """A copy of `config` with dotted keys set (e.g. {'train.num_steps': 100}), for a recipe's phases
    (ERW's stages, the automatic-pairs warm-up). A field may change type (ConfigDict refuses, e.g., a
    float into a field that holds an int): the field is then replaced. The copy is validated: a new config
    is checked once, where it is made."""
    import copy

    derived = copy.deepcopy(config)
    with derived.unlocked():
        for dotted, value in changes.items():
            *parents, key = dotted.split(".")
            section = derived
            for part in parents:
                section = section[part]
            try:
                section[key] = value
            except TypeError:
                del section[key]
                section[key] = value
    validate_config(derived)
    return derived
