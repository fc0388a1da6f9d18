"""The packaging: pyproject.toml is the one packaging file; the core needs no TensorFlow and no extra;
every dependency has a lower bound and a pinned version in constraints.txt; the wheel carries the
package, its configs and the launch scripts behind console scripts; and the core install alone, in a
fresh venv, trains, logs, samples and evaluates (tools/check_core_install.py, also `make check-core`;
about 2 minutes, and it installs from the package registry)."""

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import tomllib
import zipfile

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from lsync_jax import cli, extras

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
EXTRAS = PROJECT["optional-dependencies"]
SELF = canonicalize_name(PROJECT["name"])
# The module each distribution provides, where the names differ.
DISTRIBUTION = {"tensorflow_datasets": "tensorflow-datasets"}


def requirements(names=("",)) -> list[Requirement]:
    """The core's requirements plus those of the extras `names` ('' is the core), self-references expanded."""
    out, seen, todo = [], set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for line in PROJECT["dependencies"] if name == "" else EXTRAS[name]:
            req = Requirement(line)
            if canonicalize_name(req.name) == SELF:
                todo.extend(req.extras)
            else:
                out.append(req)
    return out


def constraints() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_one_packaging_file():
    assert not (ROOT / "setup.py").exists() and not (ROOT / "setup.cfg").exists()
    assert PROJECT["requires-python"] == ">=3.11"  # jax.shard_map; JAX 0.10.2 needs 3.11


def test_the_core_needs_no_tensorflow_and_no_extra():
    core = {canonicalize_name(r.name) for r in requirements()}
    narrow = {"tensorflow", "tensorflow-cpu", "clu", "tensorflow-datasets", "diffrax", "matplotlib", "torch",
              "torchvision", "diffusers", "transformers", "libtpu"}
    assert not core & narrow, core & narrow
    assert "tensorboard" in core  # the event files


def test_every_dependency_has_a_lower_bound():
    for extra in ["", *EXTRAS]:
        for req in requirements((extra,)):
            bounds = [s for s in req.specifier if s.operator in (">=", "==", "~=")]
            assert bounds, f"[{extra or 'core'}] {req} has no lower bound"


def test_constraints_pin_every_tested_dependency_within_its_bounds():
    pins = constraints()
    assert SELF not in pins
    tested = requirements(("test",))
    for req in tested:
        if req.marker is not None and not req.marker.evaluate({"extra": "test"}):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is not in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req} excludes the pinned {pins[name]}"
    # what the suite needs no more: the torchvision build that did not match the CPU torch, TensorFlow
    assert not {"torchvision", "tensorflow", "tensorflow-cpu", "pytorch-fid"} & set(pins)
    assert str(pins["torch"]) == "2.13.0"


def test_extras_are_declared_for_what_needs_them():
    for module, extra in extras.EXTRAS.items():
        assert extra in EXTRAS, f"lsync_jax.extras names [{extra}], which pyproject.toml does not declare"
        names = {canonicalize_name(r.name) for r in requirements((extra,))}
        assert canonicalize_name(DISTRIBUTION.get(module, module)) in names, (module, extra)
    assert {"tfds", "torch", "parity", "plots", "adaptive", "tpu-compile", "tpu", "cuda"} <= set(EXTRAS)


def test_accelerator_extras_are_jaxs_own():
    assert [str(Requirement(r)) for r in EXTRAS["tpu"]] == ["jax[tpu]>=0.10.2"]
    assert [str(Requirement(r)) for r in EXTRAS["cuda"]] == ["jax[cuda13]>=0.10.2"]
    (libtpu,) = [Requirement(r) for r in EXTRAS["tpu-compile"]]
    assert libtpu.name == "libtpu" and str(libtpu.specifier) == "==0.0.42.*"  # what jax 0.10.2's [tpu] pins
    assert libtpu.marker == Marker("sys_platform == 'linux' and platform_machine == 'x86_64'")
    test = {canonicalize_name(r.name): r for r in requirements(("test",))}
    assert test["libtpu"].marker == libtpu.marker


def test_packages_listed_are_the_source_tree():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "lsync_jax").rglob("__init__.py")}
    assert listed == found | {"lsync_jax_launch"}
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"lsync_jax_launch": "launch"}


def test_console_scripts_run_the_launch_scripts():
    scripts = PROJECT["scripts"]
    assert sorted(scripts) == sorted("lsync-" + name.replace("_", "-") for name in cli.SCRIPTS)
    for command, target in scripts.items():
        module, _, function = target.partition(":")
        assert module == "lsync_jax.cli" and command == "lsync-" + function.replace("_", "-")
        assert callable(getattr(cli, function))
    assert sorted(cli.SCRIPTS) == sorted(p.stem for p in (ROOT / "launch").glob("*.py"))


def test_installs_take_the_constraints_and_ci_runs_the_readme_command():
    makefile = (ROOT / "Makefile").read_text()
    assert "CONSTRAINTS := constraints.txt" in makefile and "PIP := pip install -c $(CONSTRAINTS)" in makefile
    installs = [line.strip() for line in makefile.splitlines() if "pip install" in line or "$(PIP)" in line]
    assert installs and all("$(PIP)" in line or "-c $(CONSTRAINTS)" in line for line in installs), installs
    assert re.search(r"^\s*make test\s*$", (ROOT / ".ci" / "run").read_text(), re.M)
    assert "make test" in (ROOT / "README.md").read_text()


@pytest.mark.slow
def test_the_wheel_carries_the_package_configs_and_launch_scripts(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("lsync_jax-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(info).decode()
        entry_points = archive.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert {"lsync_jax/cli.py", "lsync_jax/train/writers.py", "lsync_jax/configs/tiny.py",
            "lsync_jax_launch/train.py", "lsync_jax_launch/evaluate.py"} <= names
    assert not any(n.startswith(("tests/", "docs/", "notebooks/")) for n in names)
    assert "lsync-train = lsync_jax.cli:train" in entry_points
    core = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert core and not any(re.search(r"tensorflow|\bclu\b|torch", line) for line in core), core
    assert "Requires-Python: >=3.11" in metadata


# Trains, samples and reads the events back with TensorFlow and clu unimportable, as in the core install.
WITHOUT_TENSORFLOW = textwrap.dedent(
    """
    import json, os, sys
    class _Blocked:  # TensorFlow and clu as if not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "clu"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
    sys.meta_path.insert(0, _Blocked())
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util
    from lsync_jax.configs import tiny
    from lsync_jax.eval.sampling import sample_from_workdir
    from lsync_jax.recipes import train_and_evaluate

    workdir = sys.argv[1]
    config = tiny.get_config()
    config.train.update(dict(num_steps=2, log_every=1, checkpoint_every=2, num_grid_samples=4,
                             async_checkpoints=False))
    config.sampler.num_steps = 2
    train_and_evaluate(config, workdir)
    out = sample_from_workdir(config, workdir, os.path.join(workdir, "samples"), 4, 4, 0)
    acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
    acc.Reload()
    print(json.dumps({"loss_steps": [e.step for e in acc.Tensors("loss")],
                      "grids": len(acc.Tensors("samples_ema")), "npz": os.path.basename(out["npz"]),
                      "imported": sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "clu")
                                         and sys.modules[m] is not None)}))
    """
)


@pytest.mark.slow
def test_trains_samples_and_logs_without_tensorflow(tmp_path):
    out = subprocess.run([sys.executable, "-c", WITHOUT_TENSORFLOW, str(tmp_path / "run")], capture_output=True,
                         text=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["loss_steps"] == [1, 2] and result["grids"] == 1 and result["imported"] == []
    assert result["npz"].endswith(".npz")


@pytest.mark.slow
def test_the_core_install_alone_trains_logs_samples_and_evaluates(tmp_path):
    """The wheel in a fresh venv without extras (and the FID Inception weights as make demo installs them)."""
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "check_core_install.py"), "--keep", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "core install check passed" in out.stdout
    assert "'tensorflow': False, 'tensorflow_imported': False" in out.stdout
