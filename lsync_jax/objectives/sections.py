"""Config sections given in part: checked against their declared defaults and completed from them.

Every default is declared once, by what reads it: the objective's own keys (`OBJECTIVE_DEFAULTS`),
each regulariser's section (`register_regularizer(name, defaults)`), the automatic pairs' selection
(`objectives.layersync.SELECTION_DEFAULTS`), the optimizer (`configs.base.OPTIMIZER_DEFAULTS`), the
transport and the sampler (their signatures). `lsync_jax.configs.base.base_config()` lists those
declarations as every run's config; `with_defaults` is the one way a section given in part (the Python
API: `build_objective({'regularizers': ('layersync',)}, ...)`, `make_optimizer({'lr': 3e-4})`) is
completed from them. It lives here, at the lowest layer that completes a section (the objectives),
so that configs, train and recipes, above it, use the same function.
"""

from __future__ import annotations

from typing import Any, Mapping


def with_defaults(cfg: Mapping[str, Any], defaults: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """`cfg` checked against the keys of `defaults` (unknown keys name the key) and completed from them."""
    check_keys(cfg, tuple(defaults), prefix)
    return {**defaults, **cfg}


def check_keys(cfg: Mapping[str, Any], allowed: tuple[str, ...], prefix: str) -> None:
    """Raise a ValueError naming any config key under `prefix` that is not in `allowed`."""
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        names = ", ".join(f"{prefix}.{k}" for k in unknown)
        raise ValueError(f"unknown config key(s) {names}; allowed under {prefix}: {', '.join(allowed)}")
