#!/usr/bin/env python
"""The main job: HyLo beside SGD and AdamW on MNIST (or MNIST-1D), same weights, same batches.

HyLo runs with the package defaults (``ds_hylo.HyLoConfig``: mode, damping, rank_ratio,
update_freq, step_scale, fisher, ...) unless a flag overrides one; ``--help`` shows those defaults.
Every optimizer starts from the same initial weights and sees the same batch order; the runs
advance interleaved, one evaluation segment at a time, so load changes on a shared machine hit
all of them alike, and evaluation time is never counted. It first prints its plan (data, model,
optimizers and lrs, steps, seed, evaluation, threads, expected time); at the end it prints a table
(final test accuracy, training seconds and steps to the target accuracy, ms per step, HyLo's
per-phase time from ``opt.stats()["timers"]``), says who won and what that verdict rests on (one
seed, the curve's test images and evaluation interval), its total wall time, and writes

* ``<out-dir>/results.json``: configuration, machine, curves, timings and HyLo statistics;
* ``<out-dir>/curves.png``: test accuracy against training time and against steps.

Examples (from the repository root)::

    python examples/train_mnist.py --data-dir ../shared/data/mnist      # ~2 min on 2 CPU cores, 1 thread
    python examples/train_mnist.py                                      # MNIST-1D, generated locally
    python examples/train_mnist.py --data-dir ../shared/data/mnist \\
        --optimizers hylo-kis,hylo-kid,sgd --fisher sampled --epochs 2 --out-dir runs/mnist-sampled

``--lr`` takes one value for every optimizer, ``name=value`` pairs, or both
(``0.05,adamw=0.001``: 0.05 for all but AdamW). ``run(args)`` holds the whole job and returns
a dict, so tests and notebooks can call it directly.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

_STARTED = time.perf_counter()  # the script's own clock: "total wall time" at the end counts from here
if __name__ == "__main__" and not any(a in ("-h", "--help") for a in sys.argv[1:]):
    # Say something before the slow part (importing torch and ds_hylo takes a few seconds idle,
    # up to a minute on a busy machine); the full plan follows once the options are parsed.
    print("train_mnist.py: HyLo vs SGD and AdamW, same weights and batches; importing torch and ds_hylo ...",
          flush=True)

import torch
import torch.nn.functional as F
from torch import nn

_HERE = Path(__file__).resolve().parent
ROOT = _HERE.parent
for _path in (str(_HERE), str(ROOT)):  # examples/ (data, models) and the repo root (ds_hylo)
    if _path not in sys.path:
        sys.path.insert(0, _path)

from data import NO_MNIST_HINT, TensorBatches, load_mnist, load_mnist1d  # noqa: E402
from models import MODEL_NAMES, build_model  # noqa: E402

from ds_hylo import HyLo, HyLoConfig  # noqa: E402

HYLO_DEFAULTS = HyLoConfig()  # the one source of HyLo's defaults: flags below are built from it
HYLO_MODES = {"hylo-kis": "kis", "hylo-kid": "kid", "hylo-sngd": "sngd", "hylo-hybrid": "hybrid"}
OPTIMIZERS = (*HYLO_MODES, "sgd", "adamw")
DEFAULT_OPTIMIZERS = f"hylo-{HYLO_DEFAULTS.mode},sgd,adamw"
# Untuned fallbacks: HyLoConfig's lr for HyLo (on its base's scale), torch's customary ones for the peers.
DEFAULT_LR = {**{name: HYLO_DEFAULTS.lr for name in HYLO_MODES}, "sgd": 0.1, "adamw": 1e-3}
TUNING = ROOT / "benchmarks" / "results" / "convergence_{dataset}.json"


def tuned_lrs(dataset: str, base: str = HYLO_DEFAULTS.base) -> dict[str, float]:
    """Each optimizer's learning rate as tuned on the validation split by ``benchmarks/convergence.py``
    (the committed ``benchmarks/results/convergence_<dataset>.json``); empty if that file is absent.

    SGD and AdamW take their rows' lr. HyLo runs here with the package defaults, so every HyLo mode
    takes the lr of the row that ran with the defaults this package has (``shipped_defaults_row`` of
    ``benchmarks/convergence.py``: ``hylo-default``, or an equal ablation row in
    ``convergence_<dataset>_ablation.json``); after a default changes, a stale file falls back to
    ``DEFAULT_LR`` instead of an lr of another scale. With ``base="sgd"`` (``--base sgd``) a mode
    takes its own row's lr (those rows are HyLo on momentum SGD)."""
    path = Path(str(TUNING).format(dataset=dataset))
    if not path.is_file():
        return {}
    result = json.loads(path.read_text())
    summary = result["summary"]
    lrs = {name: float(summary[name]["hp"]["lr"]) for name in ("sgd", "adamw") if name in summary}
    if base == "sgd" and base != HYLO_DEFAULTS.base:
        lrs.update({name: float(summary[name]["hp"]["lr"]) for name in HYLO_MODES if name in summary})
        return lrs
    for candidate in (path, path.with_name(path.stem + "_ablation.json")):
        row_lr = _shipped_defaults_lr(candidate)
        if row_lr is not None:
            lrs.update({name: row_lr for name in HYLO_MODES})
            break
    return lrs


def _shipped_defaults_lr(path: Path) -> Optional[float]:
    """The tuned lr of the row of a convergence result that ran with today's shipped defaults, or None."""
    if not path.is_file():
        return None
    import importlib.util

    spec = importlib.util.spec_from_file_location("_hylo_convergence_bench", ROOT / "benchmarks" / "convergence.py")
    if spec is None or spec.loader is None:
        return None
    bench = sys.modules.get(spec.name)
    if bench is None:
        bench = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = bench  # dataclasses look their module up there
        spec.loader.exec_module(bench)
    result = json.loads(path.read_text())
    row = bench.shipped_defaults_row(result)
    return None if row is None else float(result["summary"][row]["hp"]["lr"])


DEFAULT_MOMENTUM = 0.9  # SGD's in this job (and HyLo's with --base sgd); HyLoConfig's base is AdamW
# Per dataset: epochs, steps between evaluations, target test accuracy (%), test images on the curve.
TASK_DEFAULTS = {
    "mnist": {"epochs": 1, "eval_every": 47, "target": 98.0, "curve_test_size": 2000},
    "mnist1d": {"epochs": 20, "eval_every": 63, "target": 70.0, "curve_test_size": None},
}
DEFAULT_THREADS = 1
# For the plan printed at the start: what a training step and one evaluated test image cost on the
# machine the README quotes (2-core AMD EPYC, 1 torch thread, torch 2.13 CPU; HyLo's step is within
# ~10 % of SGD's there), and the fixed start-up (imports, data, plot). Only an estimate: a loaded
# machine, another CPU or another thread count changes it.
REFERENCE_COST = {
    "mnist_cnn": {"step_ms": 58.0, "eval_ms_per_image": 0.35, "setup_s": 8.0},
    "mlp": {"step_ms": 3.0, "eval_ms_per_image": 0.003, "setup_s": 8.0},
}
PHASES = ("capture", "reduce", "communicate", "invert", "apply")
DEFAULT_OUT_ROOT = ROOT / "runs"  # gitignored


# ----------------------------------------------------------------------------- CLI


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except None / False (those options explain their default in words)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def _optional_float(text: str) -> Optional[float]:
    return None if text.lower() in ("none", "off") else float(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="HyLo (package defaults) beside SGD and AdamW on MNIST or MNIST-1D: table, JSON and PNG.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--data-dir", default=None,
                   help="folder with the MNIST idx files (plain or .gz); if omitted, MNIST-1D is generated locally")
    p.add_argument("--model", default=None, choices=MODEL_NAMES[:2],
                   help="network (default: mnist_cnn for MNIST, mlp for MNIST-1D)")
    p.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS,
                   help=f"comma-separated list from {', '.join(OPTIMIZERS)}")
    p.add_argument("--epochs", type=float, default=None,
                   help=f"epochs per optimizer (default: {TASK_DEFAULTS['mnist']['epochs']} for MNIST, "
                        f"{TASK_DEFAULTS['mnist1d']['epochs']} for MNIST-1D)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size")
    p.add_argument("--lr", default=None,
                   help="learning rate: one value for all, name=value pairs, or both (e.g. '0.05,adamw=1e-3'); "
                        "default: each optimizer's lr tuned on the validation split by benchmarks/convergence.py "
                        "(benchmarks/results/convergence_<dataset>.json), else "
                        f"HyLoConfig.lr = {HYLO_DEFAULTS.lr} for HyLo, {DEFAULT_LR['sgd']} for SGD, "
                        f"{DEFAULT_LR['adamw']} for AdamW")
    p.add_argument("--momentum", type=float, default=DEFAULT_MOMENTUM,
                   help="momentum of SGD (and of HyLo with --base sgd; HyLoConfig.momentum is "
                        f"{HYLO_DEFAULTS.momentum})")
    p.add_argument("--weight-decay", type=float, default=HYLO_DEFAULTS.weight_decay,
                   help="weight decay of every optimizer (HyLoConfig's default)")
    g = p.add_argument_group("HyLo (defaults: ds_hylo.HyLoConfig)")
    g.add_argument("--base", default=HYLO_DEFAULTS.base, choices=("adamw", "sgd"),
                   help="HyLo's update on the preconditioned gradient: AdamW's or momentum SGD's")
    g.add_argument("--damping", type=float, default=HYLO_DEFAULTS.damping, help="damping lambda")
    g.add_argument("--rank-ratio", type=float, default=HYLO_DEFAULTS.rank_ratio,
                   help="fraction of each batch's samples kept per layer")
    g.add_argument("--update-freq", type=int, default=HYLO_DEFAULTS.update_freq,
                   help="steps between curvature refreshes")
    g.add_argument("--step-scale", default=HYLO_DEFAULTS.step_scale, choices=("sgd", "natural"),
                   help="'sgd': update on SGD's scale; 'natural': raw (F + lambda I)^-1 grad")
    g.add_argument("--kl-clip", type=_optional_float, default=HYLO_DEFAULTS.kl_clip,
                   help=f"KL clipping of the update (default: {HYLO_DEFAULTS.kl_clip}, i.e. off)")
    g.add_argument("--fisher", default=HYLO_DEFAULTS.fisher, choices=("empirical", "sampled"),
                   help="kernel rows: true labels (empirical) or labels sampled from the model (MC Fisher)")
    e = p.add_argument_group("evaluation and outputs")
    e.add_argument("--target", type=float, default=None,
                   help=f"target test accuracy in %% for 'time / steps to target' (default: "
                        f"{TASK_DEFAULTS['mnist']['target']} MNIST, {TASK_DEFAULTS['mnist1d']['target']} MNIST-1D)")
    e.add_argument("--eval-every", type=int, default=None,
                   help=f"steps between test evaluations (default: {TASK_DEFAULTS['mnist']['eval_every']} MNIST, "
                        f"{TASK_DEFAULTS['mnist1d']['eval_every']} MNIST-1D)")
    e.add_argument("--curve-test-size", type=int, default=None,
                   help=f"test images evaluated along the curve; the final accuracy uses the whole test set "
                        f"(default: {TASK_DEFAULTS['mnist']['curve_test_size']} for MNIST, all for MNIST-1D)")
    e.add_argument("--out-dir", default=None,
                   help=f"folder for results.json and curves.png (default: {DEFAULT_OUT_ROOT}/<dataset>)")
    e.add_argument("--json-out", default=None, help="write the JSON here instead of <out-dir>/results.json")
    e.add_argument("--plot-out", default=None, help="write the PNG here instead of <out-dir>/curves.png")
    e.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    e.add_argument("--no-progress", action="store_true", help="do not print a line per evaluation segment")
    d = p.add_argument_group("data and machine")
    d.add_argument("--train-subset", type=int, default=None, help="use only the first N training samples")
    d.add_argument("--test-subset", type=int, default=None, help="use only the first N test samples")
    d.add_argument("--max-steps", type=int, default=None, help="stop each optimizer after this many steps")
    d.add_argument("--mnist1d-samples", type=int, default=10000,
                   help="MNIST-1D samples to generate (80%% train, 20%% test)")
    d.add_argument("--seed", type=int, default=HYLO_DEFAULTS.seed,
                   help="seed of the weights, batch order and KIS sampling")
    d.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help="torch CPU threads; 0 = torch's choice (every core). 1 is the default because it is "
                        "safe: on a nearly idle 2-core machine 2 threads made these small models' steps ~1.7x faster, "
                        "but on a machine shared with other jobs they made them up to 10x slower; 1 thread is "
                        "also what the benchmark tables use, and results do not depend on the core count")
    d.add_argument("--device", default="cpu", help="cpu or cuda")
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


def parse_lr(spec: Optional[str], names: Sequence[str], dataset: Optional[str] = None,
             base: str = HYLO_DEFAULTS.base) -> dict[str, float]:
    """'0.05' / 'sgd=0.1,hylo-kis=0.05' / '0.05,adamw=1e-3' -> {optimizer: lr}; unnamed optimizers get
    their benchmark-tuned lr for ``dataset`` (``tuned_lrs``), else ``DEFAULT_LR``."""
    tuned = tuned_lrs(dataset, base) if dataset else {}
    lrs = {n: tuned.get(n, DEFAULT_LR[n]) for n in names}
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


def hylo_options(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """HyLo keywords of this run: HyLoConfig's defaults with the flags applied."""
    options: dict[str, Any] = dict(
        base=args.base,
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
    if args.base == "sgd":
        options["momentum"] = args.momentum
    return options


def make_optimizer(name: str, model: nn.Module, lr: float, args: argparse.Namespace) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    return HyLo(model, lr=lr, **hylo_options(name, args))


@torch.no_grad()
@torch.no_grad()  # no graph, and no curvature rows captured from evaluation passes
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """-> (accuracy in [0, 1], mean cross-entropy) over x (N, ...) and labels y (N,)."""
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


class Trainer:
    """One optimizer's run: its model (from the shared initial state), its batch stream, clock and curve."""

    def __init__(self, name: str, init_state: dict[str, torch.Tensor], model_name: str, lr: float,
                 train: tuple[torch.Tensor, torch.Tensor], args: argparse.Namespace, device: torch.device) -> None:
        self.name, self.lr, self.device = name, lr, device
        self.model = make_model(model_name, train[0]).to(device)
        self.model.load_state_dict(init_state)
        self.opt = make_optimizer(name, self.model, lr, args)
        # Same seed => the same shuffled batch order for every optimizer.
        self.batches = TensorBatches(*train, batch_size=args.batch_size, shuffle=True, seed=args.seed)
        self._iter = iter(self.batches)
        self.steps, self.train_seconds, self.diverged = 0, 0.0, False
        self.curve: list[dict[str, Any]] = []
        self._loss_sum, self._loss_count = 0.0, 0

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return next(self._iter)
        except StopIteration:  # next epoch, reshuffled
            self._iter = iter(self.batches)
            return next(self._iter)

    def train(self, num_steps: int) -> None:
        """Up to ``num_steps`` optimizer steps; only these are timed (not the batch slicing)."""
        for _ in range(num_steps):
            if self.diverged:
                return
            x, y = (t.to(self.device, non_blocking=True) for t in self._next_batch())
            _sync(self.device)
            start = time.perf_counter()
            logits = self.model(x)
            if isinstance(self.opt, HyLo):
                self.opt.sample_fisher(logits)  # fisher="sampled": curvature rows on refresh steps; else a no-op
            loss = F.cross_entropy(logits, y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            value = float(loss.detach())  # syncs the device, so the clock below covers the step
            self.train_seconds += time.perf_counter() - start
            self.steps += 1
            if math.isfinite(value):
                self._loss_sum += value
                self._loss_count += 1
            else:
                self.diverged = True

    def record(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """Evaluate on (x, y) and append a curve point (accuracy in %)."""
        acc, loss = evaluate(self.model, x, y)
        point = {"step": self.steps, "seconds": round(self.train_seconds, 4), "test_acc": round(100 * acc, 3),
                 "test_loss": loss,
                 "train_loss": self._loss_sum / self._loss_count if self._loss_count else None}
        self._loss_sum, self._loss_count = 0.0, 0
        self.curve.append(point)
        return point

    def first_reaching(self, target: float) -> Optional[dict[str, Any]]:
        return next((p for p in self.curve if p["test_acc"] >= target), None)

    def summary(self, test_x: torch.Tensor, test_y: torch.Tensor, target: float) -> dict[str, Any]:
        acc, loss = evaluate(self.model, test_x, test_y)
        hit = self.first_reaching(target)
        result: dict[str, Any] = {
            "lr": self.lr,
            "steps": self.steps,
            "diverged": self.diverged,
            "final_test_acc": 100 * acc,
            "final_test_loss": loss,
            "train_seconds": self.train_seconds,
            "ms_per_step": 1e3 * self.train_seconds / max(1, self.steps),
            "seconds_to_target": None if hit is None else hit["seconds"],
            "steps_to_target": None if hit is None else hit["step"],
            "curve": self.curve,
        }
        if isinstance(self.opt, HyLo):
            stats = self.opt.stats()
            timers = stats["timers"]
            hylo_seconds = sum(t["seconds"] for t in timers.values())
            result["hylo"] = {
                "config": {k: v for k, v in vars(self.opt.config).items() if not callable(v)},
                "refreshes": stats["refreshes"],
                "nonfinite_events": stats["nonfinite_events"],
                "layer_modes": stats["modes"],
                "timers": timers,
                "hylo_seconds": hylo_seconds,
                "hylo_fraction": hylo_seconds / self.train_seconds if self.train_seconds > 0 else 0.0,
            }
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


def output_paths(args: argparse.Namespace, dataset: str) -> tuple[Path, Optional[Path]]:
    """-> (JSON path, PNG path or None with --no-plot)."""
    out_dir = Path(args.out_dir) if args.out_dir else DEFAULT_OUT_ROOT / dataset
    json_path = Path(args.json_out) if args.json_out else out_dir / "results.json"
    png_path = None if args.no_plot else (Path(args.plot_out) if args.plot_out else out_dir / "curves.png")
    return json_path, png_path


def _load_average() -> Optional[list[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _sizes(args: argparse.Namespace, dataset: str) -> tuple[int, int]:
    """(train, test) sample counts the run will have, known before the data is loaded."""
    if dataset == "mnist":
        train, test = 60000, 10000
    else:
        train = int(args.mnist1d_samples * 0.8)
        train, test = train, args.mnist1d_samples - train
    if args.train_subset is not None:
        train = min(train, args.train_subset)
    if args.test_subset is not None:
        test = min(test, args.test_subset)
    return train, test


def expected_seconds(model_name: str, optimizers: int, steps: int, eval_every: int, curve_images: int,
                     test_images: int) -> float:
    """Wall time the job should take on the reference machine (``REFERENCE_COST``): training, the curve
    evaluations (at step 0 and every ``eval_every`` steps), the final evaluation and the start-up."""
    cost = REFERENCE_COST[model_name]
    evaluations = 1 + -(-steps // eval_every)
    images = optimizers * (evaluations * curve_images + test_images)
    return cost["setup_s"] + optimizers * steps * cost["step_ms"] / 1e3 + images * cost["eval_ms_per_image"] / 1e3


def _minutes(seconds: float) -> str:
    """'47 s' / '2 min 09 s'."""
    seconds = round(seconds)
    return f"{seconds} s" if seconds < 90 else f"{seconds // 60} min {seconds % 60:02d} s"


def plan(args: argparse.Namespace, names: Sequence[str], lrs: dict[str, float]) -> dict[str, Any]:
    """What the run is about to do (before any data is loaded), with its expected wall time."""
    dataset = "mnist" if args.data_dir else "mnist1d"
    task = TASK_DEFAULTS[dataset]
    model_name = args.model or ("mnist_cnn" if dataset == "mnist" else "mlp")
    num_train, num_test = _sizes(args, dataset)
    epochs = args.epochs if args.epochs is not None else task["epochs"]
    eval_every = args.eval_every if args.eval_every is not None else task["eval_every"]
    curve_size = args.curve_test_size if args.curve_test_size is not None else task["curve_test_size"]
    curve_size = num_test if curve_size is None else min(curve_size, num_test)
    total_steps = max(1, round(epochs * -(-num_train // args.batch_size)))
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    expected = expected_seconds(model_name, len(names), total_steps, max(1, eval_every), curve_size, num_test)
    data = (f"MNIST from {args.data_dir}" if dataset == "mnist"
            else f"MNIST-1D ({args.mnist1d_samples} samples generated locally; --data-dir DIR for MNIST)")
    reference = ("on an idle 2-core CPU at 1 thread" if args.threads == 1 and args.device == "cpu"
                 else "measured at 1 thread on a 2-core CPU; this setting differs")
    text = (f"plan: {data}; {model_name}, {num_train} training / {num_test} test samples\n"
            f"  {', '.join(f'{n} (lr {lrs[n]:g})' for n in names)}: same initial weights and batch order, "
            f"{total_steps} steps of batch {args.batch_size} each, seed {args.seed} (one seed)\n"
            f"  test accuracy on {curve_size} images every {eval_every} steps, final on all {num_test}; "
            f"{args.threads or 'all'} torch thread(s) on {args.device}\n"
            f"  expected time: about {_minutes(expected)} ({reference}; a busy machine takes longer)")
    return {"text": text, "expected_seconds": expected}


def run(args: Union[argparse.Namespace, dict, Sequence[str], None] = None) -> dict[str, Any]:
    """Train every requested optimizer (interleaved), write the JSON and PNG, return the results.

    ``args`` is a Namespace from ``parse_args``, a dict of option overrides (keys as in the
    Namespace, e.g. ``{"train_subset": 6000}``), or a list of command-line strings.
    Prints the plan (data, models, steps, seed, expected time) before loading anything.
    Returns {"config", "machine", "results": {optimizer: {...}}, "verdict", "verdict_basis",
    "timing", "outputs"}.
    """
    started = time.perf_counter()
    args = _resolve_args(args)
    names = parse_optimizers(args.optimizers)
    lrs = parse_lr(args.lr, names, "mnist" if args.data_dir else "mnist1d", args.base)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_start = _load_average()
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise FileNotFoundError(f"--data-dir {args.data_dir}: no such folder. {NO_MNIST_HINT}")
    planned = plan(args, names, lrs)
    print(planned["text"], flush=True)

    dataset, train_x, train_y, test_x, test_y = load_data(args)
    task = TASK_DEFAULTS[dataset]
    model_name = args.model or ("mnist_cnn" if dataset == "mnist" else "mlp")
    if model_name == "mnist_cnn" and dataset != "mnist":
        raise ValueError("--model mnist_cnn needs 28x28 MNIST images (--data-dir); use --model mlp for MNIST-1D")
    epochs = args.epochs if args.epochs is not None else task["epochs"]
    eval_every = args.eval_every if args.eval_every is not None else task["eval_every"]
    target = args.target if args.target is not None else task["target"]
    curve_size = args.curve_test_size if args.curve_test_size is not None else task["curve_test_size"]
    if eval_every < 1:
        raise ValueError(f"--eval-every must be >= 1, got {eval_every}")
    steps_per_epoch = -(-train_x.shape[0] // args.batch_size)
    total_steps = max(1, round(epochs * steps_per_epoch))
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)

    train = (train_x.to(device), train_y.to(device))
    test_x, test_y = test_x.to(device), test_y.to(device)
    if curve_size is not None and curve_size < test_x.shape[0]:
        pick = torch.randperm(test_x.shape[0], generator=torch.Generator().manual_seed(args.seed))[:curve_size]
        curve_x, curve_y = test_x[pick.to(device)], test_y[pick.to(device)]
    else:
        curve_x, curve_y = test_x, test_y

    torch.manual_seed(args.seed)
    init_state = copy.deepcopy(make_model(model_name, train_x).to(device).state_dict())
    trainers = {n: Trainer(n, init_state, model_name, lrs[n], train, args, device) for n in names}
    setup_seconds = time.perf_counter() - started
    eval_seconds = 0.0
    clock = time.perf_counter()
    for t in trainers.values():
        t.record(curve_x, curve_y)
    eval_seconds += time.perf_counter() - clock
    done = 0
    while done < total_steps and not all(t.diverged for t in trainers.values()):
        steps = min(eval_every, total_steps - done)
        for t in trainers.values():  # interleaved: every optimizer sees the same machine load
            t.train(steps)
            clock = time.perf_counter()
            t.record(curve_x, curve_y)
            eval_seconds += time.perf_counter() - clock
        done += steps
        if not args.no_progress:
            print(f"step {done}/{total_steps}: " + "  ".join(
                f"{n} {t.curve[-1]['test_acc']:.2f}% ({t.train_seconds:.1f} s)" + (" DIVERGED" if t.diverged else "")
                for n, t in trainers.items()), flush=True)

    clock = time.perf_counter()
    results = {n: t.summary(test_x, test_y, target) for n, t in trainers.items()}
    eval_seconds += time.perf_counter() - clock
    json_path, png_path = output_paths(args, dataset)
    config = {
        **{k: v for k, v in vars(args).items()},
        "dataset": dataset,
        "model": model_name,
        "epochs": epochs,
        "total_steps": total_steps,
        "eval_every": eval_every,
        "target": target,
        "optimizers": names,
        "lr": lrs,
        "num_train": int(train_x.shape[0]),
        "num_test": int(test_x.shape[0]),
        "num_curve_test": int(curve_x.shape[0]),
        "hylo_defaults": {k: v for k, v in vars(HYLO_DEFAULTS).items() if not callable(v)},
    }
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "load_average_start": load_start,
        "load_average_end": _load_average(),
    }
    out = {"config": config, "machine": machine, "results": results}
    out["verdict"] = verdict(out)
    out["verdict_basis"] = verdict_basis(out)
    out["outputs"] = {"json": str(json_path), "png": None}
    if png_path is not None:
        out["outputs"]["png"] = plot(out, png_path)
    out["timing"] = {
        "expected_seconds": round(planned["expected_seconds"], 1),
        "wall_seconds": round(time.perf_counter() - started, 1),  # run() itself: without the imports
        "setup_seconds": round(setup_seconds, 1),
        "train_seconds": round(sum(t.train_seconds for t in trainers.values()), 1),
        "eval_seconds": round(eval_seconds, 1),
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(out, indent=1, default=str) + "\n")
    return out


# --------------------------------------------------------------------------- report


def verdict(out: dict[str, Any]) -> str:
    """Plain sentences: who reached the target first (time, then steps) and who ended highest."""
    target = out["config"]["target"]
    res = out["results"]
    reached = sorted((r["seconds_to_target"], n) for n, r in res.items() if r["seconds_to_target"] is not None)
    lines = []
    if reached:
        order = "; then ".join(f"{n} ({s:.1f} s of training, {res[n]['steps_to_target']} steps)" for s, n in reached)
        lines.append(f"First to {target:g}% test accuracy: {order}.")
        missing = [n for n in res if res[n]["seconds_to_target"] is None]
        if missing:
            lines.append(f"Did not reach {target:g}%: {', '.join(missing)}.")
        fewest = min(r["steps_to_target"] for r in res.values() if r["steps_to_target"] is not None)
        tied = [n for n, r in res.items() if r["steps_to_target"] == fewest]
        lines.append(f"Fewest steps to {target:g}%: {', '.join(tied)}" + (f" (tied at {fewest})." if len(tied) > 1 else "."))
        interval = out["config"].get("eval_every")
        if interval and len(reached) > 1 and abs(res[reached[0][1]]["steps_to_target"]
                                                - res[reached[1][1]]["steps_to_target"]) <= interval:
            lines.append(f"{reached[0][1]} and {reached[1][1]} reached it at the same or adjacent evaluations: "
                         "too close to call with one seed.")
    else:
        lines.append(f"No optimizer reached {target:g}% test accuracy in {out['config']['total_steps']} steps.")
    best = max(res, key=lambda n: (not res[n]["diverged"], res[n]["final_test_acc"]))
    lines.append(f"Highest final test accuracy: {best} ({res[best]['final_test_acc']:.2f}%)."
                 + (" Diverged: " + ", ".join(n for n in res if res[n]["diverged"]) + "."
                    if any(r["diverged"] for r in res.values()) else ""))
    hylo = [n for n in res if "hylo" in res[n]]
    if hylo and reached:
        won = reached[0][1] in hylo
        lines.append("HyLo won this run." if won else f"HyLo did not win this run ({reached[0][1]} did).")
    elif hylo:
        lines.append("HyLo did not win this run (nobody reached the target).")
    return " ".join(lines)


def verdict_basis(out: dict[str, Any]) -> str:
    """What the verdict rests on and what it can and cannot tell, in plain words."""
    cfg = out["config"]
    curve, total, every, target = cfg["num_curve_test"], cfg["num_test"], cfg["eval_every"], cfg["target"]
    p = min(max(target / 100, 0.0), 1.0)
    error = 100 * math.sqrt(p * (1 - p) / max(1, curve))
    images = f"a fixed random {curve} of the {total} test images" if curve < total else f"all {total} test images"
    return (f"What this verdict rests on: one run per optimizer with one seed ({cfg['seed']}); 'first to {target:g}%' is the first evaluation at or above it, on {images} every "
            f"{every} steps (standard error about {error:.1f} points at {target:g}%), so steps to target are "
            f"known to within {every} steps and a curve can touch the target and fall back; 'final' is "
            f"measured once, on all {total} test images. A lead of one evaluation interval, or of less than "
            f"about {2 * error:.1f} points, can flip with another seed: this run shows that the optimizers train, not which "
            f"is faster in general. The tuned, two-seed comparison is in benchmarks/README.md.")


def _fmt(value: Optional[float], fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(out: dict[str, Any]) -> str:
    """The final comparison table, HyLo's per-phase time and the verdict, as text."""
    cfg, machine = out["config"], out["machine"]
    target = cfg["target"]
    lines = [
        f"{cfg['dataset']} / {cfg['model']}: {cfg['num_train']} train, {cfg['num_test']} test samples "
        f"(curve on {cfg['num_curve_test']}), batch {cfg['batch_size']}, {cfg['total_steps']} steps, "
        f"seed {cfg['seed']}, {machine['threads']} thread(s) on {machine['device']}, "
        f"load average {machine['load_average_start']} -> {machine['load_average_end']}",
        f"final test % on all {cfg['num_test']} test images; 's' and 'steps' to {target:g}% from the curve "
        f"({cfg['num_curve_test']} images, every {cfg['eval_every']} steps); s = training seconds, "
        f"evaluation excluded",
        "",
        f"{'optimizer':<12} {'lr':>7} {'final test %':>12} {f's to {target:g}%':>10} "
        f"{f'steps to {target:g}%':>14} {'ms/step':>8} {'train s':>8}  notes",
    ]
    for name, r in out["results"].items():
        notes = ["DIVERGED"] if r["diverged"] else []
        if "hylo" in r:
            h = r["hylo"]
            notes.append(f"{h['refreshes']} refreshes, HyLo {100 * h['hylo_fraction']:.0f}% of train time")
        lines.append(
            f"{name:<12} {r['lr']:>7.3g} {r['final_test_acc']:>12.2f} {_fmt(r['seconds_to_target'], '.1f'):>10} "
            f"{_fmt(r['steps_to_target'], 'd'):>14} {r['ms_per_step']:>8.2f} {r['train_seconds']:>8.1f}  "
            + "; ".join(notes))
    hylo = {n: r["hylo"] for n, r in out["results"].items() if "hylo" in r}
    if hylo:
        lines += ["", "HyLo per-phase time: total s (ms per call x calls)"]
        lines.append(f"{'optimizer':<12} " + " ".join(f"{p:>21}" for p in PHASES))
        for name, h in hylo.items():
            cells = []
            for phase in PHASES:
                t = h["timers"].get(phase)
                cells.append(f"{'-':>21}" if t is None else
                             f"{t['seconds']:>6.2f} ({t['mean_ms']:>5.2f} x {int(t['calls']):>4d})")
            lines.append(f"{name:<12} " + " ".join(cells))
        first = next(iter(hylo.values()))["config"]
        lines.append(f"HyLo settings: mode {', '.join(h['config']['mode'] for h in hylo.values())}, "
                     f"damping {first['damping']:g}, rank_ratio {first['rank_ratio']:g}, "
                     f"update_freq {first['update_freq']}, step_scale {first['step_scale']}, "
                     f"fisher {first['fisher']}, base {first['base']}"
                     + (f" (momentum {first['momentum']:g})" if first["base"] == "sgd" else f" (betas {first['betas']})"))
    lines += ["", out["verdict"]]
    if out.get("verdict_basis"):
        lines += ["", out["verdict_basis"]]
    return "\n".join(lines)


def plot(out: dict[str, Any], path: Path) -> Optional[str]:
    """Test accuracy against training time (left) and steps (right), one colour per optimizer."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)", file=sys.stderr)
        return None
    cfg, results = out["config"], out["results"]
    target = cfg["target"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    colors = plt.get_cmap("tab10")
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    for i, (name, r) in enumerate(results.items()):
        curve = r["curve"]
        label = f"{name} (lr {r['lr']:g}): final {r['final_test_acc']:.2f}% on {cfg['num_test']} images"
        kw = dict(color=colors(i % 10), marker=markers[i % len(markers)], markersize=4, linewidth=1.6, label=label)
        axes[0].plot([p["seconds"] for p in curve], [p["test_acc"] for p in curve], **kw)
        axes[1].plot([p["step"] for p in curve], [p["test_acc"] for p in curve], **kw)
        if r["seconds_to_target"] is not None:
            axes[0].plot([r["seconds_to_target"]], [target], marker="*", markersize=13, color=colors(i % 10),
                         markeredgecolor="black", linestyle="none", zorder=5)
            axes[1].plot([r["steps_to_target"]], [target], marker="*", markersize=13, color=colors(i % 10),
                         markeredgecolor="black", linestyle="none", zorder=5)
    # y-range: from a little below the lowest accuracy after the first evaluation to the best one,
    # so the approach to the target is readable and no curve is cut off above.
    accs = [p["test_acc"] for r in results.values() for p in r["curve"][1:] if math.isfinite(p["test_acc"])]
    top = max(accs + [target]) if accs else 100.0
    low = min(accs) if accs else 0.0
    low = max(0.0, min(low, target - 5.0))
    for ax, xlabel in zip(axes, ("training time (s, evaluation excluded)", "optimizer step")):
        ax.axhline(target, color="grey", linewidth=0.9, linestyle="--")
        ax.text(0.01, target, f" target {target:g}%", transform=ax.get_yaxis_transform(), va="bottom",
                fontsize=8, color="grey")
        ax.set_ylim(low - 0.5, min(100.0, top + 0.5))
        ax.set_xlim(left=0)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"test accuracy (%, curve on {cfg['num_curve_test']} of {cfg['num_test']} test images)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{cfg['dataset']} / {cfg['model']}, batch {cfg['batch_size']}, same weights and batches, "
                 f"seed {cfg['seed']} (one seed); curves on {cfg['num_curve_test']} test images every "
                 f"{cfg['eval_every']} steps, 'final' on all {cfg['num_test']}; "
                 f"star: first evaluation at or above {target:g}%", fontsize=9)
    fig.text(0.5, 0.005, out["verdict"], ha="center", va="bottom", fontsize=7.5, wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        out = run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    print(format_table(out))
    written = [p for p in (out["outputs"]["json"], out["outputs"]["png"]) if p]
    print("\nwrote " + " and ".join(written))
    timing = out["timing"]
    print(f"total wall time {_minutes(time.perf_counter() - _STARTED)} (training {timing['train_seconds']:.0f} s, "
          f"evaluation {timing['eval_seconds']:.0f} s, start-up and data {timing['setup_seconds']:.0f} s; "
          f"expected about {_minutes(timing['expected_seconds'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
