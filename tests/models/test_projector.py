"""REPA's model switch (lsync_jax.models.projector): the projectors' parameter paths and sown names that
checkpoints, the official converter and ERW's carry rely on, the switch's fields, and their checks."""

import dataclasses
import re

import jax
import numpy as np
import pytest

from lsync_jax.configs.base import ERW_CARRY
from lsync_jax.models import OFFICIAL_OVERRIDES, SiT, get_model
from lsync_jax.models.projector import PROJECTOR_FIELDS, projection_name, projector_param_name
from lsync_jax.workdir import V1_MODEL_DEFAULTS, model_record


def tiny(**overrides):
    fields = dict(depth=3, hidden_size=32, num_heads=2, input_size=8, in_channels=3, num_classes=4, learn_sigma=False,
                  z_dims=(16, 8), encoder_depth=2, projector_dim=24)
    return get_model("SiT-S/2", **dict(fields, **overrides))


def test_projector_parameters_keep_their_paths_and_shapes():
    model = tiny()
    params = model.init(jax.random.key(0), *model.init_inputs(1))["params"]
    for k, z_dim in enumerate((16, 8)):
        tree = params[projector_param_name(k)]
        assert projector_param_name(k) == f"projectors_{k}"
        assert {name: tree[name]["kernel"].shape for name in tree} == {
            "fc_0": (32, 24), "fc_1": (24, 24), "fc_2": (24, z_dim)}
        assert all(not np.any(tree[name]["bias"]) for name in tree)  # zero biases, as REPA initialises
    assert not any(k.startswith("projectors") for k in tiny(z_dims=()).init(
        jax.random.key(0), *model.init_inputs(1))["params"])


def test_projections_are_sown_from_the_switched_block():
    model = tiny()
    variables = model.init(jax.random.key(0), *model.init_inputs(2))
    _, state = model.apply(variables, *model.init_inputs(2), mutable=["intermediates"])
    sown = state["intermediates"]
    assert sown[projection_name(0)][0].shape == (2, 16, 16) and sown[projection_name(1)][0].shape == (2, 16, 8)
    # the projector reads block encoder_depth's output: recompute it from the sown block
    p = variables["params"]["projectors_1"]
    h = sown["block_2"][0]
    for name in ("fc_0", "fc_1"):
        h = jax.nn.silu(h @ p[name]["kernel"] + p[name]["bias"])
    np.testing.assert_allclose(h @ p["fc_2"]["kernel"] + p["fc_2"]["bias"], sown[projection_name(1)][0], atol=1e-5)


def test_the_switch_is_three_recorded_sit_fields():
    names = {f.name for f in dataclasses.fields(SiT)}
    assert set(PROJECTOR_FIELDS) <= names and set(PROJECTOR_FIELDS) <= set(OFFICIAL_OVERRIDES)
    record = model_record({"name": "SiT-S/2", "z_dims": (16,), "encoder_depth": 2})
    assert {k: record[k] for k in PROJECTOR_FIELDS} == {"z_dims": [16], "encoder_depth": 2, "projector_dim": 2048}
    assert set(PROJECTOR_FIELDS) <= set(V1_MODEL_DEFAULTS["SiT"])  # old records complete the same names


def test_erw_carries_the_projectors():
    assert all(re.search(ERW_CARRY, f"{projector_param_name(k)}/fc_{i}/kernel") for k in range(3) for i in range(3))


@pytest.mark.parametrize("change, match", [
    (dict(z_dims=768), "z_dims must be a tuple of positive ints"),
    (dict(z_dims=(0,)), "z_dims must be a tuple of positive ints"),
    (dict(encoder_depth=4), r"encoder_depth=4 .* must be in \[1, depth=3\]"),
    (dict(projector_dim=0), "projector_dim must be positive"),
])
def test_bad_switch_values_name_the_key(change, match):
    with pytest.raises(ValueError, match=match):
        tiny(**change)
    if "z_dims" not in change:  # with the switch off, encoder_depth and projector_dim are not read
        tiny(**dict(change, z_dims=()))
