"""LayerSync pairs chosen from measurements: `objective.layersync.pairs='auto'`.

1. Warm-up: the run trains `selection.warmup_steps` steps with LayerSync off (every other term of
   the objective on, the run's own optimizer schedule) in WORKDIR, and saves that step. With
   `warmup_steps=0` the weights of `train.init_from` are measured instead.
2. Measure: the online weights (not the EMA, which has barely moved after a short warm-up) on
   `selection.num_samples` training examples at each of `selection.t_values`, every block's
   linear-probe accuracy (`lsync_jax.eval.analysis.measure_model`; the model is fed its null
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

import os
from typing import Any

import jax
import numpy as np
from absl import logging

from lsync_jax import storage
from lsync_jax.builders import build_mesh, build_model, build_transport, derived_config
from lsync_jax.eval.analysis import MeasureSettings, chance_level, measure_model, probe_figure
from lsync_jax.host import all_processes, save_png
from lsync_jax.objectives.layersync import SELECTION_DEFAULTS, default_pair, is_auto, select_pairs
from lsync_jax.objectives.objective import build_objective
from lsync_jax.objectives.sections import with_defaults
from lsync_jax.recipes.phases import Phase
from lsync_jax.storage import read_json, write_json_atomic
from lsync_jax.workdir import (
    abstract_params,
    checkpoint_dir,
    latest_step,
    load_params,
    objective_record,
    read_meta,
    restore_params,
)

CHOICE_FILE = "layersync_pairs.json"
META_KEY = "layersync_auto"
PREFIX = "config.objective.layersync.selection"


def uses_auto_pairs(config: Any) -> bool:
    return "layersync" in tuple(config.objective.regularizers) and is_auto(config.objective.layersync.pairs)


def selection_settings(config: Any) -> dict[str, Any]:
    """`objective.layersync.selection`, checked (errors name the key)."""
    sel = with_defaults(dict(config.objective.layersync.selection), SELECTION_DEFAULTS, PREFIX)
    warmup, num_steps = int(sel["warmup_steps"]), int(config.train.num_steps)
    if warmup < 0 or warmup >= num_steps:
        raise ValueError(f"{PREFIX}.warmup_steps={warmup} must lie in [0, train.num_steps={num_steps})")
    if warmup == 0 and not config.train.init_from:
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


def measure_settings(sel: dict[str, Any]) -> MeasureSettings:
    return MeasureSettings(num_samples=int(sel["num_samples"]), t_values=tuple(float(t) for t in sel["t_values"]),
                           batch_size=int(sel["batch_size"]), seed=int(sel["seed"]), condition=sel["condition"],
                           cka=False)


def warmup_config(config: Any) -> Any:
    """The run with LayerSync off (the rest of the objective unchanged)."""
    return derived_config(config, {"objective.regularizers":
                                   tuple(r for r in config.objective.regularizers if r != "layersync")})


def with_pairs(config: Any, pairs: Any) -> Any:
    return derived_config(config, {"objective.layersync.pairs": tuple(tuple(p) for p in pairs)})


def stored_choice(workdir: str) -> dict[str, Any] | None:
    """The choice recorded in the latest checkpoint's meta (None: no checkpoint, or a warm-up one)."""
    step = latest_step(checkpoint_dir(workdir))
    return None if step is None else read_meta(checkpoint_dir(workdir), step).get(META_KEY)


def _measured_params(config: Any, workdir: str, warmup: int) -> tuple[Any, Any]:
    """(model, online params) to measure: the warm-up checkpoint, or train.init_from's weights."""
    mesh = build_mesh(config)
    if warmup:
        model, params, _ = load_params(config, workdir, mesh, step=warmup, which="params")
        return model, params
    model = build_model(config)
    params, _ = restore_params(config.train.init_from, abstract_params(config, model, mesh), config=config)
    return model, params


def written_choice(workdir: str, warmup: int) -> dict[str, Any] | None:
    """The choice WORKDIR/layersync_pairs.json holds for this warm-up (a run stopped between the
    warm-up and its first LayerSync checkpoint): kept as made, never re-measured. None when absent
    (on any process) or made for another step."""
    path = storage.join(workdir, CHOICE_FILE)
    if not all_processes(storage.exists(path)):
        return None
    written = read_json(path, "the automatic-pairs record")
    if written.get("step") != warmup or not written.get("pairs"):
        return None
    return {k: written[k] for k in ("pairs", "why", "measured", "step")}


def choose_pairs(config: Any, workdir: str, sel: dict[str, Any]) -> dict[str, Any]:
    """Measure the warm-up checkpoint (or init_from), select, log and write the choice; returns the
    record stored in checkpoints: {'pairs', 'why', 'measured'}."""
    warmup = int(sel["warmup_steps"])
    model, params = _measured_params(config, workdir, warmup)
    measured = measure_model(config, model, params, measure_settings(sel))
    pairs, why = select_pairs(measured["probe_accuracy_mean"], middle=tuple(float(v) for v in sel["middle"]),
                              rise=float(sel["rise"]), num_weak=int(sel["num_weak"]),
                              weight=float(config.objective.layersync.auto_weight))
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
                 probe_figure(curves, measured["blocks"], title, chance=chance_level(measured)))
    return record


def auto_pairs_phases(config: Any, workdir: str) -> list[Phase]:
    """The warm-up (unless `warmup_steps=0`) and the LayerSync phase, whose pairs are resolved just
    before it starts: from the latest checkpoint's record, else layersync_pairs.json, else measured."""
    model = build_model(config)
    if not model.num_classes and not getattr(model, "num_tags", 0):
        raise ValueError(f"objective.layersync.pairs='auto' probes class labels, and the model "
                         f"{config.model.name} has none (num_classes=0 and no tags: unlabelled data). Set the "
                         "pairs explicitly, e.g. --config.objective.layersync.pairs=\"((2, 4, 0.2),)\" (the paper's "
                         "8 -> 16 of 28 blocks, scaled to the depth: lsync_jax.objectives.layersync.default_pair)")
    sel = selection_settings(config)
    warmup = int(sel["warmup_steps"])
    warm = warmup_config(config)
    if (sel["condition"] == "null" and (model.num_classes > 0 or getattr(model, "num_tags", 0))
            and not (model.tag_dropout_prob if getattr(model, "num_tags", 0) else model.class_dropout_prob) > 0):
        raise ValueError(f"{PREFIX}.condition='null' measures the model on its null class, which this model lacks "
                         "(class_dropout_prob=0): set the condition to 'label' (probe accuracies then include the "
                         "label) or train with label dropout")
    warm_objective = objective_record(build_objective(warm.objective, build_transport(warm), depth=model.depth))

    def resolve(phase: Phase) -> Phase:
        record = stored_choice(workdir)
        latest = latest_step(checkpoint_dir(workdir))
        if record is None and latest == warmup:
            record = written_choice(workdir, warmup)
            if record is not None:
                logging.info("LayerSync automatic pairs %s, chosen after the warm-up (%s), read from %s",
                             record["pairs"], record["measured"], os.path.join(workdir, CHOICE_FILE))
        if record is None:
            if latest is not None and latest > warmup:
                raise ValueError(f"{workdir} holds a checkpoint at step {latest}, beyond {PREFIX}.warmup_steps="
                                 f"{warmup}, with no LayerSync choice: it is not this run's warm-up. Use another "
                                 "--workdir.")
            record = choose_pairs(config, workdir, sel)
        else:
            logging.info("LayerSync automatic pairs %s, chosen earlier (%s), kept on resume", record["pairs"],
                         record["measured"])
        return Phase(phase.name, workdir, with_pairs(config, record["pairs"]), phase.until, {META_KEY: record},
                     phase.accepts)

    # the LayerSync phase is checked with a stand-in pair: bad keys fail now, not after the warm-up
    stand_in = with_pairs(config, [(*default_pair(model.depth), 1.0)])
    main = Phase("layersync (automatic pairs)", workdir, stand_in, int(config.train.num_steps),
                 accepts=(warm_objective,), resolve=resolve)
    if not warmup:
        return [main]
    latest = latest_step(checkpoint_dir(workdir))
    if latest is not None and latest > warmup and stored_choice(workdir) is None:
        raise ValueError(f"{workdir} holds a checkpoint at step {latest}, beyond {PREFIX}.warmup_steps={warmup}, "
                         "with no LayerSync choice: it is not this run's warm-up. Use another --workdir.")
    return [Phase("warm-up without LayerSync", workdir, warm, warmup), main]
