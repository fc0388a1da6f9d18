"""Fixtures of the evaluation tests."""

import os

import pytest

from tests import helpers
from tests.helpers import seed_inception_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory, inception_npz):
    """A module's own LSYNC_JAX_CACHE holding the converted default Inception weights (set, then restored)."""
    path = str(tmp_path_factory.mktemp("lsync_cache"))
    seed_inception_cache(path, inception_npz)  # converted once per test process
    old = os.environ.get("LSYNC_JAX_CACHE")
    os.environ["LSYNC_JAX_CACHE"] = path
    yield path
    if old is None:
        del os.environ["LSYNC_JAX_CACHE"]
    else:
        os.environ["LSYNC_JAX_CACHE"] = old


@pytest.fixture()
def alarm():
    """`with alarm(seconds):` fails a block that would hang (TimeoutError) instead of waiting for it."""
    return helpers.alarm
