"""The TensorFlow-free metric writer: TensorBoard's own reader reads its scalars, images, histograms and
text back, and nothing imports TensorFlow on the way."""

import json
import logging as std_logging
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lsync_jax.train import writers

ROOT = pathlib.Path(__file__).resolve().parents[2]


def read_events(logdir: str):
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(logdir, size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    return acc


def test_summary_writer_events_read_back_by_tensorboard(tmp_path):
    from tensorboard.util import tensor_util

    writer = writers.SummaryWriter(str(tmp_path))
    writer.write_scalars(1, {"loss": 0.5, "lr": np.float32(1e-4)})
    writer.write_scalars(2, {"loss": np.asarray(0.25)})
    grid = np.linspace(0, 1, 2 * 6 * 5 * 3, dtype=np.float32).reshape(2, 6, 5, 3)
    writer.write_images(2, {"samples": grid, "gray": np.zeros((4, 4, 1), np.uint8)})
    writer.write_histograms(2, {"weights": np.arange(10.0)}, num_buckets={"weights": 5})
    writer.write_texts(2, {"note": "hello"})
    writer.flush()
    writer.close()
    acc = read_events(str(tmp_path))
    tags = acc.Tags()
    assert {"loss", "lr", "samples", "gray", "weights", "note"} <= set(tags["tensors"])
    losses = {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors("loss")}
    assert losses == {1: 0.5, 2: 0.25}
    assert acc.SummaryMetadata("loss").plugin_data.plugin_name == "scalars"
    assert acc.SummaryMetadata("samples").plugin_data.plugin_name == "images"
    # the image tensor as tf.summary.image writes it: [width, height, png, png]
    encoded = tensor_util.make_ndarray(acc.Tensors("samples")[0].tensor_proto)
    assert encoded[0] == b"5" and encoded[1] == b"6" and len(encoded) == 4
    import io

    from PIL import Image

    first = np.asarray(Image.open(io.BytesIO(encoded[2])))
    np.testing.assert_array_equal(first, np.round(grid[0] * 255).astype(np.uint8))
    histogram = tensor_util.make_ndarray(acc.Tensors("weights")[0].tensor_proto)
    assert histogram.shape == (5, 3) and histogram[:, 2].sum() == 10
    assert tensor_util.make_ndarray(acc.Tensors("note")[0].tensor_proto) == b"hello"


def test_logging_writer_prints_clu_lines(caplog):
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.INFO)
    with caplog.at_level(std_logging.INFO):
        writers.LoggingWriter().write_scalars(3, {"loss": 0.125, "b": 2})
    assert "[3] b=2, loss=0.125" in caplog.text


def test_report_progress_reports_rate_and_eta(caplog):
    class Recorder(writers.MetricWriter):
        def __init__(self):
            self.scalars = []

        def write_scalars(self, step, scalars):
            self.scalars.append((step, dict(scalars)))

    recorder = Recorder()
    report = writers.ReportProgress(num_train_steps=100, writer=recorder, every_secs=30)
    with caplog.at_level(std_logging.INFO):
        assert not report(10, t=0.0)  # starts the clock
        assert not report(11, t=5.0)  # not due
        assert report(20, t=40.0)  # 10 steps in 40 s
        assert report(100, t=41.0)  # the last step always reports
    assert "0.2 steps/s, 20.0% (20/100), ETA: 5m20s" in caplog.text
    assert [s for s, _ in recorder.scalars] == [20, 20, 100, 100]
    assert recorder.scalars[0][1] == {"steps_per_sec": 0.25}


def test_default_writer_without_tensorflow(tmp_path, monkeypatch):
    monkeypatch.setattr(writers, "tensorflow_installed", lambda: False)
    writer = writers.create_default_writer(str(tmp_path))
    assert isinstance(writer, writers.MultiWriter)
    assert [type(w) for w in writer.writers] == [writers.LoggingWriter, writers.SummaryWriter]
    assert [type(w) for w in writers.create_default_writer(str(tmp_path), just_logging=True).writers] == [
        writers.LoggingWriter]
    assert isinstance(writers.report_progress(10, writer), writers.ReportProgress)
    writer.close()


# Writes and reads events with TensorFlow made unimportable (as in the core install): nothing may need it.
NO_TENSORFLOW = textwrap.dedent(
    """
    import json, sys
    class _Blocked:  # TensorFlow and clu as if not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "clu"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
    sys.meta_path.insert(0, _Blocked())
    import numpy as np
    from lsync_jax.train import writers
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    logdir = sys.argv[1]
    writer = writers.create_default_writer(logdir)
    writer.write_scalars(7, {"loss": 1.5})
    writer.write_images(7, {"grid": np.ones((1, 4, 4, 3), np.float32)})
    writer.close()
    acc = event_accumulator.EventAccumulator(logdir, size_guidance={"tensors": 0})
    acc.Reload()
    print(json.dumps({"kinds": [type(w).__name__ for w in writer.writers],
                      "loss": [[e.step, float(tensor_util.make_ndarray(e.tensor_proto))] for e in acc.Tensors("loss")],
                      "tags": sorted(acc.Tags()["tensors"]),
                      "imported": sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "clu")
                                         and sys.modules[m] is not None)}))
    """
)


def test_writes_and_reads_events_with_tensorflow_blocked(tmp_path):
    out = subprocess.run([sys.executable, "-c", NO_TENSORFLOW, str(tmp_path)], capture_output=True, text=True,
                         cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"kinds": ["LoggingWriter", "SummaryWriter"], "loss": [[7, 1.5]], "tags": ["grid", "loss"],
                      "imported": []}


@pytest.mark.parametrize("value", [np.zeros((2, 3)), np.zeros((1, 4, 4, 2))])
def test_write_images_refuses_other_shapes(tmp_path, value):
    writer = writers.SummaryWriter(str(tmp_path))
    with pytest.raises(ValueError, match="expected \\[N, H, W, C\\]"):
        writer.write_images(0, {"bad": value})
    writer.close()


@pytest.mark.gcs
def test_events_of_a_gs_workdir_without_tensorflow(bucket, tmp_path, monkeypatch):
    """A gs:// workdir's events: written locally by the TensorFlow-free writer, uploaded through
    lsync_jax.storage, and read back by TensorBoard's reader."""
    from lsync_jax import storage
    from lsync_jax.train.hooks import Metrics, Outcome

    monkeypatch.setattr(writers, "tensorflow_installed", lambda: False)
    workdir = f"{bucket}/run"
    hook = Metrics(workdir, num_steps=2, log_every=1, batch_size=8, start=0)
    assert isinstance(hook.writer, writers.MultiWriter) and hook.events is not None
    hook.write(1, Outcome(scalars={"loss": 0.75}))
    hook.writer.write_images(1, {"grid": np.zeros((1, 4, 4, 1), np.float32)})
    hook.close()
    names = [n for n in storage.listdir(workdir) if n.startswith("events.out.tfevents")]
    assert len(names) == 1 and not os.path.exists(hook.events.local)
    local = tmp_path / "events"
    local.mkdir()
    (local / names[0]).write_bytes(storage.read_bytes(storage.join(workdir, names[0])))
    acc = read_events(str(local))
    assert {"loss", "grid"} <= set(acc.Tags()["tensors"])
