"""Official PyTorch checkpoints as a workdir: OUT/checkpoints/0 holding the converted weights, which
launch/sample.py (--workdir=OUT) and training (--config.train.init_from=OUT) read. The conversion
itself is `lsync_jax.porting.official`. The workdir records the model and the transport the file's
training args name (path, prediction), so that sampling or fine-tuning it with another transport
is refused (`lsync_jax.workdir.check_transport`). The conversion holds OUT while it writes
(`lsync_jax.workdir.WorkdirHold`), as a training run does."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from lsync_jax import storage
from lsync_jax.builders import model_fields
from lsync_jax.models.sit import SiT
from lsync_jax.porting.official import convert_state_dict, plan_conversion, read_checkpoint, transport_hints
from lsync_jax.storage import check_writable
from lsync_jax.train.checkpoint import Checkpointer
from lsync_jax.workdir import TIME_CONVENTION, WorkdirHold, describe, param_shapes


def _checkpoint_dir(out_dir: str) -> str:
    directory = storage.join(storage.absolute(out_dir), "checkpoints")
    if storage.isdir(directory) and storage.listdir(directory):
        raise FileExistsError(f"{directory} already holds checkpoints; convert into another directory")
    return directory


def save_converted(model: SiT, params: Any, out_dir: str, fields: Mapping[str, Any],
                   transport: Mapping[str, Any] | None = None) -> str:
    """Write `params` as a workdir's step-0 checkpoint, OUT_DIR/checkpoints/0/{state,meta}, with the
    state {"params", "ema_params"} (both these weights) and the meta of `model_fields` (the config's
    model name and overrides) and of `transport` (config.transport keys the source names; the time
    convention is ours once converted), so that --config.train.init_from=OUT_DIR and launch/sample.py
    --workdir=OUT_DIR read it. Refuses a non-empty OUT_DIR/checkpoints. Returns that directory."""
    expected = jax.eval_shape(model.init, jax.random.key(0), *model.init_inputs(1))["params"]
    if param_shapes(expected) != param_shapes(params):
        raise ValueError("params do not have the model's shapes")
    params = jax.tree.map(jnp.asarray, params)
    with WorkdirHold(out_dir):  # it writes a workdir: a trainer there (or another conversion) keeps it out
        directory = _checkpoint_dir(out_dir)
        checkpointer = Checkpointer(directory, max_to_keep=1, async_save=False)
        recorded = dict(transport or {}, time=TIME_CONVENTION)
        checkpointer.save(0, {"params": params, "ema_params": params},
                          describe(dict(fields), params, transport=recorded), force=True)
        checkpointer.close()
    return directory


def convert_to_workdir(path: str, model_name: str, out_dir: str, *, which: str = "ema", convention: str = "auto",
                       allow_pickle: bool = False, **overrides: Any) -> dict[str, Any]:
    """Convert an official file into OUT_DIR/checkpoints (see `save_converted`); returns what was done:
    model, convention, source entry, number of parameters, the config overrides the checkpoint records
    (a config must name exactly these) and the transport settings of the training args, if saved."""
    directory = _checkpoint_dir(out_dir)  # before reading a large file
    check_writable(directory)
    checkpoint = read_checkpoint(path, which, allow_pickle)
    state = dict(checkpoint.state)
    convention, fields = plan_conversion(dict(state), model_name, convention, checkpoint.args, overrides)
    model, params = convert_state_dict(state, model_name, convention, args=checkpoint.args, **fields)
    recorded = model_fields(ConfigDict({"model": {"name": model_name, "overrides": fields}}))
    transport = transport_hints(checkpoint.args)
    save_converted(model, params, out_dir, recorded, transport)
    return dict(model=model_name, convention=convention, source=checkpoint.source, checkpoint_dir=directory,
                num_params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)),
                overrides=fields, transport=transport)
