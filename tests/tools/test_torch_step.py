"""The official PyTorch LayerSync step timer (lsync_jax/tools/torch_step.py), on a tiny model.

The official code is a git archive of a local mirror of vita-epfl/LayerSync (LAYERSYNC_GIT_DIR), laid
out in tmp_path for the test only; its models.py needs timm and its transport package torchdiffeq and
tqdm, so the run is skipped without them."""

import math
import os
import re
import shutil
import subprocess
import sys
import types

import pytest

from lsync_jax.tools.torch_step import official_sync_args, time_official_step

OFFICIAL_GIT = os.environ.get("LAYERSYNC_GIT_DIR", "/work/.mirror/vita-epfl+LayerSync/repo")
ROW_KEYS = {"bench", "name", "ms_per_step", "mean_ms", "steps", "threads", "ema", "torch_version", "params_m",
            "config", "last_loss", "ms", "img_per_s", "batch", "input", "tokens"}


def official_checkout(root) -> str:
    """A checkout of the official repository's HEAD under `root` (git archive: files only, no .git)."""
    if not os.path.isdir(OFFICIAL_GIT):
        pytest.skip(f"needs the official vita-epfl/LayerSync checkout as a git directory at {OFFICIAL_GIT} "
                    "(set LAYERSYNC_GIT_DIR)")
    if shutil.which("git") is None:
        pytest.skip("needs git to lay out the official checkout")
    out = root / "LayerSync"
    out.mkdir()
    archive = subprocess.run(["git", f"--git-dir={OFFICIAL_GIT}", "archive", "HEAD"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return str(out)


def test_sync_args_map_paper_blocks_to_official_args():
    assert official_sync_args(((2, 4),), 6) == dict(loss_type="layer_sync", encoder_depth=2, gt_encoder_depth=4,
                                                    multi_blocks=[])
    multi = official_sync_args(((1, 3), (2, 5)), 6)
    assert multi["loss_type"] == "multiple_sync" and multi["multi_blocks"] == [[1, 3], [2, 5]]
    assert official_sync_args((), 6)["loss_type"] == "vanilla"
    for bad in (((4, 2),), ((0, 2),), ((2, 7),), ((1, 2, 3),)):
        with pytest.raises(ValueError, match="1 <= weak < strong"):
            official_sync_args(bad, 6)


def test_invalid_directory_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(NotADirectoryError, match=re.escape(str(missing))):
        time_official_step(str(missing))
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(tmp_path))}.*not a LayerSync checkout.*models.py"):
        time_official_step(str(tmp_path))


@pytest.mark.slow
def test_official_step_runs_and_leaves_no_modules(tmp_path):
    torch = pytest.importorskip("torch")
    from tests.helpers import import_torchvision

    import_torchvision()  # timm imports torchvision; this loads a CUDA wheel's Python parts beside CPU torch
    pytest.importorskip("timm", reason="the official models.py imports timm")
    pytest.importorskip("torchdiffeq", reason="the official transport package imports torchdiffeq")
    checkout = official_checkout(tmp_path)
    sentinel = types.ModuleType("models")  # a `models` of someone else's, which must survive the call
    saved_path, saved_threads = list(sys.path), torch.get_num_threads()
    previous = sys.modules.get("models")
    sys.modules["models"] = sentinel
    try:
        row = time_official_step(checkout, depth=2, hidden_size=32, num_heads=2, batch_size=4, steps=2, warmup=1,
                                 pairs=((1, 2),), threads=1)
        assert sys.modules["models"] is sentinel
    finally:
        if previous is None:
            sys.modules.pop("models", None)
        else:
            sys.modules["models"] = previous
    assert ROW_KEYS <= set(row)
    assert row["name"] == "official PyTorch step" and row["steps"] == 2 and row["ema"] is True
    assert row["threads"] == 1 and torch.get_num_threads() == saved_threads
    assert math.isfinite(row["last_loss"]) and row["ms_per_step"] > 0 and row["params_m"] > 0
    assert row["config"]["loss_type"] == "layer_sync"
    assert (row["config"]["encoder_depth"], row["config"]["gt_encoder_depth"]) == (1, 2)
    assert row["config"]["learn_sigma"] is True
    assert sys.path == saved_path
    left = [name for name, mod in sys.modules.items()
            if (name in ("models", "transport") or name.startswith("transport."))
            and str(getattr(mod, "__file__", "") or "").startswith(checkout)]
    assert left == []
