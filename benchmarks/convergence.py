"""Time and steps to target test accuracy: HyLo (KID, KIS, hybrid, SNGD) vs SGD, AdamW and K-FAC.

One protocol for every optimizer, in one process:

1. Data: the training set is split once (fixed permutation, independent of the run seeds) into a
   training part and a held-out validation part; the test set is only used for the final runs.
2. Tuning: every optimizer gets the same number of trials (default 9, ``--trials`` N keeps the
   N of every grid, evenly spaced) from its own
   grid (``GRIDS``): first-order methods a learning-rate grid, second-order methods a
   (learning rate, damping) grid. Each trial trains seed 0 for ``tune_epochs`` and is scored by
   validation accuracy at its end (a diverged trial scores 0). The best trial's setting is kept.
3. Final runs: the chosen setting of every optimizer is trained with each of ``--seeds`` (same
   initial weights and the same batch order for every optimizer at a given seed) for ``--epochs``
   epochs or ``--budget-seconds`` seconds of training, whichever comes first. Test accuracy is
   measured every ``eval_every`` steps (on MNIST on a fixed random 2000-image subset of the test
   set, since evaluating the CNN on all 10k images costs 6-10 s here) and on the whole test set at
   the end; evaluation time is not counted in the wall time.
4. All runs of a phase (all trials, then all final runs) advance interleaved, ``eval_every`` steps
   at a time, so changes in machine load hit every optimizer alike.

Reported per optimizer (median over seeds): wall time and steps to each target test accuracy,
final test accuracy, median time of a plain step and of a refresh step (a step that also
recomputes curvature: every ``update_freq``-th step for HyLo and K-FAC), peak memory (peak RSS of
a separate probe process on CPU, ``torch.cuda.max_memory_allocated`` on GPU), and the ratios
HyLo / SGD, HyLo / AdamW, HyLo / K-FAC of the time to each target.

K-FAC: ASDL (``pip install asdfghjkl``, import name ``asdl``, not a dependency of ds_hylo), its
``KfacGradientMaker`` with the empirical Fisher (as HyLo), factors and inverses refreshed every
``update_freq`` steps like HyLo, pi-damping and Cholesky inverses as ASDL does them, then
``torch.optim.SGD`` with momentum. Two things are added around ASDL, both as kfac-pytorch does
them: the running average of the factors is initialised with the first factors (ASDL's average
starts from zero, which shrinks the factors by 1 - 0.95^k after k refreshes), and the update is
KL-clipped (``kl_clip``, default 0.001). ASDL calls ``torch.cuda.nvtx`` unconditionally, which
raises on a CPU-only torch build; the benchmark replaces the nvtx push/pop with no-ops on CPU.
Without ASDL installed, K-FAC is skipped and the reason is recorded.

Outputs: a printed table, ``benchmarks/results/convergence_<task>.json`` (machine, versions, load
averages, every trial, every curve, summary) and ``convergence_<task>.png`` (test accuracy against
training wall time and against steps, one line per optimizer and seed).

    python benchmarks/convergence.py                               # both CPU tasks, ~35-40 min on 2 loaded cores
    python benchmarks/convergence.py --quick                       # smoke run, < 2 min
    python benchmarks/convergence.py --tasks mnist1d --optimizers sgd hylo-kis kfac --seeds 0 1 2
    python benchmarks/convergence.py --tasks cifar10 --data-dir /data/cifar10   # GPU, ResNet-32
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
for _path in (str(REPO), str(REPO / "examples"), str(REPO / "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from data import TensorBatches, augment_cifar, load_cifar10, load_mnist, load_mnist1d  # noqa: E402
from models import MLP, MnistCNN, resnet32  # noqa: E402
from _env import cpu_model, git_revision, load_average  # noqa: E402

import ds_hylo  # noqa: E402
from ds_hylo import HyLo  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
# Second-order methods with the empirical Fisher (true labels, the HyLo paper's) and, suffix "-mc",
# with the Monte-Carlo true Fisher (labels sampled from the model; HyLo fisher="sampled", ASDL fisher_mc).
#
# HyLo variants: the HyLo options of each (everything not named comes from the command line:
# --rank-ratio, --update-freq, --switch-window, --momentum, --weight-decay, --hylo-step-scale,
# --hylo-kl-clip). The first six are the modes; the ``hylo-kis-*`` rows below them are the ablation
# (issue #13): hylo-kis plus one mechanism each, so a row's ratio to hylo-kis is that mechanism's
# effect. ``hylo-default`` is ``HyLo(model, lr=..., damping=...)`` with every other option at the
# package's shipped default (its grid follows the default base).
# The mode rows and the ablation's reference (hylo-kis) are HyLo on momentum SGD (base="sgd",
# --momentum), the method of the paper; each ablation row changes one thing; hylo-default is the
# package as shipped (base="adamw" since the ablation chose it), given only the tuned lr and damping.
_SGD = {"base": "sgd"}
HYLO_VARIANTS: dict[str, dict[str, Any]] = {
    "hylo-kid": {"mode": "kid", **_SGD},
    "hylo-kis": {"mode": "kis", **_SGD},
    "hylo-hybrid": {"mode": "hybrid", **_SGD},
    "hylo-sngd": {"mode": "sngd", **_SGD},
    "hylo-kis-mc": {"mode": "kis", "fisher": "sampled", **_SGD},
    "hylo-hybrid-mc": {"mode": "hybrid", "fisher": "sampled", **_SGD},
    # ablation: one mechanism on top of hylo-kis
    "hylo-kis-graft-sgd": {"mode": "kis", "graft": "sgd", **_SGD},  # HyLo's direction, SGD's per-layer length
    "hylo-kis-graft-adamw": {"mode": "kis", "graft": "adamw", **_SGD},  # HyLo's direction, Adam's per-layer length
    "hylo-kis-adamw": {"mode": "kis", "base": "adamw"},  # AdamW's update on the preconditioned gradient
    "hylo-kis-natural": {"mode": "kis", "step_scale": "natural", "kl_clip": 0.001, **_SGD},  # K-FAC-like trust region
    "hylo-kis-every-step": {"mode": "kis", "update_freq": 1, **_SGD},  # refresh every step
    "hylo-kis-r50": {"mode": "kis", "rank_ratio": 0.5, **_SGD},  # 5x the row budget
    "hylo-kis-mc-adamw": {"mode": "kis", "fisher": "sampled", "base": "adamw"},
    "hylo-default": {"defaults": True},
    # the shipped defaults with the refresh's factors used from the next step on (issue 20)
    "hylo-default-delayed": {"defaults": True, "delayed_refresh": True},
}
HYLO_MODES = {name: spec.get("mode", ds_hylo.HyLoConfig().mode) for name, spec in HYLO_VARIANTS.items()}
ABLATION = ("hylo-kis", "hylo-kis-graft-sgd", "hylo-kis-graft-adamw", "hylo-kis-adamw", "hylo-kis-natural",
            "hylo-kis-every-step", "hylo-kis-r50", "hylo-kis-mc", "hylo-hybrid", "hylo-default")
KFAC_VARIANTS = ("kfac", "kfac-mc")
SECOND_ORDER = tuple(HYLO_MODES) + KFAC_VARIANTS
PEERS = ("sgd", "adamw") + KFAC_VARIANTS + ("soap", "muon")
OPTIMIZERS = tuple(HYLO_VARIANTS) + PEERS
# The default run: the modes and the peers (the ablation rows are run with --optimizers, see README).
DEFAULT_OPTIMIZERS = ("hylo-kid", "hylo-kis", "hylo-hybrid", "hylo-sngd", "hylo-kis-mc", "hylo-hybrid-mc",
                      "hylo-default") + PEERS


def fisher_of(name: str) -> str:
    """HyLo's ``fisher`` option for an optimizer name: "sampled" for the -mc variants."""
    if name in HYLO_VARIANTS:
        return HYLO_VARIANTS[name].get("fisher", "empirical")
    return "sampled" if name.endswith("-mc") else "empirical"


def hylo_options(name: str, hp: dict[str, float], args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """The keyword arguments of ``HyLo(model, **options)`` for a variant and a tuned (lr, damping)."""
    spec = dict(HYLO_VARIANTS[name])
    tuned = {"lr": hp["lr"], "damping": hp["damping"], "seed": seed}
    if spec.pop("defaults", False):  # the shipped defaults: only the tuned values, the seed (and the
        return {**tuned, **spec}      # variant's own options, e.g. delayed_refresh) are given
    fixed = {"weight_decay": args.weight_decay, "rank_ratio": args.rank_ratio, "update_freq": args.update_freq,
             "switch_window": args.switch_window, "step_scale": args.hylo_step_scale, "kl_clip": args.hylo_kl_clip}
    return {**tuned, **_variant_options(spec, fixed, args.momentum)}


def _variant_options(spec: dict[str, Any], fixed: dict[str, Any], momentum: float) -> dict[str, Any]:
    """A variant's HyLo options besides lr, damping and seed: the fixed hyper-parameters, the empirical
    Fisher, the variant's own options on top, and the run's momentum where the base is SGD."""
    options = {**fixed, "fisher": "empirical", **spec}
    if options.get("base", "sgd") == "sgd":
        options["momentum"] = momentum
    if options.get("mode", ds_hylo.HyLoConfig().mode) != "hybrid":
        options.pop("switch_window", None)  # a hybrid-mode option: HyLo refuses it with another mode
    return options


def lr_scale(name: str, step_scale: str = "sgd") -> str:
    """Which learning-rate range a HyLo variant's step lives on: "adam", "natural" or "sgd"."""
    spec = HYLO_VARIANTS[name]
    defaults = ds_hylo.HyLoConfig()
    if spec.get("defaults"):
        spec = {"base": defaults.base, "graft": defaults.graft, "step_scale": defaults.step_scale}
    if "adamw" in (spec.get("base"), spec.get("graft")):
        return "adam"
    if spec.get("graft") == "sgd":
        return "sgd"
    return "natural" if spec.get("step_scale", step_scale) == "natural" else "sgd"


def effective_hylo_options(result: dict[str, Any], name: str) -> dict[str, Any]:
    """The HyLo options (all but lr, damping and seed) a variant ran with in a written result, from
    what its JSON records: the variant's spec, the fixed hyper-parameters and the package defaults
    of the run's commit (``hylo_shipped_defaults``; older files lack some keys)."""
    protocol = result["protocol"]
    spec = dict(protocol["hylo_variants"][name])
    shipped = dict(protocol.get("hylo_shipped_defaults", {}))
    if spec.pop("defaults", False):
        return {**shipped, **spec}
    recorded = protocol.get("hylo", {})
    fixed = {**shipped, "weight_decay": protocol.get("weight_decay", 0.0),
             **{k: recorded[k] for k in ("rank_ratio", "update_freq", "switch_window") if k in recorded},
             "step_scale": recorded.get("step_scale", "sgd"), "kl_clip": recorded.get("kl_clip")}
    return _variant_options(spec, fixed, protocol.get("momentum", 0.0))


def shipped_defaults_row(result: dict[str, Any]) -> Optional[str]:
    """The HyLo row of a written result that ran with today's shipped defaults (every option but the
    tuned lr and damping and the seed equal to ``HyLoConfig()``'s), or None. ``hylo-default`` is
    preferred; an ablation row qualifies when its options came out equal (e.g. ``hylo-kis-adamw``
    once the default base became AdamW)."""
    current = asdict(ds_hylo.HyLoConfig())
    current["delayed_refresh"] = bool(current["delayed_refresh"])  # None (auto) is False outside ZeRO-2
    variants = result["protocol"].get("hylo_variants", {})

    def same(a: Any, b: Any) -> bool:
        return list(a) == list(b) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else a == b

    names = sorted((n for n in result["summary"] if n in variants), key=lambda n: n != "hylo-default")
    for name in names:
        options = effective_hylo_options(result, name)
        if all(same(options.get(k, current[k]), current[k]) for k in current if k not in ("lr", "damping", "seed")):
            return name
    return None


# Nine trials per optimizer. First-order: a learning-rate grid. Second-order: (lr, damping) over
# three lrs x three dampings; the dampings {0.01, 0.1, 1} bracket the K-FAC observation of
# docs/design.md section 6 (collapse at 0.003, trains at 0.3) for every second-order method. HyLo's default
# step_scale="sgd" keeps its step on SGD's scale (update never longer than the gradient), so its
# lr grid is SGD's range; K-FAC's step is ~ grad / damping in weakly curved directions (then
# KL-clipped), so its lr grid is a factor 3 lower, and so is that of HyLo's natural step. HyLo with
# an Adam-length step (base or graft "adamw", SGD momentum 0.9 after grafting) gets an Adam-like
# range. SOAP (Adam in Shampoo's eigenbasis) gets AdamW's grid. A choice at a grid edge is flagged in
# the JSON.
_SO_DAMPING = (0.01, 0.1, 1.0)
_HYLO_LRS = {"sgd": (0.03, 0.1, 0.3), "natural": (0.01, 0.03, 0.1), "adam": (3e-4, 1e-3, 3e-3)}
_ADAMW_GRID = [{"lr": lr} for lr in (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2)]
GRIDS: dict[str, list[dict[str, float]]] = {
    "sgd": [{"lr": lr} for lr in (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)],
    "adamw": _ADAMW_GRID,
    "soap": _ADAMW_GRID,
    "muon": _ADAMW_GRID,  # Muon's update at AdamW's RMS (MuonWithAdamW): AdamW's lr range
    **{name: [{"lr": lr, "damping": d} for d in _SO_DAMPING for lr in (0.01, 0.03, 0.1)] for name in KFAC_VARIANTS},
    **{name: [{"lr": lr, "damping": d} for d in _SO_DAMPING for lr in _HYLO_LRS[lr_scale(name)]]
       for name in HYLO_VARIANTS},
}
# --quick: two trials each, same rule.
_QUICK_HYLO_LR = {"sgd": 0.1, "natural": 0.03, "adam": 1e-3}
QUICK_GRIDS: dict[str, list[dict[str, float]]] = {
    "sgd": [{"lr": 0.05}, {"lr": 0.2}],
    "adamw": [{"lr": 1e-3}, {"lr": 3e-3}],
    "soap": [{"lr": 1e-3}, {"lr": 3e-3}],
    "muon": [{"lr": 1e-3}, {"lr": 3e-3}],
    **{name: [{"lr": 0.03, "damping": 0.3}, {"lr": 0.03, "damping": 0.03}] for name in KFAC_VARIANTS},
    **{name: [{"lr": _QUICK_HYLO_LR[lr_scale(name)], "damping": d} for d in (0.3, 0.03)] for name in HYLO_VARIANTS},
}


@dataclass
class TaskSpec:
    """One benchmark task: data, model, batch size, budgets and targets."""

    name: str
    model: str  # "mnist_cnn" | "mlp" | "resnet32"
    batch_size: int
    epochs: float  # final runs
    tune_epochs: float  # tuning trials
    eval_every: int  # steps between test evaluations (final runs)
    targets: tuple[float, ...]  # test accuracies in percent
    val_size: int
    budget_seconds: float  # cap on training seconds per final run
    tune_budget_seconds: float  # cap per trial
    train_subset: Optional[int] = None  # use only this many training samples (after the val split)
    test_subset: Optional[int] = None
    curve_test_size: Optional[int] = None  # curves use a fixed random subset of the test set (None: all)
    num_samples: int = 0  # MNIST-1D: samples generated
    device: str = "cpu"
    augment: bool = False
    hidden: tuple[int, ...] = (256, 256)  # model "mlp" / "mnist_mlp": hidden widths


TASKS: dict[str, TaskSpec] = {
    # 55k train / 5k val, 430 steps per epoch at batch 128.
    # Curves (time to target) use 2000 fixed random test images: a 10k-image evaluation of the CNN takes
    # 6-10 s on a loaded 2-core machine, 20 per run would be most of the time budget. The final accuracy
    # is measured on all 10k.
    "mnist": TaskSpec("mnist", "mnist_cnn", batch_size=128, epochs=2.0, tune_epochs=0.4, eval_every=43,
                      targets=(98.0, 98.5), val_size=5000, budget_seconds=150.0, tune_budget_seconds=40.0,
                      curve_test_size=2000),
    # MNIST-1D (mnist1d package, generated locally): 8k train (7k + 1k val) / 2k test, MLP 40-256-256-10.
    "mnist1d": TaskSpec("mnist1d", "mlp", batch_size=128, epochs=40.0, tune_epochs=20.0, eval_every=27,
                        targets=(70.0, 75.0), val_size=1000, budget_seconds=60.0, tune_budget_seconds=20.0,
                        num_samples=10000),
    # GPU only (not run on the CPU machine): ResNet-32, random crop + flip, 45k train / 5k val; curves on
    # the full 10k test set.
    "cifar10": TaskSpec("cifar10", "resnet32", batch_size=128, epochs=30.0, tune_epochs=5.0, eval_every=176,
                        targets=(80.0, 85.0), val_size=5000, budget_seconds=1800.0, tune_budget_seconds=300.0,
                        device="cuda", augment=True),
}


def quick_spec(spec: TaskSpec) -> TaskSpec:
    """A seconds-long version of a task for smoke runs and tests."""
    q = copy.copy(spec)
    if spec.name == "mnist":
        q.train_subset, q.test_subset, q.val_size = 2048, 1000, 500
        q.epochs, q.tune_epochs, q.eval_every = 1.5, 0.5, 8
        q.targets = (70.0, 85.0)
    elif spec.name == "mnist1d":
        q.num_samples, q.val_size = 2500, 250
        q.epochs, q.tune_epochs, q.eval_every = 5.0, 2.0, 5
        q.targets = (30.0, 40.0)
    else:
        q.train_subset, q.test_subset, q.val_size = 2048, 1000, 512
        q.epochs, q.tune_epochs, q.eval_every = 1.0, 0.5, 4
    q.budget_seconds, q.tune_budget_seconds = 20.0, 8.0
    return q


# --------------------------------------------------------------------------- environment


def package_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - any failure means "not installed"
        return None


def machine_info(threads: int, device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ds_hylo": package_version("ds-hylo"),
        "asdfghjkl": package_version("asdfghjkl"),
        "mnist1d": package_version("mnist1d"),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "device": device,
        "git": git_revision(only="ds_hylo"),
    }
    if cpu_model():
        info["cpu_model"] = cpu_model()
    try:
        with open("/proc/meminfo") as fh:
            info["mem_total_gb"] = round(int(fh.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# --------------------------------------------------------------------------- data and models


def load_task_data(spec: TaskSpec, data_dir: Optional[str], device: str) -> dict[str, torch.Tensor]:
    """Train / val / test tensors; the val split is a fixed permutation (seed 12345) of the train set."""
    if spec.name == "mnist":
        if data_dir is None:
            raise ValueError("--data-dir is required for MNIST")
        train_x, train_y, test_x, test_y = load_mnist(data_dir)
    elif spec.name == "mnist1d":
        train_x, train_y, test_x, test_y = load_mnist1d(seed=0, num_samples=spec.num_samples)
    elif spec.name == "cifar10":
        if data_dir is None:
            raise ValueError("--data-dir is required for CIFAR-10")
        train_x, train_y, test_x, test_y = load_cifar10(data_dir)
    else:
        raise ValueError(f"unknown task {spec.name!r}; choose from {list(TASKS)}")
    perm = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(12345))
    val_idx, train_idx = perm[: spec.val_size], perm[spec.val_size:]
    if spec.train_subset is not None:
        train_idx = train_idx[: spec.train_subset]
    if spec.test_subset is not None:
        test_x, test_y = test_x[: spec.test_subset], test_y[: spec.test_subset]
    out = {
        "train_x": train_x[train_idx], "train_y": train_y[train_idx],
        "val_x": train_x[val_idx], "val_y": train_y[val_idx],
        "test_x": test_x, "test_y": test_y,
    }
    if spec.curve_test_size is not None and spec.curve_test_size < test_x.shape[0]:
        pick = torch.randperm(test_x.shape[0], generator=torch.Generator().manual_seed(54321))[: spec.curve_test_size]
        out["curve_x"], out["curve_y"] = test_x[pick], test_y[pick]
    else:
        out["curve_x"], out["curve_y"] = test_x, test_y
    return {k: v.to(device) for k, v in out.items()}


def build_model(spec: TaskSpec, seed: int, device: str) -> nn.Module:
    torch.manual_seed(seed)
    if spec.model == "mnist_cnn":
        model: nn.Module = MnistCNN()
    elif spec.model == "mlp":
        model = MLP(in_features=40, hidden=tuple(spec.hidden), num_classes=10)
    elif spec.model == "mnist_mlp":  # MLP on flattened 28x28 MNIST (batch_scaling.py)
        model = MLP(in_features=784, hidden=tuple(spec.hidden), num_classes=10)
    elif spec.model == "resnet32":
        model = resnet32()
    else:
        raise ValueError(spec.model)
    return model.to(device)


# --------------------------------------------------------------------------- optimizers


class Stepper:
    """One optimizer behind a common ``step(x, y) -> loss`` (forward, backward, update)."""

    update_freq: Optional[int] = None  # refresh period of second-order methods

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        return {}


class TorchStepper(Stepper):
    """SGD with momentum or AdamW: plain backward + ``optimizer.step()``."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(model)
        self.opt = optimizer

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(x)
        self.after_forward(logits)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def after_forward(self, logits: torch.Tensor) -> None:
        """Between forward and backward; nothing for first-order methods."""


def hidden_matrices(model: nn.Module) -> list[torch.Tensor]:
    """The trainable weights of every ``nn.Linear`` but the last one in module order (the output
    layer): the matrices Muon is meant for (embeddings, convolutions, biases and norms are not)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.requires_grad]
    return [m.weight for m in linears[:-1]]


class MuonWithAdamW:
    """Muon as LM users run it: ``torch.optim.Muon`` on the hidden 2-D weights (``hidden_matrices``),
    ``torch.optim.AdamW`` on every other parameter, with one learning rate: Muon's orthogonalised
    update is scaled to AdamW's RMS (``adjust_lr_fn="match_rms_adamw"``), so the lr lives on AdamW's
    range. The optimizer interface the steppers use (``zero_grad``, ``step``, ``param_groups``)."""

    def __init__(self, model: nn.Module, lr: float, weight_decay: float) -> None:
        matrices = hidden_matrices(model)
        chosen = {id(p) for p in matrices}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
        self.optimizers: list[torch.optim.Optimizer] = []
        if matrices:
            self.optimizers.append(torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay,
                                                    adjust_lr_fn="match_rms_adamw"))
        if rest:
            self.optimizers.append(torch.optim.AdamW(rest, lr=lr, weight_decay=weight_decay))

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()


class HyLoStepper(TorchStepper):
    def __init__(self, model: nn.Module, opt: HyLo) -> None:
        super().__init__(model, opt)
        self.update_freq = opt.config.update_freq

    def after_forward(self, logits: torch.Tensor) -> None:
        # fisher="sampled": extra backward to the layer outputs on refresh steps; otherwise a no-op
        self.opt.sample_fisher(logits)

    def stats(self) -> dict[str, Any]:
        s = self.opt.stats()
        return {"refreshes": s["refreshes"], "timers": s["timers"], "modes": s["modes"],
                "nonfinite_events": s["nonfinite_events"], "damping": s["damping"]}


_NVTX_PATCHED = False


def _patch_nvtx_for_cpu() -> None:
    """ASDL wraps its phases in torch.cuda.nvtx ranges, which raise on a CPU-only torch build."""
    global _NVTX_PATCHED
    if _NVTX_PATCHED or torch.cuda.is_available():
        return
    import torch.cuda.nvtx as nvtx

    nvtx.range_push = lambda *args, **kwargs: 0  # type: ignore[assignment]
    nvtx.range_pop = lambda *args, **kwargs: 0  # type: ignore[assignment]
    _NVTX_PATCHED = True


def drop_unavailable_soap(optimizers: list[str], skipped: dict[str, str], log: Callable[[str], None]) -> None:
    """Remove "soap" from ``optimizers`` (in place) when pytorch-optimizer is missing; say why in ``skipped``."""
    if "soap" not in optimizers:
        return
    try:
        from pytorch_optimizer import SOAP  # noqa: F401
    except ImportError as exc:
        optimizers.remove("soap")
        skipped["soap"] = f"pytorch-optimizer (pip install pytorch-optimizer) not importable: {exc}"
        log(f"skipping soap: {skipped['soap']}")


def kfac_available() -> tuple[bool, str]:
    try:
        _patch_nvtx_for_cpu()
        import asdl  # noqa: F401
        from asdl import KfacGradientMaker, PreconditioningConfig  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return False, f"ASDL (pip install asdfghjkl) not importable: {type(exc).__name__}: {exc}"
    return True, f"ASDL asdfghjkl {package_version('asdfghjkl')} KfacGradientMaker"


class AsdlKfacStepper(Stepper):
    """K-FAC from ASDL (empirical Fisher) + KL clip + SGD momentum; see the module docstring."""

    def __init__(self, model: nn.Module, lr: float, damping: float, momentum: float, weight_decay: float,
                 update_freq: int, batch_size: int, factor_decay: float = 0.95, kl_clip: Optional[float] = 0.001,
                 fisher: str = "empirical") -> None:
        super().__init__(model)
        _patch_nvtx_for_cpu()
        import warnings

        from asdl import KfacGradientMaker, PreconditioningConfig

        self.update_freq = update_freq
        self.ema_decay = 1.0 - factor_decay
        self.kl_clip = kl_clip
        # ema_decay=1 on the first refresh: the running average starts at the first factors.
        self.config = PreconditioningConfig(data_size=batch_size, damping=damping,
                                            preconditioner_upd_interval=update_freq,
                                            curvature_upd_interval=update_freq, ema_decay=1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.gm = KfacGradientMaker(model, self.config, fisher_type=ASDL_FISHER[fisher])
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.raw_grads: dict[int, torch.Tensor] = {}
        if kl_clip is not None:
            for i, p in enumerate(self.params):
                p.register_post_accumulate_grad_hook(self._keep_raw(i))
        self.steps = 0
        self.last_kl_scale = 1.0

    def _keep_raw(self, i: int) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            # the last accumulation is the training loss's (ASDL's fisher_mc backward comes first)
            if p.grad is not None:
                self.raw_grads[i] = p.grad.detach().clone()

        return hook

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        import warnings

        self.opt.zero_grad(set_to_none=True)
        self.raw_grads.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ASDL's non-full backward hooks warn on every refresh
            dummy = self.gm.setup_model_call(self.model, x)
            self.gm.setup_loss_call(F.cross_entropy, dummy, y)
            _, loss = self.gm.forward_and_backward()
        if self.steps == 0:
            self.config.ema_decay = self.ema_decay
        if self.kl_clip is not None:
            lr = self.opt.param_groups[0]["lr"]
            vg = sum(float((p.grad * self.raw_grads[i]).sum()) for i, p in enumerate(self.params)
                     if p.grad is not None and i in self.raw_grads) * lr**2
            scale = 1.0 if vg <= 0 else min(1.0, math.sqrt(self.kl_clip / vg))
            self.last_kl_scale = scale
            if scale < 1.0:
                for p in self.params:
                    if p.grad is not None:
                        p.grad.mul_(scale)
        self.opt.step()
        self.steps += 1
        return loss.detach()

    def stats(self) -> dict[str, Any]:
        return {"last_kl_scale": self.last_kl_scale, "steps": self.steps}


ASDL_FISHER = {"empirical": "fisher_emp", "sampled": "fisher_mc"}


def make_stepper(name: str, model: nn.Module, hp: dict[str, float], args: argparse.Namespace,
                 spec: TaskSpec, seed: int) -> Stepper:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return TorchStepper(model, torch.optim.SGD(params, lr=hp["lr"], momentum=args.momentum,
                                                   weight_decay=args.weight_decay))
    if name == "adamw":
        return TorchStepper(model, torch.optim.AdamW(params, lr=hp["lr"], weight_decay=args.adamw_weight_decay))
    if name == "soap":
        from pytorch_optimizer import SOAP

        return TorchStepper(model, SOAP(params, lr=hp["lr"], weight_decay=args.adamw_weight_decay,
                                        precondition_frequency=args.update_freq))
    if name == "muon":
        return TorchStepper(model, MuonWithAdamW(model, hp["lr"], args.adamw_weight_decay))
    if name in HYLO_VARIANTS:
        return HyLoStepper(model, HyLo(model, **hylo_options(name, hp, args, seed)))
    if name in KFAC_VARIANTS:
        return AsdlKfacStepper(model, lr=hp["lr"], damping=hp["damping"], momentum=args.momentum,
                               weight_decay=args.weight_decay, update_freq=args.update_freq,
                               batch_size=spec.batch_size, factor_decay=args.kfac_factor_decay,
                               kl_clip=args.kfac_kl_clip, fisher=fisher_of(name))
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


# --------------------------------------------------------------------------- runs


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    """Percent of correct predictions (eval mode; the model is put back in train mode)."""
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch):
        correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    model.train()
    return 100.0 * correct / x.shape[0]


def record_step(run: Any, elapsed: float, loss: float, update_freq: Optional[int]) -> bool:
    """Book one timed training step on a run (its clocks, step-time list, refresh flags, step count
    and running loss); a non-finite loss marks the run diverged. Returns False when it diverged.
    Shared by this script's ``Run`` and ``finetune.py``'s."""
    run.train_seconds += elapsed
    run.step_ms.append(1e3 * elapsed)
    run.refresh_flags.append(update_freq is not None and run.step % update_freq == 0)
    run.step += 1
    if not math.isfinite(loss):
        run.diverged = True
        return False
    run._loss_sum += loss
    run._loss_n += 1
    return True


class Run:
    """One (optimizer, setting, seed): model, stepper, its own batch stream, train clock, curve."""

    def __init__(self, name: str, hp: dict[str, float], seed: int, spec: TaskSpec, data: dict[str, torch.Tensor],
                 args: argparse.Namespace, total_steps: int, budget_seconds: float) -> None:
        self.name, self.hp, self.seed, self.spec = name, dict(hp), seed, spec
        self.device = spec.device
        self.model = build_model(spec, seed, self.device)
        self.stepper = make_stepper(name, self.model, hp, args, spec, seed)
        self.batches = TensorBatches(data["train_x"], data["train_y"], batch_size=spec.batch_size, shuffle=True,
                                     drop_last=True, seed=seed)
        self.aug_gen = torch.Generator(device=self.device).manual_seed(seed) if spec.augment else None
        self._iter = iter(self.batches)
        self.total_steps = total_steps
        self.budget_seconds = budget_seconds
        self.step = 0
        self.train_seconds = 0.0
        self.step_ms: list[float] = []
        self.refresh_flags: list[bool] = []
        self.curve: list[dict[str, float]] = []
        self.diverged = False
        self.full_test_acc: Optional[float] = None
        self.peak_cuda_bytes: Optional[int] = None
        self._loss_sum, self._loss_n = 0.0, 0
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    @property
    def done(self) -> bool:
        return self.diverged or self.step >= self.total_steps or self.train_seconds >= self.budget_seconds

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            x, y = next(self._iter)
        except StopIteration:
            self._iter = iter(self.batches)
            x, y = next(self._iter)
        if self.aug_gen is not None:
            x = augment_cifar(x, self.aug_gen)
        return x, y

    def advance(self, n: int) -> None:
        """Train up to n more steps (fewer if the step or time budget runs out or the loss diverges)."""
        freq = self.stepper.update_freq
        for _ in range(n):
            if self.done:
                return
            x, y = self._next_batch()
            _sync(self.device)
            start = time.perf_counter()
            loss = self.stepper.step(x, y)
            value = float(loss)  # synchronises on GPU
            if not record_step(self, time.perf_counter() - start, value, freq):
                return
        if self.device == "cuda":
            self.peak_cuda_bytes = max(self.peak_cuda_bytes or 0, torch.cuda.max_memory_allocated())

    def record(self, x: torch.Tensor, y: torch.Tensor) -> float:
        acc = 0.0 if self.diverged else accuracy(self.model, x, y)
        loss = self._loss_sum / self._loss_n if self._loss_n else float("nan")
        self._loss_sum, self._loss_n = 0.0, 0
        self.curve.append({"step": self.step, "seconds": round(self.train_seconds, 4), "acc": round(acc, 3),
                           "train_loss": round(loss, 5) if math.isfinite(loss) else None})
        return acc

    def timing(self) -> dict[str, Any]:
        """Median ms of plain steps and of refresh steps (the first step, with its warm-up, excluded)."""
        plain = [t for t, r in zip(self.step_ms[1:], self.refresh_flags[1:]) if not r]
        refresh = [t for t, r in zip(self.step_ms[1:], self.refresh_flags[1:]) if r]
        med = statistics.median
        out = {
            "median_step_ms": round(med(plain), 3) if plain else None,
            "median_refresh_step_ms": round(med(refresh), 3) if refresh else None,
            "mean_step_ms_all": round(statistics.fmean(self.step_ms), 3) if self.step_ms else None,
        }
        if plain and refresh:
            out["refresh_overhead_ms"] = round(med(refresh) - med(plain), 3)
        return out


def interleave(runs: list[Run], segment: int, eval_x: torch.Tensor, eval_y: torch.Tensor,
               eval_during: bool, log: Callable[[str], None], label: str) -> None:
    """Advance every run ``segment`` steps in turn until all are done; evaluate after each segment."""
    if eval_during:
        for run in runs:
            run.record(eval_x, eval_y)  # step 0
    rounds = 0
    while not all(run.done for run in runs):
        for run in runs:
            if run.done:
                continue
            run.advance(segment)
            if eval_during or run.done:
                run.record(eval_x, eval_y)
        rounds += 1
        if rounds % 5 == 0:
            live = sum(not r.done for r in runs)
            log(f"  [{label}] round {rounds}: {live}/{len(runs)} runs going, load {load_average()}")


def steps_for(spec: TaskSpec, epochs: float, num_train: int) -> int:
    return max(1, int(round(epochs * (num_train // spec.batch_size))))


def tune(spec: TaskSpec, data: dict[str, torch.Tensor], optimizers: Sequence[str], grids: dict[str, list],
         args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Every optimizer's trials on seed 0, scored by validation accuracy at the end of the trial."""
    total = steps_for(spec, spec.tune_epochs, data["train_x"].shape[0])
    runs = [Run(name, hp, 0, spec, data, args, total, spec.tune_budget_seconds)
            for name in optimizers for hp in grids[name]]
    log(f"[{spec.name}] tuning: {len(runs)} trials ({len(runs) // max(1, len(optimizers))} per optimizer), "
        f"{total} steps or {spec.tune_budget_seconds:.0f} s each, scored on {data['val_x'].shape[0]} held-out samples")
    start = time.perf_counter()
    interleave(runs, max(1, spec.eval_every), data["val_x"], data["val_y"], eval_during=False, log=log, label="tune")
    result: dict[str, Any] = {"steps_per_trial": total, "seconds": round(time.perf_counter() - start, 1),
                              "trials": {}, "chosen": {}}
    for name in optimizers:
        trials = [r for r in runs if r.name == name]
        rows = [{"hp": r.hp, "val_acc": r.curve[-1]["acc"] if r.curve else 0.0, "steps": r.step,
                 "train_seconds": round(r.train_seconds, 2), "diverged": r.diverged} for r in trials]
        best = max(rows, key=lambda row: row["val_acc"])
        result["trials"][name] = rows
        result["chosen"][name] = {"hp": best["hp"], "val_acc": best["val_acc"],
                                  "at_grid_edge": _at_edge(best["hp"], [row["hp"] for row in rows])}
        log(f"  {name:12s} " + "  ".join(f"{_fmt_hp(row['hp'])}:{row['val_acc']:.1f}" + ("(div)" if row["diverged"] else "")
                                         for row in rows) + f"  -> {_fmt_hp(best['hp'])}")
    return result


def load_tuning(path: str, optimizers: Sequence[str], grids: dict[str, list]) -> dict[str, Any]:
    """The tuning phase of an earlier run: a result JSON (its "tuning") or a JSON with "trials" per
    optimizer ({name: [{"hp": ..., "val_acc": ...}, ...]}), as ``tune`` logs and returns them. The best
    trial of each optimizer is chosen again (same rule as ``tune``); every optimizer must be there with
    the same grid as this run's."""
    data = json.loads(Path(path).read_text())
    data = data.get("tuning", data)
    result: dict[str, Any] = {"source": str(path), "steps_per_trial": data.get("steps_per_trial"),
                              "seconds": data.get("seconds"), "trials": {}, "chosen": {}}
    for name in optimizers:
        rows = data["trials"].get(name)
        if rows is None:
            raise ValueError(f"--tuned {path}: no trials for {name}")
        if sorted(map(json.dumps, (r["hp"] for r in rows))) != sorted(map(json.dumps, grids[name])):
            raise ValueError(f"--tuned {path}: the trials of {name} are not this run's grid {grids[name]}")
        best = max(rows, key=lambda row: row["val_acc"])
        result["trials"][name] = rows
        result["chosen"][name] = {"hp": best["hp"], "val_acc": best["val_acc"],
                                  "at_grid_edge": _at_edge(best["hp"], [row["hp"] for row in rows])}
    return result


def parse_tuning_log(text: str) -> dict[str, Any]:
    """The trials ``tune`` logs ("  name  lr=..,damping=..:97.3 ... -> chosen") as ``load_tuning`` input."""
    trials: dict[str, list] = {}
    for line in text.splitlines():
        parts = line.split("]", 1)[-1].split()
        if len(parts) < 3 or parts[-2] != "->" or parts[0] not in OPTIMIZERS:
            continue
        rows = []
        for cell in parts[1:-2]:
            diverged = cell.endswith("(div)")
            setting, score = cell.removesuffix("(div)").rsplit(":", 1)
            hp = {k: float(v) for k, v in (kv.split("=") for kv in setting.split(","))}
            rows.append({"hp": hp, "val_acc": float(score), "diverged": diverged})
        trials[parts[0]] = rows
    return {"trials": trials}


def _subsample(grid: list, n: int) -> list:
    """n settings spread evenly over the grid (first and last included)."""
    if n >= len(grid):
        return list(grid)
    if n <= 1:
        return [grid[len(grid) // 2]]
    return [grid[round(i * (len(grid) - 1) / (n - 1))] for i in range(n)]


def _at_edge(hp: dict[str, float], grid: list[dict[str, float]]) -> list[str]:
    edges = []
    for key, value in hp.items():
        values = sorted({g[key] for g in grid})
        if len(values) > 1 and value in (values[0], values[-1]):
            edges.append(f"{key}={'min' if value == values[0] else 'max'}")
    return edges


def _fmt_hp(hp: dict[str, float]) -> str:
    return ",".join(f"{k}={v:g}" for k, v in hp.items())


def time_to_target(curve: list[dict[str, float]], target: float) -> tuple[Optional[float], Optional[int]]:
    for point in curve:
        if point["acc"] >= target:
            return point["seconds"], int(point["step"])
    return None, None


def final_runs(spec: TaskSpec, data: dict[str, torch.Tensor], chosen: dict[str, dict], seeds: Sequence[int],
               args: argparse.Namespace, log: Callable[[str], None]) -> list[Run]:
    total = steps_for(spec, spec.epochs, data["train_x"].shape[0])
    runs = [Run(name, entry["hp"], seed, spec, data, args, total, spec.budget_seconds)
            for seed in seeds for name, entry in chosen.items()]
    log(f"[{spec.name}] final runs: {len(runs)} ({len(chosen)} optimizers x {len(seeds)} seeds), {total} steps or "
        f"{spec.budget_seconds:.0f} s each, test accuracy on {data['curve_x'].shape[0]} samples every "
        f"{spec.eval_every} steps, on all {data['test_x'].shape[0]} at the end")
    interleave(runs, spec.eval_every, data["curve_x"], data["curve_y"], eval_during=True, log=log, label="final")
    for run in runs:
        run.full_test_acc = 0.0 if run.diverged else round(accuracy(run.model, data["test_x"], data["test_y"]), 3)
    return runs


# --------------------------------------------------------------------------- memory


def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM; unlike ru_maxrss it restarts at exec)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_probe_main(task: str, name: str, hp_json: str, quick: bool, threads: int) -> None:
    """Child process: a few steps (two refreshes) on random data shaped like the task's batches."""
    torch.set_num_threads(threads)
    spec = quick_spec(TASKS[task]) if quick else TASKS[task]
    args = parse_args([])
    hp = json.loads(hp_json)
    rss_start = peak_rss_mb()
    model = build_model(spec, 0, "cpu")
    shape = {"mnist_cnn": (1, 28, 28), "mnist_mlp": (1, 28, 28), "mlp": (40,), "resnet32": (3, 32, 32)}[spec.model]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(spec.batch_size, *shape, generator=gen)
    y = torch.randint(0, 10, (spec.batch_size,), generator=gen)
    stepper = make_stepper(name, model, hp, args, spec, 0)
    rss_model = peak_rss_mb()
    for _ in range(2 * args.update_freq + 1):
        stepper.step(x, y)
    peak = peak_rss_mb()
    print(json.dumps({"rss_start_mb": rss_start, "rss_after_setup_mb": rss_model, "peak_rss_mb": peak,
                      "step_growth_mb": peak - rss_model}))


def memory_probe(task: str, name: str, hp: dict[str, float], quick: bool, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", task, name, json.dumps(hp),
           "--threads", str(threads)] + (["--quick"] if quick else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not line:
            return {"error": (proc.stderr or proc.stdout)[-500:]}
        out = json.loads(line[-1])
        return {k: round(v, 1) for k, v in out.items()}
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": str(exc)}


# --------------------------------------------------------------------------- summary


def _median(values: list[Optional[float]]) -> Optional[float]:
    """Median over seeds; None if any seed missed (a target not reached by every seed is not reached)."""
    if not values or any(v is None for v in values):
        return None
    return float(statistics.median(values))


def summarize(spec: TaskSpec, runs: list[Run], optimizers: Sequence[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name in optimizers:
        mine = [r for r in runs if r.name == name]
        if not mine:
            continue
        row: dict[str, Any] = {"hp": mine[0].hp, "seeds": [r.seed for r in mine]}
        for target in spec.targets:
            hits = [time_to_target(r.curve, target) for r in mine]
            row[f"time_to_{target:g}"] = _median([h[0] for h in hits])
            row[f"steps_to_{target:g}"] = _median([h[1] for h in hits])
            row[f"reached_{target:g}"] = sum(h[0] is not None for h in hits)
        row["final_acc"] = round(statistics.median(r.full_test_acc for r in mine), 3)  # whole test set
        row["final_curve_acc"] = round(statistics.median(r.curve[-1]["acc"] for r in mine), 3)
        row["best_acc"] = round(statistics.median(max(p["acc"] for p in r.curve) for r in mine), 3)
        row["steps"] = int(statistics.median(r.step for r in mine))
        row["train_seconds"] = round(statistics.median(r.train_seconds for r in mine), 2)
        timings = [r.timing() for r in mine]
        for key in ("median_step_ms", "median_refresh_step_ms", "refresh_overhead_ms"):
            vals = [t.get(key) for t in timings if t.get(key) is not None]
            row[key] = round(statistics.median(vals), 3) if vals else None
        row["diverged"] = sum(r.diverged for r in mine)
        hylo = [r.stepper.stats() for r in mine if isinstance(r.stepper, HyLoStepper)]
        if hylo:  # ds_hylo's own phase timers: ms per refresh (capture..invert) and per step (apply)
            phases: dict[str, float] = {}
            for phase in ("fisher", "capture", "reduce", "communicate", "invert", "apply"):
                vals = [h["timers"][phase]["seconds"] / max(1, h["timers"][phase]["calls"] if phase == "apply"
                                                            else h["refreshes"])
                        for h in hylo if phase in h["timers"]]
                if vals:
                    phases[phase + ("_ms_per_step" if phase == "apply" else "_ms_per_refresh")] = round(
                        1e3 * statistics.median(vals), 3)
            row["hylo_phases"] = phases
        if any(r.peak_cuda_bytes for r in mine):
            row["peak_cuda_mb"] = round(max(r.peak_cuda_bytes or 0 for r in mine) / 2**20, 1)
        summary[name] = row
    return summary


def ratios(spec: TaskSpec, summary: dict[str, Any]) -> dict[str, Any]:
    """time_to_target(HyLo mode) / time_to_target(peer) and the same for steps; < 1 means HyLo is faster."""
    out: dict[str, Any] = {}
    for hylo in (n for n in summary if n in HYLO_MODES):
        for peer in (p for p in PEERS if p in summary):
            for target in spec.targets:
                for kind in ("time", "steps"):
                    a = summary[hylo][f"{kind}_to_{target:g}"]
                    b = summary[peer][f"{kind}_to_{target:g}"]
                    out[f"{hylo}/{peer} {kind}@{target:g}"] = round(a / b, 3) if a is not None and b else None
    if "hylo-kis" in summary:  # the ablation: each mechanism's effect on top of hylo-kis
        for hylo in (n for n in summary if n in HYLO_MODES and n != "hylo-kis"):
            for target in spec.targets:
                for kind in ("time", "steps"):
                    a = summary[hylo][f"{kind}_to_{target:g}"]
                    b = summary["hylo-kis"][f"{kind}_to_{target:g}"]
                    out[f"{hylo}/hylo-kis {kind}@{target:g}"] = round(a / b, 3) if a is not None and b else None
    return out


def format_table(spec: TaskSpec, summary: dict[str, Any], memory: dict[str, Any]) -> str:
    head = ["optimizer", "setting"]
    for t in spec.targets:
        head += [f"s to {t:g}%", f"steps to {t:g}%"]
    head += ["final % (all test)", "step ms", "refresh ms", "peak MB"]
    rows = [head]
    for name, row in summary.items():
        line = [name, _fmt_hp(row["hp"])]
        for t in spec.targets:
            s, n, k = row[f"time_to_{t:g}"], row[f"steps_to_{t:g}"], row[f"reached_{t:g}"]
            miss = f" ({k}/{len(row['seeds'])})" if k < len(row["seeds"]) else ""
            line += ["-" + miss if s is None else f"{s:.1f}", "-" if n is None else f"{n:.0f}"]
        mem = memory.get(name, {})
        peak = row.get("peak_cuda_mb") or mem.get("peak_rss_mb")
        line += [f"{row['final_acc']:.2f}", _fmt_num(row["median_step_ms"]), _fmt_num(row["median_refresh_step_ms"]),
                 _fmt_num(peak, "{:.0f}")]
        rows.append(line)
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    lines = ["  ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _fmt_num(v: Optional[float], fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


# One (colour, line style, marker) per optimizer: HyLo variants solid, sampled-Fisher variants
# dash-dot, first-order baselines dashed, K-FAC dotted, so lines that coincide (hybrid starts as KID)
# stay distinguishable.
def _style(name: str, index: int) -> dict[str, Any]:
    linestyle = "-."
    if not name.endswith("-mc"):
        linestyle = "-" if name.startswith("hylo") else ":" if name.startswith("kfac") else "--"
    if name.startswith("kfac") and name.endswith("-mc"):
        linestyle = (0, (1, 1, 4, 1))
    return {"linestyle": linestyle, "marker": "osD^vP*Xhp"[index % 10]}


def _seed_bands(curves: list[list[dict[str, float]]], key: str) -> tuple[list[float], list[float], list[float],
                                                                          list[float]]:
    """Curves of one optimizer's seeds -> (x median, acc median, acc min, acc max) per evaluation index."""
    n = min(len(c) for c in curves)
    xs, med, lo, hi = [], [], [], []
    for i in range(n):
        accs = [c[i]["acc"] for c in curves]
        xs.append(statistics.median(c[i][key] for c in curves))
        med.append(statistics.median(accs))
        lo.append(min(accs))
        hi.append(max(accs))
    return xs, med, lo, hi


def plot_title(result: dict[str, Any]) -> str:
    """Title of a convergence PNG from its result JSON."""
    task, seeds = result["protocol"]["task"], result["protocol"]["seeds"]
    return (f"{result['task']}: {task['model']}, batch {task['batch_size']}, seeds {seeds}, "
            f"{result['date_utc'][:10]}, load {result['load_average_1_5_15']['start']}; "
            f"line: median over seeds, band: min-max over seeds")


def curves_by_optimizer(runs: list[dict[str, Any]]) -> tuple[dict[str, list[list[dict[str, Any]]]], dict[str, dict]]:
    """The JSON's ``runs`` -> ({optimizer: [curve of each seed]}, {optimizer: its setting}), in run order."""
    by_name: dict[str, list[list[dict[str, Any]]]] = {}
    settings: dict[str, dict[str, Any]] = {}
    for run in runs:
        by_name.setdefault(run["optimizer"], []).append(run["curve"])
        settings[run["optimizer"]] = run["hp"]
    return by_name, settings


def plot_curves(runs: list[dict[str, Any]], targets: Sequence[float], path: Path, title: str) -> Optional[str]:
    """Test accuracy against training time (left) and step (right) from the JSON's ``runs``.

    One colour per optimizer: the median over seeds as a line, the seeds' min-max as a shaded band.
    The y-axis covers every curve's top and the whole second half of every curve that reaches a
    target (the early rise from chance is cut, and so is a diverged curve's fall).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    by_name, settings = curves_by_optimizer(runs)
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.6), sharey=True)
    colors = plt.get_cmap("tab10" if len(by_name) <= 10 else "tab20")
    tops, floors = [], []
    for i, (name, curves) in enumerate(by_name.items()):
        style = _style(name, i)
        for ax, key in zip(axes, ("seconds", "step")):
            xs, med, lo, hi = _seed_bands(curves, key)
            ax.fill_between(xs, lo, hi, color=colors(i % colors.N), alpha=0.15, linewidth=0)
            ax.plot(xs, med, color=colors(i % colors.N), linewidth=1.6, markersize=3.5, markevery=max(1, len(xs) // 12),
                    label=f"{name} ({_fmt_hp(settings[name])}, {len(curves)} seeds)", **style)
        tops.append(max(p["acc"] for c in curves for p in c))
        _, med, _, _ = _seed_bands(curves, "step")
        if max(med) >= min(targets):  # a curve that never reaches a target (diverged) may leave the axis
            floors.append(min(med[len(med) // 2:]))
    span = max(targets) - min(targets)
    low = min([min(targets) - span - 8.0] + [f - 1.0 for f in floors])
    for ax, xlabel in zip(axes, ("training wall time (s, evaluation excluded)", "optimizer step")):
        for t in targets:
            ax.axhline(t, color="grey", linewidth=0.8, linestyle=":")
        ax.set_ylim(max(0.0, low), min(100.0, max(tops) + 0.5))
        ax.set_xlim(left=0)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%); dotted: targets")
    axes[1].legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot(spec: TaskSpec, runs: list[Run], path: Path, title: str) -> Optional[str]:
    """Draw the PNG from live runs (same drawing as from the JSON: ``plot_curves``)."""
    return plot_curves([{"optimizer": r.name, "hp": r.hp, "seed": r.seed, "curve": r.curve} for r in runs],
                       spec.targets, path, title)


# --------------------------------------------------------------------------- driver


def run_task(task: str, args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Tune, run the seeds, summarise, write JSON/PNG for one task; returns the result dict."""
    spec = quick_spec(TASKS[task]) if args.quick else copy.copy(TASKS[task])
    if args.epochs is not None:
        spec.epochs = args.epochs
    if args.tune_epochs is not None:
        spec.tune_epochs = args.tune_epochs
    if args.budget_seconds is not None:
        spec.budget_seconds = args.budget_seconds
    if args.tune_budget_seconds is not None:
        spec.tune_budget_seconds = args.tune_budget_seconds
    if args.device is not None:
        spec.device = args.device
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"task {task} needs a GPU (torch.cuda.is_available() is False)")
    started = datetime.datetime.now(datetime.timezone.utc)
    loads = [load_average()]
    t0 = time.perf_counter()

    optimizers = list(args.optimizers)
    skipped: dict[str, str] = {}
    if any(name in optimizers for name in KFAC_VARIANTS):
        ok, kfac_note = kfac_available()
        for name in KFAC_VARIANTS:
            if not ok and name in optimizers:
                optimizers.remove(name)
                skipped[name] = kfac_note
                log(f"[{task}] skipping {name}: {kfac_note}")
    else:
        kfac_note = None
    drop_unavailable_soap(optimizers, skipped, lambda message: log(f"[{task}] {message}"))
    grids = QUICK_GRIDS if args.quick else GRIDS
    if args.hylo_step_scale == "natural":  # a step ~ grad / damping, like K-FAC's: K-FAC's grid
        grids = {**grids, **{name: grids["kfac"] for name in HYLO_VARIANTS if lr_scale(name, "natural") == "natural"}}
    if args.trials is not None:
        grids = {k: _subsample(v, args.trials) for k, v in grids.items()}
    counts = {len(grids[name]) for name in optimizers}
    assert len(counts) <= 1, f"every optimizer must get the same number of trials, got {counts}"

    data_dir = args.data_dir if task == "mnist" else args.cifar_dir
    data = load_task_data(spec, data_dir, spec.device)
    log(f"[{task}] train {tuple(data['train_x'].shape)}, val {data['val_x'].shape[0]}, test {data['test_x'].shape[0]}; "
        f"load {load_average()}")

    if args.tuned:  # the tuning phase of an earlier run (same protocol), e.g. one stopped after tuning
        tuning = load_tuning(args.tuned, optimizers, grids)
        log(f"[{task}] tuning taken from {args.tuned}: " + ", ".join(f"{n} {_fmt_hp(tuning['chosen'][n]['hp'])}"
                                                                   for n in optimizers))
    else:
        tuning = tune(spec, data, optimizers, grids, args, log)
    loads.append(load_average())
    runs = final_runs(spec, data, tuning["chosen"], args.seeds, args, log)
    loads.append(load_average())
    summary = summarize(spec, runs, optimizers)
    memory: dict[str, Any] = {}
    if spec.device == "cpu" and not args.no_memory:
        for name in optimizers:
            memory[name] = memory_probe(task, name, tuning["chosen"][name]["hp"], args.quick, args.threads)
        base = memory.get("sgd", {}).get("peak_rss_mb")
        for name, m in memory.items():
            if base is not None and "peak_rss_mb" in m:
                m["extra_over_sgd_mb"] = round(m["peak_rss_mb"] - base, 1)
    loads.append(load_average())
    table = format_table(spec, summary, memory)
    rat = ratios(spec, summary)
    result = {
        "benchmark": "convergence",
        "task": task,
        "quick": bool(args.quick),
        "date_utc": started.isoformat(timespec="seconds"),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "machine": machine_info(args.threads, spec.device),
        "load_average_1_5_15": {"start": loads[0], "after_tuning": loads[1], "after_final": loads[2],
                                "end": loads[3]},
        "command": " ".join([Path(sys.executable).name] + [str(a) for a in sys.argv]),
        "protocol": {
            "task": asdict(spec),
            "optimizers": optimizers,
            "skipped": skipped,
            "kfac_implementation": kfac_note,
            "grids": {name: grids[name] for name in optimizers},
            "seeds": list(args.seeds),
            "momentum": args.momentum, "weight_decay": args.weight_decay,
            "adamw_weight_decay": args.adamw_weight_decay,
            "hylo_variants": {name: HYLO_VARIANTS[name] for name in optimizers if name in HYLO_VARIANTS},
            "hylo_shipped_defaults": {k: v for k, v in asdict(ds_hylo.HyLoConfig()).items()
                                      if k in ("mode", "base", "graft", "step_scale", "kl_clip", "fisher", "rank_ratio",
                                               "update_freq", "momentum", "betas", "eps")},
            "soap": {"implementation": "pytorch_optimizer.SOAP", "weight_decay": args.adamw_weight_decay,
                     "precondition_frequency": args.update_freq},
            "muon": {"implementation": "torch.optim.Muon (adjust_lr_fn='match_rms_adamw') on every nn.Linear "
                                       "weight but the output layer, torch.optim.AdamW on the rest, one lr",
                     "weight_decay": args.adamw_weight_decay},
            "hylo": {"rank_ratio": args.rank_ratio, "update_freq": args.update_freq,
                     "switch_window": args.switch_window, "step_scale": args.hylo_step_scale,
                     "kl_clip": args.hylo_kl_clip,
                     "fisher": "empirical; sampled (MC) for the -mc variants"},
            "kfac": {"update_freq": args.update_freq, "factor_decay": args.kfac_factor_decay,
                     "kl_clip": args.kfac_kl_clip, "fisher": "fisher_emp; fisher_mc for kfac-mc"},
            "lr_schedule": "constant",
            "selection": "validation accuracy at the end of the trial (seed 0)",
            "time_to_target": "training seconds (evaluation excluded) at the first evaluation at or above the "
                              "target; median over seeds, None unless every seed reached it",
            "curve_test_samples": int(data["curve_x"].shape[0]),
            "final_test_samples": int(data["test_x"].shape[0]),
        },
        "tuning": tuning,
        "summary": summary,
        "ratios": rat,
        "memory": memory,
        "table": table,
        "runs": [{"optimizer": r.name, "hp": r.hp, "seed": r.seed, "steps": r.step, "full_test_acc": r.full_test_acc,
                  "train_seconds": round(r.train_seconds, 3), "diverged": r.diverged, "timing": r.timing(),
                  "curve": r.curve, "stats": r.stepper.stats()} for r in runs],
    }
    out_dir = Path(args.out_dir)
    suffix = ("_ablation" if args.ablation else "") + ("_quick" if args.quick else "")
    json_path = out_dir / f"convergence_{task}{suffix}.json"
    if not args.no_plot:
        result["plot"] = plot(spec, runs, out_dir / f"convergence_{task}{suffix}.png", plot_title(result))
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1, default=str))
    result["json"] = str(json_path)
    log(f"\n[{task}] {spec.model}, {len(args.seeds)} seeds, targets {list(spec.targets)} (test accuracy, %)")
    log(table)
    log("ratios HyLo/peer of time (and steps) to target (< 1: HyLo faster; None: a side missed the target):")
    for key, value in rat.items():
        if " time@" in key:
            steps_key = key.replace(" time@", " steps@")
            log(f"  {key:32s} {_fmt_num(value, '{:.2f}')}   steps: {_fmt_num(rat.get(steps_key), '{:.2f}')}")
    log(f"[{task}] done in {result['total_seconds']:.0f} s, load {load_average()}; wrote {json_path}")
    return result


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["mnist", "mnist1d"], choices=list(TASKS))
    p.add_argument("--optimizers", nargs="+", default=list(DEFAULT_OPTIMIZERS), choices=list(OPTIMIZERS),
                   help="default: the HyLo modes, hylo-default and every peer")
    p.add_argument("--tuned", default=None, metavar="JSON",
                   help="skip tuning: take each optimizer's trials from an earlier run's JSON (or from "
                        "--tuning-from-log's output) and choose as tuning does")
    p.add_argument("--tuning-from-log", nargs=2, metavar=("LOG", "JSON"), default=None,
                   help="write the trials a run logged during tuning (LOG) to JSON for --tuned, and exit")
    p.add_argument("--ablation", action="store_true",
                   help="run the ablation instead: hylo-kis plus one mechanism per row, hylo-kis-mc, hylo-hybrid, "
                        "hylo-default, and the peers (SGD, AdamW, K-FAC, SOAP)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="final-run seeds (default: 0 1; --quick: 0)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny data, two trials each, one seed, no memory probes (unless --memory)")
    p.add_argument("--epochs", type=float, default=None, help="epochs per final run (default: per task)")
    p.add_argument("--tune-epochs", type=float, default=None, help="epochs per tuning trial (default: per task)")
    p.add_argument("--budget-seconds", type=float, default=None,
                   help="cap on training seconds per final run (default: per task)")
    p.add_argument("--tune-budget-seconds", type=float, default=None, help="cap per tuning trial")
    p.add_argument("--trials", type=int, default=None, help="use N evenly spaced settings of every grid")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "mnist"), help="MNIST idx files")
    p.add_argument("--cifar-dir", default=None, help="CIFAR-10 binary files (task cifar10)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD, HyLo and K-FAC momentum")
    p.add_argument("--weight-decay", type=float, default=0.0, help="SGD, HyLo and K-FAC weight decay")
    p.add_argument("--adamw-weight-decay", type=float, default=0.01)
    p.add_argument("--rank-ratio", type=float, default=0.1, help="HyLo")
    p.add_argument("--update-freq", type=int, default=10, help="HyLo and K-FAC refresh period (steps)")
    p.add_argument("--switch-window", type=int, default=100, help="HyLo hybrid window (steps)")
    p.add_argument("--hylo-step-scale", default="sgd", choices=("sgd", "natural"))
    p.add_argument("--hylo-kl-clip", type=float, default=None)
    p.add_argument("--kfac-factor-decay", type=float, default=0.95)
    p.add_argument("--kfac-kl-clip", type=float, default=0.001)
    p.add_argument("--device", default=None, choices=("cpu", "cuda"),
                   help="override the task's device (mnist, mnist1d: cpu; cifar10: cuda)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core machine more threads wait on busy cores)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probe processes")
    p.add_argument("--memory", action="store_true", help="run the memory probes even with --quick")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--memory-probe", nargs=3, metavar=("TASK", "OPTIMIZER", "HP_JSON"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


_T0 = time.perf_counter()


def _log(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {message}" if message.strip() else message, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1]
    if args.ablation:
        args.optimizers = list(ABLATION) + [p for p in ("sgd", "adamw", "kfac", "soap") if p not in ABLATION]
    if args.quick and not args.memory:
        args.no_memory = True
    if args.tuning_from_log:
        log_path, json_path = args.tuning_from_log
        Path(json_path).write_text(json.dumps(parse_tuning_log(Path(log_path).read_text()), indent=1))
        return {}
    if args.memory_probe:
        memory_probe_main(*args.memory_probe, quick=args.quick, threads=args.threads)
        return {}
    torch.set_num_threads(args.threads)
    results = {}
    for task in args.tasks:
        results[task] = run_task(task, args, log=_log)
    return results


if __name__ == "__main__":
    main()
