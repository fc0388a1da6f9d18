"""The regulariser registry: a name in `config.objective.regularizers` -> a builder.

A regulariser is a pure callable `reg(features, batch) -> (weighted_loss, metrics)` where
`features` maps sown names ('block_8', ...) to arrays and `batch` holds the step's inputs. It
declares the sown names it reads in `features_needed`, so the objective asks the model for exactly
those. A new method is one module in `lsync_jax/objectives/` that registers its builder:

    @register_regularizer('mymethod')
    def build(cfg: Mapping, *, depth: int, prefix: str) -> Regularizer: ...

`prefix` is the config path of `cfg` (e.g. 'objective.mymethod'), for error messages.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar, Mapping, Protocol

import jax

from lsync_jax.objectives.sections import with_defaults

Array = jax.Array


class Regularizer(Protocol):
    name: str
    # True when the term's statistics span the batch (not a mean of per-example terms): microbatches
    # (config.train.microbatches) cannot reproduce it, so the train step refuses the two together.
    spans_batch: ClassVar[bool]

    @property
    def features_needed(self) -> tuple[str, ...]: ...

    def __call__(self, features: Mapping[str, Array], batch: Mapping[str, Any]) -> tuple[Array, dict[str, Array]]: ...


Builder = Callable[..., Regularizer]
REGULARIZERS: dict[str, Builder] = {}
# Each regulariser's config section with its defaults: the one place they are defined. The
# shipped configs list these sections (lsync_jax/configs/base.py) and the registered builder completes a
# section given in part (the Python API) from them (`lsync_jax.objectives.sections.with_defaults`).
DEFAULTS: dict[str, dict[str, Any]] = {}


def register_regularizer(name: str, defaults: Mapping[str, Any]) -> Callable[[Builder], Builder]:
    """Decorator registering `builder(section, *, depth, prefix) -> Regularizer` under `name`, with
    the defaults of its config section: the decorated builder checks a section's keys and fills in
    the missing ones, so it always reads every key."""

    def wrap(builder: Builder) -> Builder:
        if name in REGULARIZERS:
            raise ValueError(f"regulariser {name!r} is registered twice")

        @functools.wraps(builder)
        def build(cfg: Mapping[str, Any], *, depth: int, prefix: str = f"objective.{name}") -> Regularizer:
            return builder(with_defaults(dict(cfg or {}), defaults, prefix), depth=depth, prefix=prefix)

        REGULARIZERS[name] = build
        DEFAULTS[name] = dict(defaults)
        return build

    return wrap
