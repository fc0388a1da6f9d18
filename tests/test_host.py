"""lsync_jax.host.PhaseClock: seconds per phase, nested phases counted once, generators' work timed."""

from lsync_jax import host


class FakeTime:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_phases_nest_and_every_second_is_counted_once(monkeypatch):
    clock_time = FakeTime()
    monkeypatch.setattr(host.time, "perf_counter", clock_time)
    clock = host.PhaseClock()
    with clock.phase("training"):
        clock_time.now += 3.0
        with clock.phase("checkpoints"):
            clock_time.now += 2.0
        clock_time.now += 1.0
    with clock.phase("checkpoints"):
        clock_time.now += 0.5
    clock_time.now += 4.0  # in no phase
    assert clock.totals == {"training": 4.0, "checkpoints": 2.5}
    lines = clock.report()
    assert lines[0] == "where the time went (10.5 s in all):"
    names = [line.split()[0] for line in lines[1:]]
    assert names == ["training", "checkpoints", "other"]  # phases largest first, then the rest
    assert "4.0 s" in lines[1] and "38.1%" in lines[1] and "4.0 s" in lines[3]


def test_a_phase_ended_by_an_error_is_still_counted(monkeypatch):
    clock_time = FakeTime()
    monkeypatch.setattr(host.time, "perf_counter", clock_time)
    clock = host.PhaseClock()
    try:
        with clock.phase("start-up"):
            clock_time.now += 1.5
            raise ValueError("bad config")
    except ValueError:
        pass
    assert clock.totals == {"start-up": 1.5}


def test_timed_counts_only_the_generators_work(monkeypatch):
    clock_time = FakeTime()
    monkeypatch.setattr(host.time, "perf_counter", clock_time)
    clock = host.PhaseClock()

    def produce():
        for i in range(3):
            clock_time.now += 2.0  # sampling
            yield i

    with clock.phase("FID"):
        for _ in clock.timed(produce(), "FID: sampling"):
            clock_time.now += 1.0  # the consumer's Inception pass
    assert clock.totals == {"FID: sampling": 6.0, "FID": 3.0}


def test_cpu_compiler_options_keep_results_and_yield_to_the_user(monkeypatch):
    import jax
    import numpy as np

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    options = host.compiler_options("cpu")
    assert options == host.CPU_COMPILER_OPTIONS  # this jaxlib knows them
    assert host.compiler_options("gpu") == {} and host.compiler_options("tpu") == {}
    # the same convolution and dot with and without them (YNNPACK off changes the kernel, not the math)
    x = np.random.RandomState(0).randn(2, 9, 9, 3).astype(np.float32)
    w = np.random.RandomState(1).randn(3, 3, 3, 4).astype(np.float32)

    def f(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y.reshape(2, -1) @ y.reshape(2, -1).T

    np.testing.assert_allclose(jax.jit(f, compiler_options=options)(x, w), jax.jit(f)(x, w), rtol=1e-5)
    # an option set in XLA_FLAGS is the user's; one this jaxlib does not know is dropped, not fatal
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
    assert "xla_cpu_experimental_ynn_fusion_type" not in host.compiler_options("cpu")
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setattr(host, "CPU_COMPILER_OPTIONS", dict(host.CPU_COMPILER_OPTIONS, xla_cpu_no_such_option="1"))
    assert host.compiler_options("cpu") == {"xla_cpu_experimental_ynn_fusion_type": ""}


def test_cpu_devices_apply_before_the_backends_start_and_are_checked(monkeypatch):
    import os
    import subprocess
    import sys

    import pytest

    code = ("from lsync_jax import host; import jax; host.set_cpu_devices(3); print(jax.device_count()); "
            "host.set_cpu_devices(3); host.set_cpu_devices(2); print(jax.device_count())")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, JAX_PLATFORMS="cpu"), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3", "3"]  # too late for 2: logged, and the run keeps its 3
    assert "cpu_devices=2 not applied" in out.stderr
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    with pytest.raises(ValueError, match="config.distributed.cpu_devices=0"):
        host.set_cpu_devices(0)
