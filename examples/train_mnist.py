#!/usr/bin/env python
"""Train a small network on MNIST (or MNIST-1D) with HyLo and first-order baselines.

Every optimizer starts from the same initial weights and sees the same batch order, so the
runs differ only in the optimizer. After each epoch the test accuracy is measured; at the end a
table compares final accuracy, wall time and time per step, and for HyLo the time spent in
each preconditioner phase (capture, reduce, communicate, invert, apply).

Examples (from the repository root)::

    python examples/train_mnist.py                                   # MNIST-1D, generated locally
    python examples/train_mnist.py --data-dir ../shared/data/mnist --epochs 1
    python examples/train_mnist.py --data-dir ../shared/data/mnist \\
        --optimizers hylo-kis,hylo-kid,sgd,adamw --lr 0.05,adamw=1e-3 --json-out run.json

``--lr`` takes one value for every optimizer, ``name=value`` pairs, or both
(``0.05,adamw=0.001``: 0.05 for all but AdamW). ``run(args)`` holds the whole job and returns
a dict, so tests and notebooks can call it directly.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

_HERE = Path(__file__).resolve().parent
for _path in (str(_HERE), str(_HERE.parent)):  # examples/ (data, models) and the repo root (ds_hylo)
    if _path not in sys.path:
        sys.path.insert(0, _path)

from data import TensorBatches, load_mnist, load_mnist1d  # noqa: E402
from models import MODEL_NAMES, build_model  # noqa: E402

from ds_hylo import HyLo  # noqa: E402

OPTIMIZERS = ("hylo-kis", "hylo-kid", "hylo-sngd", "hylo-hybrid", "sgd", "adamw")
HYLO_MODES = {"hylo-kis": "kis", "hylo-kid": "kid", "hylo-sngd": "sngd", "hylo-hybrid": "hybrid"}
# HyLo's default step_scale="sgd" keeps its update on SGD's scale, so it shares SGD's learning rate.
DEFAULT_LR = {"hylo-kis": 0.05, "hylo-kid": 0.05, "hylo-sngd": 0.05, "hylo-hybrid": 0.05, "sgd": 0.05, "adamw": 1e-3}
DEFAULT_EPOCHS = {"mnist": 2, "mnist1d": 20}
PHASES = ("capture", "reduce", "communicate", "invert", "apply")


# ----------------------------------------------------------------------------- CLI


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except None / False (those options explain their default in words)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Compare HyLo (KIS/KID/SNGD/hybrid) with SGD and AdamW on MNIST or MNIST-1D.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--data-dir", default=None,
                   help="folder with the MNIST idx files (plain or .gz); if omitted, MNIST-1D is generated locally")
    p.add_argument("--model", default=None, choices=MODEL_NAMES[:2],
                   help="network (default: mnist_cnn for MNIST, mlp for MNIST-1D)")
    p.add_argument("--optimizers", default="hylo-kis,sgd",
                   help=f"comma-separated list from {', '.join(OPTIMIZERS)}")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"epochs per optimizer (default: {DEFAULT_EPOCHS['mnist']} for MNIST, "
                        f"{DEFAULT_EPOCHS['mnist1d']} for MNIST-1D)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size")
    p.add_argument("--lr", default=None,
                   help="learning rate: one value for all, name=value pairs, or both (e.g. '0.05,adamw=1e-3'); "
                        f"defaults: {DEFAULT_LR}")
    p.add_argument("--momentum", type=float, default=0.9, help="momentum of SGD and HyLo")
    p.add_argument("--weight-decay", type=float, default=0.0, help="weight decay of every optimizer")
    p.add_argument("--damping", type=float, default=0.3,
                   help="HyLo damping lambda (0.3: at the package default 0.03, HyLo-KIS collapsed in 1 of 3 short "
                        "MNIST CNN runs at lr 0.05)")
    p.add_argument("--rank-ratio", type=float, default=0.1, help="HyLo: fraction of samples kept per layer")
    p.add_argument("--update-freq", type=int, default=10, help="HyLo: steps between curvature refreshes")
    p.add_argument("--step-scale", default="sgd", choices=("sgd", "natural"), help="HyLo step scale")
    p.add_argument("--kl-clip", type=float, default=None, help="HyLo KL-clip (default: off)")
    p.add_argument("--fisher", default="empirical", choices=("empirical", "sampled"),
                   help="HyLo kernel rows: true labels (empirical) or labels sampled from the model (MC Fisher)")
    p.add_argument("--train-subset", type=int, default=None, help="use only the first N training samples")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on the first N test samples")
    p.add_argument("--max-steps", type=int, default=None, help="stop each optimizer after this many steps")
    p.add_argument("--mnist1d-samples", type=int, default=10000,
                   help="MNIST-1D samples to generate (80%% train, 20%% test)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, batch order and KIS sampling")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: these models are small, and extra threads on a machine "
                        "shared with other jobs slow training by 10x or more; 0 = torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json-out", default=None, help="write the results as JSON to this file")
    p.add_argument("--no-progress", action="store_true", help="hide the per-epoch progress bars")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def parse_optimizers(spec: str) -> list[str]:
    names = [s.strip().lower() for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError("--optimizers is empty")
    bad = [n for n in names if n not in OPTIMIZERS]
    if bad:
        raise ValueError(f"unknown optimizer(s) {bad}; allowed: {', '.join(OPTIMIZERS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--optimizers lists a name twice: {names}")
    return names


def parse_lr(spec: Optional[str], names: Sequence[str]) -> dict[str, float]:
    """'0.05' / 'sgd=0.1,hylo-kis=0.05' / '0.05,adamw=1e-3' -> {optimizer: lr}."""
    lrs = {n: DEFAULT_LR[n] for n in names}
    if spec is None:
        return lrs
    overrides: dict[str, float] = {}
    for item in (s.strip() for s in str(spec).split(",")):
        if not item:
            continue
        if "=" in item:
            key, value = (x.strip() for x in item.split("=", 1))
            if key.lower() not in OPTIMIZERS:
                raise ValueError(f"--lr names unknown optimizer {key!r}; allowed: {', '.join(OPTIMIZERS)}")
            overrides[key.lower()] = float(value)
        else:
            lrs = {n: float(item) for n in names}  # one value for every optimizer
    lrs.update({k: v for k, v in overrides.items() if k in lrs})
    for n, v in lrs.items():
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"learning rate of {n} must be > 0, got {v}")
    return lrs


# ---------------------------------------------------------------------------- pieces


def load_data(args: argparse.Namespace):
    """-> (dataset name, train_x, train_y, test_x, test_y) after the subsets."""
    if args.data_dir:
        name = "mnist"
        train_x, train_y, test_x, test_y = load_mnist(args.data_dir)
    else:
        name = "mnist1d"
        train_x, train_y, test_x, test_y = load_mnist1d(seed=args.seed, num_samples=args.mnist1d_samples)
    if args.train_subset is not None:
        train_x, train_y = train_x[: args.train_subset], train_y[: args.train_subset]
    if args.test_subset is not None:
        test_x, test_y = test_x[: args.test_subset], test_y[: args.test_subset]
    return name, train_x, train_y, test_x, test_y


def make_model(model_name: str, sample: torch.Tensor) -> nn.Module:
    if model_name == "mlp":
        return build_model("mlp", in_features=int(sample[0].numel()))
    return build_model(model_name)


def make_optimizer(name: str, model: nn.Module, lr: float, args: argparse.Namespace) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    return HyLo(
        model,
        lr=lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        damping=args.damping,
        mode=HYLO_MODES[name],
        rank_ratio=args.rank_ratio,
        update_freq=args.update_freq,
        step_scale=args.step_scale,
        kl_clip=args.kl_clip,
        fisher=args.fisher,
        seed=args.seed,
    )


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """-> (accuracy, mean cross-entropy) over (x, y)."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, x.shape[0], batch_size):
        logits = model(x[start: start + batch_size])
        target = y[start: start + batch_size]
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    model.train(was_training)
    n = max(1, x.shape[0])
    return correct / n, loss_sum / n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one(
    name: str,
    init_state: dict[str, torch.Tensor],
    data: tuple[torch.Tensor, ...],
    args: argparse.Namespace,
    model_name: str,
    lr: float,
    epochs: int,
    device: torch.device,
) -> dict[str, Any]:
    """Train one optimizer from ``init_state``; return its curves, timings and HyLo stats."""
    from tqdm.auto import tqdm

    train_x, train_y, test_x, test_y = data
    model = make_model(model_name, train_x).to(device)
    model.load_state_dict(init_state)
    opt = make_optimizer(name, model, lr, args)
    batches = TensorBatches(train_x, train_y, batch_size=args.batch_size, shuffle=True, seed=args.seed)

    steps, train_seconds, diverged = 0, 0.0, False
    history: list[dict[str, float]] = []
    for epoch in range(1, epochs + 1):
        if args.max_steps is not None and steps >= args.max_steps:
            break
        total = len(batches)
        if args.max_steps is not None:
            total = min(total, args.max_steps - steps)
        bar = tqdm(total=total, desc=f"{name} epoch {epoch}/{epochs}", leave=False,
                   disable=args.no_progress, dynamic_ncols=True)
        loss_sum, loss_count = 0.0, 0
        _sync(device)
        start = time.perf_counter()
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            if isinstance(opt, HyLo):
                opt.sample_fisher(logits)  # fisher="sampled": curvature rows on refresh steps; else a no-op
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            value = float(loss.detach())
            if not math.isfinite(value):
                diverged = True
            else:
                loss_sum += value
                loss_count += 1
            bar.update(1)
            if steps % 10 == 0 or diverged:
                bar.set_postfix(loss=f"{value:.4f}")
            if diverged or (args.max_steps is not None and steps >= args.max_steps):
                break
        _sync(device)
        train_seconds += time.perf_counter() - start
        bar.close()
        acc, test_loss = evaluate(model, test_x, test_y)
        record = {
            "epoch": epoch,
            "steps": steps,
            "train_loss": loss_sum / max(1, loss_count),
            "test_loss": test_loss,
            "test_acc": acc,
            "train_seconds": train_seconds,
        }
        history.append(record)
        if not args.no_progress:
            tqdm.write(
                f"[{name}] epoch {epoch}: train loss {record['train_loss']:.4f}  test loss {test_loss:.4f}  "
                f"test acc {100 * acc:.2f}%  ({train_seconds:.1f} s, {steps} steps)"
                + ("  DIVERGED (non-finite loss)" if diverged else "")
            )
        if diverged:
            break

    result: dict[str, Any] = {
        "lr": lr,
        "steps": steps,
        "epochs_run": len(history),
        "diverged": diverged,
        "final_test_acc": history[-1]["test_acc"] if history else float("nan"),
        "final_test_loss": history[-1]["test_loss"] if history else float("nan"),
        "train_seconds": train_seconds,
        "ms_per_step": 1e3 * train_seconds / max(1, steps),
        "history": history,
    }
    if isinstance(opt, HyLo):
        stats = opt.stats()
        result["hylo"] = {
            "mode": HYLO_MODES[name],
            "refreshes": stats["refreshes"],
            "nonfinite_events": stats["nonfinite_events"],
            "layer_modes": stats["modes"],
            "timers": opt.timing_summary(),
        }
        timers = result["hylo"]["timers"]
        precondition_seconds = sum(t["seconds"] for t in timers.values())
        result["hylo"]["precondition_seconds"] = precondition_seconds
        result["hylo"]["precondition_fraction"] = precondition_seconds / train_seconds if train_seconds > 0 else 0.0
    return result


# ------------------------------------------------------------------------------ run


def _resolve_args(args: Union[argparse.Namespace, dict, Sequence[str], None]) -> argparse.Namespace:
    if args is None:
        return parse_args([])
    if isinstance(args, argparse.Namespace):
        return copy.copy(args)
    if isinstance(args, dict):
        ns = parse_args([])
        unknown = sorted(set(args) - set(vars(ns)))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}; allowed: {sorted(vars(ns))}")
        for key, value in args.items():
            setattr(ns, key, value)
        return ns
    return parse_args(list(args))


def run(args: Union[argparse.Namespace, dict, Sequence[str], None] = None) -> dict[str, Any]:
    """Train every requested optimizer and return the results.

    ``args`` is a Namespace from ``parse_args``, a dict of option overrides (keys as in the
    Namespace, e.g. ``{"train_subset": 6000}``), or a list of command-line strings.
    Returns {"config": ..., "machine": ..., "results": {optimizer: {...}}}.
    """
    args = _resolve_args(args)
    names = parse_optimizers(args.optimizers)
    lrs = parse_lr(args.lr, names)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    dataset, train_x, train_y, test_x, test_y = load_data(args)
    model_name = args.model or ("mnist_cnn" if dataset == "mnist" else "mlp")
    if model_name == "mnist_cnn" and dataset != "mnist":
        raise ValueError("--model mnist_cnn needs 28x28 MNIST images (--data-dir); use --model mlp for MNIST-1D")
    epochs = args.epochs if args.epochs is not None else DEFAULT_EPOCHS[dataset]
    data = tuple(t.to(device) for t in (train_x, train_y, test_x, test_y))

    torch.manual_seed(args.seed)
    init_state = copy.deepcopy(make_model(model_name, train_x).to(device).state_dict())

    config = {
        **{k: v for k, v in vars(args).items()},
        "dataset": dataset,
        "model": model_name,
        "epochs": epochs,
        "optimizers": names,
        "lr": lrs,
        "num_train": int(train_x.shape[0]),
        "num_test": int(test_x.shape[0]),
    }
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    results = {}
    for name in names:
        results[name] = train_one(name, init_state, data, args, model_name, lrs[name], epochs, device)
    out = {"config": config, "machine": machine, "results": results}
    if args.json_out:
        path = Path(args.json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2, default=str))
    return out


def format_table(out: dict[str, Any]) -> str:
    """The final comparison table as text."""
    cfg = out["config"]
    lines = [
        f"{cfg['dataset']} / {cfg['model']}: {cfg['num_train']} train, {cfg['num_test']} test samples, "
        f"batch {cfg['batch_size']}, {cfg['epochs']} epoch(s), seed {cfg['seed']}, "
        f"{out['machine']['threads']} thread(s) on {out['machine']['device']}",
        "",
        f"{'optimizer':<12} {'lr':>8} {'steps':>6} {'test acc':>9} {'wall s':>8} {'ms/step':>8}  notes",
    ]
    for name, r in out["results"].items():
        note = "DIVERGED" if r["diverged"] else ""
        if "hylo" in r:
            h = r["hylo"]
            note = (note + " " if note else "") + (
                f"{h['refreshes']} refreshes, preconditioner {100 * h['precondition_fraction']:.0f}% of wall"
            )
        lines.append(
            f"{name:<12} {r['lr']:>8.3g} {r['steps']:>6d} {100 * r['final_test_acc']:>8.2f}% "
            f"{r['train_seconds']:>8.2f} {r['ms_per_step']:>8.2f}  {note}"
        )
    hylo = {n: r["hylo"] for n, r in out["results"].items() if "hylo" in r}
    if hylo:
        lines += ["", "HyLo per-phase timers: total seconds (mean ms per call, calls)"]
        lines.append(f"{'optimizer':<12} " + " ".join(f"{p:>22}" for p in PHASES))
        for name, h in hylo.items():
            cells = []
            for phase in PHASES:
                t = h["timers"].get(phase)
                cells.append(f"{'-':>22}" if t is None else
                             f"{t['seconds']:>7.3f} ({t['mean_ms']:>6.2f}, {int(t['calls']):>4d})")
            lines.append(f"{name:<12} " + " ".join(cells))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        out = run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    print(format_table(out))
    if args.json_out:
        print(f"\nresults written to {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
