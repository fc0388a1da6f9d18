"""How a launch script runs: `run(main)` in place of `app.run(main)`, and the console scripts.

    if __name__ == "__main__":
        run(main)

`run` does what every launch script needs once per process and the library never does (importing and
calling lsync_jax changes no process-wide setting; docs/training.md, "Storage"): the storage
variables (`storage.configure_process`: epath through gcsfs, the emulator for every client), the
restart with glibc tuned for XLA on CPU (`host.restart_with_host_tunables`, before JAX starts), the
console's logging filter (`host.quiet_library_logs`), the filters that keep a failed save's error the
last line printed (`train.checkpoint.quiet_failed_saves`), absl's flag parsing
(`configs.cli.parse_flags`). It also shapes what a user sees on a mistake:

- a user error prints its message alone (`Type: message` as the last line, no traceback) and exits 1.
  A user error is an exception the library raises on purpose about a config, data, path, weights or
  input: one whose type is defined in lsync_jax (StorageError, DamagedCheckpointError,
  MissingExtraError, ...) or is a ValueError, OSError (FileNotFoundError, ...) or ImportError, raised
  by a `raise` statement in lsync_jax or in the launch script itself (not by a library it calls, a
  builtin such as open(), or JAX's tracing);
- any other error keeps its traceback (a bug, here or in a library);
- `--traceback` or LSYNC_JAX_TRACEBACK=1 shows the traceback of every error.

The console scripts (`lsync-train`, `lsync-sample`, ...; pyproject.toml's [project.scripts]) run the
launch scripts, which the wheel carries as the `lsync_jax_launch` package.
"""

from __future__ import annotations

import importlib
import linecache
import os
import sys
import types
from typing import Any, Callable

from absl import app, flags

from lsync_jax.configs.cli import parse_flags
from lsync_jax.host import quiet_library_logs, restart_with_host_tunables
from lsync_jax.storage import configure_process
from lsync_jax.train.checkpoint import quiet_failed_saves

TRACEBACK_ENV = "LSYNC_JAX_TRACEBACK"
flags.DEFINE_bool("traceback", False, f"Show the traceback of every error, user errors too (or set {TRACEBACK_ENV}=1).")

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
USER_ERROR_TYPES = (ValueError, OSError, ImportError)
_JAX_FILTERED = "JAX has removed its internal frames"


def _raised_by(error: BaseException) -> tuple[str, str]:
    """(file, source line) of the traceback's innermost frame: a `raise` statement where the code raised
    the error itself, a call where a builtin or C extension (numpy, open) raised it."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return "", ""
    filename = tb.tb_frame.f_code.co_filename
    return os.path.abspath(filename), linecache.getline(filename, tb.tb_lineno).strip()


def is_user_error(error: BaseException, own_dirs: tuple[str, ...] = (PACKAGE_DIR,)) -> bool:
    """Whether `error` is a user error (module docstring): shown as its message alone."""
    ours = type(error).__module__.split(".")[0] == "lsync_jax"
    if not (ours or isinstance(error, USER_ERROR_TYPES)):
        return False
    if any(_JAX_FILTERED in note for note in getattr(error, "__notes__", ())):
        return False  # raised inside JAX (its frames filtered out): a bug until shown otherwise
    where, line = _raised_by(error)
    return line.startswith("raise ") and any(where.startswith(d.rstrip(os.sep) + os.sep) for d in own_dirs)


def show_tracebacks() -> bool:
    from_flag = flags.FLAGS.is_parsed() and flags.FLAGS["traceback"].value
    return bool(from_flag) or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def _program() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "lsync-jax"


def run(main: Callable[[list[str]], Any], flags_parser: Callable[[list[str]], Any] = parse_flags) -> None:
    """Run a launch script's absl `main` (module docstring); never returns."""
    configure_process()  # before gcsfs is imported, and inherited by the restart below
    restart_with_host_tunables()  # before JAX starts: glibc tuned for XLA on CPU (lsync_jax.host)
    script = getattr(sys.modules.get(main.__module__), "__file__", None)
    own_dirs = (PACKAGE_DIR,) + ((os.path.dirname(os.path.abspath(script)),) if script else ())

    def main_with_settings(argv: list[str]) -> Any:
        quiet_library_logs()
        quiet_failed_saves()
        return main(argv)

    try:
        app.run(main_with_settings, flags_parser=flags_parser)
    except Exception as error:  # noqa: BLE001 - every error is shown; only its form differs
        if show_tracebacks() or not is_user_error(error, own_dirs):
            raise
        sys.stderr.write(f"{_program()} stopped on an error in its input (--traceback or {TRACEBACK_ENV}=1 shows "
                         f"the traceback):\n{type(error).__name__}: {error}\n")
        sys.exit(1)


# -- console scripts: pyproject.toml's [project.scripts] ------------------------------------------------
SCRIPTS = ("analyze", "benchmark", "convert_checkpoint", "convert_inception", "evaluate", "fit_plan",
           "make_reference", "mup_coord_check", "pod_trials", "preprocess", "preprocess_sequences", "reproduce",
           "sample", "train")


def run_script(name: str) -> None:
    """Run launch/NAME.py (installed as lsync_jax_launch.NAME) as `python launch/NAME.py` would."""
    module: types.ModuleType = importlib.import_module(f"lsync_jax_launch.{name}")
    run(module.main)


def _entry(name: str) -> Callable[[], None]:
    def entry() -> None:
        run_script(name)

    entry.__name__ = name
    entry.__doc__ = f"The `lsync-{name.replace('_', '-')}` command: launch/{name}.py."
    return entry


for _name in SCRIPTS:
    globals()[_name] = _entry(_name)
del _name
