"""Offline preprocessing: images -> ADM centre crop -> SD-VAE posterior -> ArrayRecord latent shards.

What REPA's and fast-DiT's preprocessing do, in JAX: every image is centre-cropped as ADM crops
(`center_crop_adm`), encoded by the VAE in batches split over this process's devices, and written
with its label (format: `lsync_jax.data.latents`); optionally with REPA's DINOv2 tokens of the
crop (`encoder_path`), computed in float32, stored in float16. Work is cut into shards of `shard_size`
consecutive images; each shard is written under a temporary name and renamed when complete, so a
rerun with the same flags skips finished shards and redoes only the unfinished one. With several
hosts, process p of P writes shards p, p + P, ... with its own devices (`process_index`,
`process_count`, by default JAX's); they share nothing but the output directory. Image decoding and
cropping run in a thread pool ahead of the encoder.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from lsync_jax import storage
from lsync_jax.data.latents import (
    FORMAT,
    METADATA,
    VERSION,
    RecordCodec,
    read_metadata,
    record_fields,
    shard_name,
    shard_writer,
)
from lsync_jax.data.sources import IMAGE_EXTENSIONS, ImageRecords, check_label_array
from lsync_jax.host import pad_rows
from lsync_jax.models.encoders.features import encoder_tokens
from lsync_jax.models.vae import SCALE_FACTOR, downsampling_factor, encode_images
from lsync_jax.porting.dinov2 import load_encoder
from lsync_jax.porting.vae import load_vae
from lsync_jax.storage import write_json_atomic


def center_crop_adm(image: Any, size: int) -> np.ndarray:
    """ADM's (guided-diffusion) centre crop of a PIL image or uint8 HWC array to `size` x `size` RGB:
    halve with a box filter while the short side is at least 2 * size, resize (bicubic) so that the
    short side is `size`, then cut the centre."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        image = Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)
    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return np.ascontiguousarray(array[top: top + size, left: left + size])


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
    image_size: int = 256
    shard_size: int = 1024
    batch_size: int = 64  # images per encoder call on this process (split over its devices)
    store_flip: bool = False  # also encode the mirrored crop (exact random flips in training)
    store_images: bool = False  # keep the uint8 crop (REPA's encoder, probes, FID references)
    num_workers: int = 16  # threads decoding and cropping images
    limit: int = 0  # > 0: only the first `limit` images (quick trials)
    encoder_path: str = ""  # REPA's DINOv2 (file/dir, or 'random:tiny'): store its tokens of each crop
    encoder_grid: int = 0  # their token grid (= the SiT's); 0: latent side / 2 (patch-2 models)
    # Several hosts: process p of P writes shards p, p + P, ... (-1: JAX's process index and count)
    process_index: int = -1
    process_count: int = -1


# Metadata that must agree for a rerun to resume into an existing directory.
_RESUME_KEYS = ("image_size", "latent_shape", "fields", "num_records", "shard_size", "num_shards", "source", "vae",
                "encoder")


def check_classes(source: ImageRecords, num_classes: int | None = None, log: Callable[[str], None] = print) -> None:
    """Before the VAE loads or anything is written: report the classes found (count, first names) and
    refuse the parent of a class-folder tree (a root holding one class folder that holds folders, which
    would give every image the class of that one folder) and a class count other than `num_classes`
    (None: not checked)."""
    classes = list(source.classes)
    shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
    root = source.root
    where = root or repr(source)
    if root is not None:
        loose = sum(1 for name in storage.listdir(root)
                    if name.lower().endswith(IMAGE_EXTENSIONS) and storage.isfile(storage.join(root, name)))
        log(f"{root}: {len(classes)} class folder(s) ({shown}) holding {len(source):,} images"
            + (f"; {loose} image(s) directly under it are in no class folder and are skipped" if loose else ""))
        if len(classes) == 1:
            inner = [name for name in storage.listdir(storage.join(root, classes[0]))
                     if storage.isdir(storage.join(root, classes[0], name))]
            if inner:
                raise ValueError(
                    f"--images={root} holds a single class folder {classes[0]!r}, which holds folders "
                    f"({', '.join(inner[:5])}{', ...' if len(inner) > 5 else ''}): every image would get the one "
                    f"class {classes[0]!r}. This looks like the parent of the class folders: pass "
                    f"--images={os.path.join(root, classes[0])}")
    else:
        log(f"{where}: {len(classes)} classes" + (f" ({shown})" if classes else ""))
    if num_classes is not None and len(classes) != num_classes:
        raise ValueError(f"--num_classes={num_classes}, but {where} has {len(classes)} classes"
                         + (f" ({shown})" if classes else "") + ": point --images/--tfds_name at the data with "
                         f"{num_classes} classes, or drop --num_classes")


def label_range(source: ImageRecords, num_records: int, num_classes: int) -> tuple[int, int] | None:
    """(min, max) of the labels of the first `num_records` records, without decoding any image: exact
    where the source holds them (`first_labels`: class folders, in-memory arrays), else the source's
    own `label_range` or the class bound (every label is checked against it as it is encoded); None
    when nothing bounds them."""
    labels = source.first_labels(num_records)
    if labels is None:
        if source.label_range is not None:
            return tuple(int(v) for v in source.label_range)
        return (0, num_classes - 1) if num_classes > 0 else None
    return check_label_array(np.asarray(labels), num_classes or None, repr(source),
                             f"the source's {num_classes} classes" if num_classes else "")


def build_metadata(source_info: dict[str, Any], vae_info: dict[str, Any], latent_shape: tuple[int, int, int],
                   num_records: int, spec: PreprocessSpec, scale_factor: float,
                   encoder_info: dict[str, Any] | None = None,
                   labels: tuple[int, int] | None = None) -> dict[str, Any]:
    num_shards = max(1, math.ceil(num_records / spec.shard_size))
    tokens = tuple(encoder_info["tokens"]) if encoder_info else None
    fields = record_fields(latent_shape, spec.image_size, spec.store_flip, spec.store_images, tokens)
    return {
        "format": FORMAT, "version": VERSION, "image_size": spec.image_size, "latent_shape": list(latent_shape),
        "scale_factor": scale_factor, "crop": "adm_center",
        "fields": [[k, d, list(s)] for k, (d, s) in fields.items()],  # a list: the order is the layout
        "num_records": num_records, "shard_size": spec.shard_size, "num_shards": num_shards,
        "shards": [shard_name(i, num_shards) for i in range(num_shards)],
        "source": source_info, "vae": vae_info, "encoder": encoder_info,
        **({} if labels is None else {"label_range": [int(labels[0]), int(labels[1])]}),
    }


def check_resumable(existing: dict[str, Any], wanted: dict[str, Any], directory: str) -> None:
    diffs = [k for k in _RESUME_KEYS if existing.get(k) != wanted.get(k)]
    if diffs:
        shown = "; ".join(f"{k}: on disk {existing.get(k)!r}, now {wanted.get(k)!r}" for k in diffs)[:1500]
        raise ValueError(f"{directory} already holds latents made with other settings ({shown}). Use another "
                         "--out, or the same flags to resume.")


class Progress:
    """A one-line progress bar with images/s and ETA (rewritten in place on a terminal). The rate is
    counted from the first update on, so the encoder's compile does not skew it."""

    def __init__(self, total: int, stream: Any = sys.stderr, every_secs: float = 10.0):
        self.total, self.done, self.stream, self.every = total, 0, stream, every_secs
        self.start_done, self.start = 0, None
        self.last = 0.0
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def rate(self) -> float:
        if self.start is None:
            return 0.0
        return (self.done - self.start_done) / max(time.perf_counter() - self.start, 1e-9)

    def update(self, count: int, force: bool = False) -> None:
        self.done += count
        now = time.perf_counter()
        if self.start is None:
            self.start, self.start_done = now, self.done
        if not force and now - self.last < (0.5 if self.tty else self.every):
            return
        self.last = now
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        frac = self.done / max(self.total, 1)
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        line = f"[{bar}] {self.done:,}/{self.total:,} images {100 * frac:5.1f}%  {rate:,.1f} img/s  ETA {eta_text}"
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()


def _prefetch_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int, window: int) -> Iterator[Any]:
    """fn over items in order, at most `window` running ahead in `workers` threads."""
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def make_encoder(module: Any, params: Any, batch_size: int, store_flip: bool, tokens: Any = None):
    """A jitted uint8 batch -> {'mean', 'std'[, '*_flip'][, 'encoder_features'[_flip]]} function over this
    process's devices (batch padded to a fixed size, so it compiles once). `tokens`: (module, params,
    grid) of REPA's encoder, whose tokens are stored too."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


    devices = jax.local_devices()
    padded = -(-batch_size // len(devices)) * len(devices)
    mesh = Mesh(np.array(devices), ("data",))
    split, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    params = jax.device_put(params, replicated)
    encoder_params = None if tokens is None else jax.device_put(tokens[1], replicated)

    @jax.jit
    def encode(params, encoder_params, images):
        views = {"": images, "_flip": images[:, :, ::-1]} if store_flip else {"": images}
        batch = jnp.concatenate(list(views.values()))
        mean, std = encode_images(module, params, batch)
        out = {}
        for k, (suffix, _) in enumerate(views.items()):
            part = slice(k * len(images), (k + 1) * len(images))
            out["mean" + suffix], out["std" + suffix] = mean[part], std[part]
        if tokens is not None:
            z = encoder_tokens(tokens[0], encoder_params, batch, tokens[2]).astype(jnp.float16)
            for k, suffix in enumerate(views):
                out["encoder_features" + suffix] = z[k * len(images):(k + 1) * len(images)]
        return out

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        n = len(images)
        out = jax.device_get(encode(params, encoder_params, jax.device_put(pad_rows(images, padded), split)))
        return {k: np.asarray(v)[:n] for k, v in out.items()}

    return run


def preprocess_latents(source: ImageRecords, out_dir: str, vae_path: str, spec: PreprocessSpec,
                       source_info: dict[str, Any], log: Callable[[str], None] = print) -> dict[str, Any]:
    """Encode `source` (records {'image', 'label'}) into latent shards in `out_dir`; resumable.

    Returns a summary: shards written and skipped by this process, images encoded, seconds in all, and
    images/s after the first batch (which includes the encoder's compile).
    """
    import jax


    if spec.image_size < 8 or spec.shard_size < 1 or spec.batch_size < 1 or spec.limit < 0:
        raise ValueError(f"bad preprocessing settings {spec}: image_size >= 8, shard_size and batch_size >= 1, "
                         "limit >= 0")
    process = jax.process_index() if spec.process_index < 0 else spec.process_index
    processes = jax.process_count() if spec.process_count < 0 else spec.process_count
    if not 0 <= process < processes:
        raise ValueError(f"process_index={process} must be in [0, process_count={processes})")
    num_records = min(len(source), spec.limit) if spec.limit else len(source)
    labels = label_range(source, num_records, int(source_info.get("num_classes") or 0))
    module, params = load_vae(vae_path)
    factor = downsampling_factor(module.config)
    if spec.image_size % factor:
        raise ValueError(f"image_size={spec.image_size} is not a multiple of the VAE's downsampling factor {factor}")
    latent_shape = (spec.image_size // factor, spec.image_size // factor, module.config.latent_channels)
    vae_info = {"path": storage.absolute(vae_path),
                "config": {k: list(v) if isinstance(v, tuple) else v
                           for k, v in dataclasses.asdict(module.config).items()}}
    tokens, encoder_info = None, None
    if spec.encoder_path:
        grid = spec.encoder_grid or latent_shape[0] // 2
        encoder, encoder_params, description = load_encoder(spec.encoder_path, dtype="float32")
        tokens = (encoder, encoder_params, grid)
        encoder_info = {"path": spec.encoder_path, "description": description, "grid": grid,
                        "tokens": [grid * grid, encoder.config.embed_dim],
                        "input_size": grid * encoder.config.patch_size}
    meta = build_metadata(source_info, vae_info, latent_shape, num_records, spec, SCALE_FACTOR, encoder_info,
                          labels=labels)
    storage.makedirs(out_dir)
    meta_path = storage.join(out_dir, METADATA)
    if storage.exists(meta_path):
        existing = read_metadata(out_dir)
        check_resumable(existing, meta, out_dir)
        recorded = existing.get("label_range")  # None: made before label ranges were recorded
        labels = None if recorded is None else tuple(recorded)
    elif process == 0:
        write_json_atomic(meta_path, meta)

    codec = RecordCodec({k: (d, tuple(s)) for k, d, s in meta["fields"]})
    mine = range(process, meta["num_shards"], processes)
    present = set(storage.listdir(out_dir))  # one listing, not a request per shard on gs://
    todo = [k for k in mine if meta["shards"][k] not in present]
    skipped = len(mine) - len(todo)
    if skipped:
        log(f"{skipped} finished shard(s) kept, {len(todo)} to write")
    shard_range = {k: range(k * spec.shard_size, min((k + 1) * spec.shard_size, num_records)) for k in todo}
    total = sum(len(r) for r in shard_range.values())
    log(f"encoding {total:,} images of {num_records:,} ({len(todo)} shards) at {spec.image_size} px -> latents "
        f"{latent_shape} on {jax.local_device_count()} device(s)")

    def load(index: int) -> tuple[np.ndarray, np.int32, int]:
        record = source[index]
        label = int(record["label"])
        if labels is not None and not labels[0] <= label <= labels[1]:  # the metadata must not lie
            raise ValueError(f"{source!r}: image {index} has label {label}, outside the range {labels[0]}..{labels[1]} "
                             f"recorded in {meta_path}")
        return center_crop_adm(record["image"], spec.image_size), np.int32(label), index

    encode = make_encoder(module, params, spec.batch_size, spec.store_flip, tokens)
    progress = Progress(total)
    loaded = _prefetch_map(load, (i for k in todo for i in shard_range[k]), spec.num_workers,
                           window=max(4 * spec.batch_size, 2 * spec.num_workers))
    start = time.perf_counter()
    for k in todo:
        with shard_writer(storage.join(out_dir, meta["shards"][k]), str(process)) as writer:
            count = len(shard_range[k])
            for begin in range(0, count, spec.batch_size):
                items = [next(loaded) for _ in range(min(spec.batch_size, count - begin))]
                images = np.stack([image for image, _, _ in items])
                moments = encode(images)
                for j, (image, label, index) in enumerate(items):
                    values = {name: moments[name][j] for name in moments}
                    values.update(label=label, index=np.int64(index))
                    if spec.store_images:
                        values["image"] = image
                    writer.write(codec.encode(values))
                progress.update(len(items))
    seconds = time.perf_counter() - start
    steady = progress.rate()
    progress.update(0, force=True)
    if progress.tty:
        progress.stream.write("\n")
    return {"written": len(todo), "skipped": skipped, "images": total, "seconds": seconds,
            "images_per_second": steady, "metadata": meta_path}
