#!/usr/bin/env python
"""Refresh-step time and peak memory of HyLo on token-level rows, against AdamW (issue 11 item 5).

One ``nn.Linear(512, 512)`` on random (batch 8, seq, 512) inputs, MSE loss, every token a sample
(``sequence_convention="expand"``, n = 8 * seq rows). Methods: AdamW (the ratio base), HyLo-KIS,
HyLo-KID on its bounded path (``KID()``: the default ``exact_max_rows`` switches to
``kernels.kid_local_rows`` above it) and HyLo-KID forced onto the old dense path
(``KID(exact_max_rows=None)``: an (n, n) float64 kernel, O(n^3)). HyLo refreshes every step
(``update_freq=1``), so each timed step is a refresh step: zero_grad, forward, backward, step.

Every (seq, method) runs in its own subprocess, so peak memory is that process's: on CUDA
``torch.cuda.max_memory_allocated``, on CPU the growth of ``ru_maxrss`` over the timed steps
(the first step included, so the refresh's temporaries are counted). Step time is the minimum
over ``--repeats`` steps after that first one. A setting whose estimated time (the dense path's
O(n^3) extrapolated from the largest measured smaller n) exceeds ``--max-seconds`` is skipped,
with a note in the JSON.

Writes ``long_sequence.json`` under ``--out`` and prints a table.

    python benchmarks/long_sequence.py                         # CPU, seq 128/512/2048
    python benchmarks/long_sequence.py --seqs 64 128 --out /tmp/ls   # quick dry run
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

_REPO = Path(__file__).resolve().parents[1]
for _path in (str(_REPO), str(_REPO / "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from _env import cpu_model, git_revision, load_average  # noqa: E402

METHODS = ("adamw", "kis", "kid", "kid_dense")
WIDTH = 512
BATCH = 8
DEFAULT_OUT = _REPO / "benchmarks" / "results"


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_setting(method: str, seq: int, repeats: int, device: str, max_samples: Optional[int]) -> dict[str, Any]:
    """One (method, seq) in this process: returns step seconds and peak memory (MiB)."""
    import torch
    from torch import nn

    from ds_hylo import HyLo, reduce

    torch.manual_seed(0)
    dev = torch.device(device)
    model = nn.Linear(WIDTH, WIDTH, device=dev)
    x = torch.randn(BATCH, seq, WIDTH, device=dev)
    y = torch.randn(BATCH, seq, WIDTH, device=dev)
    if method == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        if method == "kid_dense":
            reduce.REDUCTIONS["kid"] = reduce.KID(exact_max_rows=None)
        opt = HyLo(
            model, lr=0.01, mode="kis" if method == "kis" else "kid", update_freq=1, damping=0.3,
            rank_ratio=0.1, max_global_samples=max_samples, sequence_convention="expand", max_captured_mib=4096.0,
        )

    def step() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - start

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    base_mib = torch.cuda.memory_allocated(dev) / 2**20 if dev.type == "cuda" else _maxrss_mib()
    first = step()
    times = [step() for _ in range(repeats)]
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2**20 - base_mib
    else:
        peak = _maxrss_mib() - base_mib
    refreshes = None if method == "adamw" else opt.stats().get("refreshes")
    return {"first_step_s": first, "step_s": min(times), "peak_extra_mib": peak, "refreshes": refreshes}


def _in_subprocess(method: str, seq: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", method, str(seq), "--repeats", str(args.repeats),
           "--device", args.device]
    if args.max_samples is not None:
        cmd += ["--max-samples", str(args.max_samples)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.max_seconds * (args.repeats + 1) + 60)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _estimate_dense(done: dict[int, dict[str, Any]], seq: int) -> Optional[float]:
    """Dense KID's step time at ``seq``, extrapolated as n^3 from the largest measured seq."""
    measured = [s for s, r in done.items() if "step_s" in r]
    if not measured:
        return None
    ref = max(measured)
    return done[ref]["step_s"] * (seq / ref) ** 3


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after the first (min is reported)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-samples", type=int, default=256,
                        help="HyLo max_global_samples: rows kept per layer (r); 0 for rank_ratio alone")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="skip a setting estimated slower per step")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "SEQ"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.max_samples == 0:
        args.max_samples = None
    if args.worker:
        method, seq = args.worker[0], int(args.worker[1])
        print(json.dumps(run_setting(method, seq, args.repeats, args.device, args.max_samples)))
        return 0

    results: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in METHODS}
    for seq in sorted(args.seqs):
        for method in METHODS:
            estimate = _estimate_dense(results[method], seq) if method == "kid_dense" else None
            if estimate is not None and estimate > args.max_seconds:
                results[method][seq] = {"skipped": f"estimated > {args.max_seconds:g} s per step "
                                                   f"(n^3 extrapolation: {estimate:.0f} s)"}
            else:
                results[method][seq] = _in_subprocess(method, seq, args)
            print(f"seq {seq:5d} {method:9s} {results[method][seq]}", file=sys.stderr, flush=True)

    rows = []
    header = f"{'seq':>5} {'n':>6} {'method':>9} {'step s':>8} {'x AdamW':>8} {'peak +MiB':>10}"
    print(header)
    print("-" * len(header))
    for seq in sorted(args.seqs):
        base = results["adamw"][seq].get("step_s")
        for method in METHODS:
            res = results[method][seq]
            ratio = res["step_s"] / base if "step_s" in res and base else None
            res["ratio_to_adamw"] = ratio
            rows.append({"seq": seq, "n": BATCH * seq, "method": method, **res})
            if "step_s" in res:
                print(f"{seq:5d} {BATCH * seq:6d} {method:>9} {res['step_s']:8.3f} {ratio:8.1f} {res['peak_extra_mib']:10.0f}")
            else:
                print(f"{seq:5d} {BATCH * seq:6d} {method:>9} {res.get('skipped') or res.get('error')}")
    from ds_hylo.reduce import KID

    kid = KID()
    report = {
        "benchmark": "long_sequence",
        "setup": {
            "layer": f"nn.Linear({WIDTH}, {WIDTH})", "batch": BATCH, "loss": "mse", "sequence_convention": "expand",
            "update_freq": 1, "rank_ratio": 0.1, "max_global_samples": args.max_samples, "repeats": args.repeats,
            "device": args.device, "kid_exact_max_rows": kid.exact_max_rows,
            "kid_residual_block_rows": kid.residual_block_rows,
            "step": "zero_grad + forward + backward + optimizer.step(); every HyLo step is a refresh",
            "peak": "CUDA: max_memory_allocated growth; CPU: ru_maxrss growth over the measured steps (MiB)",
        },
        "machine": {"cpu": cpu_model(), "python": platform.python_version(), "load_average": load_average()},
        "git": git_revision(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "long_sequence.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
