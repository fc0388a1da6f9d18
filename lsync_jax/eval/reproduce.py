"""One command per reported number: sample a run (or a converted official checkpoint) exactly as a paper
protocol says (`lsync_jax.configs.protocols`), evaluate against the protocol's reference, and print ours
beside the paper's value.

Sampling streams batch by batch into parts on disk and resumes after a kill (`sample_resumable`); the
parts become one ADM sample batch, which `launch/evaluate.py` can also read. What would make the number
another protocol's is marked: an override of a sampling setting (`--set.num_samples`, another sampler, ...),
or a run whose training differs from the entry's in anything that moves the number (the model, the
objective with each term's settings, the transport, the optimizer, the batch, the steps, the EMA), named
key by key with the rules training warns with (`protocols.protocol_differences`). Such a result is
printed and saved as "not comparable", with the reasons.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from lsync_jax import storage
from lsync_jax.builders import build_mesh, build_source, build_transport, model_fields, validate_config
from lsync_jax.configs.protocols import (
    SETTING_TYPES,
    Protocol,
    check_protocol,
    config_settings,
    get_protocol,
    protocol_config,
    protocol_differences,
    reference_kind,
)
from lsync_jax.eval.evaluator import check_image_batch, check_metric_counts, check_output, evaluate, npz_keys
from lsync_jax.eval.sampling import (
    assemble_parts,
    check_counts,
    json_plain,
    protocol_labels,
    record_differences,
    run_sampler,
    sample_resumable,
)
from lsync_jax.host import initialize_distributed
from lsync_jax.objectives import build_objective
from lsync_jax.porting import inception as inception_weights
from lsync_jax.storage import check_writable, write_json_atomic
from lsync_jax.workdir import (
    checkpoint_dir,
    intact_steps,
    model_record,
    objective_record,
    read_meta,
    record_differences as checkpoint_differences,
    transport_record,
)


def _typed(key: str, value: Any, hint: type) -> Any:
    """`value` as the setting's type (ints must be whole numbers; 'none' or None clears an optional string
    or number); a wrong one is an error naming the key."""
    def fail(expected: str) -> ValueError:
        return ValueError(f"--set.{key}={value!r}: expected {expected}")

    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        return None
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise fail("a whole number")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        return float(value)
    if hint is tuple:  # the guidance interval
        if not isinstance(value, tuple) or len(value) != 2 or not all(isinstance(v, (int, float)) for v in value):
            raise fail("two numbers LOW,HIGH (lsync-jax time, t = 1 is data)")
        return tuple(float(v) for v in value)
    return str(value)


def apply_overrides(p: Protocol, overrides: Mapping[str, Any]) -> tuple[Protocol, list[str]]:
    """The entry with `overrides` applied (keys of `SETTING_TYPES`: 'num_samples', 'cfg_scale',
    'guidance_interval', 'class_balance', 'seed', 'sampler.<field>'; what `launch/reproduce.py`'s
    `--set.KEY=VALUE` gives, `ml_collections.config_flags.get_override_values`) and checked like a registry
    entry, and one reason per override that changes a value: the result is then not comparable with the
    paper's. An unknown key or a value of the wrong type is an error naming it."""
    changes: dict[str, Any] = {}
    sampler = dict(p.sampler)
    reasons = []
    for key, raw in overrides.items():
        if key not in SETTING_TYPES:
            raise ValueError(f"--set.{key}: not a protocol setting; overridable: {', '.join(SETTING_TYPES)}")
        value = _typed(key, raw, SETTING_TYPES[key])
        if key.startswith("sampler."):
            field = key.split(".", 1)[1]
            before = getattr(p.sampler_config, field)
            sampler[field] = value
        else:
            before = getattr(p, key)
            changes[key] = value
        if value != before:
            reasons.append(f"{key}={value!r} instead of the protocol's {before!r}")
    changed = dataclasses.replace(p, sampler=sampler, **changes)
    check_protocol(changed)  # e.g. an interval outside [0, 1] or an unknown sampler, now and named
    return changed, reasons


def override_tag(overrides: Mapping[str, Any]) -> str:
    """A short stable name for a set of overrides (their results go to their own directory)."""
    text = json.dumps({k: str(v) for k, v in sorted(overrides.items())})
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def config_records(config: Any) -> dict[str, dict[str, Any]]:
    """A training config's settings as its checkpoint records them (`lsync_jax.workdir`'s record
    functions: every model field, the objective with each regulariser's settings, the transport, the
    optimizer, the batch): what a checkpoint's meta is compared with."""
    model = model_record(model_fields(config))
    objective = build_objective(config.objective, build_transport(config), depth=int(model.get("depth", 0)))
    return {"model": model, "objective": objective_record(objective), "transport": transport_record(config.transport),
            "optimizer": dict(config.optimizer), "data": {"batch_size": int(config.data.batch_size)}}


RECORDED = ("model", "objective", "transport", "optimizer", "data")  # what a training checkpoint's meta holds


def run_differences(p: Protocol, config: Any, workdir: str) -> tuple[list[str], list[str], int]:
    """(differences that change the number, notes, the step) between protocol `p` and the run in `workdir`,
    key by key (`protocol_differences`): its newest intact checkpoint's records (model, objective with each
    regulariser's settings, transport, optimizer, batch) and step against the protocol's training config,
    then `config` (the run's config: what sampling builds, and the EMA decay, which no checkpoint records)
    against it, with the same rules as training's warning (`config_protocol_differences`)."""
    ckpt_dir = checkpoint_dir(workdir)
    steps = intact_steps(ckpt_dir, warn=True)
    if not steps:
        raise FileNotFoundError(f"no intact checkpoint in {ckpt_dir}: train with configs/paper.py:{p.name}, or "
                                "convert an official checkpoint (launch/convert_checkpoint.py --out=WORKDIR)")
    step = steps[-1]
    meta = read_meta(ckpt_dir, step)
    wanted_config = protocol_config(p.name)
    wanted = dict(config_records(wanted_config), train={"num_steps": int(p.train_steps)})
    run = {section: meta[section] for section in RECORDED if section in meta}
    notes = []
    converted = "objective" not in meta  # launch/convert_checkpoint.py records the model (and transport) only
    if converted:
        missing = [s for s in RECORDED if s not in run] + ["training steps"]
        notes.append(f"a converted checkpoint: it records no {', '.join(missing)}, so they are not checked "
                     f"(the protocol's: {p.method}, batch {p.train_batch}, {p.train_steps:,} steps)")
        if "transport" in run:  # the keys its source names, and the time convention (tools/convert.py)
            wanted["transport"] = {k: v for k, v in wanted["transport"].items() if k in run["transport"]}
    else:
        run["train"] = {"num_steps": int(step)}
        missing = [s for s in RECORDED if s not in run]
        if "data" in run and "batch_size" not in run["data"]:
            missing.append("batch")
            del run["data"]
        if missing:
            notes.append(f"the checkpoint records no {', '.join(missing)} (written before lsync-jax recorded it): "
                         "not checked")
    notes.append("no checkpoint records the EMA decay: the config's is compared (--config, default the "
                 "protocol's)")
    differences = protocol_differences(run, wanted, compare=checkpoint_differences)
    named = {line.split(":", 1)[0] for line in differences}
    for line in protocol_differences(config_settings(config), config_settings(wanted_config)):
        if line.split(":", 1)[0] not in named:
            differences.append(f"the config's {line}")
    return differences, notes, step


def _agree(value: int) -> int:
    """Process 0's decision, taken by every process (a disagreement would leave some waiting forever)."""
    if jax.process_count() == 1:
        return int(value)
    return int(np.asarray(multihost_utils.broadcast_one_to_all(np.int32(value))))


def reproduce(name: str, workdir: str, *, config: Any = None, ref_batch: str | None = None,
              out_dir: str | None = None, overrides: Mapping[str, Any] | None = None, batch_size: int = 250,
              weights_path: str | None = None, eval_batch_size: int = 256, fid_method: str = "sqrtm",
              skip_small_metrics: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Sample `workdir`'s newest checkpoint as protocol `name` says, evaluate it, print ours next to the
    paper's value and write OUT_DIR/result.json (default OUT_DIR: WORKDIR/protocols/NAME, or
    NAME-custom-<hash> with overrides, so a changed run never replaces the protocol's samples). `config`
    is the run's config (default: the protocol's, `configs/paper.py:NAME`). Every input is checked before
    the first sample: the protocol and overrides, the reference, the Inception weights, the checkpoint,
    the output directory and any samples already there, and the sample and reference counts against each
    metric's minimum (a metric they are too few for is an error, or with `skip_small_metrics` skipped; the
    protocol's own metric never is)."""
    overrides = dict(overrides or {})
    protocol, reasons = apply_overrides(get_protocol(name), overrides)
    if protocol.differs:
        reasons.insert(0, protocol.differs)
    config = config if config is not None else protocol_config(name)
    validate_config(config)
    if config.model.overrides.get("num_tags"):
        raise ValueError(f"protocol {name!r} samples class-conditional images; the config's model conditions on "
                         f"{config.model.overrides.num_tags} tags")
    initialize_distributed(config.distributed)  # before anything asks for devices or the process index
    check_counts(protocol.num_samples, batch_size)
    kind, target = reference_kind(protocol.reference)
    ref_source, ref_num, ref_count = None, 0, None
    if kind == "adm":
        if not ref_batch:
            raise ValueError(f"protocol {name!r} is evaluated against ADM's {target}: pass --ref_batch=PATH/{target}"
                             + (" (download it once from the ADM evaluator's page, openai/guided-diffusion "
                                "evaluations/README.md)" if target.startswith("VIRTUAL_") else ""))
        ref_count = _check_reference(ref_batch)
        if os.path.basename(ref_batch) != target:
            reasons.append(f"reference {os.path.basename(ref_batch)} instead of the protocol's {target}")
    else:
        if ref_batch:
            raise ValueError(f"protocol {name!r} is evaluated against its data ({protocol.reference}); --ref_batch "
                             "is for ADM reference batches")
        split, _, num = target.partition(":")
        ref_source, ref_num = build_source(config.data, split=split), int(num)
        if len(ref_source) < ref_num:
            raise ValueError(f"protocol {name!r} needs {ref_num} reference images of split {split!r}; "
                             f"{ref_source!r} has {len(ref_source)}")
        ref_count = ref_num
    skipped, _ = check_metric_counts(protocol.num_samples, ref_count, skip_small=skip_small_metrics,
                                     samples="the protocol's num_samples",
                                     reference=f"the reference {ref_batch or target}")
    if protocol.metric in skipped:
        raise ValueError(f"{skipped[protocol.metric]}: it is the protocol's metric, which cannot be skipped")
    weights = inception_weights.resolve_weights(weights_path)  # missing weights fail now, not after sampling
    differences, notes, step = run_differences(protocol, config, workdir)
    reasons += differences
    default_dir = name if not overrides else f"{name}-custom-{override_tag(overrides)}"
    out_dir = out_dir or storage.join(workdir, "protocols", default_dir)
    result_path = storage.join(out_dir, "result.json")
    # what fixes the samples besides the protocol: the weights, the network, the transport, the decoder
    record = json_plain(dict(protocol=name, settings=protocol.settings(), workdir=storage.absolute(workdir),
                             step=step, model=model_fields(config), transport=dict(config.transport),
                             vae=str(config.vae.path), data=str(config.data.name), batch_size=int(batch_size),
                             devices=jax.device_count()))
    npz = storage.join(out_dir, f"samples_{protocol.num_samples}.npz")
    record_path = npz[:-4] + ".json"
    parts_dir = storage.join(out_dir, "parts")
    have, problem = 0, None
    if jax.process_index() == 0:  # the one writer decides; every process follows (none is left waiting)
        try:
            check_writable(out_dir)
            check_output(result_path)
            have = _existing_samples(npz, record_path, record, parts_dir)
        except (OSError, ValueError) as e:
            have, problem = -1, e
    have = _agree(have)
    if problem is not None:
        raise problem
    if have < 0:
        raise ValueError(f"process 0 refused {out_dir} (its log names why)")
    for note in notes:
        log(f"note: {note}")
    for reason in reasons:
        log(f"not comparable: {reason}")

    mesh = build_mesh(config)
    start = time.time()
    if have:
        log(f"{npz} holds this protocol's samples already: evaluating them")
    else:
        run = run_sampler(config, workdir, mesh, protocol.sampler_config, protocol.cfg_scale,
                          protocol.guidance_interval)
        if run.kind != "image":
            raise ValueError(f"protocol {name!r} measures images; {workdir} holds a {run.kind} model")
        if run.step != step:
            raise RuntimeError(f"{workdir}: the newest checkpoint changed from step {step} to {run.step} while "
                               "starting; run again")
        labels = protocol_labels(protocol.num_samples, run.model.num_classes, protocol.class_balance, protocol.seed)
        parts = sample_resumable(run, labels, batch_size, protocol.seed, parts_dir, record, log=log)
        if jax.process_index() == 0:
            assemble_parts(run.kind, parts, npz, storage.join(out_dir, "samples.png"))
            write_json_atomic(record_path, record)
            storage.rmtree(parts_dir)  # its samples are all in the .npz now
    sampling_seconds = time.time() - start
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("protocol samples written")
    payload = evaluate(npz, ref_batch=ref_batch, ref_source=ref_source, ref_num=ref_num, weights_path=weights,
                       batch_size=eval_batch_size, output=storage.join(out_dir, "metrics.json"),
                       fid_method=fid_method, skip_small_metrics=skip_small_metrics, log=log)
    ours = payload["metrics"].get(protocol.metric)
    result = compare(protocol, ours, reasons)
    result.update(notes=notes, workdir=storage.absolute(workdir), step=step, samples=npz,
                  sampling_seconds=round(sampling_seconds, 1), metrics=payload["metrics"],
                  reference=payload["reference"], num_reference=payload["num_reference"])
    for line in format_comparison(result):
        log(line)
    if jax.process_index() == 0:
        write_json_atomic(result_path, json_plain(result))
        log(f"wrote {result_path}")
    return result


def _existing_samples(npz: str, record_path: str, record: dict[str, Any], parts_dir: str) -> int:
    """1: the finished samples of exactly this run are there; 0: none (or a resumable parts directory).
    Anything else there is refused, naming it: samples of other settings are never replaced."""
    if storage.exists(npz):
        found = storage.read_json(record_path, "sample record") if storage.exists(record_path) else None
        if found == record:
            return 1
        differ, shown = record_differences(found, record)
        raise ValueError(f"{npz} holds samples of other settings ({', '.join(differ) if found else 'no record'} "
                         f"differ{': ' + shown if found else ''}); they are kept: use another --out_dir, or move "
                         "them away")
    if storage.exists(parts_dir) and not storage.exists(storage.join(parts_dir, "manifest.json")):
        raise ValueError(f"{parts_dir} exists but holds no sampling manifest: not this command's; use another "
                         "--out_dir")
    return 0


def _check_reference(path: str) -> int | None:
    """The reference's image count from its header (None: saved statistics only), after checking it."""
    if not storage.exists(path):
        raise FileNotFoundError(f"reference batch {path} not found")
    keys = npz_keys(path)
    if "arr_0" in keys:
        return check_image_batch(path)[0]
    if not all(k in keys for k in ("mu", "sigma", "mu_s", "sigma_s")):
        raise ValueError(f"{path} is not an ADM reference batch: it needs arr_0 images or mu, sigma, mu_s, sigma_s "
                         f"(has {keys})")
    return None


def compare(protocol: Protocol, ours: float | None, reasons: list[str]) -> dict[str, Any]:
    """Ours beside the paper's value: the difference and its relative size, and whether they compare."""
    paper = float(protocol.value)
    diff = None if ours is None else float(ours) - paper
    return {"protocol": protocol.name, "describe": protocol.describe(), "metric": protocol.metric,
            "ours": None if ours is None else float(ours), "paper": paper, "difference": diff,
            "relative": None if diff is None else diff / paper, "source": protocol.source, "where": protocol.where,
            "table": protocol.table, "comparable": not reasons, "not_comparable_because": list(reasons),
            "unpublished": dict(protocol.unpublished), "settings": protocol.settings()}


def format_comparison(result: Mapping[str, Any]) -> list[str]:
    """The printed comparison: ours, the paper's (with its source) and the difference; 'NOT COMPARABLE'
    with the reasons when anything differs from the protocol."""
    metric = str(result["metric"]).upper()
    ours = result["ours"]
    lines = [f"protocol {result['protocol']}: {result['describe']}"]
    if ours is None:
        lines.append(f"{metric}: ours n/a (the Inception weights give no {result['metric']})")
    else:
        lines.append(f"{metric}: ours {ours:.2f} | paper {result['paper']:g} ({result['source']}: {result['table']}) "
                     f"| difference {result['difference']:+.2f} ({100 * result['relative']:+.1f}%)")
    if result["comparable"]:
        lines.append("comparable: the protocol's sampling and evaluation, and its model, objective, transport, "
                     "optimizer, batch, steps and EMA")
    else:
        lines.append("NOT COMPARABLE: " + "; ".join(result["not_comparable_because"]))
    if result["source"] == "summary":
        lines.append("the paper's value comes from a summary of the paper, not from the paper itself")
    return lines
