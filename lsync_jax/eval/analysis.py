"""Per-block representation measurements of a model, as numbers (JSON) and figures (PNG arrays).

`measure_blocks` turns `collect_block_features`' output into every number issue 8 asks for, per
noise level t: the ridge-probe test accuracy of each block (one seeded split shared by all blocks),
the block x block linear and unbiased CKA matrices, and, when reference-encoder features were
collected, each block's mutual k-NN and CKNNA alignment with the encoder. The result is plain
lists and floats, ready for `json.dump`; `probe_accuracy_mean` (the average over t) is what the
LayerSync pair selector reads. `cka_figure` and `probe_figure` draw the heatmap and the per-block
curves as uint8 RGB arrays (matplotlib, Agg backend), for PNG files and TensorBoard alike.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from lsync_jax.eval.representations import cka_matrix, cknna, mutual_knn, probe_blocks, probe_split


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
    if int(num_classes) < 2:
        raise ValueError(f"a probe needs at least 2 classes, got num_classes={num_classes}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
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
                "num_test": len(probe_split(len(labels), test_fraction, seed)[1]),
                "settings": {"k": int(k), "test_fraction": float(test_fraction), "seed": int(seed), "l2": float(l2),
                             "reference": reference is not None}}
    return _summarised(measured)


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
    import matplotlib.pyplot as plt

    plt.close(fig)
    return image


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
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
