"""The quickstart notebook's code cells run, in order, as a script (no Jupyter needed)."""

import json
import pathlib

import pytest

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_quickstart_notebook_runs(monkeypatch):
    notebook = json.loads((ROOT / "notebooks" / "quickstart.ipynb").read_text())
    cells = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    assert len(cells) >= 5
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("LSYNC_QUICK", "1")  # the demo cells train the tiny config
    namespace: dict = {"__name__": "__main__"}
    for i, source in enumerate(cells):
        # drop IPython magics and shell escapes (e.g. a commented Colab install line is kept as is)
        lines = [l for l in source.splitlines() if not l.lstrip().startswith(("%", "!"))]
        exec(compile("\n".join(lines), f"quickstart cell {i}", "exec"), namespace)
    assert namespace["plain"].shape == namespace["guided"].shape == (10, 28, 28, 1)
    # the short training run learns: the final batch loss is below the loss at initialisation
    assert float(namespace["metrics"]["loss"]) < float(namespace["loss"])
    # the training-system demo cells: a real run with checkpoints and a sample grid
    workdir = pathlib.Path(namespace["workdir"])
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "6"]
    assert namespace["grids"] == ["step_0000006.png"] and "loss/layersync" in namespace["final"]
