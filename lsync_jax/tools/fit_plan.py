"""Which memory levers and which mesh fit a config on a Cloud TPU slice, and which is fastest: a search
over compiles that are slow (minutes for SiT-XL/2 on 2 cores), so it prunes analytically first,
compiles only the candidates that survive, and caches each compiled cell as JSON, keyed by the config,
the target and the levers, so that a search can stop and resume (`launch/fit_plan.py`).

The levers: the mesh (data x fsdp), `model.remat` ('none', 'dots', 'blocks'), `train.microbatches`
and `optimizer.mu_dtype` (float32 or bfloat16 first moments). The analytic model (`predict`) is a
heuristic for pruning and ordering only: the state per chip is exact (from the sharded state's
shapes); activations per example are a count of what a DiT block keeps for its backward pass under
each policy; the time is the analytic model FLOPs (recompute included) over the chip's peak. Every
number in the result table comes from the compiler (memory) or its cost model (times: "compiler
estimate"), never from a TPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import itertools
import json
import math
import os
import time
from typing import Any, Callable, Iterable, Sequence

import jax.numpy as jnp

from lsync_jax import storage
from lsync_jax.builders import build_model, build_transport, derived_config, mesh_rules, validate_config
from lsync_jax.models.mup import mup_lr_multipliers
from lsync_jax.objectives import build_objective
from lsync_jax.sharding import make_mesh
from lsync_jax.tools.benchmark import forward_flops, input_axes
from lsync_jax.tools.fit import GIB, check_fit, parse_target, per_device_bytes, topology_devices, usable_hbm
from lsync_jax.train.state import abstract_state, make_optimizer

REMATS = ("none", "dots", "blocks")
MU_DTYPES = (None, "bfloat16")
# recomputed share of the model FLOPs per policy: 'blocks' reruns each block's forward (a third more);
# 'dots' reruns what is not a linear (attention's two batched products, element-wise work)
REMAT_FLOPS = {"none": 1.0, "dots": 1.1, "blocks": 4.0 / 3.0}
CACHE_VERSION = 1  # bump when a cell's content or meaning changes


@dataclasses.dataclass(frozen=True)
class Levers:
    fsdp: int
    remat: str
    microbatches: int
    mu_dtype: str | None

    def changes(self, devices: int) -> dict[str, Any]:
        """The config keys this choice sets."""
        return {"mesh.data": devices // self.fsdp, "mesh.fsdp": self.fsdp, "model.overrides.remat": self.remat,
                "train.microbatches": self.microbatches, "optimizer.mu_dtype": self.mu_dtype}

    def label(self) -> str:
        mu = self.mu_dtype or "float32"
        return f"fsdp {self.fsdp}, remat {self.remat}, microbatches {self.microbatches}, Adam mu {mu}"


@dataclasses.dataclass
class Prediction:
    levers: Levers
    state_bytes: float  # per chip, exact
    activation_bytes: float  # per chip, the heuristic
    seconds: float  # heuristic, for ordering

    @property
    def total(self) -> float:
        return self.state_bytes * 1.25 + self.activation_bytes  # + the gradients (a quarter of the state)


def activation_bytes_per_example(model: Any, remat: str) -> float:
    """What one example's forward keeps for the backward pass, summed over the blocks (a count of a DiT
    block's tensors, in the compute dtype; attention's logits in float32)."""
    tokens = math.prod(a // p for a, p in zip(input_axes(model), model.patch_shape))
    d, heads, depth = model.hidden_size, model.num_heads, model.depth
    width = jnp.dtype(model.dtype).itemsize
    mlp = model.mlp_ratio
    block = tokens * d * width * (12 + 2 * mlp) + heads * tokens * tokens * (4 + width)
    if remat == "none":
        return depth * block
    if remat == "dots":  # the linears' outputs: qkv, proj, fc1, fc2; one block's rest while it reruns
        return depth * tokens * d * width * (5 + mlp) + block
    return depth * tokens * d * width + block  # 'blocks': each block's input, one block at a time


def candidates(devices: int, batch: int, objective_spans_batch: bool) -> list[Levers]:
    """Every lever combination that divides the batch and the chips."""
    per_chip = batch // devices
    fsdps = [f for f in (2**i for i in range(int(math.log2(devices)) + 1)) if devices % f == 0]
    ks = [k for k in (2**i for i in range(int(math.log2(max(per_chip, 1))) + 1)) if per_chip % k == 0]
    if objective_spans_batch:
        ks = [1]
    return [Levers(f, r, k, mu) for f, r, k, mu in itertools.product(fsdps, REMATS, ks, MU_DTYPES)]


def predict(config: Any, target_name: str, levers_list: Sequence[Levers]) -> list[Prediction]:
    """The heuristic's figures for each candidate (no compile): exact state bytes per chip from the
    sharded state's shapes, activations from `activation_bytes_per_example`, time from FLOPs."""
    target = parse_target(target_name)
    devices = topology_devices(target)
    model = build_model(config, devices[0].platform)
    per_chip = int(config.data.batch_size) // len(devices)
    flops = 3 * forward_flops(model, *input_axes(model)) * per_chip
    state: dict[tuple[int, Any], float] = {}
    out = []
    for levers in levers_list:
        if (levers.fsdp, levers.mu_dtype) not in state:
            optimizer = dict(config.optimizer, mu_dtype=levers.mu_dtype)
            tx, _ = make_optimizer(optimizer, lr_multipliers=mup_lr_multipliers(model))
            mesh = make_mesh(len(devices) // levers.fsdp, levers.fsdp, devices=devices)
            abstract = abstract_state(model, tx, mesh, mesh_rules(config))
            state[levers.fsdp, levers.mu_dtype] = per_device_bytes(abstract)
        acts = activation_bytes_per_example(model.clone(remat=levers.remat), levers.remat)
        acts *= per_chip / levers.microbatches
        # smaller parts use the chip less well; fsdp gathers the weights once per part and pass
        seconds = (flops * REMAT_FLOPS[levers.remat] / target.chip.peak_bf16
                   * (1 + 0.03 * (levers.microbatches - 1)) * (1 + 0.05 * (levers.fsdp > 1)))
        out.append(Prediction(levers, state[levers.fsdp, levers.mu_dtype], acts, seconds))
    return out


def cell_key(config: Any, target_name: str, levers: Levers) -> str:
    """What a compiled cell depends on: the config (every key), the target, the levers, and the versions
    of the compiler."""
    versions = {name: _version(name) for name in ("jax", "jaxlib", "libtpu")}
    payload = json.dumps(dict(config=json.loads(config.to_json_best_effort(sort_keys=True)), target=target_name,
                              levers=dataclasses.asdict(levers), versions=versions, cache=CACHE_VERSION),
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


def compiled_cell(config: Any, target_name: str, levers: Levers, cache_dir: str, log: Callable[[str], None] = print
                  ) -> dict[str, Any]:
    """One candidate compiled (the train step only) or read back from `cache_dir`."""
    path = storage.join(cache_dir, f"{cell_key(config, target_name, levers)}.json")
    if storage.exists(path):
        return storage.read_json(path)
    devices = parse_target(target_name).devices
    candidate = derived_config(config, levers.changes(devices))
    start = time.perf_counter()
    report = check_fit(candidate, target_name, programs=False)
    cell = dict(report.as_dict(), levers=dataclasses.asdict(levers), wall_seconds=time.perf_counter() - start,
                config_name=str(config.get("protocol") or ""), key=path)
    storage.makedirs(cache_dir)
    storage.write_json_atomic(path, cell)
    step = cell["programs"][0]
    size = (f"{step['total_gib']:.2f} GiB" if step["fits"] else
            f"refused: temporaries alone need {step['needed'] / GIB:.2f} GiB")
    log(f"  compiled {levers.label()}: {'fits' if cell['fits'] else 'does not fit'} ({size}) in "
        f"{cell['wall_seconds']:.0f} s")
    return cell


def plan(config: Any, target_name: str, cache_dir: str, *, max_compiles: int = 6, want: int = 2,
         margin: float = 1.5, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Search the levers for `config` on `target_name`: prune candidates whose predicted memory exceeds
    the usable HBM by more than `margin`, order the rest by predicted time, compile in that order until
    `want` fit or `max_compiles` compiles were made (cached cells are free). Returns the table, best
    (fastest by the compiler's estimate) first."""
    validate_config(config)
    target = parse_target(target_name)
    devices = topology_devices(target)
    usable = usable_hbm(devices[0])
    model = build_model(config, devices[0].platform)
    objective = build_objective(config.objective, build_transport(config), depth=model.depth)
    levers = candidates(len(devices), int(config.data.batch_size), bool(objective.spans_batch))
    # fastest first; at equal speed the fewer levers (float32 moments, less sharding, fewer parts)
    predictions = sorted(predict(config, target_name, levers), key=lambda p: (
        round(p.seconds, 6), p.levers.mu_dtype is not None, p.levers.fsdp, p.levers.microbatches))
    survivors = [p for p in predictions if p.total <= margin * usable]
    pruned = [p for p in predictions if p.total > margin * usable]
    log(f"{target_name}: {len(levers)} candidates, {len(pruned)} pruned analytically, {len(survivors)} left")
    cells, compiles, fits, skipped = [], 0, 0, 0
    ratios: dict[str, list[float]] = {}  # measured / predicted memory, per remat policy
    for prediction in survivors:
        if fits >= want:
            break
        calibrated = prediction.total * _ratio(ratios, prediction.levers.remat)
        if ratios and calibrated > CALIBRATED_SLACK * usable:  # what was measured says this cannot fit either
            skipped += 1
            pruned.append(prediction)
            continue
        cached = storage.exists(storage.join(cache_dir, f"{cell_key(config, target_name, prediction.levers)}.json"))
        if not cached and compiles >= max_compiles:  # cached cells cost nothing: read on
            continue
        cell = compiled_cell(config, target_name, prediction.levers, cache_dir, log)
        compiles += 0 if cached else 1
        cells.append(dict(cell, predicted_gib=prediction.total / GIB, predicted_seconds=prediction.seconds))
        fits += bool(cell["fits"])
        measured = _measured_bytes(cell)
        if measured:
            ratios.setdefault(prediction.levers.remat, []).append(measured / prediction.total)
    if skipped:
        log(f"  {skipped} more pruned by the measured / predicted memory of the cells compiled")
    ranked = sorted(cells, key=lambda c: (not c["fits"], c["step_seconds"] or math.inf))
    return dict(target=target_name, usable_hbm_gib=usable / GIB, global_batch=int(config.data.batch_size),
                cells=ranked, best=next((c for c in ranked if c["fits"]), None),
                pruned=[dict(levers=dataclasses.asdict(p.levers), predicted_gib=p.total / GIB) for p in pruned],
                untried=len(survivors) - len(cells) - skipped)


# A candidate whose prediction, scaled by what the compiled cells measured against theirs, is over the
# usable HBM by more than this is not compiled (the scaled model is still only a model).
CALIBRATED_SLACK = 1.1


def _measured_bytes(cell: dict[str, Any]) -> float:
    """A compiled cell's memory per chip: what it needs (compiled) or the temporaries it asked for plus
    the state (refused)."""
    step = cell["programs"][0]
    if step["fits"]:
        return float(step["arguments"] + step["outputs"] - step["aliased"] + step["temporaries"])
    return float(step["needed"] + sum(cell["state_gib"].values()) * GIB) if step["needed"] else 0.0


def _ratio(ratios: dict[str, list[float]], remat: str) -> float:
    """measured / predicted for this remat policy's cells, else all cells' (1 before any)."""
    same = ratios.get(remat) or [r for values in ratios.values() for r in values]
    return min(same) if same else 1.0


def plan_lines(result: dict[str, Any]) -> list[str]:
    """The plan as a table a person reads, best first."""
    out = [f"{result['target']} (usable HBM {result['usable_hbm_gib']:.2f} GiB per chip), global batch "
           f"{result['global_batch']}:", "| fits | mesh | remat | microbatches | Adam mu | GiB per chip | "
           "step (compiler estimate) | MFU (estimate) |", "|---|---|---|---|---|---|---|---|"]
    for cell in result["cells"]:
        lv, step, mfu = cell["levers"], cell["step_seconds"], cell["mfu_estimate"]
        gib = cell["programs"][0]["total_gib"] if cell["fits"] else cell["programs"][0]["needed"] / GIB
        out.append(f"| {'yes' if cell['fits'] else 'no'} | data {cell['mesh']['data']} x fsdp {cell['mesh']['fsdp']} "
                   f"| {lv['remat']} | {lv['microbatches']} | {lv['mu_dtype'] or 'float32'} | "
                   f"{gib:.2f}{'' if cell['fits'] else ' needed'} | "
                   f"{'' if step is None else f'{step * 1e3:.0f} ms'} | "
                   f"{'' if mfu is None else f'{100 * mfu:.0f}%'} |")
    out.append(f"({len(result['pruned'])} candidates pruned analytically, {result['untried']} not compiled)")
    return out


def table_cell(result: dict[str, Any], num_steps: int) -> str:
    """One cell of docs/pods.md's table: the best plan, or that nothing tried fits."""
    best = result["best"]
    if best is None and not result["cells"]:
        return "not compiled yet"
    if best is None:
        tried = len(result["cells"])
        left = f"; {result['untried']} candidates not compiled" if result["untried"] else ""
        return f"none of the {tried} compiled fits{left}"
    lv, seconds = best["levers"], best["step_seconds"]
    days = seconds * num_steps / 86400
    return (f"fits: data {best['mesh']['data']} x fsdp {best['mesh']['fsdp']}, remat {lv['remat']}, "
            f"microbatches {lv['microbatches']}, mu {lv['mu_dtype'] or 'f32'}; {best['programs'][0]['total_gib']:.1f} "
            f"GiB/chip; {seconds * 1e3:.0f} ms/step; {days:.1f} days to {num_steps // 1000}K")


def plans(configs: Iterable[tuple[str, Any]], targets: Sequence[str], cache_dir: str, **kw: Any
          ) -> dict[tuple[str, str], dict[str, Any]]:
    """`plan` for every (config, target): resumable, each compiled cell cached."""
    out = {}
    for name, config in configs:
        for target in targets:
            out[name, target] = plan(config, target, cache_dir, **kw)
            storage.write_json_atomic(storage.join(cache_dir, f"plan_{_slug(name)}_{target}.json"),
                                      out[name, target])
    return out


def _slug(name: str) -> str:
    return os.path.splitext(os.path.basename(name))[0]


def markdown_table(results: dict[tuple[str, str], dict[str, Any]], targets: Sequence[str], num_steps: int
                   ) -> list[str]:
    names = list(dict.fromkeys(name for name, _ in results))
    out = ["| config (global batch) | " + " | ".join(targets) + " |", "|---" * (len(targets) + 1) + "|"]
    for name in names:
        batch = next(r["global_batch"] for (n, _), r in results.items() if n == name)
        out.append(f"| `{_slug(name)}` ({batch}) | " + " | ".join(
            table_cell(results[name, t], num_steps) if (name, t) in results else "not run" for t in targets) + " |")
    return out


__all__ = ["Levers", "candidates", "compiled_cell", "markdown_table", "plan", "plan_lines", "plans", "predict"]
