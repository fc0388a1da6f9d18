"""Samples for evaluation: class-balanced batches over every device, and EMA samples of a run's
workdir written as an ADM-style .npz (arr_0 samples, arr_1 labels) and a picture:

- images: arr_0 uint8 (N, H, W, C) and a PNG grid;
- video clips: arr_0 uint8 (N, F, H, W, C) and a PNG strip, one clip per row with its frames along it;
- sequences: arr_0 float32 (N, L, C) in the data's own units (no picture).

Latent models' samples are decoded to images by the SD-VAE (`lsync_jax.builders.build_decoder`).
Tag-conditioned models get one tag on per sample, uniform over the tags (arr_1: uint8 multi-hot (N, T)).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from lsync_jax import storage
from lsync_jax.builders import build_decoder, build_mesh, build_sampler, build_transport, validate_config
from lsync_jax.eval.video import video_grid
from lsync_jax.host import (
    Progress,
    compiler_options,
    gather_to_host,
    initialize_distributed,
    make_grid,
    save_png,
    to_uint8,
)
from lsync_jax.sharding import batch_sharding
from lsync_jax.storage import check_writable, save_npz_atomic, write_adm_batch
from lsync_jax.transport import SamplerConfig, make_sample_fn
from lsync_jax.workdir import load_params

VIDEO_STRIP_CLIPS = 10  # rows of a video run's PNG strip


def sample_conditions(rng: np.random.Generator, n: int, num_classes: int, num_tags: int = 0) -> np.ndarray:
    """n class labels uniform over the classes (int32 (n,)), or for a tag-conditioned model n multi-hot
    vectors with one tag on each, uniform over the tags (float32 (n, num_tags))."""
    if num_tags:
        return np.eye(num_tags, dtype=np.float32)[rng.integers(0, num_tags, n)]
    return rng.integers(0, max(num_classes, 1), n).astype(np.int32)


def sample_batches(sample_fn: Any, variables: Any, mesh: Any, num_classes: int, num_samples: int,
                   batch_size: int, seed: int, cfg_scale: float, interval: tuple[float, float],
                   decode: Callable[[jax.Array], jax.Array] | None = None, *, num_tags: int = 0,
                   quantize: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(samples, labels) batches of class-conditional samples, labels uniform over the classes (or one
    tag on per sample, `num_tags`); split over every device; the same for the same seed (keys folded by
    batch start). `decode` maps model outputs to images (the VAE decoder of latent models). Samples are
    uint8 (`to_uint8`, images and clips) or, without `quantize`, the float32 outputs (sequences)."""
    rng = np.random.default_rng(seed)
    for start in range(0, num_samples, batch_size):
        labels = sample_conditions(rng, batch_size, num_classes, num_tags)
        keep = num_samples - start
        yield sample_batch(sample_fn, variables, mesh, labels, start, seed, cfg_scale, interval, decode,
                           num_tags=num_tags, quantize=quantize)[:keep], labels[:keep]


def sample_batch(sample_fn: Any, variables: Any, mesh: Any, labels: np.ndarray, start: int, seed: int,
                 cfg_scale: float, interval: tuple[float, float], decode: Callable[[jax.Array], jax.Array] | None,
                 *, num_tags: int = 0, quantize: bool = True) -> np.ndarray:
    """One batch of samples for `labels`, its noise the seed folded with the batch's first index `start`
    (so any batch can be drawn again on its own), gathered to the host: uint8, or float32 without `quantize`."""
    # class labels are split over every device, and with them the batch; tags are checked on the host
    placed = labels if num_tags else jax.device_put(labels, batch_sharding(mesh))
    key = jax.random.fold_in(jax.random.key(seed), start)
    samples = sample_fn(variables, key, placed, cfg_scale, interval)
    if decode is not None:
        samples = decode(samples)
    host = gather_to_host(samples)
    return to_uint8(host) if quantize else host.astype(np.float32)


def check_counts(num_samples: int, batch_size: int) -> None:
    """Both >= 1 and the batch split evenly over every device (before any weights load)."""
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        if int(value) < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    if batch_size % jax.device_count():
        raise ValueError(f"--batch_size={batch_size} is not divisible by the {jax.device_count()} devices")


@dataclasses.dataclass
class RunSampler:
    """What sampling a run's EMA weights needs: the model, the weights and their step, the jitted sampler,
    guidance, and the SD-VAE decoder of latent models (None otherwise)."""

    model: Any
    ema: Any
    step: int
    mesh: Any
    sample_fn: Callable[..., jax.Array]
    cfg_scale: float
    interval: tuple[float, float]
    decode: Callable[[jax.Array], jax.Array] | None

    @property
    def kind(self) -> str:
        return self.model.kind

    @property
    def num_tags(self) -> int:
        return int(getattr(self.model, "num_tags", 0))


def run_sampler(config: Any, workdir: str, mesh: Any, sampler: SamplerConfig | None = None,
                cfg_scale: float | None = None, interval: tuple[float, float] | None = None) -> RunSampler:
    """The newest intact checkpoint of `workdir` (model and transport checked against `config`) with the
    config's sampler and guidance, or the ones given (a protocol's)."""
    model, ema, step = load_params(config, workdir, mesh)
    configured, scale, configured_interval = build_sampler(config)
    sampler = sampler or configured
    sample_fn = make_sample_fn(model, build_transport(config), sampler,
                               compiler_options=compiler_options(mesh.devices.flat[0].platform), mesh=mesh)
    return RunSampler(model, ema, step, mesh, sample_fn, scale if cfg_scale is None else float(cfg_scale),
                      configured_interval if interval is None else tuple(interval), build_decoder(config, mesh))


def sample_from_workdir(config: Any, workdir: str, out_dir: str, num_samples: int, batch_size: int,
                        seed: int = 0) -> dict[str, str | None]:
    """Draw `num_samples` class-conditional samples (labels uniform over the classes) in batches sharded
    over every device; write samples_step<S>_seed<K>_<N>.npz into `out_dir`, with a PNG of the first 100
    images, or a strip of the first 10 clips (sequences have no picture: 'png' is None)."""
    validate_config(config)
    initialize_distributed(config.distributed)
    mesh = build_mesh(config)
    check_counts(num_samples, batch_size)
    if jax.process_index() == 0:  # the one writer: refused now, not after sampling 50,000 images
        check_writable(out_dir)
    run = run_sampler(config, workdir, mesh)  # the newest intact checkpoint, its transport checked
    model, ema, step, kind = run.model, run.ema, run.step, run.kind
    sample_fn, cfg_scale, interval, decode = run.sample_fn, run.cfg_scale, run.interval, run.decode
    npz = os.path.join(out_dir, f"samples_step{step}_seed{seed}_{num_samples}.npz")
    png = None if kind == "sequence" else os.path.join(out_dir, f"samples_step{step}_seed{seed}.png")

    def logged(batches: Iterator[tuple[np.ndarray, np.ndarray]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        done = 0
        for x, y in batches:
            done += len(x)
            logging.info("sampled %d / %d", done, num_samples)
            yield x, y

    batches = logged(sample_batches(sample_fn, {"params": ema}, mesh, model.num_classes, num_samples, batch_size,
                                    seed, cfg_scale, interval, decode, num_tags=int(getattr(model, "num_tags", 0)),
                                    quantize=kind != "sequence"))
    if jax.process_index() == 0:
        write_samples(kind, npz, png, batches)
    else:
        for _ in batches:  # every process takes part in sampling
            pass
    return {"npz": npz, "png": png}


def write_samples(kind: str, npz: str, png: str | None, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
    """(samples, labels) batches of a model of `kind` ('image', 'video', 'sequence') into the .npz and its
    picture: images and clips streamed to disk (`write_adm_batch`: 50,000 images at 512 px do not fit in
    host memory) with a grid of the first 100 images or a strip of the first 10 clips, by class; sequences
    (float) gathered and written with one np.savez, no picture. Multi-hot tags are stored as uint8."""
    def stored(labels: np.ndarray) -> np.ndarray:
        return labels.astype(np.uint8) if labels.ndim == 2 else labels

    if kind == "sequence":
        samples, labels = zip(*batches)
        save_npz_atomic(npz, arr_0=np.concatenate(samples).astype(np.float32),
                        arr_1=stored(np.concatenate(labels)))
        return
    first, labels = write_adm_batch(npz, ((x, stored(y)) for x, y in batches))
    shown = VIDEO_STRIP_CLIPS if kind == "video" else 100
    order = np.argsort(labels[:shown], kind="stable") if labels.ndim == 1 else np.arange(min(shown, len(first)))
    picture = first[:shown][order]
    save_png(png, video_grid(picture) if kind == "video" else make_grid(picture, columns=10))


# -- resumable sampling (protocol runs: 50,000 samples, hours, preemptible) --------------------------------

def protocol_labels(num_samples: int, num_classes: int, balance: str, seed: int) -> np.ndarray:
    """Every label of a run, fixed before sampling so that any batch can be redone on its own: 'uniform',
    i.i.d. uniform classes (what ADM's, DiT's, SiT's and REPA's sampling scripts draw); 'balanced',
    num_samples // C of each class plus the remainder from a random subset of classes, shuffled."""
    rng = np.random.default_rng(seed)
    classes = max(int(num_classes), 1)
    if balance == "uniform":
        return rng.integers(0, classes, num_samples).astype(np.int32)
    if balance == "balanced":
        labels = np.concatenate([np.repeat(np.arange(classes), num_samples // classes),
                                 rng.permutation(classes)[: num_samples % classes]])
        return rng.permutation(labels).astype(np.int32)
    raise ValueError(f"class balance {balance!r}: expected 'uniform' or 'balanced'")


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def _part(parts_dir: str, start: int) -> str:
    return storage.join(parts_dir, f"part_{start:09d}.npz")


def _part_intact(path: str, labels: np.ndarray) -> bool:
    """A finished batch: readable, as many samples as labels, the same labels (a part of another run is not)."""
    if not storage.exists(path):
        return False
    try:
        arrays = storage.load_npz(path)
    except Exception as e:  # noqa: BLE001 - any unreadable part is redone, not trusted
        logging.warning("sampled part %s is unreadable (%s): sampling it again", path, e)
        return False
    return len(arrays.get("arr_0", ())) == len(labels) and np.array_equal(arrays.get("arr_1"), labels)


def sample_resumable(run: RunSampler, labels: np.ndarray, batch_size: int, seed: int, parts_dir: str,
                     record: dict[str, Any], *, log: Callable[[str], None] = logging.info) -> list[str]:
    """Sample one batch per `batch_size` labels into PARTS_DIR/part_<start>.npz (arr_0 samples, arr_1 labels),
    each written whole or not at all, and return the parts in order. A rerun with the same `record`, labels,
    seed, batch size and device count skips the parts already there, so a killed run finishes the very
    same samples: a batch's noise comes from the seed folded with its start, and its labels were fixed
    in advance. Anything else is refused (a mixed set of samples would be no protocol's)."""
    num = len(labels)
    starts = list(range(0, num, batch_size))
    manifest = dict(record, num_samples=num, batch_size=int(batch_size), devices=jax.device_count(), seed=int(seed),
                    labels=_digest(labels))
    manifest = json_plain(manifest)
    manifest_path = storage.join(parts_dir, "manifest.json")
    writer = jax.process_index() == 0
    problem = None
    done = np.zeros(len(starts) + 1, np.int32)  # [refused, done per batch...]: process 0 decides for all
    if writer:
        try:
            _check_manifest(parts_dir, manifest_path, manifest)
            done[1:] = [_part_intact(_part(parts_dir, s), labels[s:s + batch_size]) for s in starts]
        except (OSError, ValueError) as e:
            problem, done[0] = e, 1
    if jax.process_count() > 1:  # every process runs the same batches, or stops with the writer
        done = np.asarray(multihost_utils.broadcast_one_to_all(done))
    if problem is not None:
        raise problem
    if done[0]:
        raise ValueError(f"process 0 refused the sampling parts in {parts_dir} (its log names why)")
    done = done[1:]
    if done.any():
        log(f"resuming: {int(done.sum())} of {len(starts)} batches already in {parts_dir}")
    progress = Progress("sampling", int(num - sum(min(batch_size, num - s) for s, d in zip(starts, done) if d)),
                        unit="samples", log=log)
    for start, finished in zip(starts, done):
        if finished:
            continue
        chunk = labels[start:start + batch_size]
        padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        host = sample_batch(run.sample_fn, {"params": run.ema}, run.mesh, padded, start, seed, run.cfg_scale,
                            run.interval, run.decode, num_tags=run.num_tags,
                            quantize=run.kind != "sequence")[: len(chunk)]
        if writer:
            save_npz_atomic(_part(parts_dir, start), arr_0=host, arr_1=chunk)
        progress.update(len(chunk))
    progress.finish()
    return [_part(parts_dir, s) for s in starts]


def record_differences(found: dict[str, Any] | None, wanted: dict[str, Any]) -> tuple[list[str], str]:
    """(the keys whose values differ between a stored record and this run's, the first few shown)."""
    found = found or {}
    differ = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
    return differ, "; ".join(f"{k}: there {found.get(k)!r}, now {wanted.get(k)!r}" for k in differ[:4])


def _check_manifest(parts_dir: str, manifest_path: str, manifest: dict[str, Any]) -> None:
    """Start a parts directory, or resume one of exactly the same run; anything else is refused, naming
    what differs (a mixed set of samples would be no protocol's)."""
    if not storage.exists(manifest_path):
        storage.makedirs(parts_dir)
        storage.write_json_atomic(manifest_path, manifest)
        return
    differ, shown = record_differences(storage.read_json(manifest_path, "sampling manifest"), manifest)
    if differ:
        raise ValueError(f"{parts_dir} holds the parts of another sampling run ({', '.join(differ)} differ: {shown}); "
                         "a resume needs the same protocol, checkpoint, config, batch size and device count. Use "
                         "another --out_dir, or delete that directory to start over")


def assemble_parts(kind: str, parts: list[str], npz: str, png: str | None) -> None:
    """The parts' samples as one sample batch (`write_samples`: streamed, with its picture)."""
    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for part in parts:
            arrays = storage.load_npz(part)
            yield arrays["arr_0"], arrays["arr_1"]

    write_samples(kind, npz, png, batches())


def json_plain(value: Any) -> Any:
    """Tuples as lists and numpy scalars as Python ones, so that a record compares equal after a JSON round trip."""
    if isinstance(value, dict):
        return {str(k): json_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
