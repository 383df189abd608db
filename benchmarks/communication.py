"""Bytes per curvature refresh: HyLo (KIS, KID), exact SNGD and KFAC.

Two parts:

1. Analytic traffic for the full ResNet-50 layer list (53 convs + fc) at P workers, from
   ``hylo_refresh_bytes`` (a formula that mirrors the package exactly, importing its row budget
   (``ds_hylo.reduce.row_budget``) and owner assignment (``ds_hylo.exchange.assign_owners``)) and
   ``kfac_refresh_bytes`` (kfac-pytorch's factor all-reduce, with and without the symmetric
   upper-triangle packing, and with the broadcast of eigendecompositions).
2. Measured traffic on 2 real gloo CPU ranks for a small MLP and a small CNN: one HyLo step with
   ``update_freq=1`` per configuration, then ``opt.preconditioner.comm.bytes_sent`` is compared with
   the formula, per rank and per collective. They must match exactly.

Two conventions are reported, because they rank the methods differently:

- ``payload``: what each rank contributes to a collective, which is what
  ``ds_hylo.exchange.Exchange.bytes_sent`` counts. All-gather: the rank's own piece; broadcast: the
  buffer, counted on the source only; all-reduce: the whole buffer.
- ``recv``: the bytes every rank must receive with bandwidth-optimal algorithms, i.e. the
  bandwidth term of the collective's time. All-gather of m bytes per rank: (P-1) m; broadcast of
  m bytes: m on every non-source rank; all-reduce of m bytes: 2 (P-1)/P m (ring or
  reduce-scatter + all-gather). The payload convention makes an all-gather look P times cheaper
  than it is on the wire; ``recv`` is the fair one for "does HyLo move fewer bytes than KFAC?".

Per-refresh traffic only: the gradient all-reduce that every data-parallel method does each step
is excluded, and so are KFAC's per-step preconditioned-gradient broadcasts (kfac-pytorch's
MEM_OPT strategy); HyLo has no per-step traffic beyond the gradient all-reduce.

Run:  python benchmarks/communication.py            (writes benchmarks/results/communication.{json,png})
      python benchmarks/communication.py --no-measure --workers 8 64 --batch 32
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from ds_hylo.exchange import assign_owners, contributors  # noqa: E402  (the package's rules, not copies)
from ds_hylo.reduce import row_budget  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
MB = 1e6
C_BYTES = 8  # C is broadcast as its upper triangle in float64, whatever the rows' dtype
INT64_BYTES = 8

# --------------------------------------------------------------------------- layer lists


@dataclass(frozen=True)
class LayerSpec:
    """One preconditioned layer: gradient matrix (d_out, d_in), bias folded into d_in.

    rows_per_sample: captured kernel rows per sample (1 for Linear on 2-D inputs and for Conv2d
    under the "reduce" convention; the sequence length for Linear on sequences with "expand").
    """

    name: str
    d_in: int
    d_out: int
    rows_per_sample: int = 1


def resnet50_layers(num_classes: int = 1000) -> list[LayerSpec]:
    """The 54 layers of torchvision's ResNet-50 (v1.5) in ``named_modules`` order.

    Stem conv 7x7 3->64; bottleneck stages of [3, 4, 6, 3] blocks with widths 64/128/256/512 and
    expansion 4 (conv1 1x1, conv2 3x3, conv3 1x1, and a 1x1 downsample in each stage's first
    block); fc 2048 -> 1000 with bias. Convs have no bias: d_in = C_in * k * k.
    """
    layers = [LayerSpec("conv1", 3 * 7 * 7, 64)]
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for b in range(blocks):
            prefix = f"layer{stage}.{b}"
            layers += [
                LayerSpec(f"{prefix}.conv1", inplanes, planes),
                LayerSpec(f"{prefix}.conv2", planes * 9, planes),
                LayerSpec(f"{prefix}.conv3", planes, planes * 4),
            ]
            if b == 0:
                layers.append(LayerSpec(f"{prefix}.downsample.0", inplanes, planes * 4))
            inplanes = planes * 4
    layers.append(LayerSpec("fc", 2048 + 1, num_classes))
    return layers


def layer_specs(model: nn.Module) -> list[LayerSpec]:
    """LayerSpecs of a model's Linear / Conv2d layers (2-D inputs, conv "reduce"), from module attributes."""
    specs = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            specs.append(LayerSpec(name, module.in_features + int(module.bias is not None), module.out_features))
        elif type(module) is nn.Conv2d:
            kh, kw = module.kernel_size
            d_in = module.in_channels // module.groups * kh * kw + int(module.bias is not None)
            specs.append(LayerSpec(name, d_in, module.out_channels))
    return specs


# --------------------------------------------------------------------------- formulas


def hylo_refresh_bytes(
    layers: Sequence[LayerSpec],
    mode: Union[str, Mapping[str, str]],
    world_size: int,
    local_batch: Union[int, Sequence[int]],
    rank_ratio: float,
    max_global_samples: Optional[int] = None,
    dtype_bytes: int = 4,
    contributing_ranks: Optional[int] = None,
    refresh_index: int = 0,
) -> dict[str, Any]:
    """Bytes one HyLo curvature refresh sends, per rank and per collective (mirrors the implementation).

    With n_p = rows_per_sample * local_batch[p] captured rows of a layer on rank p, the refresh of
    ``ds_hylo.preconditioner.Preconditioner._refresh`` does:

    1. ``all_gather`` of an int64 table of 2 L ints (L layers: local row count, row budget):
       16 L bytes per rank.
    2. ``all_gather`` of one fused float buffer (float64 if any captured row is float64, else
       float32). Per layer: r_p = n_p for "sngd", else min(n_p, max(1, round(rank_ratio * n_p)),
       max(1, max_global_samples // P) if set); every rank pads to r_pad = max_p r_p and sends
       r_pad (d_in + d_out) floats, + r_pad^2 for KID's factor of M_p, + 1 float (valid rows).
    3. Each layer's s x s matrix C, s = sum_p r_p (the valid rows; KID assumed full rank, i.e. the
       pivoted Cholesky finds r_p pivots), is inverted by one owner: greedy longest-first by s^3,
       ties to the lower layer index and the lower rank. Every owner broadcasts one buffer with
       the upper triangle of each owned layer's C and its apply's cancellation factor in float64
       ((s(s+1)/2 + 1) * 8 bytes); only the source's send is counted.
       Nothing is sent with P = 1 (``SingleProcess``).

    Args:
        layers: the preconditioned layers in ``named_modules`` order (the order matters only for
            owner ties).
        mode: "kis", "kid" or "sngd", or a mapping layer name -> mode (hybrid refreshes).
        world_size: P.
        local_batch: samples per rank (an int: equal shards; a sequence: one entry per rank).
        rank_ratio, max_global_samples: as in ``HyLoConfig``.
        dtype_bytes: 4 for float32 rows, 8 for float64.
        contributing_ranks, refresh_index: with k = contributing_ranks < P, only the k ranks of
            ``ds_hylo.exchange.contributors(refresh_index, P, k)`` contribute rows, and each of them
            broadcasts the fused buffer instead of one all-gather (2. above): the rows gathered
            and the bytes every rank receives no longer grow with P.

    Returns a dict:
        per_rank: list over ranks of {op: payload bytes} (what ``Exchange.bytes_sent`` holds);
        calls: list over ranks of {op: number of calls} (``Exchange.calls``);
        total: {op: payload bytes summed over ranks};
        mean_per_rank, max_per_rank: payload bytes (all ops);
        recv_per_rank: mean over ranks of the bytes a rank must receive (bandwidth-optimal);
        r_pad, s: per layer; owners: owning rank per layer.
    """
    P = world_size
    shards = [local_batch] * P if isinstance(local_batch, int) else list(local_batch)
    if len(shards) != P:
        raise ValueError(f"local_batch has {len(shards)} entries for world_size {P}")
    modes = [mode if isinstance(mode, str) else mode[layer.name] for layer in layers]
    L = len(layers)
    sources = contributors(refresh_index, P, contributing_ranks)
    if sources is not None:
        shards = [n if p in sources else 0 for p, n in enumerate(shards)]
    r_pad, s_rows, floats = [], [], 0
    for layer, m in zip(layers, modes):
        budgets = [row_budget(m, layer.rows_per_sample * n, rank_ratio, P, max_global_samples) for n in shards]
        pad = max(budgets)
        r_pad.append(pad)
        s_rows.append(sum(budgets))
        floats += pad * (layer.d_in + layer.d_out) + (pad * pad if m == "kid" else 0) + 1
    owners = assign_owners([s**3 for s in s_rows], P)
    empty = {"per_rank": [{} for _ in range(P)], "calls": [{} for _ in range(P)], "total": {},
             "mean_per_rank": 0.0, "max_per_rank": 0, "recv_per_rank": 0.0,
             "r_pad": r_pad, "s": s_rows, "owners": owners}
    if P == 1 or L == 0:
        return empty
    table_bytes = 2 * L * INT64_BYTES
    gather_bytes = floats * dtype_bytes
    bcast = [0] * P
    for i, owner in enumerate(owners):
        # upper triangle of C and the layer's cancellation factor, float64
        bcast[owner] += (s_rows[i] * (s_rows[i] + 1) // 2 + 1) * C_BYTES
    if sources is not None:  # rows go out by one broadcast per contributing rank
        rows_bcast = [gather_bytes if p in sources else 0 for p in range(P)]
        gathered = 0
    else:
        rows_bcast = [0] * P
        gathered = gather_bytes
    per_rank, calls = [], []
    for p in range(P):
        sent = {"all_gather": table_bytes + gathered}
        n_calls = {"all_gather": 1 if sources is not None else 2}
        n_bcast = int(bool(bcast[p])) + int(bool(rows_bcast[p]))
        if n_bcast:
            sent["broadcast"] = bcast[p] + rows_bcast[p]
            n_calls["broadcast"] = n_bcast
        per_rank.append(sent)
        calls.append(n_calls)
    totals = [sum(d.values()) for d in per_rank]
    recv = [(P - 1) * (table_bytes + gathered) + sum(bcast) - bcast[p] + sum(rows_bcast) - rows_bcast[p]
            for p in range(P)]
    return {
        "per_rank": per_rank,
        "calls": calls,
        "total": {"all_gather": P * (table_bytes + gathered), "broadcast": sum(bcast) + sum(rows_bcast)},
        "mean_per_rank": sum(totals) / P,
        "max_per_rank": max(totals),
        "recv_per_rank": sum(recv) / P,
        "r_pad": r_pad,
        "s": s_rows,
        "owners": owners,
    }


def kfac_refresh_bytes(
    layers: Sequence[LayerSpec],
    world_size: int,
    triangular: bool = False,
    eigen_broadcast: bool = False,
    dtype_bytes: int = 4,
) -> dict[str, Any]:
    """Bytes of one KFAC factor + inverse refresh (kfac-pytorch conventions), per rank.

    Factors A (d_in x d_in, bias folded in) and G (d_out x d_out) of every layer are all-reduced:
    d_in^2 + d_out^2 floats per rank (``triangular``: d(d+1)/2 each, kfac-pytorch's
    ``symmetry_aware`` packing). With ``eigen_broadcast`` (kfac-pytorch's COMM_OPT distributed
    inversion), each layer's eigendecompositions (Q_A, lambda_A, Q_G, lambda_G: d_in^2 + d_in +
    d_out^2 + d_out floats) are computed by one owner (greedy by d_in^3 + d_out^3) and broadcast.
    """
    P = world_size
    if P == 1:
        return {"per_rank": [{}], "total": {}, "mean_per_rank": 0.0, "max_per_rank": 0, "recv_per_rank": 0.0}

    def packed(d: int) -> int:
        return d * (d + 1) // 2 if triangular else d * d

    reduce_bytes = sum(packed(l.d_in) + packed(l.d_out) for l in layers) * dtype_bytes
    bcast = [0] * P
    if eigen_broadcast:
        owners = assign_owners([l.d_in**3 + l.d_out**3 for l in layers], P)
        for l, owner in zip(layers, owners):
            bcast[owner] += (l.d_in**2 + l.d_in + l.d_out**2 + l.d_out) * dtype_bytes
    per_rank = []
    for p in range(P):
        sent = {"all_reduce": reduce_bytes}
        if bcast[p]:
            sent["broadcast"] = bcast[p]
        per_rank.append(sent)
    totals = [sum(d.values()) for d in per_rank]
    recv = [2 * (P - 1) / P * reduce_bytes + sum(bcast) - bcast[p] for p in range(P)]
    return {
        "per_rank": per_rank,
        "total": {"all_reduce": P * reduce_bytes, "broadcast": sum(bcast)},
        "mean_per_rank": sum(totals) / P,
        "max_per_rank": max(totals),
        "recv_per_rank": sum(recv) / P,
    }


# --------------------------------------------------------------------------- analytic tables

KFAC_REF = "kfac-triu"  # the reference KFAC variant for ratios: upper-triangle all-reduce of the factors


def analytic_methods(global_budget: int) -> list[tuple[str, Callable[..., dict[str, Any]]]]:
    """(label, fn(layers, P, batch, rank_ratio) -> result) for every compared method."""
    return [
        ("hylo-kis", lambda L, P, n, rr: hylo_refresh_bytes(L, "kis", P, n, rr)),
        ("hylo-kid", lambda L, P, n, rr: hylo_refresh_bytes(L, "kid", P, n, rr)),
        (f"hylo-kis-g{global_budget}", lambda L, P, n, rr: hylo_refresh_bytes(L, "kis", P, n, rr, global_budget)),
        (f"hylo-kid-g{global_budget}", lambda L, P, n, rr: hylo_refresh_bytes(L, "kid", P, n, rr, global_budget)),
        ("sngd", lambda L, P, n, rr: hylo_refresh_bytes(L, "sngd", P, n, rr)),
        ("kfac-full", lambda L, P, n, rr: kfac_refresh_bytes(L, P)),
        ("kfac-triu", lambda L, P, n, rr: kfac_refresh_bytes(L, P, triangular=True)),
        ("kfac-triu+eig", lambda L, P, n, rr: kfac_refresh_bytes(L, P, triangular=True, eigen_broadcast=True)),
    ]


def analytic_rows(layers, workers, batches, rank_ratio, global_budget) -> list[dict[str, Any]]:
    rows = []
    for n in batches:
        for P in workers:
            results = {label: fn(layers, P, n, rank_ratio) for label, fn in analytic_methods(global_budget)}
            ref, sngd = results[KFAC_REF], results["sngd"]
            for label, res in results.items():
                row = {
                    "local_batch": n,
                    "workers": P,
                    "method": label,
                    "payload_mb_per_rank": res["mean_per_rank"] / MB,
                    "payload_mb_max_rank": res["max_per_rank"] / MB,
                    "payload_mb_total": sum(res["total"].values()) / MB,
                    "recv_mb_per_rank": res["recv_per_rank"] / MB,
                    "payload_vs_kfac": res["mean_per_rank"] / ref["mean_per_rank"],
                    "recv_vs_kfac": res["recv_per_rank"] / ref["recv_per_rank"],
                    "recv_vs_sngd": res["recv_per_rank"] / sngd["recv_per_rank"],
                    "payload_by_op_total_mb": {k: v / MB for k, v in res["total"].items()},
                }
                if "s" in res:
                    row["r_per_rank"] = res["r_pad"][0]
                    row["s_per_layer"] = res["s"][0]
                rows.append(row)
    return rows


def crossover(layers, workers, batches, rank_ratio) -> list[dict[str, Any]]:
    """Largest global samples per layer s = P r at which HyLo still moves fewer bytes than KFAC-triu.

    Scans r = 1 .. local_batch rows per rank (the budget max_global_samples = P r, any
    rank_ratio) and reports, per mode and convention, the largest s that beats KFAC-triu
    (None: not even r = 1; "all": every r up to the whole local batch beats it).
    """
    out = []
    for n in batches:
        for P in workers:
            ref = kfac_refresh_bytes(layers, P, triangular=True)
            entry: dict[str, Any] = {"local_batch": n, "workers": P, "s_at_rank_ratio": P * max(1, round(rank_ratio * n))}
            for mode in ("kis", "kid"):
                for conv, key in (("payload", "mean_per_rank"), ("recv", "recv_per_rank")):
                    best: Any = None
                    for r in range(1, n + 1):
                        res = hylo_refresh_bytes(layers, mode, P, n, 1.0, max_global_samples=P * r)
                        if res[key] >= ref[key]:
                            break
                        best = P * r
                    else:
                        best = "all"
                    entry[f"{mode}_{conv}_max_s"] = best
            out.append(entry)
    return out


def crossover_workers(layers, batches, rank_ratio, max_workers: int = 4096) -> list[dict[str, Any]]:
    """Smallest power-of-two P at which HyLo (fixed per-rank r from rank_ratio, no global budget)
    moves more bytes per rank than KFAC-triu, per mode and convention (None: not up to max_workers)."""
    out = []
    for n in batches:
        entry: dict[str, Any] = {"local_batch": n, "r": max(1, round(rank_ratio * n))}
        for mode in ("kis", "kid"):
            for conv, key in (("payload", "mean_per_rank"), ("recv", "recv_per_rank")):
                first, P = None, 2
                while P <= max_workers:
                    if hylo_refresh_bytes(layers, mode, P, n, rank_ratio)[key] >= kfac_refresh_bytes(layers, P, True)[key]:
                        first = P
                        break
                    P *= 2
                entry[f"{mode}_{conv}_first_P"] = first
        out.append(entry)
    return out


def budget_scaling(layers, global_budget, batch, rank_ratio, workers=(64, 256, 512, 1024, 2048, 4096)) -> list[dict[str, Any]]:
    """HyLo-KIS with the global budget vs KFAC-triu at large P: r = max(1, budget // P) floors at
    one row per rank, so for P > budget the gathered s = P exceeds the budget and traffic grows again."""
    rows = []
    for P in workers:
        h = hylo_refresh_bytes(layers, "kis", P, batch, rank_ratio, max_global_samples=global_budget)
        k = kfac_refresh_bytes(layers, P, triangular=True)
        rows.append({"workers": P, "local_batch": batch, "s": h["s"][0],
                     "hylo_recv_mb": h["recv_per_rank"] / MB, "kfac_triu_recv_mb": k["recv_per_rank"] / MB,
                     "hylo_payload_mb": h["mean_per_rank"] / MB, "kfac_triu_payload_mb": k["mean_per_rank"] / MB})
    return rows


def per_layer_breakeven(layers: Sequence[LayerSpec]) -> list[dict[str, Any]]:
    """Per layer, in the recv convention at large P: HyLo-KIS moves ~ s (d_in + d_out) + s^2 floats per
    rank, KFAC-triu ~ d_in^2 + d_out^2 (2(P-1)/P * half the squares). Break-even s solves
    s^2 + s (d_in + d_out) = d_in^2 + d_out^2."""
    rows = []
    for l in layers:
        b, c = l.d_in + l.d_out, l.d_in**2 + l.d_out**2
        s_star = (-b + (b * b + 4 * c) ** 0.5) / 2
        rows.append({"name": l.name, "d_in": l.d_in, "d_out": l.d_out, "breakeven_s": s_star})
    return rows


# --------------------------------------------------------------------------- measured (2 gloo ranks)


class SmallMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 32)
        self.fc2 = nn.Linear(32, 16)
        self.fc3 = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, bias=False)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.tanh(self.conv1(x))))
        return self.fc(h.mean(dim=(2, 3)))


def build_small_model(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = {"mlp": SmallMLP, "cnn": SmallCNN}[name]()
    return model.to(dtype)


def small_batch(name: str, n: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    shape = (n, 20) if name == "mlp" else (n, 1, 8, 8)
    return torch.randn(shape, generator=gen).to(dtype), torch.randint(0, 10, (n,), generator=gen)


DEFAULT_CASES: list[dict[str, Any]] = [
    {"model": m, "mode": mode, "rank_ratio": 0.25, "shards": [16, 16]}
    for m in ("mlp", "cnn") for mode in ("kis", "kid", "sngd")
] + [
    {"model": "cnn", "mode": "kis", "rank_ratio": 0.25, "shards": [16, 16], "max_global_samples": 4},
    {"model": "mlp", "mode": "kid", "rank_ratio": 0.25, "shards": [16, 10]},
    {"model": "mlp", "mode": "sngd", "rank_ratio": 0.25, "shards": [16, 10]},
    {"model": "mlp", "mode": "kid", "rank_ratio": 0.25, "shards": [16, 16], "dtype": "float64"},
]


def case_label(case: Mapping[str, Any]) -> str:
    label = f"{case['model']}/{case['mode']} n={'+'.join(map(str, case['shards']))}"
    if case.get("max_global_samples"):
        label += f" g={case['max_global_samples']}"
    if case.get("contributing_ranks"):
        label += f" k={case['contributing_ranks']}"
    if case.get("dtype", "float32") != "float32":
        label += f" {case['dtype']}"
    return label


def measure_worker(cases: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """On each rank: one HyLo step per case; returns the Exchange counters (runs under spawn_ranks)."""
    from ds_hylo import HyLo

    rank, world = dist.get_rank(), dist.get_world_size()
    records = []
    for case in cases:
        dtype = getattr(torch, case.get("dtype", "float32"))
        shards = list(case["shards"])
        model = build_small_model(case["model"], dtype)
        x, y = small_batch(case["model"], sum(shards), dtype)
        start = sum(shards[:rank])
        xs, ys = x[start: start + shards[rank]], y[start: start + shards[rank]]
        opt = HyLo(model, lr=0.01, mode=case["mode"], rank_ratio=case["rank_ratio"], update_freq=1,
                   max_global_samples=case.get("max_global_samples"),
                   contributing_ranks=case.get("contributing_ranks"))
        loss = F.cross_entropy(model(xs), ys)
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        opt.step()
        pre = opt.preconditioner
        records.append({
            "bytes_sent": dict(pre.comm.bytes_sent),
            "calls": dict(pre.comm.calls),
            "s": [pre.factors[name].a.shape[0] if name in pre.factors else None for name in pre.layers],
            "layers": list(pre.layers),
        })
        pre.remove_hooks()
    return records


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn_entry(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.save({"ok": True, "result": fn(*args)}, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, Path(out_dir) / f"rank{rank}.pt")
        raise
    finally:
        dist.destroy_process_group()


def spawn_ranks(fn: Callable, *args: Any, world_size: int = 2, timeout: float = 300) -> list[Any]:
    """Run module-level ``fn(*args)`` on ``world_size`` gloo CPU processes; per-rank results in rank order."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_spawn_entry, args=(r, world_size, port, out_dir, fn, args))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
        results = []
        for r in range(world_size):
            path = Path(out_dir) / f"rank{r}.pt"
            if not path.exists():
                raise RuntimeError(f"rank {r} produced no result (exit code {procs[r].exitcode})")
            payload = torch.load(path, weights_only=False)
            if not payload["ok"]:
                raise RuntimeError(f"rank {r} failed:\n{payload['error']}")
            results.append(payload["result"])
    LAST_EXITCODES[:] = [p.exitcode for p in procs]
    return results


LAST_EXITCODES: list[Optional[int]] = []  # exit codes of the last spawn_ranks call (results were already saved)


def measure(cases: Sequence[Mapping[str, Any]] = DEFAULT_CASES, world_size: int = 2) -> list[dict[str, Any]]:
    """Measured vs analytic bytes per case and rank; ``match`` is True when bytes and call counts agree."""
    per_rank = spawn_ranks(measure_worker, list(cases), world_size=world_size)
    out = []
    for i, case in enumerate(cases):
        dtype = getattr(torch, case.get("dtype", "float32"))
        layers = layer_specs(build_small_model(case["model"]))
        ana = hylo_refresh_bytes(layers, case["mode"], world_size, case["shards"], case["rank_ratio"],
                                 case.get("max_global_samples"), dtype_bytes=torch.finfo(dtype).bits // 8,
                                 contributing_ranks=case.get("contributing_ranks"))
        ranks = []
        for r in range(world_size):
            rec = per_rank[r][i]
            ranks.append({
                "measured": rec["bytes_sent"], "analytic": ana["per_rank"][r],
                "measured_calls": rec["calls"], "analytic_calls": ana["calls"][r],
                "measured_s": rec["s"], "analytic_s": ana["s"],
            })
        match = all(
            x["measured"] == x["analytic"] and x["measured_calls"] == x["analytic_calls"]
            and x["measured_s"] == x["analytic_s"] for x in ranks
        ) and [l.name for l in layers] == per_rank[0][i]["layers"]
        out.append({"case": dict(case), "label": case_label(case), "ranks": ranks, "match": match,
                    "exitcodes": list(LAST_EXITCODES)})
    return out


# --------------------------------------------------------------------------- output


def format_analytic(rows: list[dict[str, Any]]) -> str:
    head = (f"{'n':>4} {'P':>4} {'method':<15} {'r':>3} {'s':>6} {'payload MB/rank':>15} {'(max rank)':>10} "
            f"{'recv MB/rank':>12} {'payload/KFAC':>12} {'recv/KFAC':>9} {'recv/SNGD':>9}")
    lines = [head, "-" * len(head)]
    last = None
    for row in rows:
        key = (row["local_batch"], row["workers"])
        if last is not None and key != last:
            lines.append("")
        last = key
        r = row.get("r_per_rank", "")
        s = row.get("s_per_layer", "")
        lines.append(
            f"{row['local_batch']:>4} {row['workers']:>4} {row['method']:<15} {r!s:>3} {s!s:>6} "
            f"{row['payload_mb_per_rank']:>15.3f} {row['payload_mb_max_rank']:>10.3f} {row['recv_mb_per_rank']:>12.2f} "
            f"{row['payload_vs_kfac']:>12.4f} {row['recv_vs_kfac']:>9.3f} {row['recv_vs_sngd']:>9.4f}"
        )
    return "\n".join(lines)


def format_measured(results: list[dict[str, Any]]) -> str:
    head = f"{'case':<28} {'rank':>4} {'op':<11} {'measured B':>11} {'analytic B':>11} {'calls m/a':>9}  ok"
    lines = [head, "-" * len(head)]
    for res in results:
        for r, x in enumerate(res["ranks"]):
            for op in sorted(set(x["measured"]) | set(x["analytic"])):
                m, a = x["measured"].get(op, 0), x["analytic"].get(op, 0)
                cm, ca = x["measured_calls"].get(op, 0), x["analytic_calls"].get(op, 0)
                lines.append(f"{res['label']:<28} {r:>4} {op:<11} {m:>11} {a:>11} {f'{cm}/{ca}':>9}  "
                             f"{'yes' if (m, cm) == (a, ca) else 'NO'}")
        lines.append(f"{'':<28} s per layer measured {res['ranks'][0]['measured_s']} analytic "
                     f"{res['ranks'][0]['analytic_s']} -> {'MATCH' if res['match'] else 'MISMATCH'}")
    return "\n".join(lines)


def format_crossover(rows: list[dict[str, Any]], by_workers: list[dict[str, Any]]) -> str:
    head = (f"{'n':>4} {'P':>4} {'s at ratio':>10} {'KIS payload':>11} {'KIS recv':>9} {'KID payload':>11} {'KID recv':>9}")
    lines = ["largest global samples per layer s = P*r with fewer bytes than KFAC-triu "
             "(None: not even r=1; all: up to r = local batch)", head, "-" * len(head)]
    for row in rows:
        lines.append(f"{row['local_batch']:>4} {row['workers']:>4} {row['s_at_rank_ratio']:>10} "
                     f"{row['kis_payload_max_s']!s:>11} {row['kis_recv_max_s']!s:>9} "
                     f"{row['kid_payload_max_s']!s:>11} {row['kid_recv_max_s']!s:>9}")
    lines += ["", "first P (powers of 2 up to 4096) where HyLo at the fixed per-rank r exceeds KFAC-triu "
              "(None: never)", f"{'n':>4} {'r':>3} {'KIS payload':>11} {'KIS recv':>9} {'KID payload':>11} {'KID recv':>9}"]
    for row in by_workers:
        lines.append(f"{row['local_batch']:>4} {row['r']:>3} {row['kis_payload_first_P']!s:>11} "
                     f"{row['kis_recv_first_P']!s:>9} {row['kid_payload_first_P']!s:>11} {row['kid_recv_first_P']!s:>9}")
    return "\n".join(lines)


def plot(layers, batches, rank_ratio, global_budget, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ps = [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    methods = analytic_methods(global_budget)
    fig, axes = plt.subplots(2, len(batches), figsize=(6.2 * len(batches), 9.8), squeeze=False, sharey="row")
    styles = {"hylo-kis": "C0-o", "hylo-kid": "C1-s", f"hylo-kis-g{global_budget}": "C0--o",
              f"hylo-kid-g{global_budget}": "C1--s", "sngd": "C3-^", "kfac-full": "C2:", "kfac-triu": "C2-",
              "kfac-triu+eig": "C2-."}
    for col, n in enumerate(batches):
        for row, (key, title) in enumerate((("mean_per_rank", "payload sent per rank (Exchange.bytes_sent)"),
                                            ("recv_per_rank", "bytes received per rank (bandwidth-optimal)"))):
            ax = axes[row][col]
            for label, fn in methods:
                values = [fn(layers, P, n, rank_ratio)[key] / MB for P in ps]
                ax.plot(ps, values, styles.get(label, "-"), label=label, markersize=4)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"ResNet-50, local batch {n}: {title}", fontsize=9)
            ax.set_xlabel("workers P")
            ax.set_ylabel("MB per refresh")
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9)
    fig.suptitle(f"Bytes per curvature refresh, fp32, rank_ratio={rank_ratio}, global budget {global_budget}")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def discussion(rows, cross, cross_p, scaling, breakeven, global_budget) -> list[str]:
    """When does HyLo move fewer bytes than KFAC? Sentences built from the computed numbers."""
    kis = [r for r in rows if r["method"] == "hylo-kis"]
    worst_payload = max(kis, key=lambda r: r["payload_vs_kfac"])
    recv_s = sorted({c[f"{m}_recv_max_s"] for c in cross for m in ("kis", "kid") if isinstance(c[f"{m}_recv_max_s"], int)})
    be = sorted(breakeven, key=lambda b: b["breakeven_s"])
    lines = [
        f"payload convention (Exchange.bytes_sent): HyLo-KIS sends at most {worst_payload['payload_vs_kfac']:.3f}x "
        f"KFAC-triu's all-reduce buffer at every listed scale (worst: n={worst_payload['local_batch']}, "
        f"P={worst_payload['workers']}); this convention counts one rank's share of an all-gather, which hides the "
        f"factor P-1 every rank receives, so it flatters HyLo.",
        f"recv convention (bandwidth term): per layer HyLo moves ~ s (d_in + d_out) + s^2 floats per rank, KFAC-triu "
        f"~ d_in^2 + d_out^2, independent of P. On ResNet-50 HyLo wins while the gathered samples per layer s = P r "
        f"stay below about {recv_s[0] if recv_s else '?'}-{recv_s[-1] if recv_s else '?'} (whatever P is).",
    ]
    for c in cross_p:
        lines.append(f"with a fixed r = round(rank_ratio n) = {c['r']} rows per rank (n = {c['local_batch']}), "
                     f"HyLo-KIS first exceeds KFAC-triu (recv) at P = {c['kis_recv_first_P']}.")
    inside = [x for x in scaling if x["hylo_recv_mb"] < x["kfac_triu_recv_mb"]]
    outside = [x for x in scaling if x["hylo_recv_mb"] >= x["kfac_triu_recv_mb"]]
    lines.append(
        f"global budget {global_budget}: s = {global_budget} and {scaling[0]['hylo_recv_mb'] / scaling[0]['kfac_triu_recv_mb']:.2f}x "
        f"KFAC-triu (recv) up to P = {global_budget}; beyond, r = max(1, budget // P) floors at one row per rank, so "
        f"s = P > budget; still below KFAC up to P = {inside[-1]['workers'] if inside else '-'}"
        + (f", above it from P = {outside[0]['workers']} ({outside[0]['hylo_recv_mb'] / outside[0]['kfac_triu_recv_mb']:.1f}x)."
           if outside else "."))
    lines.append(
        f"per layer the break-even s ranges from {be[0]['breakeven_s']:.0f} ({be[0]['name']}, "
        f"{be[0]['d_in']}->{be[0]['d_out']}) to {be[-1]['breakeven_s']:.0f} ({be[-1]['name']}, "
        f"{be[-1]['d_in']}->{be[-1]['d_out']}): narrow early layers favour KFAC, wide late layers HyLo.")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 16, 64, 256])
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 128], help="local batch per rank")
    parser.add_argument("--rank-ratio", type=float, default=0.1)
    parser.add_argument("--global-budget", type=int, default=256, help="max_global_samples of the budget variant")
    parser.add_argument("--no-measure", action="store_true", help="skip the 2-rank measurement")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    layers = resnet50_layers()
    t0 = time.perf_counter()
    rows = analytic_rows(layers, args.workers, args.batch, args.rank_ratio, args.global_budget)
    cross = crossover(layers, args.workers, args.batch, args.rank_ratio)
    cross_p = crossover_workers(layers, args.batch, args.rank_ratio)
    breakeven = per_layer_breakeven(layers)
    print(f"ResNet-50: {len(layers)} preconditioned layers, sum d_in = {sum(l.d_in for l in layers)}, "
          f"sum d_out = {sum(l.d_out for l in layers)}, fp32, rank_ratio {args.rank_ratio}")
    print("payload = Exchange.bytes_sent convention (own share of all-gathers, broadcasts at the source, "
          "whole all-reduce buffer); recv = bytes each rank must receive; ratios vs KFAC-triu")
    print(format_analytic(rows))
    print()
    print(format_crossover(cross, cross_p))
    scaling = budget_scaling(layers, args.global_budget, max(args.batch), args.rank_ratio)
    print(f"\nglobal budget {args.global_budget} at large P (local batch {max(args.batch)}): r = max(1, budget // P)")
    print(f"{'P':>5} {'s':>5} {'HyLo-KIS recv MB':>16} {'KFAC-triu recv MB':>17} {'HyLo-KIS payload MB':>19} "
          f"{'KFAC-triu payload MB':>20}")
    for row in scaling:
        print(f"{row['workers']:>5} {row['s']:>5} {row['hylo_recv_mb']:>16.1f} {row['kfac_triu_recv_mb']:>17.1f} "
              f"{row['hylo_payload_mb']:>19.2f} {row['kfac_triu_payload_mb']:>20.1f}")
    be = sorted(breakeven, key=lambda b: b["breakeven_s"])
    print(f"\nper-layer break-even s (recv, large P; s^2 + s(d_in+d_out) = d_in^2 + d_out^2): "
          f"min {be[0]['breakeven_s']:.0f} ({be[0]['name']}), median {be[len(be) // 2]['breakeven_s']:.0f}, "
          f"max {be[-1]['breakeven_s']:.0f} ({be[-1]['name']})")

    notes = discussion(rows, cross, cross_p, scaling, breakeven, args.global_budget)
    print("\nwhen does HyLo send fewer bytes than KFAC?")
    for line in notes:
        print(" - " + line)

    measured = None
    if not args.no_measure:
        t1 = time.perf_counter()
        measured = measure()
        print(f"\nmeasured on 2 gloo ranks vs hylo_refresh_bytes ({time.perf_counter() - t1:.1f} s):")
        print(format_measured(measured))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + list(sys.argv[1:])),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "settings": {"workers": args.workers, "local_batch": args.batch, "rank_ratio": args.rank_ratio,
                     "global_budget": args.global_budget, "dtype": "float32"},
        "conventions": {
            "payload": "Exchange.bytes_sent: own piece of each all-gather, broadcast counted at the "
                       "source only, the whole buffer of an all-reduce",
            "recv": "bytes a rank must receive with bandwidth-optimal collectives: all-gather (P-1)m, "
                    "broadcast m on non-source ranks, all-reduce 2(P-1)/P m",
            "kfac": "kfac-full / kfac-triu: all-reduce of A (d_in^2) and G (d_out^2) per layer, full or "
                    "upper triangle; kfac-triu+eig adds the broadcast of eigendecompositions "
                    "(Q and eigenvalues of A and G) from one owner per layer (kfac-pytorch COMM_OPT)",
            "excluded": "the per-step gradient all-reduce common to all methods",
        },
        "resnet50_layers": [asdict(l) for l in layers],
        "analytic": rows,
        "crossover": cross,
        "crossover_workers": cross_p,
        "global_budget_scaling": scaling,
        "discussion": notes,
        "per_layer_breakeven": breakeven,
        "measured": measured,
        "all_measured_match": None if measured is None else all(m["match"] for m in measured),
        "seconds": time.perf_counter() - t0,
    }
    (args.out_dir / "communication.json").write_text(json.dumps(record, indent=1))
    plot(layers, args.batch, args.rank_ratio, args.global_budget, args.out_dir / "communication.png")
    print(f"\nwrote {args.out_dir / 'communication.json'} and {args.out_dir / 'communication.png'}")
    return 0 if measured is None or record["all_measured_match"] else 1


if __name__ == "__main__":
    sys.exit(main())
