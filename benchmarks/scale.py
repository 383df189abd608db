#!/usr/bin/env python
"""HyLo at billion-parameter scale (issue 19 item 6): one layer at a time, then whole Llama-2 models.

Part 1, measured on this CPU, one ``nn.Linear`` (no bias, as in Llama) at a time at the shapes of
Llama-2 7B, 13B and 70B, fed random (tokens, d_in) inputs with a random linear loss (mean over
tokens). ``--tokens`` (16384 by default: e.g. 4 sequences of 4096) is the micro-batch of one rank.
A forward + backward at that many tokens takes minutes per layer on a 2-core CPU, so it is timed
at ``--time-tokens`` (64) and scaled linearly in tokens (the matmuls of forward and backward, and
HyLo's per-row capture work, are linear in tokens). AdamW's update is timed at full size. HyLo's
s-dependent work runs the package's code at ``--time-rows`` (32) kept rows and is scaled to the real
s: the apply (the plain step's ``HyLo.step()``: formula (*), two s x d_out x d_in products, minus
AdamW's update) linearly in s, the refresh's gather and invert (the fused gather's packing,
``Preconditioner._small_inverse``: the owner's float64 Gram, C and cancellation factor, and the
first apply's work copies) by s^2 (the Gram's 2 s^2 (d_in + d_out) dominates at these
widths). So

    AdamW step        = fwd+bwd(T) + AdamW update
    HyLo plain step   = fwd+bwd(T) + HyLo.step() with factors of s rows
    HyLo refresh step = plain step + capture(T) + gather + invert(s)

with fwd+bwd(T) and capture(T) = (refresh-step backward with capture) - (plain backward), both
timed at ``--time-tokens`` and multiplied by T / time-tokens. One timed call each (no warm-up but a
small global one). FLOPs by dtype (``ds_hylo.counters.FlopsByDtype``) are counted on the same calls
and scaled as the times (fwd+bwd: at the reduced token count, in the JSON).

HyLo rows: the package defaults (``HyLo(layer)``: KIS, rank_ratio 0.1 capped at
``max_global_samples`` = 512 rows), a cap of 1024, and no cap (``max_global_samples=None``,
s = 0.1 T, the default before the cap). Bytes held: ``ds_hylo.estimate_memory`` (at T) beside the
measured bytes of the factors a refresh of s rows leaves (rows, C, the work copy) and AdamW's state,
and, to check
the estimator on the real refresh path, a real streamed-KIS refresh step at the reduced token
count (measured vs estimated there). ``max_captured_mib`` (512 MiB of rows per layer) would refuse
a pass of T stored rows on the widest layers; streamed KIS, which draws token rows of sequences as
they arrive, is never refused (the table says where a stored-rows mode would be). A setting whose estimated peak does not fit in this
machine's free memory is not run ("does not fit"; its bytes come from ``estimate_memory``).

Part 2, analytic: whole Llama-2 7B / 13B / 70B (transformers ``LlamaForCausalLM`` built on the
meta device from their configs: 32/40/80 layers, q,k,v,o + gate,up,down, GQA k,v of 8192 x 1024
for 70B, and the untied 32000-token head, which HyLo preconditions too) at P = 8, 64, 512
data-parallel ranks with T tokens per rank per step: memory per rank (``estimate_memory``; the base
state unsharded, as with DDP), bytes one rank receives per refresh (``communication.hylo_refresh_bytes``
/ ``kfac_refresh_bytes``, bandwidth-optimal collectives), and matmul FLOPs per step as a share of
forward + backward (6 T params): HyLo's apply (4 s d_in d_out per layer) and its refresh amortised
over update_freq (float64 Gram 2 s^2 (d_in + d_out) + Cholesky s^3 / 3, split over the owners);
AdamW (2 moments, no matmul); Muon (one momentum buffer per matrix, AdamW on the rest;
Newton-Schulz 5 iterations x 6 m n min(m, n) per matrix per step, every rank: an estimate); K-FAC
(per layer factors d_in^2 + d_out^2 and their eigendecompositions as many floats again, SGD
momentum; factors 2 T (d_in^2 + d_out^2) and eigh ~ d_in^3 + d_out^3 per refresh, apply 2 d_in d_out
(d_in + d_out) per step; an estimate).

Part 3, coverage (issue 19 item 4): the share of a model's parameters HyLo preconditions, on
transformers ``LlamaForCausalLM`` built on the meta device: the 77.5M CPU Llama of
``benchmarks/step_time.py`` / ``memory_peak.py`` (vocabulary 32000, hidden 768, MLP 2048, 4 layers,
untied head), the same with ``tie_word_embeddings=True``, and Llama-2 7B. "before" counts the layers
HyLo preconditioned while ``nn.Embedding`` was a first-order fallback (every preconditioned layer
but the embeddings), "after" every layer HyLo preconditions now; the rest is listed by module kind
with the reason HyLo gives (``Preconditioner.fallback_reasons``). A tied embedding and LM head
share one parameter: both keep their plain gradient (reported, never preconditioned from one half).

Writes ``benchmarks/results/scale.json`` and ``scale.png`` and prints the tables.

    python benchmarks/scale.py                  # a few minutes on 2 CPU cores
    python benchmarks/scale.py --quick          # tiny shapes, seconds (tests)
    python benchmarks/scale.py --coverage-only  # part 3 only, into the existing scale.json (seconds)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

_REPO = Path(__file__).resolve().parents[1]
for _path in (str(_REPO), str(_REPO / "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from _env import cpu_model, git_revision, load_average  # noqa: E402
from communication import LayerSpec, hylo_refresh_bytes, kfac_refresh_bytes  # noqa: E402

import ds_hylo  # noqa: E402
from ds_hylo.counters import FlopsByDtype  # noqa: E402
from ds_hylo.exchange import GatheredRows, SingleProcess, gather_rows  # noqa: E402
from ds_hylo.memory import free_memory, held_factor_bytes  # noqa: E402
from ds_hylo.preconditioner import LayerFactors, Preconditioner  # noqa: E402
from ds_hylo.reduce import KIS, row_budget  # noqa: E402

RESULTS = _REPO / "benchmarks" / "results"
MIB, GIB = 2**20, 2**30
# (name, d_in, d_out, where Llama-2 has it)
SHAPES: tuple[tuple[str, int, int, str], ...] = (
    ("4096x4096", 4096, 4096, "7B q,k,v,o"),
    ("4096->11008", 4096, 11008, "7B gate,up"),
    ("11008->4096", 11008, 4096, "7B down"),
    ("5120->13824", 5120, 13824, "13B gate,up"),
    ("13824->5120", 13824, 5120, "13B down"),
    ("8192x8192", 8192, 8192, "70B q,o"),
    ("8192->28672", 8192, 28672, "70B gate,up"),
    ("28672->8192", 28672, 8192, "70B down"),
)
QUICK_SHAPES = (("64x64", 64, 64, "tiny"), ("64->176", 64, 176, "tiny up"), ("176->64", 176, 64, "tiny down"))
# "default" is HyLo(model): since the row cap became a default, max_global_samples=512.
CONFIGS: dict[str, dict[str, Any]] = {"default": {}, "cap 1024": {"max_global_samples": 1024},
                                      "uncapped": {"max_global_samples": None}}
SEQUENCE = 4096  # tokens per sequence of the per-layer rows


def _cap(options: dict[str, Any]) -> Any:
    """The row cap a configuration runs with: its own, or HyLoConfig's default (512)."""
    return options.get("max_global_samples", ds_hylo.HyLoConfig().max_global_samples)


QUICK_CONFIGS: dict[str, dict[str, Any]] = {"default": {}, "cap 32": {"max_global_samples": 32},
                                            "cap 16": {"max_global_samples": 16}}
LLAMA2 = {  # hidden, intermediate, layers, heads, kv heads
    "Llama-2 7B": (4096, 11008, 32, 32, 32),
    "Llama-2 13B": (5120, 13824, 40, 40, 40),
    "Llama-2 70B": (8192, 28672, 80, 64, 8),
}
QUICK_LLAMA = {"tiny Llama": (64, 176, 2, 4, 2)}
# part 3: (label, hidden, intermediate, layers, heads, kv heads, tie_word_embeddings)
COVERAGE_MODELS = (
    ("Llama 77.5M (768x4, untied)", 768, 2048, 4, 12, 12, False),
    ("Llama 77.5M (768x4, tied)", 768, 2048, 4, 12, 12, True),
    ("Llama-2 7B (untied)", 4096, 11008, 32, 32, 32, False),
)
QUICK_COVERAGE_MODELS = (("tiny Llama (untied)", 64, 176, 2, 4, 2, False), ("tiny Llama (tied)", 64, 176, 2, 4, 2, True))
BIG_MIB = 1e9  # max_captured_mib that never refuses a pass
DAMPING = 0.1  # HyLo's default
RANK_RATIO = 0.1
UPDATE_FREQ = 10


def _timed(fn) -> tuple[float, FlopsByDtype]:
    """(seconds, FLOPs by dtype) of one call."""
    with FlopsByDtype() as flops:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    return seconds, flops


def _flops(counter: FlopsByDtype) -> dict[str, float]:
    return {str(k).removeprefix("torch."): float(v) for k, v in counter.by_dtype.items()}


def _held(opt) -> int:
    """Bytes of HyLo's factors (rows, C, work copies; shared storage counted once)."""
    return held_factor_bytes(opt.preconditioner)


def _state(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))


def _loss(layer: nn.Linear, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (layer(x) * w).sum() / x.shape[0]


def measure_shape(name: str, d_in: int, d_out: int, tokens: int, time_tokens: int,
                  configs: dict[str, dict[str, Any]], time_rows: int) -> dict[str, Any]:
    """Part 1 for one shape: AdamW, then HyLo at each row setting (see the module docstring)."""
    torch.manual_seed(0)
    layer = nn.Linear(d_in, d_out, bias=False)
    x = torch.randn(time_tokens, d_in)
    w = torch.randn(time_tokens, d_out)
    scale = tokens / time_tokens
    row: dict[str, Any] = {"layer": name, "d_in": d_in, "d_out": d_out, "params": d_in * d_out,
                           "tokens": tokens, "time_tokens": time_tokens}
    # forward + backward, plain (no hooks), at the reduced token count
    fb_s, fb_flops = _timed(lambda: _loss(layer, x, w).backward())
    row["fwd_bwd_s"] = fb_s * scale
    row["fwd_bwd_flops_at_time_tokens"] = _flops(fb_flops)
    # AdamW: state made by a first step, then one timed update
    adamw = torch.optim.AdamW(layer.parameters(), lr=1e-4)
    adamw.step()
    row["adamw_update_s"], _ = _timed(adamw.step)
    row["adamw_step_s"] = row["fwd_bwd_s"] + row["adamw_update_s"]
    row["adamw_state_bytes"] = _state(adamw)
    del adamw
    layer.weight.grad = None
    # a real streamed-KIS refresh step at the reduced token count: capture cost, estimator check
    opt = ds_hylo.HyLo(layer, lr=1e-4, max_captured_mib=BIG_MIB, apply_precision="float32")
    capture_s, _ = _timed(lambda: _loss(layer, x, w).backward())
    refresh_s, refresh_flops = _timed(opt.step)
    est_small = ds_hylo.estimate_memory(layer, time_tokens, 1, max_captured_mib=BIG_MIB, apply_precision="float32")
    row["capture_s"] = max(0.0, capture_s - fb_s) * scale
    row["check_at_time_tokens"] = {
        "s": next(iter(opt.preconditioner.factors.values())).a.shape[0],
        "measured_bytes": _held(opt) + _state(opt), "estimated_bytes": est_small.total_bytes,
        "refresh_step_s": refresh_s, "refresh_flops": _flops(refresh_flops),
    }
    opt.preconditioner.remove_hooks()
    del opt
    row["hylo"] = {}
    free = free_memory("cpu") or 0
    for label, options in configs.items():
        row["hylo"][label] = measure_config(layer, tokens, options, free, row, time_rows)
        layer.weight.grad = None
    return row


def measure_config(layer: nn.Linear, tokens: int, options: dict[str, Any], free: int,
                   row: dict[str, Any], time_rows: int) -> dict[str, Any]:
    """HyLo with factors injected as a refresh at ``tokens`` rows would leave them (see the module
    docstring): bytes at the real s, times at ``time_rows`` rows scaled to s (apply linearly, the
    Gram and Cholesky by their s^2 and s^3 terms)."""
    d_in, d_out = layer.in_features, layer.out_features
    s = row_budget("kis", tokens, RANK_RATIO, 1, _cap(options))
    est = ds_hylo.estimate_memory(layer, tokens, 1, max_captured_mib=BIG_MIB, **options)
    # the rows are token rows of sequences (as in an LLM), which streamed KIS draws as they come
    refused = ds_hylo.estimate_memory(layer, tokens, 1, sequence_length=min(tokens, SEQUENCE),
                                      **options).refused_layers()
    out: dict[str, Any] = {"s": s, "options": options, "estimate": {
        "held_bytes": est.held_bytes, "base_state_bytes": est.base_state_bytes, "total_bytes": est.total_bytes,
        "workspace_bytes": est.workspace_bytes, "peak_bytes": est.peak_bytes, "phases": est.phases},
        "refused_by_default_max_captured_mib": bool(refused)}
    # what must fit: the layer's weight and gradient, the rows of this step, and HyLo's peak
    need = est.peak_bytes + 2 * d_in * d_out * 4 + tokens * (d_in + d_out) * 4
    out["fits"] = need <= 0.8 * free
    if not out["fits"]:
        out["note"] = f"does not fit: needs ~{need / GIB:.1f} GiB, {free / GIB:.1f} GiB free"
        return out
    torch.manual_seed(1)
    opt = ds_hylo.HyLo(layer, lr=1e-4, max_captured_mib=BIG_MIB, **options)
    pre: Preconditioner = opt.preconditioner
    name = next(iter(pre.layers))

    def refresh_work(rows_kept: int) -> None:
        a = torch.randn(rows_kept, d_in) / math.sqrt(d_in)
        g = torch.randn(rows_kept, d_out) / math.sqrt(d_out)
        local = KIS.reduce_sampled(a, g, rows_kept, rows_kept)
        rows = gather_rows(SingleProcess(), [local])[0]
        c_mat, amplification = Preconditioner._small_inverse("kis", GatheredRows(rows.a, rows.g, None), DAMPING, tokens)
        factors = LayerFactors(rows.a, rows.g, c_mat, DAMPING, "kis", float(amplification), torch.float32)
        factors.work_factors()
        pre.factors[name] = factors

    t_rows = min(s, time_rows)
    invert_s, invert_flops = _timed(lambda: refresh_work(t_rows))
    ratio = s / t_rows
    out["time_rows"] = t_rows
    out["invert_s"] = invert_s * ratio**2  # the Gram (s^2 (d_in + d_out)) dominates at these widths
    out["invert_flops"] = {k: v * ratio**2 for k, v in _flops(invert_flops).items()}
    # a plain step: capture off, factors current, a gradient present
    layer.weight.grad = torch.randn(d_out, d_in) * 1e-3
    opt.state.clear()
    pre.steps = 1
    pre._set_capture(False)
    opt.step()  # AdamW's state is made here (not timed); a second plain step is timed
    pre.steps = 1
    pre._set_capture(False)
    update_s, apply_flops = _timed(opt.step)
    adamw_part = row["adamw_update_s"]
    out["hylo_update_s"] = adamw_part + max(0.0, update_s - adamw_part) * ratio  # the apply is linear in s
    out["apply_flops"] = {k: v * ratio for k, v in _flops(apply_flops).items()}
    out["plain_step_s"] = row["fwd_bwd_s"] + out["hylo_update_s"]
    out["refresh_step_s"] = out["plain_step_s"] + row["capture_s"] + out["invert_s"]
    # bytes at the real s: the factors a refresh of s rows leaves (no product is run on them)
    refresh_work_bytes = torch.randn(s, d_in), torch.randn(s, d_out)
    c_real = torch.eye(s, dtype=torch.float64)
    f = LayerFactors(refresh_work_bytes[0], refresh_work_bytes[1], c_real, DAMPING, "kis", 1.0, torch.float32)
    f.work_factors()
    pre.factors[name] = f
    out["measured_held_bytes"] = _held(opt)
    out["measured_state_bytes"] = _state(opt)
    out["measured_total_bytes"] = out["measured_held_bytes"] + out["measured_state_bytes"]
    out["estimate_error"] = est.total_bytes / out["measured_total_bytes"] - 1
    pre.remove_hooks()
    return out


# ------------------------------------------------------------------------------ part 2


def llama_meta(hidden: int, inter: int, layers: int, heads: int, kv_heads: int, tied: bool = False) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    if tied:
        model.tie_weights()
    return model


def coverage(models: Sequence[tuple]) -> list[dict[str, Any]]:
    """Part 3: parameters HyLo preconditions (docs/design.md section 1.10), before (embeddings as
    first-order fallback) and after, per model; the rest by module kind, with HyLo's reason."""
    import warnings

    out = []
    for label, hidden, inter, layers, heads, kv_heads, tied in models:
        model = llama_meta(hidden, inter, layers, heads, kv_heads, tied)
        total = sum(p.numel() for p in model.parameters())  # a tied weight counted once
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tied layers' warning: reported below
            opt = ds_hylo.HyLo(model)
        pre = opt.preconditioner
        try:
            by_kind: dict[str, int] = {}
            for layer in pre.layers.values():
                kind = layer.adapter.kind
                by_kind[kind] = by_kind.get(kind, 0) + sum(p.numel() for p in layer.adapter.params())
            modules = dict(model.named_modules())
            fallback: dict[str, dict[str, Any]] = {}
            for entry in pre.fallback_layers:
                name = entry.split(" (", 1)[0]
                module = modules[name]
                key = f"{type(module).__name__}: {pre.fallback_reasons.get(name, '?')}"
                item = fallback.setdefault(key, {"modules": 0, "params": 0, "example": name})
                item["modules"] += 1
                item["params"] += sum(p.numel() for p in module.parameters(recurse=False))
        finally:
            pre.remove_hooks()
        after = sum(by_kind.values())
        before = after - by_kind.get("embedding", 0)
        out.append({"model": label, "params": total, "tied": tied, "preconditioned_by_kind": by_kind,
                    "before_params": before, "after_params": after, "before_share": before / total,
                    "after_share": after / total, "fallback": fallback})
    return out


def whole_model(models: dict[str, tuple], workers: Sequence[int], tokens: int, seq: int,
                configs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Part 2: one row per (model, P)."""
    rows = []
    for model_name, dims in models.items():
        model = llama_meta(*dims)
        params = sum(p.numel() for p in model.parameters())
        matrices = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
        step_flops = 6 * tokens * params
        refused = ds_hylo.estimate_memory(model, tokens, 1, sequence_length=seq).refused_layers()
        for P in workers:
            r: dict[str, Any] = {"model": model_name, "P": P, "params": params, "tokens_per_rank": tokens,
                                 "step_flops": step_flops, "refused_by_default_max_captured_mib": len(refused),
                                 "hylo": {}}
            specs = None
            for label, options in configs.items():
                est = ds_hylo.estimate_memory(model, tokens * P, P, sequence_length=seq, max_captured_mib=BIG_MIB,
                                              **options)
                # an Embedding's row is one int64 id (two float32 words of the fused gather), its apply
                # a gather and an index_add of s columns (docs/design.md section 1.10)
                width = {l.name: 2 if l.kind == "Embedding" else l.d_in for l in est.layers}
                hylo_specs = [LayerSpec(l.name, width[l.name], l.d_out) for l in est.layers]
                specs = [LayerSpec(l.name, l.d_in, l.d_out) for l in est.layers if l.kind != "Embedding"]  # K-FAC's
                traffic = hylo_refresh_bytes(hylo_specs, "kis", P, tokens, RANK_RATIO, _cap(options))
                apply_flops = sum(4 * l.s * (l.d_out if l.kind == "Embedding" else l.d_in * l.d_out)
                                  for l in est.layers)
                refresh_flops = sum(2 * l.s**2 * ((0 if l.kind == "Embedding" else l.d_in) + l.d_out) + l.s**3 / 3
                                    for l in est.layers) / P
                r["hylo"][label] = {
                    "s": max(l.s for l in est.layers), "base_state_bytes": est.base_state_bytes,
                    "held_bytes": est.held_bytes, "workspace_bytes": est.workspace_bytes, "phases": est.phases,
                    "total_bytes": est.total_bytes, "peak_bytes": est.peak_bytes,
                    "refresh_recv_bytes": traffic["recv_per_rank"], "apply_flops": apply_flops,
                    "refresh_flops_per_rank": refresh_flops,
                    "apply_share": apply_flops / step_flops,
                    "share_with_refresh": (apply_flops + refresh_flops / UPDATE_FREQ) / step_flops,
                }
            r["adamw"] = {"state_bytes": 8 * params, "share": 0.0}
            matrix_params = sum(m.weight.numel() for m in matrices)
            ns = sum(5 * 6 * m.in_features * m.out_features * min(m.in_features, m.out_features) for m in matrices)
            r["muon"] = {"state_bytes": 4 * matrix_params + 8 * (params - matrix_params), "ns_flops": ns,
                         "share": ns / step_flops}
            kfac_state = sum(2 * (s.d_in**2 + s.d_out**2) * 4 for s in specs) + 4 * params
            kfac_refresh = sum(2 * tokens * (s.d_in**2 + s.d_out**2) + s.d_in**3 + s.d_out**3 for s in specs)
            kfac_apply = sum(2 * s.d_in * s.d_out * (s.d_in + s.d_out) for s in specs)
            r["kfac"] = {"state_bytes": kfac_state,
                         "refresh_recv_bytes": kfac_refresh_bytes(specs, P, triangular=True)["recv_per_rank"],
                         "apply_share": kfac_apply / step_flops,
                         "share_with_refresh": (kfac_apply + kfac_refresh / P / UPDATE_FREQ) / step_flops}
            rows.append(r)
    return rows


# ------------------------------------------------------------------------------ output


def ownership(shapes: Sequence[tuple[str, int, int, str]], workers: Sequence[int], rows: int,
              update_freq: int = UPDATE_FREQ, grad_bytes: int = 2) -> list[dict[str, Any]]:
    """Issue 19 item 2, decided by counting bytes: per layer shape, what a rank receives per step when
    every rank holds the factors the apply needs (A_S, G_S in float32, C in float64, gathered and
    broadcast once per refresh, so amortised over ``update_freq`` steps) against the alternative
    where the layer's owner applies (*) and sends the preconditioned gradient (``grad_bytes`` per
    entry: bf16) to the others every step; and the factor bytes a rank holds either way (owned:
    the owner's share, 1/P of the layers on average). ``rows``: s, the global kept rows."""
    out = []
    for name, d_in, d_out, where in shapes:
        factors = rows * (d_in + d_out) * 4 + rows * rows * 8
        replicate_per_step = (rows * (d_in + d_out) * 4 + rows * (rows + 1) // 2 * 8) / update_freq
        owner_per_step = d_in * d_out * grad_bytes
        out.append({"layer": name, "where": where, "s": rows, "replicate_bytes_per_step": replicate_per_step,
                    "owner_apply_bytes_per_step": owner_per_step, "owner_over_replicate": owner_per_step / replicate_per_step,
                    "held_replicated": factors, "held_owned_mean": {str(P): factors / P for P in workers},
                    "decision": "replicate" if replicate_per_step <= owner_per_step else "owner applies"})
    return out


OWNERSHIP_HEAD = ["layer (d_in->d_out)", "s", "replicated: MB received per step", "owner applies: MB received per step",
                  "owner / replicated", "held per rank, replicated (MiB)", "held per rank, owned (MiB, P = 8 / 64 / 512)",
                  "fewer bytes moved"]


def ownership_table(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in result["ownership"]:
        owned = " / ".join(f"{v / MIB:.2g}" for v in r["held_owned_mean"].values())
        rows.append([r["layer"], str(r["s"]), f"{r['replicate_bytes_per_step'] / 1e6:.2f}",
                     f"{r['owner_apply_bytes_per_step'] / 1e6:.1f}", f"{r['owner_over_replicate']:.0f}x",
                     f"{r['held_replicated'] / MIB:.1f}", owned, r["decision"]])
    return rows


def coverage_run(models: Sequence[tuple], quick: bool, alone: bool) -> dict[str, Any]:
    """Part 3 with the run's provenance (it may be written alone: ``--coverage-only``)."""
    return {"date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "python benchmarks/scale.py" + (" --coverage-only" if alone else "") + (" --quick" if quick else ""),
            "git": git_revision(), "models": coverage(models)}


COVERAGE_HEAD = ["model", "parameters (M)", "preconditioned before (embeddings fallback)", "preconditioned now",
                 "of which embeddings (M)", "first-order fallback now (module: reason: count, M params)"]


def coverage_table(result: dict[str, Any]) -> list[list[str]]:
    """Rows of the coverage table (part 3; shared with benchmarks/render_readme.py)."""
    rows = []
    for r in result.get("coverage", {}).get("models", []):
        rest = "; ".join(f"{k}: {v['modules']}, {v['params'] / 1e6:.2f}" for k, v in r["fallback"].items())
        rows.append([r["model"], f"{r['params'] / 1e6:.1f}",
                     f"{100 * r['before_share']:.2f} % ({r['before_params'] / 1e6:.1f}M)",
                     f"{100 * r['after_share']:.2f} % ({r['after_params'] / 1e6:.1f}M)",
                     f"{r['preconditioned_by_kind'].get('embedding', 0) / 1e6:.1f}", rest or "none"])
    return rows


def _gib(x: Optional[float]) -> str:
    return "-" if x is None else f"{x / GIB:.2f}"


def layer_table(result: dict[str, Any]) -> list[list[str]]:
    """Rows of the per-layer table (shared by the printout and benchmarks/render_readme.py)."""
    out = []
    for r in result["layers"]:
        out.append([r["layer"], "AdamW", "-", f"{r['adamw_step_s']:.2f}", f"{r['adamw_step_s']:.2f}", "1.00",
                    "1.00", "-", f"{r['adamw_state_bytes'] / MIB:.0f}", f"{r['adamw_state_bytes'] / MIB:.0f}", "-",
                    "-", "-"])
        for label, h in r["hylo"].items():
            est = h["estimate"]
            refused = " (refused by default max_captured_mib)" if h["refused_by_default_max_captured_mib"] else ""
            if not h["fits"]:
                out.append([r["layer"], f"HyLo {label}{refused}", str(h["s"]), h["note"], "-", "-", "-",
                            f"{est['held_bytes'] / MIB:.0f}", f"{est['total_bytes'] / MIB:.0f}", "-",
                            f"{est['peak_bytes'] / MIB:.0f}", "-", "-"])
                continue
            f32 = h["apply_flops"].get("float32", 0.0) / 1e9
            f64 = h["invert_flops"].get("float64", 0.0) / 1e9
            out.append([r["layer"], f"HyLo {label}{refused}", str(h["s"]), f"{h['refresh_step_s']:.2f}",
                        f"{h['plain_step_s']:.2f}", f"{h['refresh_step_s'] / r['adamw_step_s']:.2f}",
                        f"{h['plain_step_s'] / r['adamw_step_s']:.2f}", f"{est['held_bytes'] / MIB:.0f}",
                        f"{est['total_bytes'] / MIB:.0f}", f"{h['measured_total_bytes'] / MIB:.0f}",
                        f"{est['peak_bytes'] / MIB:.0f}", f"{f32:.0f}", f"{f64:.0f}"])
    return out


LAYER_HEAD = ["layer (d_in->d_out)", "optimizer", "s", "refresh step s", "plain step s", "refresh / AdamW",
              "plain / AdamW", "HyLo held MiB (est.)", "state + held MiB (est.)", "measured MiB",
              "peak MiB (est.)", "apply GFLOP fp32", "refresh GFLOP fp64"]
def model_head(labels: Sequence[str]) -> list[str]:
    return (["model", "P", "AdamW GiB"] + [f"HyLo {l} GiB (peak)" for l in labels] + ["Muon GiB", "K-FAC GiB"]
            + [f"HyLo {l} MB/refresh" for l in labels] + ["K-FAC MB/refresh"]
            + [f"HyLo {l} % FLOPs" for l in labels] + ["Muon % FLOPs", "K-FAC % FLOPs"])


def model_table(result: dict[str, Any]) -> list[list[str]]:
    out = []
    for r in result["models"]:
        h = r["hylo"]
        labels = list(h)

        def mem(label: str) -> str:
            return f"{h[label]['total_bytes'] / GIB:.0f} ({h[label]['peak_bytes'] / GIB:.0f})"

        def pct(x: float) -> str:
            return f"{100 * x:.1f}" if x < 10 else f"{100 * x:.0f}"

        out.append([r["model"], str(r["P"]), f"{r['adamw']['state_bytes'] / GIB:.0f}"] + [mem(l) for l in labels]
                   + [f"{r['muon']['state_bytes'] / GIB:.0f}", f"{r['kfac']['state_bytes'] / GIB:.0f}"]
                   + [f"{h[l]['refresh_recv_bytes'] / 1e6:.0f}" for l in labels]
                   + [f"{r['kfac']['refresh_recv_bytes'] / 1e6:.0f}"]
                   + [pct(h[l]["share_with_refresh"]) for l in labels]
                   + [pct(r["muon"]["share"]), pct(r["kfac"]["share_with_refresh"])])
    return out


def _fmt(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) if rows else len(head[i]) for i in range(len(head))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def format_tables(result: dict[str, Any]) -> str:
    st = result["settings"]
    return "\n".join([
        f"Per layer: T = {st['tokens']} tokens per rank (fwd+bwd and capture timed at {st['time_tokens']}, x "
        f"{st['tokens'] / st['time_tokens']:g}), {result['machine']['cpu']}, {result['machine']['threads']} thread(s)",
        _fmt(LAYER_HEAD, layer_table(result)), "",
        f"Whole model: T = {st['model_tokens']} tokens per rank per step (sequence {st['seq']}), memory per rank "
        "(base state unsharded), refresh bytes received per rank, matmul FLOPs per step as % of 6 T params "
        f"(HyLo and K-FAC refreshes amortised over {UPDATE_FREQ} steps)",
        _fmt(model_head(list(st['configs'])), model_table(result)), "",
        f"Who holds the factors (bytes, analytic): every rank (refresh traffic amortised over {UPDATE_FREQ} steps) "
        "or the layer's owner, sending the preconditioned gradient (bf16) every step",
        _fmt(OWNERSHIP_HEAD, ownership_table(result)), "",
        "Coverage: share of the parameters HyLo preconditions (before: embeddings as first-order fallback)",
        _fmt(COVERAGE_HEAD, coverage_table(result)),
    ])


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    layers = result["layers"]
    labels = list(result["settings"]["configs"])
    xs = range(len(layers))
    width = 0.8 / (len(labels) + 1)
    ax.bar([x - 0.4 + width / 2 for x in xs], [1.0] * len(layers), width, label="AdamW", color="k")
    for i, label in enumerate(labels):
        ys = [r["hylo"][label]["plain_step_s"] / r["adamw_step_s"] if r["hylo"][label]["fits"] else 0 for r in layers]
        ax.bar([x - 0.4 + width * (i + 1.5) for x in xs], ys, width, label=f"HyLo {label} (plain step)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["layer"] for r in layers], rotation=30, fontsize=7)
    ax.set_ylabel("step time / AdamW's")
    ax.set_title(f"one layer, T = {result['settings']['tokens']} tokens", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    for model in dict.fromkeys(r["model"] for r in result["models"]):
        sel = [r for r in result["models"] if r["model"] == model]
        ps = [r["P"] for r in sel]
        line, = ax.plot(ps, [r["adamw"]["state_bytes"] / GIB for r in sel], "k:", alpha=0.5)
        for label, style in zip(labels, ("-o", "--s", ":^")):
            ax.plot(ps, [r["hylo"][label]["peak_bytes"] / GIB for r in sel], style, label=f"{model} HyLo {label} peak")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("ranks P")
    ax.set_ylabel("GiB per rank (dotted: AdamW state)")
    ax.set_title("whole model, memory per rank", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes and a tiny Llama: seconds")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per rank per step (one micro-batch)")
    p.add_argument("--time-tokens", type=int, default=64, help="tokens the forward+backward is timed at")
    p.add_argument("--time-rows", type=int, default=32, help="rows s the apply and the invert are timed at")
    p.add_argument("--seq", type=int, default=4096, help="sequence length (whole-model part)")
    p.add_argument("--workers", type=int, nargs="*", default=[8, 64, 512])
    p.add_argument("--layers", nargs="*", default=None, help="only these shapes (names as in the table)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--coverage-only", action="store_true",
                   help="compute part 3 (coverage) only and write it into the existing JSON's 'coverage' entry")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes, configs, models = SHAPES, CONFIGS, LLAMA2
    coverage_models = QUICK_COVERAGE_MODELS if args.quick else COVERAGE_MODELS
    if args.coverage_only:
        path = Path(args.out_dir) / f"{'scale_quick' if args.quick else 'scale'}.json"
        result = json.loads(path.read_text()) if path.exists() else {}
        result["coverage"] = coverage_run(coverage_models, args.quick, alone=True)
        print(_fmt(COVERAGE_HEAD, coverage_table(result)))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
        return 0
    if args.quick:
        shapes, configs, models = QUICK_SHAPES, QUICK_CONFIGS, QUICK_LLAMA
        args.tokens, args.time_tokens, args.time_rows, args.seq, args.workers = 512, 64, 24, 128, [2, 4]
    if args.layers:
        shapes = tuple(s for s in shapes if s[0] in args.layers)
    start = time.perf_counter()
    _timed(lambda: _loss(nn.Linear(64, 64), torch.randn(8, 64), torch.randn(8, 64)).backward())  # warm-up
    layers = []
    for name, d_in, d_out, where in shapes:
        t0 = time.perf_counter()
        row = measure_shape(name, d_in, d_out, args.tokens, args.time_tokens, configs, args.time_rows)
        row["where"] = where
        layers.append(row)
        print(f"  {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    result: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/scale.py" + (" --quick" if args.quick else ""),
        "git": git_revision(),
        "machine": {"cpu": cpu_model() or platform.processor(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "load_average_start": load_average()},
        "settings": {"tokens": args.tokens, "time_tokens": args.time_tokens, "time_rows": args.time_rows, "seq": args.seq,
                     "model_tokens": args.tokens, "workers": args.workers, "configs": configs,
                     "rank_ratio": RANK_RATIO, "damping": DAMPING, "update_freq": UPDATE_FREQ, "quick": args.quick},
        "layers": layers,
        "models": whole_model(models, args.workers, args.tokens, args.seq, configs),
        "ownership": ownership(shapes, args.workers, _cap({})),
        "coverage": coverage_run(coverage_models, args.quick, alone=False),
    }
    result["seconds"] = time.perf_counter() - start
    result["machine"]["load_average_end"] = load_average()
    print(format_tables(result))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "scale_quick" if args.quick else "scale"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out_dir / f'{stem}.json'}")
    if not args.no_plot:
        plot(result, out_dir / f"{stem}.png")
        print(f"wrote {out_dir / f'{stem}.png'}")
    print(f"total {result['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
