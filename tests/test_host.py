"""lsync_jax.host: PhaseClock (seconds per phase, nested phases counted once, generators' work timed), the CPU
compiler options, CPU devices and the glibc tunables a CPU run restarts with."""

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


def test_host_tunables_are_added_only_where_they_apply():
    glibc, thp, none = ("glibc", "2.36"), "always [madvise] never", []
    env, why = host.host_tunables_env({"PATH": "/bin"}, libc=glibc, thp_setting=thp, plugins=none)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"} and "hugetlb=1" in why
    # the user's other tunables are kept; a setting of this one (or the restarted process) is left alone
    env, _ = host.host_tunables_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, libc=glibc, thp_setting=thp,
                                    plugins=none)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    for environ, libc, setting, plugins, reason in [
            ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, glibc, thp, none, "already sets glibc.malloc.hugetlb"),
            ({host.HOST_TUNABLES_SWITCH: "0"}, glibc, thp, none, "LSYNC_JAX_HOST_TUNABLES=0"),
            ({}, ("glibc", "2.31"), thp, none, "not glibc >= 2.35"),
            ({}, ("", ""), thp, none, "not glibc >= 2.35"),  # musl, macOS
            ({}, glibc, "always madvise [never]", none, "huge pages are off"),
            ({}, glibc, thp, ["xla_cuda12"], "accelerator plugins installed (xla_cuda12)"),
            ({"JAX_PLATFORMS": "cuda,cpu"}, glibc, thp, ["xla_cuda12"], "accelerator plugins")]:
        env, why = host.host_tunables_env(environ, libc=libc, thp_setting=setting, plugins=plugins)
        assert env is None and reason in why, (environ, why)
    # a GPU/TPU host told to run on the CPU is a CPU run
    env, _ = host.host_tunables_env({"JAX_PLATFORMS": "cpu"}, libc=glibc, thp_setting=thp, plugins=["libtpu"])
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_restart_keeps_the_process_its_arguments_and_options(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "entry.py"
    script.write_text(
        "import os, sys\n"
        "from lsync_jax import host\n"
        "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], sys.flags.dont_write_bytecode,\n"
        "      flush=True)\n"
        "if not os.environ.get('GLIBC_TUNABLES'):  # the decision is tested above; here, the restart itself\n"
        "    host.host_tunables_env = lambda: (dict(os.environ, GLIBC_TUNABLES=host.HOST_TUNABLES), 'test')\n"
        "if __name__ == '__main__':\n"
        "    host.restart_with_host_tunables()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host.HOST_TUNABLES_SWITCH)}
    out = subprocess.run([sys.executable, "-B", str(script), "--workdir=/tmp/x", "two words"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first, second = [line.split(" ", 2) for line in out.stdout.splitlines()]
    assert first[0] == second[0]  # the same process (exec), so a scheduler's signals still reach the run
    assert first[1] == "None" and second[1] == "glibc.malloc.hugetlb=1"
    assert first[2] == second[2] == "['--workdir=/tmp/x', 'two words'] 1"  # arguments and -B kept
    assert "restarting with test" in out.stderr and "LSYNC_JAX_HOST_TUNABLES=0 turns this off" in out.stderr
