"""benchmarks/scale.py --quick: the JSON's structure, the estimator's agreement with the measured
bytes, and the README renderer. Timings are never asserted."""

from __future__ import annotations

import json

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    pytest.importorskip("transformers")
    bench = load_benchmark("scale")
    out = tmp_path_factory.mktemp("scale")
    assert bench.main(["--quick", "--out-dir", str(out), "--no-plot"]) == 0
    return bench, json.loads((out / "scale_quick.json").read_text())


def test_quick_json_structure(quick):
    bench, d = quick
    assert [r["layer"] for r in d["layers"]] == [s[0] for s in bench.QUICK_SHAPES]
    for r in d["layers"]:
        assert r["adamw_step_s"] > 0 and r["adamw_state_bytes"] == 2 * 4 * r["params"] + 4
        check = r["check_at_time_tokens"]
        assert abs(check["estimated_bytes"] - check["measured_bytes"]) <= 0.1 * check["measured_bytes"]
        assert set(r["hylo"]) == set(bench.QUICK_CONFIGS)
        for h in r["hylo"].values():
            assert h["fits"] and h["plain_step_s"] > 0 and h["refresh_step_s"] >= h["plain_step_s"]
            assert abs(h["estimate_error"]) <= 0.1
            assert h["apply_flops"].get("float32", 0) >= 4 * h["s"] * r["d_in"] * r["d_out"]
            assert "float64" in h["invert_flops"]
    caps = [r["hylo"]["cap 16"]["s"] for r in d["layers"]]
    assert caps == [16] * len(caps)
    models = d["models"]
    assert [r["P"] for r in models] == [2, 4]
    for r in models:
        assert r["adamw"]["state_bytes"] == 8 * r["params"]
        assert set(r["hylo"]) == set(bench.QUICK_CONFIGS)
        assert r["hylo"]["cap 16"]["s"] == 16 and r["hylo"]["cap 16"]["held_bytes"] < r["hylo"]["default"]["held_bytes"]
        assert r["muon"]["share"] > 0 and r["kfac"]["refresh_recv_bytes"] > 0


def test_renderer_renders_the_quick_json(quick, monkeypatch):
    _, d = quick
    render = load_benchmark("render_readme")
    monkeypatch.setattr(render, "load", lambda name: d if name == "scale" else pytest.fail(name))
    text = render.RENDERERS["scale"]()
    assert text.count("| 64x64 |") == 1 + len(d["settings"]["configs"])
    assert "| tiny Llama | 4 |" in text
