"""benchmarks/precondition_cost.py: the ResNet-50 catalogue, network totals, and the authors' code as a peer.

Timings are never asserted; the structure and the arithmetic of the totals are.
"""

from __future__ import annotations

import json
import math
import os

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("precondition_cost")


def test_resnet50_catalogue_has_its_54_layers(bench):
    assert sum(count for *_, count in bench.RESNET50_LAYERS) == 54
    assert len({name for name, *_ in bench.RESNET50_LAYERS}) == len(bench.RESNET50_LAYERS)
    shapes = {name: (d_in, d_out) for name, d_in, d_out, _ in bench.RESNET50_LAYERS}
    assert shapes["conv3x3 512->512"] == (4608, 512) and shapes["fc 2048->1000"] == (2049, 1000)


def test_network_totals_weight_each_shape_by_its_count(bench):
    def row(p, count, **ms):
        return {"P": p, "count": count, **{k: {"ms": v} for k, v in ms.items()}}

    rows = [row(4, 2, sngd=10.0, kis=1.0, kid=2.0, kfac=100.0), row(4, 3, sngd=20.0, kis=0.5, kid=1.0, kfac=50.0),
            row(8, 1, sngd=40.0, kis=2.0, kid=4.0, kfac=100.0)]
    totals = bench.network_totals(rows)
    assert totals["4"]["layers"] == 5 and totals["8"]["layers"] == 1
    assert totals["4"]["kis"] == pytest.approx(2 * 1.0 + 3 * 0.5)
    assert totals["4"]["kfac"] == pytest.approx(350.0)
    assert totals["4"]["kfac/kis"] == pytest.approx(350.0 / 3.5)
    assert "authors_kis" not in totals["4"] and "kis/authors_kis" not in totals["4"]


def test_quick_network_run_writes_totals(bench, tmp_path):
    code = bench.main(["--quick", "--network", "resnet50", "--layers", "conv1x1 64->64,conv1x1 256->64",
                       "--out-dir", str(tmp_path), "--no-plot", "--no-progress"])
    assert code == 0
    result = json.loads((tmp_path / "precondition_cost_resnet50_quick.json").read_text())
    assert result["settings"]["network"] == "resnet50"
    assert {row["count"] for row in result["rows"]} == {1, 2}
    for entry in result["totals"].values():
        assert entry["layers"] == 3 and all(math.isfinite(entry[m]) for m in ("sngd", "kis", "kid", "kfac"))


def test_authors_dir_without_their_code_is_refused_by_name(bench, tmp_path):
    with pytest.raises(FileNotFoundError, match="no dso/optimizers/ngd.py"):
        bench.main(["--quick", "--authors-dir", str(tmp_path), "--out-dir", str(tmp_path), "--no-plot", "--no-progress"])


@pytest.mark.skipif(not os.environ.get("HYLO_AUTHORS_DIR"),
                    reason="set HYLO_AUTHORS_DIR to a checkout of https://github.com/hylo-dso/hylo")
def test_authors_code_runs_on_the_same_rows(bench, tmp_path):
    bench.main(["--quick", "--authors-dir", os.environ["HYLO_AUTHORS_DIR"], "--out-dir", str(tmp_path), "--no-plot",
                "--no-progress"])
    result = json.loads((tmp_path / "precondition_cost_quick.json").read_text())
    for row in result["rows"]:
        assert math.isfinite(row["kis/authors_kis"]) and math.isfinite(row["kid/authors_kid"])
