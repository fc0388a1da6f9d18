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

One command runs both; a rerun resumes whichever stage was interrupted (stage 1 is skipped once its
last checkpoint exists or stage 2 has started; a stage 1 stopped early does not start stage 2).
Both stages' models, objectives and the carry regex are checked before stage 1 starts.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from absl import logging

from lsync_jax.train import checkpoint as ckpt_lib
from lsync_jax.train.config import set_field

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
        set_field(stage.erw, "enabled", False)
        set_field(stage.model.overrides, "depth", blocks)
        set_field(stage.model.overrides, "encoder_depth", blocks)
        set_field(stage.objective, "regularizers", ("repa",))
        set_field(stage.objective, "transport_weight", 0.0)
        set_field(stage.objective, "clean_input", True)
        set_field(stage.objective.repa, "weight", float(erw.get("warmup_weight", 0.5)))
        set_field(stage.objective.repa, "half_life", 0.0)
        set_field(stage.train, "num_steps", steps)
        set_field(stage.train, "init_from", "")
        set_field(stage.train, "init_include", "")
        set_field(stage.eval, "every", 0)
    return stage


def stage2_config(config: Any, stage1_dir: str) -> Any:
    stage = copy.deepcopy(config)
    with stage.unlocked():
        set_field(stage.erw, "enabled", False)
        set_field(stage.train, "init_from", stage1_dir)
        set_field(stage.train, "init_include", config.erw.get("carry") or DEFAULT_CARRY)
    return stage


def check_stages(first: Any, second: Any) -> None:
    """Both stages' models and objectives build, and the carry regex selects parameters the two
    models share with equal shapes: checked before stage 1, not after its 100K steps."""
    import re

    import jax

    from lsync_jax.objectives import build_objective
    from lsync_jax.train.checkpoint import param_shapes
    from lsync_jax.train.config import build_model, build_transport

    shapes = []
    for stage in (first, second):
        model = build_model(stage)
        build_objective(stage.objective, build_transport(stage), depth=model.depth)
        shapes.append(param_shapes(jax.eval_shape(model.init, jax.random.key(0), *model.init_inputs(1))["params"]))
    try:
        pattern = re.compile(second.train.init_include)
    except re.error as e:
        raise ValueError(f"config.erw.carry={second.train.init_include!r} is not a regex: {e}") from None
    carried = [n for n in shapes[1] if pattern.search(n) and n in shapes[0]]
    wrong = [n for n in carried if shapes[0][n] != shapes[1][n]]
    if not carried or wrong:
        raise ValueError(f"config.erw.carry={second.train.init_include!r} selects "
                         + (f"parameters of different shapes in the two stages: {wrong[:4]}" if wrong
                            else "nothing the two stages' models share"))


def train_erw(config: Any, workdir: str) -> dict[str, float]:
    """Stage 1 into WORKDIR/erw_stage1 (unless finished, or stage 2 has started), then stage 2 into
    WORKDIR. A stage 1 stopped early (preemption) returns without starting stage 2."""
    from lsync_jax.train.loop import train_run

    if config.train.get("init_from"):
        raise ValueError("config.train.init_from with config.erw.enabled: ERW's stage 2 starts from its stage 1; "
                         "turn ERW off to start from another run")
    stage1_dir = os.path.join(workdir, STAGE1_DIR)
    first = stage1_config(config)
    second = stage2_config(config, stage1_dir)
    check_stages(first, second)
    warmup = int(first.train.num_steps)
    if ckpt_lib.latest_step(os.path.join(workdir, "checkpoints")) is not None:
        logging.info("ERW stage 2 has started in %s: resuming it", workdir)
    elif (ckpt_lib.latest_step(os.path.join(stage1_dir, "checkpoints")) or 0) < warmup:
        logging.info("ERW stage 1: %d blocks + projector on clean inputs, REPA only, %d steps, in %s",
                     first.model.overrides.depth, warmup, stage1_dir)
        metrics = train_run(first, stage1_dir)
        done = ckpt_lib.latest_step(os.path.join(stage1_dir, "checkpoints")) or 0
        if done < warmup:
            logging.warning("ERW stage 1 stopped at step %d of %d; run the same command again to continue", done,
                            warmup)
            return metrics
    logging.info("ERW stage 2: the full model from stage 1 (parameters matching %r), in %s",
                 second.train.init_include, workdir)
    return train_run(second, workdir)


def _model_depth(config: Any) -> int:
    from lsync_jax.models import model_config

    return int(model_config(config.model.name)["depth"])
