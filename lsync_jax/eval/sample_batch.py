"""A sample batch file evaluated by what it holds, as launch/evaluate.py runs it.

The rank of the batch's `arr_0` picks the protocol (launch/sample.py writes all three):

- images, uint8 (N, H, W, C): the ADM metrics (`evaluator.evaluate`, unchanged);
- video clips, uint8 (N, F, H, W, C): per-frame FID, sFID, precision/recall, the temporal scores and
  the frame and clip counts (`video.video_metrics`) against reference clips;
- sequences, float (N, L, C): a Frechet distance over the features of a user-supplied embedder
  (`sequences.sequence_fd`), which must be named (`embedder`): sequence metrics have no default model.

References are an .npz (of the same kind: clips for clips, sequences for sequences; or statistics saved
by `ClipStatistics.save` / `FeatureStats.save` / `SequenceStats.save`) or a data source built from a
config's data section. Every check that needs no model (ranks, dtypes, channels, the embedder's
presence, the output's directory) runs before the Inception weights or the embedder load.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np

from lsync_jax import storage
from lsync_jax.data.pipeline import to_example
from lsync_jax.data.registry import check_source
from lsync_jax.eval import metrics
from lsync_jax.eval.evaluator import (
    STAT_KEYS,
    STATISTICS_MIN,
    FeatureStats,
    InceptionEvaluator,
    _file_key,
    cached,
    check_metric_counts,
    check_output,
    evaluate,
    iter_npz_batches,
    npz_header,
    npz_keys,
)
from lsync_jax.eval.sequences import SequenceStats, load_embedder, sequence_fd
from lsync_jax.eval.video import ClipStatistics, clip_statistics, describe_video_metrics, video_metrics
from lsync_jax.host import Progress, to_uint8
from lsync_jax.storage import write_json_atomic

KINDS = {3: "sequence", 4: "image", 5: "video"}  # rank of arr_0 -> what the batch holds
_LAYOUTS = {"image": "images (N, H, W, C)", "video": "video clips (N, F, H, W, C)",
            "sequence": "sequences (N, L, C)"}
_SEQUENCE_STAT_KEYS = ("mu", "sigma", "count")


def batch_kind(path: str, what: str = "sample batch") -> tuple[str, tuple[int, ...], np.dtype]:
    """(kind, shape, dtype) of an .npz's `arr_0`: 'image', 'video' or 'sequence' by its rank; a missing
    file or array, or another rank, is an error naming it."""
    if not storage.path(path).exists():
        raise FileNotFoundError(f"{what} {path} not found")
    keys = npz_keys(path)
    if "arr_0" not in keys:
        raise ValueError(f"{path} has no 'arr_0' array (arrays: {keys}): not a {what} as launch/sample.py writes it")
    shape, dtype = npz_header(path, "arr_0")
    if len(shape) not in KINDS or shape[0] < 1:
        raise ValueError(f"{path}:arr_0 has shape {tuple(shape)}; a {what} holds images (N, H, W, C), video clips "
                         "(N, F, H, W, C) or sequences (N, L, C)")
    return KINDS[len(shape)], tuple(shape), dtype


def _check_pixels(path: str, kind: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if dtype != np.uint8 or shape[-1] not in (1, 3):
        raise ValueError(f"{path}:arr_0 must be uint8 {_LAYOUTS[kind]} with 1 or 3 channels, got shape {shape}, "
                         f"dtype {dtype}")


def _source_name(source: Any) -> str:
    return check_source(source).name


def _source_kind(source: Any) -> tuple[str, tuple[int, ...]]:
    """What a data source's examples are (its declared kind: 'image', 'video', 'sequence') and their shape."""
    source = check_source(source)
    x = np.asarray(to_example(source, source[0], np.random.default_rng(0), False)["x"])
    if KINDS.get(x.ndim + 1) != source.kind:
        raise ValueError(f"the reference data {source.name!r} gives examples of shape {x.shape}, which are not "
                         f"{source.kind} examples as it declares")
    return source.kind, tuple(x.shape)


def check_reference(sample_batch: str, kind: str, ref_batch: str | None, ref_source: Any,
                    stat_keys: tuple[str, ...] = STAT_KEYS) -> tuple[str | None, tuple[int, ...] | None, str]:
    """(the reference's kind, None for saved statistics; its shape (N, ...) where known; its name) after
    checking that it holds what the samples are (`kind`); a reference of another kind is an error naming both."""
    if ref_batch is not None:
        if not storage.path(ref_batch).exists():
            raise FileNotFoundError(f"reference batch {ref_batch} not found")
        keys = npz_keys(ref_batch)
        if "arr_0" in keys:
            ref_kind, ref_shape, _ = batch_kind(ref_batch, "reference batch")
        elif all(k in keys for k in stat_keys):
            ref_kind, ref_shape = None, None
        else:
            raise ValueError(f"{ref_batch} is no reference for {_LAYOUTS[kind]}: it needs arr_0 or the statistics "
                             f"{', '.join(stat_keys)} (has {keys})")
        name = where = ref_batch
    else:
        ref_kind, example = _source_kind(ref_source)
        ref_shape = (len(ref_source), *example)
        name = _source_name(ref_source)
        where = f"data {name!r} (examples {example})"
    if ref_kind is not None and ref_kind != kind:
        raise ValueError(f"the sample batch {sample_batch} holds {_LAYOUTS[kind]}, but the reference {where} holds "
                         f"{_LAYOUTS[ref_kind]}: compare {kind}s with a reference of {kind}s (or its saved "
                         "statistics)")
    return ref_kind, ref_shape, name


def evaluate_sample_batch(sample_batch: str, ref_batch: str | None = None, ref_source: Any = None, ref_num: int = 0,
                          weights_path: str | None = None, batch_size: int = 256, output: str | None = None,
                          fid_method: str = "sqrtm", embedder: str | None = None, skip_small_metrics: bool = False,
                          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate an .npz sample batch by its kind (images, clips, sequences) against `ref_batch` or
    `ref_source` (`ref_num` examples of it, 0: all); print the result and write it as JSON to `output`.
    `embedder` (a `sequences.load_embedder` spec) is required for sequences and refused otherwise.
    `skip_small_metrics` (images): skip a metric the image counts are too few for, instead of refusing."""
    if (ref_batch is None) == (ref_source is None):
        raise ValueError("give exactly one reference: a reference batch (.npz) or a dataset (a config's data)")
    if fid_method not in metrics.FID_METHODS:
        raise ValueError(f"fid_method={fid_method!r}; expected one of {metrics.FID_METHODS}")
    kind, shape, dtype = batch_kind(sample_batch)
    if kind == "sequence" and not embedder:
        raise ValueError(f"{sample_batch} holds sequences {shape} (N, L, C): their Frechet distance needs an "
                         "embedding model; pass --embedder=SPEC ('package.module:factory', 'file.py[:factory]', or "
                         "'mean_std' for a smoke test; see docs/evaluation.md)")
    if kind != "sequence" and embedder:
        raise ValueError(f"--embedder={embedder} applies to sequence batches (N, L, C); {sample_batch} holds "
                         f"{_LAYOUTS[kind]} {shape}, evaluated with the FID Inception")
    check_reference(sample_batch, kind, ref_batch, ref_source, _SEQUENCE_STAT_KEYS if kind == "sequence"
                    else STAT_KEYS)
    if kind == "image":  # the ADM protocol, as before
        return evaluate(sample_batch, ref_batch=ref_batch, ref_source=ref_source, ref_num=ref_num,
                        weights_path=weights_path, batch_size=batch_size, output=output, fid_method=fid_method,
                        skip_small_metrics=skip_small_metrics, log=log)
    if kind == "video":
        return evaluate_video(sample_batch, ref_batch=ref_batch, ref_source=ref_source, ref_num=ref_num,
                              weights_path=weights_path, batch_size=batch_size, output=output, fid_method=fid_method,
                              log=log)
    return evaluate_sequences(sample_batch, embedder, ref_batch=ref_batch, ref_source=ref_source, ref_num=ref_num,
                              batch_size=batch_size, output=output, fid_method=fid_method, log=log)


# ----------------------------------------------------------------------------------------------
# video


def _source_clips(source: Any, num: int, clips_per_batch: int) -> Iterator[np.ndarray]:
    """uint8 clip batches of a video source's first `num` clips: its records' own 'video' frames, else
    its examples (in [-1, 1]) quantised as samples are."""
    for start in range(0, num, clips_per_batch):
        clips = []
        for i in range(start, min(start + clips_per_batch, num)):
            record = source[i]
            if "video" in record:
                clips.append(np.asarray(record["video"], np.uint8))
            else:
                clips.append(to_uint8(to_example(source, record, np.random.default_rng(i), False)["x"]))
        yield np.stack(clips)


def evaluate_video(sample_batch: str, ref_batch: str | None = None, ref_source: Any = None, ref_num: int = 0,
                   weights_path: str | None = None, batch_size: int = 256, output: str | None = None,
                   fid_method: str = "sqrtm", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Per-frame FID (and sFID, precision/recall, IS over frames), the temporal scores and the frame and
    clip counts of a batch of uint8 clips (N, F, H, W, C) against reference clips: an .npz of clips, saved
    `ClipStatistics` or frame `FeatureStats`, or a video data source (its first `ref_num` clips, 0: all).
    Reference clips' statistics are computed once and cached (by file, or by the clips' content)."""
    kind, shape, dtype = batch_kind(sample_batch)
    if kind != "video":
        raise ValueError(f"{sample_batch} holds {_LAYOUTS[kind]} {shape}, not video clips (N, F, H, W, C)")
    _check_pixels(sample_batch, kind, shape, dtype)
    ref_kind, ref_shape, reference_name = check_reference(sample_batch, kind, ref_batch, ref_source)
    if ref_batch is not None and ref_kind is not None:
        _check_pixels(ref_batch, ref_kind, *npz_header(ref_batch))
    ref_frames = None  # saved statistics: nothing to count
    if ref_shape is not None:
        ref_clips = min(int(ref_num), ref_shape[0]) if ref_batch is None and ref_num else ref_shape[0]
        ref_frames = int(ref_clips) * int(ref_shape[1])
    # the per-frame metrics' minimums, before any Inception work; precision/recall below theirs are
    # None (as `video_metrics` leaves them), said in one line
    skipped, notes = check_metric_counts(int(shape[0]) * int(shape[1]), ref_frames, skip_small=True,
                                         samples=f"the frames of {sample_batch}",
                                         reference=f"the frames of {reference_name}")
    for note in notes:
        log(f"note: per-frame {note}")
    if output and jax.process_index() == 0 and check_output(output):
        log(f"{output} exists: this run's result will replace it")
    evaluator = InceptionEvaluator(weights_path, batch_size=batch_size)
    clips_per_batch = max(1, evaluator.batch_size // shape[1])
    start = time.time()

    if ref_batch is not None and ref_kind is None:  # saved statistics
        keys = npz_keys(ref_batch)
        reference = ClipStatistics.load(ref_batch) if "num_clips" in keys else FeatureStats.load(ref_batch)
    elif ref_batch is not None:
        n, frames = ref_shape[:2]
        name = os.path.splitext(os.path.basename(ref_batch))[0]
        reference = cached(f"clips_{name}_{_file_key(ref_batch)}", evaluator, lambda: _clip_statistics(
            evaluator, iter_npz_batches(ref_batch, "arr_0", clips_per_batch),
            f"reference clips {ref_batch} (computed once, cached)", n * frames, log), load=ClipStatistics.load)
    else:
        total = len(ref_source)
        num = min(int(ref_num), total) if ref_num else total
        digest = hashlib.sha1()
        for clips in _source_clips(ref_source, num, clips_per_batch):  # reading is cheap next to Inception
            digest.update(np.ascontiguousarray(clips).tobytes())
        safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in reference_name)
        reference = cached(f"clips_src_{safe}_{num}_{digest.hexdigest()[:12]}", evaluator, lambda: _clip_statistics(
            evaluator, _source_clips(ref_source, num, clips_per_batch),
            f"reference clips of {reference_name} (computed once, cached)", num * ref_shape[1], log),
            load=ClipStatistics.load)
    sample = _clip_statistics(evaluator, iter_npz_batches(sample_batch, "arr_0", clips_per_batch),
                              f"sample clips {os.path.basename(sample_batch)}", shape[0] * shape[1], log)
    result = video_metrics(None, sample, reference, fid_method=fid_method)
    line = describe_video_metrics(result)
    payload = {"kind": "video", "fid_method": fid_method, "metrics": result, "description": line,
               "num_samples": result["num_clips"], "num_frames": result["num_frames"],
               "num_reference": result["reference_clips"], "num_reference_frames": result["reference_frames"],
               "sample_batch": sample_batch, "reference": reference_name,
               "inception_weights": evaluator.weights_path, "seconds": round(time.time() - start, 1)}
    log(line)
    for key in ("frame_fid", "frame_sfid", "frame_inception_score", "frame_precision", "frame_recall"):
        value, why = result[key], skipped.get(key[len("frame_"):])
        log(f"{key}: skipped ({why})" if why else f"{key}: {'n/a' if value is None else f'{value:.4f}'}")
    if output and jax.process_index() == 0:
        write_json_atomic(output, payload)
        log(f"wrote {output}")
    return payload


def _clip_statistics(evaluator: InceptionEvaluator, clips: Iterator[np.ndarray], what: str, num_frames: int,
                     log: Callable[[str], None]) -> ClipStatistics:
    """`video.clip_statistics` of all clips, the Inception pass's progress logged."""
    progress = Progress(what, num_frames, "frames", log=log)
    stats = clip_statistics(evaluator, clips, progress=lambda done: progress.update(done - progress.done))
    progress.finish()
    return stats


# ----------------------------------------------------------------------------------------------
# sequences


def _npz_sequences(path: str, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(batch, mask or None) pairs of an .npz's `arr_0` (N, L, C) and its optional `mask` (N, L)."""
    keys = npz_keys(path)
    masks = iter_npz_batches(path, "mask", batch_size) if "mask" in keys else None
    for batch in iter_npz_batches(path, "arr_0", batch_size):
        yield np.asarray(batch, np.float32), None if masks is None else next(masks)


def _source_sequences(source: Any, num: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(batch, mask or None) pairs of a sequence source's first `num` examples (fixed windows: frame 0)."""
    for start in range(0, num, batch_size):
        examples = [to_example(source, source[i], np.random.default_rng(i), False)
                    for i in range(start, min(start + batch_size, num))]
        masks = [e.get("mask") for e in examples]
        yield (np.stack([e["x"] for e in examples]).astype(np.float32),
               None if masks[0] is None else np.stack(masks).astype(bool))


def evaluate_sequences(sample_batch: str, embedder: str, ref_batch: str | None = None, ref_source: Any = None,
                       ref_num: int = 0, batch_size: int = 256, output: str | None = None, fid_method: str = "sqrtm",
                       log: Callable[[str], None] = print) -> dict[str, Any]:
    """The Frechet distance between the embeddings (`embedder`, a `load_embedder` spec) of a batch of
    sequences (float (N, L, C)) and a reference: an .npz of sequences (with an optional (N, L) `mask`),
    saved `SequenceStats` (computed with the same embedder), or a sequence data source (its first
    `ref_num` examples, 0: all, with their padding masks)."""
    kind, shape, dtype = batch_kind(sample_batch)
    if kind != "sequence" or not np.issubdtype(dtype, np.number):
        raise ValueError(f"{sample_batch}:arr_0 must be numeric sequences (N, L, C), got shape {shape}, dtype {dtype}")
    if not embedder:
        raise ValueError("sequence batches need an embedder: pass --embedder=SPEC")
    ref_kind, ref_shape, reference_name = check_reference(sample_batch, kind, ref_batch, ref_source,
                                                          _SEQUENCE_STAT_KEYS)
    if ref_shape is not None and ref_shape[-1] != shape[-1]:
        raise ValueError(f"the sample sequences have {shape[-1]} channels (shape {shape}), the reference "
                         f"{reference_name} {ref_shape[-1]} (shape {tuple(ref_shape)}): not the same data")
    ref_count = None if ref_shape is None else int(ref_shape[0])
    if ref_count is not None and ref_batch is None and ref_num:
        ref_count = min(int(ref_num), ref_count)
    for what, count in ((f"the sample batch {sample_batch}", int(shape[0])), (f"the reference {reference_name}",
                                                                             ref_count)):
        if count is not None and count < STATISTICS_MIN:  # before the embedder loads or any sequence is embedded
            raise ValueError(f"a Frechet distance needs at least {STATISTICS_MIN} sequences (a covariance); {what} "
                             f"holds {count}")
    if output and jax.process_index() == 0 and check_output(output):
        log(f"{output} exists: this run's result will replace it")
    embed = load_embedder(embedder)
    start = time.time()
    if ref_kind is None:
        reference = SequenceStats.load(ref_batch)
    elif ref_batch is not None:
        reference = _npz_sequences(ref_batch, batch_size)
    else:
        total = len(ref_source)
        reference = _source_sequences(ref_source, min(int(ref_num), total) if ref_num else total, batch_size)
    result = sequence_fd(embed, _npz_sequences(sample_batch, batch_size), reference, batch_size=batch_size,
                         method=fid_method)
    line = (f"sequence FD {result['fd']:.4f} over {result['num_samples']:,} sequences (reference: "
            f"{result['num_reference']:,}); embedder {embedder} ({result['dim']}-d features)")
    payload = {"kind": "sequence", "fid_method": fid_method, "metrics": result, "description": line,
               "embedder": embedder, "num_samples": result["num_samples"], "num_reference": result["num_reference"],
               "sample_batch": sample_batch, "reference": reference_name, "seconds": round(time.time() - start, 1)}
    log(line)
    if output and jax.process_index() == 0:
        write_json_atomic(output, payload)
        log(f"wrote {output}")
    return payload
