"""The training engine: train state, the sharded step, checkpoints, setup, hooks and the loop.

Multi-phase runs and the `train_and_evaluate` entry point are `lsync_jax.recipes`, on top of this.
"""

from lsync_jax.train.loop import train, train_loop
from lsync_jax.train.state import TrainState, abstract_state, create_train_state, make_optimizer, state_shardings
from lsync_jax.train.step import make_train_step, train_step

__all__ = [
    "TrainState", "abstract_state", "create_train_state", "make_optimizer", "state_shardings",
    "make_train_step", "train_step", "train", "train_loop",
]
