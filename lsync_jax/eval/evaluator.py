"""The evaluator: Inception features of image batches, sharded over every device, and the five
ADM metrics (FID, sFID, IS, precision, recall) between a reference and a sample set.

Images are host uint8 NHWC arrays (ADM's `arr_0` layout), of any size and 1 or 3 channels. A
batch is padded to a multiple of the device count, split over a 1-D `data` mesh, run through the
jitted Inception at float32 precision, and only the valid rows come back. Statistics stream into
float64 accumulators, so 50K samples never sit in memory as images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import time
import zipfile
import zlib
from typing import Any, Callable, Collection, Iterable, Iterator, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy import special

from lsync_jax import storage
from lsync_jax.data.registry import check_source
from lsync_jax.eval import metrics
from lsync_jax.host import Progress, all_processes, compiler_options, gather_to_host, pad_rows
from lsync_jax.models import inception
from lsync_jax.porting import inception as weights
from lsync_jax.storage import save_npz_atomic, write_bytes_atomic, write_json_atomic

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
FEATURE_DIM = 2048  # Inception's pool features: FID's covariance is 2048 x 2048
PR_K = 3  # ADM's k of precision/recall's k-NN radii
STATISTICS_MIN = 2  # every metric comes from one pass that also forms FID's covariance of each side


def metric_minimums(k: int = PR_K) -> dict[str, tuple[int, int]]:
    """The fewest images each metric needs: (of the samples, of the reference; 0: reads no reference
    images). FID and sFID: a covariance (2 rows); IS: one image (its own marginal); precision and recall:
    more than k images on each side (a k-NN radius excludes the point itself)."""
    return {"fid": (2, 2), "sfid": (2, 2), "inception_score": (1, 0), "precision": (k + 1, k + 1),
            "recall": (k + 1, k + 1)}


def check_metric_counts(num_samples: int, num_reference: int | None, *, skip_small: bool = False, k: int = PR_K,
                        samples: str = "the sample batch", reference: str = "the reference",
                        skip_hint: str | None = "--skip_small_metrics") -> tuple[dict[str, str], list[str]]:
    """Before any Inception work: (the metrics to skip -> why, notes to print once) for `num_samples`
    samples and `num_reference` reference images (None: saved statistics only, no images to count).
    A metric whose minimum (`metric_minimums`) is not met is an error naming it and its minimum, or,
    with `skip_small`, skipped (`skip_hint` names how a user asks for that; None: they cannot). Fewer
    than STATISTICS_MIN images on either side is always an error: the one pass every metric shares
    forms a covariance. FID-N with N below FEATURE_DIM is noted: its covariance is rank-deficient."""
    sides = [(samples, "sample", int(num_samples), 0)]
    if num_reference is not None:
        sides.append((reference, "reference", int(num_reference), 1))
    for label, what, count, _ in sides:
        if count < STATISTICS_MIN:
            raise ValueError(f"FID and sFID need at least {STATISTICS_MIN} {what} images (a covariance), and every "
                             f"metric comes from the same statistics ({label}: {count})")
    short = {}
    for metric, needs in metric_minimums(k).items():
        lacking = [f"{needs[i]} {what} images ({label}: {count})" for label, what, count, i in sides
                   if count < needs[i]]
        if lacking:
            short[metric] = f"{metric} needs at least " + " and ".join(lacking)
    if short and not skip_small:
        how = f", or pass {skip_hint} to skip {'it' if len(short) == 1 else 'them'}" if skip_hint else ""
        raise ValueError("; ".join(short.values()) + f": give more images{how}")
    notes = []
    small = [f"{count:,} {what} images" for label, what, count, _ in sides if count < FEATURE_DIM]
    if small:
        notes.append(f"FID-{int(num_samples)}: " + " and ".join(small) + f" are fewer than the {FEATURE_DIM:,} "
                     "Inception features, so the covariance is rank-deficient (rank at most N - 1): the FID is biased "
                     "upward and compares only with FIDs of the same N, not with FID-50K")
    return short, notes


@dataclasses.dataclass
class FeatureStats:
    """What the metrics need of one image set: FID/sFID Gaussians, pool features kept for
    precision/recall, and softmax outputs for IS (when the weights have the classifier)."""

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray
    sigma_s: np.ndarray
    count: int
    pool: np.ndarray | None = None
    probs: np.ndarray | None = None

    def save(self, path: str) -> None:
        """ADM reference layout (`mu`, `sigma`, `mu_s`, `sigma_s`) plus our `pool`/`probs`; atomic."""
        arrays = dict(mu=self.mu, sigma=self.sigma, mu_s=self.mu_s, sigma_s=self.sigma_s, count=np.int64(self.count))
        if self.pool is not None:
            arrays["pool"] = self.pool
        if self.probs is not None:
            arrays["probs"] = self.probs
        save_npz_atomic(path, **arrays)

    @classmethod
    def load(cls, path: str) -> "FeatureStats":
        """Statistics saved by `save`; a damaged or incomplete file is a ValueError naming it."""
        with open_npz(path) as archive:
            names = {name[:-4] for name in archive.namelist() if name.endswith(".npy")}
            missing = [k for k in STAT_KEYS if k not in names]
            if missing:
                raise ValueError(f"{path} holds no {', '.join(missing)}: not FID statistics (arrays: {sorted(names)})")
            data = {k: _read_member(archive, path, k) for k in names}
        return cls(mu=data["mu"], sigma=data["sigma"], mu_s=data["mu_s"], sigma_s=data["sigma_s"],
                   count=int(data["count"]) if "count" in data else -1, pool=data.get("pool"),
                   probs=data.get("probs"))


class InceptionEvaluator:
    """Batched, sharded FID Inception over all (or the given) devices.

    `batch_size` is the global batch per call, rounded up to a multiple of the device count;
    `params` bypasses the weights file (tests and benchmarks).
    On several processes every process passes the same host images (as `launch/evaluate.py`
    and the training loop do); each device reads only its slice.
    """

    def __init__(self, weights_path: str | None = None, batch_size: int = 256,
                 devices: Sequence[jax.Device] | None = None, params: Any = None):
        if params is None:
            self.weights_path = weights.resolve_weights(weights_path)
            params, self.has_logits = weights.load_weights(self.weights_path)
            # cached statistics are keyed by the weights file (path, size, time), not just its name
            stem = os.path.splitext(os.path.basename(self.weights_path))[0]
            self.weights_id = f"{stem}-{_file_key(self.weights_path)}"
        else:  # given weights (benchmarks time random ones: speed does not depend on them)
            self.weights_path, self.has_logits = "given", "logits_kernel" in params
            self.weights_id = "given"
        devices = list(devices or jax.devices())
        self.mesh = Mesh(np.array(devices), ("data",))
        n = len(devices)
        self.batch_size = max(n, -(-int(batch_size) // n) * n)
        self._batch = NamedSharding(self.mesh, P("data"))
        self.params = jax.device_put(params, NamedSharding(self.mesh, P()))
        # (params, placed uint8 batch) -> features on device, sharded like the batch
        self.apply = jax.jit(functools.partial(inception.features, with_logits=self.has_logits),
                             out_shardings=self._batch, compiler_options=compiler_options(devices[0].platform))

    def place(self, images: np.ndarray) -> jax.Array:
        """A host batch (the same on every process) as a global array split over the mesh."""
        return jax.make_array_from_callback(images.shape, self._batch, lambda index: images[index])

    def features(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 (N, H, W, C) -> {'pool', 'spatial'[, 'probs']} as float32 host arrays, any N."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"expected NHWC images with 1 or 3 channels, got shape {images.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images (ADM sample batches), got {images.dtype}")
        out: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            valid = len(chunk)
            chunk = pad_rows(chunk, self.batch_size)  # the last batch too: one compiled shape, any N
            result = self.apply(self.params, self.place(chunk))
            for key, value in result.items():
                value = gather_to_host(value)[:valid]
                if key == "logits":
                    key, value = "probs", special.softmax(value.astype(np.float64), axis=1).astype(np.float32)
                out.setdefault(key, []).append(value)
        if not out:
            raise ValueError("no images to evaluate")
        return {k: np.concatenate(v) for k, v in out.items()}

    def statistics(self, batches: Iterable[np.ndarray], keep: int | None = None,
                   progress: Callable[[int], None] | None = None) -> FeatureStats:
        """Stream image batches into FID/sFID statistics, keeping the pool features and softmax
        outputs of the first `keep` images (None: all, as ADM does) for precision/recall and IS."""
        keep = np.inf if keep is None else keep
        pool_stats, spatial_stats = metrics.RunningStats(), metrics.RunningStats()
        kept_pool: list[np.ndarray] = []
        kept_probs: list[np.ndarray] = []
        kept = 0
        for batch in batches:
            feats = self.features(batch)
            pool_stats.update(feats["pool"])
            spatial_stats.update(feats["spatial"])
            take = int(max(0, min(keep - kept, len(batch))))
            if take:
                kept_pool.append(feats["pool"][:take])
                if "probs" in feats:
                    kept_probs.append(feats["probs"][:take])
                kept += take
            if progress is not None:
                progress(pool_stats.count)
        if pool_stats.count < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {pool_stats.count}")
        return FeatureStats(mu=pool_stats.mean(), sigma=pool_stats.cov(), mu_s=spatial_stats.mean(),
                            sigma_s=spatial_stats.cov(), count=pool_stats.count,
                            pool=np.concatenate(kept_pool) if kept_pool else None,
                            probs=np.concatenate(kept_probs) if kept_probs else None)


def compute_metrics(ref: FeatureStats, sample: FeatureStats, k: int = PR_K, split_size: int = 5000,
                    fid_method: str = "sqrtm", skip: Collection[str] = ()) -> dict[str, float | None]:
    """FID, sFID, IS, precision and recall as ADM's evaluator reports them.

    `fid_method` 'sqrtm' is ADM's own square root, 'eigh' the equivalent symmetric route
    (much faster on CPU at 2048 dimensions). IS is None when the weights have no
    classifier; precision/recall are None when either side
    kept no pool features (an ADM reference with statistics but no images). A metric in `skip` (from
    `check_metric_counts`) is None.
    """
    result: dict[str, float | None] = {"fid": None, "sfid": None, "inception_score": None, "precision": None,
                                       "recall": None}
    if "fid" not in skip:
        result["fid"] = metrics.frechet_distance(sample.mu, sample.sigma, ref.mu, ref.sigma, method=fid_method)
    if "sfid" not in skip:
        result["sfid"] = metrics.frechet_distance(sample.mu_s, sample.sigma_s, ref.mu_s, ref.sigma_s,
                                                  method=fid_method)
    if sample.probs is not None and "inception_score" not in skip:
        result["inception_score"] = metrics.inception_score(sample.probs, split_size=split_size)
    if ref.pool is not None and sample.pool is not None and not {"precision", "recall"} & set(skip):
        result["precision"], result["recall"] = metrics.precision_recall(ref.pool, sample.pool, k=k)
    return result


# ----------------------------------------------------------------------------------------------
# ADM .npz batches


@contextlib.contextmanager
def open_npz(path: str) -> Iterator[zipfile.ZipFile]:
    """An .npz opened as the zip archive it is; a file that is no readable archive (truncated, damaged,
    not an .npz) is an error naming it."""
    try:
        with storage.path(path).open("rb") as handle, zipfile.ZipFile(handle) as archive:
            yield archive
    except (zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"{path} is not a readable .npz ({type(e).__name__}: {e}): the file is truncated or "
                         "damaged; write it again (launch/sample.py writes sample batches)") from e
    except EOFError as e:  # a member's data ends early
        if str(path) in str(e):
            raise
        raise EOFError(f"{path} is truncated ({e})") from e


def _read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _read_member(archive: zipfile.ZipFile, path: str, key: str) -> np.ndarray:
    """One array of an opened .npz (no pickles); a damaged member is an error naming the file and array."""
    try:
        with archive.open(f"{key}.npy") as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"{path}: array {key!r} cannot be read ({type(e).__name__}: {e}); the file is "
                         "truncated or damaged") from e


def npz_keys(path: str) -> list[str]:
    with open_npz(path) as archive:
        return [name[:-4] for name in archive.namelist() if name.endswith(".npy")]


def iter_npz_batches(path: str, key: str = "arr_0", batch_size: int = 1000) -> Iterator[np.ndarray]:
    """Stream rows of one array of an .npz without loading it whole (ADM's 50K x 256^2 batches are ~10 GB)."""
    with open_npz(path) as archive:
        name = f"{key}.npy"
        if name not in archive.namelist():
            raise KeyError(f"{path} has no array {key!r} (has {npz_keys(path)})")
        with archive.open(name) as f:
            shape, fortran, dtype = _read_npy_header(f)
            if fortran:
                raise ValueError(f"{path}:{key} is Fortran-ordered; expected a C-ordered image batch")
            row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
            remaining = shape[0]
            while remaining:
                rows = min(batch_size, remaining)
                data = f.read(rows * row_bytes)
                if len(data) != rows * row_bytes:
                    raise EOFError(f"{path}:{key} is truncated: expected {shape[0]} rows of {shape[1:]}")
                yield np.frombuffer(data, dtype=dtype).reshape(rows, *shape[1:])
                remaining -= rows


def npz_header(path: str, key: str = "arr_0") -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of one array of an .npz, from its header alone."""
    with open_npz(path) as archive:
        with archive.open(f"{key}.npy") as f:
            try:
                shape, _, dtype = _read_npy_header(f)
            except ValueError as e:
                raise ValueError(f"{path}: array {key!r} has no readable .npy header ({e}); the file is damaged") from e
    return tuple(shape), dtype


def check_image_batch(path: str, key: str = "arr_0") -> tuple[int, ...]:
    """Fail fast, before any compile, on a batch that is not uint8 NHWC with 1 or 3 channels."""
    if not storage.path(path).exists():
        raise FileNotFoundError(f"image batch {path} not found")
    keys = npz_keys(path)
    if key not in keys:
        raise ValueError(f"{path} has no {key!r} image array (arrays: {keys})")
    shape, dtype = npz_header(path, key)
    if len(shape) != 4 or shape[-1] not in (1, 3) or shape[0] < 1 or dtype != np.uint8:
        raise ValueError(f"{path}:{key} must be uint8 NHWC images with 1 or 3 channels (ADM layout), got "
                         f"shape {tuple(shape)}, dtype {dtype}")
    return tuple(shape)


def _file_key(path: str) -> str:
    """A replaced file (other size or modification time) gets another key."""
    stat = storage.path(path).stat()
    raw = f"{storage.absolute(path)}:{stat.length}:{stat.mtime}"
    return hashlib.sha1(raw.encode()).hexdigest()[:12]


def cached(key: str, evaluator: InceptionEvaluator, compute: Callable[[], Any],
           cache_dir: str | None = None, load: Callable[[str], Any] = FeatureStats.load) -> Any:
    """Statistics stored under the cache directory by key and Inception weights, computed once
    (`FeatureStats`, or anything with `save(path)` that `load` reads back, e.g. video `ClipStatistics`).

    All processes load only if every one of them has the file (the Inception pass is a collective:
    either all run it or none); each then writes its own copy, atomically, so a cache on a shared
    disk or on each host's own disk both work.
    """
    directory = cache_dir or storage.join(weights.cache_dir(), "fid_stats")
    path = storage.join(directory, f"{key}__{evaluator.weights_id}.npz")
    stats = None
    if storage.exists(path):
        try:
            stats = load(path)
        except ValueError as e:  # a cache, not a result: computed again and replaced
            logging.warning("cached FID statistics %s are damaged (%s); computing them again", path, e)
    if all_processes(stats is not None):
        return stats
    stats = compute()
    stats.save(path)
    return stats


def batch_statistics(evaluator: InceptionEvaluator, path: str, batch_size: int = 1000,
                     keep: int | None = None, log: Callable[[str], None] = print) -> FeatureStats:
    """Statistics of an ADM batch's `arr_0` images; stored `mu`/`sigma`/`mu_s`/`sigma_s` in the
    file replace the computed Gaussians, as ADM's `read_statistics` does."""
    shape = check_image_batch(path)
    start = time.time()

    def progress(done: int) -> None:
        rate = done / max(time.time() - start, 1e-9)
        log(f"{os.path.basename(path)}: {done}/{shape[0]} images, {rate:.1f} img/s, "
            f"ETA {(shape[0] - done) / max(rate, 1e-9):.0f} s")

    stats = evaluator.statistics(iter_npz_batches(path, "arr_0", batch_size), keep=keep, progress=progress)
    stored = _stored_statistics(path)
    return stats if stored is None else dataclasses.replace(stats, **stored)


def _stored_statistics(path: str) -> dict[str, np.ndarray] | None:
    if not all(k in npz_keys(path) for k in STAT_KEYS):
        return None
    with open_npz(path) as archive:
        return {k: _read_member(archive, path, k) for k in STAT_KEYS}


def reference_statistics(evaluator: InceptionEvaluator, path: str, batch_size: int = 1000,
                         log: Callable[[str], None] = print) -> FeatureStats:
    """An ADM reference batch: its stored `mu`/`sigma`/`mu_s`/`sigma_s` (as ADM uses them) and pool
    features of its `arr_0` images for precision/recall (computed once, cached by file and weights).
    A batch without stored statistics gets them from its images, like ADM."""
    keys = npz_keys(path) if storage.path(path).exists() else None
    if keys is None:
        raise FileNotFoundError(f"reference batch {path} not found")
    has_images = "arr_0" in keys
    has_stats = all(k in keys for k in STAT_KEYS)
    if not has_images and not has_stats:
        raise ValueError(f"{path} is not an ADM reference batch: needs arr_0 images or mu/sigma/mu_s/sigma_s "
                         f"(has {keys})")
    if has_images:
        check_image_batch(path)
        name = os.path.splitext(os.path.basename(path))[0]
        return cached(f"ref_{name}_{_file_key(path)}", evaluator,
                      lambda: batch_statistics(evaluator, path, batch_size, log=log))
    return FeatureStats(**_stored_statistics(path), count=-1)




def source_statistics(evaluator: InceptionEvaluator, source: Any, num_images: int, batch_size: int = 1000,
                      keep: int | None = None, log: Callable[[str], None] = print) -> FeatureStats:
    """Reference statistics of the first `num_images` (0: all) of a data source (`len` and
    `[i]['image']`, as every lsync-jax source has), computed once and cached by the images'
    content: other data under the same name never reuses them."""
    total = len(source)
    num = min(int(num_images), total) if num_images else total
    if num < 1:
        raise ValueError(f"the reference data source {source!r} has no images")

    def batches() -> Iterator[np.ndarray]:
        for start in range(0, num, batch_size):
            stop = min(start + batch_size, num)
            yield np.stack([np.asarray(source[i]["image"], np.uint8) for i in range(start, stop)])

    digest = hashlib.sha1()
    for batch in batches():  # reading is cheap next to the Inception pass
        digest.update(np.ascontiguousarray(batch).tobytes())
    name = check_source(source).name
    key = "src_" + "".join(c if c.isalnum() or c in "-_" else "-" for c in name)
    key += f"_{num}_{digest.hexdigest()[:12]}_keep{keep or 'all'}"

    def compute() -> FeatureStats:
        progress = Progress(f"FID reference statistics of {name} (computed once, cached for later runs)", num,
                            log=log)

        def counted() -> Iterator[np.ndarray]:
            for batch in batches():
                progress.update(len(batch))
                yield batch

        stats = evaluator.statistics(counted(), keep=keep)
        progress.finish()
        return stats

    return cached(key, evaluator, compute)


def check_output(path: str) -> bool:
    """Before any work: the result's directory takes a file (a probe is written and removed), and the
    path is no directory. Returns whether a result is there already (the new one replaces it,
    atomically, when it is written)."""
    target = storage.path(path)
    if target.is_dir():
        raise IsADirectoryError(f"the metrics output {path} is a directory; pass --output=FILE.json")
    probe = target.parent / f".{target.name}.probe"
    try:
        write_bytes_atomic(str(probe), b"")
        probe.unlink()
    except OSError as e:
        raise OSError(f"cannot write the metrics output {path} ({type(e).__name__}: {e}); choose another "
                      "--output") from e
    return target.exists()


def reference_count(ref_batch: str | None = None, ref_source: Any = None, ref_num: int = 0) -> int | None:
    """How many reference images the metrics will see, cheaply (an .npz header, a source's length);
    None for an ADM batch of saved statistics only."""
    if ref_batch is not None:
        if not storage.path(ref_batch).exists():
            raise FileNotFoundError(f"reference batch {ref_batch} not found")
        if "arr_0" not in npz_keys(ref_batch):
            return None
        return check_image_batch(ref_batch)[0]  # a damaged reference fails now, not after the sample pass
    total = len(ref_source)
    return min(int(ref_num), total) if ref_num else total


def evaluate(sample_batch: str, ref_batch: str | None = None, ref_source: Any = None, ref_num: int = 0,
             weights_path: str | None = None, batch_size: int = 256, output: str | None = None,
             fid_method: str = "sqrtm", skip_small_metrics: bool = False,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """The paper protocol: metrics of an ADM sample batch against an ADM reference batch (or a
    data source), printed and written as JSON. Inputs are checked before anything compiles, the image
    counts too (`check_metric_counts`): a metric they are too few for is an error, or with
    `skip_small_metrics` skipped with one line."""
    if (ref_batch is None) == (ref_source is None):
        raise ValueError("give exactly one reference: an ADM reference batch or a dataset")
    if fid_method not in metrics.FID_METHODS:
        raise ValueError(f"fid_method={fid_method!r}; expected one of {metrics.FID_METHODS}")
    shape = check_image_batch(sample_batch)
    num_reference = reference_count(ref_batch, ref_source, ref_num)
    skipped, notes = check_metric_counts(shape[0], num_reference, skip_small=skip_small_metrics,
                                         samples=f"the sample batch {sample_batch}",
                                         reference=f"the reference {ref_batch or _source_label(ref_source)}")
    if output and jax.process_index() == 0 and check_output(output):
        log(f"{output} exists: this run's result will replace it")
    for note in notes:
        log(f"note: {note}")
    evaluator = InceptionEvaluator(weights_path, batch_size=batch_size)
    start = time.time()
    if ref_batch is not None:
        ref = reference_statistics(evaluator, ref_batch, batch_size=batch_size, log=log)
    else:
        ref = source_statistics(evaluator, ref_source, ref_num, batch_size=batch_size, log=log)
    sample = batch_statistics(evaluator, sample_batch, batch_size=batch_size, log=log)
    result = compute_metrics(ref, sample, fid_method=fid_method, skip=skipped)
    payload = {"fid_method": fid_method, "metrics": result, "num_samples": int(shape[0]), "num_reference": ref.count,
               "sample_batch": sample_batch, "reference": ref_batch or _source_label(ref_source),
               "inception_weights": evaluator.weights_path, "seconds": round(time.time() - start, 1),
               "skipped": dict(skipped), "notes": notes}
    for name, value in result.items():
        if name in skipped:
            log(f"{name}: skipped ({skipped[name]})")
        else:
            log(f"{name}: {'n/a' if value is None else f'{value:.4f}'}")
    if result["inception_score"] is None and "inception_score" not in skipped:
        log("inception_score: the Inception weights have no classifier (fid-helper's file); convert "
            "pytorch-fid's pt_inception-2015-12-05-6726825d.pth for IS")
    if output and jax.process_index() == 0:
        write_json_atomic(output, payload)
        log(f"wrote {output}")
    return payload


def _source_label(source: Any) -> str:
    return check_source(source).name
