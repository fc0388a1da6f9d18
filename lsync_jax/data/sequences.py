"""Fixed-length sequences of feature vectors (audio VAE latents, motion, any 1-D features) in
ArrayRecord shards: the format, its metadata and the grain source.

`launch/preprocess_sequences.py` (`lsync_jax.tools.preprocess_sequences`) writes a directory of

    metadata.json                                   what the shards hold (checked by the reader)
    sequences-00000-of-00004.array_record           `shard_size` records each, in file-name order

Each record is the fixed-layout concatenation (raw little-endian bytes, as the image latents'
`RecordCodec` lays them out) of the fields named in the metadata: `x` float32 (L, C) (zeros after
the sequence's end when it was padded), `length` int32 (its real steps, <= L), `label` int32 (0 when
the data has no labels), `index` int64 (its position in the sorted file list) and, for tagged data,
`tags` uint8 (T,) multi-hot.

`SequenceSource` reads them for grain; its `example` gives {'x': float32 (L, C), 'y': int32,
'mask': bool (L,) (True on real steps; only when the data was padded), 'tags': float32 (T,) (only
for tagged data)}.
"""

from __future__ import annotations

import io
import os
from typing import Any, Mapping

import numpy as np

from lsync_jax import storage
from lsync_jax.data.latents import RecordCodec, damaged_shard
from lsync_jax.data.registry import register_source
from lsync_jax.data.sources import NULL_CLASS_NOTE, model_classes

FORMAT = "lsync_jax.sequences"
VERSION = 1
METADATA = "metadata.json"
COMMAND = "python launch/preprocess_sequences.py --npy_dir=DIR --length=L --out=OUT"
_REQUIRED = ("length", "channels", "pad", "fields", "num_records", "shard_size", "num_shards", "shards",
             "num_classes", "num_tags")


def shard_name(index: int, count: int) -> str:
    return f"sequences-{index:05d}-of-{count:05d}.array_record"


def record_fields(length: int, channels: int, num_tags: int = 0) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{field: (dtype, shape)} in record order."""
    fields = {"x": ("float32", (length, channels)), "length": ("int32", ()), "label": ("int32", ()),
              "index": ("int64", ())}
    if num_tags:
        fields["tags"] = ("uint8", (num_tags,))
    return fields


def read_metadata(directory: str) -> dict[str, Any]:
    """The metadata of a sequence directory; an error naming the file and what to do when it is not one."""
    if not directory:
        raise FileNotFoundError(f"no sequence directory given: set --config.data.dir to the output of `{COMMAND}`")
    storage.check_remote(directory)  # credentials and endpoint of a gs:// directory, in seconds
    path = storage.join(directory, METADATA)
    if not storage.isfile(path):
        raise FileNotFoundError(f"{path} is missing: {directory} holds no preprocessed sequences. Make them with "
                                f"`{COMMAND}` and pass --config.data.dir=OUT")
    meta = storage.read_json(path, "sequence metadata")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        got = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else (None, None)
        raise ValueError(f"{path} is not lsync-jax sequence metadata ({FORMAT!r} version {VERSION}): it says "
                         f"format={got[0]!r}, version={got[1]!r}")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"{path} is damaged: it lacks {missing}; rerun `{COMMAND}` into a new --out")
    return meta


def npy_header(path: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of a .npy file from its header alone (a few hundred bytes, also on gs://), so
    that a whole dataset's shapes are checked before training without reading its values."""
    try:
        with storage.path(path).open("rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
    except ValueError as e:
        raise ValueError(f"{path} is not a readable .npy file ({e})") from None
    return tuple(int(n) for n in shape), np.dtype(dtype)


def read_npy(path: str) -> np.ndarray:
    """A whole .npy file (local or remote); a damaged one is an error naming it."""
    try:
        return np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path} is not a readable .npy file ({e})") from None


def length_mask(lengths: np.ndarray | int, length: int) -> np.ndarray:
    """bool (..., length): True on the first `lengths` steps (the real ones), False on padding."""
    return np.arange(length) < np.asarray(lengths)[..., None]


class SequenceSource:
    """Random access to preprocessed sequence records (grain MapDataset source).

    Checks the metadata and that every shard is there and intact before anything trains. Records are
    dicts of arrays (`x`, `length`, `label`, `index`[, `tags`]); `example` turns one into a training
    example. Sequences have no mirror image: `flip` is refused.
    """

    kind = "sequence"
    what = "sequences"

    def __init__(self, directory: str):
        from grain.python import ArrayRecordDataSource  # grain reads the shards with array_record

        self.directory = storage.absolute(directory) if directory else directory
        self.meta = meta = read_metadata(self.directory)
        names = meta["shards"]
        present = set(storage.listdir(self.directory))  # one listing, not a request per shard on gs://
        missing = [n for n in names if n not in present]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(names)} sequence shards are missing in {self.directory} (first: "
                f"{missing[0]}): preprocessing did not finish. Run launch/preprocess_sequences.py again with the "
                "same flags; it resumes.")
        self.codec = RecordCodec({k: (d, tuple(s)) for k, d, s in meta["fields"]})
        paths = [storage.join(self.directory, n) for n in names]  # array_record reads gs:// itself
        try:
            self.records = ArrayRecordDataSource(paths)
        except RuntimeError as e:  # array_record's own error names no file
            raise ValueError(f"{damaged_shard(paths) or self.directory}: a sequence shard is damaged (truncated or "
                             "not ArrayRecord). Move it aside and run launch/preprocess_sequences.py again with the "
                             "same flags; it rewrites missing shards") from e
        if len(self.records) != meta["num_records"]:
            raise ValueError(f"{self.directory} holds {len(self.records)} records; its {METADATA} says "
                             f"{meta['num_records']}")
        self.length, self.channels = int(meta["length"]), int(meta["channels"])
        self.has_mask = bool(meta["pad"])
        self.num_tags = int(meta["num_tags"])
        self.example_keys = ("x", "y") + (("mask",) if self.has_mask else ()) + (("tags",) if self.num_tags else ())
        self.num_classes = int(meta["num_classes"])
        recorded = meta.get("label_range")
        self.label_range = None if recorded is None else (int(recorded[0]), int(recorded[1]))
        self.name = f"sequences/{os.path.basename(self.directory.rstrip('/'))}"

    def __repr__(self) -> str:
        return f"SequenceSource(directory={self.directory!r}, records={len(self)})"

    def __len__(self) -> int:
        return int(self.meta["num_records"])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.codec.decode(self.records[int(index)])

    def check_labels(self, num_classes: int) -> None:
        """The stored labels against a class-conditional model's classes (before anything compiles)."""
        where = storage.join(self.directory, METADATA)
        if not self.num_classes:
            raise ValueError(f"{where}: these sequences carry no class labels (preprocessed without --labels), but "
                             f"{model_classes(num_classes)} is class-conditional: train an unconditional model "
                             "(num_classes=0) or preprocess with --labels")
        low, high = self.label_range or (0, self.num_classes - 1)
        if low < 0 or high >= num_classes:
            raise ValueError(f"{where}: the sequences hold labels {low}..{high}, but {model_classes(num_classes)} "
                             f"takes 0..{num_classes - 1}; {NULL_CLASS_NOTE}")

    def check_tags(self, num_tags: int) -> None:
        """The stored multi-hot width against a tag-conditioned model's (before anything compiles)."""
        if num_tags != self.num_tags:
            raise ValueError(f"{storage.join(self.directory, METADATA)}: the sequences carry {self.num_tags} tags "
                             f"per record, but the model takes tag vectors of width {num_tags}")

    def check_fields(self, fields: tuple[str, ...], flip: bool) -> None:
        """Refuse, before training, what sequences cannot give: extra encoder fields, mirror images."""
        if fields:
            raise ValueError(f"sequences give no {list(fields)}: extra loader fields (REPA's encoder images and "
                             "features) exist for images and image latents only")
        if flip:
            raise ValueError(f"{self!r}: sequences have no mirror image; set --config.data.flip=False")

    def example(self, record: Mapping[str, np.ndarray], rng: np.random.Generator, flip: bool,
                fields: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        """{'x': float32 (L, C), 'y': int32[, 'mask': bool (L,)][, 'tags': float32 (T,)]}."""
        self.check_fields(fields, flip)
        out = {"x": np.array(record["x"], np.float32), "y": np.int32(record["label"])}
        if self.has_mask:
            out["mask"] = length_mask(int(record["length"]), self.length)
        if self.num_tags:
            out["tags"] = np.asarray(record["tags"], np.float32)
        return out


@register_source("sequences")
def sequence_source(data: Mapping[str, Any], split: str) -> SequenceSource:
    """The sequences launch/preprocess_sequences.py wrote to config.data.dir (one set: `split` is not read)."""
    return SequenceSource(data["dir"])
