"""benchmarks/zero_memory.py runs end to end on a tiny Llama (2 gloo ranks, ZeRO-3) and its table renders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import zero_memory  # noqa: E402


def test_zero_memory_smoke(tmp_path):
    out = tmp_path / "zero_memory.json"
    assert zero_memory.main(["--tiny", "--worlds", "2", "--stages", "3", "--steps", "2", "--seq", "16",
                             "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    (row,) = result["summary"]
    assert row["world"] == 2 and row["stage"] == 3 and row["hylo_refreshes"] == 1
    assert row["hylo_peak_mib"] > 0 and row["adamw_peak_mib"] > 0
    assert all(run["ranks"][0]["loss"] == run["ranks"][0]["loss"] for run in result["runs"])  # not NaN
    assert "| 2 | 3 |" in zero_memory.format_table(result["summary"])
