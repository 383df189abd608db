#!/usr/bin/env python
"""Compute cost of one curvature refresh: exact SNGD vs HyLo-KIS vs HyLo-KID vs a K-FAC reference.

Single process, compute only (no communication). For each ResNet-50-style layer shape and each
simulated cluster size P (local batch n = 32 per worker, global batch N = 32 P):

- sngd: kernel K = (A A^T) o (G G^T) over all N samples + C = (K + lam N I)^-1 by Cholesky
  (``kernels.kernel`` + ``kernels.sngd_inverse``).
- kis:  one worker's importance sampling of r = max(1, round(rank_ratio * 32)) of its 32 rows
  (``kernels.kis_select``) + the owner's kernel of the s = P r gathered rows and its s x s
  Cholesky inverse (``kernels.kernel`` + ``kernels.kis_inverse``).
- kid:  one worker's local 32 x 32 kernel, pivoted Cholesky, M_p and its factor
  (``kernels.kernel`` + ``kernels.kid_local``) + the owner's s x s kernel of the skeleton rows
  and C = (M^-1 + K_S)^-1 (``kernels.kernel`` + ``kernels.kid_inverse``).
- kfac: the K-FAC factors A^T A (d_in x d_in) and G^T G (d_out x d_out) formed from one worker's
  32 rows, then ``torch.linalg.eigh`` of both, as K-FAC does at each factor refresh. It does
  not depend on P (K-FAC's all-reduce of the factors is communication, not timed here).

Workers run in parallel, so HyLo's per-worker work is timed once (one worker) and added to the
owner's s x s work. Rows of A and G are random float32. Each measurement is a warm-up call
followed by the median of at least ``--repeats`` timed calls (more for cheap work, until
``--min-time`` seconds are timed, which steadies sub-millisecond timings); the K-FAC eigendecompositions of factors
larger than ``--large-dim`` are timed once (no warm-up) since a 4608 x 4608 ``eigh`` takes many
seconds on a CPU, or skipped with ``--skip-large``.

Timings use one CPU thread unless ``--threads`` says otherwise (see its help).

Writes ``benchmarks/results/precondition_cost.json`` (with machine info) and
``benchmarks/results/precondition_cost.png``; with ``--device cuda`` every tensor is made on the GPU
and the files are ``precondition_cost_cuda.*`` (``--out-dir`` chooses the folder).

    python benchmarks/precondition_cost.py              # full run, a few minutes on 2 CPU cores
    python benchmarks/precondition_cost.py --quick      # smoke run, seconds
    python benchmarks/precondition_cost.py --device cuda
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

_REPO = Path(__file__).resolve().parents[1]
for _path in (str(_REPO), str(_REPO / "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from _env import cpu_model  # noqa: E402
from ds_hylo import kernels  # noqa: E402

# name, d_in (incl. bias column), d_out
LAYERS: tuple[tuple[str, int, int], ...] = (
    ("conv3x3 64->64", 64 * 9, 64),
    ("conv3x3 128->128", 128 * 9, 128),
    ("conv3x3 256->256", 256 * 9, 256),
    ("conv3x3 512->512", 512 * 9, 512),
    ("conv1x1 1024->256", 1024, 256),
    ("fc 2048->1000", 2048 + 1, 1000),
)
# Every Conv2d / Linear layer of ResNet-50 (torchvision's v1.5 bottlenecks; convolutions have no
# bias): name, d_in, d_out, how many layers have that shape. 54 layers in all.
RESNET50_LAYERS: tuple[tuple[str, int, int, int], ...] = (
    ("conv7x7 3->64", 3 * 49, 64, 1),
    ("conv1x1 64->64", 64, 64, 1),
    ("conv1x1 256->64", 256, 64, 2),
    ("conv3x3 64->64", 64 * 9, 64, 3),
    ("conv1x1 64->256", 64, 256, 4),
    ("conv1x1 256->128", 256, 128, 1),
    ("conv1x1 512->128", 512, 128, 3),
    ("conv3x3 128->128", 128 * 9, 128, 4),
    ("conv1x1 128->512", 128, 512, 4),
    ("conv1x1 256->512", 256, 512, 1),
    ("conv1x1 512->256", 512, 256, 1),
    ("conv1x1 1024->256", 1024, 256, 5),
    ("conv3x3 256->256", 256 * 9, 256, 6),
    ("conv1x1 256->1024", 256, 1024, 6),
    ("conv1x1 512->1024", 512, 1024, 1),
    ("conv1x1 1024->512", 1024, 512, 1),
    ("conv1x1 2048->512", 2048, 512, 2),
    ("conv3x3 512->512", 512 * 9, 512, 3),
    ("conv1x1 512->2048", 512, 2048, 3),
    ("conv1x1 1024->2048", 1024, 2048, 1),
    ("fc 2048->1000", 2048 + 1, 1000, 1),
)
METHODS = ("sngd", "kis", "kid", "kfac")
AUTHORS_METHODS = ("authors_kis", "authors_kid")
RESULTS_DIR = _REPO / "benchmarks" / "results"


# ------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1,
    min_time: float = 0.0, max_repeats: int = 200,
) -> dict:
    """Wall times in ms of ``fn()`` after ``warmup`` untimed calls.

    Times at least ``repeats`` calls, and keeps going (up to ``max_repeats``) until ``min_time``
    seconds have been timed, so sub-millisecond work gets enough samples for a stable median
    on a machine with other load. Returns median, min and every run.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    while len(times) < max(1, repeats) or (sum(times) < 1e3 * min_time and len(times) < max_repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(1e3 * (time.perf_counter() - start))
    return {"ms": statistics.median(times), "min_ms": min(times), "runs_ms": times}


# -------------------------------------------------------------- one refresh each


def sngd_refresh(a: torch.Tensor, g: torch.Tensor, damping: float) -> torch.Tensor:
    """Exact SMW over all N rows: kernel + Cholesky inverse of K + lam N I."""
    k_mat = kernels.kernel(a.double(), g.double())  # the package does the small solves in float64
    return kernels.sngd_inverse(k_mat, damping, a.shape[0])


def kis_refresh(
    a_local: torch.Tensor, g_local: torch.Tensor, a_others: torch.Tensor, g_others: torch.Tensor,
    r: int, damping: float, generator: torch.Generator,
) -> torch.Tensor:
    """One worker draws r rows; the owner inverts the kernel of the s = P r gathered rows."""
    picked = kernels.kis_select(a_local, g_local, r, generator)
    a_s = torch.cat([a_local[picked], a_others])  # the other workers' (already sampled) rows
    g_s = torch.cat([g_local[picked], g_others])
    return kernels.kis_inverse(kernels.kernel(a_s.double(), g_s.double()), damping)


def kid_refresh(
    a_local: torch.Tensor, g_local: torch.Tensor, a_others: torch.Tensor, g_others: torch.Tensor,
    m_others: Sequence[torch.Tensor], r: int, damping: float, num_global: int,
) -> torch.Tensor:
    """One worker's local factorization; the owner forms C = (M^-1 + K_S)^-1 over the skeleton."""
    pivots, m_factor = kernels.kid_local(kernels.kernel(a_local.double(), g_local.double()), r, damping, num_global)
    a_s = torch.cat([a_local[pivots], a_others])
    g_s = torch.cat([g_local[pivots], g_others])
    m_full = torch.block_diag(m_factor, *(m.double() for m in m_others))
    return kernels.kid_inverse(kernels.kernel(a_s.double(), g_s.double()), m_full)


def kfac_refresh(a_local: torch.Tensor, g_local: torch.Tensor) -> tuple:
    """K-FAC factor refresh: A^T A / n, G^T G / n and the eigendecomposition of both."""
    n = a_local.shape[0]
    factor_a = a_local.T @ a_local / n
    factor_g = g_local.T @ g_local / n
    return torch.linalg.eigh(factor_a), torch.linalg.eigh(factor_g)


def kis_generator(device: torch.device, seed: int) -> torch.Generator:
    """A seeded generator that ``kernels.kis_select`` accepts for rows on ``device``: one on the
    device where it samples there, else a CPU one (where it samples on the host)."""
    a, g = torch.ones(4, 3, device=device), torch.ones(4, 2, device=device)
    for where in (device, torch.device("cpu")):
        generator = torch.Generator(device=where)
        try:
            kernels.kis_select(a, g, 2, generator.manual_seed(seed))
        except RuntimeError:
            continue
        return generator.manual_seed(seed)
    raise RuntimeError(f"kernels.kis_select accepts neither a {device} nor a CPU generator for rows on {device}")


# ------------------------------------------------------------------------ driver


def machine_info(device: torch.device) -> dict:
    cpu = cpu_model() or platform.processor() or platform.machine()
    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_benchmark(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = torch.float32
    catalogue = RESNET50_LAYERS if args.network == "resnet50" else tuple((*layer, 1) for layer in LAYERS)
    layers = [l for l in catalogue if not args.layers or any(key in l[0] for key in args.layers)]
    authors = None
    if args.authors_dir:
        import authors_hylo  # noqa: E402  (benchmarks/, on sys.path above)

        authors = authors_hylo.AuthorsRefresh(authors_hylo.load_ngd_optimizer(args.authors_dir), args.damping,
                                              args.rank_ratio, device)
    workers = args.workers
    local_n = args.local_batch
    r = max(1, round(args.rank_ratio * local_n))
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    # On the CPU one generator draws the rows and the KIS samples (as the published results did);
    # elsewhere the rows are drawn on the device itself.
    data_gen = gen if device.type == "cpu" else torch.Generator(device=device).manual_seed(args.seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=data_gen, dtype=dtype, device=device)

    kis_gen = gen if device.type == "cpu" else kis_generator(device, args.seed)

    rows = []
    kfac_cache: dict[str, dict] = {}
    for name, d_in, d_out, count in layers:
        for p in workers:
            n_global = local_n * p
            s = p * r
            a = rand(n_global, d_in)
            g = rand(n_global, d_out)
            if name.startswith("fc"):
                a[:, -1] = 1.0  # the bias column
            a_local, g_local = a[:local_n], g[:local_n]
            # The other P-1 workers' contributions as the owner receives them.
            a_others, g_others = a[local_n: local_n + (p - 1) * r], g[local_n: local_n + (p - 1) * r]
            m_others = []
            for q in range(1, p):
                k_q = kernels.kernel(a[q * local_n: (q + 1) * local_n], g[q * local_n: (q + 1) * local_n])
                piv_q, m_q = kernels.kid_local(k_q, r, args.damping, n_global)
                m_others.append(m_q)
                a_others[(q - 1) * r: (q - 1) * r + piv_q.numel()] = a[q * local_n + piv_q]
                g_others[(q - 1) * r: (q - 1) * r + piv_q.numel()] = g[q * local_n + piv_q]
            row = {"layer": name, "d_in": d_in, "d_out": d_out, "count": count, "P": p, "N": n_global, "r": r, "s": s}
            timing = dict(device=device, repeats=args.repeats, min_time=args.min_time)
            row["sngd"] = measure(lambda: sngd_refresh(a, g, args.damping), **timing)
            row["kis"] = measure(
                lambda: kis_refresh(a_local, g_local, a_others, g_others, r, args.damping, kis_gen), **timing
            )
            row["kid"] = measure(
                lambda: kid_refresh(a_local, g_local, a_others, g_others, m_others, r, args.damping, n_global),
                **timing,
            )
            if authors is not None:  # the authors' code on the same rows (benchmarks/authors_hylo.py)
                blocks = authors.kid_blocks([a[q * local_n: (q + 1) * local_n] for q in range(1, p)],
                                            [g[q * local_n: (q + 1) * local_n] for q in range(1, p)])
                row["authors_kis"] = _measure_or_failure(
                    lambda: authors.kis(a_local, g_local, a_others, g_others), timing)
                row["authors_kid"] = _measure_or_failure(
                    lambda: authors.kid(a_local, g_local, a_others, g_others, blocks), timing)
                row["kis/authors_kis"] = row["kis"]["ms"] / row["authors_kis"]["ms"]
                row["kid/authors_kid"] = row["kid"]["ms"] / row["authors_kid"]["ms"]
            # Components, for the discussion of where the time goes.
            row["components"] = {
                "sngd_kernel": measure(lambda: kernels.kernel(a, g), **timing)["ms"],
                "kid_local": measure(
                    lambda: kernels.kid_local(kernels.kernel(a_local, g_local), r, args.damping, n_global), **timing
                )["ms"],
                "kis_select": measure(lambda: kernels.kis_select(a_local, g_local, r, kis_gen), **timing)["ms"],
            }
            big = max(d_in, d_out) > args.large_dim
            if name not in kfac_cache:
                if big and args.skip_large:
                    kfac_cache[name] = {"ms": float("nan"), "note": "skipped (--skip-large)"}
                elif big:
                    res = measure(lambda: kfac_refresh(a_local, g_local), device, repeats=1, warmup=0)
                    res["note"] = "measured once, no warm-up"
                    kfac_cache[name] = res
                else:
                    kfac_cache[name] = measure(lambda: kfac_refresh(a_local, g_local), **timing)
            row["kfac"] = kfac_cache[name]
            for num, den in (("kfac", "kis"), ("kfac", "kid"), ("sngd", "kis"), ("sngd", "kid")):
                row[f"{num}/{den}"] = row[num]["ms"] / row[den]["ms"] if row[den]["ms"] > 0 else float("nan")
            rows.append(row)
            if not args.no_progress:
                print(f"  {name:<18} P={p:<3d} sngd {row['sngd']['ms']:9.2f}  kis {row['kis']['ms']:7.2f}  "
                      f"kid {row['kid']['ms']:7.2f}  kfac {row['kfac']['ms']:9.2f} ms", file=sys.stderr, flush=True)
    return {
        "machine": machine_info(device),
        "settings": {
            "local_batch": local_n,
            "workers": list(workers),
            "rank_ratio": args.rank_ratio,
            "rows_per_worker": r,
            "damping": args.damping,
            "repeats": args.repeats,
            "min_time_s": args.min_time,
            "large_dim": args.large_dim,
            "skip_large": args.skip_large,
            "dtype": "float32",
            "seed": args.seed,
            "quick": args.quick,
            "network": args.network,
            "authors_dir": args.authors_dir,
        },
        "rows": rows,
        "totals": network_totals(rows),
    }


def _measure_or_failure(fn: Callable[[], object], timing: dict) -> dict:
    """``measure(fn)``, or {"ms": nan, "error": ...} when the code under test raises (the authors' KID
    inverts its kernels without damping and can hit a singular matrix); the failure is recorded."""
    try:
        return measure(fn, **timing)
    except (RuntimeError, ValueError) as exc:  # torch.linalg.LinAlgError is a RuntimeError
        return {"ms": float("nan"), "error": f"{type(exc).__name__}: {exc}"}


def network_totals(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per P: each method's refresh ms summed over the layers, each shape times its ``count``, and
    K-FAC's and SNGD's sums as ratios to HyLo's. {str(P): {method: ms, "kfac/kis": ..., "layers": n}}."""
    totals: dict[str, dict[str, float]] = {}
    for p in sorted({row["P"] for row in rows}):
        sel = [row for row in rows if row["P"] == p]
        entry: dict[str, float] = {"layers": sum(row["count"] for row in sel)}
        for method in METHODS + AUTHORS_METHODS:
            if all(method in row for row in sel):
                failed = sum(row["count"] for row in sel if math.isnan(row[method]["ms"]))
                if failed:  # no total where some layer's refresh failed; say on how many layers
                    entry[f"{method}_failed_layers"] = failed
                else:
                    entry[method] = sum(row["count"] * row[method]["ms"] for row in sel)
        for num, den in (("kfac", "kis"), ("kfac", "kid"), ("sngd", "kis"), ("kis", "authors_kis"),
                         ("kid", "authors_kid"), ("kfac", "authors_kis"), ("kfac", "authors_kid")):
            if num in entry and den in entry and entry[den] > 0:
                entry[f"{num}/{den}"] = entry[num] / entry[den]
        totals[str(p)] = entry
    return totals


def format_table(result: dict) -> str:
    m, st = result["machine"], result["settings"]
    lines = [
        f"Refresh cost per layer (ms, median of >= {st['repeats']} calls and >= {st['min_time_s']} s; "
        f"compute only, one process), "
        f"{m['device']} {m.get('gpu', m['cpu'])}, {m['threads']} thread(s), torch {m['torch']}",
        f"local batch {st['local_batch']}, N = {st['local_batch']} P, r = {st['rows_per_worker']} rows per "
        f"worker (rank_ratio {st['rank_ratio']}), s = P r",
        "",
        f"{'layer':<18} {'P':>3} {'N':>5} {'s':>4} {'sngd':>10} {'kis':>8} {'kid':>8} {'kfac':>10}"
        f" {'kfac/kis':>9} {'kfac/kid':>9} {'sngd/kis':>9} {'sngd/kid':>9}",
    ]

    def num(x: float, width: int, fmt: str) -> str:
        return f"{'n/a':>{width}}" if (x is None or math.isnan(x)) else f"{x:>{width}{fmt}}"

    for row in result["rows"]:
        kfac_mark = "*" if "once" in row["kfac"].get("note", "") else " "
        lines.append(
            f"{row['layer']:<18} {row['P']:>3} {row['N']:>5} {row['s']:>4} "
            f"{num(row['sngd']['ms'], 10, '.2f')} {num(row['kis']['ms'], 8, '.2f')} {num(row['kid']['ms'], 8, '.2f')} "
            f"{num(row['kfac']['ms'], 9, '.1f')}{kfac_mark}"
            f" {num(row['kfac/kis'], 9, '.1f')} {num(row['kfac/kid'], 9, '.1f')}"
            f" {num(row['sngd/kis'], 9, '.1f')} {num(row['sngd/kid'], 9, '.1f')}"
        )
    if any("once" in row["kfac"].get("note", "") for row in result["rows"]):
        lines.append(f"* K-FAC factors larger than {st['large_dim']}: eigh timed once, no warm-up")
    if any("authors_kis" in row for row in result["rows"]):
        lines += ["", "The authors' code (dso.optimizers.ngd.NGDOptimizer, float32) on the same rows:", "",
                  f"{'layer':<18} {'P':>3} {'kis':>8} {'authors kis':>12} {'ratio':>6} {'kid':>8} {'authors kid':>12} "
                  f"{'ratio':>6}"]
        for row in result["rows"]:
            lines.append(f"{row['layer']:<18} {row['P']:>3} {num(row['kis']['ms'], 8, '.2f')} "
                         f"{num(row['authors_kis']['ms'], 12, '.2f')} {num(row['kis/authors_kis'], 6, '.2f')} "
                         f"{num(row['kid']['ms'], 8, '.2f')} {num(row['authors_kid']['ms'], 12, '.2f')} "
                         f"{num(row['kid/authors_kid'], 6, '.2f')}")
    if st.get("network"):
        lines += ["", f"Summed over {st['network']} (each shape times its layer count), ms per refresh:", ""]
        for p, entry in result["totals"].items():
            parts = [f"{k} {v:.1f}" if "/" not in k else f"{k} {v:.2f}" for k, v in entry.items() if k != "layers"]
            lines.append(f"P={p} ({int(entry['layers'])} layers): " + ", ".join(parts))
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    cols = min(3, len(layers))
    nrows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    styles = {"sngd": ("tab:red", "o"), "kis": ("tab:blue", "s"), "kid": ("tab:green", "^"), "kfac": ("tab:gray", "D"),
              "authors_kis": ("tab:cyan", "x"), "authors_kid": ("tab:olive", "+")}
    labels = {"sngd": "exact SNGD", "kis": "HyLo-KIS", "kid": "HyLo-KID", "kfac": "K-FAC (eigh)",
              "authors_kis": "authors' KIS", "authors_kid": "authors' KID"}
    for ax, layer in zip(axes.flat, layers):
        sel = [r for r in rows if r["layer"] == layer]
        ps = [r["P"] for r in sel]
        for method in METHODS + tuple(m for m in AUTHORS_METHODS if all(m in r for r in sel)):
            ys = [r[method]["ms"] if r[method]["ms"] is not None else float("nan") for r in sel]
            if all(math.isnan(y) for y in ys):
                continue
            color, marker = styles[method]
            ax.plot(ps, ys, marker=marker, color=color, label=labels[method],
                    linestyle="--" if method == "kfac" else ":" if method.startswith("authors") else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ps)
        ax.set_xticklabels([str(p) for p in ps])
        ax.set_title(f"{layer} (d_in {sel[0]['d_in']}, d_out {sel[0]['d_out']})", fontsize=9)
        ax.set_xlabel("workers P (N = 32 P)")
        ax.set_ylabel("ms per refresh")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"Curvature refresh cost, {m['device']} ({m.get('gpu', m['cpu'])}), "
                 f"{m['threads']} thread(s), torch {m['torch']}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the title
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _json_safe(obj):
    """NaN/inf -> None so the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[4, 16, 64],
                   help="simulated worker counts P, comma-separated")
    p.add_argument("--local-batch", type=int, default=32, help="samples per worker n (N = n P)")
    p.add_argument("--rank-ratio", type=float, default=0.1, help="HyLo rows kept per worker: max(1, round(ratio n))")
    p.add_argument("--damping", type=float, default=0.03, help="lambda used in the solves")
    p.add_argument("--repeats", type=int, default=5, help="least timed calls per measurement (after one warm-up)")
    p.add_argument("--min-time", type=float, default=0.5,
                   help="keep timing a measurement (up to 200 calls) until this many seconds are timed")
    p.add_argument("--large-dim", type=int, default=2000,
                   help="K-FAC factors larger than this are eigendecomposed once only")
    p.add_argument("--skip-large", action="store_true", help="skip K-FAC for factors larger than --large-dim")
    p.add_argument("--layers", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], default=None,
                   help="only layers whose name contains one of these comma-separated strings")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 0 keeps torch's default. One thread by default: on a small shared "
                        "machine, multi-threaded BLAS/LAPACK timings swing 10-100x with other load")
    p.add_argument("--seed", type=int, default=0, help="seed of the random rows and the KIS draws")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: two small layers, P in {4, 16}, 2 repeats, large K-FAC skipped")
    p.add_argument("--network", choices=("resnet50",), default=None,
                   help="every layer shape of this network with its count (and totals over the network) instead "
                        "of the six representative shapes; files precondition_cost_<network>.*")
    p.add_argument("--authors-dir", default=None,
                   help="root of a checkout of the authors' code (https://github.com/hylo-dso/hylo): time its KIS "
                        "and KID refresh on the same rows (benchmarks/authors_hylo.py)")
    p.add_argument("--out-dir", default=str(RESULTS_DIR), help="where the JSON and PNG go")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only")
    p.add_argument("--no-progress", action="store_true", help="no per-row lines on stderr")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.layers = args.layers or ["64->64", "1024->256"]
        args.workers = [4, 16]
        args.repeats = min(args.repeats, 2)
        args.min_time = min(args.min_time, 0.05)
        args.skip_large = True
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = run_benchmark(args)
    result["total_seconds"] = time.perf_counter() - start
    table = format_table(result)
    result["table"] = table
    print(table)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = ("precondition_cost" + (f"_{args.network}" if args.network else "") + ("_quick" if args.quick else "")
            + ("_" + args.device.replace(":", "") if args.device != "cpu" else ""))
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(_json_safe(result), indent=2, allow_nan=False))
    print(f"\nwrote {json_path}")
    if not args.no_plot:
        png_path = out_dir / f"{stem}.png"
        plot(result, png_path)
        print(f"wrote {png_path}")
    print(f"total {result['total_seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
