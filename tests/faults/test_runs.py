"""Issue 17, the checkpoint and run rows: every fault a training run meets ends in a clear message
and nothing written is lost. Faults are injected at the I/O layer (EACCES, ENOSPC raised by the
functions Python and Orbax write through; files truncated or deleted on disk), since the tests run
as root. Anything that could hang is bounded by an alarm or a subprocess timeout.

Rows: 1 keep_checkpoints < 1; 2 unwritable directories and failing saves; 3 damaged checkpoints;
5 non-finite states; 6 data-order changes on resume; 7 quiet teardown after a failed save;
9 the preemption exit code; 11 the transport recorded and checked; 13 init_from says what it loaded.
"""

import builtins
import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lsync_jax.configs import tiny
from lsync_jax.recipes import PREEMPTED_EXIT_CODE, train_and_evaluate
from lsync_jax.sharding import make_mesh
from lsync_jax.train import loop as train_loop_module, setup as train_setup
from lsync_jax.train.checkpoint import Checkpointer, CheckpointSaveError
from lsync_jax.train.hooks import NonFiniteLossError
from lsync_jax.workdir import (
    DamagedCheckpointError,
    abstract_params,
    checkpoint_steps,
    load_params,
    read_meta,
    restore_params,
)
from tests.helpers import alarm, quick

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI_ENV = dict(os.environ, JAX_DEFAULT_PRNG_IMPL="threefry2x32", JAX_PLATFORMS="cpu")


def run_config(steps=4, **train):
    """The tiny config, `steps` steps of batch 8, a checkpoint every 2 steps."""
    config = quick(tiny.get_config(), steps=steps)
    config.train.checkpoint_every = 2
    config.train.update(train)
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with checkpoints at steps 2 and 4 (one compile for the module); tests copy it."""
    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    train_and_evaluate(run_config(), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    return workdir


def copy_of(trained, tmp_path, name="run"):
    target = str(tmp_path / name)
    shutil.copytree(trained, target)
    return target


def listing(workdir):
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def warnings_in(caplog, text):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


def close_all(hooks):
    for hook in hooks:
        hook.close()


def inject(monkeypatch, under, error, active=lambda: True):
    """Make every write under directory `under` fail with OSError(`error`) at the I/O layer: opening a
    file for writing and creating a directory (what Python, etils and Orbax write through)."""
    under = os.path.abspath(under)
    real_open, real_mkdir = builtins.open, os.mkdir

    def hit(path):
        try:
            path = os.path.abspath(os.fspath(path))
        except TypeError:  # a file descriptor
            return False
        return active() and (path == under or path.startswith(under + os.sep))

    def fail(path):
        raise OSError(error, os.strerror(error), os.fspath(path))

    def fake_open(file, mode="r", *args, **kwargs):
        if any(m in mode for m in "wax+") and hit(file):
            fail(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if hit(path):
            fail(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


def after_setup(monkeypatch):
    """A switch that turns on once the run is set up (the disk fails mid-run, not at start)."""
    state = {"on": False}
    real = train_loop_module.setup

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        state["on"] = True
        return out

    monkeypatch.setattr(train_loop_module, "setup", wrapped)
    return lambda: state["on"]


# -- row 1: keep_checkpoints < 1 ----------------------------------------------------------------------


@pytest.mark.slow
def test_row1_keep_settings_below_one_are_refused_and_nothing_is_deleted(trained, tmp_path):
    fresh = str(tmp_path / "fresh")
    with pytest.raises(ValueError, match=r"config\.train\.keep_checkpoints must be >= 1, got 0"):
        train_and_evaluate(run_config(keep_checkpoints=0), fresh)
    assert not os.path.exists(os.path.join(fresh, "checkpoints"))
    workdir = copy_of(trained, tmp_path)
    with pytest.raises(ValueError, match=r"config\.train\.keep_checkpoints must be >= 1, got 0"):
        train_and_evaluate(run_config(steps=6, keep_checkpoints=0), workdir)
    with pytest.raises(ValueError, match=r"config\.train\.keep_every must be >= 1 or None"):
        train_and_evaluate(run_config(steps=6, keep_every=0), workdir)
    assert listing(workdir) == ["2", "4"]
    # the engine itself refuses a policy that keeps nothing, for callers that skip the config check
    with pytest.raises(ValueError, match=r"keep_checkpoints\) must be >= 1"):
        Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=0)
    with pytest.raises(ValueError, match=r"keep_every\) must be >= 1"):
        Checkpointer(os.path.join(workdir, "checkpoints"), keep_every=0)
    assert listing(workdir) == ["2", "4"]


# -- row 2: unwritable directories, failing saves --------------------------------------------------------


@pytest.mark.parametrize("directory", ["checkpoints", "samples", "eval"])
def test_row2_an_unwritable_directory_fails_at_start_naming_it(tmp_path, monkeypatch, directory):
    workdir = str(tmp_path / "run")
    config = run_config(num_grid_samples=4)
    config.eval.every = 2 if directory == "eval" else 0
    inject(monkeypatch, os.path.join(workdir, directory), errno.EACCES)

    def too_late(*args, **kwargs):
        raise AssertionError("the run got past the directory check")

    monkeypatch.setattr(train_setup, "build_encoder_features", too_late)
    monkeypatch.setattr(train_setup, "abstract_state", too_late)
    start = time.perf_counter()
    with alarm(120), pytest.raises(OSError, match=re.escape(f"{os.path.join(workdir, directory)} is not writable")) \
            as info:
        train_and_evaluate(config, workdir)
    assert info.value.errno == errno.EACCES and "Permission denied" in str(info.value)
    assert time.perf_counter() - start < 60


def test_row2_sibling_sampling_checks_its_output_directory_before_loading(tmp_path, monkeypatch):
    from lsync_jax.eval import sampling

    out = str(tmp_path / "samples")
    inject(monkeypatch, out, errno.EACCES)

    def too_late(*args, **kwargs):
        raise AssertionError("sampling started before its output directory was checked")

    monkeypatch.setattr(sampling, "load_params", too_late)
    with pytest.raises(OSError, match=re.escape(f"{out} is not writable (Permission denied)")):
        sampling.sample_from_workdir(run_config(), str(tmp_path / "run"), out, 8, 8)
    with pytest.raises(ValueError, match=r"--batch_size must be >= 1, got 0"):  # row 8's sibling in this loader
        sampling.sample_from_workdir(run_config(), str(tmp_path / "run"), str(tmp_path / "other"), 8, 0)


@pytest.mark.slow
def test_row2_a_save_that_fails_mid_run_ends_it_at_once_naming_the_path(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    inject(monkeypatch, os.path.join(workdir, "checkpoints"), errno.EACCES, active=after_setup(monkeypatch))
    start = time.perf_counter()
    with alarm(240), pytest.raises(CheckpointSaveError) as info:
        train_and_evaluate(run_config(steps=2, async_checkpoints=True), workdir)
    message = str(info.value)
    assert f"saving checkpoint 2 into {os.path.join(workdir, 'checkpoints')} failed" in message
    assert "Permission denied" in message and "\n" not in message
    assert time.perf_counter() - start < 200  # the unfixed run waited 300 s for the step directory
    assert [d for d in listing(workdir) if d.isdigit()] == []


# -- row 3: damaged checkpoints ---------------------------------------------------------------------------


def _largest(directory):
    files = [os.path.join(directory, f) for f in os.listdir(directory)]
    return max(files, key=os.path.getsize)


def damage(step_dir, kind):
    """Damage one file of a checkpoint step as a crash or a bad disk would."""
    state = os.path.join(step_dir, "state")
    if kind == "meta deleted":
        os.remove(os.path.join(step_dir, "meta", "metadata"))
    elif kind == "data truncated":
        data = os.path.join(step_dir, "data")
        open(os.path.join(data, os.listdir(data)[0]), "w").close()
    elif kind == "_METADATA truncated":
        path = os.path.join(state, "_METADATA")
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif kind == "manifest deleted":
        os.remove(os.path.join(state, "manifest.ocdbt"))
    elif kind in ("ocdbt data file truncated", "every ocdbt data file truncated"):
        directory = os.path.join(state, "ocdbt.process_0", "d")
        for path in ([_largest(directory)] if kind == "ocdbt data file truncated" else
                     [os.path.join(directory, f) for f in os.listdir(directory)]):
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
    else:
        raise ValueError(kind)


DAMAGES = ["meta deleted", "data truncated", "_METADATA truncated", "manifest deleted", "ocdbt data file truncated"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", DAMAGES)
def test_row3_a_damaged_latest_checkpoint_is_set_aside_in_one_line_and_the_run_resumes(trained, tmp_path, kind,
                                                                                       caplog, capfd):
    workdir = copy_of(trained, tmp_path)
    damage(os.path.join(workdir, "checkpoints", "4"), kind)
    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        run, hooks = train_setup.setup(run_config(steps=6), workdir)
    close_all(hooks)
    assert run.start == 2
    assert listing(workdir) == ["2", "4.damaged-1"]  # renamed, never deleted
    lines = warnings_in(caplog, "damaged")
    assert len(lines) == 1 and "checkpoint 4 is damaged" in lines[0] and "4.damaged-1" in lines[0], lines
    assert "\n" not in lines[0] and len(lines[0]) < 800
    err = capfd.readouterr().err
    assert "Event loop is closed" not in err and err.count("tensorstore") < 3, err[-3000:]


@pytest.mark.slow
def test_row3_the_resumed_run_saves_over_the_set_aside_step_and_finishes(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    damage(os.path.join(workdir, "checkpoints", "4"), "ocdbt data file truncated")
    train_and_evaluate(run_config(steps=6), workdir)
    assert listing(workdir) == ["2", "4", "4.damaged-1", "6"]


@pytest.mark.slow
def test_row3_no_intact_checkpoint_is_an_error_and_nothing_is_moved(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    damage(os.path.join(workdir, "checkpoints", "4"), "meta deleted")
    damage(os.path.join(workdir, "checkpoints", "2"), "ocdbt data file truncated")
    with pytest.raises(DamagedCheckpointError, match=r"no checkpoint in it can be resumed \(step 4: .*; step 2: .*\)"
                                                     r"\. Nothing was moved"):
        train_setup.setup(run_config(steps=6), workdir)
    assert listing(workdir) == ["2", "4"]


@pytest.mark.slow
def test_row3_sampling_analysis_and_init_from_fall_back_to_the_intact_checkpoint(trained, tmp_path, caplog):
    workdir = copy_of(trained, tmp_path)
    damage(os.path.join(workdir, "checkpoints", "4"), "every ocdbt data file truncated")  # the weights too
    config = run_config()
    with caplog.at_level(logging.WARNING):
        _, _, step = load_params(config, workdir, make_mesh())  # launch/sample.py's loader
    assert step == 2
    assert len(warnings_in(caplog, "its restore failed")) == 1
    with pytest.raises(DamagedCheckpointError, match="checkpoint .*/4 is damaged: its restore failed"):
        load_params(config, workdir, make_mesh(), step=4)  # a named step is not replaced by another
    caplog.clear()
    with caplog.at_level(logging.INFO):
        model = train_setup.build_model(config)
        restore_params(workdir, abstract_params(config, model, make_mesh()), config=config)  # train.init_from
    loaded = [r.getMessage() for r in caplog.records if "loaded params and EMA params" in r.getMessage()]
    assert len(loaded) == 1 and loaded[0].endswith(os.path.join(workdir, "checkpoints", "2"))
    assert listing(workdir) == ["2", "4"]  # readers leave the run's files in place

    damage(os.path.join(workdir, "checkpoints", "4"), "meta deleted")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert checkpoint_steps(workdir) == [2]  # launch/analyze.py's list of steps
    assert len(warnings_in(caplog, "meta/metadata is missing")) == 1


# -- row 5: non-finite states ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # lr=1e39 in float32: inf
def test_row5_a_non_finite_state_is_never_saved_and_the_last_good_checkpoint_is_named(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    config = run_config(steps=6, checkpoint_every=1)
    config.optimizer.lr = 1e39  # the update after step 5's (finite) loss overflows the weights
    with pytest.raises(NonFiniteLossError, match=r"the state after step 5 has non-finite params and ema_params: not "
                                                 r"saved\. The last good checkpoint \(step 4\) is kept"):
        train_and_evaluate(config, workdir)
    assert listing(workdir) == ["2", "4"]


# -- row 6: data order on resume --------------------------------------------------------------------------


@pytest.mark.slow
def test_row6_a_resume_that_changes_the_data_order_or_batch_is_refused_naming_the_key(trained, tmp_path, caplog):
    workdir = copy_of(trained, tmp_path)
    changes = {"config.data.batch_size: checkpoint 8, config 16": lambda c: c.data.update(dict(batch_size=16)),
               "config.seed: checkpoint 0, config 1": lambda c: c.update(dict(seed=1)),
               "the dataset size (examples in config.data's source): checkpoint 256, config 128":
                   lambda c: c.data.update(dict(synthetic_size=128)),
               "config.data.flip: checkpoint False, config True": lambda c: c.data.update(dict(flip=True))}
    for named, change in changes.items():
        config = run_config(steps=6)
        change(config)
        with pytest.raises(ValueError, match="would silently change the data order or batch") as info:
            train_setup.setup(config, workdir)
        assert named in str(info.value) and "--config.train.allow_data_change=True" in str(info.value)
    assert listing(workdir) == ["2", "4"]

    config = run_config(steps=6, allow_data_change=True)
    config.data.batch_size = 16
    with caplog.at_level(logging.WARNING):
        run, hooks = train_setup.setup(config, workdir)
    close_all(hooks)
    assert run.start == 4 and len(warnings_in(caplog, "allowed by config.train.allow_data_change")) == 1

    for step in ("2", "4"):  # a checkpoint from before the record: nothing to compare, it resumes
        path = os.path.join(workdir, "checkpoints", step, "meta", "metadata")
        with open(path) as f:
            meta = json.load(f)
        del meta["data"]
        with open(path, "w") as f:
            json.dump(meta, f)
    config = run_config(steps=6)
    config.data.batch_size = 16
    run, hooks = train_setup.setup(config, workdir)
    close_all(hooks)
    assert run.start == 4


# -- row 7: quiet teardown after a failed save ------------------------------------------------------------

_DISK_FULL_DRIVER = r"""
import builtins, errno, os, runpy, sys
import lsync_jax.train.loop as loop
workdir = sys.argv[1]
under = os.path.join(os.path.abspath(workdir), "checkpoints")
on = []
real_open, real_setup = builtins.open, loop.setup
def fake_open(file, mode="r", *args, **kwargs):  # the meta item's file: the arrays are still being written
    if on and any(m in mode for m in "wax+") and isinstance(file, (str, os.PathLike)) \
            and os.path.abspath(os.fspath(file)).startswith(under + os.sep) \
            and os.path.basename(os.fspath(file)) == "metadata":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(file))
    return real_open(file, mode, *args, **kwargs)
def setup(*args, **kwargs):
    out = real_setup(*args, **kwargs)
    on.append(1)  # the disk fills up once the run is going
    return out
builtins.open, loop.setup = fake_open, setup
sys.argv = ["launch/train.py", "--config=configs/tiny.py", "--workdir=" + workdir] + sys.argv[2:]
runpy.run_path("launch/train.py", run_name="__main__")
"""


@pytest.mark.slow
def test_row7_disk_full_during_an_async_save_ends_with_the_error_as_the_last_line(tmp_path):
    workdir = str(tmp_path / "run")
    out = subprocess.run([sys.executable, "-c", _DISK_FULL_DRIVER, workdir, "--config.train.num_steps=4",
                          "--config.train.checkpoint_every=2", "--config.train.num_grid_samples=0"],
                         cwd=ROOT, env=CLI_ENV, capture_output=True, text=True, timeout=600)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 1, out.stderr[-3000:]
    assert "CheckpointSaveError" in lines[-1] and "No space left on device" in lines[-1], lines[-20:]
    assert os.path.join(workdir, "checkpoints") in lines[-1]
    assert len(lines) < 120, "\n".join(lines)  # the unfixed run printed 2,500-3,100 lines
    assert "Event loop is closed" not in out.stderr
    assert "During handling of the above exception" not in out.stderr


# -- row 9: the preemption exit code ----------------------------------------------------------------------

_PREEMPTED_DRIVER = r"""
import runpy, sys
import lsync_jax.recipes as recipes
def preempted(config, workdir):
    raise recipes.Preempted(3, workdir)
recipes.train_and_evaluate = preempted
sys.argv = ["launch/train.py", "--config=configs/tiny.py", "--workdir=" + sys.argv[1]]
runpy.run_path("launch/train.py", run_name="__main__")
"""


def test_row9_launch_train_maps_preemption_to_its_documented_exit_code(tmp_path):
    assert PREEMPTED_EXIT_CODE == 75  # EX_TEMPFAIL: not 0 (finished), not 1 (failed)
    out = subprocess.run([sys.executable, "-c", _PREEMPTED_DRIVER, str(tmp_path)], cwd=ROOT, env=CLI_ENV,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == PREEMPTED_EXIT_CODE, out.stderr[-3000:]
    with open(os.path.join(ROOT, "docs", "training.md")) as f:
        docs = f.read()
    assert "exit code 75" in docs and "scontrol requeue" in docs
    # the real SIGTERM run: tests/train/test_loop.py::test_sigterm_saves_before_exiting


# -- row 11: the transport --------------------------------------------------------------------------------


def gvp(config):
    config.transport.path_type = "gvp"
    return config


@pytest.mark.slow
def test_row11_sampling_resuming_or_init_from_with_another_transport_is_refused(trained, tmp_path, caplog):
    workdir = copy_of(trained, tmp_path)
    assert read_meta(os.path.join(workdir, "checkpoints"), 4)["transport"]["path_type"] == "linear"
    named = r"config\.transport\.path_type: checkpoint 'linear', config 'gvp'"
    with pytest.raises(ValueError, match=named):
        load_params(gvp(run_config()), workdir, make_mesh())  # launch/sample.py, launch/analyze.py
    with pytest.raises(ValueError, match=f"resuming: .*{named}"):
        train_setup.setup(gvp(run_config(steps=6)), workdir)
    config = gvp(run_config())
    with pytest.raises(ValueError, match=f"train.init_from: .*{named}"):
        restore_params(workdir, abstract_params(config, train_setup.build_model(config), make_mesh()), config=config)
    weighted = run_config(steps=6)
    weighted.transport.loss_weight = "velocity"  # a training setting: resuming compares it too
    with pytest.raises(ValueError, match=r"config\.transport\.loss_weight: checkpoint None, config 'velocity'"):
        train_setup.setup(weighted, workdir)
    assert listing(workdir) == ["2", "4"]
    allowed = gvp(run_config())
    allowed.train.allow_transport_change = True
    with caplog.at_level(logging.WARNING):
        _, _, step = load_params(allowed, workdir, make_mesh())
    assert step == 4 and len(warnings_in(caplog, "allowed by config.train.allow_transport_change")) == 1
    allowed = gvp(run_config(steps=6))
    allowed.train.allow_transport_change = True
    run, hooks = train_setup.setup(allowed, workdir)  # the objective's record holds the transport too
    close_all(hooks)
    assert run.start == 4


@pytest.mark.slow
def test_row11_the_converter_carries_the_files_transport_into_the_workdir(tmp_path):
    torch = pytest.importorskip("torch", reason="an official checkpoint is a torch file")
    import argparse

    from lsync_jax.tools.convert import convert_to_workdir
    from tests.porting.official_torch import OfficialSiT, randomize

    arch = dict(depth=4, hidden_size=64, num_heads=4)
    module = randomize(OfficialSiT(**arch), 0).double().eval()
    path, out = str(tmp_path / "gvp.pt"), str(tmp_path / "converted")
    torch.save({"model": module.state_dict(), "ema": module.state_dict(),
                "args": argparse.Namespace(path_type="GVP", prediction="velocity")}, path)
    done = convert_to_workdir(path, "SiT-S/2", out, **arch)
    assert done["transport"] == {"path_type": "gvp", "prediction": "velocity"}
    assert read_meta(os.path.join(out, "checkpoints"), 0)["transport"]["path_type"] == "gvp"

    config = tiny.get_config()  # what launch/sample.py reads for this workdir
    config.model.name = "SiT-S/2"
    config.model.overrides.update(dict(input_size=8, in_channels=4, num_classes=10, learn_sigma=True))
    with pytest.raises(ValueError, match=r"config\.transport\.path_type: checkpoint 'gvp', config 'linear'.*"
                                         r"--config\.transport\.path_type=gvp"):
        load_params(config, out, make_mesh())
    _, _, step = load_params(gvp(config), out, make_mesh())
    assert step == 0


# -- row 13 (part): init_from says what it loaded and from where --------------------------------------------


@pytest.mark.slow
def test_row13_init_from_logs_which_weights_it_loaded_from_where(trained, caplog):
    config = run_config(steps=6, init_from=trained)
    with caplog.at_level(logging.INFO):
        run, hooks = train_setup.setup(config, os.path.join(os.path.dirname(trained), "from_trained"))
    close_all(hooks)
    assert run.start == 0
    messages = [r.getMessage() for r in caplog.records]
    loaded = [m for m in messages if m.startswith("loaded params and EMA params")]
    count = len(jax.tree.leaves(run.state.params))
    assert loaded == [f"loaded params and EMA params ({count} arrays, "
                      f"{sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.state.params)):,} values each) "
                      f"from {os.path.join(trained, 'checkpoints', '4')}"]
    assert any("optimizer fresh" in m for m in messages)
