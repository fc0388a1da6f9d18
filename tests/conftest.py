"""Shared test settings: tests run on whatever JAX backend is present (CPU in CI)."""

import os
import sys

# `configs/` is a directory of get_config() files, imported as a package from the repo root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

# Threefry inlines a large graph per random call, and CPU compiles of model inits dominate the
# suite's time; the 'rbg' generator compiles about twice as fast. Tests assert no random stream.
jax.config.update("jax_default_prng_impl", "rbg")
