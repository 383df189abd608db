"""End-to-end smoke test of benchmarks/convergence.py (its --quick protocol on MNIST-1D).

Checks the structure of what the benchmark writes (tuning, chosen settings, curves, summary,
ratios, table, JSON and PNG), never its timings or accuracies.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_benchmark

REPO = Path(__file__).resolve().parents[2]

pytest.importorskip("mnist1d")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("convergence")


def test_grids_give_every_optimizer_the_same_budget(bench):
    assert set(bench.GRIDS) == set(bench.OPTIMIZERS) == set(bench.QUICK_GRIDS)
    assert len({len(g) for g in bench.GRIDS.values()}) == 1
    assert len({len(g) for g in bench.QUICK_GRIDS.values()}) == 1
    for name in bench.SECOND_ORDER:
        assert all("damping" in hp for hp in bench.GRIDS[name])  # damping is tuned for every second-order method
        assert len({hp["damping"] for hp in bench.GRIDS[name]}) > 1
    assert bench._subsample(list(range(9)), 3) == [0, 4, 8]


def _result(variants: dict, shipped: dict) -> dict:
    """A written result's protocol and summary, as much as shipped_defaults_row reads."""
    return {"protocol": {"hylo_variants": variants, "hylo_shipped_defaults": shipped, "momentum": 0.9,
                         "weight_decay": 0.0, "hylo": {"rank_ratio": 0.1, "update_freq": 10, "switch_window": 100,
                                                       "step_scale": "sgd", "kl_clip": None}},
            "summary": {name: {} for name in list(variants) + ["sgd"]}}


def test_shipped_defaults_row_is_the_row_with_todays_defaults(bench):
    from dataclasses import asdict

    from ds_hylo import HyLoConfig

    today = {k: v for k, v in asdict(HyLoConfig()).items() if k in ("mode", "base", "graft", "momentum", "betas")}
    before = {**today, "base": "sgd", "momentum": 0.0}  # a run made when the default base was SGD
    variants = {"hylo-kis": {"mode": "kis", "base": "sgd"}, "hylo-kis-adamw": {"mode": "kis", "base": "adamw"},
                "hylo-default": {"defaults": True}}
    # made under the old defaults: hylo-default is not today's, the AdamW-base ablation row is
    assert bench.shipped_defaults_row(_result(variants, before)) == "hylo-kis-adamw"
    # made under today's: hylo-default is preferred
    assert bench.shipped_defaults_row(_result(variants, today)) == "hylo-default"
    # no row with today's options (momentum SGD rows only)
    assert bench.shipped_defaults_row(_result({"hylo-kis": {"mode": "kis", "base": "sgd"}}, before)) is None
    # one differing option (the KID mode) disqualifies the row
    assert bench.shipped_defaults_row(_result({"hylo-kid-adamw": {"mode": "kid", "base": "adamw"}}, before)) is None
    options = bench.effective_hylo_options(_result(variants, before), "hylo-kis")
    assert options["base"] == "sgd" and options["momentum"] == 0.9 and options["rank_ratio"] == 0.1


def test_quick_run_end_to_end(bench, tmp_path):
    import torch

    optimizers = ["sgd", "adamw", "hylo-kis", "hylo-hybrid", "hylo-kis-mc", "kfac", "kfac-mc"]
    threads = torch.get_num_threads()
    try:
        results = bench.main(["--quick", "--tasks", "mnist1d", "--optimizers", *optimizers, "--seeds", "0", "1",
                              "--threads", "1", "--out-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    result = results["mnist1d"]
    kfac_ok, _ = bench.kfac_available()
    expected = [o for o in optimizers if o not in bench.KFAC_VARIANTS or kfac_ok]
    if not kfac_ok:
        assert {"kfac", "kfac-mc"} <= set(result["protocol"]["skipped"])

    assert result["task"] == "mnist1d" and result["quick"] is True
    for key in ("machine", "load_average_1_5_15", "protocol", "tuning", "summary", "ratios", "runs", "table"):
        assert key in result
    assert result["machine"]["torch"]
    targets = result["protocol"]["task"]["targets"]

    tuning = result["tuning"]
    assert set(tuning["chosen"]) == set(expected)
    assert {len(rows) for rows in tuning["trials"].values()} == {2}
    for name, rows in tuning["trials"].items():
        assert tuning["chosen"][name]["hp"] in [row["hp"] for row in rows]

    assert len(result["runs"]) == 2 * len(expected)
    for run in result["runs"]:
        curve = run["curve"]
        assert curve[0]["step"] == 0 and curve[-1]["step"] == run["steps"] > 0
        assert all(a["step"] < b["step"] and a["seconds"] <= b["seconds"] for a, b in zip(curve, curve[1:]))
        assert all(0.0 <= p["acc"] <= 100.0 for p in curve)

    summary = result["summary"]
    assert list(summary) == expected
    for name, row in summary.items():
        for t in targets:
            assert f"time_to_{t:g}" in row and f"steps_to_{t:g}" in row and f"reached_{t:g}" in row
        assert row["median_step_ms"] is not None and row["median_step_ms"] > 0
        if name in bench.SECOND_ORDER:
            assert row["median_refresh_step_ms"] is not None
        else:
            assert row["median_refresh_step_ms"] is None
    assert "hylo_phases" in summary["hylo-kis"] and "apply_ms_per_step" in summary["hylo-kis"]["hylo_phases"]
    # the -mc variant runs the sampled-label backward on refresh steps, the plain one does not
    assert "fisher_ms_per_refresh" in summary["hylo-kis-mc"]["hylo_phases"]
    assert "fisher_ms_per_refresh" not in summary["hylo-kis"]["hylo_phases"]
    assert any(key.startswith("hylo-kis/sgd time@") for key in result["ratios"])
    assert all(line.split()[0] in expected for line in result["table"].splitlines()[2:])

    on_disk = json.loads((tmp_path / "convergence_mnist1d_quick.json").read_text())
    assert on_disk["summary"].keys() == summary.keys()
    if result.get("plot"):
        assert (tmp_path / "convergence_mnist1d_quick.png").stat().st_size > 0


def test_memory_probe_reports_peak_rss(bench):
    out = bench.memory_probe("mnist1d", "hylo-kis", {"lr": 0.1, "damping": 0.1}, quick=True, threads=1)
    assert "error" not in out, out
    assert out["peak_rss_mb"] >= out["rss_after_setup_mb"] > 0


def test_muon_peer_is_muon_on_hidden_matrices_and_adamw_on_the_rest():
    """The Muon peer (issue 23): torch.optim.Muon on every nn.Linear weight but the output layer,
    torch.optim.AdamW on biases, convolutions and the output layer; one step moves every parameter."""
    import torch
    from torch import nn

    bench = load_benchmark("convergence")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5),
                          nn.ReLU(), nn.Linear(5, 3))
    opt = bench.MuonWithAdamW(model, lr=1e-2, weight_decay=0.0)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert [p is q for p, q in zip(muon.param_groups[0]["params"], (model[2].weight, model[4].weight))] == [True, True]
    rest = {id(p) for p in adamw.param_groups[0]["params"]}
    assert rest == {id(p) for p in model.parameters()} - {id(model[2].weight), id(model[4].weight)}
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 1, 4, 4)).pow(2).sum().backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
