"""Ranks that disagree (issue 10): every rank joins each refresh, layers refresh from the rows
that exist, and the ranks end with identical parameters and factors; results never depend on
``torch.set_default_device``. Each test is one 2-rank spawn running all its cases."""

from __future__ import annotations

import pytest
import torch

from disagreement_workers import ddp_suite, deepspeed_suite, default_device_suite
from distributed import run_distributed

pytestmark = pytest.mark.slow


def _assert_ranks_agree(first: dict, second: dict) -> None:
    assert first["refreshes"] == second["refreshes"] > 0
    for name, p in first["params"].items():
        assert torch.isfinite(p).all(), name
        assert torch.equal(p, second["params"][name]), f"ranks differ in {name}"
    assert set(first["factors"]) == set(second["factors"])
    for name, tensors in first["factors"].items():
        for got, want in zip(tensors, second["factors"][name]):
            assert torch.equal(got, want), f"ranks hold different factors for {name}"


def test_ddp_ranks_that_disagree():
    """A layer unused on rank 1 ("branch"), an empty batch on rank 1 at a refresh ("empty"), and
    one contributing rank per refresh ("rotation": the ranks take turns)."""
    cases = [(scenario, mode) for scenario in ("branch", "empty", "rotation") for mode in ("kis", "kid")]
    rank0, rank1 = run_distributed(ddp_suite, cases)
    for case in cases:
        _assert_ranks_agree(rank0[case], rank1[case])
        assert "branch" in rank0[case]["factors"], case  # refreshed from the rows that exist
    for mode in ("kis", "kid"):
        case = ("rotation", mode)
        assert rank0[case]["refreshes"] == 4
        assert rank0[case]["contributed"] == rank1[case]["contributed"] == 2, case


def test_deepspeed_zero1_rank_with_empty_batch():
    """An empty local batch at a refresh step under ds_hylo.initialize (ZeRO-1).

    (A layer unused on one rank is not tested under DeepSpeed: ZeRO-1's own bucketed reduction
    fails on it with torch.optim.SGD too: `train_deepspeed("branch", ..., optimizer="SGD")`.)
    """
    rank0, rank1 = run_distributed(deepspeed_suite, ["kis", "kid"])
    for mode in ("kis", "kid"):
        _assert_ranks_agree(rank0[mode], rank1[mode])
        assert "branch" in rank0[mode]["factors"]


def test_default_device_does_not_change_results():
    """'meta' as the default device: any tensor the package made without a device would fail."""
    modes = ["kis", "kid", "hybrid"]
    rank0, rank1 = run_distributed(default_device_suite, modes)
    for mode in modes:
        _assert_ranks_agree(rank0[(mode, "meta")], rank1[(mode, "meta")])
        for name, p in rank0[(mode, None)]["params"].items():
            assert torch.equal(p, rank0[(mode, "meta")]["params"][name]), (mode, name)
