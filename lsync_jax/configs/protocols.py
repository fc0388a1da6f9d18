"""Paper protocols: each entry is one number a paper (or its README) reports, with everything that fixes
it: the model and its training, the sampler, guidance, the samples and the reference.

Why: most "my FID does not match the paper" reports come from a protocol detail (an ODE number compared
with an SDE one, another step count or guidance interval, guidance on 3 channels or on 4, another
reference batch, 50 samples per class or uniform labels). `launch/reproduce.py --protocol=NAME` samples
and evaluates exactly as an entry says and prints ours beside the paper's value; `configs/paper.py:NAME`
trains the run an entry describes. The entries' sources are marked: 'paper' (the paper; for us, its
abstract), 'readme' (the official repository's README, its text or its figures), 'issue' (a maintainer's
or user's statement on the official issue tracker), 'summary' (a secondary summary of the paper,
unverified), 'notes' (our gathered notes, not located in a primary source when checked) or 'measured'
(our own demo). `approximate` marks a value read off a figure.
Settings a source does not publish are listed in `unpublished` with the value we use and why: never
guessed silently.

Times are lsync-jax's (t = 1 is data): REPA's guidance for t_REPA in [0, 0.7] is (0.3, 1.0) here.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Mapping, Sequence

import ml_collections

from lsync_jax.configs import fashion_mnist, imagenet256, imagenet256_erw, imagenet256_repa, imagenet256_selfcond, tiny
from lsync_jax.configs.base import _plain_type, _section
from lsync_jax.models import COMPUTE_OVERRIDES, get_model
from lsync_jax.transport import SamplerConfig

SOURCE_KINDS = ("paper", "readme", "issue", "summary", "notes", "measured")
CLASS_BALANCES = ("uniform", "balanced")  # labels i.i.d. uniform (ADM/DiT/SiT/REPA scripts) | N / C of each class
METHODS = ("baseline", "layersync", "repa", "repa+layersync", "erw", "selfcond", "selfcond+layersync")
# The regularisers each method trains with (self-conditioning is a model field, compared with the model).
METHOD_REGULARIZERS = {"baseline": (), "layersync": ("layersync",), "repa": ("repa",),
                       "repa+layersync": ("layersync", "repa"), "erw": ("repa",), "selfcond": (),
                       "selfcond+layersync": ("layersync",)}
METRICS = ("fid", "sfid", "inception_score", "precision", "recall")
COMPUTE_OPTIONS = COMPUTE_OVERRIDES
# Settings whose change changes the number: an override of any of them makes a result "not comparable".
SAMPLING_SETTINGS = ("sampler", "cfg_scale", "guidance_interval", "num_samples", "class_balance", "seed",
                     "reference")

# The SDE protocol of SiT's and REPA's evaluation scripts: Euler-Maruyama, 250 steps (the last one a
# mean step of 0.04 to t = 1), diffusion 'sigma' with norm 1.
SDE_250 = dict(method="euler_maruyama", num_steps=250, diffusion_form="sigma", diffusion_norm=1.0, last_step="mean",
               last_step_size=0.04)
ADM_REFERENCE_256 = "VIRTUAL_imagenet256_labeled.npz"
ADM_REFERENCE_URL = ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
                     + ADM_REFERENCE_256)

# The settings `launch/reproduce.py --set.KEY=VALUE` changes (`settings_template`), with their types.
SETTING_TYPES: dict[str, type] = dict(
    num_samples=int, seed=int, cfg_scale=float, guidance_interval=tuple, class_balance=str,
    **{f"sampler.{k}": _plain_type(hint) for k, hint in typing.get_type_hints(SamplerConfig).items()})


def settings_template() -> ml_collections.ConfigDict:
    """`SETTING_TYPES` as a ConfigDict of typed placeholders (None: the protocol's value), for the config
    flag `--set` (`--set.num_samples=10000 --set.sampler.method=heun`): the settings are overridden
    through ml_collections, as every launch script's `--config.KEY=VALUE`."""
    sampler = {k.removeprefix("sampler."): v for k, v in SETTING_TYPES.items() if k.startswith("sampler.")}
    section = _section(dict.fromkeys(k for k in SETTING_TYPES if "." not in k), SETTING_TYPES)
    section.sampler = _section(dict.fromkeys(sampler), sampler)
    return section


@dataclasses.dataclass(frozen=True)
class Protocol:
    """One reported number and how to reproduce it (see the module docstring)."""

    name: str
    paper: str  # who reports it
    table: str  # where in the source: "Table 2", "README, results table", ...
    source: str  # 'paper' | 'readme' | 'summary' | 'measured' (ours, for our own demo)
    where: str  # the document: URL or citation
    method: str  # the training method (METHODS)
    model: str  # lsync-jax model name, e.g. 'SiT-XL/2'
    learn_sigma: bool
    train_steps: int
    train_batch: int
    value: float  # the paper's number
    metric: str = "fid"
    num_samples: int = 50_000
    class_balance: str = "uniform"
    seed: int = 0
    sampler: Mapping[str, Any] = dataclasses.field(default_factory=lambda: dict(SDE_250))
    cfg_scale: float = 1.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    # "adm:<file>": an ADM reference batch (.npz, given on the command line); "data:<split>:<n>": the
    # first n images of the training config's data split (our own demo)
    reference: str = "adm:" + ADM_REFERENCE_256
    unpublished: Mapping[str, str] = dataclasses.field(default_factory=dict)  # setting -> what we use, why
    notes: str = ""
    approximate: bool = False  # read off a figure's curve or bar, not printed as a number
    differs: str = ""  # why no lsync-jax run matches the source's setup (another architecture, say): never comparable
    layersync: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # config.objective.layersync changes
    model_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # beyond the base config's
    # the shipped config the run starts from, 'module' or 'module:variant' ('': the method's, METHOD_CONFIGS)
    base_config: str = ""

    @property
    def sampler_config(self) -> SamplerConfig:
        return SamplerConfig(**dict(self.sampler))

    def settings(self) -> dict[str, Any]:
        """What sampling and evaluation take from the entry (`SAMPLING_SETTINGS`), in plain types."""
        return {"sampler": dataclasses.asdict(self.sampler_config), "cfg_scale": float(self.cfg_scale),
                "guidance_interval": [float(v) for v in self.guidance_interval],
                "num_samples": int(self.num_samples), "class_balance": self.class_balance, "seed": int(self.seed),
                "reference": self.reference}

    def describe(self) -> str:
        """One line: the paper's value, and the sampling protocol that gives it."""
        s = self.sampler_config
        if s.method == "euler_maruyama":
            how = f"SDE Euler-Maruyama {s.num_steps} steps (last: {s.last_step} {s.last_step_size})"
        elif s.method in ("euler", "heun"):
            how = f"ODE {s.method} {s.num_steps} steps"
        else:
            how = f"ODE {s.method} (rtol {s.rtol}, atol {s.atol})"
        guide = "no CFG" if self.cfg_scale == 1.0 else (
            f"CFG {self.cfg_scale:g} on t in {tuple(self.guidance_interval)}"
            + (f", channels :{s.guidance_channels}" if s.guidance_channels else ", all channels"))
        return (f"{self.paper}, {self.table} ({self.source}): {self.model} {self.method} at "
                f"{self.train_steps:,} steps, {self.metric.upper()}-{self.num_samples // 1000}K {self.value:g}; "
                f"{how}, {guide}")


PROTOCOLS: dict[str, Protocol] = {}


def register(protocol: Protocol) -> Protocol:
    """Add an entry (checked: `check_protocol`); a name registered twice is an error."""
    if protocol.name in PROTOCOLS:
        raise ValueError(f"protocol {protocol.name!r} is registered twice")
    check_protocol(protocol)
    PROTOCOLS[protocol.name] = protocol
    return protocol


def get_protocol(name: str) -> Protocol:
    """The entry called `name`; an unknown name is an error listing the close ones (or all)."""
    if name not in PROTOCOLS:
        close = difflib.get_close_matches(name, list(PROTOCOLS), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(sorted(PROTOCOLS))}"
        raise ValueError(f"unknown protocol {name!r}; {hint} (launch/reproduce.py --list prints them all)")
    return PROTOCOLS[name]


def reference_kind(reference: str) -> tuple[str, str]:
    """('adm', file name) or ('data', '<split>:<n>') of a protocol's reference."""
    kind, _, rest = reference.partition(":")
    if kind not in ("adm", "data") or not rest:
        raise ValueError(f"reference {reference!r}: expected 'adm:<file>.npz' or 'data:<split>:<n>'")
    if kind == "data":
        split, _, n = rest.partition(":")
        if not split or not n.isdigit() or int(n) < 1:
            raise ValueError(f"reference {reference!r}: expected 'data:<split>:<n>' with n >= 1")
    return kind, rest


def check_protocol(p: Protocol) -> None:
    """Raise ValueError naming every incomplete or invalid setting of an entry."""
    problems = []
    for field in ("name", "paper", "table", "where"):
        if not str(getattr(p, field)).strip():
            problems.append(f"{field} is empty")
    if p.source not in SOURCE_KINDS:
        problems.append(f"source={p.source!r}, expected one of {SOURCE_KINDS}")
    if p.method not in METHODS:
        problems.append(f"method={p.method!r}, expected one of {METHODS}")
    if p.metric not in METRICS:
        problems.append(f"metric={p.metric!r}, expected one of {METRICS}")
    if p.class_balance not in CLASS_BALANCES:
        problems.append(f"class_balance={p.class_balance!r}, expected one of {CLASS_BALANCES}")
    for field in ("train_steps", "train_batch", "num_samples"):
        if int(getattr(p, field)) < 1:
            problems.append(f"{field}={getattr(p, field)} must be >= 1")
    if not p.value > 0:
        problems.append(f"value={p.value} must be > 0")
    try:
        get_model(p.model)
    except ValueError as e:
        problems.append(f"model: {e}")
    try:
        sampler = p.sampler_config
    except (TypeError, ValueError) as e:
        sampler = None
        problems.append(f"sampler: {e}")
    if sampler is not None and sampler.method in ("euler", "heun", "euler_maruyama") and "num_steps" not in p.sampler:
        problems.append("sampler.num_steps is not pinned")
    low, high = p.guidance_interval
    if not 0.0 <= low <= high <= 1.0:
        problems.append(f"guidance_interval={p.guidance_interval} must satisfy 0 <= low <= high <= 1")
    if p.cfg_scale < 1.0:
        problems.append(f"cfg_scale={p.cfg_scale} must be >= 1 (1: no guidance)")
    try:
        reference_kind(p.reference)
    except ValueError as e:
        problems.append(str(e))
    known = set(SAMPLING_SETTINGS) | {f.name for f in dataclasses.fields(p)} | {
        f"sampler.{f.name}" for f in dataclasses.fields(SamplerConfig)}
    for key, note in p.unpublished.items():
        if key not in known:
            problems.append(f"unpublished[{key!r}] names no setting")
        if not str(note).strip():
            problems.append(f"unpublished[{key!r}] says nothing: state the value used and why")
    if problems:
        raise ValueError(f"protocol {p.name!r}: " + "; ".join(problems))


# -- training configs named after the protocols ---------------------------------------------------------

SHIPPED = {"tiny": tiny, "imagenet256": imagenet256, "imagenet256_repa": imagenet256_repa,
           "imagenet256_erw": imagenet256_erw, "imagenet256_selfcond": imagenet256_selfcond,
           "fashion_mnist": fashion_mnist}
METHOD_CONFIGS = {"baseline": "imagenet256", "layersync": "imagenet256", "repa": "imagenet256_repa:repa",
                  "repa+layersync": "imagenet256_repa:layersync", "erw": "imagenet256_erw:repa",
                  "selfcond": "imagenet256_selfcond:alone", "selfcond+layersync": "imagenet256_selfcond:layersync"}


def _shipped_config(spec: str) -> ml_collections.ConfigDict:
    module, _, variant = spec.partition(":")
    if module not in SHIPPED:
        raise ValueError(f"base config {spec!r}: expected one of {sorted(SHIPPED)} (with an optional :variant)")
    return SHIPPED[module].get_config(variant) if variant else SHIPPED[module].get_config()


def protocol_config(name: str) -> ml_collections.ConfigDict:
    """The training config of protocol `name`: its base config with the entry's model, learn_sigma,
    method, steps and batch, and its sampling settings (so that grids and in-training FID sample as the
    protocol does)."""
    p = get_protocol(name)
    config = _shipped_config(p.base_config or METHOD_CONFIGS[p.method])
    config.model.name = p.model
    config.model.overrides.learn_sigma = bool(p.learn_sigma)
    config.model.overrides.update(dict(p.model_overrides))
    config.objective.layersync.update(dict(p.layersync))
    if p.method == "baseline":
        config.objective.regularizers = ()
    config.train.num_steps = int(p.train_steps)
    config.data.batch_size = int(p.train_batch)
    config.sampler.update(dict(p.sampler))
    config.sampler.cfg_scale = float(p.cfg_scale)
    config.sampler.guidance_interval = tuple(float(v) for v in p.guidance_interval)
    config.protocol = name
    return config


# -- what moves the number: one set of rules for training's warning and reproduce's verdict -------------

# The sections of a run that move a protocol's number, as (the keys compared, None: all; the keys skipped).
# model: every field but how it computes (COMPUTE_OPTIONS, as resuming treats them); objective: its
# weights and each regulariser's settings; data: the batch only (where the data lives does not move it);
# train: the steps and the EMA decay. Sampling, guidance, the sample count and the reference are the
# protocol's own settings (`SAMPLING_SETTINGS`): `launch/reproduce.py --set` changes them, marked.
PROTOCOL_SECTIONS: dict[str, tuple[tuple[str, ...] | None, tuple[str, ...]]] = {
    "model": (None, COMPUTE_OPTIONS), "objective": (None, ()), "transport": (None, ()), "optimizer": (None, ()),
    "data": (("batch_size",), ()), "train": (("num_steps", "ema_decay"), ())}


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def setting_differences(saved: Mapping[str, Any], wanted: Mapping[str, Any], section: str,
                        skip: Sequence[str] = ()) -> list[str]:
    """'section.key: run X, protocol Y' for every key of two config sections whose values differ
    (mappings compared key by key, tuples as lists); the form of `lsync_jax.workdir.record_differences`."""
    out = []
    for key in sorted(set(saved) | set(wanted)):
        if key in skip:
            continue
        a = saved[key] if key in saved else "absent"
        b = wanted[key] if key in wanted else "absent"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(setting_differences(a, b, f"{section}.{key}"))
        elif _plain(a) != _plain(b):
            out.append(f"{section}.{key}: run {_plain(a)!r}, protocol {_plain(b)!r}")
    return out


def config_settings(config: Any) -> dict[str, dict[str, Any]]:
    """What of a training config moves a protocol's number, by `PROTOCOL_SECTIONS` section, in the
    config's own form: the model's name and every override (None read as the model's own value), the
    objective's weights and the sections of the regularisers it trains with, the transport, the
    optimizer, the batch, the steps and the EMA decay."""
    name = str(config.model.name)
    overrides = dict(config.model.overrides)
    try:
        model = get_model(name)
    except ValueError:
        model = None
    fields = {k: (v if v is not None else getattr(model, k, None)) for k, v in overrides.items()}
    objective = dict(config.objective)
    regularizers = tuple(objective.get("regularizers", ()))
    return {"model": dict(fields, name=name),
            "objective": {"transport_weight": objective.get("transport_weight"),
                          "clean_input": objective.get("clean_input"), "regularizers": sorted(regularizers),
                          **{reg: _plain(dict(objective.get(reg) or {})) for reg in regularizers}},
            "transport": _plain(dict(config.transport)), "optimizer": _plain(dict(config.optimizer)),
            "data": {"batch_size": int(config.data.batch_size)},
            "train": {"num_steps": int(config.train.num_steps), "ema_decay": float(config.train.ema_decay)}}


def protocol_differences(run: Mapping[str, Mapping[str, Any]], wanted: Mapping[str, Mapping[str, Any]],
                         compare: Any = setting_differences) -> list[str]:
    """Every difference, by key, between a run's settings and a protocol's in what moves the number
    (`PROTOCOL_SECTIONS`): 'section.key: run X, protocol Y'. `run` and `wanted` hold sections by name;
    a section `run` lacks (a checkpoint that records none) is not compared: the caller says so.
    `compare(saved, wanted, section, skip)` is `setting_differences` for configs, or
    `lsync_jax.workdir.record_differences` for checkpoint records (its 'checkpoint'/'config' become
    'run'/'protocol')."""
    out = []
    for section, (only, skip) in PROTOCOL_SECTIONS.items():
        if section not in run or section not in wanted:
            continue
        saved, want = dict(run[section]), dict(wanted[section])
        if only is not None:
            saved = {k: v for k, v in saved.items() if k in only}
            want = {k: v for k, v in want.items() if k in only}
        for line in compare(saved, want, section, skip):
            key, _, rest = line.partition(": checkpoint ")
            if rest:  # a record comparison's labels, as a protocol's verdict names the sides
                have, _, value = rest.rpartition(", config ")
                line = f"{key}: run {have}, protocol {value}"
            out.append(line)
    return out


def config_protocol_differences(config: Any) -> list[str]:
    """What of a training config (config.protocol names its protocol) differs from that protocol's
    training config in what moves the number (`protocol_differences`), key by key; [] without a
    protocol. An unknown protocol name is an error. Reproduce's verdict uses the same rules."""
    name = str(config.get("protocol", "") or "")
    if not name:
        return []
    get_protocol(name)
    return protocol_differences(config_settings(config), config_settings(protocol_config(name)))


# -- the entries -------------------------------------------------------------------------------------------
# Sources read on 2026-11-29 (official repositories at their newest stored commits; our REFERENCE notes).
LAYERSYNC = "LayerSync (Haghighi et al., arXiv 2510.12581)"
LAYERSYNC_README = "github.com/vita-epfl/LayerSync README (commit 4001d6d), figure visuals/pull-figure.png"
LAYERSYNC_SUMMARY = "a secondary summary of the LayerSync paper's tables (our REFERENCE notes)"
SIT = "SiT (Ma et al., 2024)"
REPA = "REPA (Yu et al., ICLR 2025)"
ERW = "ERW (Liu et al., arXiv 2504.10188)"
DDAEPP = "DDAE++ (Xiang et al., arXiv 2505.10999)"
EPOCH_STEPS_256 = 1_281_167 / 256  # ImageNet-1k training images per step at batch 256

# The official LayerSync/SiT sampling script (sample_ddp.py ODE, the README's evaluation command): adaptive
# dopri5, atol 1e-6, rtol 1e-3; guidance (if any) on the first 3 latent channels, no interval.
OFFICIAL_ODE = dict(method="dopri5", atol=1e-6, rtol=1e-3, guidance_channels=3)
HEUN_125 = dict(method="heun", num_steps=125, guidance_channels=3)  # 250 model evaluations
NOT_IN_README = ("the README figure gives no sampler; we use its evaluation command's (sample_ddp.py ODE: dopri5, "
                 "atol 1e-6, rtol 1e-3)")
HEUN_STEPS = ("the summary says ODE/Heun but no step count; we use 125 Heun steps (250 evaluations), what SiT's "
              "maintainer names for SiT-XL/2 (SiT issue 18)")
PAIRS_SCALED = "the summary gives no pair for this depth; we use block 8 -> 16 of 28 scaled to the depth (pairs=None)"
# What the LayerSync figures and the summary leave to the official training code.
OFFICIAL_TRAINING = {"train_batch": "not stated with the number; the official train.py's global batch, 256",
                     "learn_sigma": "not stated with the number; the official SiT/LayerSync models use it "
                                    "(sample_ddp.py sets learn_sigma=True)"}


def _pair(name: str, method: str, model: str, value: float, **fields: Any) -> None:
    register(Protocol(name=name, method=method, model=model, value=value, **fields))


# LayerSync README figure (b): FID-50K curves against training steps, read at 400K (no number printed).
for _method, _value in (("layersync", 10.5), ("baseline", 18.0)):
    _pair(f"{'layersync-' if _method == 'layersync' else ''}sit-xl2-400k-curve", _method, "SiT-XL/2", _value,
          paper=LAYERSYNC, table="README figure (b), FID-50K curve at 400K steps", source="readme",
          where=LAYERSYNC_README, approximate=True, learn_sigma=True, train_steps=400_000, train_batch=256,
          sampler=OFFICIAL_ODE, unpublished={"sampler": NOT_IN_README, "reference": "the README names no reference "
                                             "batch; ADM's VIRTUAL_imagenet256_labeled.npz is what its suite uses",
                                             "num_samples": "50,000: the script's default", **OFFICIAL_TRAINING},
          notes="Read off the curve (about 10.5 and 18): compare with the Heun entries' printed 11.24 / 17.97.")

# LayerSync paper tables as a summary reports them: ImageNet 256, no CFG, 400K steps, ODE/Heun.
for _model, _tag, _base, _ls, _weight in (("SiT-B/2", "b2", 36.19, 30.00, 0.3), ("SiT-L/2", "l2", 21.41, 14.83, 0.2),
                                          ("SiT-XL/2", "xl2", 17.97, 11.24, 0.2)):
    _layersync = {} if _model == "SiT-XL/2" else dict(pairs=None, auto_weight=_weight)
    for _method, _value in (("layersync", _ls), ("baseline", _base)):
        _unpublished = {"sampler.num_steps": HEUN_STEPS, **OFFICIAL_TRAINING,
                        "reference": "not named; ADM's VIRTUAL_imagenet256_labeled.npz"}
        if _layersync and _method == "layersync":
            _unpublished["layersync"] = PAIRS_SCALED
        _pair(f"{'layersync-' if _method == 'layersync' else ''}sit-{_tag}-400k-heun", _method, _model, _value,
              paper=LAYERSYNC, table="ImageNet 256 model-size table (no CFG, 400K steps, ODE/Heun)", source="summary",
              where=LAYERSYNC_SUMMARY, learn_sigma=True, train_steps=400_000, train_batch=256, sampler=HEUN_125,
              unpublished=_unpublished, layersync=_layersync if _method == "layersync" else {},
              notes=f"LayerSync weight {_weight} for {_model}." + (
                  " SiT's published B/2 33.0 is an SDE number (sit-b2-400k-sde): match the sampler." if _tag == "b2"
                  else ""))

# LayerSync README figure (c): the image bars, 8.99 -> 6.87 (-23.6%), the abstract's 23.6%.
for _method, _value in (("layersync", 6.87), ("baseline", 8.99)):
    _pair(f"{'layersync-' if _method == 'layersync' else ''}sit-xl2-4m", _method, "SiT-XL/2", _value, paper=LAYERSYNC,
          table="README figure (c), image bars (the abstract's 23.6%)", source="readme", where=LAYERSYNC_README,
          learn_sigma=True, train_steps=4_000_000, train_batch=256, sampler=OFFICIAL_ODE,
          unpublished={"train_steps": "the figure gives no step count; 4M comes from a summary of the paper",
                       "sampler": NOT_IN_README, "cfg_scale": "not given; the summary calls it a no-CFG number",
                       "reference": "not named; ADM's VIRTUAL_imagenet256_labeled.npz", **OFFICIAL_TRAINING})

# SiT: the paper's 7M-step numbers, and what the official tracker says about their samplers.
_pair("sit-xl2-7m-sde", "baseline", "SiT-XL/2", 8.3, paper=SIT,
      table="the paper's SiT-XL/2 7M no-CFG FID, as quoted in SiT issue 31; the maintainer: 'reported from "
      "sampling with SDE instead of ODE'", source="issue",
      where="github.com/willisma/SiT/issues/31", learn_sigma=True, train_steps=7_000_000, train_batch=256,
      sampler=dict(SDE_250, guidance_channels=3),
      unpublished={"sampler": "the maintainer's reply naming the SDE settings is cut off in the copy we read; we use "
                              "sample_ddp.py SDE's defaults (Euler-Maruyama, 250 steps, sigma diffusion, norm 1, mean "
                              "last step of 0.04)", "reference": "not named; ADM's VIRTUAL_imagenet256_labeled.npz"})
_pair("sit-xl2-7m-ode-dopri5", "baseline", "SiT-XL/2", 9.5, paper="a user of the official SiT code",
      table="SiT issue 31: the official checkpoint sampled with the default ODE, no CFG, 8 GPUs ('all > 9.3')",
      source="issue",
      where="github.com/willisma/SiT/issues/31", learn_sigma=True, train_steps=7_000_000, train_batch=256,
      sampler=OFFICIAL_ODE, notes="Not a paper number: a user's measurement with the official code and checkpoint, "
      "the same model as sit-xl2-7m-sde (8.3). The gap is the sampler.")
_pair("sit-xl2-7m-cfg1.5", "baseline", "SiT-XL/2", 2.06, paper=SIT, table="README results table (XL/2, 256x256, "
      "FID-50K 2.06, IS 270.27)", source="readme", where="github.com/willisma/SiT README (commit 947f95b)",
      learn_sigma=True, train_steps=7_000_000, train_batch=256, sampler=HEUN_125, cfg_scale=1.5,
      unpublished={"sampler": "the README states no sampler; the maintainer (SiT issue 18) names a Heun ODE of 125 "
                              "steps (250 evaluations) with CFG 1.5 for the released XL/2, which we use (a user "
                              "measured 2.08 with the default dopri5 ODE and CFG 1.5, SiT issue 31)",
                   "reference": "not named; ADM's VIRTUAL_imagenet256_labeled.npz"},
      notes="Guidance on 3 of the 4 latent channels, as the official forward_with_cfg; no guidance interval. "
            "Conflict: SiT's README credits 2.06 to 'exploring various diffusion coefficients', which reads as an "
            "SDE result, while its maintainer names a Heun ODE for the released model: try both "
            "(--set.sampler.method=euler_maruyama --set.sampler.num_steps=250 marks the result not comparable).")
_pair("sit-b2-400k-sde", "baseline", "SiT-B/2", 33.0, paper=SIT,
      table="the paper's SiT-B/2 400K no-CFG FID, as quoted in SiT issue 31 and said to be an SDE number by the "
      "DispLoss authors (raywang4/DispLoss issue 4)", source="issue",
      where="github.com/willisma/SiT/issues/31", learn_sigma=True, train_steps=400_000, train_batch=256,
      sampler=dict(SDE_250, guidance_channels=3),
      unpublished={"sampler": "SDE settings not stated; sample_ddp.py SDE's defaults",
                   "reference": "not named; ADM's VIRTUAL_imagenet256_labeled.npz"},
      notes="A user measured 34.7 with the official code (SiT issue 31).")

# REPA: the README's FID 1.42 and its evaluation command (SDE 250, CFG 1.8 for t_REPA <= 0.7, all channels).
_pair("repa-sit-xl2-4m-cfg1.8", "repa", "SiT-XL/2", 1.42, paper=REPA, table="README ('state-of-the-art FID=1.42'; the "
      "evaluation command and the 4M-iteration checkpoint 'used in the final evaluation')", source="readme",
      where="github.com/sihyun-yu/REPA README (commit 67f7145)", learn_sigma=False, train_steps=4_000_000,
      train_batch=256, sampler=dict(SDE_250), cfg_scale=1.8, guidance_interval=(0.3, 1.0),
      notes="REPA's SDE (diffusion 2t with noise sqrt(diffusion)) is SiT's 'sigma' form with norm 1 (noise sqrt(2w)); "
            "REPA's maintainer calls the paper's w(t) = t vs the code's 2t 'a typo' (REPA issue 52). The README "
            "itself warns that the released code may not replicate the paper exactly.")
for _method, _value in (("repa+layersync", 7.01), ("repa", 7.88)):
    _pair(f"{'repa-layersync' if 'layersync' in _method else 'repa'}-sit-xl2-400k-summary", _method, "SiT-XL/2", _value,
          paper=LAYERSYNC, table="REPA with and without LayerSync, no CFG", source="summary", where=LAYERSYNC_SUMMARY,
          learn_sigma=False, train_steps=400_000, train_batch=256, sampler=dict(SDE_250),
          unpublished={"train_steps": "the summary names no step count; we take 400K, the step of REPA's own SiT-XL/2 "
                                      "comparison (check before comparing)",
                       "sampler": "not given; REPA's SDE evaluation protocol (250 steps)",
                       "reference": "not named; ADM's VIRTUAL_imagenet256_labeled.npz"})

# ERW: the abstract's FID 1.41 (350 epochs) and a summary's 1.94 (40 epochs); the README's w/ CFG command.
ERW_ROPE = ("ERW's released models use rotary position embeddings (--use_rope), which lsync-jax's SiT does not "
            "have: our ERW run is the method on a plain SiT, not their network")
for _name, _value, _epochs, _source, _where in (
        ("erw-sit-xl2-350ep-cfg", 1.41, 350, "paper", "arXiv 2504.10188 v2/v3 abstract ('FID=1.41' in 350 epochs)"),
        ("erw-sit-xl2-40ep-cfg", 1.94, 40, "notes",
         "our REFERENCE notes (not found in the ERW repository or abstracts when checked)")):
    _pair(_name, "erw", "SiT-XL/2", _value, paper=ERW, table=f"headline, {_epochs} epochs, with CFG", source=_source,
          where=_where, learn_sigma=False, train_steps=round(_epochs * EPOCH_STEPS_256), train_batch=256,
          sampler=dict(SDE_250), cfg_scale=2.2, guidance_interval=(0.05, 1.0), differs=ERW_ROPE,
          unpublished={"sampler": "the number's sampler is not stated; the README's 'w/ CFG' command: SDE 250 steps, "
                                  "CFG 2.2 for t_ERW <= 0.95", "cfg_scale": "the README's 'w/ CFG' command (2.2)",
                       "train_steps": f"{_epochs} epochs of ImageNet-1k at batch 256; whether ERW counts its "
                                      "100K warm-up steps in them is not stated"},
          notes="ERW's own optional FID (--calculate-fid) uses a PyTorch Inception against the reference's statistics, "
                "not ADM's evaluator.")

# DDAE++: DiT-Base (LightningDiT) rows of the README at commit 97d3d5d, FID-10K.
DDAEPP_MODEL = ("DDAE++ trains a LightningDiT DiT-Base (its own tokenizer, training recipe and sampler); lsync-jax "
                "runs the method on SiT-B/2 with SD-VAE latents")
DDAEPP_UNPUBLISHED = {"sampler": "not published; SDE 250 steps",
                      "train_batch": "not published; 256",
                      "train_steps": "the README gives epochs; steps = epochs x 1,281,167 / 256 at our batch of 256",
                      "reference": "not published; ADM's VIRTUAL_imagenet256_labeled.npz",
                      "model_overrides": "the self-conditioning layer is not published; block 7 of 12 (LayerSync's "
                                         "16 of 28 scaled)"}
for _rows in (("cond-100ep", 100, 1000, 1.0, 15.51, 14.52), ("cond-100ep-cfg", 100, 1000, None, 5.72, 5.58),
              ("uncond-400ep", 400, 0, 1.0, 21.26, 20.85)):
    _tag, _epochs, _classes, _cfg, _base_value, _sc_value = _rows
    for _method, _value in (("baseline", _base_value), ("selfcond", _sc_value)):
        _unpublished = dict(DDAEPP_UNPUBLISHED)
        if _cfg is None:
            _unpublished["cfg_scale"] = "the guidance scale of FID_10k_CFG is not published; we use 1.5"
            _unpublished["guidance_interval"] = "not published; none (all t)"
        _overrides = dict(num_classes=_classes) if _classes == 0 else {}
        if _method == "selfcond":
            _overrides["self_condition"] = 7
        _pair(f"ddaepp-dit-b-{_tag}{'-selfcond' if _method == 'selfcond' else ''}", _method, "SiT-B/2", _value,
              paper=DDAEPP, table=f"README DiT-Base {'conditional' if _classes else 'unconditional'} table, "
              f"{_epochs} epochs, FID_10k{'_CFG' if _cfg is None else ''}", source="readme",
              where="github.com/FutureXiang/ddae_plus_plus README at commit 97d3d5d (later replaced by images)",
              learn_sigma=False, train_steps=round(_epochs * EPOCH_STEPS_256), train_batch=256, num_samples=10_000,
              cfg_scale=1.5 if _cfg is None else 1.0, differs=DDAEPP_MODEL, unpublished=_unpublished,
              model_overrides=_overrides)

# Our own demo (make demo): Fashion-MNIST, 800 steps, Euler 32 with CFG 2.0, 1,000 EMA samples vs the first
# 1,000 test images. The value is the demo's in-training FID-1K: one first run since the step draws its
# randomness per example (144.5083, 2026-12-05, docs/benchmarks.md); before that change the median of three
# first runs on two CPU devices was 146.9660 (146.9671, 146.9644; earlier 147.39, and 146.53 on one device).
_pair("lsync-demo-fmnist-fid1k", "layersync", "SiT-S/4", 144.5083, paper="lsync-jax demo (make demo)",
      table="the demo's final FID-1K", source="measured",
      where="issue 31's first run of make demo (2-core CPU, two CPU devices, per-example randomness)",
      learn_sigma=False, train_steps=800, train_batch=64, num_samples=1000,
      sampler=dict(method="euler", num_steps=32), cfg_scale=2.0, reference="data:test:1000",
      base_config="fashion_mnist", notes="The in-training FID draws its own labels and noise (seed + 2); this "
      "protocol's labels and noise differ, so expect a nearby value, not the same digits.")


def _sampler_text(p: Protocol) -> str:
    s = p.sampler_config
    if s.method == "euler_maruyama":
        return (f"SDE E-M {s.num_steps} ({s.diffusion_form} x{s.diffusion_norm:g}, "
                f"last {s.last_step} {s.last_step_size:g})")
    if s.method in ("euler", "heun"):
        return f"ODE {s.method} {s.num_steps}"
    return f"ODE {s.method} (rtol {s.rtol:g}, atol {s.atol:g})"


def markdown_table() -> str:
    """Every protocol as a markdown table (docs/protocols.md holds it; a test keeps the two equal)."""
    rows = ["| protocol | source | model, method, steps | sampler | guidance | samples | reference | paper's value |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in sorted(PROTOCOLS):
        p = PROTOCOLS[name]
        if p.cfg_scale == 1.0:
            guidance = "none"
        else:
            count = p.sampler_config.guidance_channels
            channels = f"first {count} ch." if count else "all ch."
            guidance = f"{p.cfg_scale:g} on t in [{p.guidance_interval[0]:g}, {p.guidance_interval[1]:g}], {channels}"
        value = f"{'~' if p.approximate else ''}{p.value:g} {p.metric.upper()}"
        marks = [p.source] + (["unpublished: " + ", ".join(sorted(p.unpublished))] if p.unpublished else []) + (
            ["never comparable"] if p.differs else [])
        rows.append(f"| `{name}` | {p.paper.split(' (')[0]}, {'; '.join(marks)} | {p.model} {p.method}, "
                    f"{p.train_steps:,} | {_sampler_text(p)} | {guidance} | {p.num_samples:,} {p.class_balance} | "
                    f"{p.reference.split(':', 1)[1]} | {value} |")
    return "\n".join(rows) + "\n"
