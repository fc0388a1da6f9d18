"""The benchmark builds each variant's objective through the regulariser registry, as a run does."""

import pytest

from lsync_jax.objectives import REPA, Diversity, LayerSync, default_pair
from lsync_jax.tools.benchmark import VARIANTS, BenchConfig, bench_objective


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_is_the_registry_objective_with_the_papers_settings(variant):
    objective = bench_objective(BenchConfig(), variant, depth=12)
    expected = {"layersync": LayerSync((default_pair(12) + (0.2,),)), "repa": REPA(0.5),
                "diversity": Diversity(tuple(range(1, 13)))}
    assert objective.regularizers == tuple(expected[n] for n in ("layersync", "repa", "diversity") if n in variant)
    assert objective.transport_weight == 1.0 and not objective.clean_input


def test_given_pairs_reach_layersync_and_are_checked():
    objective = bench_objective(BenchConfig(layersync_pairs=((2, 4, 0.5),)), "layersync", depth=6)
    assert objective.regularizers == (LayerSync(((2, 4, 0.5),)),)
    with pytest.raises(ValueError, match="objective.layersync.pairs"):
        bench_objective(BenchConfig(layersync_pairs=((2, 9, 0.5),)), "layersync", depth=6)
