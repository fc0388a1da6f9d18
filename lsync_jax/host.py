"""Host-side helpers shared by training and evaluation: whole arrays on every process, agreement
between processes, distributed start-up, what a CPU run is compiled and started with (compile options,
CPU devices, glibc tunables), the console, sample-grid pictures and progress lines. Files (local or
gs://) are `lsync_jax.storage`."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import math
import os
import pkgutil
import platform
import sys
import time
from typing import Any, Iterable, Iterator, Mapping

import jax
import numpy as np
from absl import logging

from lsync_jax.storage import write_bytes_atomic


def gather_to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process) array as numpy, on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def all_processes(flag: bool) -> bool:
    """True only if `flag` is true on every process (so all take the same branch of a collective)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(bool(flag)))))


def initialize_distributed(dist: Mapping[str, Any]) -> None:
    """jax.distributed.initialize() when config.distributed.enabled (before any other JAX call); once
    per process (a recipe's phases share it). Empty / -1 values are auto-detected (TPU pods, SLURM).
    `cpu_devices` > 0 splits the CPU backend into that many devices first. These are the only JAX
    settings the library updates, each because the config asks for it; the defaults change nothing
    (tests/test_process_hygiene.py)."""
    set_cpu_devices(int(dist.get("cpu_devices", -1)))
    if not dist["enabled"] or jax.distributed.is_initialized():
        return
    if dist["cpu_collectives"]:
        jax.config.update("jax_cpu_collectives_implementation", dist["cpu_collectives"])
    num, pid = dist["num_processes"], dist["process_id"]
    jax.distributed.initialize(coordinator_address=dist["coordinator_address"] or None,
                               num_processes=None if num is None or num < 0 else num,
                               process_id=None if pid is None or pid < 0 else pid)


# XLA options our hot jits (train step, sampler, FID Inception) compile with on CPU. jaxlib 0.10
# hands convolutions and dots to YNNPACK by default; on a 2-core EPYC that ran the Inception pass at
# 3.2-3.9 images/s with a third of its time in page faults, against 8.1-8.3 with YNNPACK off, and the
# train step about 10% slower (docs/benchmarks.md). A setting of the same option in XLA_FLAGS wins.
CPU_COMPILER_OPTIONS: dict[str, str] = {"xla_cpu_experimental_ynn_fusion_type": ""}
_CPU_OPTIONS_OK: dict[str, bool] = {}


def compiler_options(platform: str) -> dict[str, str]:
    """The `jax.jit(compiler_options=...)` for a jit whose devices are on `platform`: on CPU,
    `CPU_COMPILER_OPTIONS` less those the user sets in XLA_FLAGS and those this jaxlib does not know
    (checked once by compiling a scalar function, so a renamed option costs speed, not a crash)."""
    if platform != "cpu":
        return {}
    user = os.environ.get("XLA_FLAGS", "")
    options = {k: v for k, v in CPU_COMPILER_OPTIONS.items() if f"--{k}" not in user}
    for key, value in list(options.items()):
        if key not in _CPU_OPTIONS_OK:
            try:
                jax.jit(lambda x: x + 1, compiler_options={key: value}).lower(np.float32(0)).compile()
                _CPU_OPTIONS_OK[key] = True
            except Exception:  # noqa: BLE001 - an unknown option name raises a backend-specific error
                _CPU_OPTIONS_OK[key] = False
        if not _CPU_OPTIONS_OK[key]:
            del options[key]
    return options


def set_cpu_devices(count: int) -> None:
    """Split the CPU backend into `count` devices (config.distributed.cpu_devices; -1 leaves JAX's).

    Only possible before JAX starts its backends: afterwards (a notebook that already ran JAX, a test)
    a different count is logged as not applied and the run keeps the devices it has. XLA_FLAGS's
    --xla_force_host_platform_device_count, when set, is the user's choice and wins."""
    if count == -1 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    if count < 1:
        raise ValueError(f"config.distributed.cpu_devices={count}: expected -1 (JAX's default) or a count >= 1")
    if jax.config.jax_num_cpu_devices == count:
        return
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
        logging.warning("config.distributed.cpu_devices=%d not applied: JAX's backends already started with %d CPU "
                        "device(s) in this process (set it before any JAX call, or use XLA_FLAGS="
                        "--xla_force_host_platform_device_count)", count, len(jax.devices("cpu")))


# glibc's allocator, tuned for XLA on CPU before the interpreter starts. XLA:CPU allocates every
# execution's temporaries afresh (358 MB for the CPU comparison anchor's train step); glibc serves that
# with mmap and returns it on free, so each step faulted in ~88,000 4 KiB pages. With this tunable
# glibc marks its memory for transparent huge pages: ~800 faults of 2 MiB per step and fewer TLB misses.
# On the 2-core EPYC: the anchor step 980 -> 800 ms, the demo step 508 -> 430 ms (docs/benchmarks.md).
HOST_TUNABLES = "glibc.malloc.hugetlb=1"
HOST_TUNABLES_SWITCH = "LSYNC_JAX_HOST_TUNABLES"  # "0" leaves the allocator as it is
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _accelerator_plugins() -> list[str]:
    """JAX plugins for GPUs and TPUs installed beside this JAX (found without importing JAX's backends)."""
    found = [name for name in ("libtpu",) if importlib.util.find_spec(name) is not None]
    found += [entry.name for entry in importlib.metadata.entry_points(group="jax_plugins")]
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        found += [module.name for module in pkgutil.iter_modules(list(spec.submodule_search_locations))]
    return found


def host_tunables_env(environ: Mapping[str, str] | None = None, *, libc: tuple[str, str] | None = None,
                      thp_setting: str | None = None, plugins: list[str] | None = None
                      ) -> tuple[dict[str, str] | None, str]:
    """(the environment to restart a CPU run's interpreter with, or None; why). The arguments default
    to this process's environment, C library, transparent-huge-page setting and JAX plugins; tests pass
    their own. Not restarted: the switch set to 0, GLIBC_TUNABLES already naming the tunable (the user's
    choice, and what stops a second restart), another C library than glibc >= 2.35, huge pages off in the
    kernel, or a GPU/TPU plugin installed while JAX_PLATFORMS does not pin the CPU (accelerator hosts
    keep their allocator: their step's temporaries live on the device)."""
    environ = os.environ if environ is None else environ
    if environ.get(HOST_TUNABLES_SWITCH, "") == "0":
        return None, f"{HOST_TUNABLES_SWITCH}=0"
    tunables = environ.get("GLIBC_TUNABLES", "")
    name = HOST_TUNABLES.split("=")[0]
    if name in tunables:
        return None, f"GLIBC_TUNABLES already sets {name}"
    kind, version = libc if libc is not None else platform.libc_ver()
    numbers = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if kind != "glibc" or numbers < (2, 35):
        return None, f"the C library is {kind or 'not glibc'} {version}, not glibc >= 2.35"
    if thp_setting is None:
        try:
            with open(_THP_SETTING) as f:
                thp_setting = f.read()
        except OSError:
            thp_setting = "[never]"
    if "[never]" in thp_setting:
        return None, "transparent huge pages are off in this kernel"
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    plugins = _accelerator_plugins() if plugins is None else plugins
    if plugins and platforms != ["cpu"]:
        return None, f"accelerator plugins installed ({', '.join(plugins)})"
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{HOST_TUNABLES}" if tunables else HOST_TUNABLES
    return env, f"GLIBC_TUNABLES={env['GLIBC_TUNABLES']}"


TPU_DEVICE_FILES = ("/dev/accel0", "/dev/vfio/0")  # how a TPU VM's chips appear to its host


def cpu_pin(environ: Mapping[str, str] | None = None, *, plugins: list[str] | None = None,
            tpu_attached: bool | None = None) -> str | None:
    """'cpu' when JAX should be pinned to the CPU backend: libtpu is installed (the tpu-compile extra, for
    `--check --target`) but no TPU is attached and JAX_PLATFORMS is unset. Unpinned, JAX would try to
    start libtpu's TPU backend on every start, which on a host without TPU only logs warnings. None:
    leave JAX to choose (a TPU VM, a GPU host, or the user's own JAX_PLATFORMS). The fit check compiles
    for TPU topologies with the CPU pinned (jax.experimental.topologies needs no TPU backend)."""
    environ = os.environ if environ is None else environ
    if environ.get("JAX_PLATFORMS"):
        return None
    plugins = _accelerator_plugins() if plugins is None else plugins
    if "libtpu" not in plugins or any(p != "libtpu" for p in plugins):
        return None
    if tpu_attached is None:
        tpu_attached = any(os.path.exists(path) for path in TPU_DEVICE_FILES)
    return None if tpu_attached else "cpu"


def restart_with_host_tunables() -> None:
    """Re-execute this launch script (same PID, arguments and interpreter options) with glibc tuned for
    XLA on CPU, when `host_tunables_env` says so: glibc reads GLIBC_TUNABLES only when a process starts.
    Called first thing in `launch/*.py`'s `__main__`, never from a library function. Costs the imports
    once more (about 3 s for launch/train.py); set GLIBC_TUNABLES yourself to skip that. First, a host
    with libtpu but no TPU pins JAX to the CPU (`cpu_pin`)."""
    pin = cpu_pin()
    if pin:  # before JAX starts its backends (the restart below re-reads it; so does this process's JAX)
        os.environ["JAX_PLATFORMS"] = pin
        jax.config.update("jax_platforms", pin)
    env, why = host_tunables_env()
    if env is None:
        return
    sys.stderr.write(f"lsync-jax: restarting with {why} (huge pages for XLA's CPU buffers; "
                     f"{HOST_TUNABLES_SWITCH}=0 turns this off)\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)


# Whose INFO lines reach the console: lsync-jax's own, clu's metric lines and progress reports.
_CONSOLE_INFO_FROM = (os.sep + "lsync_jax" + os.sep, os.sep + "launch" + os.sep,
                      os.path.join("clu", "metric_writers"), os.path.join("clu", "periodic_actions"))


# Orbax warns each time a run's checkpoints are opened read-only (to list steps or read meta): noise.
_ORBAX_READ_ONLY = ("read_only=True, setting save_interval_steps=0", "Given directory is read only")


class _OwnInfoOnly:
    """A logging filter: warnings and errors from anyone, INFO only from the modules above."""

    def filter(self, record: Any) -> bool:
        if record.levelno >= 30:
            return not any(text in str(record.msg) for text in _ORBAX_READ_ONLY)
        return any(part in record.pathname for part in _CONSOLE_INFO_FROM)


def quiet_library_logs() -> None:
    """Keep the console to what a user needs: metric lines, progress, lsync-jax's own messages and every
    warning. Libraries' INFO logging (Orbax prints about 93 lines for 10 steps of the tiny config) is
    dropped; set LSYNC_JAX_LIBRARY_LOGS=1 to see it."""
    if os.environ.get("LSYNC_JAX_LIBRARY_LOGS", "") not in ("", "0"):
        return
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
        handler.addFilter(_OwnInfoOnly())


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """`x` with zero rows appended along axis 0 up to `rows` (one compiled shape for a short last
    batch, or whole shards per device; callers drop the padding from the results)."""
    if len(x) >= rows:
        return x
    return np.concatenate([x, np.zeros((rows - len(x), *x.shape[1:]), x.dtype)])


# -- sample grids: model-space images in [-1, 1] -> one uint8 picture, saved as PNG --------------------
def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] float NHWC -> uint8 NHWC, as ADM sample batches store them."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 (N, H, W, C) -> one uint8 (rows * (H + pad) + pad, ..., C) grid, row-major."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = images[i]
    return grid


def save_png(path: str, grid: np.ndarray) -> None:
    """A PNG written whole or not at all (an interrupted run leaves no half picture)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())


# -- progress of long phases -----------------------------------------------------------------------------


class Progress:
    """Logs a long phase's start, its progress with rate and ETA (at most every `every_secs`), and its
    end, so that no phase longer than a few seconds runs silently (FID sampling, reference statistics,
    block measurements)."""

    def __init__(self, what: str, total: int, unit: str = "images", every_secs: float = 30.0,
                 log: Any = None):
        self.what, self.total, self.unit, self.every = what, int(total), unit, every_secs
        self.log = log or logging.info
        self.done = 0
        self.start = self._last = time.perf_counter()
        self.log(f"{what}: {self.total:,} {unit}")

    def update(self, n: int) -> None:
        self.done += int(n)
        now = time.perf_counter()
        if now - self._last >= self.every and self.done < self.total:
            self._last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            self.log(f"{self.what}: {self.done:,} / {self.total:,} {self.unit} ({rate:.1f}/s, about {eta:.0f} s left)")

    def finish(self) -> float:
        seconds = time.perf_counter() - self.start
        self.log(f"{self.what}: done, {self.done:,} {self.unit} in {seconds:.1f} s")
        return seconds


class PhaseClock:
    """Where a run's wall time went: seconds per named phase, summed over its intervals. A phase inside
    another is taken out of the outer one, so each second is counted once; the time in no phase is
    'other'. One clock per process (`PHASES`): the demo prints it at its end."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.totals: dict[str, float] = {}
        self._stack: list[list[Any]] = []  # [name, started, seconds of nested phases]

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        entry = [name, time.perf_counter(), 0.0]
        self._stack.append(entry)
        try:
            yield
        finally:
            self._stack.pop()
            elapsed = time.perf_counter() - entry[1]
            self.totals[name] = self.totals.get(name, 0.0) + elapsed - entry[2]
            if self._stack:
                self._stack[-1][2] += elapsed

    def timed(self, items: Iterable[Any], name: str) -> Iterator[Any]:
        """`items`, with the time spent producing each (a generator's work) counted as phase `name`."""
        iterator = iter(items)
        while True:
            with self.phase(name):
                try:
                    item = next(iterator)
                except StopIteration:
                    return
            yield item

    def report(self) -> list[str]:
        """Lines: each phase's seconds and share of the wall time since the clock started, largest first."""
        total = time.perf_counter() - self.start
        rows = sorted(self.totals.items(), key=lambda kv: -kv[1])
        rows.append(("other", max(total - sum(self.totals.values()), 0.0)))
        width = max(len(name) for name, _ in rows)
        lines = [f"where the time went ({total:.1f} s in all):"]
        lines += [f"  {name:<{width}}  {seconds:8.1f} s  {100 * seconds / max(total, 1e-9):5.1f}%" for name, seconds
                  in rows]
        return lines


PHASES = PhaseClock()
