"""Speed and memory on the present devices: train step (with and without LayerSync) of image, video and
sequence models, attention implementations, sampling, SD-VAE encode/decode, the FID Inception pass and a
whole FID-N evaluation, and the cost of checkpoints (save, restore, and the train step while a save runs).
Prints a table and returns rows for JSON.

Times are wall-clock medians over `steps` runs after one compile-and-warm-up run, with the
result blocked on. TFLOP/s counts model matmul FLOPs (`forward_flops`, 3x for a train step), the
usual MFU accounting, so rows compare across devices and frameworks; mem_gib is the
compiled train step's device memory (arguments + outputs + temporaries - donated buffers), peak_gib
the allocator's peak so far (GPU/TPU), mfu the model TFLOP/s over the bf16 peak of known devices.
`input` is one example's shape (H x W x C, F x H x W x C for clips, L x C for sequences) and `tokens` its
token count; img_per_s counts examples (images, clips or sequences) per second.
Checkpoint rows have their own columns (`CHECKPOINT_COLUMNS`): seconds are medians over
`checkpoint_repeats` saves or restores, GB are 1e9 bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lsync_jax import storage
from lsync_jax.builders import build_transport, for_platform, model_fields
from lsync_jax.configs.base import base_config
from lsync_jax.eval.evaluator import InceptionEvaluator, compute_metrics
from lsync_jax.host import compiler_options
from lsync_jax.models import VIDEO_MODEL_NAMES, get_model, model_config
from lsync_jax.models.encoders import CONFIGS, random_dinov2
from lsync_jax.models.encoders.features import encoder_tokens
from lsync_jax.models.layers import resolve_attention_impl
from lsync_jax.models.vae import (
    AutoencoderKL,
    VAEConfig,
    decode_latents,
    downsampling_factor,
    encode_images,
)
from lsync_jax.objectives import Objective, build_objective
from lsync_jax.porting.inception import expected_shapes
from lsync_jax.sharding import batch_sharding, make_mesh
from lsync_jax.tools.gcs_emulator import GcsEmulator
from lsync_jax.tools.torch_step import time_official_step
from lsync_jax.train import abstract_state, create_train_state, make_optimizer, make_train_step
from lsync_jax.train.checkpoint import Checkpointer
from lsync_jax.transport import SamplerConfig, create_transport, make_sample_fn


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    models: Sequence[str] = ("SiT-B/2",)
    batch_size: int = 32
    input_size: int = 32  # H = W of images and clips; L of sequences (SiT-Seq-*)
    in_channels: int = 4
    num_frames: int = 0  # frames per clip of video models (SiT-Video-*); 0: the model's default
    num_classes: int = 1000
    dtype: str = "bfloat16"
    steps: int = 10
    sample_steps: int = 50
    sample_batch: int = 64
    attention: Sequence[str] = ("auto",)
    variants: Sequence[str] = ("baseline", "layersync")
    sample_cfg: Sequence[float] = (1.0, 1.5)
    model_overrides: dict = dataclasses.field(default_factory=dict)
    layersync_pairs: tuple = ()  # () : the paper's pair scaled to the depth, weight 0.2
    inception_batch: int = 0  # > 0: time the FID Inception pass on batches of this many images
    fid_samples: int = 0  # > 0: time a whole FID-N evaluation (features, statistics, five metrics)
    image_size: int = 256  # pixel size of the images the evaluator and VAE rows feed (resized to 299 inside)
    vae_batch: int = 0  # > 0: time SD-VAE encode (preprocessing) and decode (sampling) on batches of this size
    vae_channels: Sequence[int] = (128, 256, 512, 512)  # SD's VAE (smaller only in tests)
    mesh: tuple[int, int] = (-1, 1)  # (data, fsdp) devices, as config.mesh
    # where to time saving and restoring each model's train state: 'local' (a temporary directory),
    # 'emulator' (gs:// on a local GCS emulator) or a directory or URL; () skips the checkpoint rows
    checkpoint: Sequence[str] = ()
    checkpoint_repeats: int = 3  # saves (and restores) per checkpoint row, median reported
    checkpoint_steps: int = 10  # train steps timed without a save beside those during saves; 0 skips that row
    # A checkout of the official LayerSync code (never copied here): time its PyTorch train step against
    # ours on the comparison anchor (OFFICIAL_ANCHOR), interleaved over `official_rounds` rounds
    official_dir: str = ""
    official_rounds: int = 5
    torch_threads: int = 0  # torch.set_num_threads for the official step; 0: torch's default


def bench_config_from(config: Any, **kw: Any) -> BenchConfig:
    """A BenchConfig for a training config's model, batch and LayerSync pairs (other fields from `kw`)."""
    overrides = model_fields(config)
    name = overrides.pop("name")
    arch = {k: overrides.pop(k) for k in ("input_size", "in_channels", "num_classes", "num_frames") if k in overrides}
    dtype = str(overrides.pop("dtype", "float32"))  # the model's own compute dtype when the config sets none
    overrides.pop("attention_impl", None)
    pairs = config.objective.layersync.pairs or ()
    return BenchConfig(models=(name,), batch_size=int(config.data.batch_size), dtype=dtype,
                       model_overrides=overrides, layersync_pairs=tuple(tuple(p) for p in pairs),
                       mesh=(int(config.mesh.data), int(config.mesh.fsdp)), **{k: arch[k] for k in arch}, **kw)


def forward_flops(model, *axes: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one SiT forward pass on one input of spatial/temporal sizes `axes`:
    (H, W) for an image, (F, H, W) for a clip, (L,) for a sequence.

    DiT/SiT papers quote half of this ("118.6 GFLOPs" for XL/2 count multiply-adds). Elementwise
    work (norms, activations, softmax) is left out, as in MFU accounting.
    """
    d, depth = model.hidden_size, model.depth
    patch = tuple(getattr(model, "patch_shape", (model.patch_size, model.patch_size)))
    if len(axes) != len(patch):
        raise ValueError(f"{type(model).__name__} takes inputs with {len(patch)} patched axes, got sizes {axes}")
    tokens = math.prod(a // p for a, p in zip(axes, patch))
    elements = math.prod(patch)  # input steps/pixels per token
    mlp = int(d * model.mlp_ratio)
    per_token = depth * 2 * (3 * d * d + d * d + 2 * d * mlp)  # qkv, proj, fc1, fc2
    per_token += depth * 2 * 2 * tokens * d  # q k^T and attn v
    per_token += 2 * elements * model.in_channels * d + 2 * d * elements * model.out_channels  # patchify, final
    per_sample = depth * 2 * d * 6 * d + 2 * d * 2 * d + 2 * (256 * d + d * d)  # adaLN, t-embedder
    return float(tokens * per_token + per_sample)


def input_axes(model) -> tuple[int, ...]:
    """The patched axes of the model's configured input: (H, W), (F, H, W) or (L,)."""
    return tuple(int(n) for n in model.init_inputs(1)[0].shape[1:-1])


def _input_label(model) -> str:
    return "x".join(str(int(n)) for n in model.init_inputs(1)[0].shape[1:])


def _tokens(model) -> int:
    return math.prod(a // p for a, p in zip(input_axes(model), model.patch_shape))


def bench_model(name: str, cfg: BenchConfig, attention: str | None = None, **extra: Any):
    """Model `name` at the benchmark's input shape, dtype and overrides (and `extra`): images and clips
    `input_size` square with `in_channels`, clips of `num_frames` frames, sequences `input_size` steps long."""
    overrides = dict(cfg.model_overrides, **extra)
    if cfg.num_frames and name in VIDEO_MODEL_NAMES:
        overrides["num_frames"] = cfg.num_frames
    if attention is not None:
        overrides["attention_impl"] = attention
    model = get_model(name, input_size=cfg.input_size, in_channels=cfg.in_channels, num_classes=cfg.num_classes,
                      dtype=jnp.dtype(cfg.dtype), **overrides)
    return for_platform(model, jax.devices()[0].platform, layout=overrides.get("layout"))


def _conditions(model, n: int, key: jax.Array) -> jax.Array:
    """n random class labels, or multi-hot tags (one tag on each) for a tag-conditioned model."""
    if getattr(model, "num_tags", 0):
        return jax.nn.one_hot(jax.random.randint(key, (n,), 0, model.num_tags), model.num_tags)
    return jax.random.randint(key, (n,), 0, max(model.num_classes, 1))


def _peak_gib() -> float | None:
    """The process's peak device memory so far (allocator statistics; absent on CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return None if "peak_bytes_in_use" not in stats else stats["peak_bytes_in_use"] / 2**30


def _program_memory_gib(compiled) -> float | None:
    """Device memory one compiled program needs: arguments + outputs + temporaries - donated aliases."""
    try:
        m = compiled.memory_analysis()
        total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        return total / 2**30
    except Exception:  # best effort: not every backend reports it
        return None


def time_compiled(fn: Callable, args: tuple, steps: int, carry: bool = False) -> tuple[float, Any, float]:
    """(median seconds per call, compiled program, compile seconds) of jitted `fn` on `args`.

    With `carry`, the first output replaces the first argument each call (a donated train state).
    """
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - start
    out = compiled(*args)
    jax.block_until_ready(out)
    if carry:
        args = (out[0],) + tuple(args[1:])
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = compiled(*args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)
        if carry:
            args = (out[0],) + tuple(args[1:])
    return float(np.median(times)), compiled, compile_s


def hlo_flops(fn: Callable, args: tuple) -> float | None:
    """FLOPs of jitted `fn` on `args` from XLA's cost analysis of the lowered, unoptimised program.

    Not the compiled one's: on GPUs convolutions become cuDNN custom calls, which the compiled
    program's analysis does not count.
    """
    try:
        analysis = fn.lower(*args).cost_analysis()
    except Exception:  # best effort: not every backend reports it
        return None
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return (analysis or {}).get("flops") or None


def _round(x, n=2):
    return None if x is None else round(x, n)


def _attention_label(model) -> str:
    resolved = resolve_attention_impl(model.attention_impl, jax.devices()[0].platform, model.dtype,
                                      model.hidden_size // model.num_heads)
    return model.attention_impl if resolved == model.attention_impl else f"{model.attention_impl}->{resolved}"


# Dense bf16 peak FLOP/s per device, for model-FLOPs utilisation (MFU); other kinds print no MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
                   "TPU v5p": 459e12, "TPU v6 lite": 918e12}


def peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_BF16_FLOPS.items():
        if name in kind:
            return flops * jax.device_count()
    return None


VARIANTS = ("baseline", "layersync", "repa", "layersync+repa", "diversity", "layersync+diversity")
REPA_DIM = 768  # DINOv2-B/14's tokens, REPA's encoder


def bench_objective(cfg: BenchConfig, variant: str, depth: int) -> Objective:
    """The objective of `variant`, built as a run builds it: the shipped config's objective section with the
    variant's regularisers listed, through the regulariser registry (`build_objective`). Their settings are
    the sections' defaults: LayerSync the paper's pair scaled to the depth, weight 0.2 (or
    `cfg.layersync_pairs`), REPA weight 0.5, DiverseDiT's loss on every block."""
    config = base_config()
    config.objective.regularizers = tuple(n for n in ("layersync", "repa", "diversity") if n in variant.split("+"))
    if cfg.layersync_pairs:
        config.objective.layersync.pairs = tuple(tuple(p) for p in cfg.layersync_pairs)
    return build_objective(config.objective, build_transport(config), depth=depth)


def _train_setup(name: str, cfg: BenchConfig, variant: str, attention: str) -> tuple[Any, ...]:
    """(model, state, batch, jitted step) of the library's train step for `variant`, as a run builds them."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown benchmark variant {variant!r}; expected one of {VARIANTS}")
    repa = {}
    if "repa" in variant:
        depth = int(cfg.model_overrides.get("depth", model_config(name)["depth"]))
        repa = dict(z_dims=(REPA_DIM,), encoder_depth=8 if depth >= 24 else min(4, depth))
    model = bench_model(name, cfg, attention, **repa)
    objective = bench_objective(cfg, variant, model.depth)
    tx, schedule = make_optimizer({"lr": 1e-4})
    mesh = make_mesh(*cfg.mesh)
    if cfg.batch_size % jax.device_count():
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the {jax.device_count()} devices")
    state = create_train_state(model, tx, jax.random.key(0), mesh)
    shape = model.init_inputs(cfg.batch_size)[0].shape  # (N, H, W, C), (N, F, H, W, C) or (N, L, C)
    condition = _conditions(model, cfg.batch_size, jax.random.key(2))
    batch = {"x": jax.random.normal(jax.random.key(1), shape)}
    batch.update({"y": jnp.zeros((cfg.batch_size,), jnp.int32), "tags": condition} if getattr(model, "num_tags", 0)
                 else {"y": condition})
    if "repa" in variant:
        batch["encoder_features"] = jax.random.normal(jax.random.key(3), (cfg.batch_size, _tokens(model), REPA_DIM))
    batch = jax.device_put(batch, batch_sharding(mesh))
    fn = make_train_step(model, objective, tx, schedule, mesh, ema_decay=base_config().train.ema_decay)
    return model, state, batch, fn


def bench_train_step(name: str, cfg: BenchConfig, variant: str, attention: str) -> dict[str, Any]:
    """The library's train step (loss + gradient + AdamW + EMA, state donated), sharded over every
    present device on a data-parallel mesh, on a global batch of `cfg.batch_size`. REPA variants add
    the projector (REPA's depth: 8 for >= 24 blocks, else 4) and its loss against given tokens (the
    encoder's own cost is the `dinov2_encode` row)."""
    model, state, batch, fn = _train_setup(name, cfg, variant, attention)
    n_params = sum(l.size for l in jax.tree.leaves(state.params))
    seconds, compiled, compile_s = time_compiled(fn, (state, batch), cfg.steps, carry=True)
    flops = 3 * forward_flops(model, *input_axes(model)) * cfg.batch_size / seconds
    peak = peak_flops()
    return dict(
        bench="train_step", model=name, variant=variant,
        attention=_attention_label(model),
        dtype=cfg.dtype, batch=cfg.batch_size, input=_input_label(model), tokens=_tokens(model),
        params_m=round(n_params / 1e6, 1), ms=round(seconds * 1e3, 2),
        img_per_s=round(cfg.batch_size / seconds, 1),
        tflops=round(flops / 1e12, 1 if flops >= 1e12 else 3), mfu=None if peak is None else round(flops / peak, 3),
        compile_s=round(compile_s, 1), mem_gib=_round(_program_memory_gib(compiled)), peak_gib=_round(_peak_gib()),
    )


def bench_sampler(name: str, cfg: BenchConfig, method: str, cfg_scale: float) -> dict[str, Any]:
    """Sampling throughput of a jitted sampler (random weights: speed does not depend on them)."""
    model = bench_model(name, cfg)
    variables = jax.jit(model.init)(jax.random.key(0), *model.init_inputs(1))
    sampler = SamplerConfig(method=method, num_steps=cfg.sample_steps)
    sample_fn = make_sample_fn(model, create_transport(), sampler,
                               compiler_options=compiler_options(jax.default_backend()))
    labels = (np.eye(model.num_tags, dtype=np.float32)[np.arange(cfg.sample_batch) % model.num_tags]
              if getattr(model, "num_tags", 0) else jnp.arange(cfg.sample_batch) % max(model.num_classes, 1))
    key = jax.random.key(0)
    out = sample_fn(variables, key, labels, cfg_scale)  # compile + warm up
    jax.block_until_ready(out)
    times = []
    for _ in range(max(1, cfg.steps // 5)):
        start = time.perf_counter()
        jax.block_until_ready(sample_fn(variables, key, labels, cfg_scale))
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    return dict(
        bench="sample", model=name, variant=f"{method} x{cfg.sample_steps} cfg={cfg_scale}",
        attention=_attention_label(model),
        dtype=cfg.dtype, batch=cfg.sample_batch, input=_input_label(model), tokens=_tokens(model), params_m=None,
        ms=round(seconds * 1e3, 1),
        img_per_s=round(cfg.sample_batch / seconds, 1), tflops=None, mfu=None, compile_s=None, mem_gib=None,
        peak_gib=_round(_peak_gib()),
    )


def _inception_evaluator(cfg: BenchConfig, batch: int):
    from flax import traverse_util


    # Random weights drawn on the host: compiling Inception's init would cost more than the benchmark.
    rng = np.random.default_rng(0)
    flat = {tuple(k.split("/")): (rng.uniform(0.5, 1.5, shape) if k.endswith("var") else
                                  rng.normal(0.0, 0.05, shape)).astype(np.float32)
            for k, shape in expected_shapes().items()}
    return InceptionEvaluator(batch_size=batch, params=traverse_util.unflatten_dict(flat))


def _random_images(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def bench_inception(cfg: BenchConfig) -> dict[str, Any]:
    """The FID Inception pass (TF-style resize to 299, float32 at highest precision, logits on),
    sharded over every device; random weights, uint8 host images in and features out."""
    evaluator = _inception_evaluator(cfg, cfg.inception_batch)
    images = _random_images(evaluator.batch_size, cfg.image_size, 0)
    placed = evaluator.place(images)  # time the device pass; host transfer is in the FID row
    seconds, compiled, compile_s = time_compiled(evaluator.apply, (evaluator.params, placed), cfg.steps)
    flops = hlo_flops(evaluator.apply, (evaluator.params, placed))
    return dict(
        bench="inception", model="InceptionV3-FID", variant=f"{cfg.image_size}px->299", attention=None,
        dtype="float32", batch=evaluator.batch_size,
        params_m=round(sum(x.size for x in jax.tree.leaves(evaluator.params)) / 1e6, 1), ms=round(seconds * 1e3, 1),
        img_per_s=round(evaluator.batch_size / seconds, 1),
        tflops=None if not flops else round(flops / seconds / 1e12, 3), mfu=None,
        compile_s=round(compile_s, 1),
        mem_gib=_round(_program_memory_gib(compiled)), peak_gib=_round(_peak_gib()),
    )


def bench_fid(cfg: BenchConfig) -> dict[str, Any]:
    """A whole FID-N evaluation of N host images against a precomputed reference: Inception
    features, float64 statistics, FID and sFID (eigh route) and precision/recall (k=3)."""
    batch = cfg.inception_batch or 256
    evaluator = _inception_evaluator(cfg, batch)
    n = cfg.fid_samples
    reference = evaluator.statistics([_random_images(n, cfg.image_size, 1)])  # also compiles
    samples = _random_images(n, cfg.image_size, 2)
    start = time.perf_counter()
    stats = evaluator.statistics(samples[i:i + batch] for i in range(0, n, batch))
    compute_metrics(reference, stats, fid_method="eigh")
    seconds = time.perf_counter() - start
    return dict(
        bench="fid", model="InceptionV3-FID", variant=f"FID-{n} {cfg.image_size}px", attention=None,
        dtype="float32", batch=evaluator.batch_size, params_m=None, ms=round(seconds * 1e3, 1),
        img_per_s=round(n / seconds, 1), tflops=None, mfu=None, compile_s=None, mem_gib=None,
        peak_gib=_round(_peak_gib()),
    )


def bench_vae(cfg: BenchConfig, direction: str) -> dict[str, Any]:
    """SD-VAE (sd-vae-ft-* architecture, random weights drawn on the host) encode of uint8 images to the
    posterior moments, as launch/preprocess.py runs it, or decode of latents to images, as sampling
    runs it; float32, the batch split over every device."""
    from flax import traverse_util
    from jax.sharding import NamedSharding, PartitionSpec as P


    module = AutoencoderKL(VAEConfig(block_out_channels=tuple(cfg.vae_channels)))
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
    rng = np.random.default_rng(0)
    flat = {k: rng.normal(0.0, 0.02, v.shape).astype(np.float32) for k, v in traverse_util.flatten_dict(shapes).items()}
    mesh = make_mesh(*cfg.mesh)
    params = jax.device_put(traverse_util.unflatten_dict(flat), NamedSharding(mesh, P()))
    n, size = cfg.vae_batch, cfg.image_size
    if n % jax.device_count():
        raise ValueError(f"vae_batch={n} is not divisible by the {jax.device_count()} devices")
    if direction == "encode":
        fn = jax.jit(lambda p, x: encode_images(module, p, x))
        inputs = jax.device_put(_random_images(n, size, 0), batch_sharding(mesh))
    else:
        fn = jax.jit(lambda p, z: decode_latents(module, p, z))
        latent = size // downsampling_factor(module.config)
        inputs = jax.device_put(np.random.default_rng(1).normal(size=(n, latent, latent, 4)).astype(np.float32),
                                batch_sharding(mesh))
    seconds, compiled, compile_s = time_compiled(fn, (params, inputs), cfg.steps)
    flops = hlo_flops(fn, (params, inputs))
    return dict(
        bench=f"vae_{direction}", model="SD-VAE" if tuple(cfg.vae_channels) == VAEConfig.block_out_channels
        else f"VAE{tuple(cfg.vae_channels)}", variant=f"{size}px", attention=None,
        dtype="float32", batch=n, params_m=round(sum(x.size for x in flat.values()) / 1e6, 1),
        ms=round(seconds * 1e3, 1), img_per_s=round(n / seconds, 1),
        tflops=None if not flops else round(flops / seconds / 1e12, 2), mfu=None,
        compile_s=round(compile_s, 1), mem_gib=_round(_program_memory_gib(compiled)), peak_gib=_round(_peak_gib()),
    )


def bench_encoder(cfg: BenchConfig) -> dict[str, Any]:
    """REPA's encoder beside the train step: DINOv2-B/14 (random weights) tokens of a batch of uint8
    images at `cfg.image_size`, resized to its input (SiT token grid x 14: 224 px for 256 px
    images), in `cfg.dtype`, the batch split over every device."""
    from jax.sharding import NamedSharding, PartitionSpec as P


    module, params = random_dinov2(CONFIGS["vitb14"], seed=0, dtype=jnp.dtype(cfg.dtype))
    mesh = make_mesh(*cfg.mesh)
    params = jax.device_put(params, NamedSharding(mesh, P()))
    grid = cfg.image_size // 16  # SiT-*/2 on 8x-downsampled latents
    images = jax.device_put(_random_images(cfg.batch_size, cfg.image_size, 3), batch_sharding(mesh))
    fn = jax.jit(lambda p, x: encoder_tokens(module, p, x, grid))
    seconds, compiled, compile_s = time_compiled(fn, (params, images), cfg.steps)
    flops = hlo_flops(fn, (params, images))
    return dict(
        bench="dinov2_encode", model="DINOv2-B/14", variant=f"{cfg.image_size}px->{grid * 14}px",
        attention=None, dtype=cfg.dtype, batch=cfg.batch_size,
        params_m=round(sum(x.size for x in jax.tree.leaves(params)) / 1e6, 1), ms=round(seconds * 1e3, 2),
        img_per_s=round(cfg.batch_size / seconds, 1),
        tflops=None if not flops else round(flops / seconds / 1e12, 1), mfu=None, compile_s=round(compile_s, 1),
        mem_gib=_round(_program_memory_gib(compiled)), peak_gib=_round(_peak_gib()),
    )


def _tree_bytes(directory: str) -> int:
    """Bytes of every file under `directory` (local or a URL: each 'directory' of a bucket is one listing)."""
    total = 0
    for child in storage.path(directory).iterdir():
        total += _tree_bytes(str(child)) if child.is_dir() else int(child.stat().length)
    return total


def _drop_page_cache(directory: str) -> None:
    """Write the files under a local `directory` to disk and drop them from the page cache, so that a restore
    reads the disk as after a restart, not memory. Best effort (Linux)."""
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except (OSError, AttributeError):
                pass
            finally:
                os.close(fd)


@contextlib.contextmanager
def checkpoint_location(where: str) -> Iterator[tuple[str, str, str | None]]:
    """(directory to save into, label, the local folder holding its files) for `where`: 'local' (a temporary
    directory), 'emulator' (gs:// on a disk-backed GcsEmulator on localhost) or a directory or URL (a fresh
    folder under it). What was written is removed afterwards."""
    if where == "local":
        root = tempfile.mkdtemp(prefix="lsync_jax_bench_ckpt_")
        try:
            yield os.path.join(root, "checkpoints"), "local disk", root
        finally:
            shutil.rmtree(root, ignore_errors=True)
    elif where == "emulator":
        with GcsEmulator(buckets=["bench"]) as gcs:
            directory = "gs://bench/checkpoints"
            yield directory, "GCS emulator", gcs.local_path("gs://bench")
    else:
        directory = storage.join(where, f"lsync_jax_bench_ckpt_{uuid.uuid4().hex[:8]}")
        try:
            yield directory, storage.absolute(where), None if storage.is_remote(where) else directory
        finally:
            if storage.exists(directory):
                storage.rmtree(directory)


def random_state(abstract: Any, seed: int = 0) -> Any:
    """A train state of the layout `abstract` (from `abstract_state`: params, AdamW moments, EMA, step, RNG)
    with random values drawn on the host and placed with its shardings: nothing compiled. Random floats, as a
    trained state's, do not compress; a fresh state's zeros (Adam moments, zero-initialised layers) would,
    flattering a checkpoint's rates."""
    rng = np.random.default_rng(seed)

    def draw(leaf):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            value = rng.standard_normal(leaf.shape, dtype=np.float32).astype(leaf.dtype)
        else:
            value = rng.integers(0, 2**31 - 1, leaf.shape).astype(leaf.dtype)
        return jax.device_put(value, leaf.sharding)

    return jax.block_until_ready(jax.tree.map(draw, abstract))


def _state_bytes(state: Any) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(state)))


def _params_m(state: Any) -> float:
    return round(sum(x.size for x in jax.tree.leaves(state.params)) / 1e6, 1)


def time_checkpoint(state: Any, abstract: Any, directory: str, repeats: int, files: str | None = None
                    ) -> dict[str, Any]:
    """Median save and restore seconds of `state` through the run's Checkpointer into `directory` (one step
    per repeat, all kept), and the bytes the last save wrote. A save is timed from `save` to the end of the
    background write (`save_blocking_s`: until `save` returned, the pause a training loop sees); a restore
    until the arrays are on the devices, after the files were dropped from the page cache where they are
    local (`files`). `restored_equal`: the last restore equals `state` exactly."""
    checkpointer = Checkpointer(directory, max_to_keep=repeats)
    saves, blocking, restores, restored = [], [], [], None
    try:
        for step in range(repeats):
            start = time.perf_counter()
            checkpointer.save(step, state, {"benchmark": "checkpoint"})
            blocking.append(time.perf_counter() - start)
            checkpointer.wait()
            saves.append(time.perf_counter() - start)
        for step in range(repeats):
            del restored  # one restored copy at a time
            if files is not None:
                _drop_page_cache(files)
            start = time.perf_counter()
            restored = jax.block_until_ready(checkpointer.restore(step, abstract))
            restores.append(time.perf_counter() - start)
        equal = jax.tree.structure(restored) == jax.tree.structure(state) and all(
            np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(restored),
                                                                          jax.tree.leaves(state)))
        files_bytes = _tree_bytes(storage.join(directory, str(repeats - 1)))
    finally:
        checkpointer.close()
    state_bytes = _state_bytes(state)
    save_s, restore_s = float(np.median(saves)), float(np.median(restores))
    return dict(state_bytes=state_bytes, files_bytes=files_bytes, state_gb=round(state_bytes / 1e9, 3),
                files_gb=round(files_bytes / 1e9, 3), save_s=round(save_s, 4),
                save_gbps=round(state_bytes / 1e9 / save_s, 3), save_blocking_s=round(float(np.median(blocking)), 4),
                restore_s=round(restore_s, 4), restore_gbps=round(state_bytes / 1e9 / restore_s, 3),
                repeats=repeats, restored_equal=bool(equal))


def time_step_during_save(step_fn: Callable, state: Any, batch: Any, directory: str, steps: int, repeats: int
                          ) -> tuple[dict[str, Any], Any]:
    """(timings, the state after them) of the compiled train step `step_fn` with no save in flight (median of
    `steps`) and while an asynchronous save of the state into `directory` runs: every step from the moment
    `save` returns until the save has finished (the step running at that moment included, at least one per
    save), over `repeats` saves. `save_s`: from `save` to the end of the step in which the save finished."""

    def step(state):
        start = time.perf_counter()
        state, _ = jax.block_until_ready(step_fn(state, batch))
        return state, time.perf_counter() - start

    quiet, saving, saves, blocking = [], [], [], []
    for _ in range(steps):
        state, seconds = step(state)
        quiet.append(seconds)
    checkpointer = Checkpointer(directory, max_to_keep=repeats)
    try:
        for i in range(repeats):
            start = time.perf_counter()
            checkpointer.save(i, state, {"benchmark": "step_during_save"})
            blocking.append(time.perf_counter() - start)
            while True:
                state, seconds = step(state)
                saving.append(seconds)
                if not checkpointer.manager.is_saving_in_progress():
                    break
            checkpointer.wait()
            saves.append(time.perf_counter() - start)
    finally:
        checkpointer.close()
    step_ms, saving_ms = 1e3 * float(np.median(quiet)), 1e3 * float(np.median(saving))
    return dict(step_ms=round(step_ms, 1), step_ms_saving=round(saving_ms, 1),
                step_ratio=round(saving_ms / step_ms, 3), steps_saving=len(saving),
                save_s=round(float(np.median(saves)), 4), save_blocking_s=round(float(np.median(blocking)), 4),
                repeats=repeats), state


def bench_checkpoints(name: str, cfg: BenchConfig) -> Iterator[dict[str, Any]]:
    """Checkpoint rows of model `name` for each place in `cfg.checkpoint`, through the run's Checkpointer
    (Orbax, asynchronous saves):

    - 'checkpoint': saving and restoring the whole train state (params, AdamW moments, EMA; random values,
      `random_state`), median of `cfg.checkpoint_repeats`; GB/s are the state's bytes (1e9) per second;
    - 'step_during_save' (when `cfg.checkpoint_steps` > 0): the baseline train step of `bench_train_step`
      with no save in flight against steps while a save runs (`time_step_during_save`) and their ratio.
    """
    model = bench_model(name, cfg)
    abstract = abstract_state(model, make_optimizer({"lr": 1e-4})[0], make_mesh(*cfg.mesh))
    state = random_state(abstract)
    for where in cfg.checkpoint:
        with checkpoint_location(where) as (directory, label, files):
            timing = time_checkpoint(state, abstract, directory, cfg.checkpoint_repeats, files)
        yield dict(bench="checkpoint", model=name, storage=label, params_m=_params_m(state), **timing)
    del state
    if cfg.checkpoint_steps == 0:
        return
    _, state, batch, fn = _train_setup(name, cfg, "baseline", cfg.attention[0])
    state_bytes, params_m = _state_bytes(state), _params_m(state)
    compiled = fn.lower(state, batch).compile()
    state, _ = jax.block_until_ready(compiled(state, batch))  # warm-up
    for where in cfg.checkpoint:
        with checkpoint_location(where) as (directory, label, _):
            timing, state = time_step_during_save(compiled, state, batch, directory, cfg.checkpoint_steps,
                                                  cfg.checkpoint_repeats)
        yield dict(bench="step_during_save", model=name, storage=label, dtype=cfg.dtype, batch=cfg.batch_size,
                   params_m=params_m, state_bytes=state_bytes, state_gb=round(state_bytes / 1e9, 3), **timing)


COLUMNS = ("bench", "model", "variant", "attention", "dtype", "batch", "input", "tokens", "params_m", "ms",
           "img_per_s", "tflops", "mfu", "compile_s", "mem_gib", "peak_gib")
CHECKPOINT_BENCHES = ("checkpoint", "step_during_save")
OFFICIAL_COLUMNS = ("bench", "model", "variant", "dtype", "batch", "input", "tokens", "ema", "ours_ms", "official_ms",
                    "speedup", "xla_cpu_cores", "xla_devices", "torch_threads", "glibc_tunables")
CHECKPOINT_COLUMNS = ("bench", "model", "storage", "dtype", "batch", "params_m", "state_gb", "files_gb", "save_s",
                      "save_gbps", "save_blocking_s", "restore_s", "restore_gbps", "step_ms", "step_ms_saving",
                      "step_ratio", "steps_saving")


# The CPU comparison anchor with the official code: a 6-block SiT (hidden 192, 3 heads) on 28x28x1 with
# patch 4, batch 64, fp32, AdamW, LayerSync 2 -> 4 (weight 0.2) and the EMA update on both sides;
# learn_sigma as the official model always has it.
OFFICIAL_ANCHOR = dict(model="SiT-S/4", batch_size=64, input_size=28, in_channels=1, num_classes=10,
                       overrides=dict(depth=6, hidden_size=192, num_heads=3, learn_sigma=True), pair=(2, 4, 0.2))


def anchor_config(cfg: BenchConfig) -> BenchConfig:
    a = OFFICIAL_ANCHOR
    return dataclasses.replace(cfg, models=(a["model"],), batch_size=a["batch_size"], input_size=a["input_size"],
                               in_channels=a["in_channels"], num_classes=a["num_classes"], num_frames=0,
                               dtype="float32", model_overrides=dict(a["overrides"]), layersync_pairs=(a["pair"],))


def _time_steps(compiled: Any, state: Any, batch: Any, steps: int) -> tuple[list[float], Any]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state = compiled(state, batch)[0]
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
    return times, state


def bench_against_official(cfg: BenchConfig, print_fn: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Our train step and the official PyTorch one on OFFICIAL_ANCHOR, interleaved: each round times
    `cfg.steps` of ours (compiled once, before the first round) then `cfg.steps` of theirs (after two
    untimed warm-up steps), so that both see the same machine state. One row per round and a summary
    row with the medians over rounds; thread settings are in the rows (XLA's CPU runtime uses every core
    the process may run on, split into `xla_devices` data-parallel devices; torch uses `torch_threads`, or
    its default), and so is the allocator setting both sides ran under (`glibc_tunables`)."""
    if cfg.official_rounds < 1:
        raise ValueError(f"official_rounds must be >= 1, got {cfg.official_rounds}")
    anchor = anchor_config(cfg)
    a = OFFICIAL_ANCHOR
    model, state, batch, fn = _train_setup(a["model"], anchor, "layersync", "auto")
    compiled = fn.lower(state, batch).compile()
    _, state = _time_steps(compiled, state, batch, 2)  # warm-up
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    common = dict(model=f"{a['model']} d{a['overrides']['depth']} h{a['overrides']['hidden_size']}",
                  batch=a["batch_size"], input=f"{a['input_size']}x{a['input_size']}x{a['in_channels']}",
                  tokens=_tokens(model), dtype="float32", ema=True, xla_cpu_cores=cores,
                  xla_devices=jax.device_count(), glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""))
    rows = []
    for round_index in range(cfg.official_rounds):
        ours, state = _time_steps(compiled, state, batch, cfg.steps)
        theirs = time_official_step(cfg.official_dir, depth=a["overrides"]["depth"],
                                    hidden_size=a["overrides"]["hidden_size"], num_heads=a["overrides"]["num_heads"],
                                    input_size=a["input_size"], patch_size=4, in_channels=a["in_channels"],
                                    num_classes=a["num_classes"], batch_size=a["batch_size"], pairs=(a["pair"][:2],),
                                    reg_weight=a["pair"][2], ema=True, steps=cfg.steps, warmup=2,
                                    threads=cfg.torch_threads or None, seed=round_index)
        ours_ms, theirs_ms = float(np.median(ours)) * 1e3, float(theirs["ms_per_step"])
        rows.append(dict(bench="vs_official", variant=f"round {round_index + 1}", ours_ms=round(ours_ms, 1),
                         official_ms=round(theirs_ms, 1), speedup=round(theirs_ms / ours_ms, 3),
                         torch_threads=theirs["threads"], torch=theirs["torch_version"], **common))
        print_fn(format_table(rows[-1:], OFFICIAL_COLUMNS))
    ours_ms = float(np.median([r["ours_ms"] for r in rows]))
    theirs_ms = float(np.median([r["official_ms"] for r in rows]))
    rows.append(dict(rows[-1], variant=f"median of {len(rows)} rounds", ours_ms=round(ours_ms, 1),
                     official_ms=round(theirs_ms, 1), speedup=round(theirs_ms / ours_ms, 3)))
    print_fn(format_table(rows[-1:], OFFICIAL_COLUMNS))
    return rows


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    cells = [tuple(columns)] + [tuple("-" if r.get(c) is None else str(r[c]) for c in columns) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_tables(rows: Sequence[dict[str, Any]]) -> str:
    """The compute rows' table, then the checkpoint rows' and the official comparison's (their own columns),
    each only when it has rows."""
    checkpoint = [r for r in rows if r["bench"] in CHECKPOINT_BENCHES]
    official = [r for r in rows if r["bench"] == "vs_official"]
    compute = [r for r in rows if r["bench"] not in CHECKPOINT_BENCHES and r["bench"] != "vs_official"]
    tables = [format_table(compute)] if compute or not (checkpoint or official) else []
    if checkpoint:
        tables.append(format_table(checkpoint, CHECKPOINT_COLUMNS))
    if official:
        tables.append(format_table(official, OFFICIAL_COLUMNS))
    return "\n\n".join(tables)


def run(cfg: BenchConfig, print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every benchmark in `cfg`; print the table as rows arrive; return {'device', 'rows'}."""
    device = f"{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}), jax {jax.__version__}"
    if cfg.checkpoint and (cfg.checkpoint_repeats < 1 or cfg.checkpoint_steps < 0):
        raise ValueError(f"checkpoint_repeats must be >= 1 and checkpoint_steps >= 0, got {cfg.checkpoint_repeats} "
                         f"and {cfg.checkpoint_steps}")
    print_fn(f"device: {device}")
    rows = []
    for name in cfg.models:
        for attention in cfg.attention:
            for variant in cfg.variants:
                rows.append(bench_train_step(name, cfg, variant, attention))
                print_fn(format_table(rows[-1:]))
        if cfg.sample_steps > 0:
            for scale in cfg.sample_cfg:
                rows.append(bench_sampler(name, cfg, "euler_maruyama", scale))
                print_fn(format_table(rows[-1:]))
        for row in bench_checkpoints(name, cfg) if cfg.checkpoint else ():
            rows.append(row)
            print_fn(format_table(rows[-1:], CHECKPOINT_COLUMNS))
    if any("repa" in v for v in cfg.variants) and cfg.models:
        rows.append(bench_encoder(cfg))
        print_fn(format_table(rows[-1:]))
    if cfg.vae_batch > 0:
        for direction in ("encode", "decode"):
            rows.append(bench_vae(cfg, direction))
            print_fn(format_table(rows[-1:]))
    if cfg.inception_batch > 0:
        rows.append(bench_inception(cfg))
        print_fn(format_table(rows[-1:]))
    if cfg.fid_samples > 0:
        rows.append(bench_fid(cfg))
        print_fn(format_table(rows[-1:]))
    if cfg.official_dir:
        rows += bench_against_official(cfg, print_fn)
    print_fn("\n" + format_tables(rows))
    return {"device": device, "config": dataclasses.asdict(cfg), "rows": rows}


def write_json(result: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
