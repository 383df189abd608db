#!/usr/bin/env python
"""Render every benchmark table in README.md and benchmarks/README.md from benchmarks/results/*.json.

A rendered block sits between marker comments::

    <!-- table:convergence_mnist -->
    ...generated, do not edit...
    <!-- /table -->

and everything between the markers is replaced by the renderer named after ``table:``. Prose
outside the markers must not quote benchmark numbers: point at the table instead.

    python benchmarks/render_readme.py            # rewrite the READMEs in place
    python benchmarks/render_readme.py --check    # exit 1 and show a diff if a README is stale
    python benchmarks/render_readme.py --plots    # also redraw the convergence, hybrid and finetune PNGs from the JSON

Tests (tests/unit/test_docs.py) assert that the committed READMEs equal the rendering.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
READMES = (REPO / "README.md", REPO / "benchmarks" / "README.md")
DASH = "–"  # shown where a value does not exist (target not reached by every seed, no refresh step)
MARKER = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)
HYLO_PEERS = ("sgd", "adamw", "kfac", "kfac-mc", "soap")


@lru_cache(maxsize=None)
def load(name: str) -> dict[str, Any]:
    """benchmarks/results/<name>.json as a dict."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a README table is rendered from it")
    return json.loads(path.read_text())


def _num(value: Optional[float], fmt: str) -> str:
    return DASH if value is None else format(value, fmt)


def _target(t: float) -> str:
    return format(t, "g")


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(cells: list[str]) -> list[str]:
    return [_row(cells), "|" + "---|" * len(cells)]


# ------------------------------------------------------------------ convergence.py


def convergence_table(task: str, result: Optional[str] = None) -> str:
    """Per optimizer: chosen setting, time and steps to each target, final accuracy, step times, memory.
    ``result``: the JSON under benchmarks/results (default ``convergence_<task>``)."""
    d = load(result or f"convergence_{task}")
    targets = d["protocol"]["task"]["targets"]
    head = ["optimizer", "chosen (lr, damping)"]
    for t in targets:
        head += [f"s to {_target(t)}%", f"steps to {_target(t)}%"]
    head += ["final test %", "step ms", "refresh-step ms", "peak RSS MB (+ over SGD)"]
    lines = _header(head)
    for name, row in d["summary"].items():
        hp = row["hp"]
        cells = [name, ", ".join(format(hp[k], "g") for k in ("lr", "damping") if k in hp)]
        for t in targets:
            key = _target(t)
            seconds, steps, k = row[f"time_to_{key}"], row[f"steps_to_{key}"], row[f"reached_{key}"]
            seeds = len(row["seeds"])
            cells.append(f"{DASH} ({k}/{seeds})" if seconds is None else f"{seconds:.1f}")
            cells.append(DASH if steps is None else f"{steps:.0f}")
        mem = d.get("memory", {}).get(name, {})
        peak = mem.get("peak_rss_mb")
        cells += [f"{row['final_acc']:.2f}", _num(row["median_step_ms"], ".1f"),
                  _num(row["median_refresh_step_ms"], ".1f"),
                  DASH if peak is None else f"{peak:.0f} (+{mem.get('extra_over_sgd_mb', 0.0):.0f})"]
        lines.append(_row(cells))
    return "\n".join(lines)


def convergence_ratios(task: str) -> str:
    """HyLo / peer ratio of the time to each target, steps ratio in parentheses."""
    d = load(f"convergence_{task}")
    targets = [_target(t) for t in d["protocol"]["task"]["targets"]]
    names = list(d["summary"])
    peers = [p for p in HYLO_PEERS if p in names]
    head = ["HyLo"] + [f"/{p} @{t}%" for p in peers for t in targets]
    lines = _header(head)
    for name in (n for n in names if n.startswith("hylo")):
        cells = [name]
        for p in peers:
            for t in targets:
                time_ratio = d["ratios"].get(f"{name}/{p} time@{t}")
                step_ratio = d["ratios"].get(f"{name}/{p} steps@{t}")
                cells.append(DASH if time_ratio is None else f"{time_ratio:.2f} ({_num(step_ratio, '.2f')})")
        lines.append(_row(cells))
    return "\n".join(lines)


def convergence_run() -> str:
    """Machine, versions, load and duration of the committed convergence run."""
    tasks = {t: load(f"convergence_{t}") for t in ("mnist", "mnist1d")}
    first = tasks["mnist"]
    m = first["machine"]
    load_avg = {t: d["load_average_1_5_15"] for t, d in tasks.items()}

    def fmt_load(values: list[float]) -> str:
        return "/".join(f"{v:.2f}" for v in values)

    total = sum(d["total_seconds"] for d in tasks.values())
    return (
        f"Date (UTC): {first['date_utc'][:10]}. Machine: {m['cpu_count']}-core {m['cpu_model']} "
        f"(hostname `{m['hostname']}`), {m['mem_total_gb']} GB RAM, Python {m['python']}, torch {m['torch']} "
        f"with {m['torch_threads']} thread(s), asdfghjkl {m['asdfghjkl']}, mnist1d {m['mnist1d']}, "
        f"ds_hylo {m['ds_hylo']} at {m['git'][:7]}. 1/5/15-minute load averages: MNIST start "
        f"{fmt_load(load_avg['mnist']['start'])}, after tuning {fmt_load(load_avg['mnist']['after_tuning'])}, "
        f"end {fmt_load(load_avg['mnist']['end'])}; MNIST-1D start {fmt_load(load_avg['mnist1d']['start'])}, "
        f"end {fmt_load(load_avg['mnist1d']['end'])}. Command: `{first['command']}`, "
        f"{total / 60:.1f} minutes in all (MNIST {tasks['mnist']['total_seconds']:.0f} s, "
        f"MNIST-1D {tasks['mnist1d']['total_seconds']:.0f} s)."
    )


def fisher_table() -> str:
    """README: empirical vs sampled Fisher for HyLo-KIS on the MNIST CNN (from the convergence run)."""
    d = load("convergence_mnist")
    targets = [_target(t) for t in d["protocol"]["task"]["targets"]]
    head = ["HyLo-KIS, MNIST CNN", "fisher"] + [f"steps to {t}%" for t in targets] + ["final test %"]
    lines = _header(head)
    for name, fisher in (("hylo-kis", "empirical"), ("hylo-kis-mc", "sampled")):
        row = d["summary"][name]
        cells = [f"`{name}`", f"`{fisher}`"] + [_num(row[f"steps_to_{t}"], ".0f") for t in targets]
        lines.append(_row(cells + [f"{row['final_acc']:.2f}"]))
    return "\n".join(lines)


def rotation_table() -> str:
    """benchmarks/README: bytes a rank receives per refresh, as ratios to K-FAC (rotation.json)."""
    d = load("rotation")
    st = d["settings"]
    head = ["model", "P", "K-FAC MB", "HyLo-KIS / K-FAC", f"max_global_samples={st['global_budget']} / K-FAC",
            f"contributing_ranks={st['contributing_ranks']} / K-FAC", "rows per layer (rotating)"]
    lines = _header(head)
    for r in d["rows"]:
        k = r["kfac_mb"]
        lines.append(_row([r["model"], str(r["workers"]), f"{k:.1f}", f"{r['hylo_mb'] / k:.3f}",
                           f"{r['hylo_global_mb'] / k:.3f}", f"{r['hylo_rotate_mb'] / k:.3f}", str(r["hylo_rotate_s"])]))
    return "\n".join(lines)


def rotation_steps_table() -> str:
    """benchmarks/README: steps to target with rotating contributors (rotation_steps.json)."""
    d = load("rotation_steps")
    targets = [_target(t) for t in d["targets"]]
    head = ["contributing_ranks"] + [f"steps to {t}% (per seed)" for t in targets] + ["final % (per seed)"]
    lines = _header(head)
    for row in d["rows"]:
        cells = [str(row["contributing_ranks"])]
        cells += [", ".join(DASH if v is None else str(v) for v in row[f"steps_to_{t}"]) for t in targets]
        cells.append(", ".join(f"{v:.2f}" for v in row["final_acc"]))
        lines.append(_row(cells))
    st = d["settings"]
    lines.append("")
    lines.append(f"Run: {d['date_utc'][:10]}, `{d['command']}`, {d['seconds'] / 60:.1f} min, ds_hylo at {d['git'][:7]}; "
                 f"{d['world_size']} gloo ranks x local batch {d['local_batch']}, HyLo-KIS lr {st['lr']:g}, damping "
                 f"{st['damping']:g}, momentum {st['momentum']:g}, test accuracy on 2000 images every {st['eval_every']} steps.")
    return "\n".join(lines)


def long_sequence_table() -> str:
    """benchmarks/README: refresh-step and plain-step time (ratios to AdamW), rows held and peak memory per seq."""
    d = load("long_sequence")
    labels = d["setup"]["methods"]
    head = ["seq", "rows n", "method", "refresh step x AdamW", "plain step x AdamW", "rows held MiB", "peak +MiB"]
    lines = _header(head)
    for r in sorted(d["rows"], key=lambda r: (r["seq"], list(labels).index(r["method"]))):
        cells = [str(r["seq"]), str(r["n"]), labels[r["method"]]]
        if r.get("refresh_step_s") is None:
            note = r.get("skipped") or r.get("error") or ""
            lines.append(_row(cells + [f"skipped: {note}", DASH, DASH, DASH]))
            continue
        if r["method"] == "adamw":
            timing = [f"1 (step {r['adamw_step_s']:.3f} s)", "1"]
        else:
            timing = [f"{r['refresh_ratio_to_adamw']:.1f}", f"{r['plain_ratio_to_adamw']:.2f}"]
        lines.append(_row(cells + timing + [f"{r['held_mib']:.2f}", f"{r['peak_extra_mib']:.0f}"]))
    return "\n".join(lines)


def _options(spec: dict[str, Any], shipped: Optional[dict[str, Any]] = None) -> str:
    """The mechanism column: what a row changes on hylo-kis (momentum SGD, the reference, is not
    repeated); for hylo-default, the base the run's shipped defaults had (recorded in the JSON)."""
    if spec.get("defaults"):
        if not shipped:
            return "shipped defaults"
        base = shipped.get("base", "sgd")
        detail = f"momentum {shipped.get('momentum', 0):g}" if base == "sgd" else f"betas {tuple(shipped.get('betas', ()))}"
        return f"shipped defaults (base={base}, {detail})"
    return ", ".join(f"{k}={v}" for k, v in spec.items() if k != "mode" and (k, v) != ("base", "sgd")) or "-"


def ablation_table(task: str) -> str:
    """benchmarks/README: the ablation run (convergence.py --ablation): every HyLo row and the peers,
    steps and time to each target, and the time ratios to hylo-kis and to the fastest peer."""
    d = load(f"convergence_{task}_ablation")
    targets = [_target(t) for t in d["protocol"]["task"]["targets"]]
    variants = d["protocol"].get("hylo_variants", {})
    summary = d["summary"]
    peers = [p for p in HYLO_PEERS if p in summary]

    def best_peer(t: str) -> Optional[float]:
        times = [summary[p][f"time_to_{t}"] for p in peers if summary[p][f"time_to_{t}"] is not None]
        return min(times) if times else None

    head = ["row", "mode", "mechanism", "chosen lr, damping"]
    for t in targets:
        head += [f"steps to {t}%", f"s to {t}%"]
    head += ["final test %", "step ms", "refresh-step ms"]
    head += [f"time / hylo-kis @{t}%" for t in targets] + [f"time / best peer @{t}%" for t in targets]
    lines = _header(head)
    base = summary.get("hylo-kis")
    for name, row in summary.items():
        spec = variants.get(name)
        hp = row["hp"]
        cells = [f"`{name}`", spec.get("mode", "default") if spec else DASH,
                 _options(spec, d["protocol"].get("hylo_shipped_defaults")) if spec else "peer",
                 ", ".join(format(hp[k], "g") for k in ("lr", "damping") if k in hp)]
        for t in targets:
            seconds, steps, k = row[f"time_to_{t}"], row[f"steps_to_{t}"], row[f"reached_{t}"]
            cells.append(DASH if steps is None else f"{steps:.0f}")
            cells.append(f"{DASH} ({k}/{len(row['seeds'])})" if seconds is None else f"{seconds:.1f}")
        cells += [f"{row['final_acc']:.2f}", _num(row["median_step_ms"], ".1f"), _num(row["median_refresh_step_ms"], ".1f")]
        for t in targets:
            a, b = row[f"time_to_{t}"], base[f"time_to_{t}"] if base else None
            cells.append(DASH if a is None or not b else f"{a / b:.2f}")
        for t in targets:
            a, b = row[f"time_to_{t}"], best_peer(t)
            cells.append(DASH if a is None or not b else f"{a / b:.2f}")
        lines.append(_row(cells))
    m = d["machine"]
    lines.append("")
    lines.append(f"Run: {d['date_utc'][:10]}, `{d['command']}`, {d['total_seconds'] / 60:.1f} min, "
                 f"{m['cpu_count']} cores, torch {m['torch']} ({m['torch_threads']} thread), ds_hylo at {m['git'][:7]}; "
                 f"load {'/'.join(f'{v:.2f}' for v in d['load_average_1_5_15']['start'])} at the start, "
                 f"{'/'.join(f'{v:.2f}' for v in d['load_average_1_5_15']['end'])} at the end.")
    return "\n".join(lines)


def ablation_tuning_table(task: str) -> str:
    """benchmarks/README: the tuning phase of an ablation (validation accuracy of every trial), from
    results/convergence_<task>_ablation_tuning.json (kept when the final runs did not complete)."""
    d = load(f"convergence_{task}_ablation_tuning")
    head = ["row", "chosen lr, damping", "best val %", "worst val % (not diverged)", "diverged trials"]
    lines = _header(head)
    for name, rows in d["trials"].items():
        best = max(rows, key=lambda r: r["val_acc"])
        ok = [r["val_acc"] for r in rows if not r["diverged"]]
        hp = ", ".join(format(best["hp"][k], "g") for k in ("lr", "damping") if k in best["hp"])
        lines.append(_row([f"`{name}`", hp if ok else DASH, f"{best['val_acc']:.1f}" if ok else DASH,
                           f"{min(ok):.1f}" if ok else DASH, f"{len(rows) - len(ok)}/{len(rows)}"]))
    return "\n".join(lines)


# Candidate defaults: which row stands for each candidate in each benchmark's tuning phase. The
# convergence rows add one mechanism to HyLo on momentum SGD; finetune's "hylo" row is the package
# as shipped, which since the choice is base="adamw" (its rows were tuned after the flip).
DEFAULT_CANDIDATES: dict[str, dict[str, str]] = {
    'HyLo on momentum SGD (the paper\'s; `base="sgd"`)': {"convergence": "hylo-kis", "finetune": "hylo-kis-sgd"},
    '`graft="sgd"` (SGD\'s per-layer step length)': {"convergence": "hylo-kis-graft-sgd", "finetune": "hylo-kis-graft-sgd"},
    '`graft="adamw"` (Adam\'s per-layer step length)': {"convergence": "hylo-kis-graft-adamw",
                                                       "finetune": "hylo-kis-graft-adamw"},
    '`base="adamw"` (AdamW on the natural gradient): **chosen**': {"convergence": "hylo-kis-adamw", "finetune": "hylo"},
}
DEFAULT_CHOICE_SOURCES = (  # (column, JSON, kind): kind "acc" (higher is better) or "loss" (lower)
    ("MNIST CNN val %", "convergence_mnist_ablation_tuning", "acc"),
    ("MNIST-1D MLP val %", "convergence_mnist1d_ablation", "acc"),
    ("MiniLM val loss", "finetune_minilm", "loss"),
    ("Llama byte-LM val loss", "finetune_llama", "loss"),
)


def _trials(d: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    return d["trials"] if "trials" in d else d["tuning"]["trials"]


def defaults_choice_table() -> str:
    """benchmarks/README: the choice of the shipped defaults. For each candidate step rule, its best
    validation score over its (equal-sized) tuning grid on each task, its rank among the candidates
    there, and its mean and worst rank over the tasks (the defaults: the best mean rank)."""
    scores: dict[str, list[Optional[float]]] = {c: [] for c in DEFAULT_CANDIDATES}
    for _, name, kind in DEFAULT_CHOICE_SOURCES:
        trials = _trials(load(name))
        bench = "finetune" if name.startswith("finetune") else "convergence"
        for cand, rows in DEFAULT_CANDIDATES.items():
            values = [t["val_acc" if kind == "acc" else "val_loss"] for t in trials.get(rows[bench], [])
                      if not t.get("diverged") and t.get("val_acc" if kind == "acc" else "val_loss") is not None]
            scores[cand].append((max(values) if kind == "acc" else min(values)) if values else None)
    ranks: dict[str, list[Optional[int]]] = {c: [] for c in DEFAULT_CANDIDATES}
    for i, (_, _, kind) in enumerate(DEFAULT_CHOICE_SOURCES):
        values = [scores[c][i] for c in DEFAULT_CANDIDATES if scores[c][i] is not None]
        for c in DEFAULT_CANDIDATES:
            v = scores[c][i]
            better = [w for w in values if (w > v if kind == "acc" else w < v)] if v is not None else None
            ranks[c].append(None if better is None else 1 + len(better))  # ties share a rank
    head = ["candidate"] + [col for col, _, _ in DEFAULT_CHOICE_SOURCES] + ["mean rank", "worst rank"]
    lines = _header(head)
    for cand in DEFAULT_CANDIDATES:
        cells = [cand]
        for (_, _, kind), value, rank in zip(DEFAULT_CHOICE_SOURCES, scores[cand], ranks[cand]):
            cells.append(DASH if value is None else f"{value:.1f} ({rank})" if kind == "acc" else f"{value:.3f} ({rank})")
        known = [r for r in ranks[cand] if r is not None]
        cells += [f"{sum(known) / len(known):.2f}" if known else DASH, str(max(known)) if known else DASH]
        lines.append(_row(cells))
    sources = ", ".join(f"`results/{name}.json`" for _, name, _ in DEFAULT_CHOICE_SOURCES)
    lines.append("")
    lines.append(f"Best validation score of each candidate's tuning trials (rank among the candidates in "
                 f"brackets), from {sources}.")
    return "\n".join(lines)


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or not b else a / b


def _goal_cell(value: Optional[float], limit: float, row: str, bound: bool = False) -> list[str]:
    """A measured ratio (or, with ``bound``, an upper bound of it) against the goal's limit."""
    if value is None:
        return [f"– (`{row}`)", "not measurable"]
    return [f"{'< ' if bound else ''}{value:.2f}x (`{row}`)", "met" if value <= limit else "not met"]


def _steps_lower_bound(runs: list[dict[str, Any]], name: str, target: float) -> Optional[float]:
    """Median over seeds of the first evaluated step at or above ``target``, counting a seed that never
    got there as its whole run: a lower bound of the optimizer's median steps to the target."""
    per_seed = []
    for run in (r for r in runs if r["optimizer"] == name):
        hit = next((p["step"] for p in run["curve"] if p["acc"] is not None and p["acc"] >= target), None)
        per_seed.append(hit if hit is not None else run["steps"])
    if not per_seed:
        return None
    per_seed.sort()
    mid = len(per_seed) // 2
    return per_seed[mid] if len(per_seed) % 2 else (per_seed[mid - 1] + per_seed[mid]) / 2


def goals_table() -> str:
    """benchmarks/README: issue 13's goals, measured on the ablation runs (one run per task, every row
    and peer in it). "Shipped defaults" is the row whose options equal today's HyLoConfig defaults
    (``convergence.shipped_defaults_row``); "best HyLo row" the best ratio of any HyLo row."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import convergence  # noqa: E402  (lazy: pulls in torch and ds_hylo)

    head = ["task", "goal", "shipped defaults", "met?", "best HyLo row (not diverged)", "met?"]
    lines = _header(head)
    for task, label in (("mnist", "MNIST CNN"), ("mnist1d", "MNIST-1D MLP")):
        d = load(f"convergence_{task}_ablation")
        summary = d["summary"]
        default = convergence.shipped_defaults_row(d)
        hylo = [n for n in summary if n.startswith("hylo") and not summary[n].get("diverged")]
        targets = [_target(t) for t in d["protocol"]["task"]["targets"]]
        # (goal, limit, row -> (ratio or None, whether the ratio is only an upper bound))
        goals: list[tuple[str, float, Callable[[str], tuple[Optional[float], bool]]]] = []
        first_order_kfac = [p for p in ("sgd", "adamw", "kfac") if p in summary]
        peers = [p for p in HYLO_PEERS if p in summary]

        def exact(value: Optional[float]) -> tuple[Optional[float], bool]:
            return value, False

        def best(names: list[str], key: str) -> Optional[float]:
            values = [summary[n][key] for n in names if summary[n][key] is not None]
            return min(values) if values else None

        def steps_vs_sgd(n: str, t: str) -> tuple[Optional[float], bool]:
            """HyLo's steps / SGD's; where SGD missed the target at a seed, an upper bound (SGD's
            steps there counted as its whole run)."""
            ours, sgd = summary[n][f"steps_to_{t}"], summary["sgd"][f"steps_to_{t}"]
            if ours is not None and sgd is None:
                return _ratio(ours, _steps_lower_bound(d["runs"], "sgd", float(t))), True
            return exact(_ratio(ours, sgd))

        for t in targets:
            if task == "mnist":
                goals.append((f"steps to {t} % <= 0.6x SGD's", 0.6, lambda n, t=t: steps_vs_sgd(n, t)))
                goals.append((f"time to {t} % <= 0.75x the best of SGD, AdamW, K-FAC", 0.75,
                              lambda n, t=t: exact(_ratio(summary[n][f"time_to_{t}"],
                                                          best(first_order_kfac, f"time_to_{t}")))))
            else:
                goals.append((f"time to {t} % <= 1.0x the best peer", 1.0,
                              lambda n, t=t: exact(_ratio(summary[n][f"time_to_{t}"], best(peers, f"time_to_{t}")))))
        sgd_step = summary["sgd"]["median_step_ms"]
        goals.append(("plain step <= 1.10x SGD's", 1.10,
                      lambda n: exact(_ratio(summary[n]["median_step_ms"], sgd_step))))
        goals.append(("refresh step <= 1.5x SGD's", 1.5,
                      lambda n: exact(_ratio(summary[n]["median_refresh_step_ms"], sgd_step))))

        for goal, limit, measure in goals:
            cells = [label, goal]
            if default:
                value, bound = measure(default)
                cells += _goal_cell(value, limit, default, bound)
            else:
                cells += ["no row has the defaults", DASH]
            values = [(v, n, b) for n in hylo for v, b in [measure(n)] if v is not None]
            if values:
                value, name, bound = min(values)
                cells += _goal_cell(value, limit, name, bound)
            else:
                cells += [DASH, "not measurable"]
            lines.append(_row(cells))
    lines.append("")
    lines.append("A ratio is `–` where the HyLo row or the reference did not reach the target at every seed; "
                 "`< r` where only the reference (SGD) missed it at some seed: its steps there are counted as "
                 "the whole run, so r bounds the ratio from above. "
                 "From `results/convergence_mnist_ablation.json` and `results/convergence_mnist1d_ablation.json`.")
    return "\n".join(lines)


# ------------------------------------------------------------------ precondition_cost.py


def _authors_total(totals: dict[str, Any], method: str) -> str:
    failed = totals.get(f"{method}_failed_layers")
    return f"failed on {failed} layers" if failed else _num(totals.get(method), ".0f")


def refresh_resnet50_table() -> str:
    """benchmarks/README: one refresh of all 54 ResNet-50 layers (each shape timed, times its count),
    ds_hylo's KIS / KID against K-FAC, exact SNGD and the authors' code, from
    results/precondition_cost_resnet50.json."""
    d = load("precondition_cost_resnet50")
    head = ["P", "N", "s per layer", "SNGD s", "K-FAC s", "HyLo-KIS ms", "HyLo-KID ms", "authors' KIS ms",
            "authors' KID ms", "K-FAC / KIS", "K-FAC / KID", "KIS / authors' KIS", "KID / authors' KID"]
    lines = _header(head)
    for p, t in d["totals"].items():
        row = next(r for r in d["rows"] if str(r["P"]) == p)
        lines.append(_row([p, str(row["N"]), str(row["s"]), _num(t["sngd"] / 1e3 if "sngd" in t else None, ".2f"),
                           _num(t["kfac"] / 1e3 if "kfac" in t else None, ".2f"), _num(t.get("kis"), ".0f"), _num(t.get("kid"), ".0f"),
                           _authors_total(t, "authors_kis"), _authors_total(t, "authors_kid"),
                           _num(t.get("kfac/kis"), ".0f"), _num(t.get("kfac/kid"), ".0f"),
                           _num(t.get("kis/authors_kis"), ".2f"), _num(t.get("kid/authors_kid"), ".2f")]))
    m, st = d["machine"], d["settings"]
    lines.append("")
    lines.append(f"{int(next(iter(d['totals'].values()))['layers'])} layers, local batch {st['local_batch']}, "
                 f"{st['rows_per_worker']} rows per worker, damping {st['damping']:g}; {m['device']} "
                 f"{m.get('gpu', m['cpu'])}, {m['threads']} thread(s), torch {m['torch']}; "
                 f"{d['total_seconds'] / 60:.1f} min. K-FAC factors wider than {st['large_dim']} are "
                 f"eigendecomposed once (no warm-up).")
    return "\n".join(lines)


def overhead_table(task: str) -> str:
    """benchmarks/README: HyLo's step time as a ratio to SGD's (plain and refresh steps) and its own
    phase timers (ms per refresh for capture..invert, ms per step for apply), from the ablation run."""
    d = load(f"convergence_{task}_ablation")
    summary = d["summary"]
    sgd = summary.get("sgd", {}).get("median_step_ms")
    phases = ("fisher", "capture", "reduce", "communicate", "invert")
    head = ["row", "plain step / SGD", "refresh step / SGD"] + [f"{p} ms/refresh" for p in phases] + ["apply ms/step"]
    lines = _header(head)
    for name, row in summary.items():
        if not name.startswith("hylo"):
            continue
        ph = row.get("hylo_phases", {})
        plain, refresh = row["median_step_ms"], row["median_refresh_step_ms"]
        cells = [f"`{name}`", DASH if plain is None or not sgd else f"{plain / sgd:.2f}",
                 DASH if refresh is None or not sgd else f"{refresh / sgd:.2f}"]
        cells += [_num(ph.get(f"{p}_ms_per_refresh"), ".2f") for p in phases] + [_num(ph.get("apply_ms_per_step"), ".2f")]
        lines.append(_row(cells))
    return "\n".join(lines)


# ------------------------------------------------------------------ finetune.py


def finetune_table(task: str) -> str:
    """Per optimizer: chosen setting, final val/test loss, time and steps to AdamW's final val loss, ratios."""
    d = load(f"finetune_{task}")
    rows = d["summary"]["optimizers"]
    acc = "test acc %" if task == "minilm" else "test next-byte acc %"
    head = ["optimizer", "chosen (lr, damping)", "final val loss", "test loss", acc, "s to AdamW's final val loss",
            "steps to it", "time / AdamW", "steps / AdamW", "step ms", "refresh-step ms"]
    lines = _header(head)
    for name, row in rows.items():
        hp = row["hp"]
        seeds = len(row["seeds"])
        seconds, steps = row["time_to_target"], row["steps_to_target"]
        if name == "adamw":
            time_ratio = step_ratio = "1"
        else:
            time_ratio = _num(d["ratios"].get(f"{name}/adamw time"), ".2f")
            step_ratio = _num(d["ratios"].get(f"{name}/adamw steps"), ".2f")
        diverged = f" ({row['diverged']} diverged)" if row["diverged"] else ""
        edge = d["tuning"]["chosen"].get(name, {}).get("at_grid_edge") or []
        lines.append(_row([
            f"`{name}`", ", ".join(format(hp[k], "g") for k in ("lr", "damping") if k in hp)
            + (f" (grid edge: {', '.join(edge)})" if edge else ""),
            _num(row["final_val_loss"], ".4f") + diverged, _num(row["test_loss"], ".4f"), _num(row["test_acc"], ".1f"),
            f"{DASH} ({row['reached']}/{seeds})" if seconds is None else f"{seconds:.1f}",
            _num(steps, ".0f"), time_ratio, step_ratio,
            _num(row["median_step_ms"], ".0f"), _num(row["median_refresh_step_ms"], ".0f"),
        ]))
    skipped = d["protocol"].get("skipped") or {}
    for name, why in skipped.items():
        lines.append(_row([f"`{name}`", f"skipped: {why}"] + [DASH] * (len(head) - 2)))
    return "\n".join(lines)


def finetune_run() -> str:
    """Machine, duration, targets and the goal line of the committed finetune run."""
    tasks = {t: load(f"finetune_{t}") for t in ("minilm", "llama")}
    first = tasks["minilm"]
    m = first["machine"]
    total = sum(d["total_seconds"] for d in tasks.values())
    parts = []
    for t, d in tasks.items():
        g, s = d["goal"], d["summary"]
        ratio = _num(g["time_ratio"], ".2f")
        parts.append(f"{t}: target (AdamW's final val loss, median over seeds) {_num(s['target_median'], '.4f')}, "
                     f"`hylo` time ratio {ratio}, goal {'met' if g['met'] else 'not met'}, "
                     f"{d['total_seconds']:.0f} s, load {'/'.join(f'{v:.2f}' for v in d['load_average_1_5_15']['start'])}"
                     f" at start")
    return (f"Date (UTC): {first['date_utc'][:10]}. Machine: {m['cpu_count']}-core {m.get('cpu_model', '?')}, "
            f"Python {m['python']}, torch {m['torch']} with {m['torch_threads']} thread(s), transformers "
            f"{m['transformers']}, asdfghjkl {m['asdfghjkl']}, pytorch_optimizer {m['pytorch_optimizer']}, "
            f"ds_hylo {m['ds_hylo']} at {(m['git'] or '?')[:7]}. Command: `{first['command']}`, "
            f"{total / 60:.1f} minutes in all. " + "; ".join(parts) + ".")


# ------------------------------------------------------------------ scale.py


# Issue 19/20: the shipped defaults' rows rerun with today's code (row cap 512, float32 apply) on the
# committed seeds and tuned settings: (label, committed JSON, rerun JSON, row name, benchmark kind).
DEFAULTS_RERUNS = (
    ("MNIST CNN", "convergence_mnist_ablation", "defaults_rerun_mnist", "hylo-kis-adamw", "convergence"),
    ("MNIST-1D MLP", "convergence_mnist1d_ablation", "defaults_rerun_mnist1d", "hylo-kis-adamw", "convergence"),
    ("MiniLM fine-tune", "finetune_minilm", "defaults_rerun_minilm", "hylo", "finetune"),
    ("byte-level Llama LM", "finetune_llama", "defaults_rerun_llama", "hylo", "finetune"),
)


def _rerun_cells(d: dict[str, Any], name: str, kind: str) -> str:
    if kind == "convergence":
        row = d["summary"][name]
        seeds = len(row["seeds"])
        cells = []
        for t in d["protocol"]["task"]["targets"]:
            key = _target(t)
            steps, k = row[f"steps_to_{key}"], row[f"reached_{key}"]
            cells.append(f"{key}%: {DASH if steps is None else format(steps, '.0f')} ({k}/{seeds})")
        return f"{'; '.join(cells)}; final {row['final_acc']:.2f} %"
    row = d["summary"]["optimizers"][name]
    steps = row["steps_to_target"]
    return (f"AdamW's final val loss: {DASH if steps is None else format(steps, '.0f')} steps "
            f"({row['reached']}/{len(row['seeds'])}); final val loss {row['final_val_loss']:.3f}, "
            f"test {row['test_acc']:.2f} %")


def defaults_rerun_table() -> str:
    """The shipped defaults' row, committed against rerun with today's code (same seeds and settings)."""
    lines = _header(["task", "row", "committed run (median of its seeds)", "rerun with today's code",
                     "lr (committed / rerun)"])
    for label, before, after, name, kind in DEFAULTS_RERUNS:
        b, a = load(before), load(after)
        hp = lambda d: (d["summary"][name] if kind == "convergence" else d["summary"]["optimizers"][name])["hp"]["lr"]
        lines.append(_row([label, f"`{name}`", _rerun_cells(b, name, kind), _rerun_cells(a, name, kind),
                           f"{hp(b):g} / {hp(a):g}"]))
    return "\n".join(lines)


def scale_ownership_table() -> str:
    """benchmarks/README: issue 19's "owned factors" question decided by counting bytes, from results/scale.json."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import scale  # noqa: E402  (lazy: pulls in torch and ds_hylo)

    d = load("scale")
    return "\n".join(_header(scale.OWNERSHIP_HEAD) + [_row(r) for r in scale.ownership_table(d)])


def scale_table() -> str:
    """benchmarks/README: one Llama-2 layer at a time (measured, CPU) and whole models (analytic), from
    results/scale.json (the row builders live in benchmarks/scale.py, shared with its printout)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import scale  # noqa: E402  (lazy: pulls in torch and ds_hylo)

    d = load("scale")
    st, m = d["settings"], d["machine"]
    lines = _header(scale.LAYER_HEAD) + [_row(r) for r in scale.layer_table(d)]
    lines.append("")
    lines.append(f"T = {st['tokens']} tokens per rank; forward + backward and the capture timed at "
                 f"{st['time_tokens']} tokens and scaled x{st['tokens'] / st['time_tokens']:g}; AdamW's update, HyLo's "
                 f"apply and the refresh's gather and invert timed at full size. {m['cpu']}, {m['threads']} thread(s), "
                 f"torch {m['torch']}, {d['date_utc'][:10]}, `{d['command']}`, {d['seconds'] / 60:.1f} min, ds_hylo at "
                 f"{(d['git'] or '?')[:7]}.")
    lines.append("")
    lines += _header(scale.model_head(list(st["configs"]))) + [_row(r) for r in scale.model_table(d)]
    lines.append("")
    lines.append(f"T = {st['model_tokens']} tokens per rank per step (sequence {st['seq']}); GiB per rank: base state "
                 "unsharded (DDP) + HyLo's factors (its refresh-step peak in parentheses); MB a rank receives per "
                 "refresh (bandwidth-optimal collectives); matmul FLOPs per step as % of forward + backward "
                 f"(6 T params), refreshes amortised over {st['update_freq']} steps. Muon and K-FAC are estimates "
                 "(see benchmarks/scale.py).")
    return "\n".join(lines)


def zero_memory_table() -> str:
    """benchmarks/README: peak RSS per rank under ZeRO 1/2/3, HyLo against AdamW (results/zero_memory.json)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import zero_memory  # noqa: E402  (lazy)

    d = load("zero_memory")
    p, m = d["protocol"], d["machine"]
    return "\n".join([
        zero_memory.format_table(d["summary"]),
        "",
        f"{p['model']}, {p['tokens_per_rank_per_step']} tokens per rank per step, {p['steps']} steps (HyLo refreshes "
        f"at steps 0 and 2); {p['measure']}. {m['cpu']}, {m['cores']} cores, {d['seconds'] / 60:.1f} min, ds_hylo at "
        f"{(d['git_revision'] or '?')[:7]}. `python benchmarks/zero_memory.py`.",
    ])


def scale_coverage_table() -> str:
    """benchmarks/README: share of Llama's parameters HyLo preconditions, before and after the Embedding
    kernel (issue 19 item 4), from results/scale.json's "coverage" (benchmarks/scale.py part 3)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import scale  # noqa: E402  (lazy: pulls in torch and ds_hylo)

    d = load("scale")
    c = d["coverage"]
    lines = _header(scale.COVERAGE_HEAD) + [_row(r) for r in scale.coverage_table(d)]
    lines.append("")
    lines.append(f"transformers `LlamaForCausalLM` from its config on the meta device; {c['date_utc'][:10]}, "
                 f"`{c['command']}`, ds_hylo at {(c['git'] or '?')[:7]}.")
    return "\n".join(lines)


def batch_scaling_table(name: str = "batch_scaling_mnist_mlp") -> str:
    """benchmarks/README: steps and time to target against batch size (issue 23), the critical batch
    sizes and the issue's goals, from results/<name>.json (the row builders live in
    benchmarks/batch_scaling.py, shared with its printout)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import batch_scaling  # noqa: E402  (lazy: pulls in torch and ds_hylo)

    d = load(name)
    parts = [batch_scaling.markdown(batch_scaling.main_table(d)), batch_scaling.markdown(batch_scaling.critical_table(d)),
             batch_scaling.markdown(batch_scaling.goals_table(d)), batch_scaling.run_line(d)]
    return "\n\n".join(parts)


# (label, results/<name>.json, optimizer key in it) of the probe table
BATCH_PROBES = (
    ("AdamW", "batch_scaling_mnist_mlp", "adamw"),
    ("SOAP", "batch_scaling_mnist_mlp", "soap"),
    ("Muon", "batch_scaling_mnist_mlp", "muon"),
    ("HyLo's defaults (damping 0.1, empirical Fisher, AdamW base)", "batch_scaling_mnist_mlp", "hylo-default"),
    ("HyLo, damping 0.01", "batch_scaling_mnist_mlp_damping0.01", "hylo-default"),
    ("HyLo, damping 1", "batch_scaling_mnist_mlp_damping1.0", "hylo-default"),
    ("HyLo, sampled Fisher (`hylo-kis-mc-adamw`)", "batch_scaling_mnist_mlp_probe_mc_adamw", "hylo-kis-mc-adamw"),
    ("HyLo on momentum SGD, the paper's step (`hylo-kis`)", "batch_scaling_mnist_mlp_probe_kis_sgd", "hylo-kis"),
)


def batch_scaling_probes_table() -> str:
    """benchmarks/README: HyLo's mechanism probes at batch 2048 and 8192 (issue 23 item 4): damping,
    the sampled Fisher and the SGD base, each with its lr re-tuned, beside the main run's peers."""
    lines = _header(["optimizer", "steps to 97 % at 2048 (lr)", "steps to 97 % at 8192 (lr)"])
    commands = []
    for label, name, key in BATCH_PROBES:
        d = load(name)
        cells = []
        for batch in ("2048", "8192"):
            r = d["batches"][batch]["rows"][key]
            cells.append(f"{r['median_steps_97']:.0f} [{r['min_steps_97']}-{r['max_steps_97']}] ({r['lr']:g})")
        lines.append(_row([label] + cells))
        if name != "batch_scaling_mnist_mlp":
            commands.append(f"`{d['command']}`")
    lines.append("")
    lines.append("Median [min-max] over seeds 0-4 (all reached 97 %); every lr tuned on the validation split as in the "
                 "main run, with interior picks. Probe commands: " + "; ".join(commands) + ".")
    return "\n".join(lines)


RENDERERS: dict[str, Callable[[], str]] = {
    "batch_scaling_mnist_mlp": batch_scaling_table,
    "ablation_tuning_mnist": lambda: ablation_tuning_table("mnist"),
    "defaults_choice": defaults_choice_table,
    "refresh_resnet50": refresh_resnet50_table,
    "goals": goals_table,
    "overhead_mnist": lambda: overhead_table("mnist"),
    "overhead_mnist1d": lambda: overhead_table("mnist1d"),
    "ablation_mnist": lambda: ablation_table("mnist"),
    "ablation_mnist1d": lambda: ablation_table("mnist1d"),
    "long_sequence": long_sequence_table,
    "rotation": rotation_table,
    "rotation_steps": rotation_steps_table,
    "convergence_run": convergence_run,
    "convergence_mnist": lambda: convergence_table("mnist"),
    "convergence_mnist_ratios": lambda: convergence_ratios("mnist"),
    "convergence_mnist1d": lambda: convergence_table("mnist1d"),
    "convergence_mnist1d_ratios": lambda: convergence_ratios("mnist1d"),
    "delayed_refresh_mnist1d": lambda: convergence_table("mnist1d", "delayed_refresh_mnist1d"),
    "peers_muon_mnist1d": lambda: convergence_table("mnist1d", "peers_muon_mnist1d"),
    "fisher": fisher_table,
    "finetune_run": finetune_run,
    "finetune_minilm": lambda: finetune_table("minilm"),
    "finetune_llama": lambda: finetune_table("llama"),
    "scale": scale_table,
    "scale_ownership": scale_ownership_table,
    "scale_coverage": scale_coverage_table,
    "defaults_rerun": defaults_rerun_table,
    "zero_memory": zero_memory_table,
    "batch_scaling_probes": batch_scaling_probes_table,
}


# ------------------------------------------------------------------ driver


def render_text(text: str, source: str = "README") -> str:
    """Replace the body of every marked block in ``text`` by its rendering."""

    def replace(match: re.Match) -> str:
        name = match.group("name")
        if name not in RENDERERS:
            raise KeyError(f"{source}: unknown table {name!r}; known: {', '.join(sorted(RENDERERS))}")
        return match.group(1) + RENDERERS[name]().rstrip("\n") + "\n" + match.group(4)

    return MARKER.sub(replace, text)


def marked_tables(text: str) -> list[str]:
    return [m.group("name") for m in MARKER.finditer(text)]


def redraw_plots() -> list[str]:
    """Redraw the convergence, hybrid and finetune PNGs from their committed JSON (no training)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import convergence  # noqa: E402
    import hybrid  # noqa: E402

    written = []
    for task in ("mnist", "mnist1d"):
        d = load(f"convergence_{task}")
        path = RESULTS / f"convergence_{task}.png"
        convergence.plot_curves(d["runs"], d["protocol"]["task"]["targets"], path, convergence.plot_title(d))
        written.append(str(path))
    d = load("hybrid")
    hybrid.plot(d["results"], RESULTS / "hybrid.png", hybrid.plot_title(d["args"], d["steps_per_epoch"]))
    written.append(str(RESULTS / "hybrid.png"))
    import finetune  # noqa: E402

    for task in ("minilm", "llama"):
        d = load(f"finetune_{task}")
        path = RESULTS / f"finetune_{task}.png"
        finetune.plot_curves(d["runs"], d["summary"]["target_median"], path, finetune.plot_title(d))
        written.append(str(path))
    return written


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="do not write; exit 1 if a README differs from its rendering")
    p.add_argument("--plots", action="store_true", help="also redraw the convergence, hybrid and finetune PNGs from the JSON")
    args = p.parse_args(argv)
    stale = []
    for path in READMES:
        text = path.read_text()
        rendered = render_text(text, str(path.relative_to(REPO)))
        if rendered == text:
            continue
        stale.append(path)
        if args.check:
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), rendered.splitlines(True),
                                                       str(path.relative_to(REPO)), "rendered"))
        else:
            path.write_text(rendered)
            print(f"rendered {path.relative_to(REPO)}")
    if args.plots and not args.check:
        for written in redraw_plots():
            print(f"drew {Path(written).relative_to(REPO)}")
    if args.check and stale:
        print(f"\nstale: {', '.join(str(p.relative_to(REPO)) for p in stale)}; run python benchmarks/render_readme.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
