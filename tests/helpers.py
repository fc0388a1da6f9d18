"""Helpers shared by the tests."""

import jax
import numpy as np


def perturbed(tree, seed: int, scale: float = 0.05):
    """Add host-RNG noise to every leaf (no compile), so that adaLN-Zero blocks are no longer
    identities and every parameter matters."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda l: np.asarray(l) + scale * rng.standard_normal(l.shape).astype(np.float32), tree)
