#!/usr/bin/env python
"""Refresh-step and plain-step time and memory of HyLo on token-level rows, against AdamW (issue 11 item 5).

One ``nn.Linear(512, 512)`` on random (batch 8, seq, 512) inputs, MSE loss, every token a sample
(``sequence_convention="expand"``, n = 8 * seq rows). Methods: AdamW (the ratio base); HyLo-KIS
streamed (the default: rows drawn inside the backward hook, the layer holds its row budget) and
stored (``preconditioner.stream_kis = False``: every row held, drawn at the refresh; the behaviour
before streaming); HyLo-KID on its bounded path (``KID()``: the default ``exact_max_rows`` switches
to ``kernels.kid_local_rows`` above it) and forced onto the dense path (``KID(exact_max_rows=None)``:
an (n, n) float64 kernel, O(n^3)). HyLo refreshes every other step (``update_freq=2``), so the
timed steps alternate a refresh step (capture + refresh + apply) and a plain step (apply only);
each is zero_grad, forward, backward, step.

Every (seq, method) runs in its own subprocess. Memory: the bytes of rows the layer holds after
the refresh step's backward (``LayerCapture.held_bytes``: what capture adds until step()), and
the peak growth over the timed steps: on CUDA ``torch.cuda.max_memory_allocated``, on CPU
``ru_maxrss`` (the first step included, so the refresh's temporaries count). Step times are the
minimum over ``--repeats`` refresh and plain steps after a first (refresh) step, as ratios to
AdamW's step. A setting whose estimated time (the dense path's O(n^3) extrapolated from the
largest measured smaller n) exceeds ``--max-seconds`` is skipped, with a note in the JSON.

Writes ``long_sequence.json`` (and ``long_sequence.png`` when matplotlib is installed) under
``--out`` and prints a table.

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

METHODS = ("adamw", "kis", "kis_stored", "kid", "kid_dense")
LABELS = {"adamw": "AdamW", "kis": "KIS (streamed)", "kis_stored": "KIS (stored, before)",
          "kid": "KID (bounded)", "kid_dense": "KID (dense n x n)"}
STYLES = {"adamw": "k:o", "kis": "C0-o", "kis_stored": "C1--s", "kid": "C2-^", "kid_dense": "C3:v"}
WIDTH = 512
BATCH = 8
RANK_RATIO = 0.1
UPDATE_FREQ = 2
DEFAULT_OUT = _REPO / "benchmarks" / "results"


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_setting(
    method: str, seq: int, repeats: int, device: str, max_samples: Optional[int], threads: int
) -> dict[str, Any]:
    """One (method, seq) in this process: step seconds (refresh and plain), held bytes, peak memory (MiB)."""
    import torch
    from torch import nn

    from ds_hylo import HyLo, reduce

    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    model = nn.Linear(WIDTH, WIDTH, device=dev)
    x = torch.randn(BATCH, seq, WIDTH, device=dev)
    y = torch.randn(BATCH, seq, WIDTH, device=dev)
    layers = []
    if method == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        if method == "kid_dense":
            reduce.REDUCTIONS["kid"] = reduce.KID(exact_max_rows=None)
        opt = HyLo(
            model, lr=0.01, mode="kid" if method.startswith("kid") else "kis", update_freq=UPDATE_FREQ,
            damping=0.3, rank_ratio=RANK_RATIO, max_global_samples=max_samples, sequence_convention="expand",
            max_captured_mib=4096.0,
        )
        opt.preconditioner.stream_kis = method != "kis_stored"
        layers = list(opt.preconditioner.layers.values())
    held: list[int] = []

    def step() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        held.append(sum(layer.held_bytes() for layer in layers))  # O(1): shapes only
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - start

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    base_mib = torch.cuda.memory_allocated(dev) / 2**20 if dev.type == "cuda" else _maxrss_mib()
    first = step()  # a refresh step (step 0)
    refresh, plain = [], []
    for _ in range(repeats):
        plain.append(step())
        refresh.append(step())
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2**20 - base_mib
    else:
        peak = _maxrss_mib() - base_mib
    refreshes = None if method == "adamw" else opt.stats().get("refreshes")
    return {"first_step_s": first, "refresh_step_s": min(refresh), "plain_step_s": min(plain),
            "held_mib": max(held) / 2**20, "peak_extra_mib": peak, "refreshes": refreshes}


def _in_subprocess(method: str, seq: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", method, str(seq), "--repeats", str(args.repeats),
           "--device", args.device, "--threads", str(args.threads)]
    if args.max_samples is not None:
        cmd += ["--max-samples", str(args.max_samples)]
    steps = 2 * args.repeats + 1
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.max_seconds * steps + 60)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _estimate_dense(done: dict[int, dict[str, Any]], seq: int) -> Optional[float]:
    """Dense KID's step time at ``seq``, extrapolated as n^3 from the largest measured seq."""
    measured = [s for s, r in done.items() if "refresh_step_s" in r]
    if not measured:
        return None
    ref = max(measured)
    return done[ref]["refresh_step_s"] * (seq / ref) ** 3


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--repeats", type=int, default=3, help="timed refresh and plain steps each, after the first (min is reported)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per worker (0: torch's default); 1 keeps ratios stable on a shared machine")
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
        print(json.dumps(run_setting(method, seq, args.repeats, args.device, args.max_samples, args.threads)))
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
    header = (f"{'seq':>5} {'n':>6} {'method':>21} {'refresh s':>9} {'x AdamW':>8} {'plain s':>8} {'x AdamW':>8} "
              f"{'held MiB':>9} {'peak +MiB':>10}")
    print(header)
    print("-" * len(header))
    for seq in sorted(args.seqs):
        base = results["adamw"][seq].get("plain_step_s")
        base = min(base, results["adamw"][seq]["refresh_step_s"]) if base else None  # AdamW: every step alike
        for method in METHODS:
            res = results[method][seq]
            if "refresh_step_s" in res and base:
                res["adamw_step_s"] = base
                res["refresh_ratio_to_adamw"] = res["refresh_step_s"] / base
                res["plain_ratio_to_adamw"] = res["plain_step_s"] / base
            rows.append({"seq": seq, "n": BATCH * seq, "method": method, **res})
            if "refresh_step_s" in res:
                print(f"{seq:5d} {BATCH * seq:6d} {LABELS[method]:>21} {res['refresh_step_s']:9.3f} "
                      f"{res['refresh_ratio_to_adamw']:8.1f} {res['plain_step_s']:8.3f} {res['plain_ratio_to_adamw']:8.2f} "
                      f"{res['held_mib']:9.2f} {res['peak_extra_mib']:10.0f}")
            else:
                print(f"{seq:5d} {BATCH * seq:6d} {LABELS[method]:>21} {res.get('skipped') or res.get('error')}")
    from ds_hylo.reduce import KID

    kid = KID()
    report = {
        "benchmark": "long_sequence",
        "setup": {
            "layer": f"nn.Linear({WIDTH}, {WIDTH})", "batch": BATCH, "loss": "mse", "sequence_convention": "expand",
            "update_freq": UPDATE_FREQ, "rank_ratio": RANK_RATIO, "max_global_samples": args.max_samples,
            "repeats": args.repeats, "device": args.device, "torch_threads": args.threads or "default",
            "kid_exact_max_rows": kid.exact_max_rows,
            "kid_residual_block_rows": kid.residual_block_rows, "methods": LABELS,
            "step": "zero_grad + forward + backward + optimizer.step(); refresh steps and plain steps alternate "
                    "(update_freq=2); times are the minimum over the repeats, ratios to AdamW's step",
            "held": "bytes of rows the layer holds after the refresh step's backward (LayerCapture.held_bytes), MiB",
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
    png = plot(rows, args.out / "long_sequence.png", args.max_samples)
    if png is not None:
        print(f"wrote {png}")
    return 0


def plot(rows: list[dict[str, Any]], path: Path, max_samples: Optional[int] = None) -> Optional[Path]:
    """Held rows' MiB and refresh-step ratio to AdamW against seq, one line per method (None without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("held_mib", "rows held after the backward (MiB)"),
              ("refresh_ratio_to_adamw", "refresh step / AdamW step"),
              ("plain_ratio_to_adamw", "plain step / AdamW step"))
    for ax, (key, title) in zip(axes, panels):
        for method in METHODS:
            if method == "adamw" and key == "held_mib":
                continue
            points = [(r["seq"], r[key]) for r in rows if r["method"] == method and r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), STYLES[method], label=LABELS[method], markersize=5)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (batch 8)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), fontsize=9)
    cap = f", max_global_samples {max_samples}" if max_samples else ""
    fig.suptitle(f"One nn.Linear({WIDTH}, {WIDTH}), batch {BATCH}, every token a sample, rank_ratio {RANK_RATIO}{cap}")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
