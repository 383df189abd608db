"""Bytes per curvature refresh at P up to 1024: HyLo-KIS with and without rotating contributors vs K-FAC.

Analytic (``communication.hylo_refresh_bytes`` mirrors the package and is checked against bytes
measured on 2 and 4 gloo ranks in ``tests/distributed/test_communication.py``). For each model and number of
ranks P, with a fixed per-rank budget of r rows per layer:

- ``hylo``: every rank contributes r rows (one fused all-gather): s = P r rows per layer;
- ``hylo_global``: ``max_global_samples = s_max`` (r = s_max // P, at least 1 row per rank);
- ``hylo_rotate``: ``contributing_ranks = k`` (k ranks, rotating every refresh, broadcast r rows each);
- ``kfac``: K-FAC's factor all-reduce with symmetric (upper-triangle) packing.

The measure is ``recv_per_rank``: bytes a rank must receive per refresh with bandwidth-optimal
collectives (the bandwidth term of the refresh's time; see ``communication.py``). Ratios are to K-FAC.

    python benchmarks/rotation.py        # prints the table, writes benchmarks/results/rotation.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks import communication as comm  # noqa: E402

WORKERS = (8, 64, 256, 1024)


def llama_1b_layers(seq: int = 512) -> list[comm.LayerSpec]:
    """Linear layers of a Llama-style 1.1B model (hidden 2048, 22 blocks, MLP 5632, 4 KV heads of 64:
    TinyLlama's shapes), bias-free, one row per token ("expand"). The tied LM head keeps its plain gradient."""
    hidden, inter, kv = 2048, 5632, 4 * 64
    layers = []
    for b in range(22):
        p = f"model.layers.{b}"
        layers += [
            comm.LayerSpec(f"{p}.self_attn.q_proj", hidden, hidden, seq),
            comm.LayerSpec(f"{p}.self_attn.k_proj", hidden, kv, seq),
            comm.LayerSpec(f"{p}.self_attn.v_proj", hidden, kv, seq),
            comm.LayerSpec(f"{p}.self_attn.o_proj", hidden, hidden, seq),
            comm.LayerSpec(f"{p}.mlp.gate_proj", hidden, inter, seq),
            comm.LayerSpec(f"{p}.mlp.up_proj", hidden, inter, seq),
            comm.LayerSpec(f"{p}.mlp.down_proj", inter, hidden, seq),
        ]
    return layers


def table(rows_per_rank: int, global_budget: int, contributing: int) -> list[dict[str, Any]]:
    models = {
        "resnet50 (batch 32 per rank)": (comm.resnet50_layers(), 32),
        "llama-1b (8 x 512 tokens per rank)": (llama_1b_layers(512), 8),
    }
    out = []
    for model, (layers, local_batch) in models.items():
        rows = local_batch * layers[0].rows_per_sample
        ratio = rows_per_rank / rows
        for workers in WORKERS:
            kfac = comm.kfac_refresh_bytes(layers, workers, triangular=True)["recv_per_rank"]
            full = comm.hylo_refresh_bytes(layers, "kis", workers, local_batch, ratio)
            glob = comm.hylo_refresh_bytes(layers, "kis", workers, local_batch, ratio, max_global_samples=global_budget)
            rot = comm.hylo_refresh_bytes(layers, "kis", workers, local_batch, ratio, contributing_ranks=contributing)
            out.append({
                "model": model, "workers": workers, "rows_per_rank": rows_per_rank,
                "kfac_mb": kfac / 1e6,
                "hylo_mb": full["recv_per_rank"] / 1e6, "hylo_s": full["s"][0],
                "hylo_global_mb": glob["recv_per_rank"] / 1e6, "hylo_global_s": glob["s"][0],
                "hylo_rotate_mb": rot["recv_per_rank"] / 1e6, "hylo_rotate_s": rot["s"][0],
            })
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows-per-rank", type=int, default=32, help="per-rank row budget r per layer")
    parser.add_argument("--global-budget", type=int, default=256, help="max_global_samples for the hylo_global column")
    parser.add_argument("--contributing-ranks", type=int, default=8, help="contributing_ranks k for hylo_rotate")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "rotation.json")
    args = parser.parse_args(argv)
    rows = table(args.rows_per_rank, args.global_budget, args.contributing_ranks)
    print(f"{'model':36s} {'P':>5s} {'K-FAC MB':>10s} {'HyLo/KFAC':>10s} {'global/KFAC':>12s} {'rotate/KFAC':>12s}")
    for r in rows:
        print(f"{r['model']:36s} {r['workers']:5d} {r['kfac_mb']:10.1f} {r['hylo_mb'] / r['kfac_mb']:10.3f} "
              f"{r['hylo_global_mb'] / r['kfac_mb']:12.3f} {r['hylo_rotate_mb'] / r['kfac_mb']:12.3f}")
    record = {"settings": {"rows_per_rank": args.rows_per_rank, "global_budget": args.global_budget,
                           "contributing_ranks": args.contributing_ranks, "measure": "recv_per_rank"},
              "rows": rows}
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
