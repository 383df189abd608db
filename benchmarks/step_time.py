#!/usr/bin/env python
"""Training-step time of HyLo (kis, kid, hybrid) as a ratio to torch.optim's SGD and AdamW.

Two workloads, synthetic data, one process:

- ``resnet32``: the CIFAR ResNet-32 of ``examples/models.py`` on random (128, 3, 32, 32) images,
  10 classes (HyLo preconditions every Conv2d and the final Linear).
- ``llama``: a Llama-style causal LM of about 100M parameters (transformers' ``LlamaConfig``:
  hidden 768, 12 layers, 12 heads, MLP 2048, vocabulary 32000, tied embeddings; random init) on
  random token sequences of length 1024, batch 4, bf16 autocast on CUDA. HyLo preconditions the
  84 projection Linears and the LM head with ``sequence_convention="expand"`` (every token is a
  sample), keeping at most ``--llama-max-samples`` rows per layer.

One step = zero_grad, forward, backward, ``optimizer.step()``. After ``--warmup`` untimed steps
(a whole number of refresh periods, so refresh and plain steps are both warm), ``--steps`` steps are
timed one by one with the device synchronised before and after each step (never inside it). HyLo's
steps are split into refresh steps (its ``stats()["refreshes"]`` grew) and plain steps; the
"amortised" mean is over all timed steps, a whole number of refresh periods. HyLo's own per-phase
times over the timed steps come from ``stats()["timers"]``. On CUDA the synchronising CUDA calls
of one plain and one refresh step (forward+backward and ``optimizer.step()`` apart) are counted
afterwards with ``torch.cuda.set_sync_debug_mode`` (outside the timed steps).

Writes ``step_time[_tiny].json`` and ``step_time[_tiny].md`` under ``--out``.

    python benchmarks/step_time.py --device cuda                # the GPU check's run
    python benchmarks/step_time.py --tiny --out /tmp/st         # CPU dry run, well under a minute
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

_REPO = Path(__file__).resolve().parents[1]
for _path in (str(_REPO), str(_REPO / "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from _env import cpu_model, git_revision, load_average  # noqa: E402
from ds_hylo import HyLo  # noqa: E402
from examples.models import CifarResNet, resnet32  # noqa: E402

MODELS = ("resnet32", "llama")
OPTIMIZERS = ("sgd", "adamw", "kis", "kid", "hybrid", "kis-delayed", "hylo")
LLAMA_SIZES = ("100m", "1b", "768x4")
HYLO_MODES = ("kis", "kid", "hybrid")
DEFAULT_OUT = _REPO / "benchmarks" / "results" / "gpu"


# ---------------------------------------------------------------------- workloads
@dataclass
class Workload:
    """A model factory, the batches it trains on, its loss, and the optimizer settings it uses."""

    name: str
    build: Callable[[], nn.Module]
    batches: list[tuple[torch.Tensor, ...]]
    loss: Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]
    shape: dict[str, Any]
    lr: dict[str, float]
    hylo: dict[str, Any]


def resnet_workload(device: torch.device, tiny: bool, rank_ratio: float) -> Workload:
    """ResNet-32 (ResNet-8 with --tiny) on CIFAR-shaped random images: (B, 3, H, W) -> 10 classes."""
    batch, size, blocks = (8, 8, 1) if tiny else (128, 32, 5)
    gen = torch.Generator(device=device).manual_seed(0)
    batches = [(torch.randn(batch, 3, size, size, generator=gen, device=device),
                torch.randint(0, 10, (batch,), generator=gen, device=device)) for _ in range(4)]

    def build() -> nn.Module:
        torch.manual_seed(0)
        return (CifarResNet(blocks_per_stage=blocks) if tiny else resnet32()).to(device)

    def loss(model: nn.Module, data: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = data
        return F.cross_entropy(model(x), y)

    return Workload(
        "resnet32", build, batches, loss,
        shape={"batch": batch, "image": [3, size, size], "blocks_per_stage": blocks, "classes": 10},
        lr={"sgd": 0.1, "adamw": 1e-3, "hylo": 0.1},
        hylo={"rank_ratio": rank_ratio, "damping": 0.03, "base": "sgd", "momentum": 0.9},
    )


def llama_config(tiny: bool, size: str = "100m"):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                           tie_word_embeddings=True)
    if size == "768x4":  # 77.5M parameters, the CPU-sized Llama of issues 19/20 (batch 2 x 512 tokens)
        return LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=4,
                           num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024,
                           tie_word_embeddings=False)
    if size == "1b":  # ~1.1B parameters (TinyLlama-like widths; 2048 x 5632 MLP, untied head)
        return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                           tie_word_embeddings=False)
    return LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                       num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024,
                       tie_word_embeddings=True)


def llama_workload(device: torch.device, tiny: bool, rank_ratio: float, max_samples: int,
                   autocast: bool, size: str = "100m") -> Workload:
    """Llama-style causal LM on random tokens: (B, T) ids -> next-token cross-entropy."""
    from transformers import LlamaForCausalLM

    config = llama_config(tiny, size)
    batch, seq = (2, 32) if tiny else ((2, 512) if size == "768x4" else (4, 1024))
    gen = torch.Generator(device=device).manual_seed(0)
    batches = [(torch.randint(0, config.vocab_size, (batch, seq), generator=gen, device=device),)
               for _ in range(4)]

    def build() -> nn.Module:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(device)
        model.config.use_cache = False
        return model

    def loss(model: nn.Module, data: tuple[torch.Tensor, ...]) -> torch.Tensor:
        (ids,) = data
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return model(input_ids=ids, labels=ids).loss

    params = sum(p.numel() for p in build().parameters())
    return Workload(
        "llama" if size == "100m" else f"llama-{size}", build, batches, loss,
        shape={"batch": batch, "sequence": seq, "hidden": config.hidden_size, "layers": config.num_hidden_layers,
               "heads": config.num_attention_heads, "intermediate": config.intermediate_size,
               "vocab": config.vocab_size, "parameters": params, "bf16_autocast": autocast},
        lr={"sgd": 1e-3, "adamw": 3e-4, "hylo": 1e-3},
        hylo={"rank_ratio": rank_ratio, "max_global_samples": max_samples, "damping": 0.03, "base": "sgd", "momentum": 0.9,
              "sequence_convention": "expand"},
    )


# ---------------------------------------------------------------------- optimizers
def make_optimizer(name: str, model: nn.Module, work: Workload, update_freq: int) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=work.lr["sgd"], momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=work.lr["adamw"], weight_decay=0.01)
    if name == "hylo":  # the package defaults (AdamW base, KIS), only the row bound and convention of the workload
        keep = {k: v for k, v in work.hylo.items() if k in ("max_global_samples", "sequence_convention", "rank_ratio")}
        return HyLo(model, **keep, update_freq=update_freq)
    if name in HYLO_MODES or name == "kis-delayed":
        mode = name.split("-")[0]
        options = dict(work.hylo, lr=work.lr["hylo"], mode=mode, update_freq=update_freq)
        if name == "hybrid":  # short windows, so the policy can act within a benchmark run
            options.update(switch_window=update_freq)
        if name == "kis-delayed":  # the refresh's factors used from the next step (side CUDA stream)
            options.update(delayed_refresh=True)
        return HyLo(model, **options)
    raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")


# -------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _refreshes(opt: torch.optim.Optimizer) -> int:
    return opt.stats()["refreshes"] if isinstance(opt, HyLo) else 0


def train_step(model: nn.Module, opt: torch.optim.Optimizer, work: Workload, data: tuple) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    loss = work.loss(model, data)
    loss.backward()
    opt.step()
    return loss.detach()


def _timer_delta(after: dict, before: dict) -> dict[str, dict[str, float]]:
    out = {}
    for phase, value in after.items():
        seconds = value["seconds"] - before.get(phase, {}).get("seconds", 0.0)
        calls = value["calls"] - before.get(phase, {}).get("calls", 0)
        out[phase] = {"seconds": seconds, "calls": calls, "mean_ms": 1e3 * seconds / calls if calls else 0.0}
    return out


def count_syncs(fn: Callable[[], Any]) -> Optional[int]:
    """Synchronising CUDA calls made by ``fn()`` (torch.cuda.set_sync_debug_mode warnings); None off CUDA."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _sync_counts(model: nn.Module, opt: torch.optim.Optimizer, work: Workload, update_freq: int,
                 device: torch.device) -> Optional[dict[str, dict[str, int]]]:
    """Synchronising CUDA calls in forward+backward and in optimizer.step(), for one plain step and
    (HyLo) one refresh step; run after the timed steps. None off CUDA."""
    if device.type != "cuda":
        return None
    counts: dict[str, dict[str, int]] = {}
    for _ in range(update_freq if isinstance(opt, HyLo) else 1):
        opt.zero_grad(set_to_none=True)
        before = _refreshes(opt)
        forward_backward = count_syncs(lambda: work.loss(model, work.batches[0]).backward())
        step = count_syncs(opt.step)
        kind = "refresh_step" if _refreshes(opt) > before else "plain_step"
        counts.setdefault(kind, {"forward_backward": forward_backward, "optimizer_step": step})
        _sync(device)
    return counts


def measure(work: Workload, name: str, device: torch.device, warmup: int, steps: int,
            update_freq: int) -> dict[str, Any]:
    model = work.build()
    opt = make_optimizer(name, model, work, update_freq)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses = []
    for i in range(warmup):
        losses.append(train_step(model, opt, work, work.batches[i % len(work.batches)]))
    _sync(device)
    timers_before = opt.stats()["timers"] if isinstance(opt, HyLo) else {}
    refresh_ms, plain_ms = [], []
    for i in range(steps):
        data = work.batches[(warmup + i) % len(work.batches)]
        before = _refreshes(opt)
        _sync(device)
        start = time.perf_counter()
        losses.append(train_step(model, opt, work, data))
        _sync(device)
        elapsed = 1e3 * (time.perf_counter() - start)
        (refresh_ms if _refreshes(opt) > before else plain_ms).append(elapsed)
    row: dict[str, Any] = {
        "optimizer": name,
        "timed_steps": steps,
        "mean_ms": statistics.fmean(refresh_ms + plain_ms),
        "plain_mean_ms": statistics.fmean(plain_ms) if plain_ms else None,
        "plain_median_ms": statistics.median(plain_ms) if plain_ms else None,
        "refresh_mean_ms": statistics.fmean(refresh_ms) if refresh_ms else None,
        "refresh_steps": len(refresh_ms),
        "plain_steps": len(plain_ms),
        "runs_ms": {"refresh": refresh_ms, "plain": plain_ms},
        "final_loss": float(losses[-1]),
        "finite": all(math.isfinite(float(v)) for v in losses),
    }
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if isinstance(opt, HyLo):
        stats = opt.stats()
        row["hylo_phases"] = _timer_delta(stats["timers"], timers_before)
        row["hylo_modes"] = {m: list(stats["modes"].values()).count(m) for m in set(stats["modes"].values())}
        row["hylo_layers"] = len(stats["modes"])
        row["nonfinite_events"] = stats["nonfinite_events"]
    row["syncs"] = _sync_counts(model, opt, work, update_freq, device)
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """HyLo's plain, refresh and amortised step times over SGD's and AdamW's mean step time."""
    base = {r["optimizer"]: r["mean_ms"] for r in rows if r["optimizer"] in ("sgd", "adamw")}
    for row in rows:
        ratios = {}
        for ref, ms in base.items():
            ratios[f"mean/{ref}"] = row["mean_ms"] / ms
            if row["optimizer"] in HYLO_MODES + ("kis-delayed", "hylo"):
                if row["plain_mean_ms"] is not None:
                    ratios[f"plain/{ref}"] = row["plain_mean_ms"] / ms
                if row["refresh_mean_ms"] is not None:
                    ratios[f"refresh/{ref}"] = row["refresh_mean_ms"] / ms
        row["ratios"] = ratios
    # the refresh time the delayed refresh took off the step: KIS's refresh-step excess minus the delayed one's
    by_name = {r["optimizer"]: r for r in rows}
    kis, delayed = by_name.get("kis"), by_name.get("kis-delayed")
    if kis and delayed and None not in (kis["refresh_mean_ms"], kis["plain_mean_ms"],
                                        delayed["refresh_mean_ms"], delayed["plain_mean_ms"]):
        excess = kis["refresh_mean_ms"] - kis["plain_mean_ms"]
        delayed_excess = delayed["refresh_mean_ms"] - delayed["plain_mean_ms"]
        delayed["refresh_hidden_ms"] = excess - delayed_excess
        delayed["refresh_hidden_share"] = (excess - delayed_excess) / excess if excess > 0 else None


# ---------------------------------------------------------------------- reporting
def machine_info(device: torch.device) -> dict[str, Any]:
    info = {
        "device": str(device),
        "cpu": cpu_model() or platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "load_average": load_average(),
        "git": git_revision(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def _fmt(x: Optional[float], spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def format_markdown(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    lines = [
        "## Step time: HyLo vs SGD and AdamW",
        "",
        f"{m.get('gpu', m['cpu'])} ({m['device']}), torch {m['torch']}, git {m['git']}, {m['date']}. "
        f"update_freq {s['update_freq']}, {s['warmup']} warm-up + {s['steps']} timed steps per optimizer"
        + (" (**tiny shapes: a dry run, not a measurement**)" if s["tiny"] else "") + ".",
        "Plain = steps without a curvature refresh, refresh = steps with one, mean = all timed steps "
        "(amortised over whole refresh periods). Ratios divide by the baseline's mean step time. "
        "step() syncs: synchronising CUDA calls inside optimizer.step() as torch.cuda.set_sync_debug_mode "
        "reports them (counted after the timed steps; forward+backward counts are in the JSON).",
    ]
    for model in result["models"]:
        work = result["workloads"][model]
        lines += ["", f"### {model}", "", "shape: " + ", ".join(f"{k} {v}" for k, v in work["shape"].items()), "",
                  "| optimizer | mean ms | plain ms | refresh ms | mean/SGD | plain/SGD | mean/AdamW | plain/AdamW"
                  " | step() syncs plain/refresh | peak GiB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in work["rows"]:
            r = row["ratios"]
            syncs = row.get("syncs") or {}
            sync_text = "/".join(str(syncs.get(kind, {}).get("optimizer_step", "-")) for kind in ("plain_step", "refresh_step"))
            lines.append(
                f"| {row['optimizer']} | {_fmt(row['mean_ms'])} | {_fmt(row['plain_mean_ms'])} | "
                f"{_fmt(row['refresh_mean_ms'])} | {_fmt(r.get('mean/sgd'), '.2f')} | {_fmt(r.get('plain/sgd'), '.2f')} | "
                f"{_fmt(r.get('mean/adamw'), '.2f')} | {_fmt(r.get('plain/adamw'), '.2f')} | {sync_text} | "
                f"{_fmt(row.get('peak_memory_gib'), '.2f')} |"
            )
        phases = [row for row in work["rows"] if row.get("hylo_phases")]
        if phases:
            names = sorted({p for row in phases for p in row["hylo_phases"]})
            lines += ["", "HyLo phase time per timed step (ms, from stats()['timers']; its phase timers "
                      "synchronise the device around each phase):", "",
                      "| optimizer | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
            for row in phases:
                cells = [_fmt(1e3 * row["hylo_phases"].get(n, {}).get("seconds", 0.0) / row["timed_steps"], ".2f")
                         for n in names]
                lines.append(f"| {row['optimizer']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_table(result: dict[str, Any]) -> str:
    out = []
    for model in result["models"]:
        out.append(f"{model}: " + ", ".join(f"{k} {v}" for k, v in result["workloads"][model]["shape"].items()))
        out.append(f"  {'optimizer':<9} {'mean ms':>9} {'plain ms':>9} {'refresh ms':>10} {'/SGD':>6} {'/AdamW':>7}")
        for row in result["workloads"][model]["rows"]:
            r = row["ratios"]
            out.append(f"  {row['optimizer']:<9} {_fmt(row['mean_ms']):>9} {_fmt(row['plain_mean_ms']):>9} "
                       f"{_fmt(row['refresh_mean_ms']):>10} {_fmt(r.get('mean/sgd'), '.2f'):>6} "
                       f"{_fmt(r.get('mean/adamw'), '.2f'):>7}")
    return "\n".join(out)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------- main
def _csv(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad} not allowed; choose from {', '.join(allowed)}")
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--models", type=_csv(MODELS), default=list(MODELS), help="comma-separated")
    p.add_argument("--optimizers", type=_csv(OPTIMIZERS), default=list(OPTIMIZERS), help="comma-separated")
    p.add_argument("--update-freq", type=int, default=None, help="HyLo refresh period (default 10; 2 with --tiny)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per optimizer, rounded up to whole refresh periods (default 3 periods)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first, rounded up to whole refresh periods (default 1 period)")
    p.add_argument("--rank-ratio", type=float, default=0.1, help="HyLo rank_ratio")
    p.add_argument("--llama-size", choices=LLAMA_SIZES, default="100m",
                   help="Llama workload: ~100M (hidden 768, 12 layers), ~1.1B parameters (hidden 2048, 22 layers) "
                        "or 768x4 (hidden 768, 4 layers, batch 2 x 512 tokens: a CPU-sized one)")
    p.add_argument("--llama-max-samples", type=int, default=256,
                   help="HyLo max_global_samples for the Llama run (tokens kept per layer)")
    p.add_argument("--autocast", choices=("auto", "bf16", "none"), default="auto",
                   help="Llama forward precision: auto = bf16 autocast on CUDA, fp32 on the CPU")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and steps: a CPU dry run in seconds")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 keeps torch's default; 1 with --tiny)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="directory for the JSON and markdown")
    return p


def _whole_periods(value: Optional[int], default_periods: int, period: int) -> int:
    value = default_periods * period if value is None else value
    return max(period, math.ceil(value / period) * period)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.threads or args.tiny:
        torch.set_num_threads(args.threads or 1)
    update_freq = args.update_freq or (2 if args.tiny else 10)
    steps = _whole_periods(args.steps, 1 if args.tiny else 3, update_freq)
    warmup = _whole_periods(args.warmup, 1, update_freq)
    autocast = device.type == "cuda" if args.autocast == "auto" else args.autocast == "bf16"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    result: dict[str, Any] = {
        "machine": machine_info(device),
        "settings": {"update_freq": update_freq, "steps": steps, "warmup": warmup, "tiny": args.tiny,
                     "rank_ratio": args.rank_ratio, "llama_max_samples": args.llama_max_samples,
                     "llama_size": args.llama_size,
                     "optimizers": args.optimizers},
        "models": args.models,
        "workloads": {},
    }
    start = time.perf_counter()
    for model_name in args.models:
        if model_name == "resnet32":
            work = resnet_workload(device, args.tiny, args.rank_ratio)
        else:
            work = llama_workload(device, args.tiny, args.rank_ratio, args.llama_max_samples, autocast,
                                  args.llama_size)
        rows = []
        for opt_name in args.optimizers:
            t0 = time.perf_counter()
            rows.append(measure(work, opt_name, device, warmup, steps, update_freq))
            print(f"  {model_name:<9} {opt_name:<7} mean {rows[-1]['mean_ms']:9.2f} ms "
                  f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
        add_ratios(rows)
        result["workloads"][model_name] = {"shape": work.shape, "hylo_options": work.hylo, "lr": work.lr,
                                           "rows": rows}
    result["total_seconds"] = time.perf_counter() - start
    print(format_table(result))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "step_time" + ("_tiny" if args.tiny else "") + ("" if args.llama_size == "100m" else f"_llama{args.llama_size}")
    (out / f"{stem}.json").write_text(json.dumps(_json_safe(result), indent=2, allow_nan=False))
    (out / f"{stem}.md").write_text(format_markdown(result))
    print(f"wrote {out / f'{stem}.json'} and {out / f'{stem}.md'} ({result['total_seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
