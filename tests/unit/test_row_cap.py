"""The row budget does not grow with tokens or ranks (issue 19): a per-layer cap by default, filled
by KIS's streamed draw, and no quiet fall-back where a capture bound is hit.

Before, ``HyLo(model)`` kept rank_ratio x all rows: two Linear(64, 64) layers fed 16 sequences of
4096 tokens kept s = 6,554 rows per layer (C alone 328 MiB per layer in float64), and at 262,144
tokens the first refresh did not fit in 6 GiB. A pass larger than ``max_captured_mib`` was refused
and the layer quietly took the plain step.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import ds_hylo
from ds_hylo.reduce import row_budget


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


def _kept_rows(opt: ds_hylo.HyLo) -> dict[str, int]:
    return {name: f["c"].shape[0] for name, f in opt.state_dict()["hylo"]["factors"].items()}


@pytest.mark.parametrize("sequences", [16, 64])
def test_default_row_budget_is_capped_whatever_the_tokens(sequences):
    """65,536 and 262,144 tokens per step (4096-token sequences): s <= 512 per layer with defaults."""
    model = TwoLinear()
    opt = ds_hylo.HyLo(model)
    x = torch.randn(sequences, 4096, 64)
    model(x).pow(2).mean().backward()
    opt.step()
    kept = _kept_rows(opt)
    assert set(kept) == {"first", "second"}
    assert all(s == 512 for s in kept.values()), kept
    assert ds_hylo.HyLoConfig().max_global_samples == 512


def test_cap_per_rank_shrinks_with_ranks():
    """r = max(1, 512 // P) per rank: s = P * r <= 512 for P <= 512; below 5,120 rows rank_ratio decides."""
    for world in (1, 2, 8, 64, 512):
        per_rank = row_budget("kis", 10**6, 0.1, world, 512)
        assert per_rank * world <= 512 and per_rank >= 512 // world
    assert row_budget("kis", 4000, 0.1, 1, 512) == 400
    assert row_budget("sngd", 10**6, 0.1, 1, 512) == 10**6  # the exact mode keeps every row


def test_a_pass_past_the_capture_bound_is_still_drawn_by_streamed_kis():
    """max_captured_mib far below one pass: KIS (streamed) still draws its rows and preconditions;
    nothing is refused and no warning is given."""
    model = TwoLinear()
    opt = ds_hylo.HyLo(model, base="sgd", lr=0.1, max_captured_mib=0.01)
    x = torch.randn(4, 256, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x).pow(2).mean().backward()
        opt.step()
    assert _kept_rows(opt) == {"first": 102, "second": 102}
    assert opt.stats()["refused_passes"] == {}


def test_a_refused_pass_is_named_counted_and_explained():
    """KID holds every row until the refresh: a pass past the bound is refused, the warning names
    the layer, the numbers and what to change, and stats() counts it."""
    model = TwoLinear()
    opt = ds_hylo.HyLo(model, base="sgd", lr=0.1, mode="kid", max_captured_mib=0.01)
    x = torch.randn(4, 256, 64)
    with pytest.warns(RuntimeWarning, match=r"layer 'first' holds 0 captured rows and a pass of 1024 more.*"
                                            r"raise max_captured_mib, or use mode='kis'"):
        model(x).pow(2).mean().backward()
    opt.step()
    assert opt.stats()["refused_passes"] == {"first": 1, "second": 1}
