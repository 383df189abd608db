"""Hybrid KID/KIS switching vs KID-only vs KIS-only on MNIST (MnistCNN, CPU).

Same seed, same initial weights, same batch order and the same learning-rate schedule (a 10x drop
at ``--lr-drop-epoch``) for every variant; a fixed budget of ``--epochs`` epochs over a
``--subset`` of the training set. The variants run interleaved, one evaluation segment at a time,
so that a change in machine load hits all of them alike. Reports, per variant: training time per
epoch (evaluation excluded), refresh cost (capture + reduce + communicate + invert seconds per
refresh, from ``opt.timing_summary()``) and apply cost per step, the fraction of layer refreshes
done with KID, and test accuracy after the budget, with ratios against KID-only. Writes
``benchmarks/results/hybrid.json`` and a plot of test accuracy against training wall time,
``benchmarks/results/hybrid.png``.

    python benchmarks/hybrid.py                      # defaults: 2 epochs on 20k images, 1 thread
    python benchmarks/hybrid.py --epochs 1 --subset 5000 --no-plot
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "benchmarks"))

from data import TensorBatches, load_mnist  # noqa: E402
from models import MnistCNN  # noqa: E402
from _env import cpu_model, git_revision, load_average  # noqa: E402

from ds_hylo import HyLo  # noqa: E402

VARIANTS = ("kid", "kis", "hybrid")
REFRESH_PHASES = ("capture", "reduce", "communicate", "invert")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "mnist"), help="MNIST idx files")
    p.add_argument("--subset", type=int, default=20000, help="training images used (the first N)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--lr-drop-epoch", type=float, default=1.5, help="divide the lr by 10 here (<= 0: never)")
    p.add_argument("--damping", type=float, default=0.03)
    p.add_argument("--rank-ratio", type=float, default=0.1)
    p.add_argument("--update-freq", type=int, default=10)
    p.add_argument("--switch-window", type=int, default=25, help="hybrid: steps per window")
    p.add_argument("--switch-threshold", type=float, default=0.5)
    p.add_argument("--switch-scope", default="layer", choices=("layer", "global"))
    p.add_argument("--evals-per-epoch", type=int, default=4)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; on a shared 2-core machine 2 threads ran 10-30x slower than 1 "
                        "(OpenMP threads waiting on a busy core), so the default is 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--out-json", default=str(REPO / "benchmarks" / "results" / "hybrid.json"))
    p.add_argument("--out-png", default=str(REPO / "benchmarks" / "results" / "hybrid.png"))
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def machine_info(threads: int) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "cuda": False,
    }
    if cpu_model():
        info["cpu_model"] = cpu_model()
    return info


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, x.shape[0], batch))
    model.train()
    return correct / x.shape[0]


class Run:
    """One variant: model, optimizer, its own batch stream, clocks and counters."""

    def __init__(self, variant: str, args: argparse.Namespace, train_x: torch.Tensor, train_y: torch.Tensor,
                 steps_per_epoch: int) -> None:
        self.variant = variant
        torch.manual_seed(args.seed)  # the same initial weights for every variant
        self.model = MnistCNN()
        options = dict(lr=args.lr, base="sgd", momentum=args.momentum, damping=args.damping, rank_ratio=args.rank_ratio,
                       update_freq=args.update_freq, seed=args.seed, mode=variant)
        if variant == "hybrid":
            options.update(switch_window=args.switch_window, switch_threshold=args.switch_threshold,
                           switch_scope=args.switch_scope)
        self.opt = HyLo(self.model, **options)
        drop_step = round(args.lr_drop_epoch * steps_per_epoch) if args.lr_drop_epoch > 0 else None
        self.drop_step = drop_step
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.opt, milestones=[drop_step] if drop_step else [], gamma=0.1)
        self.batches = TensorBatches(train_x, train_y, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                     seed=args.seed)  # the same batch order for every variant
        self.steps_per_epoch = steps_per_epoch
        self._iter = iter(self.batches)
        self.step = 0
        self.train_seconds = 0.0
        self.epoch_seconds: list[float] = []
        self.curve: list[dict[str, float]] = []  # test accuracy vs training wall time
        self.refresh_modes = {"kid": 0, "kis": 0, "sngd": 0}
        self.refresh_log: list[tuple[int, dict[str, str]]] = []
        self.losses: list[float] = []

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return next(self._iter)
        except StopIteration:
            self._iter = iter(self.batches)
            return next(self._iter)

    def train(self, steps: int) -> None:
        model, opt = self.model, self.opt
        policy = opt.preconditioner.policy
        start = time.perf_counter()
        for _ in range(steps):
            x, y = self._next_batch()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            # The hybrid policy's learning-rate rule needs the step's lr; idempotent if the
            # preconditioner already passes it.
            policy.observe_lr(opt.param_groups[0]["lr"])
            refreshes = opt.preconditioner.refreshes
            opt.step()
            self.scheduler.step()
            if opt.preconditioner.refreshes != refreshes:
                modes = opt.layer_modes()
                for mode in modes.values():
                    self.refresh_modes[mode] += 1
                self.refresh_log.append((self.step, modes))
            self.losses.append(float(loss.detach()))
            self.step += 1
            if self.step % self.steps_per_epoch == 0:
                now = time.perf_counter()
                self.train_seconds += now - start
                start = now
                self.epoch_seconds.append(self.train_seconds - sum(self.epoch_seconds))
        self.train_seconds += time.perf_counter() - start

    def evaluate(self, test_x: torch.Tensor, test_y: torch.Tensor) -> float:
        acc = accuracy(self.model, test_x, test_y)
        self.curve.append({"step": self.step, "epoch": self.step / self.steps_per_epoch,
                           "train_seconds": self.train_seconds, "test_accuracy": acc})
        return acc

    def summary(self) -> dict[str, Any]:
        timing = self.opt.timing_summary()
        refreshes = self.opt.preconditioner.refreshes
        refresh_seconds = sum(timing.get(phase, {}).get("seconds", 0.0) for phase in REFRESH_PHASES)
        total_layer_refreshes = sum(self.refresh_modes.values())
        out = {
            "variant": self.variant,
            "steps": self.step,
            "epoch_seconds": self.epoch_seconds,
            "seconds_per_epoch": sum(self.epoch_seconds) / max(1, len(self.epoch_seconds)),
            "train_seconds": self.train_seconds,
            "refreshes": refreshes,
            "refresh_ms": 1e3 * refresh_seconds / max(1, refreshes),
            "refresh_phase_ms": {phase: 1e3 * timing.get(phase, {}).get("seconds", 0.0) / max(1, refreshes)
                                 for phase in REFRESH_PHASES},
            "apply_ms_per_step": 1e3 * timing.get("apply", {}).get("seconds", 0.0) / max(1, self.step),
            "kid_refresh_fraction": self.refresh_modes["kid"] / max(1, total_layer_refreshes),
            "layer_refreshes": dict(self.refresh_modes),
            "final_test_accuracy": self.curve[-1]["test_accuracy"] if self.curve else None,
            "final_train_loss_last_50": sum(self.losses[-50:]) / max(1, len(self.losses[-50:])),
            "curve": self.curve,
            "nonfinite_events": self.opt.preconditioner.nonfinite_events,
        }
        policy = self.opt.preconditioner.policy
        if self.variant == "hybrid":
            out["switch_log"] = policy.switch_log()
            out["lr_changes"] = getattr(policy, "lr_changes", [])
            out["decisions"] = getattr(policy, "decisions", [])
            out["refresh_modes_by_step"] = [[step, modes] for step, modes in self.refresh_log]
        return out


def print_table(results: dict[str, dict[str, Any]]) -> str:
    base = results.get("kid")
    header = (f"{'variant':<8} {'s/epoch':>8} {'x KID':>6} {'refresh ms':>10} {'x KID':>6} {'(reduce)':>8} "
              f"{'apply ms':>8} {'KID frac':>8} {'test acc':>8} {'- KID':>7}")
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        def ratio(key: str) -> str:
            return f"{r[key] / base[key]:6.2f}" if base and base[key] else f"{'-':>6}"
        acc_delta = f"{100 * (r['final_test_accuracy'] - base['final_test_accuracy']):+6.2f}%" if base else f"{'-':>7}"
        lines.append(f"{name:<8} {r['seconds_per_epoch']:8.2f} {ratio('seconds_per_epoch')} {r['refresh_ms']:10.2f} "
                     f"{ratio('refresh_ms')} {r['refresh_phase_ms']['reduce']:8.2f} "
                     f"{r['apply_ms_per_step']:8.2f} {r['kid_refresh_fraction']:8.2f} "
                     f"{100 * r['final_test_accuracy']:7.2f}% {acc_delta}")
    lines.append("s/epoch: training only; refresh ms: capture+reduce+communicate+invert per refresh, (reduce) "
                 "its KIS/KID selection part; apply ms: per step; KID frac: share of layer refreshes done with KID")
    table = "\n".join(lines)
    print(table)
    return table


def plot_title(args: dict[str, Any], steps_per_epoch: int) -> str:
    """Title of hybrid.png from the run's arguments (``vars(args)`` or the JSON's ``args``)."""
    images = min(args["subset"], 60000) if args.get("subset") else steps_per_epoch * args["batch_size"]
    return (f"MNIST MnistCNN, {images} images x {args['epochs']} epochs, batch "
            f"{args['batch_size']}, lr {args['lr']} (/10 at epoch {args['lr_drop_epoch']})\nrank_ratio "
            f"{args['rank_ratio']}, update_freq {args['update_freq']}, hybrid window {args['switch_window']} steps, "
            f"threshold {args['switch_threshold']}, {args['threads']} CPU thread(s)\n"
            f"hybrid starts in KID: the line styles tell the two apart where they coincide")


def plot(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    # KID-only and hybrid coincide until hybrid's first switch (it starts in KID): distinct line
    # styles and markers (KID hollow and larger) keep both visible where they overlap.
    styles = {"kid": ("-", "o", 9), "kis": ("--", "s", 7), "hybrid": (":", "^", 6)}
    for i, (name, r) in enumerate(results.items()):
        linestyle, marker, size = styles.get(name, ("-.", "D", 6))
        xs = [p["train_seconds"] for p in r["curve"]]
        ys = [100 * p["test_accuracy"] for p in r["curve"]]
        ax.plot(xs, ys, linestyle=linestyle, marker=marker, markersize=size, linewidth=1.8,
                markerfacecolor="none" if name == "kid" else None, color=f"C{i}",
                label=f"{name} ({100 * r['final_test_accuracy']:.2f}%, {r['seconds_per_epoch']:.1f} s/epoch)")
    accs = [100 * p["test_accuracy"] for r in results.values() for p in r["curve"][1:]]
    if accs:
        ax.set_ylim(max(0.0, min(accs) - 1.0), min(100.0, max(accs) + 0.5))
    hybrid = results.get("hybrid")
    if hybrid:
        for change in hybrid.get("lr_changes", []):
            point = min(hybrid["curve"], key=lambda p: abs(p["step"] - change["step"]))
            ax.axvline(point["train_seconds"], color="gray", ls=":", lw=1)
            ax.annotate(f"lr {change['previous_lr']:.3g} -> {change['lr']:.3g} at step {change['step']}: hybrid -> KID ",
                        (point["train_seconds"], ax.get_ylim()[1] - 0.6), fontsize=7, color="gray", ha="right")
    ax.set_xlabel("training wall time (s, evaluation excluded)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = load_average()
    train_x, train_y, test_x, test_y = load_mnist(args.data_dir)
    train_x, train_y = train_x[: args.subset], train_y[: args.subset]
    steps_per_epoch = train_x.shape[0] // args.batch_size
    total_steps = args.epochs * steps_per_epoch
    segment = max(1, steps_per_epoch // args.evals_per_epoch)
    print(f"MNIST {train_x.shape[0]} train / {test_x.shape[0]} test images, MnistCNN, batch {args.batch_size}, "
          f"{steps_per_epoch} steps/epoch x {args.epochs} epochs, {args.threads} threads, torch {torch.__version__}")

    runs = {v: Run(v, args, train_x, train_y, steps_per_epoch) for v in args.variants}
    for run in runs.values():
        run.evaluate(test_x, test_y)
    done = 0
    while done < total_steps:
        steps = min(segment, total_steps - done)
        for run in runs.values():  # interleaved: every variant sees the same machine load
            run.train(steps)
            run.evaluate(test_x, test_y)
        done += steps
        print(f"  step {done}/{total_steps}: " + ", ".join(
            f"{name} {100 * run.curve[-1]['test_accuracy']:.2f}% ({run.train_seconds:.0f} s)"
            for name, run in runs.items()), flush=True)

    results = {name: run.summary() for name, run in runs.items()}
    print()
    table = print_table(results)
    print(f"load average before/after: {load_before} / {load_average()} on {os.cpu_count()} CPUs")
    hybrid = results.get("hybrid")
    if hybrid:
        print("\nhybrid switches:", ", ".join(f"{e['step']}:{e['layer']}->{e['mode']}({e['reason']})"
                                                for e in hybrid["switch_log"]))

    finished = datetime.datetime.now(datetime.timezone.utc)
    report = {
        "benchmark": "hybrid KID/KIS switching vs KID-only vs KIS-only, MNIST MnistCNN",
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO), *sys.argv[1:]]),
        "date": started.isoformat(timespec="seconds"),
        "wall_seconds": (finished - started).total_seconds(),
        "git": git_revision(),
        "machine": {**machine_info(args.threads), "load_average_before": load_before,
                    "load_average_after": load_average()},
        "args": vars(args),
        "steps_per_epoch": steps_per_epoch,
        "lr_drop_step": next(iter(runs.values())).drop_step,
        "table": table,
        "ratios_vs_kid": {
            name: {
                "seconds_per_epoch": r["seconds_per_epoch"] / results["kid"]["seconds_per_epoch"],
                "refresh_ms": r["refresh_ms"] / results["kid"]["refresh_ms"],
                "test_accuracy_minus_kid": r["final_test_accuracy"] - results["kid"]["final_test_accuracy"],
            }
            for name, r in results.items()
        } if "kid" in results else None,
        "results": results,
        "notes": "Times are CPU wall-clock on a shared machine (see load averages); the variants run "
                 "interleaved per evaluation segment so load changes affect them alike. refresh_ms = "
                 "(capture + reduce + communicate + invert) seconds / refreshes; apply runs every step.",
    }
    out_json = Path(args.out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"\nwrote {out_json}")
    if not args.no_plot:
        title = plot_title(vars(args), steps_per_epoch)
        plot(results, Path(args.out_png), title)
        print(f"wrote {args.out_png}")
    return report


if __name__ == "__main__":
    main()
