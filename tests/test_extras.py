"""A missing optional dependency is named with the pip extra that brings it."""

import sys

import pytest

from lsync_jax import extras


def test_require_returns_the_module():
    assert extras.require("json", "none") is sys.modules["json"]


def test_missing_module_names_the_extra():
    with pytest.raises(extras.MissingExtraError, match=r"the adaptive ODE sampler needs no_such_module_xyz, from the "
                       r"\[adaptive\] extra: pip install 'lsync-jax\[adaptive\]'"):
        extras.require("no_such_module_xyz", "adaptive", what="the adaptive ODE sampler")


def test_a_broken_installed_module_keeps_its_own_error(tmp_path, monkeypatch):
    (tmp_path / "broken_pkg_xyz.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz") as info:
        extras.require("broken_pkg_xyz", "plots")
    assert not isinstance(info.value, extras.MissingExtraError)


@pytest.mark.parametrize("module, call", [
    ("tensorflow_datasets", lambda: __import__("lsync_jax.data.sources", fromlist=["x"]).TfdsSource("mnist")),
    ("matplotlib", lambda: __import__("lsync_jax.eval.analysis", fromlist=["x"])._pyplot()),
])
def test_optional_paths_name_their_extra(monkeypatch, module, call):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(extras.MissingExtraError, match=rf"\[{extras.EXTRAS[module]}\] extra"):
        call()


def test_adaptive_sampler_names_its_extra(monkeypatch):
    from lsync_jax.transport import samplers

    monkeypatch.setitem(sys.modules, "diffrax", None)
    with pytest.raises(extras.MissingExtraError, match=r"pip install 'lsync-jax\[adaptive\]'"):
        samplers.adaptive_ode_sample(None, None, None)
