"""Know it fits before you rent the slice: compile a run's programs for a Cloud TPU topology you do not
have, on any Linux x86_64 host (`launch/train.py --check --target=v5e-16`).

libtpu's compiler runs without a TPU: `jax.experimental.topologies.get_topology_desc` describes the
chips of a slice, the run's mesh is laid over them, and the exact programs the run would compile
(the train step; the sampler of sample grids and in-training FID; FID's Inception pass) are lowered
from shapes alone (no data, weights or workdir) and compiled for them. The compiler's out-of-memory
is the verdict: "fits" means it accepted the program within the HBM it reports as usable (15.75G of a
v5e chip's 16 GiB). What it prints per chip (memory, FLOPs) comes from `compiled.memory_analysis()`
and `cost_analysis()`; step times and MFU are estimates, never measurements.

The chips' HBM, peak bf16 FLOP/s and HBM bandwidth are Google's published figures (`CHIPS`). Nothing
here runs on a GPU: JAX cannot compile for CUDA without one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from lsync_jax.builders import (
    build_mesh,
    build_model,
    build_sampler,
    build_transport,
    decode_program,
    mesh_rules,
    validate_config,
)
from lsync_jax.extras import require
from lsync_jax.models.inception import features as inception_features
from lsync_jax.models.mup import mup_lr_multipliers
from lsync_jax.models.vae import AutoencoderKL, VAEConfig
from lsync_jax.objectives import build_objective
from lsync_jax.porting.inception import expected_shapes as inception_shapes
from lsync_jax.sharding import batch_sharding, replicated
from lsync_jax.tools.benchmark import forward_flops, input_axes
from lsync_jax.train.state import abstract_state, make_optimizer, shardings_of
from lsync_jax.train.step import make_train_step, microbatch_problem
from lsync_jax.transport import make_sample_fn

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation as Google publishes it (per chip), and how libtpu and Cloud TPU name it."""

    generation: str  # the prefix of Cloud TPU's accelerator type: v4, v5e, v5p, v6e
    device_kind: str  # what libtpu's devices call themselves
    hbm_gib: float  # the spec sheet's HBM per chip (the compiler reports slightly less as usable)
    peak_bf16: float  # dense bf16 FLOP/s per chip
    hbm_bandwidth: float  # bytes/s per chip
    cores_per_chip: int  # TensorCores the accelerator type's number counts per chip (v4-8 is 4 chips)
    chip_config: str  # libtpu's chip_config_name ('megacore': one device per chip)
    dims: int  # 3-D (v4, v5p) or 2-D (v5e, v6e) torus
    single_host_chips: int  # the largest slice on one host
    source: str


# Google Cloud's TPU pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e; "System architecture",
# read 2026-12-05): per chip HBM, peak bf16 compute and HBM bandwidth.
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "TPU v4", 32, 275e12, 1200e9, 2, "megacore", 3, 4, "cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", "TPU v5 lite", 16, 197e12, 819e9, 1, "default", 2, 8, "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", "TPU v5", 95, 459e12, 2765e9, 2, "default", 3, 4, "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", "TPU v6 lite", 32, 918e12, 1640e9, 1, "default", 2, 8, "cloud.google.com/tpu/docs/v6e"),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}


@dataclasses.dataclass(frozen=True)
class Target:
    """A Cloud TPU accelerator type (e.g. 'v5e-16', 'v4-32', '2xv5p-64': two slices)."""

    name: str
    chip: Chip
    chips: int  # per slice
    slices: int = 1

    @property
    def topology(self) -> tuple[int, ...]:
        """The slice's chip grid: 2-D for v5e/v6e (2x2, 2x4, 4x4, ...), 3-D for v4/v5p (2x2x1, 2x2x2, ...)."""
        if self.chip.dims == 2:
            if self.chips == 1:
                return (1, 1)
            side = 2 ** (int(math.log2(self.chips)) // 2)
            return (side, self.chips // side)
        dims = [2, 2, 1] if self.chips == 4 else [2, 2, 2]
        while math.prod(dims) < self.chips:
            smallest = min(range(3), key=lambda i: (dims[i], -i))
            dims[smallest] *= 2
        return tuple(dims)

    @property
    def hosts_per_slice(self) -> int:
        return 1 if self.chips <= self.chip.single_host_chips else self.chips // 4

    @property
    def devices(self) -> int:
        return self.chips * self.slices


def parse_target(name: str) -> Target:
    """'v5e-16', 'v5litepod-16', 'v4-32', 'v5p-64', 'v6e-8', and 'NxTYPE' for N slices of TYPE. v4-N and
    v5p-N count TensorCores (2 per chip: v4-8 is 4 chips); v5e-N and v6e-N count chips."""
    match = re.fullmatch(r"(?:(\d+)x)?(v\d+[a-z]*|v5litepod)-(\d+)", name.strip().lower())
    known = ", ".join(f"{g}-N" for g in CHIPS) + " (v5litepod-N for v5e-N), NxTYPE for N slices"
    if not match:
        raise ValueError(f"--target={name!r} is not a Cloud TPU accelerator type; expected one of {known}, "
                         "e.g. v5e-16, v4-32, v5p-64, v6e-8, 2xv5p-64")
    slices, number = int(match.group(1) or 1), int(match.group(3))
    generation = ALIASES.get(match.group(2), match.group(2))
    if generation not in CHIPS:
        raise ValueError(f"--target={name!r}: unknown TPU generation {match.group(2)!r}; expected one of {known}")
    chip = CHIPS[generation]
    if number % chip.cores_per_chip:
        raise ValueError(f"--target={name!r}: {generation}-N counts TensorCores, {chip.cores_per_chip} per chip; N "
                         f"must be a multiple of {chip.cores_per_chip} (e.g. {generation}-8 is 4 chips)")
    chips = number // chip.cores_per_chip
    smallest = 1 if chip.dims == 2 else 4
    if chips < smallest or chips & (chips - 1):
        raise ValueError(f"--target={name!r}: {chips} chip(s); slices of {generation} have a power of two >= "
                         f"{smallest} chips")
    if slices < 1:
        raise ValueError(f"--target={name!r}: the slice count must be >= 1")
    return Target(name, chip, chips, slices)


def topology_devices(target: Target) -> list[Any]:
    """The TPU devices of `target` as libtpu's compiler sees them (nothing attached is needed)."""
    require("libtpu", "tpu-compile", "compiling for a TPU topology (--target)")
    from jax.experimental import topologies

    shape = target.topology
    bounds = ((2, 2, 1) if target.hosts_per_slice > 1 else tuple(shape) + (1,) * (3 - len(shape)))
    # libtpu takes a lock file that another process using it (a training run on this TPU VM, a second
    # check) holds; compiling for a topology touches no chip, so it may load beside them.
    previous = os.environ.get(_MULTIPLE_LOAD)
    os.environ[_MULTIPLE_LOAD] = "1"
    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=f"{target.chip.generation}:{'x'.join(map(str, shape))}",
            chip_config_name=target.chip.chip_config, chips_per_host_bounds=bounds, num_slices=target.slices,
            wrap=(False, False, False))
    finally:
        if previous is None:
            os.environ.pop(_MULTIPLE_LOAD, None)
        else:
            os.environ[_MULTIPLE_LOAD] = previous
    return list(desc.devices)


_MULTIPLE_LOAD = "ALLOW_MULTIPLE_LIBTPU_LOAD"


_OOM = re.compile(r"required for ([^()]*)\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)")
_UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_out_of_memory(message: str) -> tuple[float, float] | None:
    """(bytes needed, bytes usable) from the compiler's RESOURCE_EXHAUSTED message, or None."""
    match = _OOM.search(message)
    if not match:
        return None
    return float(match.group(2)) * _UNITS[match.group(3)], float(match.group(4)) * _UNITS[match.group(5)]


_USABLE: dict[str, float] = {}


def usable_hbm(device: Any) -> float:
    """The HBM per device that the compiler lets a program use, as it reports it (probed once per kind
    by compiling a program that cannot fit: its error states the limit)."""
    kind = device.device_kind
    if kind not in _USABLE:
        mesh = jax.sharding.Mesh(np.array([device]), ("d",))
        probe = jax.jit(lambda x: jnp.zeros((1 << 38,), jnp.float32) + x, out_shardings=NamedSharding(mesh, P()))
        try:
            probe.lower(jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))).compile()
            raise RuntimeError(f"a 1 TiB program compiled for {kind}: cannot read its usable HBM")
        except jax.errors.JaxRuntimeError as e:
            parsed = parse_out_of_memory(str(e))
            if parsed is None:
                raise
            _USABLE[kind] = parsed[1]
    return _USABLE[kind]


@dataclasses.dataclass
class Program:
    """One compiled program's figures per device (bytes, FLOPs) or its out-of-memory."""

    name: str
    fits: bool
    arguments: float = 0.0
    outputs: float = 0.0
    aliased: float = 0.0
    temporaries: float = 0.0
    flops: float = 0.0
    bytes_accessed: float = 0.0
    optimal_seconds: float | None = None
    needed: float = 0.0  # out of memory: what the compiler asked for
    error: str = ""
    compile_seconds: float = 0.0

    @property
    def total(self) -> float:
        """Peak HBM of the program: its inputs, outputs not written in place of a donated input, temporaries."""
        return self.arguments + self.outputs - self.aliased + self.temporaries


def compile_program(name: str, lowered: Any) -> Program:
    """Compile `lowered`; an out-of-memory is a result (`fits=False`), any other error is raised. libtpu
    refuses a program whose temporaries alone exceed the usable HBM; one it accepts can still need more
    than that with its arguments, which `FitReport.fits` also checks."""
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        parsed = parse_out_of_memory(str(e))
        if parsed is None:
            raise
        return Program(name, False, needed=parsed[0], error=str(e).splitlines()[0],
                       compile_seconds=time.perf_counter() - start)
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    optimal = cost.get("optimal_seconds")
    return Program(name, True, arguments=memory.argument_size_in_bytes, outputs=memory.output_size_in_bytes,
                   aliased=memory.alias_size_in_bytes, temporaries=memory.temp_size_in_bytes,
                   flops=float(cost.get("flops", 0.0)), bytes_accessed=float(cost.get("bytes accessed", 0.0)),
                   optimal_seconds=None if optimal is None else float(optimal),
                   compile_seconds=time.perf_counter() - start)


def per_device_bytes(tree: Any) -> float:
    """The bytes one device holds of an abstract tree of sharded arrays (the largest shard of each)."""
    return float(sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
                     for leaf in jax.tree.leaves(tree)))


@dataclasses.dataclass
class FitReport:
    """What `check_fit` found: the train step's figures per chip, the other programs, the verdict."""

    target: str
    device_kind: str
    devices: int
    mesh: dict[str, int]
    global_batch: int
    microbatches: int
    remat: str
    mu_dtype: str
    usable_hbm: float
    spec_hbm: float
    state: dict[str, float]  # bytes per chip: params, ema, opt_state
    step: Program
    others: list[Program]
    model_flops: float  # per chip per step, analytic (no recompute): for MFU
    peak_flops: float
    hbm_bandwidth: float
    notes: list[str]

    @property
    def fits(self) -> bool:
        return all(p.fits and p.total <= self.usable_hbm for p in [self.step, *self.others])

    def step_time(self) -> tuple[float | None, str]:
        """(seconds, how it was estimated): the compiler's cost model where it gives a positive time,
        else the roofline max(FLOPs / peak, bytes / bandwidth)."""
        step = self.step
        if not step.fits:
            return None, ""
        if step.optimal_seconds is not None and step.optimal_seconds > 0:
            return step.optimal_seconds, "compiler estimate (cost model)"
        roofline = max(step.flops / self.peak_flops, step.bytes_accessed / self.hbm_bandwidth)
        return roofline, "compiler estimate (roofline)"

    def mfu(self) -> float | None:
        seconds, _ = self.step_time()
        return None if not seconds else self.model_flops / (seconds * self.peak_flops)

    def suggestion(self) -> str:
        """An analytic suggestion (no planner run) when the step does not fit: temporaries scale with the
        per-chip (micro)batch, the state with 1 / fsdp."""
        step, usable = self.step, self.usable_hbm
        state = sum(self.state.values())
        temps = step.needed if not step.fits else step.temporaries
        over = (state + temps) - usable
        ideas = []
        per_chip = self.global_batch // self.devices // self.microbatches
        room = usable - state - (0 if not step.fits else step.outputs - step.aliased)
        if room > 0 and temps > 0:
            fitting = max(int(per_chip * room / temps), 0)
            if fitting >= 1:
                k = self.microbatches * -(-per_chip // fitting)
                while (self.global_batch // self.devices) % k:
                    k += 1
                ideas.append(f"--config.train.microbatches={k} (about {fitting} example(s) per chip at a time fit)")
        if self.remat == "none":
            ideas.append("--config.model.overrides.remat=dots (or blocks: least memory, a third more FLOPs)")
        if self.mesh["fsdp"] < self.devices and state > 0.25 * usable:
            ideas.append(f"--config.mesh.fsdp={self.devices} --config.mesh.data=1 (the state's {state / GIB:.2f} GiB "
                         "per chip split over every chip)")
        if self.mu_dtype in ("None", "float32"):
            ideas.append("--config.optimizer.mu_dtype=bfloat16 (Adam's first moment in half the bytes)")
        return f"over by about {over / GIB:.2f} GiB per chip; try " + "; or ".join(ideas) if ideas else ""

    def as_dict(self) -> dict[str, Any]:
        seconds, how = self.step_time()
        return dict(target=self.target, device_kind=self.device_kind, devices=self.devices, mesh=self.mesh,
                    global_batch=self.global_batch, microbatches=self.microbatches, remat=self.remat,
                    mu_dtype=self.mu_dtype, fits=self.fits, usable_hbm_gib=self.usable_hbm / GIB,
                    state_gib={k: v / GIB for k, v in self.state.items()},
                    programs=[dict(dataclasses.asdict(p), total_gib=p.total / GIB) for p in [self.step, *self.others]],
                    step_seconds=seconds, step_seconds_estimate=how, mfu_estimate=self.mfu(),
                    model_flops_per_chip=self.model_flops, notes=self.notes, suggestion=self.suggestion())

    def lines(self) -> list[str]:
        """The report a person reads: per chip, every number from the compiler, times marked as estimates."""
        g = GIB
        out = [f"target {self.target}: {self.devices} x {self.device_kind} (usable HBM {self.usable_hbm / g:.2f} GiB "
               f"per chip as the compiler reports it; spec {self.spec_hbm:g} GiB), mesh data={self.mesh['data']} "
               f"fsdp={self.mesh['fsdp']}, global batch {self.global_batch} ({self.global_batch // self.devices} per "
               f"chip, microbatches {self.microbatches}), remat {self.remat}, Adam mu {self.mu_dtype}"]
        s = self.state
        out.append(f"  state per chip: params {s['params'] / g:.2f} GiB, EMA {s['ema'] / g:.2f} GiB, optimizer "
                   f"{s['opt_state'] / g:.2f} GiB")
        for p in [self.step, *self.others]:
            if p.fits:
                over = "" if p.total <= self.usable_hbm else "DOES NOT FIT: compiled, but needs "
                out.append(f"  {p.name}: {over}{p.total / g:.2f} GiB per chip of {self.usable_hbm / g:.2f} (arguments "
                           f"{p.arguments / g:.2f}, temporaries {p.temporaries / g:.2f}, outputs not in place "
                           f"{(p.outputs - p.aliased) / g:.2f}); {p.flops / 1e12:.2f} TFLOP per chip; compiled in "
                           f"{p.compile_seconds:.0f} s")
            else:
                out.append(f"  {p.name}: DOES NOT FIT: {p.error}")
        seconds, how = self.step_time()
        if seconds:
            mfu = self.mfu()
            out.append(f"  step time {seconds * 1e3:.1f} ms ({how}); MFU {100 * mfu:.0f}% (compiler estimate: model "
                       f"FLOPs {self.model_flops / 1e12:.2f} T per chip over that time at {self.peak_flops / 1e12:.0f} "
                       "TFLOP/s peak)")
        out.extend(f"  note: {n}" for n in self.notes)
        out.append("  verdict: fits" if self.fits else f"  verdict: does NOT fit; {self.suggestion()}")
        return out


def _abstract(shape: tuple[int, ...], dtype: Any, sharding: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def check_fit(config: Any, target_name: str, *, programs: bool = True) -> FitReport:
    """Compile `config`'s programs for `target_name` (a Cloud TPU accelerator type) from shapes alone and
    report what each needs per chip. Reads no data, weights or workdir and writes nothing. `programs`:
    also the sampler and FID's Inception pass when the config turns them on."""
    validate_config(config)
    target = parse_target(target_name)
    devices = topology_devices(target)
    mesh, rules = build_mesh(config, devices=devices), mesh_rules(config)
    model = build_model(config, devices[0].platform)
    transport = build_transport(config)
    objective = build_objective(config.objective, transport, depth=model.depth)
    tx, schedule = make_optimizer(dict(config.optimizer), lr_multipliers=mup_lr_multipliers(model))
    batch_size, microbatches = int(config.data.batch_size), int(config.train.microbatches)
    if batch_size % len(devices):
        raise ValueError(f"config.data.batch_size={batch_size} is not divisible by the {len(devices)} chips of "
                         f"{target_name}")
    problem = microbatch_problem(batch_size, microbatches, len(devices), objective)
    if problem:
        raise ValueError(problem)
    notes = []
    abstract = abstract_state(model, tx, mesh, rules)
    batch = _abstract_batch(config, model, mesh, batch_size, notes)
    step_fn = make_train_step(model, objective, tx, schedule, mesh, ema_decay=float(config.train.ema_decay),
                              rules=rules, shardings=shardings_of(abstract), microbatches=microbatches,
                              batch_size=batch_size)
    step = compile_program("train step", step_fn.lower(abstract, batch))
    others = _other_programs(config, model, transport, mesh, abstract, devices, notes) if programs else []
    state = {"params": per_device_bytes(abstract.params), "ema": per_device_bytes(abstract.ema_params),
             "opt_state": per_device_bytes(abstract.opt_state)}
    model_flops = 3 * forward_flops(model, *input_axes(model)) * batch_size / len(devices)
    return FitReport(target_name, devices[0].device_kind, len(devices), dict(mesh.shape), batch_size, microbatches,
                     str(model.remat), str(config.optimizer.mu_dtype), usable_hbm(devices[0]), target.chip.hbm_gib,
                     state, step, others, model_flops, target.chip.peak_bf16, target.chip.hbm_bandwidth, notes)


def _abstract_batch(config: Any, model: Any, mesh: Any, batch_size: int, notes: list[str]) -> dict[str, Any]:
    """The step's batch as shapes: the model's input, labels or tags, REPA's encoder tokens."""
    sharding = batch_sharding(mesh)
    x, _, y = model.init_inputs(1)
    batch = {"x": _abstract((batch_size, *x.shape[1:]), jnp.float32, sharding)}
    if getattr(model, "num_tags", 0):
        batch["tags"] = _abstract((batch_size, model.num_tags), jnp.float32, sharding)
    batch["y"] = _abstract((batch_size,), jnp.int32, sharding)
    if "repa" in tuple(config.objective.regularizers):
        projector = int(config.objective.repa.projector)
        grid = model.input_size // model.patch_size
        batch["encoder_features"] = _abstract((batch_size, grid * grid, model.z_dims[projector]), jnp.float32,
                                              sharding)
        if not config.objective.repa.precomputed:
            notes.append("REPA's online encoder pass (its own program, weights from objective.repa.encoder_path) is "
                         "not compiled here; its tokens enter the step as the batch's encoder_features")
    return batch


def _other_programs(config: Any, model: Any, transport: Any, mesh: Any, abstract: Any, devices: list[Any],
                    notes: list[str]) -> list[Program]:
    """The sampler of the sample grids and of in-training FID, and FID's Inception pass, where on."""
    out = []
    sampler, cfg_scale, interval = build_sampler(config)
    sample_fn = make_sample_fn(model, transport, sampler, mesh=mesh)
    variables = {"params": abstract.ema_params}
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = _abstract(key.shape, key.dtype, replicated(mesh))
    batches = []
    if int(config.train.num_grid_samples) > 0 and float(config.objective.transport_weight) > 0:
        batches.append(("sampler (sample grid)", int(config.train.num_grid_samples)))
    if int(config.eval.every) > 0:
        batches.append(("sampler (in-training FID)", int(config.eval.batch_size)))
    for name, n in batches:
        if getattr(model, "num_tags", 0):
            labels = _abstract((n, model.num_tags), jnp.float32, replicated(mesh))
        else:
            labels = _abstract((n,), jnp.int32, batch_sharding(mesh) if n % mesh.size == 0 else replicated(mesh))
        out.append(compile_program(name, sample_fn.lower(variables, key, labels, cfg_scale, interval)))
    if config.data.name == "imagenet_latents" and batches:  # latent samples are decoded to images
        vae = AutoencoderKL(VAEConfig())
        vae_params = jax.eval_shape(vae.init, jax.random.key(0), jnp.zeros((1, 16, 16, vae.config.in_channels)))
        vae_params = jax.tree.map(lambda a: _abstract(a.shape, a.dtype, replicated(mesh)), vae_params["params"])
        decode = decode_program(vae, mesh, int(config.vae.decode_chunk))
        for name, n in batches:
            n = -(-n // mesh.size) * mesh.size  # padded to whole shards, as builders.build_decoder does
            latents = _abstract((n, *model.init_inputs(1)[0].shape[1:]), jnp.float32, batch_sharding(mesh))
            out.append(compile_program(name.replace("sampler", "SD-VAE decode"), decode.lower(vae_params, latents)))
        notes.append("the SD-VAE decode is compiled for SD's VAE configuration (sd-vae-ft-ema's; "
                     "config.vae.path's own config.json is not read here)")
    if int(config.eval.every) > 0:
        shapes = inception_shapes()
        params = traverse_util.unflatten_dict({tuple(k.split("/")): _abstract(tuple(s), jnp.float32, replicated(mesh))
                                               for k, s in shapes.items()})
        n = -(-int(config.eval.batch_size) // mesh.size) * mesh.size
        if config.data.name == "imagenet_latents":  # decoded by the SD-VAE: 8x the latents' side, RGB
            size, channels = int(config.data.image_size or 8 * model.input_size), 3
        else:
            size, channels = model.input_size, model.in_channels
        images = _abstract((n, size, size, channels), jnp.uint8, batch_sharding(mesh))
        inception = jax.jit(lambda p, i: inception_features(p, i, with_logits="logits_kernel" in shapes),
                            out_shardings=batch_sharding(mesh))
        out.append(compile_program("FID Inception pass", inception.lower(params, images)))
    return out
