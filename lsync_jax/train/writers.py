"""TensorBoard event files and console metric lines without TensorFlow, behind clu's interface.

clu's `metric_writers` and `periodic_actions` import TensorFlow when imported. Where TensorFlow (and
clu) are installed, `create_default_writer` and `ReportProgress` are clu's own; elsewhere (the core
install) they are the small equivalents below: the same `MetricWriter` methods, writing the summaries
TensorFlow 2 writes (tensors with the scalars/images/histograms/text plugins' metadata, so TensorBoard
and `tensorboard.backend.event_processing.event_accumulator` read them as before) through the
`tensorboard` package's protobufs and record framing, and the same console lines (`[step] k=v, ...`).

Event files are written to a local directory; a gs:// workdir's events are uploaded by the caller
(`hooks.EventSync`, through `lsync_jax.storage`).
"""

from __future__ import annotations

import importlib.util
import io
import os
import socket
import threading
import time
from typing import Any, Iterable, Mapping

import numpy as np
from absl import logging


def tensorflow_installed() -> bool:
    """Whether clu's TensorFlow-based writers can be used (TensorFlow and clu both installed)."""
    try:
        return all(importlib.util.find_spec(name) is not None for name in ("tensorflow", "clu"))
    except (ImportError, ValueError):  # imports of it are blocked (sys.modules[name] is None, a finder refuses it)
        return False


def create_default_writer(logdir: str | None, *, just_logging: bool = False) -> Any:
    """Console lines, plus TensorBoard events in `logdir` (a local directory) unless `just_logging`
    (processes other than the first log only). clu's writer where TensorFlow is installed."""
    if tensorflow_installed():
        from clu import metric_writers

        return metric_writers.create_default_writer(logdir, just_logging=just_logging)
    writers: list[Any] = [LoggingWriter()]
    if logdir is not None and not just_logging:
        writers.append(SummaryWriter(logdir))
    return MultiWriter(writers)


def report_progress(num_train_steps: int, writer: Any, every_secs: float = 30.0) -> Any:
    """Steps/s and ETA on the console every `every_secs` and at the last step (clu's ReportProgress where
    TensorFlow is installed)."""
    if tensorflow_installed():
        from clu import periodic_actions

        return periodic_actions.ReportProgress(num_train_steps=num_train_steps, writer=writer, every_secs=every_secs)
    return ReportProgress(num_train_steps=num_train_steps, writer=writer, every_secs=every_secs)


class MetricWriter:
    """clu's `metric_writers.MetricWriter` interface (its module needs TensorFlow to import)."""

    def write_summaries(self, step: int, values: Mapping[str, Any], metadata: Mapping[str, Any] | None = None):
        raise NotImplementedError

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        raise NotImplementedError

    def write_images(self, step: int, images: Mapping[str, Any]):
        raise NotImplementedError

    def write_videos(self, step: int, videos: Mapping[str, Any]):
        raise NotImplementedError

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
        raise NotImplementedError

    def write_texts(self, step: int, texts: Mapping[str, str]):
        raise NotImplementedError

    def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets: Mapping[str, int] | None = None):
        raise NotImplementedError

    def write_hparams(self, hparams: Mapping[str, Any]):
        raise NotImplementedError

    def flush(self):
        raise NotImplementedError

    def close(self):
        raise NotImplementedError


def _shapes(values: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: np.shape(v) for k, v in values.items()}


class LoggingWriter(MetricWriter):
    """Every value to absl's INFO log, as clu's LoggingWriter prints it."""

    def write_summaries(self, step, values, metadata=None):
        logging.info("[%d] Got raw tensors: %s.", step, _shapes(values))

    def write_scalars(self, step, scalars):
        values = [f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(scalars.items())]
        logging.info("[%d] %s", step, ", ".join(values))

    def write_images(self, step, images):
        logging.info("[%d] Got images: %s.", step, _shapes(images))

    def write_videos(self, step, videos):
        logging.info("[%d] Got videos: %s.", step, _shapes(videos))

    def write_audios(self, step, audios, *, sample_rate):
        logging.info("[%d] Got audios: %s.", step, _shapes(audios))

    def write_texts(self, step, texts):
        logging.info("[%d] Got texts: %s.", step, dict(texts))

    def write_histograms(self, step, arrays, num_buckets=None):
        logging.info("[%d] Got histograms: %s.", step, _shapes(arrays))

    def write_hparams(self, hparams):
        logging.info("[Hyperparameters] %s", dict(hparams))

    def flush(self):
        logging.flush()

    def close(self):
        self.flush()


class MultiWriter(MetricWriter):
    """Every call to each of several writers."""

    def __init__(self, writers: Iterable[MetricWriter]):
        self.writers = list(writers)

    def _each(self, name: str, *args: Any, **kwargs: Any) -> None:
        for writer in self.writers:
            getattr(writer, name)(*args, **kwargs)

    def write_summaries(self, step, values, metadata=None):
        self._each("write_summaries", step, values, metadata)

    def write_scalars(self, step, scalars):
        self._each("write_scalars", step, scalars)

    def write_images(self, step, images):
        self._each("write_images", step, images)

    def write_videos(self, step, videos):
        self._each("write_videos", step, videos)

    def write_audios(self, step, audios, *, sample_rate):
        self._each("write_audios", step, audios, sample_rate=sample_rate)

    def write_texts(self, step, texts):
        self._each("write_texts", step, texts)

    def write_histograms(self, step, arrays, num_buckets=None):
        self._each("write_histograms", step, arrays, num_buckets)

    def write_hparams(self, hparams):
        self._each("write_hparams", hparams)

    def flush(self):
        self._each("flush")

    def close(self):
        self._each("close")


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def _uint8(images: np.ndarray) -> np.ndarray:
    """Images as TensorFlow's summary takes them: floats in [0, 1] (scaled to 0..255), or uint8 as is."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return np.clip(np.round(images.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)


class SummaryWriter(MetricWriter):
    """TensorBoard event files without TensorFlow: one `events.out.tfevents.*` file in `logdir`, holding
    the tensor summaries `tf.summary.scalar/image/histogram/text` write (what clu's SummaryWriter writes),
    framed as TFRecords. Writes go straight to the file (no queue); `flush` makes them visible."""

    def __init__(self, logdir: str):
        # Imported here: the protobufs of the `tensorboard` package (no TensorFlow needed)
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.plugins.histogram import summary_v2 as histogram_summary
        from tensorboard.plugins.image import metadata as image_metadata
        from tensorboard.plugins.scalar import summary_v2 as scalar_summary
        from tensorboard.plugins.text import summary_v2 as text_summary
        from tensorboard.summary.writer.record_writer import RecordWriter
        from tensorboard.util import tensor_util

        self._event_pb2, self._summary_pb2, self._tensor_util = event_pb2, summary_pb2, tensor_util
        self._scalar_pb, self._histogram_pb, self._text_pb = (scalar_summary.scalar_pb, histogram_summary.histogram_pb,
                                                              text_summary.text_pb)
        self._image_metadata = image_metadata
        os.makedirs(logdir, exist_ok=True)
        self.path = os.path.join(logdir, f"events.out.tfevents.{time.time():010.0f}.{socket.gethostname()}."
                                         f"{os.getpid()}.{id(self)}.v2")
        self._file = open(self.path, "wb")
        self._records = RecordWriter(self._file)
        self._lock = threading.Lock()
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    def _write(self, event: Any) -> None:
        with self._lock:
            self._records.write(event.SerializeToString())

    def _summary(self, step: int, summary: Any) -> None:
        self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def write_summaries(self, step, values, metadata=None):
        for key, value in values.items():
            summary = self._summary_pb2.Summary()
            entry = summary.value.add(tag=key, tensor=self._tensor_util.make_tensor_proto(np.asarray(value)))
            if metadata is not None:
                parsed = metadata if not isinstance(metadata, bytes) else (
                    self._summary_pb2.SummaryMetadata.FromString(metadata))
                entry.metadata.CopyFrom(parsed)
            self._summary(step, summary)

    def write_scalars(self, step, scalars):
        for key, value in scalars.items():
            self._summary(step, self._scalar_pb(key, np.asarray(value, np.float32)))

    def write_images(self, step, images):
        """[N, H, W, C] or [H, W, C], C in (1, 3, 4); floats in [0, 1] or uint8."""
        for key, value in images.items():
            value = _uint8(value)
            if value.ndim == 3:
                value = value[None]
            if value.ndim != 4 or value.shape[-1] not in (1, 3, 4):
                raise ValueError(f"image {key!r}: expected [N, H, W, C] with C in (1, 3, 4), got {value.shape}")
            height, width = value.shape[1:3]
            encoded = [str(width).encode(), str(height).encode()] + [_png(image) for image in value]
            summary = self._summary_pb2.Summary()
            summary.value.add(tag=key, metadata=self._image_metadata.create_summary_metadata(None, None),
                              tensor=self._tensor_util.make_tensor_proto(np.array(encoded, dtype=object)))
            self._summary(step, summary)

    def write_videos(self, step, videos):
        logging.log_first_n(logging.WARNING, "SummaryWriter: videos are not written to TensorBoard", 1)

    def write_audios(self, step, audios, *, sample_rate):
        logging.log_first_n(logging.WARNING, "SummaryWriter: audios are not written to TensorBoard", 1)

    def write_texts(self, step, texts):
        for key, value in texts.items():
            self._summary(step, self._text_pb(key, value))

    def write_histograms(self, step, arrays, num_buckets=None):
        num_buckets = num_buckets or {}
        for key, value in arrays.items():
            self._summary(step, self._histogram_pb(key, np.asarray(value), buckets=num_buckets.get(key)))

    def write_hparams(self, hparams):
        logging.info("[Hyperparameters] %s (not written to TensorBoard without TensorFlow)", dict(hparams))

    def flush(self):
        with self._lock:
            if not self._file.closed:
                self._file.flush()

    def close(self):
        with self._lock:
            if not self._file.closed:
                self._file.close()


def _format_secs(secs: float) -> str:
    """'1h2m3s' style, as clu prints an ETA."""
    secs = int(max(secs, 0))
    hours, rest = divmod(secs, 3600)
    minutes, seconds = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "") + f"{seconds}s"


class ReportProgress:
    """clu's `periodic_actions.ReportProgress` for the loop: called after every step; every `every_secs`
    and at `num_train_steps` it logs steps/s, the share done and the ETA, and writes `steps_per_sec` and
    `uptime` scalars. The first call only starts the clock."""

    def __init__(self, *, num_train_steps: int | None = None, writer: MetricWriter | None = None,
                 every_secs: float = 60.0):
        self.num_train_steps = num_train_steps if num_train_steps is not None and num_train_steps >= 0 else None
        self.writer, self.every_secs = writer, every_secs
        self._t0 = time.monotonic()
        self._previous: tuple[int, float] | None = None

    def __call__(self, step: int, t: float | None = None) -> bool:
        t = time.monotonic() if t is None else t
        if self._previous is None:
            self._previous = (step, t)
            return False
        previous_step, previous_t = self._previous
        due = t - previous_t > self.every_secs or step == self.num_train_steps
        if step == previous_step or not due:
            return False
        steps_per_sec = (step - previous_step) / max(t - previous_t, 1e-9)
        message = f"{steps_per_sec:.1f} steps/s"
        if self.num_train_steps:
            eta = (self.num_train_steps - step) / steps_per_sec if steps_per_sec > 0 else float("inf")
            message += (f", {100 * step / self.num_train_steps:.1f}% ({step}/{self.num_train_steps}), ETA: "
                        + (_format_secs(eta) if np.isfinite(eta) else "unknown"))
        logging.info("%s", message)
        if self.writer is not None:
            self.writer.write_scalars(step, {"steps_per_sec": steps_per_sec})
            self.writer.write_scalars(step, {"uptime": time.monotonic() - self._t0})
        self._previous = (step, t)
        return True
