"""`lsync_jax.cli.run`: a user error prints its message alone and exits 1, any other error keeps its
traceback, and --traceback / LSYNC_JAX_TRACEBACK=1 shows every traceback."""

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lsync_jax import cli, host, storage

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV = dict(os.environ, JAX_PLATFORMS="cpu", LSYNC_JAX_HOST_TUNABLES="0")
ENV.pop(cli.TRACEBACK_ENV, None)


def raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return e
    raise AssertionError("no error")


def test_user_errors_are_the_librarys_own():
    # a ValueError lsync_jax raises on purpose
    assert cli.is_user_error(raised(lambda: host.set_cpu_devices(0)))
    here = (os.path.dirname(__file__),)  # as if this file were the launch script

    def storage_error():
        raise storage.StorageError("gs://bucket is not reachable")

    def key_error():
        raise KeyError("key")

    # an exception type lsync_jax defines, raised on purpose
    assert cli.is_user_error(raised(storage_error), own_dirs=here)
    # a ValueError raised inside numpy (a C function: no raise statement of ours) keeps its traceback
    assert not cli.is_user_error(raised(lambda: np.zeros(3).reshape(2)), own_dirs=here)
    # so does an error type that marks a bug, even raised on purpose
    assert not cli.is_user_error(raised(key_error), own_dirs=here)
    # and anything raised outside the library and the script
    assert not cli.is_user_error(raised(storage_error))


SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from absl import flags
    from lsync_jax import cli

    flags.DEFINE_string("what", "user", "user | bug")


    def main(argv):
        if flags.FLAGS.what == "user":
            raise FileNotFoundError("--data=/nowhere not found: set --data to the prepared directory")
        np.zeros(3).reshape(2)  # a ValueError from inside numpy: a bug


    if __name__ == "__main__":
        cli.run(main)
    """
)


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "prog.py"
    path.write_text(SCRIPT)
    return path


def run_script(path, *args, env=ENV):
    return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


def test_a_user_error_prints_its_message_alone(script):
    out = run_script(script, "--what=user")
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[-1] == "FileNotFoundError: --data=/nowhere not found: set --data to the prepared directory"
    assert "--traceback or LSYNC_JAX_TRACEBACK=1" in lines[-2]


def test_an_unexpected_error_keeps_its_traceback(script):
    out = run_script(script, "--what=bug")
    assert out.returncode == 1 and "Traceback" in out.stderr and "reshape" in out.stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_tracebacks_on_request(script, how):
    out = run_script(script, "--what=user", *(["--traceback"] if how == "flag" else []),
                     env=dict(ENV, LSYNC_JAX_TRACEBACK="1") if how == "env" else ENV)
    assert out.returncode == 1 and "Traceback" in out.stderr and "FileNotFoundError" in out.stderr


@pytest.mark.slow
def test_a_launch_script_shows_a_missing_path_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "preprocess.py"), f"--images={tmp_path}",
                          f"--vae={tmp_path / 'no-vae'}", f"--out={tmp_path / 'out'}"],
                         capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(f"FileNotFoundError: --vae='{tmp_path / 'no-vae'}' not found")


@pytest.mark.slow
@pytest.mark.parametrize("check", [False, True])
def test_train_without_data_dir_says_so_in_one_line(tmp_path, check):
    """The issue's example: a missing --config.data.dir was a clear message under 20 lines of traceback."""
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config=configs/imagenet256.py",
                          f"--workdir={tmp_path / 'run'}", *(["--check"] if check else [])],
                         capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[-1] == ("FileNotFoundError: no latent directory given: set --config.data.dir to the output of "
                         "launch/preprocess.py")
    assert len(lines) <= 4  # at most the phase line, the hint and the error


def test_every_launch_script_runs_through_the_wrapper():
    """Every launch/*.py ends with `cli.run(main)`, and every one has a console script."""
    scripts = sorted(p.stem for p in (ROOT / "launch").glob("*.py"))
    assert scripts == sorted(cli.SCRIPTS)
    for name in scripts:
        text = (ROOT / "launch" / f"{name}.py").read_text()
        assert "restart_with_host_tunables" not in text and "app.run(" not in text, name
        assert text.rstrip().endswith('if __name__ == "__main__":\n    cli.run(main)'), name
        assert callable(getattr(cli, name))
