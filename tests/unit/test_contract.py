"""ds_hylo.contract: the DeepSpeed / Accelerate / transformers internals ds_hylo relies on are checked
where it attaches, and a missing one is named with the supported and the installed version."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ds_hylo import HyLo, contract


@pytest.fixture(autouse=True)
def _fresh_checks(monkeypatch):
    """Each test starts with nothing checked (the checks are cached per process)."""
    monkeypatch.setattr(contract, "_checked", set())


@pytest.mark.parametrize("package", sorted(contract.SUPPORTED))
def test_every_internal_is_there_in_the_installed_version(package):
    pytest.importorskip(package)
    problems = {f"{e.owner} -> {e.attribute}": contract._problem(e) for e in contract.INTERNALS if e.package == package}
    assert problems and not any(problems.values()), {k: v for k, v in problems.items() if v}
    contract.check(package)


def test_supported_ranges_are_pyprojects():
    tomllib = pytest.importorskip("tomllib")
    requirements = pytest.importorskip("packaging.requirements")
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    declared = {r.name: r.specifier for r in map(requirements.Requirement,
                                                 pyproject["project"]["optional-dependencies"]["deepspeed"])}
    assert {name: str(spec) for name, spec in declared.items()} == {
        name: str(requirements.Requirement(name + spec).specifier) for name, spec in contract.SUPPORTED.items()}


def _deepspeed_engine_class():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.engine import DeepSpeedEngine

    return DeepSpeedEngine


@pytest.mark.parametrize("attribute", ["_backward_prologue", "allreduce_gradients", "save_checkpoint"])
def test_a_removed_deepspeed_internal_is_named_with_versions(monkeypatch, attribute):
    import deepspeed

    monkeypatch.delattr(_deepspeed_engine_class(), attribute)
    with pytest.raises(contract.ContractError) as info:
        contract.check("deepspeed")
    message = str(info.value)
    assert f"deepspeed.runtime.engine.DeepSpeedEngine -> {attribute!r} (callable)" in message, message
    assert f"DeepSpeedEngine.{attribute} is missing" in message, message
    assert "ds_hylo supports deepspeed>=0.19.8,<0.20" in message and f"deepspeed {deepspeed.__version__}" in message


def test_a_changed_kind_is_named(monkeypatch):
    """cur_scale must stay a property of ZeRO-1's optimizer (HyLo reads the fp16 loss scale there)."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    monkeypatch.setattr(DeepSpeedZeroOptimizer, "cur_scale", 1.0)
    with pytest.raises(contract.ContractError, match=r"DeepSpeedZeroOptimizer.cur_scale is a float, not a property"):
        contract.check("deepspeed")


def test_a_removed_logger_text_is_named(monkeypatch):
    """The 'untested optimizer' warning ds_hylo filters: if DeepSpeed rewords it, the filter is dead."""
    engine_class = _deepspeed_engine_class()

    def _do_optimizer_sanity_check(self, basic_optimizer):  # a rewritten check without the warning
        return None

    monkeypatch.setattr(engine_class, "_do_optimizer_sanity_check", _do_optimizer_sanity_check)
    with pytest.raises(contract.ContractError, match="no longer contains 'You are using ZeRO with an untested"):
        contract.check("deepspeed")


def test_attach_refuses_an_engine_whose_internals_are_gone(monkeypatch):
    """The check runs where ds_hylo hooks into the engine, before anything is rebound."""
    from ds_hylo.deepspeed import attach

    monkeypatch.delattr(_deepspeed_engine_class(), "_backward_prologue")
    model = torch.nn.Linear(3, 2)
    original = lambda *a, **k: None  # noqa: E731
    engine = SimpleNamespace(zero_optimization_stage=lambda: 1, enable_backward_allreduce=True,
                             allreduce_gradients=original)
    with pytest.raises(contract.ContractError, match="_backward_prologue"):
        attach(engine, HyLo(model, weight_decay=0.0))
    assert engine.allreduce_gradients is original


def test_a_removed_trainer_internal_is_named(monkeypatch):
    transformers = pytest.importorskip("transformers")
    from transformers import Trainer

    monkeypatch.delattr(Trainer, "get_decay_parameter_names")
    with pytest.raises(contract.ContractError) as info:
        contract.check("transformers")
    message = str(info.value)
    assert "transformers.trainer.Trainer -> 'get_decay_parameter_names'" in message, message
    assert f"installed: transformers {transformers.__version__}" in message and ">=5.24,<5.25" in message


def test_a_removed_accelerate_field_is_named(monkeypatch):
    pytest.importorskip("accelerate")
    import dataclasses

    from accelerate.utils import DeepSpeedPlugin

    fields = {k: v for k, v in DeepSpeedPlugin.__dataclass_fields__.items() if k != "hf_ds_config"}
    monkeypatch.setattr(DeepSpeedPlugin, "__dataclass_fields__", fields)
    assert "hf_ds_config" not in {f.name for f in dataclasses.fields(DeepSpeedPlugin)}
    with pytest.raises(contract.ContractError, match=r"DeepSpeedPlugin.hf_ds_config is not a dataclass field"):
        contract.check("accelerate")


def test_checks_run_once_per_process(monkeypatch):
    pytest.importorskip("deepspeed")
    contract.check("deepspeed")
    monkeypatch.delattr(_deepspeed_engine_class(), "_backward_prologue")
    contract.check("deepspeed")  # cached: the installed versions do not change within a process
    with pytest.raises(contract.ContractError):
        contract.check("deepspeed", force=True)


def test_internal_entries_are_well_formed():
    with pytest.raises(ValueError, match="kind"):
        contract.Internal("deepspeed", "deepspeed", "initialize", "method", "x")
    with pytest.raises(ValueError, match="package"):
        contract.Internal("torch", "torch", "nn", "attribute", "x")
    with pytest.raises(ValueError, match="package"):
        contract.check("torch")
