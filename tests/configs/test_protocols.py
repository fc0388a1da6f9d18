"""The protocol registry: every entry complete and valid, its training config built and consistent with it,
incomplete entries refused, overrides marked, the printed comparison right."""

import dataclasses
import os
import pathlib

import pytest

from lsync_jax.builders import model_fields, validate_config
from lsync_jax.configs import protocols
from lsync_jax.configs.protocols import PROTOCOLS, Protocol, check_protocol, config_protocol_differences, get_protocol
from lsync_jax.eval import reproduce
from lsync_jax.eval.reproduce import apply_overrides, compare, config_records, format_comparison
from lsync_jax.transport import SamplerConfig
from lsync_jax.workdir import describe

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
    assert config_protocol_differences(config) == []  # by construction
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
    config = protocols.protocol_config("layersync-sit-xl2-400k-heun")
    config.model.name = "SiT-L/2"
    config.model.overrides.learn_sigma = False
    config.train.num_steps = 200_000
    config.objective.regularizers = ()
    found = config_protocol_differences(config)
    assert "model.name: run 'SiT-L/2', protocol 'SiT-XL/2'" in found
    assert "model.learn_sigma: run False, protocol True" in found
    assert "train.num_steps: run 200000, protocol 400000" in found
    assert "objective.regularizers: run [], protocol ['layersync']" in found
    repa = protocols.protocol_config("repa-sit-xl2-4m-cfg1.8")  # a baseline run is not REPA's
    repa.objective.regularizers = ()
    assert any(f.startswith("objective.regularizers:") for f in config_protocol_differences(repa))


def _changed(name):
    """Protocol `name`'s training config with a batch of 8, LayerSync pair 1 -> 2, another learning rate,
    EMA and transport, and a compute option (which moves nothing)."""
    config = protocols.protocol_config(name)
    config.data.batch_size = 8
    config.objective.layersync.pairs = ((1, 2, 0.2),)
    config.optimizer.lr = 2e-4
    config.train.ema_decay = 0.999
    config.transport.path_type = "gvp"
    config.model.overrides.attention_impl = "xla"
    return config


CHANGED = ["data.batch_size: run 8, protocol 256",
           "objective.layersync.pairs: run [[1, 2, 0.2]], protocol [[8, 16, 0.2]]",
           "optimizer.lr: run 0.0002, protocol 0.0001", "train.ema_decay: run 0.999, protocol 0.9999",
           "transport.path_type: run 'gvp', protocol 'linear'"]


def test_training_warns_about_every_setting_that_moves_the_number():
    assert sorted(config_protocol_differences(_changed("layersync-sit-xl2-400k-heun"))) == sorted(CHANGED)
    repa = protocols.protocol_config("repa-sit-xl2-4m-cfg1.8")
    repa.objective.repa.weight = 1.0
    repa.model.overrides.encoder_depth = 4
    assert config_protocol_differences(repa) == ["model.encoder_depth: run 4, protocol 8",
                                                 "objective.repa.weight: run 1.0, protocol 0.5"]


def _checkpoint(monkeypatch, config, **drop):
    """A workdir whose newest checkpoint (at the config's train.num_steps) records `config` as training writes it
    (`workdir.describe`), minus the sections in `drop`: injected where reproduce reads checkpoints."""
    records = config_records(config)
    meta = describe(model_fields(config), {}, objective=None, transport=records["transport"],
                    data=dict(records["data"], name="imagenet", seed=0), optimizer=records["optimizer"])
    meta["objective"] = records["objective"]
    for section in drop:
        meta.pop(section, None)
    monkeypatch.setattr(reproduce, "intact_steps", lambda *a, **k: [int(config.train.num_steps)])
    monkeypatch.setattr(reproduce, "read_meta", lambda directory, step: dict(meta))


def test_the_verdict_compares_every_recorded_setting_by_key(monkeypatch):
    name = "layersync-sit-xl2-400k-heun"
    p = PROTOCOLS[name]
    _checkpoint(monkeypatch, protocols.protocol_config(name))
    assert reproduce.run_differences(p, protocols.protocol_config(name), "/run")[0] == []
    # a run with batch 8 and pair 1 -> 2 (and more) is not comparable, each difference named by key
    _checkpoint(monkeypatch, _changed(name))
    differences, notes, step = reproduce.run_differences(p, protocols.protocol_config(name), "/run")
    assert step == 400_000 and any("EMA decay" in n for n in notes)
    assert "data.batch_size: run 8, protocol 256" in differences
    assert any(d.startswith("objective.regularizers.layersync.pairs: run [[1, 2, 0.2]]") for d in differences)
    assert "optimizer.lr: run 0.0002, protocol 0.0001" in differences
    assert "transport.path_type: run 'gvp', protocol 'linear'" in differences
    assert not any("attention_impl" in d for d in differences)  # how it computes moves nothing
    lines = format_comparison(compare(p, 12.0, differences))
    assert lines[2].startswith("NOT COMPARABLE: ") and "data.batch_size" in lines[2]
    # the EMA decay is no checkpoint's: the config passed is compared, by the rules training warns with
    _checkpoint(monkeypatch, protocols.protocol_config(name))
    found = reproduce.run_differences(p, _changed(name), "/run")[0]
    assert sorted(found) == sorted(f"the config's {c}" for c in CHANGED)
    # a checkpoint step that is not the protocol's
    monkeypatch.setattr(reproduce, "intact_steps", lambda *a, **k: [100])
    assert "train.num_steps: run 100, protocol 400000" in reproduce.run_differences(
        p, protocols.protocol_config(name), "/run")[0]


def test_what_a_checkpoint_does_not_record_is_noted(monkeypatch):
    name = "sit-xl2-7m-sde"
    p = PROTOCOLS[name]
    _checkpoint(monkeypatch, protocols.protocol_config(name), optimizer=True)  # written before it was recorded
    differences, notes, _ = reproduce.run_differences(p, protocols.protocol_config(name), "/run")
    assert differences == [] and any("records no optimizer" in n for n in notes)
    # converted: the model and transport only; the objective, optimizer, batch and steps are not checked
    _checkpoint(monkeypatch, protocols.protocol_config(name), objective=True, optimizer=True, data=True)
    meta = reproduce.read_meta("", 0)
    meta["transport"] = {"path_type": "linear", "prediction": "velocity", "time": meta["transport"]["time"]}
    monkeypatch.setattr(reproduce, "read_meta", lambda directory, step: meta)  # as tools/convert.py records it
    differences, notes, _ = reproduce.run_differences(p, protocols.protocol_config(name), "/run")
    assert differences == [] and any("converted checkpoint" in n and "objective" in n for n in notes)
    meta["model"]["learn_sigma"] = False  # what it records is still compared
    assert reproduce.run_differences(p, protocols.protocol_config(name), "/run")[0] == [
        "model.learn_sigma: run False, protocol True"]
    # a record older than a field (ADDED_FIELDS: optimizer.mu_dtype) reads as the value that applied then
    config = protocols.protocol_config(name)
    _checkpoint(monkeypatch, config)
    meta = reproduce.read_meta("", 0)
    del meta["optimizer"]["mu_dtype"]
    monkeypatch.setattr(reproduce, "read_meta", lambda directory, step: meta)
    assert reproduce.run_differences(p, config, "/run")[0] == []


def test_overrides_mark_the_result_not_comparable():
    """Overrides as `--set.KEY=VALUE` gives them (typed by ml_collections: `get_override_values`)."""
    p = PROTOCOLS["sit-xl2-7m-sde"]
    same, reasons = apply_overrides(p, {"num_samples": 50000, "sampler.num_steps": 250})
    assert reasons == [] and same == p
    changed, reasons = apply_overrides(p, {"num_samples": 10000, "sampler.method": "heun",
                                           "guidance_interval": (0.3, 1)})
    assert changed.num_samples == 10_000 and changed.sampler_config.method == "heun"
    assert changed.guidance_interval == (0.3, 1.0) and len(reasons) == 3
    assert apply_overrides(p, {"sampler.last_step": "None"})[0].sampler_config.last_step is None
    assert apply_overrides(p, {"num_samples": 5e4})[0].num_samples == 50_000  # a whole number, as an int
    for bad, match in (({"vae": "mse"}, "--set.vae: not a protocol setting"),
                       ({"sampler.foo": 1}, "--set.sampler.foo: not a protocol setting"),
                       ({"sampler.method": "rk4"}, "sampler.method='rk4'"),
                       ({"class_balance": "bogus"}, "class_balance='bogus'"),
                       ({"guidance_interval": (0.9, 0.1)}, "guidance_interval"),
                       ({"guidance_interval": (0.3,)}, "two numbers LOW,HIGH"), ({"cfg_scale": 0.5}, "cfg_scale"),
                       ({"seed": 1.5}, "a whole number"), ({"sampler.num_steps": "ten"}, "a whole number")):
        with pytest.raises(ValueError, match=match):
            apply_overrides(p, bad)


def test_set_is_a_config_flag_of_the_protocol_settings():
    """reproduce's --set takes overrides as every launch script's --config does, and the older
    --set=KEY=VALUE form; every setting is a typed placeholder, None meaning the protocol's value."""
    from lsync_jax.configs.cli import expand_inline_overrides
    from lsync_jax.configs.protocols import SETTING_TYPES, settings_template

    template = settings_template()
    assert template.num_samples is None and template.sampler.method is None
    assert set(SETTING_TYPES) == {*(k for k in template if k != "sampler"), *(f"sampler.{k}" for k in template.sampler)}
    argv = ["prog", "--set=num_samples=5", "--set", "sampler.method=heun", "--set.seed=1", "--protocol=x"]
    assert expand_inline_overrides(argv, names=("set",)) == [
        "prog", "--set.num_samples=5", "--set.sampler.method=heun", "--set.seed=1", "--protocol=x"]


def test_reproduce_names_an_unknown_setting(tmp_path):
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parents[2] / "launch" / "reproduce.py"
    out = subprocess.run([sys.executable, str(script), "--list", "--set=sampler.metod=heun"], capture_output=True,
                         text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert out.returncode == 1 and "unknown key set.sampler.metod: set.sampler has no key 'metod' (did you mean " \
        "set.sampler.method?)" in out.stderr


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
    assert len(found) == 2 and any("100000" in f for f in found)
    config.protocol = "no-such-protocol"
    with pytest.raises(ValueError, match="unknown protocol"):
        protocols.config_protocol_differences(config)
    from lsync_jax.configs.tiny import get_config

    assert protocols.config_protocol_differences(get_config()) == []  # no protocol, nothing to compare
