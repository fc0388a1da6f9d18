"""Time conventions, and conversion from the one lsync-jax does not use.

lsync-jax follows SiT and LayerSync: **t = 0 is noise, t = 1 is data**,
x_t = t * x + (1 - t) * eps and the velocity target is x - eps (linear path).

REPA and ERW use the reverse: t = 0 is data, x_t = (1 - t) * x + t * eps, target eps - x.
The two are related by t' = 1 - t and v' = -v. Convert at the boundary (loading a REPA/ERW
checkpoint, reading their guidance interval) and nowhere else.
"""

from __future__ import annotations

from typing import Callable

import jax

DATA_AT_ONE = "data_at_one"  # lsync-jax, SiT, LayerSync
DATA_AT_ZERO = "data_at_zero"  # REPA, ERW
CONVENTIONS = (DATA_AT_ONE, DATA_AT_ZERO)


def _check(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown time convention {convention!r}; expected one of {CONVENTIONS}")


def to_lsync_time(t, convention: str):
    """A time in `convention` -> the same noise level in lsync-jax time (t = 1 is data)."""
    _check(convention)
    return t if convention == DATA_AT_ONE else 1 - t


# t -> 1 - t is its own inverse, so converting back is the same map.
from_lsync_time = to_lsync_time


def to_lsync_velocity(v, convention: str):
    """A velocity d x_t / dt in `convention` -> in lsync-jax time (reversing time negates it)."""
    _check(convention)
    return v if convention == DATA_AT_ONE else -v


def to_lsync_interval(interval: tuple[float, float], convention: str) -> tuple[float, float]:
    """A (low, high) time interval in `convention` -> lsync-jax time.

    REPA's guidance interval (0, 0.7) (guidance off for t > 0.7, the noisiest steps) becomes
    (0.3, 1.0) here.
    """
    low, high = interval
    a, b = to_lsync_time(low, convention), to_lsync_time(high, convention)
    return (min(a, b), max(a, b))


def velocity_model_to_lsync(
    model_fn: Callable[..., jax.Array], convention: str
) -> Callable[..., jax.Array]:
    """Wrap a velocity model `fn(x, t, *args)` trained in `convention` to take and return lsync-jax time.

    For a REPA/ERW model: fn'(x, t, y) = -fn(x, 1 - t, y).
    """
    _check(convention)
    if convention == DATA_AT_ONE:
        return model_fn

    def wrapped(x, t, *args, **kwargs):
        return to_lsync_velocity(model_fn(x, from_lsync_time(t, convention), *args, **kwargs), convention)

    return wrapped
