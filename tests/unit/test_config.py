"""Strict configuration: every HyLo option and every DeepSpeed key HyLo reads is type-checked.

No truthiness (``"false"`` is not False, ``1`` is not True), no string-to-list splitting
(``skip_layers="head"`` is not the patterns h, e, a, d), and malformed DeepSpeed sections give an
error naming the key instead of an AttributeError. Every error is a ``ds_hylo.ConfigError``
(a ValueError) whose message names the key, the value and what is allowed.
"""

from __future__ import annotations

import importlib
import re
import sys

import pytest
import torch

import ds_hylo
from ds_hylo import HyLo, HyLoConfig

# Each of these was accepted (or crashed with an unrelated error) before options were type-checked.
BAD_OPTIONS = [
    # (options, key named in the error, value named in the error)
    (dict(nesterov="false", base="sgd", momentum=0.9), "nesterov", "'false'"),
    (dict(nesterov=1, base="sgd", momentum=0.9), "nesterov", "1"),
    (dict(nesterov=None), "nesterov", "None"),
    (dict(skip_layers="head"), "skip_layers", "'head'"),
    (dict(skip_layers=["head", 3]), "skip_layers", "3"),
    (dict(skip_layers={"head": True}), "skip_layers", "{'head': True}"),
    (dict(mode="hybrid", kid_schedule=[[True, 5]]), "kid_schedule", "True"),
    (dict(mode="hybrid", kid_schedule=[5]), "kid_schedule", "5"),
    (dict(mode="hybrid", kid_schedule="[[0, 5]]"), "kid_schedule", "'[[0, 5]]'"),
]

# Already refused before; kept so that the stricter checks cannot loosen them.
ALREADY_REFUSED = [
    (dict(lr=True), "lr", "True"),
    (dict(lr="0.1"), "lr", "'0.1'"),
    (dict(base="sgd", momentum=False), "momentum", "False"),
    (dict(update_freq=True), "update_freq", "True"),
    (dict(max_global_samples=64.0), "max_global_samples", "64.0"),
    (dict(damping="0.1"), "damping", "'0.1'"),
    (dict(damping_target=0.01, damping_decay_steps=True), "damping_decay_steps", "True"),
    (dict(kl_clip=True), "kl_clip", "True"),
    (dict(mode=["kis"]), "mode", "['kis']"),
    (dict(mode="hybrid", kid_schedule=[[0, 5.0]]), "kid_schedule", "5.0"),
    (dict(mode="hybrid", kid_schedule=[[0, 5, 9]]), "kid_schedule", "[0, 5, 9]"),
    (dict(mode="hybrid", kid_schedule=[[-1, 5]]), "kid_schedule", "-1"),
]


def tiny_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


@pytest.mark.parametrize("options,key,value", BAD_OPTIONS + ALREADY_REFUSED,
                         ids=[f"{k}={v}" for _, k, v in BAD_OPTIONS + ALREADY_REFUSED])
def test_bad_option_is_refused_naming_key_and_value(options, key, value):
    for build in (lambda: HyLoConfig.from_dict(options), lambda: HyLo(tiny_model(), **options)):
        with pytest.raises(ds_hylo.ConfigError) as info:
            build()
        message = str(info.value)
        assert key in message and value in message, message
        assert "allowed" in message or "must be" in message, message


def test_config_error_is_a_value_error():
    assert issubclass(ds_hylo.ConfigError, ValueError)


def test_single_string_skip_layers_says_give_a_list():
    with pytest.raises(ds_hylo.ConfigError, match=re.escape("['head']")):
        HyLoConfig(skip_layers="head")


GOOD_OPTIONS = [
    dict(nesterov=True, base="sgd", momentum=0.9),
    dict(nesterov=False),
    dict(lr=1),  # an int is a number
    dict(lr=0),
    dict(base="sgd", momentum=0, dampening=1),
    dict(damping=1, damping_target=0.01, damping_decay_steps=100),
    dict(damping=lambda step: 0.1),
    dict(kl_clip=None),
    dict(kl_clip=1),
    dict(max_global_samples=None),
    dict(max_global_samples=64),
    dict(skip_layers=["head", "blocks.*"]),
    dict(skip_layers=("head",)),
    dict(skip_layers=[]),
    dict(mode="hybrid", kid_schedule=[[0, 5], (10, 20)]),
    dict(mode="hybrid", kid_schedule=[]),
    dict(mode="hybrid", kid_schedule=None),
    dict(mode="hybrid", switch_threshold=1),
    # the hybrid options at their defaults pass with any mode (configs that spell every option out)
    dict(mode="kis", switch_window=100, switch_threshold=0.5, switch_scope="layer", kid_schedule=None),
]


@pytest.mark.parametrize("options", GOOD_OPTIONS, ids=[str(sorted(o)) for o in GOOD_OPTIONS])
def test_good_options_are_accepted(options):
    config = HyLoConfig.from_dict(options)
    for key, value in options.items():
        if key == "skip_layers":
            assert config.skip_layers == tuple(value)
        else:
            assert getattr(config, key) == value or callable(value)
    HyLo(tiny_model(), **options)


# ------------------------------------------------------------------ hybrid-only options
HYBRID_ONLY = [
    ("switch_window", 50, "50"),
    ("switch_threshold", 0.25, "0.25"),
    ("switch_scope", "global", "'global'"),
    ("kid_schedule", [[0, 5]], "[[0, 5]]"),
    ("kid_schedule", [], "[]"),
]


@pytest.mark.parametrize("mode", ["kis", "kid", "sngd"])
@pytest.mark.parametrize("key,value,shown", HYBRID_ONLY, ids=[f"{k}={s}" for k, _, s in HYBRID_ONLY])
def test_hybrid_option_with_another_mode_is_refused(mode, key, value, shown):
    """A hybrid-policy option set to a non-default value under another mode was silently ignored."""
    options = {"mode": mode, key: value}
    for build in (lambda: HyLoConfig.from_dict(options), lambda: HyLo(tiny_model(), **options)):
        with pytest.raises(ds_hylo.ConfigError) as info:
            build()
        message = str(info.value)
        assert f"{key}={shown}" in message and "needs mode='hybrid'" in message, message
        assert f"mode={mode!r}" in message, message
    HyLoConfig.from_dict({**options, "mode": "hybrid"})  # the same value is fine in hybrid mode


def test_hybrid_option_with_another_mode_is_refused_in_deepspeed_json():
    pytest.importorskip("deepspeed")
    config = ds_config(optimizer=hylo_section(kid_schedule=[[0, 5]]))  # mode "kid"
    with pytest.raises(ds_hylo.ConfigError, match=re.escape("kid_schedule=[[0, 5]] is a hybrid-mode option")):
        ds_hylo.initialize(model=tiny_model(), config=config)


def test_skip_layers_list_is_a_list_of_patterns():
    opt = HyLo(tiny_model(), skip_layers=["2"])
    assert opt.config.skip_layers == ("2",)
    assert list(opt.preconditioner.layers) == ["0"]


@pytest.mark.parametrize("params", ["lr=0.1", ["lr", 0.1], None, 3])
def test_from_dict_needs_a_mapping(params):
    with pytest.raises(ds_hylo.ConfigError, match=re.escape(repr(params))):
        HyLoConfig.from_dict(params, where="optimizer.params")


def test_from_dict_refuses_non_string_keys():
    with pytest.raises(ds_hylo.ConfigError, match=r"\[1\] in HyLo params .*must be strings"):
        HyLoConfig.from_dict({1: 0.1})


def test_validate_rechecks_after_mutation():
    config = HyLoConfig()
    config.nesterov = "yes"
    with pytest.raises(ds_hylo.ConfigError, match="nesterov='yes'"):
        config.validate()


# ------------------------------------------------------------------ errors that say what to do
@pytest.mark.parametrize("typo,meant", [("rank_ration", "rank_ratio"), ("updat_freq", "update_freq"),
                                        ("LR", "lr"), ("Weight_Decay", "weight_decay")])
def test_unknown_key_suggests_the_closest_option(typo, meant):
    for build in (lambda: HyLoConfig.from_dict({typo: 0.5}), lambda: HyLo(tiny_model(), **{typo: 0.5})):
        with pytest.raises(ds_hylo.ConfigError) as info:
            build()
        message = str(info.value)
        assert f"{typo!r}: did you mean {meant!r}?" in message and "allowed keys" in message, message


def test_unknown_key_far_from_every_option_gets_no_suggestion():
    with pytest.raises(ds_hylo.ConfigError) as info:
        HyLoConfig.from_dict({"zzzzzz": 1})
    assert "did you mean" not in str(info.value) and "'zzzzzz'" in str(info.value)


@pytest.mark.parametrize("options", [dict(momentum=0.9), dict(dampening=0.5), dict(nesterov=True, momentum=0.9),
                                     dict(base="adamw", momentum=0.9)])
def test_sgd_option_with_adamw_base_says_use_base_sgd(options):
    with pytest.raises(ds_hylo.ConfigError) as info:
        HyLo(tiny_model(), **options)
    message = str(info.value)
    name = next(iter(options)) if "nesterov" not in options else "momentum"
    assert f"{name}=" in message and "base='adamw'" in message, message
    assert "use base='sgd' for hylo on momentum sgd" in message.lower(), message
    HyLo(tiny_model(), **{**options, "base": "sgd"})  # what the message says works


@pytest.mark.parametrize("key,value,fixed", [("lr", "0.001", "lr=0.001"), ("damping", " 0.1", "damping=0.1"),
                                             ("update_freq", "10", "update_freq=10"),
                                             ("max_global_samples", "64", "max_global_samples=64"),
                                             ("weight_decay", "1e-2", "weight_decay=1e-2")])
def test_number_given_as_a_string_says_remove_the_quotes(key, value, fixed):
    for build in (lambda: HyLoConfig.from_dict({key: value}), lambda: HyLo(tiny_model(), **{key: value})):
        with pytest.raises(ds_hylo.ConfigError) as info:
            build()
        message = str(info.value)
        assert f"{key}={value!r}" in message and f"remove the quotes ({fixed})" in message, message


def test_non_numeric_string_gets_no_quotes_advice():
    with pytest.raises(ds_hylo.ConfigError) as info:
        HyLoConfig.from_dict({"lr": "fast"})
    assert "remove the quotes" not in str(info.value) and "lr='fast'" in str(info.value)


# ------------------------------------------------------------------ the DeepSpeed sections HyLo reads
def hylo_section(**params) -> dict:
    return {"type": "HyLo", "params": {"mode": "kid", **params}}


def ds_config(**overrides) -> dict:
    config = {"train_batch_size": 8, "optimizer": hylo_section(), "zero_optimization": {"stage": 1}}
    config.update(overrides)
    return config


# Each of these crashed (AttributeError, or DeepSpeed starting up with the wrong settings) or was
# refused for the wrong reason before the sections were type-checked.
BAD_SECTIONS = [
    # (config, key named in the error, value named in the error with its type)
    (ds_config(optimizer="HyLo"), "optimizer", "'HyLo' (str)"),
    (ds_config(optimizer=["HyLo"]), "optimizer", "['HyLo'] (list)"),
    (ds_config(optimizer={"type": "HyLo", "params": "lr=0.1"}), "optimizer.params", "'lr=0.1' (str)"),
    (ds_config(optimizer={"type": "HyLo", "params": ["lr", 0.1]}), "optimizer.params", "['lr', 0.1] (list)"),
    (ds_config(optimizer={"type": ["HyLo"], "params": {}}), "optimizer.type", "['HyLo'] (list)"),
    (ds_config(optimizer={"type": 7, "params": {}}), "optimizer.type", "7 (int)"),
    (ds_config(optimizer=hylo_section(nesterov="false", base="sgd", momentum=0.9)), "nesterov", "'false' (str)"),
    (ds_config(optimizer=hylo_section(skip_layers="head")), "skip_layers", "'head'"),
    (ds_config(zero_optimization=True), "zero_optimization", "True (bool)"),
    (ds_config(zero_optimization=1), "zero_optimization", "1 (int)"),
    (ds_config(zero_optimization=None), "zero_optimization", "None (NoneType)"),
    (ds_config(zero_optimization={"stage": True}), "zero_optimization.stage", "True (bool)"),
    (ds_config(zero_optimization={"stage": 1.0}), "zero_optimization.stage", "1.0 (float)"),
    (ds_config(zero_optimization={"stage": -1}), "zero_optimization.stage", "-1 (int)"),
    (ds_config(zero_optimization={"stage": 1, "overlap_comm": "false"}), "zero_optimization.overlap_comm",
     "'false' (str)"),
    (ds_config(zero_optimization={"stage": 1, "overlap_comm": 0}), "zero_optimization.overlap_comm", "0 (int)"),
    (ds_config(zero_optimization={"stage": 1, "offload_optimizer": "cpu"}), "zero_optimization.offload_optimizer",
     "'cpu' (str)"),
    (ds_config(zero_optimization={"stage": 1, "offload_param": True}), "zero_optimization.offload_param",
     "True (bool)"),
    (ds_config(zero_optimization={"stage": 1, "offload_optimizer": {"device": 1}}),
     "zero_optimization.offload_optimizer.device", "1 (int)"),
    (ds_config(zero_optimization={"stage": 1, "cpu_offload": "false"}), "zero_optimization.cpu_offload",
     "'false' (str)"),
    (ds_config(zero_optimization={"stage": 1, "cpu_offload": 0}), "zero_optimization.cpu_offload", "0 (int)"),
]


@pytest.mark.parametrize("config,key,value", BAD_SECTIONS,
                         ids=[f"{k}-{i}" for i, (_, k, _) in enumerate(BAD_SECTIONS)])
def test_malformed_deepspeed_section_is_named(config, key, value):
    """ds_hylo.initialize refuses the config before DeepSpeed starts, naming the key and the value."""
    pytest.importorskip("deepspeed")
    with pytest.raises(ds_hylo.ConfigError) as info:
        ds_hylo.initialize(model=tiny_model(), config=config)
    message = str(info.value)
    assert key in message and value in message, message
    assert "allowed" in message or "must be" in message, message


GOOD_SECTIONS = [
    ds_config(),
    ds_config(optimizer={"type": "hylo"}),
    ds_config(optimizer={"type": "HyLo", "params": None}),
    ds_config(zero_optimization={"stage": 0}),
    ds_config(zero_optimization={"stage": 1, "overlap_comm": False, "cpu_offload": False}),
    ds_config(zero_optimization={"stage": 1, "offload_optimizer": None, "offload_param": {"device": "none"}}),
    ds_config(zero_optimization={"stage": 1, "offload_optimizer": {"device": "none", "pin_memory": True}}),
    {"train_batch_size": 8, "optimizer": hylo_section()},
]


@pytest.mark.parametrize("config", GOOD_SECTIONS)
def test_good_deepspeed_sections_are_accepted(config):
    pytest.importorskip("deepspeed")
    from ds_hylo.deepspeed import split_hylo_config

    ds_out, params = split_hylo_config(config)
    assert "optimizer" not in ds_out
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    assert ds_out.get("zero_allow_untested_optimizer", False) is (stage > 0)
    HyLoConfig.from_dict(params)


def test_other_optimizer_sections_pass_through():
    pytest.importorskip("deepspeed")
    from ds_hylo.deepspeed import is_hylo_config

    assert not is_hylo_config({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    assert not is_hylo_config({})
    assert not is_hylo_config({"optimizer": None})
    with pytest.raises(ds_hylo.ConfigError, match="optimizer"):
        is_hylo_config({"optimizer": "HyLo"})


# ------------------------------------------------------------------ missing extras
def test_initialize_without_deepspeed_says_which_extra(monkeypatch):
    """Without DeepSpeed installed, ds_hylo.initialize and importing ds_hylo.deepspeed say what to install."""
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    for name in [m for m in sys.modules if m == "ds_hylo.deepspeed" or m == "ds_hylo.accelerate"]:
        monkeypatch.delitem(sys.modules, name)
    hint = re.escape('pip install -e ".[deepspeed]"')
    with pytest.raises(ImportError, match=hint):
        ds_hylo.initialize(model=tiny_model(), config=ds_config())
    with pytest.raises(ImportError, match=hint):
        importlib.import_module("ds_hylo.deepspeed")
    with pytest.raises(ImportError, match=hint):
        importlib.import_module("ds_hylo.accelerate")


# ------------------------------------------------------------------ declared ranges
@pytest.mark.parametrize("package", ["deepspeed", "accelerate", "transformers"])
def test_installed_extra_is_within_the_declared_range(package):
    """pyproject declares only the versions tested: the installed one (which these tests run) must fit,
    so a venv upgraded past the range fails here until the range is widened on purpose."""
    tomllib = pytest.importorskip("tomllib")
    requirements = pytest.importorskip("packaging.requirements")
    from importlib.metadata import PackageNotFoundError, version
    from pathlib import Path

    try:
        installed = version(package)
    except PackageNotFoundError:
        pytest.skip(f"{package} is not installed")
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    declared = [requirements.Requirement(r) for r in pyproject["project"]["optional-dependencies"]["deepspeed"]]
    (requirement,) = [r for r in declared if r.name == package]
    assert requirement.specifier.contains(installed), f"{package} {installed} is outside {requirement}"
    assert "<" in str(requirement.specifier), f"{requirement} has no upper bound: untested versions are declared"
