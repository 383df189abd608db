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


def test_ownership_is_decided_by_counting_bytes(quick):
    """Issue 19 item 2: per shape, bytes a rank receives per step with replicated factors (the refresh's
    gather and C broadcast over update_freq steps) against the owner sending the bf16 preconditioned
    gradient every step; the smaller one is the decision."""
    bench, d = quick
    rows = {r["layer"]: r for r in d["ownership"]}
    assert list(rows) == [s[0] for s in bench.QUICK_SHAPES]
    tiny = rows["64x64"]
    s = tiny["s"]
    assert s == 512  # HyLoConfig's default cap
    assert tiny["replicate_bytes_per_step"] == (s * 128 * 4 + s * (s + 1) // 2 * 8) / bench.UPDATE_FREQ
    assert tiny["owner_apply_bytes_per_step"] == 64 * 64 * 2
    assert tiny["decision"] == "owner applies"  # a layer smaller than its factors
    assert tiny["held_owned_mean"]["4"] == tiny["held_replicated"] / 4
    big = bench.ownership([("4096x4096", 4096, 4096, "7B")], [8], 512)[0]
    assert big["decision"] == "replicate" and big["owner_over_replicate"] > 10
    render = load_benchmark("render_readme")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(render, "load", lambda name: d)
        text = render.RENDERERS["scale_ownership"]()
    assert "| 64x64 | 512 |" in text and "owner applies" in text


def test_coverage_counts_embeddings_and_reports_tied_ones(quick, monkeypatch):
    """Issue 19 item 4: the untied Llama's embeddings are preconditioned now (only the norms are left);
    a tied embedding and LM head both keep their plain gradient, with a reason naming the other."""
    bench, d = quick
    rows = {r["model"]: r for r in d["coverage"]["models"]}
    untied, tied = rows["tiny Llama (untied)"], rows["tiny Llama (tied)"]
    assert untied["after_params"] - untied["before_params"] == untied["preconditioned_by_kind"]["embedding"] > 0
    assert untied["after_share"] > 0.99 and list(untied["fallback"]) == ["LlamaRMSNorm: no HyLo kernel for this layer kind"]
    assert tied["after_params"] == tied["before_params"] and "embedding" not in tied["preconditioned_by_kind"]
    reasons = " ".join(tied["fallback"])
    assert "shared with ['lm_head']" in reasons and "shared with ['model.embed_tokens']" in reasons
    render = load_benchmark("render_readme")
    monkeypatch.setattr(render, "load", lambda name: d if name == "scale" else pytest.fail(name))
    text = render.RENDERERS["scale_coverage"]()
    assert "| tiny Llama (untied) |" in text and "benchmarks/scale.py --quick" in text
