"""One command per reported number: sample a run (or a converted official checkpoint) exactly as a paper
protocol says (`lsync_jax.configs.protocols`), evaluate against the protocol's reference, and print ours
beside the paper's value.

Sampling streams batch by batch into parts on disk and resumes after a kill (`sample_resumable`); the
parts become one ADM sample batch, which `launch/evaluate.py` can also read. What would make the number
another protocol's is marked: an override of a sampling setting (`--num_samples`, another sampler, ...),
or a run whose model, learn_sigma, training steps or method differ from the entry's. Such a result is
printed and saved as "not comparable", with the reasons.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Mapping

import jax
from jax.experimental import multihost_utils

from lsync_jax import storage
from lsync_jax.builders import build_mesh, build_source, validate_config
from lsync_jax.configs.protocols import Protocol, config_differences, get_protocol, protocol_config, reference_kind
from lsync_jax.eval.evaluator import check_image_batch, check_output, evaluate, npz_keys
from lsync_jax.eval.sampling import (
    assemble_parts,
    check_counts,
    json_plain,
    protocol_labels,
    run_sampler,
    sample_resumable,
)
from lsync_jax.host import initialize_distributed
from lsync_jax.porting import inception as inception_weights
from lsync_jax.storage import check_writable, write_json_atomic
from lsync_jax.workdir import checkpoint_dir, intact_steps, read_meta

# Overridable settings: name -> how a command-line value becomes the Protocol field's value.
_SAMPLER_KEYS = ("method", "num_steps", "last_step", "last_step_size", "diffusion_form", "diffusion_norm",
                 "guidance_channels", "rtol", "atol")


def _parse(value: str) -> Any:
    text = value.strip()
    if text.lower() in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if "," in text:
        return tuple(_parse(v) for v in text.strip("()[]").split(",") if v.strip())
    return text


def apply_overrides(p: Protocol, overrides: Mapping[str, str]) -> tuple[Protocol, list[str]]:
    """The entry with `overrides` ('num_samples', 'cfg_scale', 'guidance_interval', 'class_balance',
    'seed', or 'sampler.<field>') applied, and one reason per override that changes a value: the
    result is then not comparable with the paper's. An unknown key is an error naming the known ones."""
    changes: dict[str, Any] = {}
    sampler = dict(p.sampler)
    reasons = []
    for key, raw in overrides.items():
        value = _parse(raw) if isinstance(raw, str) else raw
        if key.startswith("sampler."):
            field = key.split(".", 1)[1]
            if field not in _SAMPLER_KEYS:
                raise ValueError(f"--set {key}: unknown sampler setting; known: "
                                 + ", ".join(f"sampler.{k}" for k in _SAMPLER_KEYS))
            before = p.sampler_config.__getattribute__(field)
            sampler[field] = value
            if value != before:
                reasons.append(f"{key}={value!r} instead of the protocol's {before!r}")
        elif key in ("num_samples", "cfg_scale", "guidance_interval", "class_balance", "seed"):
            before = getattr(p, key)
            value = tuple(float(v) for v in value) if key == "guidance_interval" else value
            changes[key] = value
            if value != before:
                reasons.append(f"{key}={value!r} instead of the protocol's {before!r}")
        else:
            raise ValueError(f"--set {key}: not a protocol setting; overridable: num_samples, cfg_scale, "
                             "guidance_interval, class_balance, seed, "
                             + ", ".join(f"sampler.{k}" for k in _SAMPLER_KEYS))
    changed = dataclasses.replace(p, sampler=sampler, **changes)
    changed.sampler_config  # noqa: B018 - a bad sampler value fails here, naming the field
    return changed, reasons


def run_differences(p: Protocol, config: Any, workdir: str) -> tuple[list[str], list[str], int]:
    """(differences that change the number, notes, the step) between protocol `p` and the run in `workdir`
    (its newest intact checkpoint's recorded model and objective, and its step) and `config`."""
    ckpt_dir = checkpoint_dir(workdir)
    steps = intact_steps(ckpt_dir, warn=True)
    if not steps:
        raise FileNotFoundError(f"no intact checkpoint in {ckpt_dir}: train with configs/paper.py:{p.name}, or "
                                "convert an official checkpoint (launch/convert_checkpoint.py --out=WORKDIR)")
    step = steps[-1]
    meta = read_meta(ckpt_dir, step)
    model = dict(meta.get("model", {}))
    notes = []
    converted = "objective" not in meta  # launch/convert_checkpoint.py records no objective and no steps
    if converted:
        notes.append("a converted checkpoint: its training steps and method are not recorded, so they are not "
                     f"checked (the protocol's: {p.method}, {p.train_steps:,} steps)")
        regularizers = None
    else:
        regularizers = ("layersync",) if "layersync" in str(meta.get("objective", "")).lower() else ()
    differences = config_differences(p, model, None if converted else step, regularizers)
    cfg_model = {"name": config.model.name, **{k: v for k, v in config.model.overrides.items() if v is not None}}
    for difference in config_differences(p, cfg_model, None):
        if difference not in differences:
            differences.append(f"the config's {difference}")
    return differences, notes, step


def reproduce(name: str, workdir: str, *, config: Any = None, ref_batch: str | None = None,
              out_dir: str | None = None, overrides: Mapping[str, str] | None = None, batch_size: int = 250,
              weights_path: str | None = None, eval_batch_size: int = 256, fid_method: str = "sqrtm",
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Sample `workdir`'s newest checkpoint as protocol `name` says, evaluate it, print ours next to the
    paper's value and write OUT_DIR/result.json (default OUT_DIR: WORKDIR/protocols/NAME). `config` is
    the run's config (default: the protocol's, `configs/paper.py:NAME`). Every input is checked before
    the first sample: the protocol and overrides, the reference, the Inception weights, the checkpoint
    and the output directory."""
    protocol, reasons = apply_overrides(get_protocol(name), overrides or {})
    if protocol.differs:
        reasons.insert(0, protocol.differs)
    config = config if config is not None else protocol_config(name)
    validate_config(config)
    check_counts(protocol.num_samples, batch_size)
    kind, target = reference_kind(protocol.reference)
    ref_source, ref_num = None, 0
    if kind == "adm":
        if not ref_batch:
            raise ValueError(f"protocol {name!r} is evaluated against ADM's {target}: pass --ref_batch=PATH/{target}"
                             + (" (download it once from the ADM evaluator's page, openai/guided-diffusion "
                                "evaluations/README.md)" if target.startswith("VIRTUAL_") else ""))
        _check_reference(ref_batch)
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
    weights = inception_weights.resolve_weights(weights_path)  # missing weights fail now, not after sampling
    differences, notes, step = run_differences(protocol, config, workdir)
    reasons += differences
    out_dir = out_dir or storage.join(workdir, "protocols", name)
    result_path = storage.join(out_dir, "result.json")
    if jax.process_index() == 0:
        check_writable(out_dir)
        check_output(result_path)
    for note in notes:
        log(f"note: {note}")
    for reason in reasons:
        log(f"not comparable: {reason}")

    initialize_distributed(config.distributed)
    mesh = build_mesh(config)
    run = run_sampler(config, workdir, mesh, protocol.sampler_config, protocol.cfg_scale, protocol.guidance_interval)
    if run.kind != "image":
        raise ValueError(f"protocol {name!r} measures images; {workdir} holds a {run.kind} model")
    labels = protocol_labels(protocol.num_samples, run.model.num_classes, protocol.class_balance, protocol.seed)
    record = json_plain(dict(protocol=name, settings=protocol.settings(), workdir=storage.absolute(workdir),
                             step=run.step))
    npz = storage.join(out_dir, f"samples_{protocol.num_samples}.npz")
    record_path = npz[:-4] + ".json"
    start = time.time()
    if storage.exists(npz) and storage.exists(record_path) and storage.read_json(record_path) == dict(
            record, batch_size=int(batch_size), devices=jax.device_count()):
        log(f"{npz} holds this protocol's samples already: evaluating them")
    else:
        parts_dir = storage.join(out_dir, "parts")
        parts = sample_resumable(run, labels, batch_size, protocol.seed, parts_dir, record, log=log)
        if jax.process_index() == 0:
            assemble_parts(run.kind, parts, npz, storage.join(out_dir, "samples.png"))
            write_json_atomic(record_path, dict(record, batch_size=int(batch_size), devices=jax.device_count()))
            storage.rmtree(parts_dir)
    sampling_seconds = time.time() - start
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("protocol samples written")
    payload = evaluate(npz, ref_batch=ref_batch, ref_source=ref_source, ref_num=ref_num, weights_path=weights,
                       batch_size=eval_batch_size, output=storage.join(out_dir, "metrics.json"),
                       fid_method=fid_method, log=log)
    ours = payload["metrics"].get(protocol.metric)
    result = compare(protocol, ours, reasons)
    result.update(notes=notes, workdir=storage.absolute(workdir), step=run.step, samples=npz,
                  sampling_seconds=round(sampling_seconds, 1), metrics=payload["metrics"],
                  reference=payload["reference"], num_reference=payload["num_reference"])
    for line in format_comparison(result):
        log(line)
    if jax.process_index() == 0:
        write_json_atomic(result_path, json_plain(result))
        log(f"wrote {result_path}")
    return result


def _check_reference(path: str) -> None:
    if not storage.exists(path):
        raise FileNotFoundError(f"reference batch {path} not found")
    keys = npz_keys(path)
    if "arr_0" in keys:
        check_image_batch(path)
    elif not all(k in keys for k in ("mu", "sigma", "mu_s", "sigma_s")):
        raise ValueError(f"{path} is not an ADM reference batch: it needs arr_0 images or mu, sigma, mu_s, sigma_s "
                         f"(has {keys})")


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
        lines.append("comparable: the protocol's settings, model and training")
    else:
        lines.append("NOT COMPARABLE: " + "; ".join(result["not_comparable_because"]))
    if result["source"] == "summary":
        lines.append("the paper's value comes from a summary of the paper, not from the paper itself")
    return lines
