"""The data-source registry: a name in `config.data.name` -> a builder of a `DataSource`.

A data source is random access to records (a grain MapDataset source) that declares what its
examples are, so the loader and the checks made before anything compiles ask it instead of guessing.
A new kind of data is one module in `lsync_jax/data/` that registers its builder:

    @register_source('mydata')
    def build(data: Mapping, split: str) -> DataSource: ...

`data` is config.data (its keys and defaults are `lsync_jax.configs.base`'s), `split` the split
asked for (config.data.split, or the evaluation's reference split). Image sources whose records are
{'image': uint8 (H, W, C), 'label': int32} get the interface from `lsync_jax.data.sources.ImageRecords`.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import numpy as np

# What an example's `x` is, in the backbones' terms (`lsync_jax.models.Backbone.kind`), and its rank.
KINDS = {"image": 3, "video": 4, "sequence": 2}  # (H, W, C), (F, H, W, C), (L, C)


@runtime_checkable
class DataSource(Protocol):
    name: str  # identifies the data: grain's iterator checkpoints, FID references, logs
    kind: str  # the backbone kind its examples feed (`KINDS`)
    what: str  # what an example's `x` is, for errors: 'images', 'latents', 'clips', 'sequences', 'motions'
    example_keys: tuple[str, ...]  # what `example` gives besides the loader's extra fields: 'x', 'y'[, 'mask', 'tags']
    num_classes: int  # labels lie in 0..num_classes-1; 0: no labels, or a count not known before reading
    num_tags: int  # the width of the multi-hot 'tags' (0: none)
    label_range: tuple[int, int] | None  # (min, max) of every label when known without reading them all

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, Any]: ...

    def example(self, record: Mapping[str, Any], rng: np.random.Generator, flip: bool,
                fields: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        """A record as a training example {'x', 'y', ...}: `rng` draws what is random (a flip, latent noise,
        a crop); `fields` are the loader's extra fields ('image', 'encoder_features')."""

    def check_fields(self, fields: tuple[str, ...], flip: bool) -> None:
        """Refuse, before training, extra fields or flips this data cannot give (an error saying why)."""

    def check_labels(self, num_classes: int) -> None:
        """Every label against a class-conditional model's `num_classes` (before anything compiles), or
        arrange for each record to be checked as it is read."""


Builder = Callable[[Mapping[str, Any], str], DataSource]
SOURCES: dict[str, Builder] = {}
_MEMBERS = (*DataSource.__annotations__, "__len__", "__getitem__", "example", "check_fields", "check_labels")


def register_source(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering `builder(data, split) -> DataSource` as `config.data.name=name`."""

    def wrap(builder: Builder) -> Builder:
        if name in SOURCES:
            raise ValueError(f"data source {name!r} is registered twice")
        SOURCES[name] = builder
        return builder

    return wrap


def source_builder(name: str) -> Builder:
    """The builder registered as `name`; an unknown name is an error naming config.data.name, the
    closest registered name and all of them."""
    if name not in SOURCES:
        close = difflib.get_close_matches(str(name), list(SOURCES), n=1)
        raise ValueError(f"config.data.name={name!r} is not a registered data source"
                         + (f" (did you mean {close[0]!r}?)" if close else "")
                         + f"; registered: {', '.join(sorted(SOURCES))}")
    return SOURCES[name]


def check_source(source: Any) -> DataSource:
    """`source` itself when it declares the `DataSource` interface, else a TypeError naming what it lacks
    (a source of the Python API's own: image records can inherit it from `ImageRecords`)."""
    if isinstance(source, DataSource) and source.kind in KINDS:
        return source
    missing = [m for m in _MEMBERS if not hasattr(source, m)]  # the one place the interface is looked for
    problem = (f"it lacks {', '.join(missing)}" if missing else
               f"its kind {getattr(source, 'kind', None)!r} is not one of {tuple(KINDS)}")
    raise TypeError(f"{type(source).__name__} is not a lsync_jax.data.DataSource: {problem}. Records of the form "
                    "{'image': uint8 (H, W, C), 'label': int32} get the interface by subclassing "
                    "lsync_jax.data.ImageRecords")
