"""VAE latents of an image dataset in ArrayRecord shards: the format, its metadata and the grain source.

`launch/preprocess.py` writes a directory of

    metadata.json                               what the shards hold (checked by the reader), and
                                                `label_range`, the [min, max] of the stored labels
    latents-00000-of-01252.array_record         `shard_size` records each, in dataset order

Each record is the fixed-layout concatenation of the fields named in the metadata (raw
little-endian bytes, no pickling): the posterior `mean` and `std` of the VAE encoding of the
centre crop (float32, latent H x W x 4, unscaled), the `label` (int32), the `index` of the image in
the source (int64) and optionally `mean_flip`/`std_flip` (the encoding of the mirrored crop),
`image` (the uint8 crop itself, for REPA's encoder and for FID references) and
`encoder_features`[`_flip`] (REPA's DINOv2 tokens of the crop, float16 (T, D), so that training
needs no encoder).

`LatentSource` reads them for grain. Training draws a fresh posterior sample every time a record
is used, z = (mean + std * eps) * scale_factor (0.18215), as REPA does with its stored moments; the
noise comes from the loader's per-record RNG, so it is deterministic and independent of the
process count. A random horizontal flip takes the stored encoding of the mirrored crop; without
one it mirrors the latent itself, an approximation (the VAE is not exactly flip-equivariant),
which is logged.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from typing import Any, Iterator, Mapping

import numpy as np
from absl import logging

from lsync_jax import storage
from lsync_jax.data.registry import register_source
from lsync_jax.data.sources import NULL_CLASS_NOTE

FORMAT = "lsync_jax.latents"
VERSION = 1
METADATA = "metadata.json"


def shard_name(index: int, count: int) -> str:
    return f"latents-{index:05d}-of-{count:05d}.array_record"


def record_fields(latent_shape: tuple[int, int, int], image_size: int, store_flip: bool, store_images: bool,
                  encoder_tokens: tuple[int, int] | None = None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{field: (dtype, shape)} in record order. `encoder_tokens` (T, D): REPA's encoder tokens, float16."""
    fields = {"mean": ("float32", tuple(latent_shape)), "std": ("float32", tuple(latent_shape)),
              "label": ("int32", ()), "index": ("int64", ())}
    if store_flip:
        fields.update(mean_flip=("float32", tuple(latent_shape)), std_flip=("float32", tuple(latent_shape)))
    if store_images:
        fields["image"] = ("uint8", (image_size, image_size, 3))
    if encoder_tokens is not None:
        fields["encoder_features"] = ("float16", tuple(encoder_tokens))
        if store_flip:
            fields["encoder_features_flip"] = ("float16", tuple(encoder_tokens))
    return fields


class RecordCodec:
    """Fixed-layout record <-> dict of arrays, from the metadata's field list."""

    def __init__(self, fields: Mapping[str, tuple[str, tuple[int, ...]]]):
        self.fields = {k: (np.dtype(d).newbyteorder("<"), tuple(s)) for k, (d, s) in fields.items()}
        self.offsets, offset = {}, 0
        for name, (dtype, shape) in self.fields.items():
            size = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            self.offsets[name] = (offset, size)
            offset += size
        self.nbytes = offset

    def encode(self, values: Mapping[str, Any]) -> bytes:
        parts = []
        for name, (dtype, shape) in self.fields.items():
            array = np.asarray(values[name])
            if array.shape != shape:
                raise ValueError(f"record field {name!r} has shape {array.shape}, the format says {shape}")
            parts.append(np.ascontiguousarray(array, dtype).tobytes())
        return b"".join(parts)

    def decode(self, data: bytes) -> dict[str, np.ndarray]:
        if len(data) != self.nbytes:
            raise ValueError(f"a latent record has {len(data)} bytes; the metadata's fields need {self.nbytes}")
        out = {}
        for name, (dtype, shape) in self.fields.items():
            offset, size = self.offsets[name]
            array = np.frombuffer(data, dtype, count=size // dtype.itemsize, offset=offset).reshape(shape)
            out[name] = array[()] if shape == () else array
        return out


def read_metadata(directory: str) -> dict[str, Any]:
    """The metadata of a preprocessed directory; a clear error when it is not one."""
    path = storage.join(directory, METADATA) if directory else METADATA
    if directory:
        storage.check_remote(directory)  # credentials and endpoint of a gs:// directory, in seconds
    if not directory or not storage.isfile(path):
        raise FileNotFoundError(
            f"no preprocessed latents in {directory!r} ({METADATA} missing). Make them with "
            "`python launch/preprocess.py --images=ILSVRC2012/train --vae=PATH --image_size=256 --out=DIR` "
            "and pass --config.data.dir=DIR.")
    try:
        meta = json.loads(storage.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged (not JSON: {e}); rerun launch/preprocess.py with the same flags "
                         "into a new --out, or restore the file") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        got = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else (None, None)
        raise ValueError(f"{path} is not lsync-jax latent metadata version {VERSION} "
                         f"(format={got[0]!r}, version={got[1]!r})")
    return meta


def damaged_shard(paths: list[str]) -> str | None:
    """The first shard array_record cannot open (after it failed on the set, to name the file)."""
    from array_record.python.array_record_module import ArrayRecordReader  # as LatentSource: grain's reader

    for path in paths:
        try:
            reader = ArrayRecordReader(path)
            reader.num_records()
            reader.close()
        except RuntimeError:
            return path
    return None


@contextlib.contextmanager
def shard_writer(final: str, tag: str) -> Iterator[Any]:
    """An ArrayRecordWriter (one record per chunk: random access) for the shard `final`, which appears
    under its name only when the block ends without error: a local temporary renamed over it, or, for
    gs:// (array_record writes local files only), a local file uploaded (an object is visible only
    once complete). A failed or interrupted shard leaves no temporary file; a rerun writes it again.
    `tag` tells concurrent writers' temporaries apart (the process index)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    name = os.path.basename(final)
    temporary = (os.path.join(tempfile.gettempdir(), f"lsync_jax_{uuid.uuid4().hex}_{name}")
                 if storage.is_remote(final) else f"{final}.tmp-{tag}")
    writer = ArrayRecordWriter(temporary, "group_size:1")
    try:
        yield writer
        writer.close()
        if storage.is_remote(final):
            storage.upload(temporary, final)
            os.remove(temporary)
        else:
            os.replace(temporary, final)
    except BaseException:
        try:
            writer.close()
        except Exception:  # noqa: BLE001 - the first error is the one to report
            pass
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


class LatentSource:
    """Random access to preprocessed latent records (grain MapDataset source).

    Checks the metadata and that every shard is there and complete before anything trains. Records
    are dicts of arrays (`mean`, `std`, `label`, `index`, and `image`/`mean_flip`/`std_flip` where
    stored); `example` turns one into a training example.
    """

    kind = "image"
    what = "latents"
    example_keys = ("x", "y")
    num_tags = 0

    def __init__(self, directory: str):
        from grain.python import ArrayRecordDataSource  # grain reads the shards with array_record

        if not directory:
            raise FileNotFoundError("no latent directory given: set --config.data.dir to the output of "
                                    "launch/preprocess.py")
        self.directory = storage.absolute(directory)
        self.meta = read_metadata(self.directory)
        names = self.meta["shards"]
        present = set(storage.listdir(self.directory))  # one listing, not a request per shard on gs://
        missing = [n for n in names if n not in present]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(names)} latent shards are missing in {self.directory} (first: {missing[0]}): "
                "preprocessing did not finish. Run launch/preprocess.py again with the same flags; it resumes.")
        self.codec = RecordCodec({k: (d, tuple(s)) for k, d, s in self.meta["fields"]})
        paths = [storage.join(self.directory, n) for n in names]  # array_record reads gs:// itself
        try:
            self.records = ArrayRecordDataSource(paths)
        except RuntimeError as e:  # array_record's own error names no file (often it has no message)
            raise ValueError(f"{damaged_shard(paths) or self.directory}: a latent shard is damaged (truncated or not "
                             "ArrayRecord). Move it aside and run launch/preprocess.py again with the same flags; "
                             "it rewrites missing shards") from e
        if len(self.records) != self.meta["num_records"]:
            raise ValueError(f"{self.directory} holds {len(self.records)} records; its metadata says "
                             f"{self.meta['num_records']}")
        self.scale_factor = float(self.meta["scale_factor"])
        self.latent_shape = tuple(self.meta["latent_shape"])
        self.image_size = int(self.meta["image_size"])
        self.num_classes = int(self.meta["source"]["num_classes"])
        self.has_flip = "mean_flip" in self.codec.fields
        self.name = f"latents/{os.path.basename(self.directory)}"
        self._warned_flip = False
        # The (min, max) of every stored label, recorded by launch/preprocess.py; shards made before it
        # recorded one have their labels checked as records are read, against `label_limit`.
        recorded = self.meta.get("label_range")
        self.label_range = None if recorded is None else (int(recorded[0]), int(recorded[1]))
        self.label_limit = self.num_classes or np.iinfo(np.int32).max  # 0: the source named no classes
        if self.label_range is None:
            logging.info("%s records no label range (made by an older launch/preprocess.py): labels are checked "
                         "as records are read", os.path.join(self.directory, METADATA))

    def __repr__(self) -> str:
        return f"LatentSource(directory={self.directory!r}, records={len(self)})"

    def __len__(self) -> int:
        return int(self.meta["num_records"])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        record = self.codec.decode(self.records[int(index)])
        if self.label_range is None and not 0 <= int(record["label"]) < self.label_limit:
            shard, position = divmod(int(index), int(self.meta["shard_size"]))
            raise ValueError(f"{os.path.join(self.directory, self.meta['shards'][shard])}: record {position} "
                             f"(image {index}) has label {int(record['label'])}, outside 0..{self.label_limit - 1} "
                             f"(the model's and the latents' classes); {NULL_CLASS_NOTE}")
        return record

    def check_labels(self, num_classes: int) -> None:
        """The recorded label range against the model's classes (before anything compiles); without one,
        every record read from now on is checked against them."""
        self.label_limit = min(num_classes, self.num_classes or num_classes)
        if self.label_range is None:
            return
        low, high = self.label_range
        if low < 0 or high >= num_classes:
            raise ValueError(f"{os.path.join(self.directory, METADATA)}: the latents hold labels {low}..{high}, "
                             f"but the model's num_classes={num_classes} (config.model.overrides.num_classes) "
                             f"takes 0..{num_classes - 1}; {NULL_CLASS_NOTE}")

    def check_fields(self, fields: tuple[str, ...], flip: bool) -> None:
        """Refuse, before training, extra fields the shards cannot give."""
        stored = self.codec.fields
        for field in fields:
            if field not in stored:
                option = {"image": "--store_images", "encoder_features": "--encoder_path"}.get(field, "")
                raise ValueError(f"the latents in {self.directory} hold no {field!r}: preprocess with {option}")
            if flip and f"{field}_flip" not in stored and field != "image":
                raise ValueError(f"data.flip=True with precomputed {field!r} needs those of the mirrored crops: "
                                 "preprocess with --store_flip, or train without flips (REPA uses none)")

    def example(self, record: Mapping[str, np.ndarray], rng: np.random.Generator, flip: bool,
                fields: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        """{'x': scaled posterior sample float32 (h, w, 4), 'y': label, *fields}: fresh noise from `rng`
        at each use; a flip takes the mirrored crop's stored encoding (and features, and image)."""
        mean, std = record["mean"], record["std"]
        flipped = flip and rng.random() < 0.5
        if flipped:
            if self.has_flip:
                mean, std = record["mean_flip"], record["std_flip"]
            else:
                if not self._warned_flip:
                    logging.warning("%s stores no flipped encodings: flips mirror the latent (approximate); "
                                    "preprocess with --store_flip for exact flips", self.directory)
                    self._warned_flip = True
                mean, std = mean[:, ::-1], std[:, ::-1]
        eps = rng.standard_normal(mean.shape, dtype=np.float32)
        out = {"x": (mean + std * eps) * np.float32(self.scale_factor), "y": np.int32(record["label"])}
        if "image" in fields:
            out["image"] = np.ascontiguousarray(record["image"][:, ::-1] if flipped else record["image"])
        if "encoder_features" in fields:
            out["encoder_features"] = np.asarray(
                record["encoder_features_flip" if flipped else "encoder_features"], np.float32)
        return out


@register_source("imagenet_latents")
def latent_source(data: Mapping[str, Any], split: str) -> LatentSource:
    """The latents launch/preprocess.py wrote to config.data.dir, made from config.data.image_size px crops
    (None: whatever they were made from); one set: `split` is not read."""
    source = LatentSource(data["dir"])
    wanted = int(data["image_size"] or source.image_size)
    if wanted != source.image_size:
        raise ValueError(f"config.data.image_size={wanted} but the latents in {source.directory} were made from "
                         f"{source.image_size} px crops (latents {source.latent_shape})")
    return source
