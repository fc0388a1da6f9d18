"""From a `get_config()` ConfigDict to the run's pieces, validating every key first.

Everything here runs in Python before anything is traced, so a typo or a bad value fails in
seconds with the config key named.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from lsync_jax.data import ArraySource, LatentSource, SyntheticSource, TfdsSource, load_fashion_mnist
from lsync_jax.data.latents import read_metadata
from lsync_jax.data.fashion_mnist import DEFAULT_DIR as FASHION_MNIST_DIR
from lsync_jax.models import get_model
from lsync_jax.objectives.registry import check_keys
from lsync_jax.train.sharding import DEFAULT_RULES
from lsync_jax.transport import SamplerConfig, Transport, create_transport

SECTIONS = {
    "seed": None,
    "model": ("name", "overrides"),
    "transport": ("path_type", "prediction", "loss_weight", "train_eps", "sample_eps", "time_schedule",
                  "logit_normal_mean", "logit_normal_std"),
    "objective": None,  # checked by build_objective
    "sampler": ("method", "num_steps", "rtol", "atol", "max_steps", "diffusion_form", "diffusion_norm",
                "last_step", "last_step_size", "guidance_channels", "cfg_scale", "guidance_interval"),
    "data": ("name", "dir", "split", "tfds_name", "batch_size", "flip", "synthetic_size",
             "synthetic_shape", "num_classes", "image_size"),
    "vae": ("path", "decode_chunk"),
    "erw": ("enabled", "warmup_steps", "blocks", "warmup_weight", "carry"),
    "optimizer": None,  # checked by make_optimizer
    "train": ("num_steps", "ema_decay", "log_every", "checkpoint_every", "keep_checkpoints", "keep_every",
              "sample_every", "num_grid_samples", "init_from", "init_include", "async_checkpoints"),
    "eval": ("every", "num_samples", "batch_size", "reference", "reference_split", "reference_size",
             "inception_weights"),
    "distributed": ("enabled", "coordinator_address", "num_processes", "process_id", "cpu_collectives"),
    "mesh": ("data", "fsdp", "rules"),
}
DATA_NAMES = ("fashion_mnist", "tfds", "synthetic", "imagenet_latents")


def validate_config(config: Mapping[str, Any]) -> None:
    """Raise ValueError naming unknown sections or keys."""
    check_keys(config, tuple(SECTIONS), "config")
    for section, keys in SECTIONS.items():
        if keys is None or section not in config:
            continue
        check_keys(config[section], keys, f"config.{section}")
    if "data" in config and config.data.get("name") not in DATA_NAMES:
        raise ValueError(f"config.data.name={config.data.get('name')!r}; expected one of {DATA_NAMES}")


def mesh_rules(config: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """config.mesh.rules as (regex, rule) pairs, or the default placement when empty."""
    return tuple(tuple(r) for r in config.mesh.get("rules", ())) or DEFAULT_RULES


def model_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """The model's name and overrides as one plain dict (also what checkpoints record)."""
    return dict(name=config.model.name, **dict(config.model.get("overrides", {})))


def build_model(config: Mapping[str, Any]):
    overrides = dict(config.model.get("overrides", {}))
    if "dtype" in overrides:
        overrides["dtype"] = jnp.dtype(overrides["dtype"])
    return get_model(config.model.name, **overrides)


def build_transport(config: Mapping[str, Any]) -> Transport:
    return create_transport(**dict(config.get("transport", {})))


def build_sampler(config: Mapping[str, Any]) -> tuple[SamplerConfig, float, tuple[float, float]]:
    """(SamplerConfig, cfg_scale, guidance_interval) from config.sampler."""
    cfg = dict(config.get("sampler", {}))
    scale = float(cfg.pop("cfg_scale", 1.0))
    interval = tuple(float(v) for v in cfg.pop("guidance_interval", (0.0, 1.0)))
    return SamplerConfig(**cfg), scale, interval


def build_source(data: Mapping[str, Any], split: str | None = None):
    """The grain source named by config.data (never downloads; missing data says what to do)."""
    name = data.get("name")
    split = split or data.get("split", "train")
    if name == "fashion_mnist":
        images, labels = load_fashion_mnist(split, data.get("dir") or FASHION_MNIST_DIR)
        return ArraySource(images, labels, name=f"fashion_mnist/{split}")
    if name == "tfds":
        return TfdsSource(data.get("tfds_name"), split=split, data_dir=data.get("dir"))
    if name == "synthetic":
        return SyntheticSource(int(data.get("synthetic_size", 1024)), tuple(data.get("synthetic_shape")),
                               int(data.get("num_classes", 10)), seed=0)
    if name == "imagenet_latents":
        source = LatentSource(data.get("dir") or "")
        wanted = int(data.get("image_size") or source.image_size)
        if wanted != source.image_size:
            raise ValueError(f"config.data.image_size={wanted} but the latents in {source.directory} were made from "
                             f"{source.image_size} px crops (latents {source.latent_shape})")
        return source
    raise ValueError(f"config.data.name={name!r}; expected one of {DATA_NAMES}")


def check_data_matches_model(source: Any, model: Any, data: Mapping[str, Any]) -> None:
    """The examples' shape and label range must fit the model (before any compile)."""
    from lsync_jax.data.pipeline import to_example

    example = to_example(source, source[0], np.random.default_rng(0), False)
    x, label = example["x"], example["y"]
    h, w, c = x.shape
    kind = "latents" if hasattr(source, "latent_shape") else "images"
    if c != model.in_channels or h % model.patch_size or w % model.patch_size:
        raise ValueError(f"config.data ({data.get('name')}) gives {h}x{w}x{c} {kind} but the model takes "
                         f"in_channels={model.in_channels} with patch_size={model.patch_size}")
    if h != model.input_size or w != model.input_size:
        raise ValueError(f"config.data ({data.get('name')}) gives {h}x{w} {kind} but "
                         f"config.model.overrides.input_size={model.input_size}")
    classes = getattr(source, "num_classes", 0)
    if model.num_classes and classes and classes > model.num_classes:
        raise ValueError(f"config.data ({data.get('name')}) has {classes} classes but the model "
                         f"num_classes={model.num_classes}")
    if model.num_classes and not 0 <= int(label) < model.num_classes:
        raise ValueError(f"label {label} is outside the model's {model.num_classes} classes")


def vae_path(config: Mapping[str, Any]) -> str | None:
    """The SD-VAE that decodes a latent model's samples: config.vae.path, else the one the latents in
    config.data.dir were encoded with (their metadata records it); None for pixel data."""
    if config.get("data", {}).get("name") != "imagenet_latents":
        return None
    path = config.get("vae", {}).get("path") or ""
    if not path and config.data.get("dir"):
        try:
            path = read_metadata(config.data.dir)["vae"]["path"]
        except FileNotFoundError:
            path = ""
    if not path:
        raise FileNotFoundError("a latent model's samples are decoded by the SD-VAE: set --config.vae.path to the "
                                "diffusers AutoencoderKL weights (file or directory), or --config.data.dir to "
                                "latents whose metadata names them")
    if "://" not in path and not os.path.exists(path):
        raise FileNotFoundError(f"the SD-VAE weights {path!r} (config.vae.path or the latents' metadata) not found")
    return path


def set_field(section: Any, key: str, value: Any) -> None:
    """Set a config value even where the config holds another type there (ConfigDict refuses, e.g., a
    float into a field that holds an int): the field is replaced. For derived configs (ERW's stages,
    the automatic-pairs warm-up)."""
    try:
        section[key] = value
    except TypeError:
        del section[key]
        section[key] = value
