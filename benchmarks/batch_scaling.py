"""Steps (and time) to a target test accuracy as a function of the batch size (issue 23).

For one task and a list of batch sizes, every optimizer (default: AdamW, SOAP, Muon and HyLo's
shipped defaults) goes through the same protocol at every batch size, all inside one process:

1. Tuning, on the validation split: the learning rate (HyLo: its default damping 0.1, only the lr
   is tuned) is tried on ``LR_LADDER`` (half-decades: 1e-4, 3e-4, 1e-3, ...), starting from three
   rungs (``--start-lrs``), with ``--tune-seeds`` seeds per rung. A trial stops when it reaches the
   main target (the highest of ``--targets``) on the validation split or at the batch size's step
   budget. A rung is scored by the mean over its seeds of the steps to the main target, a seed that
   never reached it counting twice the step budget (ties: the higher mean best validation accuracy).
   While the best rung lies at an edge of the rungs tried, the next rung beyond that edge is tried
   (at most ``--max-extensions`` times per optimizer and batch); the JSON records every rung tried
   and whether the pick ended up interior.
2. Final runs: the picked lr with each of ``--seeds`` (fresh: none of the tuning seeds; at a given
   seed every optimizer starts from the same weights and sees the same batches), until the main
   target is reached on the test set or the step budget runs out. The test set (all of it) is
   evaluated every ``eval_every`` steps of the batch size, chosen so that it is at most a tenth of
   the steps to any target (checked in the JSON: ``resolution_ok``).
3. Runs of one phase at one batch size advance interleaved, ``eval_every`` steps at a time, so load
   changes on a shared machine hit every optimizer alike. Per-step cost: the steps of all final
   runs of an optimizer (the first, warm-up step excluded) pooled by their position in the
   ``update_freq``-step refresh cycle, the median taken in each position and the medians averaged,
   so the periodic curvature refreshes of HyLo and SOAP are paid in full and load spikes are not.
   Time to target = steps to target x that per-step cost (the measured training seconds at the hit
   are recorded too).

Reported per optimizer and batch: median and min-max over seeds of the steps to each target (a seed
that missed counts as infinite, so the median exists when most seeds reached), the number of seeds
that reached it, the ratio of the median to AdamW's, the per-step cost, time to target and its
ratio to AdamW's and to the best peer. Critical batch size of each optimizer: with the batch sizes
sorted, the per-doubling speed-up between neighbours is (steps(B_i) / steps(B_i+1)) ** (1 / log2(B_i+1
/ B_i)); the critical batch is the largest batch size reached from the smallest through neighbours
whose speed-up is at least ``CRITICAL_SPEEDUP`` (1.6, perfect scaling is 2), i.e. the last batch
size up to which doubling the batch still cut the steps by >= 1.6x. Issue 23's goals are checked.

Outputs: a printed table, ``benchmarks/results/batch_scaling_<task>.json`` and ``.png`` (steps to
target against batch size, log-log, one line per optimizer, seeds' min-max as error bars).

    python benchmarks/batch_scaling.py                      # MNIST MLP at 128, 512, 2048, 8192, 5 seeds (~25 min, 2 loaded cores)
    python benchmarks/batch_scaling.py --tuned benchmarks/results/batch_scaling_mnist_mlp_tuning.json   # final runs only (~7 min)
    python benchmarks/batch_scaling.py --quick              # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))

import convergence as C  # noqa: E402  (puts the repository, examples/ and benchmarks/ on sys.path)
from _env import load_average  # noqa: E402

import ds_hylo  # noqa: E402

RESULTS = C.RESULTS
OPTIMIZERS = ("adamw", "soap", "muon", "hylo-default")
PEERS = ("adamw", "soap", "muon")
HYLO = "hylo-default"
HYLO_DAMPING = ds_hylo.HyLoConfig().damping  # HyLo's defaults: only the lr is tuned
LR_LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3)
CRITICAL_SPEEDUP = 1.6
# Issue 23's goals: at batch >= GOAL_LARGE_BATCH HyLo's steps <= 0.5x AdamW's and <= SOAP's, its time
# <= 0.75x the best of AdamW / SOAP / Muon; at the smallest batch no more steps than AdamW at any seed.
GOAL_LARGE_BATCH = 2048
GOAL_STEPS_VS_ADAMW = 0.5
GOAL_TIME_VS_BEST = 0.75

# MNIST (55k train / 5k val / 10k test) through a 784-128-128-10 ReLU MLP: the MNIST CNN costs
# ~1.6 s per step at batch 2048 on one thread of this CPU (see the README), the MLP ~20 ms.
TASKS: dict[str, C.TaskSpec] = {
    "mnist_mlp": C.TaskSpec("mnist", "mnist_mlp", batch_size=128, epochs=0.0, tune_epochs=0.0, eval_every=0,
                            targets=(96.0, 97.0), val_size=5000, budget_seconds=math.inf,
                            tune_budget_seconds=math.inf, hidden=(128, 128)),
}


def quick_spec(spec: C.TaskSpec) -> C.TaskSpec:
    q = copy.copy(spec)
    q.train_subset, q.test_subset, q.val_size, q.hidden = 2048, 1000, 500, (32,)
    q.targets = (70.0, 80.0)
    return q


def step_budget(batch: int, quick: bool = False) -> int:
    """Steps a run may take at a batch size: ~2.5x AdamW's steps to 97 % in a probe on the MNIST MLP
    (1000 / 340 / 170 / 140 steps at 128 / 512 / 2048 / 8192), at least 400."""
    if quick:
        return 60
    return max(400, round(2500 * math.sqrt(128 / batch)))


def eval_interval(batch: int, quick: bool = False) -> int:
    """Steps between test evaluations of the final runs: 1/300 of the step budget (8 / 4 / 2 / 1 at 128 /
    512 / 2048 / 8192; a first run at 1/125 was coarser than a tenth of the fastest runs' steps to 96 %)."""
    if quick:
        return 3
    return max(1, step_budget(batch) // 300)


def tune_interval(batch: int, quick: bool = False) -> int:
    """Steps between validation evaluations of the tuning trials: 1/125 of the step budget (20 / 10 / 5 / 3)."""
    if quick:
        return 3
    return max(1, round(step_budget(batch) / 125))


def lr_extension(tried: Sequence[float], best: float) -> Optional[float]:
    """The ladder rung beyond the edge of ``tried`` where ``best`` sits, or None (interior, or the
    ladder's end)."""
    tried = sorted(tried)
    i = LR_LADDER.index(best)
    if best == tried[0] and i > 0:
        return LR_LADDER[i - 1]
    if best == tried[-1] and i + 1 < len(LR_LADDER):
        return LR_LADDER[i + 1]
    return None


def is_interior(tried: Sequence[float], best: float) -> bool:
    return min(tried) < best < max(tried)


def hp_for(name: str, lr: float, damping: float = HYLO_DAMPING) -> dict[str, float]:
    return {"lr": lr, "damping": damping} if name in C.HYLO_VARIANTS else {"lr": lr}


class TargetRun(C.Run):
    """A ``convergence.Run`` that stops once an evaluation reaches ``stop_at`` (percent)."""

    def __init__(self, *args: Any, stop_at: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop_at = stop_at
        self.reached = False

    @property
    def done(self) -> bool:
        return self.reached or super().done

    def record(self, x: torch.Tensor, y: torch.Tensor) -> float:
        acc = super().record(x, y)
        self.reached = self.reached or acc >= self.stop_at
        return acc


def _steps_to(curve: list[dict[str, float]], target: float) -> Optional[int]:
    return C.time_to_target(curve, target)[1]


def _inf_median(values: list[Optional[float]]) -> Optional[float]:
    """Median with a missing value (a seed that never reached the target) counted as infinite: a
    number when more than half the values exist, else None."""
    vals = sorted(math.inf if v is None else float(v) for v in values)
    if not vals:
        return None
    m = statistics.median(vals)
    return None if math.isinf(m) else m


def periodic_step_ms(runs: list[C.Run], period: int) -> Optional[float]:
    """Per-step cost (ms) of an optimizer from its runs' step times: pooled by position in the
    ``period``-step refresh cycle (step 0, the warm-up, excluded), median per position, mean of the
    medians."""
    by_pos: dict[int, list[float]] = {}
    for run in runs:
        for i, ms in enumerate(run.step_ms):
            if i > 0:
                by_pos.setdefault(i % period, []).append(ms)
    if not by_pos:
        return None
    return statistics.fmean(statistics.median(v) for v in by_pos.values())


# --------------------------------------------------------------------------- phases


def tune_batch(spec: C.TaskSpec, data: dict[str, torch.Tensor], optimizers: Sequence[str], args: argparse.Namespace,
               log: Callable[[str], None]) -> dict[str, Any]:
    """Tune every optimizer's lr at one batch size (rounds of interleaved trials, extending at edges)."""
    budget, every, main = step_budget(spec.batch_size, args.quick), tune_interval(spec.batch_size, args.quick), max(spec.targets)
    pending = {name: list(args.start_lrs) for name in optimizers}
    trials: dict[str, dict[float, dict[str, Any]]] = {name: {} for name in optimizers}
    extensions = {name: 0 for name in optimizers}
    rounds = 0
    while any(pending.values()):
        runs = [TargetRun(name, hp_for(name, lr, args.hylo_damping), seed, spec, data, args, budget, math.inf,
                          stop_at=main)
                for name, lrs in pending.items() for lr in lrs for seed in args.tune_seeds]
        log(f"[batch {spec.batch_size}] tuning round {rounds}: {len(runs)} trials "
            + ", ".join(f"{n} {lrs}" for n, lrs in pending.items() if lrs))
        C.interleave(runs, every, data["val_x"], data["val_y"], eval_during=True, log=log, label=f"tune {spec.batch_size}")
        for run in runs:
            entry = trials[run.name].setdefault(run.hp["lr"], {"lr": run.hp["lr"], "seeds": []})
            entry["seeds"].append({"seed": run.seed, "steps_to_target": _steps_to(run.curve, main), "steps": run.step,
                                   "best_val_acc": max(p["acc"] for p in run.curve), "diverged": run.diverged})
        pending = {name: [] for name in optimizers}
        for name in optimizers:
            for entry in trials[name].values():
                steps = [budget * 2 if s["steps_to_target"] is None else s["steps_to_target"] for s in entry["seeds"]]
                entry["score_steps"] = statistics.fmean(steps)
                entry["mean_best_val_acc"] = round(statistics.fmean(s["best_val_acc"] for s in entry["seeds"]), 3)
            best = min(trials[name].values(), key=lambda e: (e["score_steps"], -e["mean_best_val_acc"]))["lr"]
            nxt = lr_extension(list(trials[name]), best)
            if nxt is not None and extensions[name] < args.max_extensions:
                pending[name] = [nxt]
                extensions[name] += 1
        rounds += 1
    out: dict[str, Any] = {}
    for name in optimizers:
        rows = sorted(trials[name].values(), key=lambda e: e["lr"])
        best = min(rows, key=lambda e: (e["score_steps"], -e["mean_best_val_acc"]))
        tried = [e["lr"] for e in rows]
        out[name] = {"lr": best["lr"], "lrs_tried": tried, "interior": is_interior(tried, best["lr"]),
                     "extensions": extensions[name], "trials": rows}
        log(f"  [batch {spec.batch_size}] {name:12s} " + "  ".join(
            f"{e['lr']:g}:{e['score_steps']:.0f}" for e in rows) + f"  -> {best['lr']:g}"
            + ("" if out[name]["interior"] else " (edge)"))
    return out


def final_batch(spec: C.TaskSpec, data: dict[str, torch.Tensor], chosen: dict[str, float], args: argparse.Namespace,
                log: Callable[[str], None]) -> list[TargetRun]:
    budget, every = step_budget(spec.batch_size, args.quick), eval_interval(spec.batch_size, args.quick)
    runs = [TargetRun(name, hp_for(name, lr, args.hylo_damping), seed, spec, data, args, budget, math.inf,
                      stop_at=max(spec.targets))
            for seed in args.seeds for name, lr in chosen.items()]
    log(f"[batch {spec.batch_size}] final runs: {len(runs)}, up to {budget} steps, test accuracy on "
        f"{data['test_x'].shape[0]} samples every {every} steps")
    C.interleave(runs, every, data["test_x"], data["test_y"], eval_during=True, log=log, label=f"final {spec.batch_size}")
    return runs


def summarize_batch(spec: C.TaskSpec, runs: list[TargetRun], optimizers: Sequence[str], period: int,
                    budget: int, every: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in optimizers:
        mine = [r for r in runs if r.name == name]
        ms = periodic_step_ms(mine, period)
        row: dict[str, Any] = {"lr": mine[0].hp["lr"], "seeds": [r.seed for r in mine], "step_ms": _round(ms, 3),
                               "diverged": sum(r.diverged for r in mine), "steps_run": [r.step for r in mine]}
        for t in spec.targets:
            key = format(t, "g")
            hits = [C.time_to_target(r.curve, t) for r in mine]
            steps = [h[1] for h in hits]
            done = [s for s in steps if s is not None]
            med = _inf_median(steps)
            row[f"steps_{key}"] = steps
            row[f"reached_{key}"] = len(done)
            row[f"median_steps_{key}"] = med
            row[f"min_steps_{key}"] = min(done) if done else None
            row[f"max_steps_{key}"] = max(steps) if len(done) == len(steps) else None  # None: a seed missed
            row[f"median_seconds_{key}"] = _round(_inf_median([h[0] for h in hits]), 3)  # measured, for reference
            row[f"time_{key}"] = None if med is None or ms is None else round(med * ms / 1e3, 3)
        out[name] = row
    for t in spec.targets:
        key = format(t, "g")
        base = out.get("adamw", {})
        peers = [out[p][f"time_{key}"] for p in PEERS if p in out and out[p][f"time_{key}"] is not None]
        for name, row in out.items():
            row[f"steps_vs_adamw_{key}"] = _ratio(row[f"median_steps_{key}"], base.get(f"median_steps_{key}"))
            row[f"time_vs_adamw_{key}"] = _ratio(row[f"time_{key}"], base.get(f"time_{key}"))
            row[f"time_vs_best_peer_{key}"] = _ratio(row[f"time_{key}"], min(peers) if peers else None)
    fastest = [min(r[f"min_steps_{format(t, 'g')}"] or math.inf for r in out.values()) for t in spec.targets]
    return {"step_budget": budget, "eval_every": every, "rows": out,
            "resolution_ok": all(every <= f / 10 for f in fastest if math.isfinite(f))}


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 3) if a is not None and b else None


def _round(v: Optional[float], nd: int) -> Optional[float]:
    return None if v is None else round(v, nd)


def critical_batch(batches: Sequence[int], medians: Sequence[Optional[float]]) -> dict[str, Any]:
    """The largest batch reached from the smallest through neighbours whose per-doubling speed-up in
    steps is >= CRITICAL_SPEEDUP; ``beyond`` is True when the speed-up held up to the largest batch
    measured (the critical batch is then at least that), None when steps are missing."""
    speedups: list[Optional[float]] = []
    for (b0, s0), (b1, s1) in zip(zip(batches, medians), zip(batches[1:], medians[1:])):
        speedups.append(None if s0 is None or s1 is None else round((s0 / s1) ** (1 / math.log2(b1 / b0)), 3))
    crit: Optional[int] = batches[0]
    beyond = True
    for b1, s in zip(batches[1:], speedups):
        if s is None:
            crit, beyond = None, None
            break
        if s < CRITICAL_SPEEDUP:
            beyond = False
            break
        crit = b1
    return {"batch": crit, "at_least": bool(beyond) if beyond is not None else None, "speedups_per_doubling": speedups}


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 23's goals on the main target, one entry per (goal, batch)."""
    main = format(max(result["protocol"]["task"]["targets"]), "g")
    batches = result["protocol"]["batch_sizes"]
    out = []
    for b in batches:
        rows = result["batches"][str(b)]["rows"]
        if HYLO not in rows or "adamw" not in rows:
            continue
        h = rows[HYLO]
        if b >= GOAL_LARGE_BATCH:
            soap = rows.get("soap", {}).get(f"median_steps_{main}")
            out.append({"batch": b, "goal": f"steps to {main}% <= {GOAL_STEPS_VS_ADAMW}x AdamW's",
                        "value": h[f"steps_vs_adamw_{main}"],
                        "met": _le(h[f"steps_vs_adamw_{main}"], GOAL_STEPS_VS_ADAMW)})
            out.append({"batch": b, "goal": f"steps to {main}% <= SOAP's", "value": _ratio(h[f"median_steps_{main}"], soap),
                        "met": _le(_ratio(h[f"median_steps_{main}"], soap), 1.0)})
            out.append({"batch": b, "goal": f"time to {main}% <= {GOAL_TIME_VS_BEST}x the best of AdamW, SOAP, Muon",
                        "value": h[f"time_vs_best_peer_{main}"],
                        "met": _le(h[f"time_vs_best_peer_{main}"], GOAL_TIME_VS_BEST)})
    if batches and batches[0] < GOAL_LARGE_BATCH:
        b = batches[0]
        rows = result["batches"][str(b)]["rows"]
        if HYLO in rows and "adamw" in rows:
            hs, as_ = rows[HYLO][f"steps_{main}"], rows["adamw"][f"steps_{main}"]
            worse = sum(1 for x, y in zip(hs, as_) if x is None or (y is not None and x > y))
            out.append({"batch": b, "goal": f"steps to {main}% no more than AdamW's at every seed",
                        "value": f"{len(hs) - worse}/{len(hs)} seeds", "met": worse == 0})
    return out


def _le(value: Optional[float], limit: float) -> bool:
    return value is not None and value <= limit


# --------------------------------------------------------------------------- tables (README and printout)

DASH = "–"


def _steps_cell(row: dict[str, Any], key: str) -> str:
    med, lo, hi, k, n = (row[f"median_steps_{key}"], row[f"min_steps_{key}"], row[f"max_steps_{key}"],
                         row[f"reached_{key}"], len(row["seeds"]))
    spread = f"{lo}-{hi}" if hi is not None else (f"{lo}-{DASH}" if lo is not None else DASH)
    return f"{DASH if med is None else format(med, '.0f')} [{spread}] ({k}/{n})"


def _num(v: Optional[float], fmt: str) -> str:
    return DASH if v is None else format(v, fmt)


def main_table(result: dict[str, Any]) -> list[list[str]]:
    """One row per (batch, optimizer): lr picked (interior?), steps to each target as median [min-max]
    (seeds reached), ratio to AdamW, ms per step, time to the main target and its ratios."""
    targets = [format(t, "g") for t in result["protocol"]["task"]["targets"]]
    main = targets[-1]
    head = ["batch", "optimizer", "lr (rungs tried)"]
    for t in targets:
        head += [f"steps to {t}%: median [min-max] (seeds)", f"/AdamW @{t}%"]
    head += ["ms/step", f"s to {main}%", f"time /AdamW @{main}%", f"time /best peer @{main}%"]
    rows = [head]
    for b in result["protocol"]["batch_sizes"]:
        entry = result["batches"][str(b)]
        for name, row in entry["rows"].items():
            tune = entry["tuning"][name]
            cells = [str(b), name, f"{row['lr']:g} ({len(tune['lrs_tried'])}{'' if tune['interior'] else ', edge'})"]
            for t in targets:
                cells += [_steps_cell(row, t), _num(row[f"steps_vs_adamw_{t}"], ".2f")]
            cells += [_num(row["step_ms"], ".1f"), _num(row[f"time_{main}"], ".2f"), _num(row[f"time_vs_adamw_{main}"], ".2f"),
                      _num(row[f"time_vs_best_peer_{main}"], ".2f")]
            rows.append(cells)
    return rows


def critical_table(result: dict[str, Any]) -> list[list[str]]:
    batches = result["protocol"]["batch_sizes"]
    head = ["optimizer", "critical batch"] + [f"speed-up per doubling {a}->{b}" for a, b in zip(batches, batches[1:])]
    rows = [head]
    for name, c in result["critical_batch"].items():
        crit = DASH if c["batch"] is None else (f">= {c['batch']}" if c["at_least"] else str(c["batch"]))
        rows.append([name, crit] + [_num(s, ".2f") for s in c["speedups_per_doubling"]])
    return rows


def goals_table(result: dict[str, Any]) -> list[list[str]]:
    rows = [["batch", "goal (issue 23)", "HyLo's defaults", "met?"]]
    for g in result["goals"]:
        value = g["value"] if isinstance(g["value"], str) else (f"{g['value']:.2f}x" if g["value"] is not None else DASH)
        rows.append([str(g["batch"]), g["goal"], value, "met" if g["met"] else "not met"])
    return rows


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def run_line(result: dict[str, Any]) -> str:
    m, p = result["machine"], result["protocol"]
    loads = result["load_average_1_5_15"]
    return (f"Run: {result['date_utc'][:10]}, `{result['command']}`, {result['total_seconds'] / 60:.1f} min, "
            f"{m['cpu_count']} cores ({m.get('cpu_model', '?')}), torch {m['torch']} ({m['torch_threads']} thread), "
            f"pytorch-optimizer {m.get('pytorch_optimizer')}, ds_hylo at {(m.get('git') or '?')[:7]}; load "
            f"{'/'.join(map(str, loads['start']))} at the start, {'/'.join(map(str, loads['end']))} at the end. "
            f"Tuning seeds {p['tune_seeds']}, final seeds {p['seeds']}; step budget / validation interval of the tuning "
            f"/ test interval of the final runs per batch: "
            + ", ".join(f"{b}: {e['step_budget']} / {e.get('tune_eval_every', e['eval_every'])} / {e['eval_every']}"
                        for b, e in ((b, result['batches'][str(b)]) for b in p["batch_sizes"]))
            + (f"; tuning taken from an earlier run (`--tuned`, its own date and load)"
               if any(result['batches'][str(b)].get('tuning_source') for b in p['batch_sizes']) else "")
            + f"; evaluation interval <= 1/10 of every run's steps to target at every batch: "
              f"{'yes' if all(result['batches'][str(b)]['resolution_ok'] for b in p['batch_sizes']) else 'no'}.")


def plot(result: dict[str, Any], path: Path) -> Optional[str]:
    """Steps to each target (one panel each) and time to the main target against batch, log-log."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    targets = [format(t, "g") for t in result["protocol"]["task"]["targets"]]
    batches = result["protocol"]["batch_sizes"]
    names = list(result["protocol"]["optimizers"])
    fig, axes = plt.subplots(1, len(targets) + 1, figsize=(5.2 * (len(targets) + 1), 4.6))
    for ax, (kind, t) in zip(axes, [("steps", t) for t in targets] + [("time", targets[-1])]):
        for i, name in enumerate(names):
            xs, ys, lo, hi = [], [], [], []
            for b in batches:
                row = result["batches"][str(b)]["rows"].get(name)
                med = row and row[f"median_steps_{t}"]
                if not med:
                    continue
                scale = 1.0 if kind == "steps" else row["step_ms"] / 1e3
                top = row[f"max_steps_{t}"] if row[f"max_steps_{t}"] is not None else result["batches"][str(b)]["step_budget"]
                xs.append(b)
                ys.append(med * scale)
                lo.append((med - row[f"min_steps_{t}"]) * scale)
                hi.append((top - med) * scale)
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="osD^"[i % 4], capsize=3, linestyle="-" if name == HYLO else "--",
                        label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(f"steps to {t}% test accuracy" if kind == "steps" else f"time to {t}% (s) = steps x ms/step")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result['task']}: median over seeds {result['protocol']['seeds']}, bars: min-max "
                 f"(to the step budget where a seed missed); {result['date_utc'][:10]}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# --------------------------------------------------------------------------- driver


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    spec = quick_spec(TASKS[args.task]) if args.quick else copy.copy(TASKS[args.task])
    if args.targets:
        spec.targets = tuple(sorted(args.targets))
    optimizers = list(args.optimizers)
    skipped: dict[str, str] = {}
    C.drop_unavailable_soap(optimizers, skipped, log)
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.perf_counter()
    loads = {"start": load_average()}
    data = C.load_task_data(spec, args.data_dir, "cpu")
    log(f"[{args.task}] train {tuple(data['train_x'].shape)}, val {data['val_x'].shape[0]}, test {data['test_x'].shape[0]}")
    batches: dict[str, Any] = {}
    for b in sorted(args.batch_sizes):
        bspec = copy.copy(spec)
        bspec.batch_size = b
        tb = time.perf_counter()
        if args.tuned:  # the tuning phase of an earlier run of this script (same protocol)
            source = json.loads(Path(args.tuned).read_text())["batches"][str(b)]
            tuning = {name: source["tuning"][name] for name in optimizers}
            tune_every = source.get("tune_eval_every", source["eval_every"])
            log(f"[batch {b}] tuning taken from {args.tuned}: " + ", ".join(f"{n} {t['lr']:g}" for n, t in tuning.items()))
        else:
            tuning = tune_batch(bspec, data, optimizers, args, log)
            tune_every = tune_interval(b, args.quick)
        runs = final_batch(bspec, data, {n: tuning[n]["lr"] for n in optimizers}, args, log)
        entry = summarize_batch(bspec, runs, optimizers, args.update_freq, step_budget(b, args.quick),
                                eval_interval(b, args.quick))
        entry["tuning"] = tuning
        entry["tune_eval_every"] = tune_every
        entry["tuning_source"] = args.tuned
        entry["seconds"] = round(time.perf_counter() - tb, 1)
        entry["load_end"] = load_average()
        entry["runs"] = [{"optimizer": r.name, "lr": r.hp["lr"], "seed": r.seed, "steps": r.step, "diverged": r.diverged,
                          "curve": [[p["step"], p["acc"]] for p in r.curve]} for r in runs]
        batches[str(b)] = entry
        log(f"[batch {b}] done in {entry['seconds']:.0f} s, load {entry['load_end']}")
    loads["end"] = load_average()
    main = format(max(spec.targets), "g")
    machine = C.machine_info(args.threads, "cpu")
    machine["pytorch_optimizer"] = C.package_version("pytorch-optimizer")
    result: dict[str, Any] = {
        "benchmark": "batch_scaling",
        "task": args.task,
        "quick": bool(args.quick),
        "date_utc": started.isoformat(timespec="seconds"),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "machine": machine,
        "load_average_1_5_15": loads,
        "command": " ".join([Path(sys.executable).name] + [str(a) for a in sys.argv]),
        "protocol": {
            "task": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec).items()
                     if k not in ("batch_size", "epochs", "tune_epochs", "eval_every", "budget_seconds",
                                  "tune_budget_seconds")},
            "batch_sizes": sorted(args.batch_sizes),
            "optimizers": optimizers,
            "skipped": skipped,
            "seeds": list(args.seeds),
            "tune_seeds": list(args.tune_seeds),
            "start_lrs": list(args.start_lrs),
            "lr_ladder": list(LR_LADDER),
            "max_extensions": args.max_extensions,
            "hylo": {"options": "HyLo(model, lr=<tuned>, damping=%g) with every other option at its shipped default"
                                % args.hylo_damping,
                     "shipped_defaults": {k: v for k, v in asdict(ds_hylo.HyLoConfig()).items()
                                          if isinstance(v, (int, float, str, bool, type(None)))}},
            "adamw_weight_decay": args.adamw_weight_decay,
            "soap": {"implementation": "pytorch_optimizer.SOAP", "precondition_frequency": args.update_freq},
            "muon": "convergence.MuonWithAdamW: torch.optim.Muon (match_rms_adamw) on the hidden nn.Linear weights, "
                    "AdamW on the rest, one lr",
            "lr_schedule": "constant",
            "gradient_accumulation": "none: every batch is one forward/backward",
            "selection": "mean over tuning seeds of the steps to the main target on the validation split (a seed "
                         "that missed counts 2x the step budget); ties: higher mean best validation accuracy",
            "steps_median": "median over seeds, a seed that missed counting as infinite",
            "step_cost": f"step times of the final runs pooled by position in the {args.update_freq}-step cycle "
                         "(first step excluded), median per position, mean over positions",
            "time_to_target": "median steps to target x per-step cost",
            "critical_batch": f"largest batch reached from the smallest through neighbours whose speed-up in "
                              f"median steps to {main}% per doubling of the batch is >= {CRITICAL_SPEEDUP}",
        },
        "batches": batches,
    }
    result["critical_batch"] = {name: critical_batch(sorted(args.batch_sizes),
                                                     [batches[str(b)]["rows"][name][f"median_steps_{main}"]
                                                      for b in sorted(args.batch_sizes)]) for name in optimizers}
    result["goals"] = goals(result)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = ("_quick" if args.quick else "") + args.suffix
    if not args.no_plot:
        result["plot"] = plot(result, out_dir / f"batch_scaling_{args.task}{suffix}.png")
    json_path = out_dir / f"batch_scaling_{args.task}{suffix}.json"
    json_path.write_text(json.dumps(result, indent=1, default=str))
    log("\n" + markdown(main_table(result)) + "\n\n" + markdown(critical_table(result)) + "\n\n"
        + markdown(goals_table(result)) + "\n\n" + run_line(result))
    log(f"wrote {json_path}")
    return result


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="mnist_mlp", choices=list(TASKS))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default 128 512 2048 8192 (--quick: 32 128)")
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(PEERS) + list(C.HYLO_VARIANTS),
                   help="the committed run: adamw soap muon hylo-default; any HyLo variant of convergence.py for probes")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="final-run seeds (default 0-4; --quick: 0)")
    p.add_argument("--tune-seeds", nargs="+", type=int, default=None, help="default 100 101 (--quick: 100)")
    p.add_argument("--start-lrs", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2],
                   help="first rungs of every lr search (values of LR_LADDER)")
    p.add_argument("--max-extensions", type=int, default=3, help="rungs added beyond an edge, per optimizer and batch")
    p.add_argument("--tuned", default=None, metavar="JSON",
                   help="skip tuning: take every batch's tuning (trials and picked lr) from an earlier run's JSON")
    p.add_argument("--targets", nargs="+", type=float, default=None, help="test accuracies in percent (default per task)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny data and MLP, 2 batch sizes, 1 seed")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "mnist"), help="MNIST idx files")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--hylo-damping", type=float, default=HYLO_DAMPING,
                   help="HyLo's damping (a mechanism probe; the committed run keeps the shipped default)")
    p.add_argument("--suffix", default="", help="added to the output file names, e.g. _damping0.01")
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    # convergence.make_stepper's fixed hyper-parameters (AdamW / SOAP / Muon weight decay, SOAP's period)
    base = C.parse_args([])
    for key in ("momentum", "weight_decay", "adamw_weight_decay", "rank_ratio", "update_freq", "switch_window",
                "hylo_step_scale", "hylo_kl_clip", "kfac_factor_decay", "kfac_kl_clip"):
        setattr(args, key, getattr(base, key))
    if args.batch_sizes is None:
        args.batch_sizes = [32, 128] if args.quick else [128, 512, 2048, 8192]
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2, 3, 4]
    if args.tune_seeds is None:
        args.tune_seeds = [100] if args.quick else [100, 101]
    bad = [lr for lr in args.start_lrs if lr not in LR_LADDER]
    if bad:
        p.error(f"--start-lrs {bad} not on the ladder {LR_LADDER}")
    if set(args.seeds) & set(args.tune_seeds):
        p.error("final seeds must be fresh: not among --tune-seeds")
    return args


_T0 = time.perf_counter()


def _log(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {message}" if message.strip() else message, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    return run(args, log=_log)


if __name__ == "__main__":
    main()
