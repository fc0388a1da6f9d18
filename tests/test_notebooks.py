"""The notebooks' code cells run, in order, as a script (no Jupyter needed)."""

import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parent.parent


def code_cells(name: str, skip_tag: str = "") -> list[str]:
    """The notebook's code cells as script text: IPython magics and shell escapes (`%`, `!` lines) dropped,
    cells tagged `skip_tag` left out."""
    notebook = json.loads((ROOT / "notebooks" / name).read_text())
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    return ["\n".join(line for line in "".join(c["source"]).splitlines() if not line.lstrip().startswith(("%", "!")))
            for c in cells if not (skip_tag and skip_tag in c["metadata"].get("tags", ()))]


def test_quickstart_notebook_runs(monkeypatch):
    cells = code_cells("quickstart.ipynb", skip_tag="install")  # the package is installed here already
    assert len(cells) >= 5
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("LSYNC_QUICK", "1")  # the demo cells train the tiny config
    namespace: dict = {"__name__": "__main__"}
    for i, source in enumerate(cells):
        exec(compile(source, f"quickstart cell {i}", "exec"), namespace)
    assert namespace["plain"].shape == namespace["guided"].shape == (10, 28, 28, 1)
    # the short training run learns: the final batch loss is below the loss at initialisation
    assert float(namespace["metrics"]["loss"]) < float(namespace["loss"])
    # the training-system demo cells: a real run with checkpoints and a sample grid
    workdir = pathlib.Path(namespace["workdir"])
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "6"]
    assert namespace["grids"] == ["step_0000006.png"] and "loss/layersync" in namespace["final"]


# Runs the TPU notebook's cells (from stdin) in a fresh process, where XLA's host-device count can
# still be set, and reports what they found and built.
TPU_RUNNER = textwrap.dedent(
    """
    import json, sys
    import jax

    namespace = {"__name__": "__main__"}
    for i, source in enumerate(json.load(sys.stdin)):
        exec(compile(source, f"tpu cell {i}", "exec"), namespace)
    print(json.dumps({"device_count": jax.device_count(), "num_devices": namespace["num_devices"],
                      "mesh": dict(namespace["mesh"].shape), "batch_size": namespace["config"].data.batch_size,
                      "workdir": namespace["WORKDIR"], "grid_sizes": namespace["grid_sizes"],
                      "loss": namespace["final"]["loss"]}))
    """
)


def test_tpu_notebook_runs(tmp_path):
    notebook = json.loads((ROOT / "notebooks" / "tpu.ipynb").read_text())
    first = next(c for c in notebook["cells"] if c["cell_type"] == "code")
    # The install cell comes first and only it is skipped here (test_install_cells_install_what_they_name runs it).
    assert "install" in first["metadata"].get("tags", ())
    cells = code_cells("tpu.ipynb", skip_tag="install")
    assert len(cells) == sum(c["cell_type"] == "code" for c in notebook["cells"]) - 1
    workdir = tmp_path / "run"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               LSYNC_QUICK="1", LSYNC_WORKDIR=str(workdir), MPLBACKEND="Agg")
    out = subprocess.run([sys.executable, "-c", TPU_RUNNER], input=json.dumps(cells), env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # it trained over every local device: the run's mesh spans both host devices, the batch splits over them
    assert result["device_count"] == result["num_devices"] == 2
    assert result["mesh"] == {"data": 2, "fsdp": 1} and result["batch_size"] % 2 == 0
    assert result["workdir"] == str(workdir) and math.isfinite(result["loss"])
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "6"]
    assert sorted(p.name for p in (workdir / "samples").glob("step_*.png")) == ["step_0000006.png"]
    assert list(result["grid_sizes"]) == ["step_0000006.png"]  # the notebook found and opened the grid it wrote


def install_cell(name: str) -> str:
    notebook = json.loads((ROOT / "notebooks" / name).read_text())
    (cell,) = [c for c in notebook["cells"] if "install" in c["metadata"].get("tags", ())]
    return "".join(cell["source"])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, timeout=600)
    return str(next(out.glob("lsync_jax-*.whl")))


@pytest.mark.parametrize("notebook, extra", [("tpu.ipynb", "tpu"), ("quickstart.ipynb", "plots")])
@pytest.mark.parametrize("source", ["checkout", "wheel"])
def test_install_cells_install_what_they_name(tmp_path, wheel, notebook, extra, source):
    """Each notebook's install cell, run as it stands, installs lsync-jax with its extra from the checkout or the
    wheel it is given (pip resolves everything; --dry-run leaves this venv as it is). An index cannot be tried
    here: none serves lsync-jax."""
    report = tmp_path / "report.json"
    env = dict(os.environ, LSYNC_JAX_SOURCE=str(ROOT) if source == "checkout" else wheel,
               LSYNC_JAX_PIP_ARGS=f"--dry-run --no-build-isolation --report {report}")
    out = subprocess.run([sys.executable, "-c", install_cell(notebook)], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"[{extra}]" in out.stdout and "does not provide the extra" not in out.stderr
    (item,) = [i for i in json.loads(report.read_text())["install"] if i["metadata"]["name"] == "lsync-jax"]
    assert item["requested_extras"] == [extra] and extra in item["metadata"]["provides_extra"]
