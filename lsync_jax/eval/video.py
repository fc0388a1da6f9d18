"""Video evaluation: sample strips, per-frame FID and two temporal scores.

Clips are host uint8 arrays (N, F, H, W, C), C = 1 or 3, as a video model's samples come out of
`to_uint8`. What is measured, and what is not:

- **Per-frame FID** treats every frame of every clip as one image and runs the image evaluator
  (`InceptionEvaluator.statistics`, `compute_metrics`) on them: FID, sFID and precision/recall over
  frames. It scores how real single frames look and says nothing about motion: a generator that
  shuffles real frames in time scores as well as real video. The number of frames and clips is
  part of the result, since FID over few frames is biased upwards.
- **Temporal consistency**: the mean cosine similarity of the Inception pool features of
  consecutive frames of a clip. 1 means frames do not change in content; unrelated frames still
  score well above 0 (pool features are non-negative), so it is read only next to the same number
  for the reference clips.
- **Motion**: the mean absolute difference of consecutive frames' pixels, as a fraction of 255,
  and its ratio to the reference's: below 1 the samples move less than real data (a frozen clip
  is 0 and is perfectly "consistent"), above 1 they flicker.

None of these is FVD (Unterthiner et al. 2018), which compares I3D features of whole clips: the
I3D weights cannot be loaded here, so no FVD is reported and these numbers are not comparable
with published FVDs.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from lsync_jax import storage
from lsync_jax.eval.evaluator import FeatureStats, InceptionEvaluator, compute_metrics
from lsync_jax.host import make_grid

Clips = np.ndarray | Iterable[np.ndarray]
_KNN_ROWS = 4  # precision/recall's k-NN radii (k = 3) need 4 kept frames a side
_EXTRA_KEYS = ("num_clips", "frames_per_clip", "temporal_consistency", "temporal_clips", "motion")


def check_clips(clips: Any, what: str = "clips") -> np.ndarray:
    """`clips` as uint8 (N, F, H, W, C) with C = 1 or 3; anything else is an error naming its shape."""
    clips = np.asarray(clips)
    if clips.ndim != 5 or clips.shape[-1] not in (1, 3) or min(clips.shape[:4]) < 1:
        raise ValueError(f"{what} must be video clips (N, F, H, W, C) with 1 or 3 channels, got shape {clips.shape}")
    if clips.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 (to_uint8 of samples in [-1, 1]), got {clips.dtype}")
    return clips


def video_grid(clips: np.ndarray, pad: int = 2) -> np.ndarray:
    """uint8 (N, F, H, W, C) -> one uint8 picture, one clip per row with its frames left to right
    (`make_grid` with F columns), for `save_png` and TensorBoard's `write_images`."""
    clips = check_clips(clips)
    n, f, h, w, c = clips.shape
    return make_grid(clips.reshape(n * f, h, w, c), columns=f, pad=pad)


@dataclasses.dataclass
class ClipStatistics:
    """What the video scores need of one set of clips: the Inception statistics of all its frames
    (pool features kept for the first `temporal_clips` clips) and the two temporal numbers."""

    frames: FeatureStats
    num_clips: int
    frames_per_clip: int
    temporal_consistency: float | None  # None for single-frame clips or temporal_clips=0
    temporal_clips: int
    motion: float | None  # None for single-frame clips

    @property
    def num_frames(self) -> int:
        return self.frames.count

    def save(self, path: str) -> None:
        """The frames' statistics in `FeatureStats.save`'s layout (so `FeatureStats.load` reads them
        as image statistics) plus the clip numbers; atomic."""
        arrays = dict(mu=self.frames.mu, sigma=self.frames.sigma, mu_s=self.frames.mu_s, sigma_s=self.frames.sigma_s,
                      count=np.int64(self.frames.count), num_clips=np.int64(self.num_clips),
                      frames_per_clip=np.int64(self.frames_per_clip), temporal_clips=np.int64(self.temporal_clips),
                      temporal_consistency=np.float64(np.nan if self.temporal_consistency is None
                                                      else self.temporal_consistency),
                      motion=np.float64(np.nan if self.motion is None else self.motion))
        for key in ("pool", "probs"):
            if getattr(self.frames, key) is not None:
                arrays[key] = getattr(self.frames, key)
        storage.save_npz_atomic(path, **arrays)

    @classmethod
    def load(cls, path: str) -> "ClipStatistics":
        """Statistics written by `save`; a file without the clip numbers is a ValueError naming it."""
        frames = FeatureStats.load(path)
        extra = storage.load_npz(path)
        missing = [k for k in _EXTRA_KEYS if k not in extra]
        if missing:
            raise ValueError(f"{path} holds no {', '.join(missing)}: frame statistics, not clip statistics "
                             "(FeatureStats.load reads them)")

        def number(key: str) -> float | None:
            value = float(extra[key])
            return None if np.isnan(value) else value

        return cls(frames=frames, num_clips=int(extra["num_clips"]), frames_per_clip=int(extra["frames_per_clip"]),
                   temporal_consistency=number("temporal_consistency"), temporal_clips=int(extra["temporal_clips"]),
                   motion=number("motion"))


def temporal_consistency(pool: np.ndarray) -> float:
    """Mean cosine similarity of consecutive frames' features, pool (N, F >= 2, D), in float64."""
    pool = np.asarray(pool, np.float64)
    if pool.ndim != 3 or pool.shape[1] < 2 or pool.shape[0] < 1:
        raise ValueError(f"temporal_consistency needs features (N, F >= 2, D), got shape {pool.shape}")
    unit = pool / np.maximum(np.linalg.norm(pool, axis=-1, keepdims=True), 1e-12)
    return float(np.mean(np.sum(unit[:, 1:] * unit[:, :-1], axis=-1)))


def _motion_sums(clips: np.ndarray) -> tuple[float, int]:
    """(sum of |x[t+1] - x[t]| / 255 over every pixel and frame pair, number of terms)."""
    diff = np.abs(np.diff(clips.astype(np.int16), axis=1))
    return float(diff.sum(dtype=np.float64)) / 255.0, diff.size


def motion(clips: np.ndarray) -> float:
    """Mean absolute difference of consecutive frames, as a fraction of 255; 0 for frozen clips."""
    clips = check_clips(clips)
    if clips.shape[1] < 2:
        raise ValueError(f"motion needs clips of >= 2 frames, got shape {clips.shape}")
    total, count = _motion_sums(clips)
    return total / count


def _clip_batches(clips: Clips, frames_per_batch: int, what: str) -> Iterator[np.ndarray]:
    """Checked clip batches: an array in slices of about `frames_per_batch` frames (whole clips), or
    the given iterable's batches as they come (a sampler's output, never held at once)."""
    if isinstance(clips, np.ndarray):
        clips = check_clips(clips, what)
        step = max(1, frames_per_batch // clips.shape[1])
        for start in range(0, len(clips), step):
            yield clips[start:start + step]
        return
    for batch in clips:
        yield check_clips(batch, what)


def _rebatch(batches: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Frames in batches of exactly `size` (the last one shorter), in order: the evaluator pads every
    call to its batch size, so a sampler's 16 clips of 8 frames would otherwise cost 256 frames' work."""
    pending: list[np.ndarray] = []
    count = 0
    for batch in batches:
        start = 0
        if count:  # top up the frames left over from earlier batches first
            take = batch[:size - count]
            pending.append(take)
            count += len(take)
            start = len(take)
            if count < size:
                continue
            yield np.concatenate(pending)
            pending, count = [], 0
        while len(batch) - start >= size:
            yield batch[start:start + size]
            start += size
        if start < len(batch):
            pending, count = [batch[start:]], len(batch) - start
    if count:
        yield np.concatenate(pending)


def clip_statistics(evaluator: InceptionEvaluator, clips: Clips, temporal_clips: int | None = None,
                    progress: Callable[[int], None] | None = None, what: str = "clips") -> ClipStatistics:
    """Frame statistics and temporal scores of clips (an array, or an iterable of clip batches of
    one shape), in one Inception pass over all frames.

    The pool features of the first `temporal_clips` clips (None: all, about 8 KiB a frame) are kept:
    the temporal consistency and precision/recall use those. `progress` gets the frames done so far.
    """
    batches = _clip_batches(clips, evaluator.batch_size, what)
    first = next(batches, None)
    if first is None:
        raise ValueError(f"no {what} to evaluate")
    shape = first.shape[1:]
    frames_per_clip = shape[0]
    keep = None if temporal_clips is None else max(0, int(temporal_clips)) * frames_per_clip
    counts = {"clips": 0, "motion": 0.0, "terms": 0}

    def frames() -> Iterator[np.ndarray]:
        for batch in itertools.chain([first], batches):
            if batch.shape[1:] != shape:
                raise ValueError(f"{what}: batches of clips of shapes {shape} and {batch.shape[1:]}")
            counts["clips"] += len(batch)
            if frames_per_clip > 1:
                total, terms = _motion_sums(batch)
                counts["motion"] += total
                counts["terms"] += terms
            yield batch.reshape(-1, *shape[1:])

    stats = evaluator.statistics(_rebatch(frames(), evaluator.batch_size), keep=keep, progress=progress)
    consistency, used = None, 0
    if frames_per_clip > 1 and stats.pool is not None:
        pool = stats.pool.reshape(-1, frames_per_clip, stats.pool.shape[-1])  # kept frames are whole clips
        consistency, used = temporal_consistency(pool), len(pool)
    return ClipStatistics(frames=stats, num_clips=counts["clips"], frames_per_clip=frames_per_clip,
                          temporal_consistency=consistency, temporal_clips=used,
                          motion=counts["motion"] / counts["terms"] if counts["terms"] else None)


def video_metrics(evaluator: InceptionEvaluator | None, clips: Clips | ClipStatistics,
                  reference: Clips | ClipStatistics | FeatureStats, fid_method: str = "eigh",
                  temporal_clips: int | None = None, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Per-frame FID (and sFID, precision, recall, IS over frames) of generated clips against
    reference clips, with the temporal scores of both, as one JSON-ready dict.

    `clips` is clips (an array or an iterable of clip batches) or their `ClipStatistics`; `reference`
    is clips, their saved `ClipStatistics`, or image statistics (`FeatureStats`, e.g.
    `source_statistics` of an image dataset: its temporal numbers are then None). The evaluator
    runs only for clips given as pixels.
    Keys: frame_fid, frame_sfid, frame_precision, frame_recall, frame_inception_score; num_frames,
    num_clips, frames_per_clip and their reference_* counterparts; temporal_consistency, motion,
    temporal_clips and their reference_* counterparts; motion_ratio (samples / reference).
    """
    if not isinstance(reference, (ClipStatistics, FeatureStats)):
        reference = clip_statistics(evaluator, reference, temporal_clips, what="reference clips")
    sample = clips if isinstance(clips, ClipStatistics) else clip_statistics(evaluator, clips, temporal_clips,
                                                                              progress=progress)
    ref_frames = reference.frames if isinstance(reference, ClipStatistics) else reference
    usable = [stats if stats.pool is None or len(stats.pool) >= _KNN_ROWS else dataclasses.replace(stats, pool=None)
              for stats in (ref_frames, sample.frames)]  # too few kept frames: precision/recall are None
    scores = compute_metrics(*usable, fid_method=fid_method)
    result: dict[str, Any] = {f"frame_{k}": v for k, v in scores.items()}
    result.update(num_frames=sample.num_frames, num_clips=sample.num_clips, frames_per_clip=sample.frames_per_clip,
                  temporal_consistency=sample.temporal_consistency, temporal_clips=sample.temporal_clips,
                  motion=sample.motion, reference_frames=ref_frames.count)
    if isinstance(reference, ClipStatistics):
        result.update(reference_clips=reference.num_clips, reference_frames_per_clip=reference.frames_per_clip,
                      reference_temporal_consistency=reference.temporal_consistency,
                      reference_temporal_clips=reference.temporal_clips, reference_motion=reference.motion)
    else:
        result.update(reference_clips=None, reference_frames_per_clip=None, reference_temporal_consistency=None,
                      reference_temporal_clips=0, reference_motion=None)
    ref_motion = result["reference_motion"]
    result["motion_ratio"] = (sample.motion / ref_motion if sample.motion is not None and ref_motion else None)
    return result


def describe_video_metrics(result: dict[str, Any]) -> str:
    """One line for logs and reports, e.g. 'per-frame FID 23.41 over 1,000 frames from 125 clips
    (reference: 1,000 frames from 125 clips); temporal consistency 0.912 (reference 0.934); motion
    0.85x the reference's'."""

    def frames(n: int, clips: int | None) -> str:
        counted = f"{n:,} frames" if n >= 0 else "frames (number not stored)"  # ADM statistics without a count
        return counted + ("" if clips is None else f" from {clips:,} clips")

    fid = result["frame_fid"]
    text = (f"per-frame FID {fid:.2f} over {frames(result['num_frames'], result['num_clips'])} "
            f"(reference: {frames(result['reference_frames'], result['reference_clips'])})")
    if result["temporal_consistency"] is not None:
        text += f"; temporal consistency {result['temporal_consistency']:.3f}"
        ref = result["reference_temporal_consistency"]
        text += f" (reference {ref:.3f})" if ref is not None else ""
    if result["motion_ratio"] is not None:
        text += f"; motion {result['motion_ratio']:.2f}x the reference's"
    elif result["motion"] is not None:
        text += f"; motion {result['motion']:.4f}"
    return text
