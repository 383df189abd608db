"""Bytes per refresh: the 2-rank measurement must equal benchmarks/communication.py's formula exactly.

The formula ``hylo_refresh_bytes`` is written from docs/design.md section 2.1 and the implementation's
padding/rounding rules; this test runs one HyLo step (update_freq=1) on 2 real gloo CPU ranks for
KIS, KID and SNGD (a tiny MLP and CNN, equal and unequal shards, a global sample budget, float64)
and compares ``opt.preconditioner.comm.bytes_sent`` and ``comm.calls`` per rank and per collective.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # spawned ranks inherit sys.path, so they can import the same module
    sys.path.insert(0, str(REPO))

from benchmarks import communication as bench  # noqa: E402

CASES = [
    {"model": "mlp", "mode": "kis", "rank_ratio": 0.25, "shards": [16, 16]},
    {"model": "mlp", "mode": "kid", "rank_ratio": 0.25, "shards": [16, 16]},
    {"model": "mlp", "mode": "sngd", "rank_ratio": 0.25, "shards": [16, 16]},
    {"model": "cnn", "mode": "kis", "rank_ratio": 0.25, "shards": [16, 16]},
    {"model": "cnn", "mode": "kid", "rank_ratio": 0.25, "shards": [16, 16]},
    {"model": "cnn", "mode": "sngd", "rank_ratio": 0.25, "shards": [16, 16]},
    {"model": "cnn", "mode": "kis", "rank_ratio": 0.25, "shards": [16, 16], "max_global_samples": 4},
    {"model": "mlp", "mode": "kid", "rank_ratio": 0.25, "shards": [16, 10]},
    {"model": "mlp", "mode": "sngd", "rank_ratio": 0.25, "shards": [16, 10]},
    {"model": "mlp", "mode": "kid", "rank_ratio": 0.3, "shards": [16, 16], "dtype": "float64"},
]


def test_two_rank_bytes_match_formula():
    results = bench.measure(CASES, world_size=2)
    assert len(results) == len(CASES)
    for res in results:
        for rank, x in enumerate(res["ranks"]):
            where = f"{res['label']} rank {rank}"
            assert x["measured"] == x["analytic"], f"{where}: bytes {x['measured']} != formula {x['analytic']}"
            assert x["measured_calls"] == x["analytic_calls"], f"{where}: calls differ"
            assert x["measured_s"] == x["analytic_s"], f"{where}: gathered rows per layer differ"
        assert res["match"], res["label"]
    # the ops are the ones docs/design.md section 2.1 names, and the formula distinguishes the modes
    by_label = {r["label"]: r["ranks"][0]["analytic"]["all_gather"] for r in results}
    assert by_label["mlp/kid n=16+16"] > by_label["mlp/kis n=16+16"]  # KID also sends its r x r factor
    assert by_label["mlp/sngd n=16+16"] > by_label["mlp/kid n=16+16"]


FOUR_RANK_CASES = [
    {"model": "mlp", "mode": "kis", "rank_ratio": 0.25, "shards": [8, 8, 8, 8], "max_global_samples": 8},
    {"model": "mlp", "mode": "kis", "rank_ratio": 0.25, "shards": [8, 8, 8, 8], "contributing_ranks": 2},
    {"model": "cnn", "mode": "kid", "rank_ratio": 0.5, "shards": [8, 8, 8, 8], "contributing_ranks": 2},
]


@pytest.mark.slow
def test_four_rank_bytes_match_formula_with_rotation():
    """4 gloo ranks with a small budget: measured bytes equal the formula, and with 2 contributing ranks
    the rows arrive by 2 broadcasts and a rank receives half the all-gathered rows' bytes."""
    results = bench.measure(FOUR_RANK_CASES, world_size=4)
    for res in results:
        for rank, x in enumerate(res["ranks"]):
            assert x["measured"] == x["analytic"], f"{res['label']} rank {rank}"
            assert x["measured_calls"] == x["analytic_calls"], f"{res['label']} rank {rank}"
            assert x["measured_s"] == x["analytic_s"], f"{res['label']} rank {rank}"
    layers = bench.layer_specs(bench.build_small_model("mlp"))
    full = bench.hylo_refresh_bytes(layers, "kis", 4, 8, 0.25)
    rotated = bench.hylo_refresh_bytes(layers, "kis", 4, 8, 0.25, contributing_ranks=2)
    assert rotated["s"] == [s // 2 for s in full["s"]]
    assert rotated["recv_per_rank"] < full["recv_per_rank"]


def test_rotation_bounds_bytes_at_any_scale():
    """Fixed per-rank budget: all-gather bytes grow with P; with k contributing ranks they stay flat."""
    layers = bench.resnet50_layers()
    recv = {P: bench.hylo_refresh_bytes(layers, "kis", P, 32, 0.1, contributing_ranks=8)["recv_per_rank"]
            for P in (8, 64, 256)}
    assert recv[64] < 1.2 * recv[8] and recv[256] < 1.2 * recv[8], recv  # only the int row table grows
    grows = {P: bench.hylo_refresh_bytes(layers, "kis", P, 32, 0.1)["recv_per_rank"] for P in (8, 64)}
    assert grows[64] > 7 * grows[8]


def test_formula_by_hand():
    layer = [bench.LayerSpec("fc", 5 + 1, 3)]
    # r = max(1, round(0.25 * 10)) = 2 (round half to even); pad 2; s = 4; P = 2
    res = bench.hylo_refresh_bytes(layer, "kis", 2, 10, 0.25)
    table, gather = 2 * 1 * 8, (2 * (6 + 3) + 1) * 4
    # the owner broadcasts the upper triangle of C (s = 4) and the layer's cancellation factor
    assert res["per_rank"] == [{"all_gather": table + gather, "broadcast": (4 * 5 // 2 + 1) * 8}, {"all_gather": table + gather}]
    assert res["calls"] == [{"all_gather": 2, "broadcast": 1}, {"all_gather": 2}]
    kid = bench.hylo_refresh_bytes(layer, "kid", 2, 10, 0.25)
    assert kid["per_rank"][1]["all_gather"] == table + gather + 2 * 2 * 4
    # unequal shards pad to the largest budget; s counts only valid rows
    uneven = bench.hylo_refresh_bytes(layer, "sngd", 2, [10, 7], 0.25)
    assert uneven["r_pad"] == [10] and uneven["s"] == [17]
    # global budget caps r at max(1, budget // P)
    capped = bench.hylo_refresh_bytes(layer, "kis", 4, 100, 0.5, max_global_samples=6)
    assert capped["r_pad"] == [1] and capped["s"] == [4]
    # a world of one sends nothing
    assert bench.hylo_refresh_bytes(layer, "kis", 1, 10, 0.25)["per_rank"] == [{}]


def test_resnet50_layer_list():
    layers = bench.resnet50_layers()
    convs = [l for l in layers if l.name != "fc"]
    assert len(layers) == 54 and len(convs) == 53
    # torchvision resnet50 has 25,557,032 parameters: conv weights, fc weight + bias, BN weight + bias
    params = sum(l.d_in * l.d_out for l in layers) + 2 * sum(l.d_out for l in convs)
    assert params == 25_557_032
    assert layers[-1] == bench.LayerSpec("fc", 2049, 1000)


@pytest.mark.parametrize("workers", [8, 64])
def test_global_budget_beats_kfac(workers):
    """With a 256-sample global budget HyLo receives fewer bytes than KFAC's triangular all-reduce."""
    layers = bench.resnet50_layers()
    kfac = bench.kfac_refresh_bytes(layers, workers, triangular=True)
    for n in (32, 128):
        hylo = bench.hylo_refresh_bytes(layers, "kis", workers, n, 0.1, max_global_samples=256)
        assert hylo["recv_per_rank"] < kfac["recv_per_rank"]
        assert hylo["mean_per_rank"] < kfac["mean_per_rank"]
