"""The fit check: Cloud TPU names to topologies, the compiler's out-of-memory read back, and (tier
`tpu_compile`, with libtpu installed) a tiny SiT LayerSync step compiled for a one-host and a four-host
v5e slice, and a batch that cannot fit refused, naming HBM."""

import importlib.util
import os
import subprocess
import sys

import pytest

from lsync_jax.configs import tiny
from lsync_jax.host import cpu_pin
from lsync_jax.tools.fit import CHIPS, parse_out_of_memory, parse_target

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu (pip install 'lsync-jax[tpu-compile]', Linux x86_64) is not installed")


@pytest.mark.parametrize("name, chips, slices, topology, hosts", [
    ("v5e-4", 4, 1, (2, 2), 1), ("v5litepod-16", 16, 1, (4, 4), 4), ("v5e-8", 8, 1, (2, 4), 1),
    ("v6e-8", 8, 1, (2, 4), 1), ("v4-8", 4, 1, (2, 2, 1), 1), ("v4-32", 16, 1, (2, 2, 4), 4),
    ("v5p-8", 4, 1, (2, 2, 1), 1), ("v5p-64", 32, 1, (2, 4, 4), 8), ("2xv5p-64", 32, 2, (2, 4, 4), 8),
    ("v5e-256", 256, 1, (16, 16), 64),
])
def test_cloud_tpu_names_become_topologies(name, chips, slices, topology, hosts):
    target = parse_target(name)
    assert (target.chips, target.slices, target.topology, target.hosts_per_slice) == (chips, slices, topology, hosts)
    assert target.devices == chips * slices


@pytest.mark.parametrize("name, problem", [
    ("v5e16", "not a Cloud TPU accelerator type"), ("v7x-8", "unknown TPU generation"),
    ("v4-7", "N must be a multiple of 2"), ("v5e-12", "power of two"), ("v5p-2", "power of two >= 4"),
])
def test_a_bad_target_is_named(name, problem):
    with pytest.raises(ValueError, match=problem):
        parse_target(name)


def test_every_chip_cites_its_published_specs():
    for chip in CHIPS.values():
        assert chip.source.startswith("cloud.google.com/tpu/docs/") and chip.hbm_gib and chip.peak_bf16


def test_the_compilers_out_of_memory_is_read_back():
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (22.42G) "
               "exceeds available HBM (15.75G).")
    needed, usable = parse_out_of_memory(message)
    assert needed == pytest.approx(22.42 * 1024**3) and usable == pytest.approx(15.75 * 1024**3)
    assert parse_out_of_memory("INTERNAL: something else") is None


def test_the_cpu_is_pinned_only_where_libtpu_has_no_tpu():
    assert cpu_pin({}, plugins=["libtpu"], tpu_attached=False) == "cpu"
    assert cpu_pin({}, plugins=["libtpu"], tpu_attached=True) is None  # a TPU VM
    assert cpu_pin({"JAX_PLATFORMS": "tpu"}, plugins=["libtpu"], tpu_attached=False) is None  # the user's choice
    assert cpu_pin({}, plugins=["cuda"], tpu_attached=False) is None  # a GPU host
    assert cpu_pin({}, plugins=[], tpu_attached=False) is None


def _tiny_config(batch):
    config = tiny.get_config()
    config.data.batch_size = batch
    config.train.num_grid_samples = 0
    return config


@pytest.mark.tpu_compile
@needs_libtpu
@pytest.mark.parametrize("target, hosts", [("v5e-4", 1), ("v5e-16", 4)])
def test_a_tiny_layersync_step_compiles_for_a_tpu_slice(target, hosts):
    from lsync_jax.tools.fit import check_fit, topology_devices

    devices = topology_devices(parse_target(target))
    assert len({d.process_index for d in devices}) == hosts  # v5e 4x4: the mesh spans four hosts
    report = check_fit(_tiny_config(32), target, programs=False)
    assert report.fits and report.device_kind == "TPU v5 lite" and report.devices == len(devices)
    assert report.usable_hbm == pytest.approx(15.75 * 1024**3)
    step = report.step
    assert step.fits and step.arguments > sum(report.state.values()) > 0 and step.temporaries > 0
    assert report.state["params"] == report.state["ema"]  # replicated (data mesh): whole copies per chip
    # FLOPs per chip: at least the analytic model FLOPs of its share of the batch
    assert step.flops >= 0.9 * report.model_flops > 0
    seconds, how = report.step_time()
    assert seconds > 0 and how.startswith("compiler estimate")
    assert "verdict: fits" in report.lines()[-1]


@pytest.mark.tpu_compile
@needs_libtpu
def test_a_batch_that_cannot_fit_is_refused_naming_hbm():
    env = dict(os.environ, LSYNC_JAX_HOST_TUNABLES="0", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "launch/train.py", "--config=configs/tiny.py", "--check", "--target=v5e-4",
           "--config.train.num_grid_samples=0", "--config.data.batch_size=65536",
           "--config.model.overrides.input_size=64", "--config.data.synthetic_shape=(64, 64, 1)"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr[-2000:]
    assert "does NOT fit" in out.stdout and "HBM" in out.stdout and "try --config.train.microbatches=" in out.stdout


@pytest.mark.tpu_compile
@needs_libtpu
def test_splash_attention_compiles_for_a_tpu_slice_in_the_step_and_the_sampler():
    from lsync_jax.tools.fit import check_fit

    config = _tiny_config(32)
    config.model.overrides.attention_impl = "splash"
    config.model.overrides.input_size = 64  # 256 tokens: whole blocks of 128
    config.train.num_grid_samples = 8
    report = check_fit(config, "v5e-4")
    assert report.fits and [p.name for p in [report.step, *report.others]] == ["train step", "sampler (sample grid)"]
