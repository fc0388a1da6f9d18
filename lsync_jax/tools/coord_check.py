"""The muP coordinate check (Yang et al., microsoft/mup `coord_check`): train SiTs of several widths a
few Adam steps on the same batch and record each layer's activation scale (mean |x|) per step.

Under muP every curve is flat in the width; under the standard parametrisation with the same
learning rate the later steps' activations grow with the width. Widths grow by heads at a fixed
head dimension, as in the muP-DiT code; muP's base width is the smallest width checked.

    records = coord_check((64, 128, 256, 512), ("sp", "mup"), num_steps=4, num_seeds=3)  # lr 1e-2
    print(format_table(records)); plot_coord_check(records, "coord.png")
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lsync_jax.extras import require
from lsync_jax.models import block_name, get_model
from lsync_jax.models.mup import mup_lr_multipliers
from lsync_jax.objectives import Objective, objective_loss
from lsync_jax.train.state import make_optimizer
from lsync_jax.transport import create_transport

EMBEDDINGS = ("x_embedder", "t_embedder", "y_embedder")
READOUT = "final_layer"
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                "xla_cpu_use_fusion_emitters": False}


@dataclasses.dataclass(frozen=True)
class CoordCheckSetup:
    """The model family and training of one coordinate check (widths and parametrisation aside).

    `lr` is the base Adam learning rate for every width (muP divides it for hidden matrices);
    `output_multiplier` is muP's readout multiplier."""

    head_dim: int = 16
    depth: int = 2
    patch_size: int = 2
    image_size: int = 8
    channels: int = 4
    num_classes: int = 10
    batch_size: int = 16
    lr: float = 1e-2
    output_multiplier: float = 1.0


def layer_names(depth: int) -> tuple[str, ...]:
    """The layers recorded, input to output: embeddings, blocks (as sown: block_1 ...), readout."""
    return EMBEDDINGS + tuple(block_name(i) for i in range(1, depth + 1)) + (READOUT,)


def _capture(module: Any, method_name: str) -> bool:
    """flax capture filter: outputs of the SiT's embedders and final layer (the blocks sow theirs)."""
    return method_name == "__call__" and module.name in EMBEDDINGS + (READOUT,)


def fixed_batch(setup: CoordCheckSetup, seed: int = 0) -> dict[str, jax.Array]:
    """One batch used for every step and width (the coordinate check trains on fixed data)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((setup.batch_size, setup.image_size, setup.image_size, setup.channels))
    y = rng.integers(0, setup.num_classes, setup.batch_size)
    return {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.int32)}


def _run_width(setup: CoordCheckSetup, width: int, parametrization: str, base_width: int, num_steps: int,
               seeds: Sequence[int], batch: dict[str, jax.Array]) -> np.ndarray:
    """(seeds, num_steps + 1, layers) mean |activation| after 0 .. num_steps Adam steps."""
    if width % setup.head_dim:
        raise ValueError(f"width {width} is not a multiple of head_dim={setup.head_dim}")
    model = get_model(f"SiT-S/{setup.patch_size}", depth=setup.depth, hidden_size=width,
                      num_heads=width // setup.head_dim, input_size=setup.image_size, in_channels=setup.channels,
                      num_classes=setup.num_classes, learn_sigma=False, parametrization=parametrization,
                      mup_base_width=base_width, output_multiplier=setup.output_multiplier)
    tx, _ = make_optimizer({"lr": setup.lr}, lr_multipliers=mup_lr_multipliers(model))
    objective = Objective(create_transport())
    names = layer_names(setup.depth)
    # measured on one fixed noisy input (same t and noise at every step and width)
    t_probe, _, xt_probe, _ = objective.transport.prepare(jax.random.key(1234), batch["x"])

    def scales(params: Any) -> jax.Array:
        _, state = model.apply({"params": params}, xt_probe, t_probe, batch["y"], capture_intermediates=_capture,
                               mutable=["intermediates"])
        inter = state["intermediates"]  # captured: {name: {'__call__': (x,)}}; sown: {name: (x,)}
        found = {n: v["__call__"][0] if isinstance(v, dict) else v[0] for n, v in inter.items()}
        return jnp.stack([jnp.mean(jnp.abs(found[n].astype(jnp.float32))) if n in found else jnp.nan
                          for n in names])

    def run(seed: jax.Array) -> jax.Array:
        key = jax.random.key(seed)
        params = model.init(jax.random.fold_in(key, 0), *model.init_inputs(1))["params"]
        opt_state = tx.init(params)

        def step(carry, i):
            params, opt_state = carry
            grads, _ = jax.grad(objective_loss, has_aux=True)(params, model.apply, batch,
                                                              jax.random.fold_in(key, i + 1), objective)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), scales(params)

        # one step more than recorded: the last update is dropped, but the program holds one probe forward
        return jax.lax.scan(step, (params, opt_state), jnp.arange(num_steps + 1))[1]

    run = _compile(run, jnp.asarray(0, jnp.uint32))  # one compile per width, reused by the seeds
    return np.stack([np.asarray(run(jnp.asarray(seed, jnp.uint32))) for seed in seeds])


def _compile(fn: Any, *example: Any) -> Any:
    """jit-compile `fn`; on CPU without XLA's costlier optimisations: the programs are tiny, so compile
    time dominates (about half of it saved), and an XLA that lacks those options compiles as usual."""
    lowered = jax.jit(fn).lower(*example)
    if jax.default_backend() == "cpu":
        try:
            return lowered.compile(compiler_options=FAST_COMPILE)
        except jax.errors.JaxRuntimeError:
            pass
    return lowered.compile()


def coord_check(widths: Sequence[int], parametrizations: Sequence[str] = ("sp", "mup"), *, num_steps: int = 4,
                num_seeds: int = 2, setup: CoordCheckSetup = CoordCheckSetup()) -> list[dict[str, Any]]:
    """Records {parametrization, width, seed, step, layer, l1}: mean |x| of each layer's output after
    `step` = 0 .. num_steps Adam steps (step 0: at initialisation)."""
    widths = sorted(int(w) for w in widths)
    batch = fixed_batch(setup)
    names = layer_names(setup.depth)
    records = []
    for parametrization in parametrizations:
        for width in widths:
            data = _run_width(setup, width, parametrization, widths[0], num_steps, range(num_seeds), batch)
            for seed, per_step in enumerate(data):
                for step, per_layer in enumerate(per_step):
                    records += [dict(parametrization=parametrization, width=width, seed=seed, step=step, layer=n,
                                     l1=float(v)) for n, v in zip(names, per_layer) if np.isfinite(v)]
    return records


def mean_scales(records: Sequence[dict[str, Any]]) -> dict[tuple[str, str, int, int], float]:
    """{(parametrization, layer, step, width): mean over seeds of the activation scale}."""
    groups: dict[tuple[str, str, int, int], list[float]] = {}
    for r in records:
        groups.setdefault((r["parametrization"], r["layer"], r["step"], r["width"]), []).append(r["l1"])
    return {k: float(np.mean(v)) for k, v in groups.items()}


def width_growth(records: Sequence[dict[str, Any]], parametrization: str, layer: str, step: int) -> float:
    """Activation scale at the widest width over that at the narrowest (1: flat in the width)."""
    means = mean_scales(records)
    widths = sorted({w for (p, n, s, w) in means if (p, n, s) == (parametrization, layer, step)})
    return means[(parametrization, layer, step, widths[-1])] / means[(parametrization, layer, step, widths[0])]


def _ordered(records: Sequence[dict[str, Any]], key: str) -> list[Any]:
    return list(dict.fromkeys(r[key] for r in records))


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """One row per (parametrization, step, layer): the scale at each width and widest / narrowest."""
    means = mean_scales(records)
    widths = sorted(_ordered(records, "width"))
    header = f"{'param':<6}{'step':>5}  {'layer':<12}" + "".join(f"{f'w={w}':>11}" for w in widths) + f"{'growth':>9}"
    lines = [header, "-" * len(header)]
    for p in _ordered(records, "parametrization"):
        for s in sorted(_ordered(records, "step")):
            for n in _ordered(records, "layer"):
                if (p, n, s, widths[0]) not in means:
                    continue
                row = [means[(p, n, s, w)] for w in widths]
                lines.append(f"{p:<6}{s:>5}  {n:<12}" + "".join(f"{v:>11.4g}" for v in row)
                             + f"{row[-1] / row[0] if row[0] else float('nan'):>9.2f}")
    return "\n".join(lines)


def plot_coord_check(records: Sequence[dict[str, Any]], path: str) -> None:
    """Activation scale vs width (log-log), one line per layer, one panel per (parametrization, step)."""
    require("matplotlib", what="the coordinate-check plot").use("Agg")
    import matplotlib.pyplot as plt

    means = mean_scales(records)
    params, steps, layers = _ordered(records, "parametrization"), sorted(_ordered(records, "step")), \
        _ordered(records, "layer")
    widths = sorted(_ordered(records, "width"))
    fig, axes = plt.subplots(len(params), len(steps), figsize=(3.2 * len(steps), 3.0 * len(params)),
                             squeeze=False, sharex=True)
    colors = plt.cm.viridis(np.linspace(0, 1, len(layers)))
    for i, p in enumerate(params):
        for j, s in enumerate(steps):
            ax = axes[i, j]
            for color, n in zip(colors, layers):
                ys = [means.get((p, n, s, w), np.nan) for w in widths]
                if np.all(np.asarray(ys) > 0):
                    ax.plot(widths, ys, marker="o", color=color, label=n)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{p}, step {s}")
            if i == len(params) - 1:
                ax.set_xlabel("width")
            if j == 0:
                ax.set_ylabel("mean |activation|")
    axes[0, -1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(records: Sequence[dict[str, Any]], setup: CoordCheckSetup, path: str) -> None:
    """The raw records and the setup, for re-plotting or comparing runs."""
    with open(path, "w") as f:
        json.dump({"setup": dataclasses.asdict(setup), "records": list(records)}, f, indent=1)
