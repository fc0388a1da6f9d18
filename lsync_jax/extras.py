"""Optional dependencies: a module that only one narrow path needs comes from a pip extra, and a missing
one is named with the command that adds it (never a bare ImportError).

    tfds = require("tensorflow_datasets", "tfds", "reading a tfds dataset")

The extras themselves are declared in pyproject.toml; `EXTRAS` says which extra brings which module
(tests/test_packaging.py checks the two agree).
"""

from __future__ import annotations

import importlib
from types import ModuleType

PACKAGE = "lsync-jax"

# module imported -> the extra that brings it
EXTRAS: dict[str, str] = {
    "tensorflow_datasets": "tfds",
    "torch": "torch",
    "diffusers": "parity",
    "transformers": "parity",
    "matplotlib": "plots",
    "diffrax": "adaptive",
    "libtpu": "tpu-compile",
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the pip extra that brings it."""


def install_hint(extra: str) -> str:
    return f"pip install '{PACKAGE}[{extra}]'"


def require(module: str, extra: str | None = None, what: str = "") -> ModuleType:
    """`importlib.import_module(module)`, or a MissingExtraError naming `extra` (default: EXTRAS[module])
    and what needed it. Only a missing module is turned into that error: one that is installed but fails
    to import keeps its own error."""
    extra = extra or EXTRAS[module]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.split(".")[0]
        if e.name is None or e.name.split(".")[0] != top:
            raise  # the module is there; something it imports is broken
        need = f"{what} needs {top}" if what else f"{top} is not installed"
        raise MissingExtraError(f"{need}, from the [{extra}] extra: {install_hint(extra)} "
                                f"(or pip install -e '.[{extra}]' in a checkout)", name=top) from None
