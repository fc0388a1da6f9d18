"""The protocol registry: every entry complete and valid, its training config built and consistent with it,
incomplete entries refused, overrides marked, the printed comparison right."""

import dataclasses

import pytest

from lsync_jax.builders import validate_config
from lsync_jax.configs import protocols
from lsync_jax.configs.protocols import PROTOCOLS, Protocol, check_protocol, config_differences, get_protocol
from lsync_jax.eval.reproduce import apply_overrides, compare, format_comparison
from lsync_jax.transport import SamplerConfig

NAMES = sorted(PROTOCOLS)


def test_the_registry_covers_the_sources():
    papers = {p.paper.split(" (")[0] for p in PROTOCOLS.values()}
    assert {"LayerSync", "SiT", "REPA", "ERW", "DDAE++"} <= papers
    layersync = [p for p in PROTOCOLS.values() if p.paper.startswith("LayerSync") and p.model == "SiT-XL/2"]
    assert {p.train_steps for p in layersync} >= {400_000, 4_000_000}
    # the two XL/2 400K figures are separate protocols with their own sources
    curve, heun = get_protocol("layersync-sit-xl2-400k-curve"), get_protocol("layersync-sit-xl2-400k-heun")
    assert (curve.value, curve.source, curve.approximate) == (10.5, "readme", True)
    assert (heun.value, heun.source, heun.sampler_config.method) == (11.24, "summary", "heun")
    assert {p.model for p in PROTOCOLS.values() if p.paper.startswith("LayerSync")} >= {"SiT-B/2", "SiT-L/2"}
    assert all(p.num_samples == 10_000 for p in PROTOCOLS.values() if p.name.startswith("ddaepp"))


@pytest.mark.parametrize("name", NAMES)
def test_every_entry_is_complete_and_its_config_is_valid(name):
    p = PROTOCOLS[name]
    check_protocol(p)
    SamplerConfig(**dict(p.sampler))
    config = protocols.protocol_config(name)
    validate_config(config)
    assert config.model.name == p.model and config.train.num_steps == p.train_steps
    assert config.sampler.method == p.sampler_config.method and config.sampler.cfg_scale == p.cfg_scale
    model = {"name": config.model.name, **{k: v for k, v in config.model.overrides.items() if v is not None}}
    regularizers = tuple(config.objective.regularizers)
    assert config_differences(p, model, p.train_steps, regularizers) == []  # by construction
    # a summary's value says so, and a sampler setting the source leaves open is listed with what we use
    if p.source == "summary":
        assert "summary" in p.where.lower() or "REFERENCE" in p.where
    assert all(note.strip() for note in p.unpublished.values())


def test_incomplete_or_invalid_entries_are_refused():
    good = PROTOCOLS["sit-xl2-7m-sde"]
    for changes, expected in ((dict(paper=""), "paper is empty"), (dict(source="blog"), "source='blog'"),
                              (dict(sampler={"method": "rk4"}), "sampler"), (dict(model="SiT-XXL/2"), "model"),
                              (dict(guidance_interval=(0.8, 0.2)), "guidance_interval"),
                              (dict(sampler={"method": "euler"}), "num_steps is not pinned"),
                              (dict(reference="VIRTUAL.npz"), "reference"), (dict(num_samples=0), "num_samples"),
                              (dict(unpublished={"vae": "x"}), "names no setting"),
                              (dict(unpublished={"sampler": " "}), "says nothing")):
        with pytest.raises(ValueError, match="sit-xl2-7m-sde") as info:
            check_protocol(dataclasses.replace(good, **changes))
        assert expected in str(info.value)
    with pytest.raises(ValueError, match="registered twice"):
        protocols.register(good)
    with pytest.raises(ValueError, match="did you mean sit-xl2-7m-sde"):
        get_protocol("sit-xl2-7m-sd")


def test_training_configs_are_named_after_the_protocols():
    from lsync_jax.configs import paper

    config = paper.get_config("layersync-sit-b2-400k-heun")
    assert config.model.name == "SiT-B/2" and config.objective.layersync.auto_weight == 0.3
    assert config.objective.layersync.pairs is None and "layersync" in config.objective.regularizers
    assert paper.get_config("sit-b2-400k-heun").objective.regularizers == ()
    assert paper.get_config("repa-sit-xl2-4m-cfg1.8").sampler.guidance_interval == (0.3, 1.0)
    with pytest.raises(ValueError, match="needs a protocol"):
        paper.get_config()


def test_a_run_that_differs_is_named():
    p = PROTOCOLS["layersync-sit-xl2-400k-heun"]
    found = config_differences(p, {"name": "SiT-L/2", "learn_sigma": False}, 200_000, ())
    assert any("model 'SiT-L/2'" in f for f in found) and any("learn_sigma=False" in f for f in found)
    assert any("step 200,000" in f for f in found) and any("method 'layersync' trains with" in f for f in found)
    repa = PROTOCOLS["repa-sit-xl2-4m-cfg1.8"]  # a baseline run is not REPA's, whatever its model and steps
    assert config_differences(repa, {"name": "SiT-XL/2", "learn_sigma": False}, 4_000_000, ()) != []
    assert config_differences(repa, {"name": "SiT-XL/2", "learn_sigma": False}, 4_000_000, ("repa",)) == []
    assert config_differences(p, {"name": "SiT-XL/2", "learn_sigma": True}, None) == []  # converted: no step


def test_overrides_mark_the_result_not_comparable():
    p = PROTOCOLS["sit-xl2-7m-sde"]
    same, reasons = apply_overrides(p, {"num_samples": "50000", "sampler.num_steps": "250"})
    assert reasons == [] and same == p
    changed, reasons = apply_overrides(p, {"num_samples": "10000", "sampler.method": "heun",
                                           "guidance_interval": "0.3,1.0"})
    assert changed.num_samples == 10_000 and changed.sampler_config.method == "heun"
    assert changed.guidance_interval == (0.3, 1.0) and len(reasons) == 3
    assert apply_overrides(p, {"sampler.last_step": "None"})[0].sampler_config.last_step is None
    assert apply_overrides(p, {"num_samples": "5e4"})[0].num_samples == 50_000  # a whole number, as an int
    for bad, match in (({"vae": "mse"}, "not a protocol setting"), ({"sampler.foo": "1"}, "unknown sampler setting"),
                       ({"sampler.method": "rk4"}, "sampler.method='rk4'"),
                       ({"class_balance": "bogus"}, "class_balance='bogus'"),
                       ({"guidance_interval": "0.9,0.1"}, "guidance_interval"),
                       ({"guidance_interval": "0.3"}, "two numbers LOW,HIGH"), ({"cfg_scale": "0.5"}, "cfg_scale"),
                       ({"seed": "1.5"}, "a whole number"), ({"sampler.num_steps": "ten"}, "a whole number")):
        with pytest.raises(ValueError, match=match):
            apply_overrides(p, bad)


def test_the_printed_comparison():
    p = PROTOCOLS["layersync-sit-xl2-400k-heun"]
    result = compare(p, 12.5, [])
    assert result["difference"] == pytest.approx(1.26) and result["relative"] == pytest.approx(1.26 / 11.24)
    lines = format_comparison(result)
    assert "FID: ours 12.50 | paper 11.24 (summary:" in lines[1] and "difference +1.26 (+11.2%)" in lines[1]
    assert lines[2].startswith("comparable") and "summary of the paper" in lines[3]
    result = compare(p, 9.0, ["num_samples=10000 instead of the protocol's 50000"])
    lines = format_comparison(result)
    assert "difference -2.24 (-19.9%)" in lines[1]
    assert lines[2] == "NOT COMPARABLE: num_samples=10000 instead of the protocol's 50000"
    assert result["comparable"] is False


def test_protocol_is_frozen_and_typed():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PROTOCOLS["sit-xl2-7m-sde"].value = 1.0  # type: ignore[misc]
    assert isinstance(PROTOCOLS["sit-xl2-7m-sde"], Protocol)


def test_the_docs_table_is_the_registry():
    import pathlib

    page = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "protocols.md").read_text()
    assert protocols.markdown_table() in page, "regenerate the table in docs/protocols.md: protocols.markdown_table()"


def test_a_protocol_config_changed_in_what_matters_warns(caplog):
    config = protocols.protocol_config("sit-b2-400k-sde")
    assert config.protocol == "sit-b2-400k-sde" and protocols.config_protocol_differences(config) == []
    config.train.num_steps = 100_000
    config.model.overrides.learn_sigma = False
    found = protocols.config_protocol_differences(config)
    assert len(found) == 2 and any("100,000" in f for f in found)
    config.protocol = "no-such-protocol"
    with pytest.raises(ValueError, match="unknown protocol"):
        protocols.config_protocol_differences(config)
    from lsync_jax.configs.tiny import get_config

    assert protocols.config_protocol_differences(get_config()) == []  # no protocol, nothing to compare
