"""One home per default: the schema in lsync_jax/configs/base.py and the shipped configs."""

import dataclasses
import importlib
import inspect
import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from lsync_jax.builders import build_model, model_fields
from lsync_jax.configs.base import base_config, check_config
from lsync_jax.models import override_types
from lsync_jax.objectives import REGULARIZER_DEFAULTS
from lsync_jax.transport import SamplerConfig, create_transport

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "lsync_jax" / "configs"
# cli: flag parsing; protocols: the paper protocol registry (configs/paper.py:NAME gives its configs)
SHIPPED = sorted(p.stem for p in CONFIGS.glob("*.py") if p.stem not in ("__init__", "base", "cli", "protocols"))
VARIANTS = {"paper": ("layersync-sit-xl2-400k-heun",)}  # configs that need a variant


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_passes_the_schema_and_lists_every_model_field(name):
    config = importlib.import_module(f"lsync_jax.configs.{name}").get_config(*VARIANTS.get(name, ()))
    check_config(config)
    assert set(config.model.overrides) == set(override_types(config.model.name))


def test_the_defaults_users_got_win():
    config = base_config()
    assert (config.train.log_every, config.train.checkpoint_every, config.train.sample_every) == (100, 10_000, 10_000)
    assert config.data.flip is True


def test_derived_sections_equal_the_library_defaults():
    config = base_config()
    sampler = dict(config.sampler)
    assert (sampler.pop("cfg_scale"), sampler.pop("guidance_interval")) == (1.0, (0.0, 1.0))
    assert sampler == {f.name: f.default for f in dataclasses.fields(SamplerConfig)}
    assert dict(config.transport) == {k: p.default for k, p in inspect.signature(create_transport).parameters.items()}
    for name, defaults in REGULARIZER_DEFAULTS.items():
        assert config.objective[name].to_dict() == defaults
    # None in model.overrides is the model's own value: nothing is passed for it
    assert model_fields(config) == {"name": "SiT-XL/2"}


def test_unknown_and_missing_keys_are_named():
    config = base_config()
    with config.unlocked():
        config.train.num_stepz = 5
    with pytest.raises(ValueError, match=r"unknown key config\.train\.num_stepz \(did you mean 'num_steps'\?\)"):
        check_config(config)
    config = base_config()
    with config.unlocked():
        del config.eval["every"]
    with pytest.raises(ValueError, match=r"config\.eval\.every is missing.*base_config"):
        check_config(config)
    config = base_config()
    config.model.name = "SiT-Q/2"
    with pytest.raises(ValueError, match="config.model.name: unknown model name 'SiT-Q/2'"):
        check_config(config)


def test_any_model_field_is_overridable_on_a_shipped_config_from_the_command_line():
    """--config=configs/imagenet256.py --config.model.overrides.depth=4 failed before with AttributeError."""
    argv = ["prog", f"--config={CONFIGS / 'imagenet256.py'}", "--config.model.overrides.depth=4",
            "--config.model.overrides.hidden_size=64", "--config.model.overrides.num_heads=4",
            "--config.model.overrides.mlp_ratio=2.0", "--config.model.overrides.long_skips=True"]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
    values(argv)
    model = build_model(values.config)
    assert (model.depth, model.hidden_size, model.num_heads, model.mlp_ratio, model.long_skips) == (4, 64, 4, 2.0, True)
    assert model.learn_sigma and model.in_channels == 4  # what the config sets is kept
