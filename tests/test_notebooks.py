"""The quickstart notebook's code cells run, in order, as a script (no Jupyter needed)."""

import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_quickstart_notebook_runs(monkeypatch):
    notebook = json.loads((ROOT / "notebooks" / "quickstart.ipynb").read_text())
    cells = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    assert len(cells) >= 5
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": "__main__"}
    for i, source in enumerate(cells):
        # drop IPython magics and shell escapes (e.g. a commented Colab install line is kept as is)
        lines = [l for l in source.splitlines() if not l.lstrip().startswith(("%", "!"))]
        exec(compile("\n".join(lines), f"quickstart cell {i}", "exec"), namespace)
    assert namespace["plain"].shape == namespace["guided"].shape == (10, 28, 28, 1)
    # the short training run learns: the final batch loss is below the loss at initialisation
    assert float(namespace["metrics"]["loss"]) < float(namespace["loss"])
