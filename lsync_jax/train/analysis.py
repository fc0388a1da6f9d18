"""Block representation analysis of a training run: measure checkpoints, write figures and JSON.

`measure_model` runs a model's parameters on N examples of the run's data (a seeded subset) at
the chosen noise levels and measures every block (`lsync_jax.eval.analysis.measure_blocks`); it
is shared by `launch/analyze.py` and LayerSync's automatic pairs (`lsync_jax.train.auto_pairs`).
`analyze_workdir` does it for one or several checkpoints of a run and writes, under `out_dir`:

    analysis.json                       every number, per checkpoint (and the settings)
    step_{S}/cka_linear_t{t}.png        block x block linear CKA heatmap, one per t
    step_{S}/probe.png                  per-block probe accuracy, one curve per t
    probe_by_step.png                   per-block probe accuracy (mean over t), one curve per checkpoint
    alignment_by_step.png               CKNNA with the reference encoder, when one is given
    events.out.tfevents.*               the same figures and per-block scalars for TensorBoard
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from absl import logging

from lsync_jax.eval.analysis import cka_figure, measure_blocks, merge_measurements, probe_figure
from lsync_jax.eval.block_features import collect_block_features, sample_indices
from lsync_jax.host import write_json_atomic
from lsync_jax.train.config import build_source, build_transport, validate_config


@dataclasses.dataclass(frozen=True)
class MeasureSettings:
    """What to measure a model on: `num_samples` examples of `split` (a seeded subset), noised at
    each of `t_values` (1 = data); probes on a `test_fraction` split, k neighbours for k-NN metrics."""

    num_samples: int = 2048
    t_values: tuple[float, ...] = (0.25, 0.5, 0.75)
    batch_size: int = 256
    seed: int = 0
    k: int = 10
    split: str = ""  # '' = config.data.split
    condition: str = "null"  # see collect_block_features
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
    from lsync_jax.checkpoints.dinov2 import load_encoder
    from lsync_jax.models.encoders.features import encoder_tokens

    module, params, description = load_encoder(path, dtype)
    grid = model.input_size // model.patch_size
    tokens = jax.jit(lambda p, images: encoder_tokens(module, p, images, grid).mean(axis=1))
    return (lambda images: np.asarray(jax.device_get(tokens(params, images)))), description


def measure_model(config: Any, model: Any, params: Any, settings: MeasureSettings,
                  reference: Callable[[np.ndarray], np.ndarray] | None = None,
                  source: Any = None) -> dict[str, Any]:
    """Per-block measurements (`measure_blocks`' dict) of `params` on the run's data."""
    settings.check()
    source = source if source is not None else build_source(config.data, settings.split or None)
    num_classes = int(getattr(source, "num_classes", 0) or model.num_classes)
    indices = sample_indices(len(source), settings.num_samples, settings.seed)
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
    from lsync_jax.train.sample import checkpoint_steps, load_params
    from lsync_jax.train.sharding import make_mesh
    from lsync_jax.train.config import build_model
    from lsync_jax.train.images import save_png

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
    mesh = make_mesh(config.mesh.get("data", -1), config.mesh.get("fsdp", 1))
    results: dict[str, Any] = {"workdir": os.path.abspath(workdir), "params": which, "reference": reference_name,
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
                                       f"linear probe, step {step} ({which})", chance=1.0 / measured["num_classes"])
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
        chance=1.0 / next(iter(results["steps"].values()))["num_classes"])}
    if reference is not None:
        summary["alignment_by_step"] = probe_figure(
            {f"step {s}": list(_mean_over_t(m, "cknna")) for s, m in results["steps"].items()}, blocks, f"CKNNA with {reference_name} (k = {settings.k})",
            ylabel="CKNNA")
    if main:
        for name, image in summary.items():
            save_png(os.path.join(out_dir, f"{name}.png"), image)
        write_json_atomic(os.path.join(out_dir, "analysis.json"), results)
    if writer is not None:
        writer.write_images(steps[-1], {f"analysis/{k}": v[None].astype(np.float32) / 255.0 for k, v in summary.items()})
        writer.flush()
    return results
