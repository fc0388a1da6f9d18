"""Paths anywhere: a local disk, gs:// (and any other etils.epath / fsspec URL), with one set of
file operations and the same guarantees everywhere.

A TPU pod's hosts share no disk, so a run's workdir, its data and its weights may live in a bucket.
Every path the framework reads or writes goes through this module (or through a library that takes
URLs itself: Orbax/tensorstore for checkpoints, array-record for shards). The rules:

- Files are whole or absent. Locally: a temporary file, fsync, then a replacing rename. On gs://
  an object appears only when its upload finishes, so it is written in place (GCS has no rename;
  a temporary object plus copy would double the traffic for nothing).
- gs:// goes through fsspec/gcsfs, which honours `STORAGE_EMULATOR_HOST`. The launch scripts make that
  one variable point tensorstore (Orbax) and array-record at the same endpoint too, and keep etils.epath
  off TensorFlow's gfile (`configure_process`, from `lsync_jax.cli.run`).
- Importing or calling this module changes no process-wide setting (environment, fsspec's config):
  gcsfs's options are passed per file system instance (`gcs_options`). docs/training.md, "Storage".
- Every network wait is bounded: `check_remote` finds missing credentials, an unreachable endpoint
  or a missing bucket in seconds, naming the path, before anything long starts.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import os
import posixpath
import shutil
import socket
import tempfile
import urllib.parse
import uuid
import zipfile
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
from absl import logging
from etils import epath

# The variable a user sets to use a GCS emulator (gcsfs and google-cloud-storage read it), and the
# ones tensorstore and array-record read instead: `configure_process` copies the first to the others.
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
_EMULATOR_FOLLOWERS = ("TENSORSTORE_GCS_HTTP_URL", "CLOUD_STORAGE_EMULATOR_ENDPOINT")
GCS_ENDPOINT = "https://storage.googleapis.com"
# Seconds for one connection attempt to the storage endpoint, and for the whole write/read/delete probe.
CONNECT_TIMEOUT_S = float(os.environ.get("LSYNC_JAX_STORAGE_CONNECT_TIMEOUT", "5"))
PROBE_TIMEOUT_S = float(os.environ.get("LSYNC_JAX_STORAGE_PROBE_TIMEOUT", "60"))


class StorageError(OSError):
    """A path cannot be reached or written: the message names it and what to fix."""


# -- paths ------------------------------------------------------------------------------------------------
def scheme(path: Any) -> str:
    """'gs', 's3', ... of a URL; '' for a local path."""
    text = os.fspath(path) if not isinstance(path, str) else path
    return text.split("://", 1)[0] if "://" in text else ""


def is_remote(path: Any) -> bool:
    return bool(scheme(path))


def absolute(path: Any) -> str:
    """A local path made absolute; a URL unchanged (os.path.abspath would turn gs://b into ./gs:/b)."""
    text = os.fspath(path)
    return text.rstrip("/") if is_remote(text) else os.path.abspath(text)


def join(*parts: Any) -> str:
    """Path joining that keeps URLs intact (posix separators; a local path joins as os.path does)."""
    first = os.fspath(parts[0])
    if is_remote(first):
        return posixpath.join(first, *map(os.fspath, parts[1:]))
    return os.path.join(first, *map(os.fspath, parts[1:]))


def path(p: Any) -> epath.Path:
    """An etils.epath.Path of `p`. A URL's client is configured first, and the first use of each
    endpoint in a process checks credentials and reachability (`check_remote`, seconds): no storage
    call then waits through a client's minute of retries for an endpoint that is not there."""
    if is_remote(p):
        _first_use(os.fspath(p))
    return epath.Path(p)


_REACHED: set[tuple[str, str]] = set()  # (scheme, endpoint) pairs checked in this process


def _first_use(p: str) -> None:
    check_remote(p)
    if scheme(p) == "gs":
        _configure_epath_gcs()


def exists(p: Any) -> bool:
    return path(p).exists()


def isdir(p: Any) -> bool:
    return path(p).is_dir()


def isfile(p: Any) -> bool:
    return path(p).is_file()


def listdir(p: Any) -> list[str]:
    """The names in a directory (a 'directory' on gs:// is a prefix), sorted."""
    return sorted(child.name for child in path(p).iterdir())


def find(p: Any) -> list[str]:
    """Every file under `p`, recursively, as full paths (URLs for remote `p`), sorted. One listing
    request on GCS (gcsfs refuses `**` globs there)."""
    text = os.fspath(p)
    if not is_remote(text):
        return sorted(os.path.join(d, f) for d, _, files in os.walk(text, followlinks=True) for f in files)
    prefix = text.split("://", 1)[0] + "://"
    return sorted(prefix + name for name in _fsspec(text).find(_fs_path(text)))


def getsize(p: Any) -> int:
    return int(path(p).stat().length)


def makedirs(p: Any) -> None:
    path(p).mkdir(parents=True, exist_ok=True)


def remove(p: Any) -> None:
    path(p).unlink()


def rmtree(p: Any) -> None:
    path(p).rmtree()


def read_bytes(p: Any) -> bytes:
    return path(p).read_bytes()


def read_text(p: Any) -> str:
    return path(p).read_text()


def move(src: Any, dst: Any) -> None:
    """Rename a file or a whole directory. Locally one rename; on gs:// every object under `src` is
    copied, then deleted (GCS has no rename: not atomic, so readers must tolerate a partial source,
    as damaged-checkpoint handling does)."""
    src, dst = os.fspath(src), os.fspath(dst)
    if not is_remote(src):
        os.rename(src, dst)
        return
    fs = _fsspec(src)
    recursive = fs.isdir(_fs_path(src))
    fs.copy(_fs_path(src), _fs_path(dst), recursive=recursive)  # not fs.mv: its moveTo attempt logs a traceback
    fs.rm(_fs_path(src), recursive=recursive)


def upload(local: str, remote: Any) -> None:
    """Copy a local file to `remote` (any path); a local target is written atomically."""
    target = os.fspath(remote)
    if not is_remote(target):
        makedirs(os.path.dirname(os.path.abspath(target)))
        tmp = _tmp_name(target)
        try:
            shutil.copyfile(local, tmp)
            os.replace(tmp, target)
        except BaseException:
            _remove_quietly(tmp)
            raise
        return
    _fsspec(target).put_file(local, _fs_path(target))


def copy_tree_up(local_dir: str, remote_dir: Any, only_newer_than: dict[str, float] | None = None) -> list[str]:
    """Upload the files of `local_dir` (recursively) under `remote_dir`. With `only_newer_than`
    ({relative name: mtime uploaded}, updated in place), files unchanged since their last upload
    are skipped. Returns the relative names uploaded."""
    sent = []
    for root, _, files in os.walk(local_dir):
        for name in sorted(files):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, local_dir)
            mtime = os.path.getmtime(full)
            if only_newer_than is not None and only_newer_than.get(rel) == mtime:
                continue
            upload(full, join(remote_dir, *rel.split(os.sep)))
            if only_newer_than is not None:
                only_newer_than[rel] = mtime
            sent.append(rel)
    return sent


@contextlib.contextmanager
def local_file(p: Any, suffix: str = "") -> Iterator[str]:
    """A local path to read `p` from: `p` itself when local, else a temporary download removed after
    (for readers that want a file name: np.load of a large .npz, safetensors, torch)."""
    text = os.fspath(p)
    if not is_remote(text):
        yield text
        return
    handle, tmp = tempfile.mkstemp(suffix=suffix or os.path.splitext(text)[1], prefix="lsync_jax_download_")
    os.close(handle)
    try:
        _fsspec(text).get_file(_fs_path(text), tmp)
        yield tmp
    finally:
        _remove_quietly(tmp)


@contextlib.contextmanager
def local_copy(p: Any) -> Iterator[str]:
    """A local path holding `p`, a file or a whole directory (a diffusers VAE folder, a Hugging Face
    snapshot): `p` itself when local, else a temporary download, removed after. For loaders built on
    libraries that read local files only (safetensors, torch)."""
    text = os.fspath(p)
    if not is_remote(text):
        yield text
        return
    check_remote(text)
    if not isdir(text):
        if not exists(text):
            raise FileNotFoundError(f"{text} does not exist")
        with local_file(text) as local:
            yield local
        return
    folder = tempfile.mkdtemp(prefix="lsync_jax_download_")
    try:
        fs, root = _fsspec(text), _fs_path(text).rstrip("/")
        for name in fs.find(root):
            target = os.path.join(folder, *os.path.relpath(name, root).split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            fs.get_file(name, target)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def local_target(p: Any) -> Iterator[str]:
    """A local file name to write `p` through: a temporary file beside a local `p`, renamed over it
    when the block ends without error, or a temporary local file uploaded to a remote `p`. Either way
    `p` appears whole or not at all, and nothing temporary is left behind."""
    text = os.fspath(p)
    if is_remote(text):
        handle, tmp = tempfile.mkstemp(prefix="lsync_jax_upload_")
        os.close(handle)
    else:
        makedirs(os.path.dirname(os.path.abspath(text)))
        tmp = _tmp_name(text)
    try:
        yield tmp
        if is_remote(text):
            upload(tmp, text)
        else:
            os.replace(tmp, text)
    finally:
        _remove_quietly(tmp)


def _tmp_name(target: str) -> str:
    directory, name = os.path.split(os.path.abspath(target))
    return os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")


def _fsspec(p: str) -> Any:
    """The fsspec file system of a URL; gs:// with `gcs_options` (gcsfs's plain class: no bucket-type
    probe, a gRPC call to the real control plane per new bucket that fails and warns without credentials)."""
    _first_use(p)
    if scheme(p) == "gs":
        from gcsfs.core import GCSFileSystem

        return GCSFileSystem(**gcs_options())
    import fsspec

    return fsspec.filesystem(scheme(p))


def _fs_path(p: str) -> str:
    return p.split("://", 1)[1] if scheme(p) in ("gs", "gcs") else p


def gcs_object(p: str) -> tuple[Any, str, str]:
    """(gcsfs's file system, bucket, object name) of a gs:// path: for the JSON API calls lsync-jax makes
    through gcsfs itself (writes with generation preconditions, which gcsfs's own writes cannot set)."""
    if scheme(p) not in ("gs", "gcs"):
        raise ValueError(f"{p!r} is not a gs:// path")
    bucket, _, name = _fs_path(p).partition("/")
    return _fsspec(p), bucket, name.strip("/")


def _remove_quietly(p: Any) -> None:
    """Remove a temporary file after a failed write; a failure to remove must not hide the first error."""
    try:
        if os.path.exists(p):
            os.remove(p)
    except OSError:
        pass


# -- files whole or absent --------------------------------------------------------------------------------
def write_bytes_atomic(p: Any, data: bytes) -> None:
    """Readers (and concurrent writers of the same content, e.g. several hosts on a shared disk) never
    see a partial file, a rerun replaces the file it wrote before, and a failed or interrupted write
    leaves nothing behind. Locally: a uniquely named temporary file, fsync, os.replace. On gs://: one
    upload (an object is visible only once complete)."""
    target = os.fspath(p)
    if is_remote(target):
        parent = path(target).parent
        parent.mkdir(parents=True, exist_ok=True)
        path(target).write_bytes(data)
        return
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    tmp = _tmp_name(target)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes reach the disk before the name does
        os.replace(tmp, target)
    except BaseException:
        _remove_quietly(tmp)
        raise


def save_npz_atomic(p: Any, **arrays: Any) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes_atomic(p, buffer.getvalue())


def load_npz(p: Any) -> dict[str, np.ndarray]:
    """Every array of an .npz file (local or remote), read whole."""
    with np.load(io.BytesIO(read_bytes(p)), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def read_json(p: Any, what: str = "JSON file") -> Any:
    """A JSON file's content; a damaged or unreadable file is an error naming it."""
    try:
        return json.loads(path(p).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {p} is damaged (not valid JSON: {e})") from None


def write_json_atomic(p: Any, payload: Any) -> None:
    write_bytes_atomic(p, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def write_adm_batch(p: Any, batches: Iterable[tuple[np.ndarray, np.ndarray]],
                    extra: Callable[[str], Mapping[str, np.ndarray]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stream (uint8 images, labels) batches into an ADM-style .npz (arr_0 images, arr_1 labels),
    never holding all images in memory (50,000 at 512 px are 39 GB); the file appears complete or
    not at all (a remote one is assembled locally, then uploaded). `extra(local_npz)` may read the
    written images and return more arrays stored beside them before the file appears (a reference
    batch's statistics). Returns (the first 100 images, all labels)."""
    first, labels, count, shape = [], [], 0, None
    with local_target(p) as tmp:
        images_file = tmp + ".arr_0"
        try:
            with open(images_file, "wb") as raw:  # the images' bytes, then one header in front of them
                for images, batch_labels in batches:
                    images = np.ascontiguousarray(images, np.uint8)
                    if shape is not None and images.shape[1:] != shape:
                        raise ValueError(f"image batches of shapes {shape} and {images.shape[1:]}")
                    shape = images.shape[1:]
                    raw.write(images.tobytes())
                    count += len(images)
                    labels.append(np.asarray(batch_labels))
                    if sum(map(len, first)) < 100:
                        first.append(images[: 100 - sum(map(len, first))])
            if shape is None:
                raise ValueError("no images to write")
            labels_all = np.concatenate(labels)
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                with archive.open("arr_0.npy", "w", force_zip64=True) as f, open(images_file, "rb") as raw:
                    np.lib.format.write_array_header_2_0(
                        f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                            "shape": (count, *shape)})
                    while chunk := raw.read(1 << 24):
                        f.write(chunk)
                with archive.open("arr_1.npy", "w") as f:
                    np.lib.format.write_array(f, labels_all)
            if extra is not None:
                arrays = dict(extra(tmp))
                with zipfile.ZipFile(tmp, "a", zipfile.ZIP_STORED, allowZip64=True) as archive:
                    for name, value in arrays.items():
                        with archive.open(f"{name}.npy", "w", force_zip64=True) as f:
                            np.lib.format.write_array(f, np.asarray(value))
        finally:
            _remove_quietly(images_file)
    return np.concatenate(first), labels_all


# -- remote storage: configuration and bounded checks -----------------------------------------------------
def emulator() -> str:
    """The GCS emulator's URL when one is configured (STORAGE_EMULATOR_HOST), else ''."""
    return os.environ.get(EMULATOR_ENV, "")


# What the launch scripts set for their process (`configure_process`); the library itself sets none.
LAUNCH_ENV = {
    "EPATH_USE_TF": "0",  # etils.epath reaches gs:// through gcsfs (which honours the emulator), not TF's gfile
    # gcsfs without its bucket-type probe (see `_fsspec`), for the file systems others make (epath's, Orbax's)
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
}


def configure_process() -> None:
    """The launch scripts' storage settings for their whole process (`lsync_jax.cli.run`, before anything
    imports gcsfs): `LAUNCH_ENV`, and with STORAGE_EMULATOR_HOST set, tensorstore's and array-record's own
    emulator variables pointed at it. The user's own settings of any of them win. A program of your own
    that uses gs:// through Orbax or array-record may call it, or set the variables itself."""
    for name, value in LAUNCH_ENV.items():
        os.environ.setdefault(name, value)
    url = emulator()
    if url:
        url = url if "://" in url else "http://" + url
        for name in _EMULATOR_FOLLOWERS:
            os.environ.setdefault(name, url)


def gcs_options() -> dict[str, Any]:
    """gcsfs's options for lsync-jax's file systems, passed per instance: fsspec's config for 'gcs' (the
    user's settings) over bounded requests and no cached directory listings (a run lists checkpoints/
    again after saving into it; a cached listing would miss the new step and a resume would start from
    an older one). An emulator takes no credentials: looking for them would only log warnings."""
    import fsspec

    options = {"requests_timeout": 60, "use_listings_cache": False, **fsspec.config.conf.get("gcs", {})}
    if emulator():
        options["token"] = "anon"
    return options


@contextlib.contextmanager
def _fsspec_config(protocol: str, options: Mapping[str, Any]) -> Iterator[None]:
    """fsspec's config for `protocol` set to `options` inside the block, restored after it."""
    import fsspec

    conf = fsspec.config.conf
    had, before = protocol in conf, conf.get(protocol)
    conf[protocol] = dict(options)
    try:
        yield
    finally:
        if had:
            conf[protocol] = before
        else:
            conf.pop(protocol, None)


_EPATH_GCS_MADE: list[bool] = []


def _configure_epath_gcs() -> None:
    """etils.epath makes one gcsfs file system per process for gs:// (Orbax lists and renames checkpoints
    through it) from fsspec's config of the moment it is made. Made here, once, with `gcs_options` in that
    config only while it is made: fsspec's config is left as found. If epath made it earlier (a program's
    own gs:// use), it keeps the options it was made with."""
    if _EPATH_GCS_MADE:
        return
    _EPATH_GCS_MADE.append(True)
    from etils.epath import backend

    make = getattr(getattr(backend, "fsspec_backend", None), "_get_filesystem", None)
    if make is None:  # another etils: its own defaults
        return
    with _fsspec_config("gcs", gcs_options()):
        make("gcs")


def _endpoint_address() -> tuple[str, int, str]:
    url = emulator() or GCS_ENDPOINT
    parsed = urllib.parse.urlparse(url if "://" in url else "http://" + url)
    return parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80), url


def check_credentials(p: str) -> None:
    """Real GCS needs credentials; an emulator needs none. Fails in seconds (no retry loop against a
    metadata server that is not there) with what to do."""
    if emulator() or scheme(p) != "gs":
        return
    try:
        import google.auth
        import google.auth.exceptions
    except ImportError:
        raise StorageError(f"{p}: reading gs:// needs gcsfs and google-auth (pip install gcsfs)") from None
    try:
        google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError as e:
        raise StorageError(
            f"{p}: no Google Cloud credentials found ({str(e).splitlines()[0][:200]}). On a Cloud TPU VM or GCE "
            "the VM's service account is used; elsewhere set GOOGLE_APPLICATION_CREDENTIALS to a key file or run "
            "`gcloud auth application-default login`; for a GCS emulator set STORAGE_EMULATOR_HOST") from None


def check_reachable(p: str) -> None:
    """One TCP connection to the storage endpoint, `CONNECT_TIMEOUT_S` at most: an unreachable
    endpoint is reported in seconds (gcsfs would retry for over 30 s before saying anything)."""
    host, port, url = _endpoint_address()
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        via = f" ({EMULATOR_ENV}={emulator()})" if emulator() else ""
        raise StorageError(f"{p}: the storage endpoint {url}{via} cannot be reached within {CONNECT_TIMEOUT_S:g} s "
                           f"({e.strerror or e}). Check the network, the URL, or the emulator") from None


def check_remote(p: Any) -> None:
    """For a URL: credentials, then the endpoint (bounded), once per endpoint and process; nothing for a
    local path."""
    text = os.fspath(p)
    if not is_remote(text):
        return
    key = (scheme(text), emulator())
    if scheme(text) != "gs" or key in _REACHED:
        return  # other fsspec schemes: their own clients' checks; an endpoint reached once is not asked again
    check_credentials(text)
    check_reachable(text)
    _REACHED.add(key)
    unset = emulator_settings_unset()
    if unset:
        logging.warning("%s is set but %s not: Orbax, array-record or etils.epath may reach the real GCS instead "
                        "of the emulator. The launch scripts set them; in a program of your own call "
                        "lsync_jax.storage.configure_process() first", EMULATOR_ENV, ", ".join(unset))


def emulator_settings_unset() -> list[str]:
    """With an emulator configured, the variables `configure_process` would set that are not set."""
    if not emulator():
        return []
    unset = [name for name in _EMULATOR_FOLLOWERS if not os.environ.get(name)]
    if os.environ.get("EPATH_USE_TF", "").lower() not in ("0", "false", "no", "f"):
        unset.append("EPATH_USE_TF=0")
    return unset


def bounded(what: str, fn: Any, *args: Any, timeout: float | None = None) -> Any:
    """fn(*args) with a deadline (PROBE_TIMEOUT_S by default): a storage call that hangs in retries
    becomes a StorageError naming `what` (the call is abandoned in its thread)."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    future = pool.submit(fn, *args)
    try:
        return future.result(timeout=timeout or PROBE_TIMEOUT_S)
    except concurrent.futures.TimeoutError:
        raise StorageError(f"{what}: no answer from storage within {timeout or PROBE_TIMEOUT_S:g} s") from None
    finally:
        pool.shutdown(wait=False)


def check_writable(directory: Any, *, cleanup: bool = True) -> None:
    """Write, read back and delete a probe file in `directory`: a directory a run will write that it
    cannot (permissions, a full or read-only disk, a missing bucket, no credentials) fails at start,
    naming it, instead of at the first save after hours of training. Missing local parents are
    created for the probe and, with `cleanup`, removed again, so that a run refused later leaves the
    file system as found (several processes probing a shared disk pass cleanup=False, not to remove
    one another's). OSError (StorageError for remote paths) naming the path."""
    text = os.fspath(directory)
    check_remote(text)
    target = path(text)
    created = []
    probe = target / f".lsync_jax_write_probe.{uuid.uuid4().hex}"
    payload = b"lsync-jax write probe\n"

    def run_probe() -> None:
        if not is_remote(text):  # gs:// has no empty directories: nothing to create or remove
            parent = target
            while not parent.exists() and parent != parent.parent:
                created.append(parent)
                parent = parent.parent
            target.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(payload)
        if probe.read_bytes() != payload:
            raise OSError(f"the probe file {probe} read back differently")
        probe.unlink()

    try:
        bounded(f"{text} (write probe)", run_probe) if is_remote(text) else run_probe()
    except StorageError:
        raise
    except FileNotFoundError as e:
        if not is_remote(text):
            raise OSError(e.errno, f"{text} is not writable ({e.strerror or e})") from None
        raise StorageError(f"{text} is not writable: its bucket {'/'.join(text.split('/')[:3])} does not exist "
                           "(create it, or check the name)") from None
    except OSError as e:
        raise OSError(e.errno, f"{text} is not writable ({e.strerror or e}); the run writes there. Check its "
                      "permissions and free space, or choose another --workdir") from None
    except Exception as e:  # noqa: BLE001 - remote clients raise their own types (HttpError, ValueError)
        said = (str(e).strip().splitlines() or [""])[0][:300]
        raise StorageError(f"{text} is not writable ({type(e).__name__}: {said}); the run writes there. Check the "
                           "bucket's name and permissions") from None
    finally:
        for folder in created if cleanup else ():  # deepest first; never hides the error
            try:
                folder.rmdir()
            except OSError:
                pass


def check_readable(p: Any, what: str) -> None:
    """`p` exists (a file or a directory), checked within a bounded time: FileNotFoundError naming
    `what` and the path otherwise (credentials and endpoint are checked first for a URL)."""
    text = os.fspath(p)
    check_remote(text)
    found = bounded(f"{what} {text}", exists, text) if is_remote(text) else exists(text)
    if not found:
        raise FileNotFoundError(f"{what} {text} does not exist")

