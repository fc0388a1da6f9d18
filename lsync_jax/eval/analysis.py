"""Per-block representation measurements of a model, as numbers (JSON) and figures (PNG arrays).

`measure_blocks` turns `collect_block_features`' output into every number issue 8 asks for, per
noise level t: the ridge-probe test accuracy of each block (one seeded split shared by all blocks),
the block x block linear and unbiased CKA matrices, and, when reference-encoder features were
collected, each block's mutual k-NN and CKNNA alignment with the encoder. The result is plain
lists and floats, ready for `json.dump`; `probe_accuracy_mean` (the average over t) is what the
LayerSync pair selector reads. `cka_figure` and `probe_figure` draw the heatmap and the per-block
curves as uint8 RGB arrays (matplotlib, Agg backend), for PNG files and TensorBoard alike.

For a run, `measure_model` runs a model's parameters on N examples of the run's data (a seeded
subset) at the chosen noise levels and measures every block; it is shared by `launch/analyze.py`
and LayerSync's automatic pairs (`lsync_jax.recipes.auto_pairs`). `analyze_workdir` does it for
one or several checkpoints of a run and writes, under `out_dir`:

    analysis.json                       every number, per checkpoint (and the settings)
    step_{S}/cka_linear_t{t}.png        block x block linear CKA heatmap, one per t
    step_{S}/probe.png                  per-block probe accuracy, one curve per t
    probe_by_step.png                   per-block probe accuracy (mean over t), one curve per checkpoint
    alignment_by_step.png               CKNNA with the reference encoder, when one is given
    events.out.tfevents.*               the same figures and per-block scalars for TensorBoard
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from absl import logging

from lsync_jax import storage
from lsync_jax.builders import (
    build_mesh,
    build_model,
    build_source,
    build_transport,
    validate_config,
)
from lsync_jax.data.registry import check_source
from lsync_jax.eval.block_features import collect_block_features, sample_indices
from lsync_jax.eval.representations import (
    cka_matrix,
    cknna,
    mutual_knn,
    probe_blocks,
    probe_split,
)
from lsync_jax.extras import require
from lsync_jax.host import Progress, save_png
from lsync_jax.models.encoders.features import encoder_tokens
from lsync_jax.objectives.layersync import SELECTION_DEFAULTS
from lsync_jax.porting.dinov2 import load_encoder
from lsync_jax.storage import write_json_atomic
from lsync_jax.workdir import checkpoint_steps, load_params


def _block_number(name: str) -> int:
    return int(name.rsplit("_", 1)[1])


def _floats(values: Sequence[float]) -> list[float | None]:
    """JSON has no NaN: a constant representation's undefined CKA becomes null."""
    return [None if not math.isfinite(float(v)) else float(v) for v in values]


def measure_blocks(collected: Mapping[str, Any], num_classes: int, *, k: int = 10, test_fraction: float = 0.2,
                   seed: int = 0, l2: float = 1e-3, cka: bool = True) -> dict[str, Any]:
    """Probe accuracy, CKA matrices and (with a reference) mutual k-NN / CKNNA for every block and t.

    `collected` is `collect_block_features`' output. Returns
    {'blocks': [1, ..., D], 't_values': [...], 'num_samples': N, 'num_classes': C,
     'per_t': [{'t', 'probe_accuracy', 'probe_train_accuracy', 'cka_linear', 'cka_unbiased'
                [, 'mutual_knn', 'cknna']}], 'probe_accuracy_mean': [...], 'probe_stderr': [...],
     'num_test': test-split size, 'settings': {...}}.
    """
    labels = np.asarray(collected["labels"])
    multilabel = labels.ndim == 2  # multi-hot tags: the multi-label probe (mean average precision)
    if int(num_classes) < 2 and not multilabel:
        raise ValueError(f"a probe needs at least 2 classes, got num_classes={num_classes}")
    if not multilabel and labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels lie in [{labels.min()}, {labels.max()}], outside [0, {num_classes})")
    reference = collected.get("reference")
    if reference is not None and not 2 <= k <= len(labels) - 1:
        raise ValueError(f"k={k} nearest neighbours need 2 <= k <= N - 1 = {len(labels) - 1}")
    per_t = []
    blocks: list[int] = []
    for t, by_block in collected["features"].items():
        names = sorted(by_block, key=_block_number)
        blocks = [_block_number(n) for n in names]
        ordered = {n: by_block[n] for n in names}
        probes = probe_blocks(ordered, labels, num_classes, test_fraction, seed, l2)
        entry: dict[str, Any] = {"t": float(t),
                                 "probe_accuracy": _floats([probes[n]["accuracy"] for n in names]),
                                 "probe_train_accuracy": _floats([probes[n]["train_accuracy"] for n in names])}
        if cka:
            for kind in ("linear", "unbiased"):
                entry[f"cka_{kind}"] = [_floats(row) for row in cka_matrix(ordered, kind)[1]]
        if reference is not None:
            entry["mutual_knn"] = _floats([mutual_knn(ordered[n], reference, k) for n in names])
            entry["cknna"] = _floats([cknna(ordered[n], reference, k) for n in names])
        per_t.append(entry)
    if not per_t:
        raise ValueError("no features to measure (no t values)")
    measured = {"blocks": blocks, "num_samples": int(len(labels)), "num_classes": int(num_classes), "per_t": per_t,
                "probe": "multi-label (mean average precision over tags)" if multilabel else "class accuracy",
                "num_test": len(probe_split(len(labels), test_fraction, seed)[1]),
                "settings": {"k": int(k), "test_fraction": float(test_fraction), "seed": int(seed), "l2": float(l2),
                             "reference": reference is not None}}
    return _summarised(measured)


def chance_level(measured: Mapping[str, Any]) -> float | None:
    """The probe's chance level for figures: 1 / classes, or None for the multi-label probe (each
    tag's chance is its own positive rate)."""
    return None if str(measured.get("probe", "")).startswith("multi-label") else 1.0 / measured["num_classes"]


def _summarised(measured: dict[str, Any]) -> dict[str, Any]:
    """`measured` with 't_values', 'probe_accuracy_mean' (over t) and 'probe_stderr' (the binomial
    standard error of one accuracy on the test split: block differences below about twice it are noise)."""
    accuracy = np.array([[np.nan if a is None else a for a in e["probe_accuracy"]] for e in measured["per_t"]])
    mean = np.mean(accuracy, axis=0)
    return dict(measured, t_values=[e["t"] for e in measured["per_t"]], probe_accuracy_mean=_floats(mean),
                probe_stderr=_floats(np.sqrt(np.clip(mean * (1 - mean), 0, None) / max(measured["num_test"], 1))))


def merge_measurements(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One measurement from several of the same samples at different t (measured one t at a time,
    so that only one t's features are held at once)."""
    if not parts:
        raise ValueError("no measurements to merge")
    first = parts[0]
    for part in parts[1:]:
        for key in ("blocks", "num_samples", "num_classes", "num_test", "settings"):
            if part[key] != first[key]:
                raise ValueError(f"measurements to merge differ in {key}: {first[key]} vs {part[key]}")
    return _summarised(dict(first, per_t=[e for part in parts for e in part["per_t"]]))


# --- Figures -----------------------------------------------------------------------------------


def _render(fig: Any) -> np.ndarray:
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    _pyplot().close(fig)
    return image


def _pyplot():
    require("matplotlib", what="the analysis figures").use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cka_figure(matrix: Sequence[Sequence[float | None]], blocks: Sequence[int], title: str) -> np.ndarray:
    """A block x block CKA heatmap (colour scale 0..1, blocks 1-indexed on both axes) as uint8 RGB."""
    plt = _pyplot()
    values = np.array([[np.nan if v is None else v for v in row] for row in matrix], np.float64)
    size = 2.0 + 0.25 * len(blocks)
    fig, ax = plt.subplots(figsize=(size + 1.0, size), dpi=100)
    im = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", origin="lower")
    ticks = range(len(blocks))
    step = max(1, len(blocks) // 14)
    ax.set_xticks(list(ticks)[::step], [str(b) for b in blocks][::step])
    ax.set_yticks(list(ticks)[::step], [str(b) for b in blocks][::step])
    ax.set_xlabel("block")
    ax.set_ylabel("block")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _render(fig)


def probe_figure(curves: Mapping[str, Sequence[float | None]], blocks: Sequence[int], title: str,
                 ylabel: str = "linear-probe test accuracy", chance: float | None = None) -> np.ndarray:
    """One line per labelled curve (a checkpoint, a t, a run) over the blocks, as uint8 RGB."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=100)
    for label, values in curves.items():
        ax.plot(list(blocks), [np.nan if v is None else v for v in values], marker="o", markersize=3, label=label)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("block (1-indexed)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _render(fig)


# -- measuring a run's models ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MeasureSettings:
    """What to measure a model on: `num_samples` examples of `split` (a seeded subset), noised at
    each of `t_values` (1 = data); probes on a `test_fraction` split, k neighbours for k-NN metrics.
    The shared defaults are the automatic pairs' (`SELECTION_DEFAULTS`), defined once there."""

    num_samples: int = SELECTION_DEFAULTS["num_samples"]
    t_values: tuple[float, ...] = SELECTION_DEFAULTS["t_values"]
    batch_size: int = SELECTION_DEFAULTS["batch_size"]
    seed: int = SELECTION_DEFAULTS["seed"]
    k: int = 10
    split: str = ""  # '' = config.data.split
    condition: str = SELECTION_DEFAULTS["condition"]  # see collect_block_features
    test_fraction: float = 0.2
    cka: bool = True

    def check(self, prefix: str = "settings") -> None:
        if int(self.num_samples) < 10:
            raise ValueError(f"{prefix}.num_samples={self.num_samples}: at least 10 samples are needed for a probe")
        if not self.t_values or any(not 0.0 <= float(t) <= 1.0 for t in self.t_values):
            raise ValueError(f"{prefix}.t_values={tuple(self.t_values)} must be non-empty values in [0, 1] (1: data)")
        if int(self.batch_size) < 1:
            raise ValueError(f"{prefix}.batch_size must be >= 1, got {self.batch_size}")
        if self.condition not in ("null", "label"):
            raise ValueError(f"{prefix}.condition must be 'null' or 'label', got {self.condition!r}")


def reference_encoder(path: str, model: Any, dtype: str = "float32") -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """(uint8 images -> (n, D) mean-pooled tokens, description) of a DINOv2 encoder file (or
    'random:tiny'), fed as REPA feeds it: resized to the model's token grid x the encoder patch."""
    module, params, description = load_encoder(path, dtype)
    grid = model.input_size // model.patch_size
    tokens = jax.jit(lambda p, images: encoder_tokens(module, p, images, grid).mean(axis=1))
    return (lambda images: np.asarray(jax.device_get(tokens(params, images)))), description


def measure_model(config: Any, model: Any, params: Any, settings: MeasureSettings,
                  reference: Callable[[np.ndarray], np.ndarray] | None = None,
                  source: Any = None) -> dict[str, Any]:
    """Per-block measurements (`measure_blocks`' dict) of `params` on the run's data."""
    settings.check()
    source = check_source(source if source is not None else build_source(config.data, settings.split or None))
    num_classes = int(source.num_classes or model.num_classes or getattr(model, "num_tags", 0))
    if not num_classes and not source.num_tags:
        raise ValueError(f"block measurements probe class labels or tags, and {source.name} has "
                         "neither (e.g. motion data): measure CKA between blocks of a labelled run instead, or choose "
                         "LayerSync pairs explicitly")
    indices = sample_indices(len(source), settings.num_samples, settings.seed)
    if len(indices) < settings.num_samples:  # a command that does less than asked says so
        logging.warning("block measurements: %d examples requested but the source (%s) has %d: measuring %d",
                        settings.num_samples, source.name, len(source),
                        len(indices))
    if reference is not None and not 2 <= int(settings.k) <= len(indices) - 1:  # measure_blocks' rule, checked
        raise ValueError(f"settings.k={settings.k} nearest neighbours need 2 <= k <= N - 1 = {len(indices) - 1} "
                         f"(N = {len(indices)} examples measured): raise num_samples or lower k")  # before the passes
    progress = Progress(f"block measurements at t = {', '.join(f'{float(t):g}' for t in settings.t_values)}",
                        len(indices) * len(settings.t_values), "example passes")
    parts, reference_features, path = [], None, build_transport(config).path
    for t in settings.t_values:  # one t at a time: ImageNet's 20,000 x 28 blocks x 1152 floats are 2.6 GB per t
        collected = collect_block_features(model, params, path, source, len(indices),
                                           (float(t),), batch_size=settings.batch_size, seed=settings.seed,
                                           indices=indices, condition=settings.condition,
                                           reference=reference if reference_features is None else None)
        if reference is not None:  # the encoder sees the same images at every t: run it once
            reference_features = collected.setdefault("reference", reference_features)
        parts.append(measure_blocks(collected, num_classes, k=settings.k, test_fraction=settings.test_fraction,
                                    seed=settings.seed, cka=settings.cka))
        del collected
        progress.update(len(indices))
    progress.finish()
    measured = merge_measurements(parts)
    measured["settings"] = dict(measured["settings"], **dict(dataclasses.asdict(settings),
                                                             t_values=[float(t) for t in settings.t_values]))
    return measured


def _mean_over_t(measured: dict[str, Any], key: str) -> np.ndarray:
    """A per-block measurement (e.g. 'cknna') averaged over the measured t (null entries skipped)."""
    return np.nanmean([[np.nan if v is None else v for v in e[key]] for e in measured["per_t"]], axis=0)


def _t_name(t: float) -> str:
    return f"{t:g}".replace(".", "p")


def analyze_workdir(config: Any, workdir: str, out_dir: str, settings: MeasureSettings, *,
                    steps: Sequence[int] | None = None, which: str = "ema", encoder_path: str = "",
                    writer: Any = None) -> dict[str, Any]:
    """Measure checkpoints `steps` (default: all) of the run in `workdir`; write the files listed in
    the module docstring under `out_dir` (process 0) and return the JSON's content."""
    validate_config(config)
    settings.check()
    available = checkpoint_steps(workdir)
    steps = list(available if not steps else steps)
    missing = [s for s in steps if s not in available]
    if missing:
        raise FileNotFoundError(f"no checkpoint of step(s) {missing} in {workdir}/checkpoints; it holds {available}")
    source = build_source(config.data, settings.split or None)  # a missing split fails before any restore
    model = build_model(config)
    reference, reference_name = (reference_encoder(encoder_path, model) if encoder_path else (None, None))
    mesh = build_mesh(config)
    results: dict[str, Any] = {"workdir": storage.absolute(workdir), "params": which, "reference": reference_name,
                               "steps": {}}
    main = jax.process_index() == 0
    for step in steps:
        _, params, _ = load_params(config, workdir, mesh, step=step, which=which)
        measured = measure_model(config, model, params, settings, reference, source)
        results["steps"][str(step)] = measured
        logging.info("step %d: probe accuracy per block (mean over t) %s", step,
                     " ".join(f"{a:.3f}" for a in measured["probe_accuracy_mean"]))
        blocks = measured["blocks"]
        images = {}
        for entry in measured["per_t"]:
            images[f"cka_linear/t{_t_name(entry['t'])}"] = cka_figure(
                entry["cka_linear"], blocks, f"linear CKA, step {step}, t = {entry['t']:g} (1: data)")
        images["probe"] = probe_figure({f"t = {e['t']:g}": e["probe_accuracy"] for e in measured["per_t"]}, blocks,
                                       f"linear probe, step {step} ({which})", chance=chance_level(measured))
        if main:
            for name, image in images.items():
                save_png(os.path.join(out_dir, f"step_{step}", name.replace("/", "_") + ".png"), image)
        if writer is not None:
            writer.write_images(step, {f"analysis/{k}": v[None].astype(np.float32) / 255.0 for k, v in images.items()})
            scalars = {f"analysis/probe/block_{b}": a for b, a in zip(blocks, measured["probe_accuracy_mean"])
                       if a is not None}
            if reference is not None:
                scalars.update({f"analysis/cknna/block_{b}": float(v)
                                for b, v in zip(blocks, _mean_over_t(measured, "cknna"))})
            writer.write_scalars(step, scalars)
    blocks = next(iter(results["steps"].values()))["blocks"]
    summary = {"probe_by_step": probe_figure(
        {f"step {s}": m["probe_accuracy_mean"] for s, m in results["steps"].items()}, blocks,
        f"linear probe (mean over t = {', '.join(f'{t:g}' for t in settings.t_values)}; {which})",
        chance=chance_level(next(iter(results["steps"].values()))))}
    if reference is not None:
        summary["alignment_by_step"] = probe_figure(
            {f"step {s}": list(_mean_over_t(m, "cknna")) for s, m in results["steps"].items()}, blocks,
            f"CKNNA with {reference_name} (k = {settings.k})", ylabel="CKNNA")
    if main:
        for name, image in summary.items():
            save_png(os.path.join(out_dir, f"{name}.png"), image)
        write_json_atomic(os.path.join(out_dir, "analysis.json"), results)
    if writer is not None:
        writer.write_images(steps[-1], {f"analysis/{k}": v[None].astype(np.float32) / 255.0
                                        for k, v in summary.items()})
        writer.flush()
    return results
