"""A Frechet distance between generated and reference sequences (audio latents, motion, any
(N, L, C) data), over features of an embedding model the user supplies.

Sequence metrics are defined by their embedding model: FAD by an audio classifier (VGGish, or
CLAP for the FAD the LayerSync paper reports), HumanML3D's FID by Guo et al.'s motion encoder.
Their weights are not shipped and cannot be downloaded here, so the model is a parameter:

- an **embedder** is a callable `embed(batch, mask) -> features`: `batch` float (B, L, C) in the
  data's own units (what the data pipeline yields and the model generates), `mask` bool (B, L)
  with True on real steps, or None when every step is real; it returns (B, D) features and must
  ignore masked steps;
- `load_embedder(spec)` builds one from a spec (`mean_std`, `package.module:factory` or
  `path/to/file.py[:factory]`), calling the factory once so weights load once.

The distance itself is the image FID's (`metrics.RunningStats`, `metrics.frechet_distance`): a
Gaussian fitted to each side's features, |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

The built-in `mean_std` embedder (per-channel mean and standard deviation over the real steps)
exists for tests and smoke runs: its distance is no standard metric and no paper reports it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import os
import sys
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from lsync_jax import storage
from lsync_jax.eval import metrics

Embedder = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]
Sequences = np.ndarray | Iterable[tuple[np.ndarray, "np.ndarray | None"]]
DEFAULT_FACTORY = "make_embedder"


def mean_std_embedding(batch: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """(B, L, C) -> (B, 2C): each channel's mean, then its standard deviation (ddof 0), over the
    real steps only. A test and smoke-run embedder, not a standard metric."""
    x = np.asarray(batch, np.float64)
    valid = np.ones(x.shape[:2], bool) if mask is None else np.asarray(mask, bool)
    weight = valid[..., None]
    count = weight.sum(axis=1)
    x = np.where(weight, x, 0.0)  # padding may hold anything, NaN included
    mean = x.sum(axis=1) / count
    var = (np.where(weight, x - mean[:, None], 0.0) ** 2).sum(axis=1) / count
    return np.concatenate([mean, np.sqrt(var)], axis=1)


BUILTIN_EMBEDDERS: dict[str, Callable[..., Embedder]] = {"mean_std": lambda: mean_std_embedding}


def load_embedder(spec: str, **kwargs: Any) -> Embedder:
    """The embedder a spec names; `kwargs` go to its factory (a checkpoint path, a device).

    Specs: a built-in name (`mean_std`); `package.module:factory` (an importable module); or
    `path/to/file.py` / `path/to/file.py:factory` (a file, imported under a private name). The
    factory defaults to `make_embedder`; it is called once and returns the embedder. Every failure
    (no such module, file or factory, an import or factory error, a non-callable result) is an
    error naming the spec.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"embedder spec {spec!r}: expected 'mean_std', 'package.module:factory' or "
                         "'file.py[:factory]'")
    spec = spec.strip()
    if spec in BUILTIN_EMBEDDERS:
        factory, where = BUILTIN_EMBEDDERS[spec], f"the built-in {spec!r}"
    else:
        target, name = _split_spec(spec)
        module = _import_target(spec, target)
        factory = getattr(module, name, None)
        where = f"{target}:{name}"
        if factory is None:
            public = sorted(k for k in vars(module) if not k.startswith("_") and callable(getattr(module, k)))
            raise AttributeError(f"embedder spec {spec!r}: {target} has no {name!r} (its callables: {public}); name "
                                 f"the factory after ':' or define {DEFAULT_FACTORY}()")
        if not callable(factory):
            raise TypeError(f"embedder spec {spec!r}: {where} is a {type(factory).__name__}, not a factory function")
    try:
        embed = factory(**kwargs)
    except Exception as e:  # noqa: BLE001 - a user's factory raises anything; say whose it was
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise RuntimeError(f"embedder spec {spec!r}: {where}({args}) failed ({type(e).__name__}: {e})") from e
    if not callable(embed):
        raise TypeError(f"embedder spec {spec!r}: {where}() returned a {type(embed).__name__}; a factory returns "
                        "the embedder, a callable embed(batch (B, L, C), mask (B, L) | None) -> (B, D)")
    return embed


def _split_spec(spec: str) -> tuple[str, str]:
    """'target:factory' -> (target, factory); a target alone gets the default factory."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and tail.isidentifier():
        return head, tail
    return spec, DEFAULT_FACTORY


def _import_target(spec: str, target: str) -> Any:
    """A module by dotted name, or a .py file by path."""
    if target.endswith(".py") or os.sep in target or "/" in target:
        if not os.path.isfile(target):
            raise FileNotFoundError(f"embedder spec {spec!r}: no file {target}")
        # a private, path-derived name: two files named embed.py do not replace each other
        name = "lsync_jax_embedder_" + hashlib.sha1(os.path.abspath(target).encode()).hexdigest()[:12]
        location = importlib.util.spec_from_file_location(name, target)
        if location is None or location.loader is None:
            raise ImportError(f"embedder spec {spec!r}: {target} cannot be imported as a Python file")
        module = importlib.util.module_from_spec(location)
        sys.modules[name] = module  # dataclasses and pickling look modules up by name
        try:
            location.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - the user's module raises anything
            del sys.modules[name]
            raise ImportError(f"embedder spec {spec!r}: importing {target} failed ({type(e).__name__}: {e})") from e
        return module
    try:
        return importlib.import_module(target)
    except Exception as e:  # noqa: BLE001 - ModuleNotFoundError, or whatever the module raises on import
        raise ImportError(f"embedder spec {spec!r}: importing module {target!r} failed ({type(e).__name__}: {e}); "
                          "pass 'package.module:factory' on the Python path or 'path/to/file.py[:factory]'") from e


@dataclasses.dataclass
class SequenceStats:
    """The Gaussian fitted to one set's embeddings: what the distance needs, savable as a reference."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    def save(self, path: str) -> None:
        storage.save_npz_atomic(path, mu=self.mu, sigma=self.sigma, count=np.int64(self.count))

    @classmethod
    def load(cls, path: str) -> "SequenceStats":
        """Statistics written by `save`; another file is a ValueError naming it."""
        data = storage.load_npz(path)
        missing = [k for k in ("mu", "sigma", "count") if k not in data]
        if missing:
            raise ValueError(f"{path} holds no {', '.join(missing)}: not sequence statistics (arrays: {sorted(data)})")
        return cls(mu=data["mu"], sigma=data["sigma"], count=int(data["count"]))


def check_sequences(batch: Any, mask: Any = None, what: str = "sequences") -> tuple[np.ndarray, np.ndarray | None]:
    """(B, L, C) numbers and a (B, L) mask (bool or 0/1, True = real step, every row with one)."""
    batch = np.asarray(batch)
    if batch.ndim != 3 or min(batch.shape) < 1 or not np.issubdtype(batch.dtype, np.number):
        raise ValueError(f"{what} must be numeric (N, L, C), got shape {batch.shape}, dtype {batch.dtype}")
    if mask is None:
        return batch, None
    mask = np.asarray(mask)
    if mask.shape != batch.shape[:2]:
        raise ValueError(f"{what}: mask of shape {mask.shape} for sequences {batch.shape}; expected {batch.shape[:2]}")
    if mask.dtype != bool:
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(f"{what}: the mask must be bool or 0/1 (True = a real step), got values other than 0/1")
        mask = mask.astype(bool)
    empty = np.flatnonzero(~mask.any(axis=1))
    if len(empty):
        raise ValueError(f"{what}: sequences {empty[:10].tolist()} have no real step (all masked)")
    return batch, mask


def _batches(sequences: Sequences, mask: Any, batch_size: int, what: str
             ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Checked (batch, mask) pairs: an array in slices of `batch_size`, or the given pairs as they come."""
    if isinstance(sequences, np.ndarray):
        sequences, mask = check_sequences(sequences, mask, what)
        for start in range(0, len(sequences), batch_size):
            yield sequences[start:start + batch_size], None if mask is None else mask[start:start + batch_size]
        return
    if mask is not None:
        raise ValueError(f"{what}: pass masks inside the (batch, mask) pairs when sequences come in batches")
    for pair in sequences:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise ValueError(f"{what}: batches must be (sequences, mask or None) pairs, got {type(pair).__name__}")
        yield check_sequences(*pair, what=what)


def sequence_statistics(embed: Embedder, sequences: Sequences, mask: np.ndarray | None = None,
                        batch_size: int = 256, what: str = "sequences") -> SequenceStats:
    """Mean and covariance of the embeddings of sequences (an (N, L, C) array with its optional
    (N, L) mask, or an iterable of (batch, mask) pairs), streamed in float64."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    name = getattr(embed, "__qualname__", None) or repr(embed)
    stats = metrics.RunningStats()
    for batch, batch_mask in _batches(sequences, mask, batch_size, what):
        features = np.asarray(embed(batch, batch_mask))
        if features.ndim != 2 or features.shape[0] != len(batch):
            raise ValueError(f"embedder {name} returned shape {features.shape} for {what} of shape {batch.shape}; "
                             f"expected ({len(batch)}, D)")
        if not np.isfinite(features).all():
            raise ValueError(f"embedder {name} returned non-finite features for {what} (masked padding not ignored?)")
        stats.update(features)
    if stats.count < 2:
        raise ValueError(f"a Frechet distance needs at least 2 {what}, got {stats.count}")
    return SequenceStats(mu=stats.mean(), sigma=stats.cov(), count=stats.count)


def sequence_fd(embed: Embedder, samples: Sequences, reference: Sequences | SequenceStats,
                sample_mask: np.ndarray | None = None, reference_mask: np.ndarray | None = None,
                batch_size: int = 256, method: str = "sqrtm") -> dict[str, Any]:
    """Frechet distance between the embeddings of generated and reference sequences.

    `reference` may be saved `SequenceStats` (computed once with the same embedder). Returns
    {'fd', 'num_samples', 'num_reference', 'dim'}; `method` as `metrics.frechet_distance`.
    """
    if method not in metrics.FID_METHODS:
        raise ValueError(f"method={method!r}; expected one of {metrics.FID_METHODS}")
    if not isinstance(reference, SequenceStats):
        reference = sequence_statistics(embed, reference, reference_mask, batch_size, what="reference sequences")
    elif reference_mask is not None:
        raise ValueError("reference_mask given with reference statistics: the mask applies when they are computed")
    sample = sequence_statistics(embed, samples, sample_mask, batch_size, what="sample sequences")
    if sample.dim != reference.dim:
        raise ValueError(f"sample embeddings have {sample.dim} dimensions, the reference's {reference.dim}: "
                         "reference statistics from another embedder?")
    fd = metrics.frechet_distance(sample.mu, sample.sigma, reference.mu, reference.sigma, method=method)
    return {"fd": fd, "num_samples": sample.count, "num_reference": reference.count, "dim": sample.dim}
