"""The training objective: transport (velocity) loss plus any registered regularisers.

`build_objective(config.objective, transport, depth=...)` validates the whole objective config
in Python (bad keys, bad layer pairs raise ValueError naming the key) before anything is traced;
`objective_loss` is the pure function a train step differentiates.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from lsync_jax.objectives.batch import Batch, make_batch
from lsync_jax.objectives.registry import REGULARIZERS, Regularizer
from lsync_jax.objectives.sections import with_defaults
from lsync_jax.transport.transport import Transport

Array = jax.Array
# config.objective's own keys; each regulariser's section is registered with its defaults.
OBJECTIVE_DEFAULTS: dict[str, Any] = dict(regularizers=(), transport_weight=1.0, clean_input=False)


@dataclasses.dataclass(frozen=True)
class Objective:
    """A transport loss and the regularisers added to it (each returns its weighted term)."""

    transport: Transport
    regularizers: tuple[Regularizer, ...] = ()
    transport_weight: float = 1.0  # 0: regularisers only (ERW's first stage)
    clean_input: bool = False  # the model sees the data itself at t = 1 (ERW's first stage)

    @property
    def features_needed(self) -> tuple[str, ...]:
        return tuple(sorted({f for r in self.regularizers for f in r.features_needed}))

    @property
    def spans_batch(self) -> tuple[str, ...]:
        """The regularisers whose statistics span the batch (microbatches cannot reproduce them)."""
        return tuple(r.name for r in self.regularizers if r.spans_batch)


def build_objective(cfg: Mapping[str, Any], transport: Transport, *, depth: int,
                    prefix: str = "objective") -> Objective:
    """Objective from a config section such as

        objective.regularizers = ('layersync',)
        objective.layersync = {'pairs': ((8, 16, 0.2),), 'stop_gradient': True}
        objective.transport_weight = 1.0     # 0 trains the regularisers alone
        objective.clean_input = False        # True feeds the clean data at t = 1

    Every name in `regularizers` must be registered; keys left out take the defaults in
    `OBJECTIVE_DEFAULTS` and the regulariser's registered defaults. Sections of regularisers not
    listed are ignored (so a config keeps settings for a method it turns off).
    """
    cfg = with_defaults(dict(cfg), dict(OBJECTIVE_DEFAULTS, **{name: None for name in REGULARIZERS}), prefix)
    names = tuple(cfg["regularizers"])
    transport_weight = cfg["transport_weight"]
    if isinstance(transport_weight, bool) or not isinstance(transport_weight, (int, float)) or transport_weight < 0:
        raise ValueError(f"{prefix}.transport_weight must be a number >= 0, got {transport_weight!r}")
    if transport_weight == 0 and not names:
        raise ValueError(f"{prefix}.transport_weight=0 with no regularisers leaves nothing to train")
    regs = []
    for name in names:
        if name not in REGULARIZERS:
            raise ValueError(f"{prefix}.regularizers: unknown regulariser {name!r}; registered: {sorted(REGULARIZERS)}")
        regs.append(REGULARIZERS[name](dict(cfg[name] or {}), depth=depth, prefix=f"{prefix}.{name}"))
    if len(set(names)) != len(names):
        raise ValueError(f"{prefix}.regularizers lists a regulariser twice: {names}")
    return Objective(transport, tuple(regs), float(transport_weight), bool(cfg["clean_input"]))


def objective_loss(
    params: Any,
    apply_fn: Callable[..., Any],
    batch: Batch,
    key: Array,
    objective: Objective,
    *,
    train: bool = True,
    step: Array | None = None,
    example_ids: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Total loss and metrics for one `Batch` {'x': (N, H, W, C) data, 'y': (N,) labels, ...}.

    Draws t and noise, runs the model once (all blocks are sown; the regularisers read the ones
    they need and XLA drops the rest), and returns (loss, metrics) with metrics 'loss', 'loss/<prediction>', one
    'loss/<regulariser>' per regulariser (its weighted term) and each regulariser's own metrics.
    `apply_fn(variables, x, t, y, train=..., rngs=..., mutable=...)` is a flax `Module.apply`.
    Regularisers see the batch with the optimizer `step` added (for scheduled weights). With
    `objective.clean_input` the model sees the data itself at t = 1 (our data end).

    Randomness is drawn per example: example i's t, noise and condition dropout come from
    fold_in(key_examples, example_ids[i]) (default: its index in `batch`), so a step that splits its batch
    into microbatches, passing each example's index in the whole batch, draws what the whole batch
    draws (`lsync_jax.train.step`).
    """
    batch = make_batch(batch, "objective_loss's caller")  # a misspelt key fails here, at trace time
    key_examples, key_model = jax.random.split(key)
    # threefry whatever the default PRNG: its draws under vmap equal each key's own ('rbg' batches its
    # generator, so an example's draw would depend on how many examples are drawn with it)
    key_examples = jax.random.wrap_key_data(jax.random.bits(key_examples, (2,), jnp.uint32), impl="threefry2x32")
    x1 = batch["x"].astype(jnp.float32)
    ids = jnp.arange(x1.shape[0]) if example_ids is None else example_ids
    keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(key_examples, i)))(ids)  # (N, 2)
    transport = objective.transport
    t, x0, xt, ut = transport.prepare_examples(keys[:, 0], x1)
    if objective.clean_input:
        t, xt = jnp.ones_like(t), x1
    variables = {"params": params}
    rngs = {"dropout": key_model}  # the model's own stream (ours draw their dropout from `drop_draws`)
    mask = batch.get("mask")  # padded sequences: (N, L), True on real steps
    condition = batch["tags"] if "tags" in batch else batch["y"]  # tag-conditioned data: the multi-hot tags
    extra = {"mask": mask} if mask is not None else {}
    if train:  # the condition dropout's draws, one per example
        extra["drop_draws"] = jax.vmap(lambda k: jax.random.uniform(k))(keys[:, 1])
    token_mask = None
    if objective.regularizers:
        out, state = apply_fn(variables, xt, t, condition, train=train, rngs=rngs, mutable=["intermediates"],
                              **extra)
        sown = state.get("intermediates", {})
        missing = [f for f in objective.features_needed if f not in sown]
        if missing:
            raise ValueError(f"the model sows no {missing}; it sows {sorted(sown)}")
        features = {f: sown[f][0] for f in objective.features_needed}
        token_mask = sown["token_mask"][0] if "token_mask" in sown else None
    else:
        out = apply_fn(variables, xt, t, condition, train=train, rngs=rngs, **extra)
        features = {}
    metrics, total = {}, jnp.zeros((), jnp.float32)
    if objective.transport_weight > 0:  # (at t = 1, clean_input, some loss weights are infinite)
        transport_loss = jnp.mean(transport.loss(out, t, x0, xt, ut, mask))
        metrics[f"loss/{transport.prediction}"] = transport_loss
        total = objective.transport_weight * transport_loss
    reg_batch = make_batch(batch, "objective_loss")
    if step is not None:  # for scheduled weights
        reg_batch["step"] = step
    if token_mask is not None:  # the regularisers average over real tokens only
        reg_batch["token_mask"] = token_mask
    for reg in objective.regularizers:
        term, reg_metrics = reg(features, reg_batch)
        metrics[f"loss/{reg.name}"] = term
        metrics.update(reg_metrics)
        total = total + term
    metrics["loss"] = total
    return total, metrics
