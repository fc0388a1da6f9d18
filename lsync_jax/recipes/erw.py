"""ERW (Embedded Representation Warmup): warm the early blocks up on REPA alone, then train everything.

Phase 'erw stage 1' (`WORKDIR/erw_stage1`): a SiT of the first `erw.blocks` blocks (default 4) with
REPA's projector on its last block sees clean inputs (the data at t = 1) and learns only the REPA
loss (coefficient `erw.warmup_weight`, 0.5), for `erw.warmup_steps` steps (ERW: 100K).
Phase 'erw stage 2' (`WORKDIR`): the configured model starts from stage 1's weights where they exist
(`erw.carry`, a regex over parameter paths: the embedders, blocks 1..k and the projector; the final
layer is not carried), with a fresh optimizer and its EMA equal to those weights, and trains with
the configured objective; ERW's configs set REPA's weight c0 (6 XL, 3 L, 1 otherwise), its
`half_life` 50,000 (the coefficient c0 * 2^(-s / 50000) at stage-2 step s, which is ERW's
2^(-(step - warmup) / 50000)) and `encoder_depth` 14 for XL.

One command runs both; a rerun resumes whichever stage was interrupted (`run_phases`: stage 1 is
skipped once its last checkpoint exists or stage 2 has started; a stage 1 stopped early does not
start stage 2). Both stages' models, objectives and the carry regex are checked before stage 1.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax

from lsync_jax.builders import build_model, derived_config
from lsync_jax.recipes.phases import Phase
from lsync_jax.workdir import param_shapes

STAGE1_DIR = "erw_stage1"


def erw_phases(config: Any, workdir: str) -> list[Phase]:
    """ERW's two phases, their models' shared parameters checked."""
    erw = config.erw
    if config.train.init_from:
        raise ValueError("config.train.init_from with config.erw.enabled: ERW's stage 2 starts from its stage 1; "
                         "turn ERW off to start from another run")
    depth = build_model(config).depth
    blocks = int(erw.blocks)
    if not 1 <= blocks < depth:
        raise ValueError(f"config.erw.blocks={blocks} must be in [1, depth={depth}): stage 1 warms up a prefix")
    steps = int(erw.warmup_steps)
    if steps < 1:
        raise ValueError(f"config.erw.warmup_steps must be >= 1, got {steps}")
    if "repa" not in tuple(config.objective.regularizers):
        raise ValueError("ERW's stage 2 trains with REPA: config.objective.regularizers must include 'repa'")
    stage1_dir = os.path.join(workdir, STAGE1_DIR)
    first = derived_config(config, {
        "erw.enabled": False, "model.overrides.depth": blocks, "model.overrides.encoder_depth": blocks,
        "objective.regularizers": ("repa",), "objective.transport_weight": 0.0, "objective.clean_input": True,
        "objective.repa.weight": float(erw.warmup_weight), "objective.repa.half_life": 0.0,
        "train.num_steps": steps, "train.init_from": "", "train.init_include": "", "eval.every": 0})
    second = derived_config(config, {"erw.enabled": False, "train.init_from": stage1_dir,
                                     "train.init_include": erw.carry})
    check_carry(first, second)
    return [Phase("erw stage 1", stage1_dir, first, steps),
            Phase("erw stage 2", workdir, second, int(config.train.num_steps))]


def check_carry(first: Any, second: Any) -> None:
    """The carry regex selects parameters the two stages' models share with equal shapes: checked
    before stage 1, not after its 100K steps."""
    shapes = []
    for stage in (first, second):
        model = build_model(stage)
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
