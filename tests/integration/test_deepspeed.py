"""Distributed HyLo: 2 real gloo CPU ranks against one process, DeepSpeed ZeRO-0/1, DDP, checkpoints.

Every spawned session runs many cases, since starting ranks is the expensive part.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("deepspeed")

from distributed import run_distributed  # noqa: E402
from ds_workers import (  # noqa: E402
    checkpoint_faults,
    checkpoint_run,
    deepspeed_suite,
    ds_config,
    initialize_logs,
    sampled_fisher_from_derived_tensor,
    sampled_fisher_suite,
    skipped_step_run,
    torch_distributed_suite,
    train_reference,
    train_sampled_fisher,
)

import ds_hylo  # noqa: E402
from ds_hylo.deepspeed import check_supported, split_hylo_config  # noqa: E402

STEPS = 4
MODES = ("sngd", "kis", "kid")


def exact_params(mode: str) -> dict:
    return {"lr": 0.5, "mode": mode, "rank_ratio": 1.0, "update_freq": 2, "damping": 0.1, "base": "sgd", "momentum": 0.9}


# Adam-class updates on the preconditioned gradient (base) and grafting, at rank_ratio 1 (exact).
BASE_PARAMS = {
    "adamw": {"lr": 0.01, "mode": "kis", "rank_ratio": 1.0, "update_freq": 2, "damping": 0.1, "base": "adamw",
              "weight_decay": 0.01},
    "graft": {**exact_params("kid"), "lr": 0.01, "graft": "adamw"},
}


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def references() -> dict[str, list]:
    return {mode: train_reference(exact_params(mode), STEPS) for mode in MODES}


@pytest.fixture(scope="module")
def fp32_results() -> list[dict]:
    cases = {
        f"{mode}-z{stage}-gas{gas}": ds_config(exact_params(mode), stage=stage, gas=gas)
        for mode in MODES
        for stage in (0, 1)
        for gas in (1, 2)
    }
    cases["sgd-control"] = ds_config({**exact_params("sngd"), "damping": 1e6, "step_scale": "sgd"}, stage=1)
    for base, params in BASE_PARAMS.items():
        for gas in (1, 2):
            cases[f"{base}-z1-gas{gas}"] = ds_config(params, stage=1, gas=gas)
    for mode in DELAYED_MODES:
        for gas in (1, 2):
            cases[f"{mode}-z1-gas{gas}-delayed"] = ds_config(delayed_params(mode), stage=1, gas=gas)
    return run_distributed(deepspeed_suite, cases, STEPS)


DELAYED_MODES = ("kis", "kid")


def delayed_params(mode: str) -> dict:
    return {**exact_params(mode), "delayed_refresh": True}


@pytest.mark.parametrize("mode", DELAYED_MODES)
@pytest.mark.parametrize("gas", (1, 2))
def test_delayed_refresh_two_ranks_equal_single_process(fp32_results, references, mode, gas):
    """delayed_refresh (a refresh's factors used from the next step on): ZeRO-1 on 2 ranks equals the
    standalone optimizer with the same option at every step, and differs from the immediate refresh."""
    reference = train_reference(delayed_params(mode), STEPS)
    name = f"{mode}-z1-gas{gas}-delayed"
    for rank_result in fp32_results:
        for step, (got, want) in enumerate(zip(rank_result[name]["params"], reference)):
            assert max_diff(got, want) < 2e-5, f"{name} rank differs from single process at step {step}"
    assert fp32_results[0][name]["stats"]["refreshes"] == STEPS // 2
    assert max_diff(reference[-1], references[mode][-1]) > 1e-3


@pytest.mark.parametrize("base", sorted(BASE_PARAMS))
@pytest.mark.parametrize("gas", (1, 2))
def test_adamw_base_and_grafting_under_zero1_equal_single_process(fp32_results, base, gas):
    """base="adamw" (AdamW on ZeRO-1's flat partitions) and graft="adamw" (per-layer Adam lengths from
    all-reduced moments): 2 ranks, with and without accumulation, equal one process at every step."""
    reference = train_reference(BASE_PARAMS[base], STEPS)
    name = f"{base}-z1-gas{gas}"
    for rank_result in fp32_results:
        for step, (got, want) in enumerate(zip(rank_result[name]["params"], reference)):
            assert max_diff(got, want) < 2e-5, f"{name} rank differs from single process at step {step}"
        assert max_diff(rank_result[name]["params"][-1], fp32_results[0]["sgd-control"]["params"][-1]) > 1e-3


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stage", (0, 1))
@pytest.mark.parametrize("gas", (1, 2))
def test_deepspeed_two_ranks_equal_single_process(fp32_results, references, mode, stage, gas):
    """At rank_ratio=1, ZeRO-0/1 on 2 ranks (with and without accumulation) equals one process, every step."""
    name = f"{mode}-z{stage}-gas{gas}"
    for rank_result in fp32_results:
        for step, (got, want) in enumerate(zip(rank_result[name]["params"], references[mode])):
            assert max_diff(got, want) < 2e-5, f"{name} rank differs from single process at step {step}"
    assert fp32_results[0][name]["stats"]["refreshes"] == STEPS // 2


def test_control_run_differs(fp32_results, references):
    """Guard: a run that is effectively SGD does not match the preconditioned reference."""
    assert max_diff(fp32_results[0]["sgd-control"]["params"][-1], references["sngd"][-1]) > 1e-3


def test_torch_distributed_and_ddp_equal_single_process(references):
    results = run_distributed(torch_distributed_suite, {m: exact_params(m) for m in MODES}, STEPS)
    for rank_result in results:
        for mode in MODES:
            for use_ddp in (False, True):
                got = rank_result[(mode, use_ddp)]
                for step in range(STEPS):
                    assert max_diff(got[step], references[mode][step]) < 2e-5, (mode, use_ddp, step)


@pytest.fixture(scope="module")
def mixed_results() -> list[dict]:
    low_rank = {"lr": 0.2, "rank_ratio": 0.25, "update_freq": 2, "damping": 0.1, "base": "sgd", "momentum": 0.9}
    cases = {
        "bf16-z1": ds_config(exact_params("kid"), stage=1, precision="bf16"),
        "bf16-z0": ds_config(exact_params("kis"), stage=0, precision="bf16"),
        "kis-low-rank": ds_config({**low_rank, "mode": "kis"}, stage=1),
        "kid-low-rank": ds_config({**low_rank, "mode": "kid"}, stage=1),
    }
    return run_distributed(deepspeed_suite, cases, 8)


@pytest.mark.parametrize("name,mode", [("bf16-z1", "kid"), ("bf16-z0", "kis")])
def test_bf16_close_to_fp32_single_process(mixed_results, name, mode):
    reference = train_reference(exact_params(mode), 8)
    for rank_result in mixed_results:
        got = rank_result[name]["params"][-1]
        want = reference[-1]
        scale = max(float(w.abs().max()) for w in want)
        assert max_diff(got, want) < 0.03 * scale, name


@pytest.mark.parametrize("name", ["kis-low-rank", "kid-low-rank"])
def test_low_rank_ranks_agree_and_loss_falls(mixed_results, name):
    rank0, rank1 = (r[name] for r in mixed_results)
    for step, (a, b) in enumerate(zip(rank0["params"], rank1["params"])):
        assert max_diff(a, b) == 0.0, f"ranks diverged at step {step}"
    losses = [(l0 + l1) / 2 for l0, l1 in zip(rank0["losses"], rank1["losses"])]
    assert sum(losses[-2:]) < sum(losses[:2]), losses


def test_skipped_step_leaves_hylo_state_untouched():
    """A non-finite loss makes ZeRO-1 skip the step (bf16 with bf16 gradients checks overflow, as
    fp16 does); HyLo's state must not move, and training continues exactly as if the bad step had
    never happened."""
    config = ds_config({"lr": 0.2, "mode": "kis", "rank_ratio": 0.5, "update_freq": 2, "damping": 0.1}, stage=1,
                       precision="bf16-grads")
    for clean, injected in run_distributed(_skip_pair, config):
        before, after = injected["before"], injected["after"]
        assert clean["skipped"] == 0 and injected["skipped"] == 1
        assert before["steps"] == after["steps"]
        assert before["refreshes"] == after["refreshes"]
        for name, tensors in before["factors"].items():
            assert all(torch.equal(x, y) for x, y in zip(tensors, after["factors"][name]))
        assert max_diff(injected["params"], clean["params"]) == 0.0


def _skip_pair(config):
    return skipped_step_run(config, 5, bad_step=-1), skipped_step_run(config, 5, bad_step=2)


def test_fp16_overflow(tmp_path):
    from deepspeed.accelerator import get_accelerator

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not get_accelerator().is_fp16_supported():
        pytest.skip(f"DeepSpeed's {get_accelerator().device_name()} accelerator does not support fp16")
    config = ds_config({"lr": 0.2, "mode": "kis", "rank_ratio": 0.5, "update_freq": 2, "damping": 0.1},
                       stage=1, precision="fp16")
    for clean, injected in run_distributed(_skip_pair, config):
        assert injected["skipped"] >= 1
        assert injected["before"]["steps"] == injected["after"]["steps"]


def test_zero1_checkpoint_resume(tmp_path):
    config = ds_config({"lr": 0.2, "mode": "kis", "rank_ratio": 0.5, "update_freq": 2, "damping": 0.1,
                        "base": "sgd", "momentum": 0.9}, stage=1)
    results = run_distributed(checkpoint_run, config, 6, 3, str(tmp_path))
    for rank_result in results:
        assert max_diff(rank_result["uninterrupted"], rank_result["resumed"]) == 0.0
    for rank in range(2):
        state = torch.load(tmp_path / "ckpt" / f"hylo_state_rank{rank:05d}.pt", weights_only=True)
        assert state["hylo"]["steps"] == 3 and state["global_steps"] == 3 and state["tag"] == "ckpt"


# ------------------------------------------------------------------ checkpoint faults (one rank)
FAULT_STEPS = 2


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> dict:
    config = ds_config({"lr": 0.2, "mode": "kis", "rank_ratio": 0.5, "update_freq": 2, "damping": 0.1,
                        "base": "sgd", "momentum": 0.9}, stage=1, world=1)
    (result,) = run_distributed(checkpoint_faults, config, FAULT_STEPS, str(tmp_path_factory.mktemp("faults")),
                                world_size=1)
    return result


def test_checkpoint_file_records_global_step_and_tag(faults):
    assert faults["saved"] == {"format": 1, "global_steps": 2 * FAULT_STEPS, "tag": "b"}
    assert faults["saved_hylo_steps"] == 2 * FAULT_STEPS
    assert faults["temporary_files"] == [], "a temporary HyLo state file was left behind"


def test_clean_checkpoint_still_loads(faults):
    assert faults["loads"]["b"] == ""
    assert faults["after_clean_load"] == {"global_steps": 2 * FAULT_STEPS, "hylo_steps": 2 * FAULT_STEPS}


@pytest.mark.parametrize("case,hylo_step,engine_step", [("hylo_behind", FAULT_STEPS, 2 * FAULT_STEPS),
                                                        ("hylo_ahead", 2 * FAULT_STEPS, FAULT_STEPS)])
def test_mixed_step_checkpoint_is_refused_naming_both_steps(faults, case, hylo_step, engine_step):
    """A re-used tag whose save crashed half-way: HyLo's file and DeepSpeed's are from different steps."""
    message = faults["loads"][case]
    assert message.startswith("CheckpointError"), message
    assert faults["files"][case] in message, message
    assert f"HyLo's state at DeepSpeed global step {hylo_step}" in message, message
    assert f"are at global step {engine_step}" in message, message


@pytest.mark.parametrize("case", ["empty", "truncated", "garbage", "legacy"])
def test_damaged_state_file_error_names_the_file(faults, case):
    message = faults["loads"][case]
    assert message.startswith("CheckpointError"), message
    assert faults["files"][case] in message, message
    assert "weights_only=False" not in message and "Errno" not in message, message


def test_missing_state_file_is_named(faults):
    message = faults["loads"]["missing"]
    assert message.startswith("FileNotFoundError") and faults["files"]["missing"] in message, message


def test_crash_while_hylo_writes_leaves_latest_on_the_previous_tag(faults):
    """HyLo's file is written before DeepSpeed's save, which moves `latest` last: a crash in between
    leaves `latest` on a tag that loads."""
    assert faults["crash"] == "simulated crash while HyLo writes its state"
    assert faults["latest_after_crash"] == "b"
    assert faults["loads"]["latest_after_crash"] == ""
    assert faults["temporary_files_after_crash"] == []


def test_atomic_save_failure_keeps_the_old_file(tmp_path):
    """A save that fails half-way leaves the previous file intact and no temporary file."""
    from ds_hylo.deepspeed import _atomic_save

    path = tmp_path / "state.pt"
    _atomic_save({"x": torch.ones(3)}, path)
    with pytest.raises(Exception):
        _atomic_save({"x": torch.zeros(3), "bad": lambda: 0}, path)  # a lambda cannot be pickled
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_untested_optimizer_warning_filtered_and_hylo_announced():
    config = ds_config({"lr": 0.2, "mode": "kid", "update_freq": 2, "damping": 0.1}, stage=1, world=1)
    (logs,) = run_distributed(initialize_logs, config, world_size=1)
    assert any("untested optimizer" in m for m in logs["control"]), logs["control"]  # the capture works
    assert not any("untested optimizer" in m for m in logs["deepspeed"]), logs["deepspeed"]
    assert not logs["filters_left"], "the filter stayed on DeepSpeed's logger after initialize"
    announced = [m for m in logs["ds_hylo"] if "HyLo (mode=kid)" in m and "ZeRO stage 1" in m]
    assert len(announced) == 1, logs["ds_hylo"]


# ------------------------------------------------------------------ config handling (no ranks)
def base_config(**zero) -> dict:
    return {"train_batch_size": 8, "optimizer": {"type": "HyLo", "params": {"mode": "kid"}},
            "zero_optimization": {"stage": 1, **zero}}


@pytest.mark.parametrize(
    "zero,key",
    [
        ({"stage": 4}, "zero_optimization.stage"),
        ({"overlap_comm": True}, "zero_optimization.overlap_comm"),
        ({"offload_optimizer": {"device": "cpu"}}, "zero_optimization.offload_optimizer.device"),
        ({"offload_param": {"device": "nvme"}}, "zero_optimization.offload_param.device"),
    ],
)
def test_refused_configurations(zero, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        ds_hylo.initialize(model=torch.nn.Linear(2, 2), config=base_config(**zero))


def test_bad_params_key_is_named():
    config = base_config()
    config["optimizer"]["params"]["rank_ration"] = 0.1
    with pytest.raises(ValueError, match="rank_ration"):
        ds_hylo.initialize(model=torch.nn.Linear(2, 2), config=config)


def test_bad_params_value_is_named():
    config = base_config()
    config["optimizer"]["params"]["mode"] = "kfac"
    with pytest.raises(ValueError, match="mode"):
        ds_hylo.initialize(model=torch.nn.Linear(2, 2), config=config)


def test_client_optimizer_and_hylo_section_refused():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="client optimizer"):
        ds_hylo.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=base_config())


def test_split_removes_section_and_allows_untested_optimizer(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(base_config()))
    ds_config_out, params = split_hylo_config(ds_hylo.deepspeed.load_config(path))
    assert "optimizer" not in ds_config_out
    assert ds_config_out["zero_allow_untested_optimizer"] is True
    assert params == {"mode": "kid"}
    check_supported(ds_config_out)


def test_shipped_configs_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[2] / "configs" / "deepspeed").glob("*.json"))
    assert configs, "no shipped DeepSpeed configs"
    for path in configs:
        config = json.loads(path.read_text())
        assert "gradient_clipping" in config, f"{path.name} must set gradient_clipping explicitly"
        ds_config_out, params = split_hylo_config(config)
        ds_hylo.HyLoConfig.from_dict(params, where=path.name)


def test_auto_values_refused_by_initialize():
    config = base_config()
    config["train_micro_batch_size_per_gpu"] = "auto"
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu"):
        ds_hylo.initialize(model=torch.nn.Linear(2, 2), config=config)


def test_non_integer_stage_refused():
    with pytest.raises(ValueError, match="zero_optimization.stage"):
        check_supported({"zero_optimization": {"stage": "auto"}})


def test_sampled_fisher_two_ranks_equal_single_process():
    """fisher="sampled" under ZeRO-1 (with and without accumulation): each rank's sampled-label
    rows are gathered like captured ones and the step equals one process's (labels drawn by a
    deterministic stand-in, since the ranks' samplers are seeded differently)."""
    params = {**exact_params("sngd"), "fisher": "sampled"}
    cases = {f"z1-gas{gas}": ds_config(params, stage=1, gas=gas) for gas in (1, 2)}
    reference = train_sampled_fisher(params, STEPS)
    empirical = train_reference(exact_params("sngd"), STEPS)
    assert max_diff(reference[-1], empirical[-1]) > 1e-3, "sampled and empirical runs coincide: no coverage"
    for rank_result in run_distributed(sampled_fisher_suite, cases, params, STEPS):
        for name, got in rank_result.items():
            for step in range(STEPS):
                assert max_diff(got[step], reference[step]) < 2e-5, (name, step)


def test_sampled_fisher_from_a_derived_tensor_is_refused():
    """A tensor computed from the engine's output would set off DeepSpeed's backward: a clear error."""
    config = ds_config({**exact_params("sngd"), "fisher": "sampled"}, stage=1)
    for message in run_distributed(sampled_fisher_from_derived_tensor, config):
        assert "engine's output tensor itself" in message, message
