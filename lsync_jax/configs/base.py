"""Every config value's one default, and the schema every run's config is checked against.

`base_config()` lists every key the library reads, with the papers' values (LayerSync / SiT official
training) where they report one. Shipped configs start from it and change what their target needs;
the library reads keys without a fallback of its own. Where a value belongs to a library object,
it is derived from that object instead of copied:
- `model.overrides`: every field the named model takes (`lsync_jax.models.override_types`), each
  None until set, meaning the model's own value (its size from the name, its class default), so
  `--config.model.overrides.<field>=...` works on every shipped config;
- `transport` and `sampler`: the defaults of `create_transport` and `SamplerConfig`;
- `objective.<regulariser>`: each registered regulariser's defaults.

`check_config(config)` runs once at start-up: a key this schema lacks, or a key it has that the
config lacks, is an error naming the key. This module imports model and objective definitions only
(no Orbax, grain or optax), so loading a config stays cheap.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict

from lsync_jax.models import override_types
from lsync_jax.objectives import OBJECTIVE_DEFAULTS, REGULARIZER_DEFAULTS
from lsync_jax.transport import SamplerConfig, create_transport

# AdamW lr 1e-4, betas (0.9, 0.999), no weight decay, constant LR, no clipping (LayerSync/SiT);
# grad_clip: a global-norm bound, None for none. `lsync_jax.train.state.make_optimizer` fills a
# partial section (the Python API) from here.
# mu_dtype: the dtype of Adam's first moment (None: the parameters', float32; 'bfloat16' halves it, for
# the largest models; optax's `mu_dtype`).
OPTIMIZER_DEFAULTS: dict[str, Any] = dict(lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0,
                                          grad_clip=None, mu_dtype=None)

# What ERW's stage 2 takes from stage 1: embedders, blocks and REPA projectors (not the final layer).
ERW_CARRY = r"^(x_embedder|t_embedder|y_embedder|blocks_\d+|projectors_\d+)/"


def _plain_type(hint: Any) -> type:
    """int / float / bool / str / tuple of an annotation such as `float | None` or `tuple[int, ...]`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        hint = args[0]
    origin = typing.get_origin(hint) or hint
    return origin if origin in (int, float, bool, str, tuple) else str


def _section(values: Mapping[str, Any], types: Mapping[str, type] | None = None) -> ml_collections.ConfigDict:
    """A ConfigDict of `values` in which None becomes a typed placeholder (settable from the command line)."""
    types = types or {}
    out = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out[key] = _section(value)
        elif value is None:
            out[key] = config_dict.placeholder(types.get(key, tuple))
        else:
            out[key] = value
    return ml_collections.ConfigDict(out)


def model_section(name: str, **overrides: Any) -> ml_collections.ConfigDict:
    """config.model for the named model: every override field listed (None: the model's own value)."""
    section = _section({k: None for k in override_types(name)}, override_types(name))
    section.update(overrides)
    return ml_collections.ConfigDict(dict(name=name, overrides=section))


def _transport_defaults() -> ml_collections.ConfigDict:
    signature = inspect.signature(create_transport)
    hints = typing.get_type_hints(create_transport)
    return _section({k: p.default for k, p in signature.parameters.items()},
                    {k: _plain_type(hints[k]) for k in signature.parameters})


def _sampler_defaults() -> ml_collections.ConfigDict:
    hints = typing.get_type_hints(SamplerConfig)
    fields = {f.name: f.default for f in dataclasses.fields(SamplerConfig)}
    section = _section(fields, {k: _plain_type(hints[k]) for k in fields})
    # classifier-free guidance: scale 1 is off; the interval of t (1 = data) where it applies
    section.cfg_scale = 1.0
    section.guidance_interval = (0.0, 1.0)
    return section


def base_config(model: str = "SiT-XL/2") -> ml_collections.ConfigDict:
    """Every key with its default; `model` names the network whose override fields are listed."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    # The paper protocol this run trains for (configs/paper.py:NAME sets it; '' for none): training warns
    # when the config differs from it in what changes the number (model, learn_sigma, steps, method).
    config.protocol = ""
    config.model = model_section(model)

    # lsync-jax time: t = 0 noise, t = 1 data.
    config.transport = _transport_defaults()

    # Velocity loss + the listed regularisers; every registered regulariser's section is present, so
    # any of them can be switched on from the command line. LayerSync's pairs=None is the paper's
    # block 8 -> 16 of 28 scaled to the depth, weight auto_weight; explicit:
    # --config.objective.layersync.pairs="((8, 16, 0.2),)"; measured: --config.objective.layersync.pairs=auto
    # (warm up without LayerSync, measure each block's probe accuracy, choose; settings in `selection`).
    objective = dict(OBJECTIVE_DEFAULTS, regularizers=("layersync",))
    objective.update({name: defaults for name, defaults in REGULARIZER_DEFAULTS.items()})
    config.objective = _section(objective)

    config.optimizer = _section(OPTIMIZER_DEFAULTS, dict(grad_clip=float, mu_dtype=str))

    config.sampler = _sampler_defaults()

    # name: fashion_mnist | tfds | synthetic | imagenet_latents | moving_fmnist | sequences | humanml3d.
    # dir: the data (fashion_mnist and moving_fmnist: '' is Debian's dataset-fashion-mnist; tfds:
    # data_dir; imagenet_latents: launch/preprocess.py's output; sequences: launch/preprocess_sequences.py's
    # output; humanml3d: the dataset's root). image_size: latents' crop size (None: what the latents
    # record). synthetic_*: the synthetic source. Video (moving_fmnist): num_clips clips of `frames`
    # frames on a canvas x canvas frame, `items` bouncing items of item_size px (28: Fashion-MNIST's own;
    # smaller ones have more room to move) moving `speed` pixels per frame.
    # Motion (humanml3d): clips cropped ('random' from the seed and index, or 'start') or padded to `length`.
    config.data = _section(dict(name="fashion_mnist", dir="", split="train", tfds_name="", batch_size=256,
                                flip=True, synthetic_size=1024, synthetic_shape=(28, 28, 1), num_classes=10,
                                image_size=None, num_clips=10_000, frames=8, canvas=32, items=1, item_size=28,
                                speed=1.0, length=196, crop="random"), dict(image_size=int))

    # keep_checkpoints (>= 1): the latest kept; keep_every: also keep every k-th checkpoint (None: only
    # the latest keep_checkpoints). init_from: a workdir (or checkpoint) to start from; init_include: a
    # regex of the parameters taken from it (empty: all, with their EMA). num_grid_samples=0 turns sample
    # grids off. A resume is refused when the config changes the data order or batch (data.name, dir,
    # split, tfds_name, batch_size, flip, seed, the dataset size) unless allow_data_change; resuming,
    # sampling or init_from with another transport than the checkpoint records is refused unless
    # allow_transport_change. microbatches: accumulate each step's gradient over that many parts of the
    # batch (the same update as the whole batch, a k-th of its activation memory; lsync_jax.train.step).
    # The workdir hold (one run writes a workdir; lsync_jax.workdir.WorkdirHold): a lease of hold_lease_s
    # seconds, renewed every quarter of it; a start that finds another run's live hold waits up to
    # hold_wait_s for its release or expiry (180 s: longer than a lease, so a requeue after a lost VM
    # starts), then refuses; take_over_hold breaks any hold (that run stops at its next step).
    config.train = _section(dict(num_steps=400_000, ema_decay=0.9999, log_every=100, checkpoint_every=10_000,
                                 keep_checkpoints=3, keep_every=None, sample_every=10_000, num_grid_samples=64,
                                 init_from="", init_include="", async_checkpoints=True, allow_data_change=False,
                                 allow_transport_change=False, microbatches=1, hold_lease_s=120.0,
                                 hold_wait_s=180.0, take_over_hold=False), dict(keep_every=int))

    # FID-N of EMA samples every `every` steps (0: off) against the training data's reference split
    # (first reference_size images; 0: all) or an ADM reference batch (`reference`: path to its .npz).
    # The paper protocol (FID-50K vs VIRTUAL_imagenet256_labeled.npz) is launch/sample.py + launch/evaluate.py.
    config.eval = _section(dict(every=0, num_samples=10_000, batch_size=250, reference="", reference_split="test",
                                reference_size=10_000, inception_weights=""))

    # Latent data: the SD-VAE that decodes samples (sample grids, FID, launch/sample.py). Empty: the one
    # the latents were encoded with (their metadata records its path). decode_chunk: latents decoded at
    # a time per device (bounds decoder memory).
    config.vae = _section(dict(path="", decode_chunk=8))

    # ERW: warm up the first `blocks` blocks on REPA alone for `warmup_steps` (stage 1, clean inputs,
    # weight warmup_weight), then train the whole model from them (`carry`: a regex of what is carried).
    config.erw = _section(dict(enabled=False, warmup_steps=100_000, blocks=4, warmup_weight=0.5, carry=ERW_CARRY))

    # The device mesh: data x fsdp devices (-1: what is left); rules: (regex, replicate|fsdp|auto) pairs
    # for parameter placement (empty: 'auto' for everything).
    config.mesh = _section(dict(data=-1, fsdp=1, rules=()))

    # Multi-host: enabled=True calls jax.distributed.initialize(); empty/-1 values are auto-detected
    # (TPU pods, SLURM, ...). cpu_collectives='gloo' lets CPU processes talk (tests, CPU clusters).
    # cpu_devices > 0 splits each process's CPU into that many JAX devices (jax_num_cpu_devices), so a
    # small model's data-parallel halves keep every core busy; -1 keeps JAX's one CPU device. It acts
    # only on the CPU backend, and XLA_FLAGS=--xla_force_host_platform_device_count wins over it.
    config.distributed = _section(dict(enabled=False, coordinator_address="", num_processes=-1, process_id=-1,
                                       cpu_collectives="", cpu_devices=-1))
    return config


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_section(value: Any) -> bool:
    return isinstance(value, (Mapping, ml_collections.ConfigDict))


def _compare(given: Any, schema: Any, prefix: str, problems: list[str]) -> None:
    for key in given:
        if key not in schema:
            problems.append(f"unknown key {prefix}.{key}{_suggest(key, list(schema))}; known under {prefix}: "
                            f"{', '.join(sorted(schema))}")
        elif _is_section(schema[key]) and _is_section(given[key]):
            _compare(given[key], schema[key], f"{prefix}.{key}", problems)
    for key in schema:
        if key not in given:
            problems.append(f"{prefix}.{key} is missing")


def check_config(config: Mapping[str, Any]) -> None:
    """Raise ValueError naming every key the schema lacks and every schema key the config lacks.

    The schema is `base_config` for the config's model (its override fields). Sections the schema
    holds as open mappings (a regulariser's section set to a plain dict, say) are compared key by key."""
    model = config.get("model") if _is_section(config) else None
    name = model.get("name") if _is_section(model) else None
    try:
        schema = base_config(str(name)) if name else base_config()
    except ValueError as e:  # an unknown model name
        raise ValueError(f"config.model.name: {e}") from None
    problems: list[str] = []
    _compare(config, schema, "config", problems)
    if problems:
        hint = ("" if not any(p.endswith("is missing") for p in problems) else
                ". Configs start from lsync_jax.configs.base.base_config(), which lists every key")
        raise ValueError("; ".join(problems[:8]) + ("; ..." if len(problems) > 8 else "") + hint)
