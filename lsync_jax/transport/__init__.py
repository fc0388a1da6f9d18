"""Flow-matching transport in lsync-jax time (t = 0 noise, t = 1 data): paths, targets, samplers."""

from lsync_jax.transport.paths import GVPPath, LinearPath, Path, VPPath, get_path
from lsync_jax.transport.samplers import (
    SamplerConfig,
    adaptive_ode_sample,
    cfg_combine,
    euler_maruyama_sample,
    guided_field,
    make_sample_fn,
    ode_sample,
    sample,
)
from lsync_jax.transport.time import (
    DATA_AT_ONE,
    DATA_AT_ZERO,
    from_lsync_time,
    to_lsync_interval,
    to_lsync_time,
    to_lsync_velocity,
    velocity_model_to_lsync,
)
from lsync_jax.transport.transport import Transport, create_transport

__all__ = [
    "Path", "LinearPath", "GVPPath", "VPPath", "get_path",
    "Transport", "create_transport",
    "SamplerConfig", "sample", "make_sample_fn", "guided_field", "cfg_combine",
    "ode_sample", "adaptive_ode_sample", "euler_maruyama_sample",
    "DATA_AT_ONE", "DATA_AT_ZERO", "to_lsync_time", "from_lsync_time", "to_lsync_velocity",
    "to_lsync_interval", "velocity_model_to_lsync",
]
