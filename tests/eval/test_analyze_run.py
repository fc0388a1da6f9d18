"""Block analysis of a run's checkpoints: every file launch/analyze.py promises, numbers that match a
direct measurement, TensorBoard events, the CLI end to end, and missing steps named."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lsync_jax.configs import tiny
from lsync_jax.eval.analysis import MeasureSettings, analyze_workdir, measure_model
from lsync_jax.recipes import train_and_evaluate
from lsync_jax.sharding import make_mesh
from lsync_jax.workdir import load_params

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETTINGS = MeasureSettings(num_samples=40, t_values=(0.5, 0.9), batch_size=16, k=5)


def fashion_tiny():
    config = tiny.get_config()
    config.data.update(dict(name="fashion_mnist", dir="", split="train"))
    config.train.update(dict(num_steps=4, checkpoint_every=2, log_every=2, async_checkpoints=False,
                             num_grid_samples=0))
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    train_and_evaluate(fashion_tiny(), workdir)
    return workdir


def test_analyze_workdir_writes_figures_json_and_events(run, tmp_path):
    from lsync_jax.train import writers

    out = str(tmp_path / "analysis")
    writer = writers.create_default_writer(out)
    results = analyze_workdir(fashion_tiny(), run, out, SETTINGS, encoder_path="random:tiny", writer=writer)
    assert sorted(results["steps"]) == ["2", "4"] and "RANDOMLY" in results["reference"]
    names = set(os.listdir(out))
    assert {"analysis.json", "probe_by_step.png", "alignment_by_step.png", "step_2", "step_4"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    assert sorted(os.listdir(os.path.join(out, "step_4"))) == ["cka_linear_t0p5.png", "cka_linear_t0p9.png",
                                                                "probe.png"]
    with open(os.path.join(out, "analysis.json")) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(results))
    entry = saved["steps"]["4"]["per_t"][1]
    assert len(entry["cka_linear"]) == 4 and len(entry["cknna"]) == 4 and len(entry["mutual_knn"]) == 4
    # the numbers are those of a direct measurement of the EMA weights of step 4
    model, ema, _ = load_params(fashion_tiny(), run, make_mesh(-1, 1), step=4)
    direct = measure_model(fashion_tiny(), model, ema, SETTINGS)
    np.testing.assert_allclose(saved["steps"]["4"]["probe_accuracy_mean"], direct["probe_accuracy_mean"])
    np.testing.assert_allclose(entry["cka_unbiased"], direct["per_t"][1]["cka_unbiased"], rtol=1e-5)
    with pytest.raises(FileNotFoundError, match=r"step\(s\) \[3\]"):
        analyze_workdir(fashion_tiny(), run, out, SETTINGS, steps=[3])


def test_analyze_cli(run, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, os.path.join(ROOT, "launch", "analyze.py"), "--config=" + os.path.join(ROOT, "configs",
                                                                                                 "tiny.py"),
           "--config.data.name=fashion_mnist", f"--workdir={run}", f"--out_dir={out}", "--steps=4",
           "--num_samples=30", "--t=0.5", "--params=params"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 4: probe accuracy per block" in done.stdout
    with open(out / "analysis.json") as f:
        saved = json.load(f)
    assert list(saved["steps"]) == ["4"] and saved["params"] == "params" and saved["reference"] is None
    assert os.path.exists(out / "step_4" / "cka_linear_t0p5.png")
