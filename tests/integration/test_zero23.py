"""HyLo under DeepSpeed ZeRO-2 and ZeRO-3 on 2 real gloo CPU ranks against one process
(docs/design.md section 3.5).

ZeRO-2/3 reduce each parameter's gradient in a backward hook, bucket by bucket; HyLo preconditions a
layer there (``ds_hylo.distributors.InGradientHooks``) with the committed factors, so the run equals
the standalone optimizer with ``delayed_refresh=True``, which ZeRO-2/3 resolve the default (null) to.
One spawn runs every case: starting ranks is the expensive part.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")

from distributed import run_distributed  # noqa: E402
from ds_workers import ds_config, partitioned_suite, train_checkpointed, train_reference  # noqa: E402

import ds_hylo  # noqa: E402
from ds_hylo.config import ConfigError  # noqa: E402

STEPS = 4
MODES = ("kis", "kid")
STAGES = (2, 3)


def default_params(mode: str) -> dict:
    """The package's defaults but rank_ratio 1 (exact) and a refresh every 2 steps; delayed_refresh left
    out (null: true under ZeRO-2/3)."""
    return {"mode": mode, "rank_ratio": 1.0, "update_freq": 2}


def sgd_params(mode: str) -> dict:
    """The paper's step (momentum SGD on the natural gradient): its differences are not hidden by Adam's
    normalisation."""
    return {"lr": 0.5, "mode": mode, "rank_ratio": 1.0, "update_freq": 2, "damping": 0.1, "base": "sgd",
            "momentum": 0.9}


PARAMS = {"defaults": default_params, "sgd": sgd_params}


def delayed(params: dict) -> dict:
    return {**params, "delayed_refresh": True}


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


def relative_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-12)) for x, y in zip(a, b))


def with_zero(config: dict, **zero) -> dict:
    config["zero_optimization"].update(zero)
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict]:
    cases, checkpoints, skips = {}, {}, {}
    for stage in STAGES:
        for mode in MODES:
            for gas in (1, 2):
                for kind, params in PARAMS.items():
                    cases[f"z{stage}-{kind}-{mode}-gas{gas}"] = ds_config(params(mode), stage=stage, gas=gas)
            overlap = not (stage == 3)  # ZeRO-3's default is overlap_comm=true: run it off there
            cases[f"z{stage}-sgd-{mode}-gas2-overlap{overlap}"] = with_zero(
                ds_config(sgd_params(mode), stage=stage, gas=2), overlap_comm=overlap)
        cases[f"z{stage}-control"] = ds_config({**sgd_params("kis"), "damping": 1e6}, stage=stage)
        cases[f"z{stage}-hybrid"] = ds_config({**default_params("hybrid"), "switch_window": 2}, stage=stage)
        cases[f"z{stage}-bf16"] = ds_config(sgd_params("kid"), stage=stage, precision="bf16-grads")
        checkpoints[f"z{stage}-checkpoint"] = ds_config({"lr": 0.01, "mode": "kis", "rank_ratio": 0.5,
                                                         "update_freq": 2}, stage=stage)
        skips[f"z{stage}-skip"] = ds_config({"lr": 0.2, "mode": "kis", "rank_ratio": 0.5, "update_freq": 2,
                                             "damping": 0.1, "base": "sgd"}, stage=stage, precision="bf16-grads")
    cases["z2-sgd-kis-gas1-no-contiguous"] = with_zero(ds_config(sgd_params("kis"), stage=2),
                                                       contiguous_gradients=False)
    cases["z2-bf16-fp32-accumulation"] = ds_config(sgd_params("kis"), stage=2, gas=2, precision="bf16-grads")
    cases["z2-bf16-fp32-accumulation"]["data_types"] = {"grad_accum_dtype": "fp32"}
    cases["z3-sgd-kid-gas1-zero-init"] = ds_config(sgd_params("kid"), stage=3)  # model built in zero.Init
    cases["z2-sgd-kis-gas2-offload"] = with_zero(ds_config(sgd_params("kis"), stage=2, gas=2),
                                                 offload_optimizer={"device": "cpu"})
    cases["z3-sgd-kid-gas1-offload"] = with_zero(ds_config(sgd_params("kid"), stage=3),
                                                 offload_optimizer={"device": "cpu"}, offload_param={"device": "cpu"})
    checkpointed = {f"z{stage}-activation-checkpointing-reentrant{reentrant}":
                    (ds_config(sgd_params("kis"), stage=stage), reentrant) for stage in STAGES for reentrant in (False, True)}
    ckpt_dir = tmp_path_factory.mktemp("zero23-ckpt")
    return run_distributed(partitioned_suite, cases, STEPS, checkpoints, skips, str(ckpt_dir), checkpointed)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gas", (1, 2))
@pytest.mark.parametrize("kind", sorted(PARAMS))
def test_partitioned_stage_equals_single_process_with_delayed_refresh(runs, stage, mode, gas, kind):
    """2 ranks, ZeRO-2/3 (with and without accumulation): the parameters of standalone
    ``HyLo(model, **same_params, delayed_refresh=True)`` on the same global batches, at every step."""
    reference = train_reference(delayed(PARAMS[kind](mode)), STEPS)
    name = f"z{stage}-{kind}-{mode}-gas{gas}"
    for rank_result in runs:
        for step, (got, want) in enumerate(zip(rank_result[name]["params"], reference)):
            assert relative_diff(got, want) <= 1e-4, f"{name}: rank differs from one process at step {step}"
        assert rank_result[name]["stats"]["refreshes"] == STEPS // 2


@pytest.mark.parametrize("name,mode", [
    ("z2-sgd-kis-gas2-overlapTrue", "kis"), ("z2-sgd-kid-gas2-overlapTrue", "kid"),
    ("z3-sgd-kis-gas2-overlapFalse", "kis"), ("z3-sgd-kid-gas2-overlapFalse", "kid"),
    ("z2-sgd-kis-gas1-no-contiguous", "kis"), ("z3-sgd-kid-gas1-zero-init", "kid"),
    ("z2-sgd-kis-gas2-offload", "kis"), ("z3-sgd-kid-gas1-offload", "kid"),
])
def test_bucket_settings_zero_init_and_offload_equal_single_process(runs, name, mode):
    """overlap_comm on (ZeRO-2) and off (ZeRO-3, whose default is on), contiguous_gradients off, a
    ZeRO-3 model built inside deepspeed.zero.Init (partitioned before HyLo sees it), and optimizer
    (and, at stage 3, parameter) offload to the CPU: HyLo preconditions in the hook, before the copy."""
    reference = train_reference(delayed(sgd_params(mode)), STEPS)
    for rank_result in runs:
        for step, (got, want) in enumerate(zip(rank_result[name]["params"], reference)):
            assert relative_diff(got, want) <= 1e-4, f"{name} differs from one process at step {step}"


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("reentrant", (False, True))
def test_activation_checkpointing_equals_single_process(runs, stage, reentrant):
    """Gradient checkpointing, as LLM fine-tuning runs it: the recomputed forward captures no second set
    of rows, and with reentrant checkpointing DeepSpeed's hooks fire in a second phase; the layers are
    still preconditioned once each, equal to one process."""
    reference = train_checkpointed(ds_config(sgd_params("kis"), stage=stage), STEPS, reentrant)  # no ranks here
    for rank_result in runs:
        got = rank_result[f"z{stage}-activation-checkpointing-reentrant{reentrant}"]
        for step, (a, b) in enumerate(zip(got, reference)):
            assert relative_diff(a, b) <= 1e-4, f"stage {stage}, reentrant={reentrant}: step {step}"


@pytest.mark.parametrize("stage", STAGES)
def test_partitioned_stage_preconditions(runs, stage):
    """The comparisons above are not with plain SGD: damping 1e6 (the gradient, in effect) lands elsewhere,
    and the immediate refresh differs from the delayed one."""
    for rank_result in runs:
        assert max_diff(rank_result[f"z{stage}-sgd-kis-gas1"]["params"][-1],
                        rank_result[f"z{stage}-control"]["params"][-1]) > 1e-3
    immediate = train_reference(sgd_params("kis"), STEPS)
    assert max_diff(runs[0][f"z{stage}-sgd-kis-gas1"]["params"][-1], immediate[-1]) > 1e-3


@pytest.mark.parametrize("stage", STAGES)
def test_hybrid_and_bf16_train(runs, stage):
    names = [f"z{stage}-hybrid", f"z{stage}-bf16"] + (["z2-bf16-fp32-accumulation"] if stage == 2 else [])
    for name in names:
        rank0, rank1 = (r[name] for r in runs)
        for step, (a, b) in enumerate(zip(rank0["params"], rank1["params"])):
            assert max_diff(a, b) == 0.0, f"{name}: ranks diverged at step {step}"
        assert all(torch.isfinite(p).all() for p in rank0["params"][-1]), name
    checks = [(f"z{stage}-bf16", "kid")] + ([("z2-bf16-fp32-accumulation", "kis")] if stage == 2 else [])
    for name, mode in checks:
        want = train_reference(delayed(sgd_params(mode)), STEPS)[-1]
        scale = max(float(w.abs().max()) for w in want)
        assert max_diff(runs[0][name]["params"][-1], want) < 0.03 * scale, name


@pytest.mark.parametrize("stage", STAGES)
def test_checkpoint_resume_is_exact(runs, stage):
    for rank_result in runs:
        run = rank_result[f"z{stage}-checkpoint"]
        assert max_diff(run["uninterrupted"], run["resumed"]) == 0.0


@pytest.mark.parametrize("stage", STAGES)
def test_skipped_step_leaves_hylo_state_untouched(runs, stage):
    for rank_result in runs:
        clean, injected = rank_result[f"z{stage}-skip"]
        assert clean["skipped"] == 0 and injected["skipped"] == 1
        before, after = injected["before"], injected["after"]
        assert before["steps"] == after["steps"] and before["refreshes"] == after["refreshes"]
        assert max_diff(injected["params"], clean["params"]) == 0.0


# ------------------------------------------------------------------ refusals (no ranks)
def partitioned_config(stage: int, **params) -> dict:
    return {"train_batch_size": 8, "optimizer": {"type": "HyLo", "params": {"mode": "kid", **params}},
            "zero_optimization": {"stage": stage}}


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("params,key", [
    ({"delayed_refresh": False}, "delayed_refresh=false"),
    ({"kl_clip": 0.001}, "kl_clip=0.001"),
    ({"graft": "adamw", "base": "sgd"}, "graft='adamw'"),
])
def test_partitioned_stages_refuse_options_they_cannot_honour(stage, params, key):
    with pytest.raises(ConfigError, match=key):
        ds_hylo.initialize(model=torch.nn.Linear(2, 2), config=partitioned_config(stage, **params))
