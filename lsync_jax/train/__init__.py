"""Training system: mesh and sharding, train state, the sharded train step."""

from lsync_jax.train.sharding import batch_sharding, make_mesh, partition_spec, tree_shardings
from lsync_jax.train.state import TrainState, create_train_state, make_optimizer, state_shardings
from lsync_jax.train.step import make_train_step, train_step
from lsync_jax.train.loop import train_and_evaluate  # noqa: I001  (loop builds on the modules above)

__all__ = [
    "make_mesh", "partition_spec", "tree_shardings", "batch_sharding",
    "TrainState", "create_train_state", "make_optimizer", "state_shardings",
    "make_train_step", "train_step", "train_and_evaluate",
]
