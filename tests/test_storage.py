"""Files anywhere (lsync_jax.storage): ADM sample batches streamed to disk, atomic writes."""

import os
import time

import numpy as np
import pytest

from lsync_jax import storage
from lsync_jax.eval.evaluator import iter_npz_batches
from lsync_jax.storage import write_adm_batch, write_json_atomic


def test_adm_batch_is_streamed_into_a_readable_npz(tmp_path):
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 256, (n, 8, 6, 3), dtype=np.uint8), rng.integers(0, 10, n)) for n in (60, 60, 7)]
    path = str(tmp_path / "out" / "samples.npz")
    first, labels = write_adm_batch(path, iter(batches))
    images = np.concatenate([x for x, _ in batches])
    with np.load(path) as saved:  # numpy reads it as any np.savez file
        np.testing.assert_array_equal(saved["arr_0"], images)
        np.testing.assert_array_equal(saved["arr_1"], np.concatenate([y for _, y in batches]))
    np.testing.assert_array_equal(first, images[:100])
    np.testing.assert_array_equal(labels, np.concatenate([y for _, y in batches]))
    np.testing.assert_array_equal(np.concatenate(list(iter_npz_batches(path, batch_size=50))), images)
    assert os.listdir(tmp_path / "out") == ["samples.npz"]  # no temporary files left


def test_a_failed_adm_batch_leaves_nothing_behind(tmp_path):
    def broken():
        yield np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4)
        raise RuntimeError("sampler failed")

    with pytest.raises(RuntimeError, match="sampler failed"):
        write_adm_batch(str(tmp_path / "samples.npz"), broken())
    with pytest.raises(ValueError, match="shapes"):
        write_adm_batch(str(tmp_path / "samples.npz"), iter([(np.zeros((2, 8, 8, 3), np.uint8), np.zeros(2)),
                                                             (np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2))]))
    assert os.listdir(tmp_path) == []


def test_json_is_written_whole(tmp_path):
    write_json_atomic(str(tmp_path / "a" / "m.json"), {"b": 1, "a": [1, 2]})
    assert (tmp_path / "a" / "m.json").read_text().startswith("{\n  \"a\"")
    assert os.listdir(tmp_path / "a") == ["m.json"]


# -- gs:// against the GCS emulator -----------------------------------------------------------------------
@pytest.mark.gcs
def test_files_round_trip_through_the_emulator(bucket, tmp_path):
    run = f"{bucket}/run"
    storage.check_writable(run)  # write, read back, delete a probe
    assert not storage.exists(run)  # the probe left nothing
    storage.write_json_atomic(f"{run}/eval/metrics.json", {"fid": 1.5})
    assert storage.read_json(f"{run}/eval/metrics.json") == {"fid": 1.5}
    storage.save_npz_atomic(f"{run}/stats.npz", mu=np.arange(3.0))
    np.testing.assert_array_equal(storage.load_npz(f"{run}/stats.npz")["mu"], np.arange(3.0))
    assert storage.listdir(run) == ["eval", "stats.npz"] and storage.isdir(f"{run}/eval")
    assert storage.getsize(f"{run}/stats.npz") > 0 and storage.isfile(f"{run}/stats.npz")
    # a whole directory moves (a damaged checkpoint set aside), and comes back down as a local copy
    storage.write_bytes_atomic(f"{run}/ckpt/3/state/a", b"a")
    storage.write_bytes_atomic(f"{run}/ckpt/3/meta/b", b"b")
    storage.move(f"{run}/ckpt/3", f"{run}/ckpt/3.damaged-1")
    assert storage.listdir(f"{run}/ckpt") == ["3.damaged-1"]
    with storage.local_copy(f"{run}/ckpt/3.damaged-1") as local:
        assert open(os.path.join(local, "state", "a"), "rb").read() == b"a"
    assert not os.path.exists(local)  # the download is removed
    # an ADM batch streams locally and appears in the bucket whole
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8), np.arange(5))]
    write_adm_batch(f"{run}/samples.npz", iter(batches))
    np.testing.assert_array_equal(storage.load_npz(f"{run}/samples.npz")["arr_0"], batches[0][0])


@pytest.mark.gcs
def test_a_missing_bucket_is_named(gcs_emulator):
    with pytest.raises(storage.StorageError, match=r"gs://no-such-bucket-here/run is not writable: its bucket "
                                                   r"gs://no-such-bucket-here does not exist"):
        storage.check_writable("gs://no-such-bucket-here/run")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_endpoint_fails_in_seconds(monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(storage.StorageError, match=r"gs://b/run: the storage endpoint http://127.0.0.1:\d+ .*cannot "
                                                   r"be reached"):
        storage.check_writable("gs://b/run")
    assert time.monotonic() - start < 20  # bounded: one connection attempt, not gcsfs's minute of retries


def test_missing_credentials_are_named_without_network(monkeypatch, tmp_path):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))  # no gcloud application-default credentials
    monkeypatch.setenv("NO_GCE_CHECK", "true")  # no metadata server is asked (this is no GCE VM)
    with pytest.raises(storage.StorageError, match="gs://bucket/run: no Google Cloud credentials found.*"
                                                   "GOOGLE_APPLICATION_CREDENTIALS"):
        storage.check_writable("gs://bucket/run")


def test_an_unwritable_directory_is_named_by_fault_injection(tmp_path, monkeypatch):
    """As root, permissions never block a write: the failure is injected where the bytes are written."""
    from etils import epath

    def refuse(self, data):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(epath.Path(str(tmp_path))), "write_bytes", refuse)
    keep = tmp_path / "runs" / "keep.txt"
    keep.parent.mkdir()
    keep.write_text("written before")
    with pytest.raises(OSError, match=r"runs/new is not writable \(Permission denied\)"):
        storage.check_writable(str(tmp_path / "runs" / "new"))
    assert sorted(os.listdir(tmp_path / "runs")) == ["keep.txt"] and keep.read_text() == "written before"


def test_paths_keep_urls_intact(tmp_path):
    assert storage.join("gs://b/run", "checkpoints", "3") == "gs://b/run/checkpoints/3"
    assert storage.absolute("gs://b/run/") == "gs://b/run" and storage.absolute("rel") == os.path.abspath("rel")
    assert storage.is_remote("gs://b") and not storage.is_remote(str(tmp_path))
