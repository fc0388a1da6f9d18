"""ERW (Embedded Representation Warmup): warm the early blocks up on REPA alone, then train everything.

Stage 1 (`WORKDIR/erw_stage1`): a SiT of the first `erw.blocks` blocks (default 4) with REPA's
projector on its last block sees clean inputs (the data at t = 1) and learns only the REPA loss
(coefficient `erw.warmup_weight`, 0.5), for `erw.warmup_steps` steps (ERW: 100K).
Stage 2 (`WORKDIR`): the configured model starts from stage 1's weights where they exist (the
embedders, blocks 1..k and the projector: `erw.carry`, a regex over parameter paths; the final
layer is not carried), with a fresh optimizer and its EMA equal to those weights, and trains with
the configured objective; ERW's configs set REPA's weight c0 (6 XL, 3 L, 1 otherwise), its
`half_life` 50,000 (the coefficient c0 * 2^(-s / 50000) at stage-2 step s, which is ERW's
2^(-(step - warmup) / 50000)) and `encoder_depth` 14 for XL.

One command runs both; a rerun resumes whichever stage was interrupted (stage 1 is skipped once
its last checkpoint exists, stage 2 resumes from its own checkpoints).
"""

from __future__ import annotations

import copy
import os
from typing import Any

from absl import logging

from lsync_jax.train import checkpoint as ckpt_lib

STAGE1_DIR = "erw_stage1"
# What stage 2 takes from stage 1: embedders, blocks and REPA projectors (not the untrained final layer).
DEFAULT_CARRY = r"^(x_embedder|t_embedder|y_embedder|blocks_\d+|projectors_\d+)/"


def stage1_config(config: Any) -> Any:
    """The warm-up run: the first `erw.blocks` blocks + projector, clean inputs, REPA only."""
    erw = config.erw
    blocks = int(erw.get("blocks", 4))
    depth = int(config.model.overrides.get("depth", 0) or _model_depth(config))
    if not 1 <= blocks < depth:
        raise ValueError(f"config.erw.blocks={blocks} must be in [1, depth={depth}): stage 1 warms up a prefix")
    steps = int(erw.get("warmup_steps", 100_000))
    if steps < 1:
        raise ValueError(f"config.erw.warmup_steps must be >= 1, got {steps}")
    if "repa" not in tuple(config.objective.get("regularizers", ())):
        raise ValueError("ERW's stage 2 trains with REPA: config.objective.regularizers must include 'repa'")
    stage = copy.deepcopy(config)
    with stage.unlocked():
        _set(stage.erw, "enabled", False)
        _set(stage.model.overrides, "depth", blocks)
        _set(stage.model.overrides, "encoder_depth", blocks)
        _set(stage.objective, "regularizers", ("repa",))
        _set(stage.objective, "transport_weight", 0.0)
        _set(stage.objective, "clean_input", True)
        _set(stage.objective.repa, "weight", float(erw.get("warmup_weight", 0.5)))
        _set(stage.objective.repa, "half_life", 0.0)
        _set(stage.train, "num_steps", steps)
        _set(stage.train, "init_from", "")
        _set(stage.train, "init_include", "")
        _set(stage.eval, "every", 0)
    return stage


def stage2_config(config: Any, stage1_dir: str) -> Any:
    stage = copy.deepcopy(config)
    with stage.unlocked():
        _set(stage.erw, "enabled", False)
        _set(stage.train, "init_from", stage1_dir)
        _set(stage.train, "init_include", config.erw.get("carry") or DEFAULT_CARRY)
    return stage


def train_erw(config: Any, workdir: str) -> dict[str, float]:
    """Stage 1 into WORKDIR/erw_stage1 (unless finished), then stage 2 into WORKDIR."""
    from lsync_jax.train.loop import train_run

    first = stage1_config(config)
    second = stage2_config(config, os.path.join(workdir, STAGE1_DIR))
    stage1_dir = os.path.join(workdir, STAGE1_DIR)
    done = None
    if os.path.isdir(os.path.join(stage1_dir, "checkpoints")):
        checkpointer = ckpt_lib.Checkpointer(os.path.join(stage1_dir, "checkpoints"), read_only=True)
        done = checkpointer.latest_step()
        checkpointer.close()
    if done is None or done < int(first.train.num_steps):
        logging.info("ERW stage 1: %d blocks + projector on clean inputs, REPA only, %d steps, in %s",
                     first.model.overrides.depth, first.train.num_steps, stage1_dir)
        train_run(first, stage1_dir)
    else:
        logging.info("ERW stage 1 finished earlier (step %d in %s)", done, stage1_dir)
    logging.info("ERW stage 2: the full model from stage 1 (parameters matching %r), in %s",
                 second.train.init_include, workdir)
    return train_run(second, workdir)


def _model_depth(config: Any) -> int:
    from lsync_jax.models import model_config

    return int(model_config(config.model.name)["depth"])


def _set(section: Any, key: str, value: Any) -> None:
    """Set a config value even where the config holds another type there (ConfigDict refuses, e.g., a
    float into a field that holds an int): the field is replaced."""
    try:
        section[key] = value
    except TypeError:
        del section[key]
        section[key] = value
