"""Data: sources (Fashion-MNIST IDX files, tfds ArrayRecord, class folders, VAE latent shards,
synthetic) and grain pipelines; offline latent preprocessing in `lsync_jax.tools.preprocess`."""

from lsync_jax.data.fashion_mnist import DEFAULT_DIR as FASHION_MNIST_DIR, load_fashion_mnist, read_idx
from lsync_jax.data.humanml3d import HumanML3DSource
from lsync_jax.data.latents import LatentSource
from lsync_jax.data.moving_fmnist import MovingFashionMNISTSource
from lsync_jax.data.pipeline import LoaderSpec, global_batch, make_loader
from lsync_jax.data.registry import SOURCES, DataSource, register_source, source_builder
from lsync_jax.data.sequences import SequenceSource
from lsync_jax.data.sources import ArraySource, ImageFolderSource, ImageRecords, SyntheticSource, TfdsSource

__all__ = [
    "FASHION_MNIST_DIR", "load_fashion_mnist", "read_idx",
    "LoaderSpec", "make_loader", "global_batch",
    "DataSource", "SOURCES", "register_source", "source_builder", "ImageRecords",
    "ArraySource", "ImageFolderSource", "LatentSource", "SyntheticSource", "TfdsSource",
    "MovingFashionMNISTSource", "SequenceSource", "HumanML3DSource",
]
