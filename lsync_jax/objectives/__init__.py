"""Pure losses: the transport loss plus registered regularisers (one module per method)."""

# Importing a regulariser's module registers it.
from lsync_jax.objectives.batch import Batch, make_batch
from lsync_jax.objectives.diversity import Diversity
from lsync_jax.objectives.layersync import LayerSync, default_pair, layersync_loss, validate_pairs
from lsync_jax.objectives.objective import OBJECTIVE_DEFAULTS, Objective, build_objective, objective_loss
from lsync_jax.objectives.registry import (
    DEFAULTS as REGULARIZER_DEFAULTS,
    REGULARIZERS,
    Regularizer,
    register_regularizer,
)
from lsync_jax.objectives.repa import REPA, repa_coefficient, repa_loss

__all__ = [
    "OBJECTIVE_DEFAULTS", "REGULARIZER_DEFAULTS", "Batch", "make_batch",
    "Objective", "build_objective", "objective_loss",
    "LayerSync", "layersync_loss", "default_pair", "validate_pairs",
    "REPA", "repa_loss", "repa_coefficient",
    "Diversity",
    "REGULARIZERS", "Regularizer", "register_regularizer",
]
