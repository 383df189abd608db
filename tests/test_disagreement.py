"""Ranks that disagree (issue 10): every rank joins each refresh, layers refresh from the rows
that exist, and the ranks end with identical parameters and factors; results never depend on
``torch.set_default_device``."""

from __future__ import annotations

import pytest
import torch

from disagreement_workers import train_ddp, train_default_device, train_deepspeed
from distributed import run_distributed

pytestmark = pytest.mark.slow


def _assert_ranks_agree(results: list[dict]) -> None:
    first, second = results
    assert first["refreshes"] == second["refreshes"] > 0
    for name, p in first["params"].items():
        assert torch.isfinite(p).all(), name
        assert torch.equal(p, second["params"][name]), f"ranks differ in {name}"
    assert set(first["factors"]) == set(second["factors"])
    for name, tensors in first["factors"].items():
        for got, want in zip(tensors, second["factors"][name]):
            assert torch.equal(got, want), f"ranks hold different factors for {name}"


@pytest.mark.parametrize("scenario", ["branch", "empty"])
@pytest.mark.parametrize("mode", ["kis", "kid"])
def test_ddp_ranks_that_disagree(scenario, mode):
    results = run_distributed(train_ddp, scenario, mode)
    _assert_ranks_agree(results)
    # the branch is preconditioned from rank 0's rows alone
    assert "branch" in results[0]["factors"]


@pytest.mark.parametrize("mode", ["kis", "kid"])
def test_deepspeed_zero1_rank_with_empty_batch(mode):
    """An empty local batch at a refresh step under ds_hylo.initialize (ZeRO-1).

    (A layer unused on one rank is not tested under DeepSpeed: ZeRO-1's own bucketed reduction
    fails on it with torch.optim.SGD too: `train_deepspeed("branch", ..., optimizer="SGD")`.)
    """
    results = run_distributed(train_deepspeed, "empty", mode)
    _assert_ranks_agree(results)
    assert "branch" in results[0]["factors"]


@pytest.mark.parametrize("mode", ["kis", "kid", "hybrid"])
def test_default_device_does_not_change_results(mode):
    """'meta' as the default device: any tensor the package made without a device would fail."""
    normal = run_distributed(train_default_device, mode, None)
    meta = run_distributed(train_default_device, mode, "meta")
    _assert_ranks_agree(meta)
    for name, p in normal[0]["params"].items():
        assert torch.equal(p, meta[0]["params"][name]), name
