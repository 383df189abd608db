#!/usr/bin/env python
"""Where HyLo's peak memory over AdamW comes from (issue 19): per-phase peak RSS on a CPU Llama.

A transformers ``LlamaForCausalLM`` built from a config (hidden 768, MLP 2048, 4 layers, 12 heads,
vocabulary 32000, untied head: 77.5M parameters), random tokens, batch 2 x seq 512, next-token
cross-entropy. Each variant runs in its own subprocess: AdamW, and HyLo with its defaults except
``update_freq=2`` (so step 2 is a second refresh, the first one that finds old factors beside the new
ones). Every phase of every step (forward, backward, optimizer step; inside HyLo's step the refresh,
the apply and the base update) starts by resetting the kernel's peak-RSS counter
(``/proc/self/clear_refs``), and records its peak RSS (``VmHWM``) over the RSS at the start of the
step. Beside it, ``ds_hylo.estimate_memory`` for the same model, tokens and options, and the
bytes HyLo actually holds after each step.

Variants that change one mechanism at a time (monkeypatched in the subprocess, never in the
package) attribute the excess:

- ``hylo-apply-per-layer``: the apply writes each layer's direction back before computing the
  next (when the committed results were run, the package computed every layer's direction first,
  so every preconditioned gradient had a second copy alive at once; since issue 19's fix it does
  this itself standalone, ``Preconditioner._apply_layer_by_layer``, and keeps every direction only
  under DeepSpeed ZeRO-0/1 on several ranks and with grafting);
- ``hylo-stored``: ``preconditioner.stream_kis = False`` (every token's rows held until the refresh).

    python benchmarks/memory_peak.py            # ~5 minutes on 2 CPU cores
    python benchmarks/memory_peak.py --tiny     # seconds (test/smoke)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

_REPO = Path(__file__).resolve().parents[1]
for _path in (str(_REPO), str(_REPO / "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from _env import cpu_model, git_revision  # noqa: E402

VARIANTS = ("adamw", "hylo", "hylo-apply-per-layer", "hylo-stored")
MIB = 2**20
RESULTS = _REPO / "benchmarks" / "results"


def _status(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+)", text).group(1)) * 1024


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def llama_config(tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                           tie_word_embeddings=False)
    from step_time import llama_config as step_time_llama  # the same 77.5M Llama as step_time's 768x4

    return step_time_llama(False, "768x4")


def _apply_per_layer(self, factors, lr, grad_scale, grads_are_local, grad_of):
    """Preconditioner._apply that writes each direction back at once (no KL clip, no grafting)."""
    from ds_hylo import kernels

    for name, layer in self.layers.items():
        if name not in factors:
            continue
        grad = layer.gradient_matrix(grad_of)
        if grad is None:
            continue
        f = factors[name]
        a_work, g_work, c_work = f.work_factors()
        step_scale = f.damping if self.config.step_scale == "sgd" else 1.0
        direction = kernels.apply_smw(grad.to(f.work_dtype), a_work, g_work, c_work, f.damping, step_scale)
        layer.set_gradient_matrix(direction, grad_of)
        del direction, grad


def run_variant(variant: str, tiny: bool, batch: int, seq: int, steps: int, threads: int) -> dict[str, Any]:
    import torch
    from transformers import LlamaForCausalLM

    import ds_hylo
    from ds_hylo import HyLo
    from ds_hylo.preconditioner import Preconditioner

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = llama_config(tiny)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, config.vocab_size, (batch, seq + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    options = {"update_freq": 2}
    phases: list[dict[str, Any]] = []
    current: dict[str, Any] = {}

    def mark(name: str, start: int) -> None:
        phases.append({"step": current["step"], "phase": name, "peak_over_step_start_mib": (_status("VmHWM") - start) / MIB})

    estimate = None
    if variant == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        pre = None
    else:
        estimate = ds_hylo.estimate_memory(model, batch * seq, 1, sequence_length=seq, **options).as_dict()
        if variant == "hylo-apply-per-layer":
            Preconditioner._apply = _apply_per_layer
        opt = HyLo(model, lr=1e-4, **options)
        pre = opt.preconditioner
        pre.stream_kis = variant != "hylo-stored"
        # phase marks inside HyLo's step: refresh, apply, base update
        original_refresh, original_apply = Preconditioner._refresh, Preconditioner._apply
        base_step = opt.base.step

        def refresh(self, *a, **k):
            _reset_peak()
            out = original_refresh(self, *a, **k)
            mark("refresh", current["start"])
            return out

        def apply(self, *a, **k):
            _reset_peak()
            out = original_apply(self, *a, **k)
            mark("apply", current["start"])
            return out

        def base(*a, **k):
            _reset_peak()
            out = base_step(*a, **k)
            mark("base update", current["start"])
            return out

        Preconditioner._refresh, Preconditioner._apply = refresh, apply
        opt.base.step = base
    held = []
    start_all = _status("VmRSS")
    _reset_peak()
    overall_peak = 0
    for step in range(steps):
        current["step"] = step
        current["start"] = start = _status("VmRSS")
        opt.zero_grad(set_to_none=True)
        _reset_peak()
        logits = model(input_ids=x).logits
        mark("forward", start)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        del logits
        _reset_peak()
        loss.backward()
        mark("backward", start)
        del loss
        _reset_peak()
        opt.step()
        mark("step", start)
        overall_peak = max([overall_peak] + [int(p["peak_over_step_start_mib"] * MIB) + start for p in phases
                                              if p["step"] == step])
        if pre is not None:
            held.append(_held_bytes(opt))
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    return {"variant": variant, "params": params, "phases": phases, "rss_start_mib": start_all / MIB,
            "peak_rss_mib": overall_peak / MIB, "vmhwm_mib": _status("VmHWM") / MIB,
            "optimizer_state_mib": state / MIB, "hylo_held_mib": [h / MIB for h in held], "estimate": estimate}


def _held_bytes(opt) -> int:
    """Bytes of HyLo's factors: rows, C and the apply's work copies not sharing storage with them."""
    total = 0
    for f in opt.preconditioner.factors.values():
        seen = set()
        for t in (f.a, f.g, f.c) + tuple(f._work or ()):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
    return total


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a tiny Llama and 2 x 16 tokens (seconds)")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "memory_peak.json"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    batch, seq = (2, 16) if args.tiny else (2, 512)
    if args.worker:
        print(json.dumps(run_variant(args.worker, args.tiny, batch, seq, args.steps, args.threads)))
        return 0
    results, start = [], time.perf_counter()
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--worker", variant, "--steps", str(args.steps), "--threads", str(args.threads)]
        cmd += ["--tiny"] if args.tiny else []
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{variant:<22} peak RSS {r['peak_rss_mib']:8.1f} MiB  state {r['optimizer_state_mib']:7.1f} MiB  "
              f"held {r['hylo_held_mib'][-1] if r['hylo_held_mib'] else 0:6.1f} MiB", flush=True)
    table = format_table(results)
    print(table)
    out = {"tiny": args.tiny, "batch": batch, "seq": seq, "steps": args.steps, "threads": args.threads,
           "cpu": cpu_model(), "git": git_revision(), "seconds": time.perf_counter() - start,
           "results": results, "table": table}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


def format_table(results: list[dict[str, Any]]) -> str:
    """Per variant and phase: the largest peak over the step's starting RSS (MiB), over all steps."""
    phases = ("forward", "backward", "refresh", "apply", "base update", "step")
    lines = [f"{'variant':<22} {'peak RSS':>9} {'+ AdamW':>8} " + " ".join(f"{p:>11}" for p in phases)]
    base = next((r["peak_rss_mib"] for r in results if r["variant"] == "adamw"), None)
    for r in results:
        cells = []
        for ph in phases:
            values = [x["peak_over_step_start_mib"] for x in r["phases"] if x["phase"] == ph]
            cells.append(f"{max(values):11.1f}" if values else f"{'-':>11}")
        extra = f"{r['peak_rss_mib'] - base:8.1f}" if base is not None else f"{'-':>8}"
        lines.append(f"{r['variant']:<22} {r['peak_rss_mib']:9.1f} {extra} " + " ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
