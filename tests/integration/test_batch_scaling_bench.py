"""Smoke test of benchmarks/batch_scaling.py (its --quick protocol: tiny MNIST subset, a 784-32-10 MLP,
batch sizes 32 and 128, one tuning seed, one final seed).

Checks the structure of what the benchmark writes (tuning with the rungs tried, per-batch rows,
critical batch sizes, goals, JSON and PNG) and that the README table renders from it; never its
timings or accuracies.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import load_benchmark

REPO = Path(__file__).resolve().parents[2]
MNIST = REPO.parent / "shared" / "data" / "mnist"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("batch_scaling")


def test_lr_search_extends_at_an_edge_until_interior(bench):
    ladder = bench.LR_LADDER
    assert bench.lr_extension([1e-3, 3e-3, 1e-2], 1e-2) == 3e-2
    assert bench.lr_extension([1e-3, 3e-3, 1e-2], 1e-3) == 3e-4
    assert bench.lr_extension([1e-3, 3e-3, 1e-2], 3e-3) is None
    assert bench.lr_extension([ladder[-2], ladder[-1]], ladder[-1]) is None  # the ladder's end
    assert bench.is_interior([1e-3, 3e-3, 1e-2], 3e-3) and not bench.is_interior([1e-3, 3e-3], 3e-3)


def test_critical_batch(bench):
    # per-doubling speed-ups: 4x batch, 4x fewer steps -> 2.0; then 1.2x fewer per 4x -> ~1.1
    c = bench.critical_batch([128, 512, 2048], [1000, 250, 210])
    assert c["batch"] == 512 and c["at_least"] is False
    assert c["speedups_per_doubling"][0] == pytest.approx(2.0)
    c = bench.critical_batch([128, 512], [1000, 250])
    assert c["batch"] == 512 and c["at_least"] is True
    assert bench.critical_batch([128, 512], [1000, None])["batch"] is None


@pytest.mark.skipif(not (MNIST / "train-images-idx3-ubyte.gz").exists() and not (MNIST / "train-images-idx3-ubyte").exists(),
                    reason="MNIST not in ../shared/data/mnist")
def test_quick_run_end_to_end(bench, tmp_path, monkeypatch):
    import torch

    threads = torch.get_num_threads()
    try:
        result = bench.main(["--quick", "--out-dir", str(tmp_path), "--data-dir", str(MNIST)])
    finally:
        torch.set_num_threads(threads)
    protocol = result["protocol"]
    assert protocol["batch_sizes"] == [32, 128] and protocol["seeds"] == [0]
    assert not set(protocol["seeds"]) & set(protocol["tune_seeds"])
    targets = [format(t, "g") for t in protocol["task"]["targets"]]
    names = protocol["optimizers"]
    assert set(names) >= {"adamw", "muon", "hylo-default"}
    for b in protocol["batch_sizes"]:
        entry = result["batches"][str(b)]
        assert entry["eval_every"] >= 1 and entry["step_budget"] > 0 and isinstance(entry["resolution_ok"], bool)
        assert set(entry["rows"]) == set(names) == set(entry["tuning"])
        for name in names:
            tune = entry["tuning"][name]
            assert tune["lr"] in tune["lrs_tried"] and len(tune["lrs_tried"]) >= 3
            assert tune["lrs_tried"] == sorted(tune["lrs_tried"]) == [t["lr"] for t in tune["trials"]]
            assert tune["interior"] == (min(tune["lrs_tried"]) < tune["lr"] < max(tune["lrs_tried"]))
            row = entry["rows"][name]
            assert row["lr"] == tune["lr"] and row["step_ms"] > 0
            for t in targets:
                assert len(row[f"steps_{t}"]) == 1 and 0 <= row[f"reached_{t}"] <= 1
                assert f"steps_vs_adamw_{t}" in row and f"time_vs_best_peer_{t}" in row
            assert entry["rows"]["adamw"][f"steps_vs_adamw_{targets[0]}"] in (1.0, None)
        assert len(entry["runs"]) == len(names)
    assert set(result["critical_batch"]) == set(names)
    assert result["goals"] and all({"batch", "goal", "value", "met"} <= set(g) for g in result["goals"])

    on_disk = json.loads((tmp_path / "batch_scaling_mnist_mlp_quick.json").read_text())
    assert on_disk["batches"].keys() == result["batches"].keys()
    if result.get("plot"):
        assert (tmp_path / "batch_scaling_mnist_mlp_quick.png").stat().st_size > 0

    # the README block renders from the JSON: one row per (batch, optimizer), then the critical
    # batches, the goals and the run line
    sys.path.insert(0, str(REPO / "benchmarks"))
    import render_readme

    monkeypatch.setattr(render_readme, "RESULTS", tmp_path)
    render_readme.load.cache_clear()
    try:
        text = render_readme.batch_scaling_table("batch_scaling_mnist_mlp_quick")
    finally:
        render_readme.load.cache_clear()
    tables = text.split("\n\n")
    assert len(tables) == 4 and tables[3].startswith("Run: ")
    rows = [line for line in tables[0].splitlines()[2:]]
    assert len(rows) == 2 * len(names) and all(line.startswith("| ") for line in rows)
    assert len(tables[1].splitlines()) == 2 + len(names)
