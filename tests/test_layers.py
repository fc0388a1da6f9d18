"""The package's layers import one way, and nothing imports lsync_jax inside a function.

Read from the source (module- and function-level imports alike), so a cycle hidden in a function
body counts. The order, lowest first; a part may import its own layer's modules and any lower
layer, never a higher one or a sibling in the same layer (eval and train never import each other).
"""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lsync_jax"

LAYERS = [
    {"storage", "extras"},  # paths and files anywhere (local, gs://); optional dependencies: every layer may use them
    {"host"},  # shared host helpers (processes, console, images): every layer may use them
    {"models", "transport", "data", "sharding"},  # base: networks, interpolants and samplers, data, the mesh
    {"objectives", "porting"},  # pure losses; weights from PyTorch / diffusers / TorchScript
    {"configs"},  # every default once, the schema
    {"builders"},  # config -> pieces
    {"workdir"},  # reading a run's checkpoints
    {"train", "eval"},  # the engine; evaluation (independent of each other)
    {"recipes"},  # multi-phase runs on the engine
    {"tools"},  # programs over the library
    {"cli"},  # how launch scripts run: run(main), the console scripts
]
LEVEL = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def _imports():
    """(importing part, imported part, 'file:line', at module level?) for every lsync_jax import."""
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        src = parts[1] if len(parts) > 1 else None
        tree = ast.parse(path.read_text())
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{rel}:{node.lineno}: relative import; import lsync_jax.<part> by name")
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                bits = name.split(".")
                if bits[0] == "lsync_jax" and len(bits) > 1 and src is not None:
                    yield src, bits[1], f"{rel}.py:{node.lineno}", id(node) in top_level


def test_every_part_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert parts == set(LEVEL), f"without a layer: {parts - set(LEVEL)}; layers without a part: {set(LEVEL) - parts}"


def test_imports_point_down():
    wrong = [f"{where}: {src} (layer {LEVEL[src]}) imports {dst} (layer {LEVEL[dst]})"
             for src, dst, where, _ in _imports() if src != dst and not LEVEL[dst] < LEVEL[src]]
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_function_level_imports_of_the_package():
    """Function-level imports are for optional heavy dependencies (torch, matplotlib, TensorFlow) only."""
    hidden = [where for _, _, where, top in _imports() if not top]
    assert not hidden, "lsync_jax imported inside a function (hides cycles):\n" + "\n".join(hidden)


def test_no_model_code_reads_the_host_backend():
    """A program compiled for a TPU on a CPU host must be traced on the TPU path: the layout and the
    attention implementation are model fields that the builders resolve from the mesh's devices."""
    readers = [f"{path.relative_to(ROOT)}:{n}" for path in sorted((PACKAGE / "models").rglob("*.py"))
               for n, line in enumerate(path.read_text().splitlines(), 1) if "default_backend" in line]
    assert not readers, "model code reads jax.default_backend():\n" + "\n".join(readers)


def test_run_records_are_data_not_reprs():
    """What a resume compares is recorded as structured fields (lsync_jax.workdir), never as repr()
    strings, which a renamed field or a changed default would break."""
    writers = ["workdir.py", "train/checkpoint.py", "train/setup.py", *(f"recipes/{p.name}" for p in
                                                                      (PACKAGE / "recipes").glob("*.py"))]
    found = [f"{name}:{n}" for name in writers
             for n, line in enumerate((PACKAGE / name).read_text().splitlines(), 1) if "repr(" in line]
    assert not found, "repr() in the code that writes or compares run records:\n" + "\n".join(found)


def test_backbones_are_told_apart_by_their_declared_kind():
    """`models.Backbone` declares `kind`; nothing guesses it with getattr and a default."""
    from lsync_jax.models import Backbone, get_model

    found = [f"{path.relative_to(ROOT)}:{n}" for path in sorted(PACKAGE.rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if 'getattr(model, "kind"' in line
             or '"kind", "image")' in line]
    assert not found, "a backbone's kind guessed:\n" + "\n".join(found)
    for name in ("SiT-S/2", "SiT-Seq-S/2", "SiT-Video-S/2x4", "UViT-S/2"):
        model = get_model(name)
        assert isinstance(model, Backbone) and model.kind in ("image", "video", "sequence"), name


def test_loading_a_config_pulls_in_no_training_machinery():
    code = ("import sys; from lsync_jax.configs import imagenet256, fashion_mnist_repa; imagenet256.get_config(); "
            "print(sorted(m for m in ('orbax', 'grain', 'optax', 'tensorflow', 'clu') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), check=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("script", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "launch").glob("*.py")))
def test_launch_scripts_edit_no_sys_path(script):
    assert "sys.path" not in (ROOT / script).read_text()


def _counting(code, run):
    """How many times the function with `code` is entered while `run()` runs."""
    calls = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code is code:
            calls.append(1)

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return len(calls)


def test_a_config_is_validated_once_per_start(tmp_path, monkeypatch):
    """A start (launch/train.py, and its --check) validates the config once, where the recipes take it
    (`recipes.phases_of`); what runs after (the phases' checks, setup) is told so, not checked again."""
    from lsync_jax import builders, recipes
    from lsync_jax.configs import tiny
    from lsync_jax.train import loop
    from tests.helpers import quick

    code = builders.validate_config.__code__
    config = quick(tiny.get_config())
    assert _counting(code, lambda: recipes.check_run(config, str(tmp_path / "checked"))) == 1

    def no_steps(run, hooks):  # the start is what is counted: setup, not the compiled steps
        for hook in [*hooks, run.metrics]:
            hook.close()
        return {}

    monkeypatch.setattr(loop, "train_loop", no_steps)
    assert _counting(code, lambda: recipes.train_and_evaluate(config, str(tmp_path / "run"))) == 1
