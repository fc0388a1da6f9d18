"""LayerSync pairs chosen from measurements: `objective.layersync.pairs='auto'`.

1. Warm-up: the run trains `selection.warmup_steps` steps with LayerSync off (every other term of
   the objective on, the run's own optimizer schedule) in WORKDIR, and saves that step. With
   `warmup_steps=0` the weights of `train.init_from` are measured instead.
2. Measure: the online weights (not the EMA, which has barely moved after a short warm-up) on
   `selection.num_samples` training examples at each of `selection.t_values`, every block's
   linear-probe accuracy (`lsync_jax.train.analysis.measure_model`; the model is fed its null
   class, so the probe reads the image's representation and not the label).
3. Select: `lsync_jax.objectives.layersync.select_pairs` on the probe accuracy averaged over t
   (the rule and why are in its docstring): strong = the best block in the middle of the network,
   weak = the deepest block before it that has made at most half of the climb to it.
4. Train on from the warm-up checkpoint with those pairs. The choice, the rule's numbers and the
   step measured are logged, written to WORKDIR/layersync_pairs.json with every measurement, and
   stored in every later checkpoint's meta: a resume reads it there and never re-measures. A run
   interrupted between the warm-up and its first LayerSync checkpoint takes the choice from
   layersync_pairs.json (made for that warm-up step); only if that file is gone is the warm-up
   checkpoint measured again (same seed and data: the same choice, unless accuracies within
   their standard error reorder on another device count).
The warm-up counts towards `train.num_steps`: an auto run has the same budget as a fixed-pair run.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import jax
import numpy as np
from absl import logging

from lsync_jax.objectives.layersync import PAPER_WEIGHT, is_auto, select_pairs
from lsync_jax.train import checkpoint as ckpt_lib
from lsync_jax.train.config import set_field

CHOICE_FILE = "layersync_pairs.json"
META_KEY = "layersync_auto"
SELECTION_DEFAULTS = dict(warmup_steps=10_000, num_samples=2048, t_values=(0.25, 0.5, 0.75), batch_size=256, seed=0,
                          middle=(0.25, 0.75), rise=0.5, num_weak=1, condition="null")
PREFIX = "config.objective.layersync.selection"


def uses_auto_pairs(config: Any) -> bool:
    objective = config.get("objective", {})
    return "layersync" in tuple(objective.get("regularizers", ())) and is_auto(
        (objective.get("layersync") or {}).get("pairs"))


def selection_settings(config: Any) -> dict[str, Any]:
    """`objective.layersync.selection` with defaults filled in, checked (errors name the key)."""
    from lsync_jax.objectives.registry import check_keys

    given = dict(config.objective.layersync.get("selection") or {})
    check_keys(given, tuple(SELECTION_DEFAULTS), PREFIX)
    sel = dict(SELECTION_DEFAULTS, **{k: v for k, v in given.items() if v is not None})
    warmup, num_steps = int(sel["warmup_steps"]), int(config.train.num_steps)
    if warmup < 0 or warmup >= num_steps:
        raise ValueError(f"{PREFIX}.warmup_steps={warmup} must lie in [0, train.num_steps={num_steps})")
    if warmup == 0 and not config.train.get("init_from"):
        raise ValueError(f"{PREFIX}.warmup_steps=0 measures the weights of config.train.init_from, which is empty")
    lo, hi = (float(v) for v in sel["middle"])
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"{PREFIX}.middle={tuple(sel['middle'])} must satisfy 0 <= lo <= hi <= 1")
    if not 0.0 < float(sel["rise"]) <= 1.0:
        raise ValueError(f"{PREFIX}.rise={sel['rise']} must lie in (0, 1]")
    if int(sel["num_weak"]) < 1:
        raise ValueError(f"{PREFIX}.num_weak={sel['num_weak']} must be >= 1")
    measure_settings(sel).check(PREFIX)
    return sel


def measure_settings(sel: dict[str, Any]):
    from lsync_jax.train.analysis import MeasureSettings

    return MeasureSettings(num_samples=int(sel["num_samples"]), t_values=tuple(float(t) for t in sel["t_values"]),
                           batch_size=int(sel["batch_size"]), seed=int(sel["seed"]), condition=sel["condition"],
                           cka=False)


def warmup_config(config: Any) -> Any:
    """The run with LayerSync off (the rest of the objective unchanged)."""
    warm = copy.deepcopy(config)
    with warm.unlocked():
        set_field(warm.objective, "regularizers", tuple(r for r in config.objective.regularizers if r != "layersync"))
    return warm


def with_pairs(config: Any, pairs: Any) -> Any:
    chosen = copy.deepcopy(config)
    with chosen.unlocked():
        set_field(chosen.objective.layersync, "pairs", tuple(tuple(p) for p in pairs))
    return chosen


def stored_choice(workdir: str) -> dict[str, Any] | None:
    """The choice recorded in the latest checkpoint's meta (None: no checkpoint, or a warm-up one)."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return None
    checkpointer = ckpt_lib.Checkpointer(ckpt_dir, read_only=True)
    try:
        step = checkpointer.latest_step()
        return None if step is None else checkpointer.read_meta(step).get(META_KEY)
    finally:
        checkpointer.close()


def _latest_step(workdir: str) -> int | None:
    return ckpt_lib.latest_step(os.path.join(workdir, "checkpoints"))


def _measured_params(config: Any, workdir: str, warmup: int) -> tuple[Any, Any]:
    """(model, online params) to measure: the warm-up checkpoint, or train.init_from's weights."""
    from lsync_jax.train.config import build_model
    from lsync_jax.train.sample import abstract_params, load_params
    from lsync_jax.train.sharding import make_mesh

    mesh = make_mesh(config.mesh.get("data", -1), config.mesh.get("fsdp", 1))
    if warmup:
        model, params, _ = load_params(config, workdir, mesh, step=warmup, which="params")
        return model, params
    model = build_model(config)
    params, _ = ckpt_lib.restore_params(config.train.init_from, abstract_params(config, model, mesh))
    return model, params


def written_choice(workdir: str, warmup: int) -> dict[str, Any] | None:
    """The choice WORKDIR/layersync_pairs.json holds for this warm-up (a run stopped between the
    warm-up and its first LayerSync checkpoint): kept as made, never re-measured. None when absent
    (on any process) or made for another step."""
    from lsync_jax.host import all_processes

    path = os.path.join(workdir, CHOICE_FILE)
    if not all_processes(os.path.exists(path)):
        return None
    with open(path) as f:
        written = json.load(f)
    if written.get("step") != warmup or not written.get("pairs"):
        return None
    return {k: written[k] for k in ("pairs", "why", "measured", "step")}


def choose_pairs(config: Any, workdir: str, sel: dict[str, Any]) -> dict[str, Any]:
    """Measure the warm-up checkpoint (or init_from), select, log and write the choice; returns the
    record stored in checkpoints: {'pairs', 'why', 'measured'}."""
    from lsync_jax.eval.analysis import probe_figure
    from lsync_jax.host import write_json_atomic
    from lsync_jax.train.analysis import measure_model
    from lsync_jax.train.images import save_png

    warmup = int(sel["warmup_steps"])
    model, params = _measured_params(config, workdir, warmup)
    measured = measure_model(config, model, params, measure_settings(sel))
    weight = config.objective.layersync.get("auto_weight")
    pairs, why = select_pairs(measured["probe_accuracy_mean"], middle=tuple(float(v) for v in sel["middle"]),
                              rise=float(sel["rise"]), num_weak=int(sel["num_weak"]),
                              weight=PAPER_WEIGHT if weight is None else float(weight))
    if jax.process_count() > 1:  # every process measured the same; take process 0's word for it
        from jax.experimental import multihost_utils

        flat = multihost_utils.broadcast_one_to_all(np.asarray(pairs, np.float64))
        pairs = tuple((int(w), int(s), float(x)) for w, s, x in flat)
    where = f"step {warmup} of {workdir}" if warmup else f"train.init_from={config.train.init_from}"
    record = {"pairs": [list(p) for p in pairs], "why": why, "measured": where, "step": warmup}
    logging.info("LayerSync automatic pairs: %s (weak, strong, weight), measured on %s", pairs, where)
    logging.info("  rule: %s; strong-block band %s, threshold %.4f%s", why["rule"], why["band"], why["threshold"],
                 " (FALLBACK to the paper's proportion: no block before the strong one is weaker)"
                 if why["fallback"] else "")
    logging.info("  probe accuracy per block (mean over t = %s; standard error about %.3f on %d test examples): "
                 "%s", tuple(measured["t_values"]), max(measured["probe_stderr"]), measured["num_test"],
                 " ".join(f"{b}:{a:.3f}" for b, a in zip(measured["blocks"], measured["probe_accuracy_mean"])))
    if jax.process_index() == 0:
        write_json_atomic(os.path.join(workdir, CHOICE_FILE), dict(record, measurements=measured))
        curves = {f"t = {e['t']:g}": e["probe_accuracy"] for e in measured["per_t"]}
        curves["mean"] = measured["probe_accuracy_mean"]
        title = (f"LayerSync auto pairs {[(w, s) for w, s, _ in pairs]} from {where}"
                 if len(where) < 60 else f"LayerSync auto pairs {[(w, s) for w, s, _ in pairs]}")
        save_png(os.path.join(workdir, CHOICE_FILE.replace(".json", ".png")),
                 probe_figure(curves, measured["blocks"], title, chance=1.0 / measured["num_classes"]))
    return record


def train_auto_pairs(config: Any, workdir: str) -> dict[str, float]:
    """Warm up (unless done), choose the pairs (unless a checkpoint holds them), train on with them."""
    from lsync_jax.objectives import build_objective
    from lsync_jax.train.config import build_model, build_transport
    from lsync_jax.train.loop import train_run

    sel = selection_settings(config)
    warmup = int(sel["warmup_steps"])
    warm = warmup_config(config)
    model = build_model(config)
    # both phases' objectives build (bad keys fail now, not after the warm-up); the pairs are a placeholder
    from lsync_jax.objectives.layersync import default_pair

    warm_objective = build_objective(warm.objective, build_transport(warm), depth=model.depth)
    build_objective(with_pairs(config, [(*default_pair(model.depth), 1.0)]).objective, build_transport(config),
                    depth=model.depth)
    if (sel["condition"] == "null" and model.num_classes > 0
            and not getattr(model, "class_dropout_prob", 0.0) > 0):
        raise ValueError(f"{PREFIX}.condition='null' measures the model on its null class, which this model lacks "
                         "(class_dropout_prob=0): set the condition to 'label' (probe accuracies then include the "
                         "label) or train with label dropout")
    record = stored_choice(workdir)
    latest = _latest_step(workdir)
    if record is None and latest == warmup:
        record = written_choice(workdir, warmup)
        if record is not None:
            logging.info("LayerSync automatic pairs %s, chosen after the warm-up (%s), read from %s", record["pairs"],
                         record["measured"], os.path.join(workdir, CHOICE_FILE))
    if record is None:
        if latest is not None and latest > warmup:
            raise ValueError(f"{workdir} holds a checkpoint at step {latest}, beyond {PREFIX}.warmup_steps={warmup}, "
                             "with no LayerSync choice: it is not this run's warm-up. Use another --workdir.")
        if warmup and (latest or 0) < warmup:
            logging.info("LayerSync automatic pairs: %d warm-up steps without LayerSync, then the pairs are chosen "
                         "from measurements", warmup)
            metrics = train_run(warm, workdir, stop_at=warmup)
            if (_latest_step(workdir) or 0) < warmup:
                logging.warning("the warm-up stopped before step %d; run the same command again to continue", warmup)
                return metrics
        record = choose_pairs(config, workdir, sel)
    else:
        logging.info("LayerSync automatic pairs %s, chosen earlier (%s), kept on resume", record["pairs"],
                     record["measured"])
    chosen = with_pairs(config, record["pairs"])
    return train_run(chosen, workdir, meta_extra={META_KEY: record},
                     accept_objectives=(ckpt_lib.describe({}, {}, None, warm_objective)["objective"],))
