"""LayerSync: value, gradient flow (stop-gradient), every pair counted, bad pairs rejected."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsync_jax.models import get_model
from lsync_jax.objectives import LayerSync, build_objective, default_pair, layersync_loss, validate_pairs
from lsync_jax.transport import create_transport
from tests.helpers import perturbed


def test_value_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    weak, strong = rng.standard_normal((2, 3, 5, 16)).astype(np.float32)
    cos = np.sum(weak * strong, -1) / (np.linalg.norm(weak, axis=-1) * np.linalg.norm(strong, axis=-1))
    np.testing.assert_allclose(layersync_loss(weak, strong), -cos.mean(), rtol=1e-5)
    np.testing.assert_allclose(layersync_loss(weak, weak), -1.0, rtol=1e-6)
    np.testing.assert_allclose(layersync_loss(weak, -weak), 1.0, rtol=1e-6)
    # bfloat16 features are compared in float32
    assert layersync_loss(weak.astype(jnp.bfloat16), strong.astype(jnp.bfloat16)).dtype == jnp.float32


DEPTH = 4


@pytest.fixture(scope="module")
def net():
    model = get_model("SiT-S/4", depth=DEPTH, hidden_size=32, num_heads=2, input_size=8, in_channels=1,
                      num_classes=3, learn_sigma=False)
    params = jax.jit(model.init)(jax.random.key(0), *model.init_inputs(1))["params"]
    params = perturbed(params, 1, 0.1)
    x = jax.random.normal(jax.random.key(2), (4, 8, 8, 1))
    t, y = jnp.linspace(0.1, 0.9, 4), jnp.array([0, 1, 2, 0])
    return model, params, (x, t, y)


def regulariser_grads(net, reg):
    model, params, (x, t, y) = net

    def term(p):
        _, state = model.apply({"params": p}, x, t, y, mutable=["intermediates"])
        features = {k: v[0] for k, v in state["intermediates"].items()}
        return reg(features, {})[0]

    return jax.jit(jax.grad(term))(params)


def grad_norm(tree):
    return float(sum(jnp.sum(jnp.abs(l)) for l in jax.tree.leaves(tree)))


@pytest.mark.slow
def test_gradient_reaches_the_weak_side_and_stops_at_the_strong_side(net):
    grads = regulariser_grads(net, LayerSync(((2, 4, 1.0),), stop_gradient=True))
    assert grad_norm(grads["blocks_0"]) > 0 and grad_norm(grads["blocks_1"]) > 0  # blocks 1, 2 feed h_2
    assert grad_norm(grads["blocks_2"]) == 0 and grad_norm(grads["blocks_3"]) == 0  # blocks 3, 4 feed only h_4
    assert grad_norm(grads["final_layer"]) == 0


def test_without_stop_gradient_the_strong_side_is_pulled_too(net):
    grads = regulariser_grads(net, LayerSync(((2, 4, 1.0),), stop_gradient=False))
    assert grad_norm(grads["blocks_2"]) > 0 and grad_norm(grads["blocks_3"]) > 0


@pytest.mark.slow
def test_every_pair_contributes_with_its_weight(net):
    model, params, (x, t, y) = net
    _, state = jax.jit(lambda p: model.apply({"params": p}, x, t, y, mutable=["intermediates"]))(params)
    f = {k: v[0] for k, v in state["intermediates"].items()}
    reg = LayerSync(((1, 3, 0.5), (2, 4, 0.25)))
    total, metrics = reg(f, {})
    r13, r24 = layersync_loss(f["block_1"], f["block_3"]), layersync_loss(f["block_2"], f["block_4"])
    np.testing.assert_allclose(total, 0.5 * r13 + 0.25 * r24, rtol=1e-6)
    np.testing.assert_allclose(metrics["layersync/block1_block3"], r13)
    np.testing.assert_allclose(metrics["layersync/block2_block4"], r24)
    assert reg.features_needed == ("block_1", "block_2", "block_3", "block_4")
    # the first pair is not dropped (the official multi-pair mode keeps only the last one)
    grads = regulariser_grads(net, reg)
    only_last = regulariser_grads(net, LayerSync(((2, 4, 0.25),)))
    assert grad_norm(jax.tree.map(jnp.subtract, grads["blocks_0"], only_last["blocks_0"])) > 0


@pytest.mark.parametrize(
    "pairs,match",
    [
        (((0, 2, 0.2),), r"pairs\[0\]: weak block 0 is outside 1..4"),
        (((1, 5, 0.2),), r"pairs\[0\]: strong block 5 is outside 1..4"),
        (((2, 2, 0.2),), r"pairs\[0\]: weak block 2 must come before strong block 2"),
        (((1, 2, 0.2), (3, 1, 0.2)), r"pairs\[1\]: weak block 3 must come before strong block 1"),
        (((1, 2.5, 0.2),), r"pairs\[0\]: strong block 2.5 is not an integer"),
        (((1, 2, -0.1),), r"pairs\[0\]: weight must be a positive number"),
        (((1, 2, None),), r"pairs\[0\]: weight must be a positive number, got None"),
        ((("a", 2, 0.2),), r"pairs\[0\]: weak block 'a' is not an integer"),
        (((1, 2),), r"pairs\[0\] must be \(weak_block, strong_block, weight\)"),
        ((), r"must be a non-empty list"),
        (((1, 2, 0.1), (1, 2, 0.3)), "same \\(weak, strong\\) pair twice"),
    ],
)
def test_bad_pairs_raise_naming_the_config_key(pairs, match):
    with pytest.raises(ValueError, match="objective.layersync.pairs"):
        validate_pairs(pairs, DEPTH, "objective.layersync.pairs")
    with pytest.raises(ValueError, match=match):
        build_objective({"regularizers": ("layersync",), "layersync": {"pairs": pairs}},
                        create_transport(), depth=DEPTH)


def test_default_pair_scales_the_papers_choice():
    assert default_pair(28) == (8, 16)  # SiT-XL/2, the paper
    assert default_pair(24) == (7, 14)
    assert default_pair(12) == (3, 7)
    assert default_pair(4) == (1, 2)
    assert default_pair(2) == (1, 2)
    for depth in range(2, 40):
        weak, strong = default_pair(depth)
        assert 1 <= weak < strong <= depth
    with pytest.raises(ValueError, match="at least 2 blocks"):
        default_pair(1)


# --- automatic pairs: the selection rule on synthetic per-block measurements -------------------

from lsync_jax.objectives.layersync import is_auto, middle_band, select_pairs  # noqa: E402


def test_an_even_climb_to_block_16_of_28_gives_the_papers_pair():
    acc = list(np.linspace(0.2, 0.8, 16)) + list(np.linspace(0.78, 0.5, 12))  # peak at 16, falling after it
    pairs, why = select_pairs(acc)
    assert pairs == ((8, 16, 0.2),) and why["strong"] == 16 and why["weak"] == [8] and not why["fallback"]
    assert why["band"] == [7, 21]


def test_the_strong_block_is_the_best_in_the_middle_band_not_the_last_block():
    # the last block scores highest but lies outside the band (blocks 3..9 of 12): block 6 is chosen
    acc = [0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.65, 0.6, 0.55, 0.6, 0.8, 0.9]
    pairs, why = select_pairs(acc)
    assert middle_band(12) == (3, 9) and why["strong"] == 6
    # threshold 0.7 - 0.5 (0.7 - 0.1) = 0.4: blocks 1..3 qualify, the deepest is 3
    assert pairs == ((3, 6, 0.2),) and why["threshold"] == pytest.approx(0.4)
    # a steeper early rise moves the weak block: blocks 1, 2 qualify at rise 0.8 (threshold 0.22)
    assert select_pairs(acc, rise=0.8)[0] == ((2, 6, 0.2),)
    # ties go to the shallower block; a wider band reaches the last block
    assert select_pairs([0.1, 0.5, 0.5, 0.2])[1]["strong"] == 2
    assert select_pairs(acc, middle=(0.0, 1.0))[1]["strong"] == 12


def test_several_weak_blocks_and_the_weight():
    acc = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    pairs, why = select_pairs(acc, num_weak=2, weight=0.5)
    # band 2..6, strong 6 (0.6); threshold 0.6 - 0.5 * 0.5 = 0.35: blocks 1..3 qualify, the 2 deepest are 2 and 3
    assert pairs == ((2, 6, 0.5), (3, 6, 0.5))
    assert select_pairs(acc, num_weak=10)[0] == ((1, 6, 0.2), (2, 6, 0.2), (3, 6, 0.2))


def test_without_a_weaker_earlier_block_the_rule_falls_back_to_the_papers_pair():
    pairs, why = select_pairs([0.9, 0.6, 0.5, 0.4, 0.3, 0.2])  # block 1 is best: the premise does not hold
    assert why["fallback"] and pairs == ((2, 3, 0.2),) == ((*default_pair(6), 0.2),)
    pairs, why = select_pairs([0.5] * 28)  # flat: the paper's 8 -> 16
    assert why["fallback"] and pairs == ((8, 16, 0.2),) and why["strong"] == 16


def test_random_measurements_never_give_weak_at_or_after_strong():
    rng = np.random.default_rng(0)
    for trial in range(300):
        depth = int(rng.integers(2, 40))
        acc = rng.random(depth)
        middle = tuple(sorted(rng.random(2)))
        pairs, why = select_pairs(acc, middle=middle, rise=float(rng.uniform(0.05, 1.0)),
                                  num_weak=int(rng.integers(1, 4)))
        lo, hi = middle_band(depth, middle)
        for weak, strong, _ in pairs:
            assert 1 <= weak < strong <= depth
            if not why["fallback"]:
                assert lo <= strong <= hi and acc[strong - 1] == max(acc[lo - 1:hi])
                assert acc[weak - 1] <= why["threshold"] + 1e-12


@pytest.mark.parametrize("acc, kwargs, match", [([0.5], {}, "at least 2 blocks"),
                                                ([0.5, float("nan")], {}, "finite"),
                                                ([0.1, 0.2], dict(rise=0.0), "rise"),
                                                ([0.1, 0.2], dict(num_weak=0), "num_weak"),
                                                ([0.1, 0.2], dict(middle=(0.8, 0.2)), "middle band")])
def test_bad_selection_inputs_are_named(acc, kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_pairs(acc, **kwargs)


def test_auto_is_recognised_and_not_built_as_pairs():
    assert is_auto("auto") and is_auto(("auto",)) and not is_auto(((1, 2, 0.2),)) and not is_auto(None)
    with pytest.raises(ValueError, match="chosen from measurements by the training loop"):
        build_objective({"regularizers": ("layersync",), "layersync": {"pairs": ("auto",)}}, create_transport(),
                        depth=4)
