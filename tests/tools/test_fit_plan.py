"""The fit planner: the candidates, the analytic model that prunes them, and (tier `tpu_compile`) a
search that compiles, caches each cell and resumes from the cache without compiling again."""

import os

import pytest

from lsync_jax.configs import tiny
from lsync_jax.models import get_model
from lsync_jax.tools.fit_plan import Levers, activation_bytes_per_example, candidates, markdown_table
from tests.tools.test_fit import needs_libtpu


def test_candidates_are_every_lever_that_divides_the_batch_and_the_chips():
    levers = candidates(devices=4, batch=64, objective_spans_batch=False)
    assert len(levers) == 3 * 3 * 5 * 2  # fsdp 1/2/4, three remat policies, 1..16 microbatches, two mu dtypes
    assert {lv.fsdp for lv in levers} == {1, 2, 4} and {lv.microbatches for lv in levers} == {1, 2, 4, 8, 16}
    assert {lv.microbatches for lv in candidates(4, 64, objective_spans_batch=True)} == {1}  # DiverseDiT
    assert Levers(2, "dots", 4, None).changes(8) == {"mesh.data": 4, "mesh.fsdp": 2, "model.overrides.remat": "dots",
                                                     "train.microbatches": 4, "optimizer.mu_dtype": None}


def test_the_activation_model_orders_the_remat_policies():
    model = get_model("SiT-XL/2", dtype="bfloat16")
    none, dots, blocks = (activation_bytes_per_example(model, r) for r in ("none", "dots", "blocks"))
    assert none > dots > blocks > 0
    # SiT-XL/2 at 256 tokens: a few hundred MB per example without remat (bf16 activations)
    assert 100e6 < none < 1e9


def _config():
    config = tiny.get_config()
    config.data.batch_size = 16
    config.train.num_grid_samples = 0
    return config


@pytest.mark.tpu_compile
@needs_libtpu
def test_a_search_compiles_caches_and_resumes(tmp_path):
    from lsync_jax.tools.fit_plan import plan, plan_lines

    logged = []
    first = plan(_config(), "v5e-4", str(tmp_path), max_compiles=2, want=1, log=logged.append)
    assert first["best"] is not None and first["best"]["fits"]
    compiled = [line for line in logged if "compiled" in line]
    assert len(compiled) == 1 and len(os.listdir(tmp_path)) == 1  # one cell, cached
    assert first["best"]["levers"] == {"fsdp": 1, "remat": "none", "microbatches": 1, "mu_dtype": None}
    logged.clear()
    again = plan(_config(), "v5e-4", str(tmp_path), max_compiles=2, want=1, log=logged.append)
    assert not [line for line in logged if "compiled" in line]  # read back, nothing compiled
    assert again["best"] == first["best"]
    lines = plan_lines(again)
    assert lines[1].startswith("| fits | mesh") and "| yes | data 4 x fsdp 1 | none | 1 | float32 |" in lines[3]
    table = markdown_table({("tiny", "v5e-4"): again}, ["v5e-4"], 400_000)
    assert table[0] == "| config (global batch) | v5e-4 |" and table[2].startswith("| `tiny` (16) | fits: data 4")
