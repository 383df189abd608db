"""One training loop, two launchers, one DeepSpeed JSON.

The examples in this folder run unchanged under

* ``accelerate launch --config_file configs/accelerate/<setup>.yaml script.py ...``
  (the yaml's ``deepspeed_config_file`` names the JSON; ``ds_hylo.accelerate.prepare``), or
* ``deepspeed --num_gpus N script.py --deepspeed_config configs/deepspeed/<file>.json ...`` or
  ``torchrun`` (``ds_hylo.initialize``), or
* plain ``python script.py`` (one process, through Accelerate).

``Session`` hides the difference: it builds the engine, the optimizer chosen with ``--optimizer``
(HyLo in the JSON's mode or another mode, or an SGD/AdamW baseline), the sharded DataLoader and the
LR schedule (installed as ``engine.lr_scheduler`` on both paths, so DeepSpeed steps it once per
optimizer step), and offers ``backward``, evaluation helpers and logging that work on both. Both
paths shard the data identically (global batch b goes to rank b % world_size), so the same seed
gives the same batches, and for a HyLo config the same parameters, under either launcher.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

_HERE = Path(__file__).resolve().parent
for _path in (str(_HERE), str(_HERE.parent)):  # examples/ and the repository root (ds_hylo)
    if _path not in sys.path:
        sys.path.insert(0, _path)

from ds_hylo.config import HyLoConfig  # noqa: E402
from ds_hylo.deepspeed import is_hylo_config, load_config  # noqa: E402

OPTIMIZERS = ("hylo", "hylo-kid", "hylo-kis", "hylo-hybrid", "hylo-sngd", "sgd", "adamw")
HYLO_MODES = {"hylo-kid": "kid", "hylo-kis": "kis", "hylo-hybrid": "hybrid", "hylo-sngd": "sngd"}
LAUNCHERS = ("auto", "accelerate", "deepspeed")


RUNS = _HERE.parent / "runs"  # gitignored; every example writes its metrics under it by default


def add_session_args(parser: argparse.ArgumentParser, default_config: str, adamw_lr: float,
                     sgd_lr: float = 0.05, run_name: str = "example") -> None:
    """Options every example shares (launcher, config, optimizer switch, threads, logging).

    ``run_name`` names the example's folder under ``runs/``: its metrics go to
    ``runs/<run_name>-<launcher>/metrics.json`` unless ``--metrics-out`` says otherwise.
    """
    g = parser.add_argument_group("launcher / optimizer")
    g.add_argument("--deepspeed_config", "--config", dest="deepspeed_config", default=None,
                   help="DeepSpeed JSON (default: the accelerate yaml's deepspeed_config_file under "
                        f"`accelerate launch`, else {default_config})")
    g.add_argument("--optimizer", default="hylo", choices=OPTIMIZERS,
                   help="'hylo': the JSON's HyLo section as written; hylo-<mode>: the same section with "
                        "mode replaced; sgd / adamw: first-order baselines (the JSON's section is ignored)")
    g.add_argument("--lr", type=float, default=None,
                   help=f"override the learning rate (default: the JSON's lr; AdamW: {adamw_lr}; SGD: the "
                        f"JSON's lr when its HyLo base is sgd, else {sgd_lr})")
    g.add_argument("--launcher", default="auto", choices=LAUNCHERS,
                   help="auto: accelerate under `accelerate launch` or with no launcher, deepspeed under the "
                        "deepspeed launcher / torchrun")
    g.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"),
                   help="only fills \"enabled\": \"auto\" in the JSON under the deepspeed launcher "
                        "(under accelerate pass `accelerate launch --mixed_precision ...`)")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="override the JSON's train_micro_batch_size_per_gpu (batch per process)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--log-every", type=int, default=50, help="print metrics every N optimizer steps")
    g.add_argument("--threads", type=int, default=1,
                   help="torch threads per process on a CPU-only host (0: torch's choice). The same count under "
                        "both launchers gives the same parameters; 1 keeps 2 processes on 2 cores from "
                        "oversubscribing them. Ignored with CUDA")
    g.add_argument("--metrics-out", default=None,
                   help=f"rank 0 writes the final metrics (JSON) here (default: runs/{run_name}-<launcher>/metrics.json "
                        "in the repository)")
    g.add_argument("--save-dir", default=None, help="save a DeepSpeed checkpoint (with HyLo state) here at the end")
    g.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bar")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(_default_config=default_config, _adamw_lr=adamw_lr, _sgd_lr=sgd_lr, _run_name=run_name)


def process_rank() -> int:
    """This process's global rank from the launcher's environment (RANK, else LOCAL_RANK; 0 without a launcher)."""
    for key in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(key, "")
        if value.strip().lstrip("-").isdigit():
            return int(value)
    return 0


def asks_for_help(argv: Sequence[str]) -> bool:
    """True if ``argv`` holds -h / --help (or an argparse prefix of --help such as --he)."""
    return any(a == "-h" or (len(a) > 3 and "--help".startswith(a)) for a in argv)


def parse_session_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, except that ``--help`` prints on rank 0 only.

    Under ``accelerate launch`` / ``deepspeed`` / ``torchrun`` every process parses the same command
    line; the processes of non-zero rank exit quietly (status 0) instead of printing the help again.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if asks_for_help(args) and process_rank() != 0:
        raise SystemExit(0)
    return parser.parse_args(args)


def detect_launcher(requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "accelerate"
    if "LOCAL_RANK" in os.environ or "RANK" in os.environ:
        return "deepspeed"  # the deepspeed launcher or torchrun
    return "accelerate"  # plain python: one process through Accelerate


def resolve_path(path: Optional[str]) -> Optional[str]:
    """A config path as given if it exists, else relative to the repository root (where launches run)."""
    if path is None or Path(path).exists():
        return path
    candidate = _HERE.parent / path
    return str(candidate) if candidate.exists() else path


def describe_damping(cfg: Any) -> str:
    """'damping=0.3 (no decay)', 'damping=1.0->0.1 over 4320 steps' or 'damping=<schedule>' for a HyLoConfig."""
    if callable(cfg.damping):
        return f"damping=<schedule {getattr(cfg.damping, '__name__', type(cfg.damping).__name__)}>"
    if cfg.damping_target is None or cfg.damping_decay_steps is None:
        return f"damping={cfg.damping:g} (no decay)"
    return f"damping={cfg.damping:g}->{cfg.damping_target:g} over {cfg.damping_decay_steps} steps"


class Session:
    """Engine, optimizer, data and logging for one run under either launcher."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.started = time.perf_counter()
        args.deepspeed_config = resolve_path(args.deepspeed_config)
        args._default_config = resolve_path(args._default_config)
        self.args = args
        self.launcher = detect_launcher(args.launcher)
        self.accelerator = None
        if process_rank() == 0:  # before the slow part: importing DeepSpeed and building the engine
            print(f"{getattr(args, '_run_name', 'example')}: launcher {self.launcher}, config "
                  f"{args.deepspeed_config or '(the default)'}, optimizer {args.optimizer}, seed {args.seed}; "
                  "importing DeepSpeed and building the engine (10-60 s) ...", flush=True)
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            if getattr(args, "threads", 0):
                torch.set_num_threads(args.threads)
        if self.launcher == "accelerate":
            from ds_hylo.accelerate import deepspeed_config, make_accelerator

            under_accelerate_launch = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
            path = args.deepspeed_config or (None if under_accelerate_launch else args._default_config)
            if under_accelerate_launch:
                self.accelerator = make_accelerator()
                self._config_override = path  # installed by prepare(config=...) if given
            else:
                self.accelerator = make_accelerator(deepspeed_config=path)
                self._config_override = None
            self.config = load_config(path if path else deepspeed_config(self.accelerator))
            self.config_name = path or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "?")
            self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
        else:
            import deepspeed

            from ds_hylo.deepspeed import disable_cpu_shm_comm

            if not torch.cuda.is_available():
                disable_cpu_shm_comm()
                deepspeed.init_distributed(dist_backend="gloo")
            else:
                deepspeed.init_distributed()
            path = args.deepspeed_config or args._default_config
            self.config = load_config(path)
            self.config_name = path
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if args.micro_batch_size is not None:
            self.config["train_micro_batch_size_per_gpu"] = int(args.micro_batch_size)
            if self.launcher == "accelerate":
                self._config_override = self.config  # prepare() installs the edited dict
        self.is_main = self.rank == 0
        self.engine: Any = None
        self.optimizer: Any = None

    # ----------------------------------------------------------------- config
    @property
    def micro_batch_size(self) -> int:
        value = self.config.get("train_micro_batch_size_per_gpu", "auto")
        if value == "auto":
            return int(getattr(self.args, "batch_size", None) or 32)
        return int(value)

    @property
    def gradient_accumulation_steps(self) -> int:
        value = self.config.get("gradient_accumulation_steps", 1)
        return 1 if value == "auto" else int(value)

    def hylo_params(self) -> dict:
        return dict(self.config["optimizer"].get("params", {})) if is_hylo_config(self.config) else {}

    def base_lr(self) -> float:
        if self.args.lr is not None:
            return float(self.args.lr)
        if self.args.optimizer == "adamw":
            return float(self.args._adamw_lr)
        params = self.hylo_params() or dict((self.config.get("optimizer") or {}).get("params", {}))
        if self.args.optimizer == "sgd" and self.hylo_params() and params.get("base", HyLoConfig().base) != "sgd":
            return float(self.args._sgd_lr)  # the JSON's lr is on AdamW's scale
        return float(params.get("lr", HyLoConfig().lr))

    def _client_optimizer(self, model: torch.nn.Module) -> Optional[torch.optim.Optimizer]:
        name = self.args.optimizer
        if name.startswith("hylo"):
            return None
        params = self.hylo_params()
        trainable = [p for p in model.parameters() if p.requires_grad]
        if name == "sgd":
            return torch.optim.SGD(trainable, lr=self.base_lr(), momentum=params.get("momentum", 0.9),
                                   weight_decay=params.get("weight_decay", 0.0), nesterov=params.get("nesterov", False))
        return torch.optim.AdamW(trainable, lr=self.base_lr(), weight_decay=params.get("weight_decay", 0.01))

    def _hylo_overrides(self, extra: Optional[dict]) -> dict:
        overrides = dict(extra or {})
        if self.args.optimizer in HYLO_MODES:
            overrides["mode"] = HYLO_MODES[self.args.optimizer]
        if self.args.lr is not None:
            overrides["lr"] = float(self.args.lr)
        return overrides

    # ---------------------------------------------------------------- prepare
    def prepare(
        self,
        model: torch.nn.Module,
        train_set: Dataset,
        collate_fn: Optional[Callable] = None,
        lr_lambda: Optional[Callable[[int], float]] = None,
        hylo_overrides: Optional[dict] = None,
    ) -> DataLoader:
        """Build engine + optimizer + sharded train loader; returns the loader (iterate it per epoch)."""
        client = self._client_optimizer(model)
        overrides = self._hylo_overrides(hylo_overrides)
        scheduler = None if lr_lambda is None else (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda))
        generator = torch.Generator().manual_seed(self.args.seed)
        if self.launcher == "accelerate":
            from ds_hylo.accelerate import prepare

            loader = DataLoader(train_set, batch_size=self.micro_batch_size, shuffle=True, drop_last=True,
                                collate_fn=collate_fn, generator=generator)
            out = prepare(self.accelerator, model, loader, config=self._config_override, optimizer=client,
                          lr_scheduler=scheduler, hylo_overrides=overrides)
            self.engine, self.optimizer, loader = out[0], out[1], out[2]
        else:
            import deepspeed

            import ds_hylo
            from ds_hylo.accelerate import resolve_auto

            config = resolve_auto(self.config, micro_batch_size=self.micro_batch_size,
                                  mixed_precision=self.args.mixed_precision)
            sampler = InterleavedBatches(train_set, self.micro_batch_size, self.rank, self.world_size, generator)
            # generator=: the DataLoader draws its worker base seed from it first, as Accelerate's loader does.
            loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate_fn, generator=generator)
            if client is None:
                config["optimizer"]["params"] = {**config["optimizer"].get("params", {}), **overrides}
                self.engine, self.optimizer, _, _ = ds_hylo.initialize(model=model, config=config,
                                                                      lr_scheduler=scheduler)
            else:
                config.pop("optimizer", None)
                if int(config.get("zero_optimization", {}).get("stage", 0)) > 0:
                    config["zero_allow_untested_optimizer"] = True
                self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=client,
                                                                        config=config, lr_scheduler=scheduler)
        return loader

    # ------------------------------------------------------------------ train
    @property
    def hylo(self) -> Any:
        return getattr(self.engine, "hylo", None)

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.engine.module.parameters()).dtype

    @property
    def step(self) -> int:
        """Optimizer steps taken so far."""
        return int(self.engine.global_steps)

    def to_device(self, batch: Any) -> Any:
        """Move a batch (tensor / tuple / dict) to the engine's device; float tensors to the model dtype."""
        if torch.is_tensor(batch):
            batch = batch.to(self.device, non_blocking=True)
            return batch.to(self.dtype) if batch.is_floating_point() else batch
        if isinstance(batch, dict) or hasattr(batch, "items"):
            return {k: self.to_device(v) for k, v in batch.items()}
        if isinstance(batch, (tuple, list)):
            return type(batch)(self.to_device(v) for v in batch)
        return batch

    def accumulate(self):
        """Context for one micro-batch (Accelerate decides the accumulation boundary)."""
        if self.accelerator is not None:
            return self.accelerator.accumulate(self.engine)
        return contextlib.nullcontext()

    def sample_fisher(self, logits: torch.Tensor) -> None:
        """HyLo with ``"fisher": "sampled"``: capture curvature rows from the engine's output tensor
        (before any ``.float()``); a no-op for other optimizers and for the empirical Fisher."""
        if self.hylo is not None:
            self.hylo.sample_fisher(logits)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward and (at accumulation boundaries) the optimizer step, HyLo included."""
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        else:
            self.engine.backward(loss)
            self.engine.step()

    def set_epoch(self, loader: Any, epoch: int) -> None:
        for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
            if obj is not None and hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)
                return

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def done(self) -> bool:
        return self.args.max_steps is not None and self.step >= self.args.max_steps

    def all_sum(self, *values: float) -> list[float]:
        """Sum numbers over ranks (for metrics)."""
        t = torch.tensor(values, dtype=torch.float64)
        if self.world_size > 1:
            dist.all_reduce(t)
        return t.tolist()

    def shard(self, n: int) -> range:
        """This rank's indices of an n-element evaluation set."""
        return range(self.rank, n, self.world_size)

    def progress(self, total: Optional[int], desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=self.args.no_progress or not self.is_main,
                    dynamic_ncols=True, leave=False)

    def print(self, *items: Any) -> None:
        if self.is_main:
            from tqdm.auto import tqdm

            tqdm.write(" ".join(str(x) for x in items))

    def describe(self) -> str:
        opt = self.args.optimizer
        if self.hylo is not None:
            cfg = self.hylo.config
            opt = (f"HyLo mode={cfg.mode} rank_ratio={cfg.rank_ratio} update_freq={cfg.update_freq} "
                   f"{describe_damping(cfg)} seq={cfg.sequence_convention}")
        precision = "bf16" if self.engine.bfloat16_enabled() else "fp16" if self.engine.fp16_enabled() else "fp32"
        return (f"launcher={self.launcher} world={self.world_size} device={self.device} precision={precision} "
                f"zero={self.engine.zero_optimization_stage()} micro_batch={self.micro_batch_size} "
                f"grad_accum={self.engine.gradient_accumulation_steps()} config={self.config_name}\n  optimizer: {opt}")

    def hylo_summary(self) -> Optional[dict]:
        if self.hylo is None:
            return None
        stats = self.hylo.stats()
        return {
            "refreshes": stats["refreshes"],
            "damping": stats["damping"],
            "modes": sorted(set(stats["modes"].values())),
            "preconditioned_layers": len(stats["modes"]),
            "first_order_modules": list(self.hylo.preconditioner.fallback_layers),
            "timers_s": {k: round(v["seconds"], 4) for k, v in stats["timers"].items()},
            "bytes_sent": stats["bytes_sent"],
            "nonfinite_events": stats["nonfinite_events"],
        }

    def parameters_sha256(self) -> str:
        """SHA-256 of the model's parameters (name order, float32 bytes): equal hashes, equal parameters."""
        digest = hashlib.sha256()
        for name, param in self.engine.module.named_parameters():
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def metrics_path(self) -> Path:
        """Where rank 0 writes the metrics: ``--metrics-out``, else ``runs/<example>-<launcher>/metrics.json``."""
        if self.args.metrics_out:
            return Path(self.args.metrics_out)
        return RUNS / f"{getattr(self.args, '_run_name', 'example')}-{self.launcher}" / "metrics.json"

    def finish(self, metrics: dict) -> dict:
        metrics = {
            "launcher": self.launcher,
            "world_size": self.world_size,
            "optimizer": self.args.optimizer,
            "config": str(self.config_name),
            "seed": self.args.seed,
            "threads": torch.get_num_threads(),
            "steps": self.step,
            "seconds": time.perf_counter() - self.started,
            "parameters_sha256": self.parameters_sha256(),
            "hylo": self.hylo_summary(),
            **metrics,
        }
        if self.args.save_dir:
            self.engine.save_checkpoint(self.args.save_dir)
        if self.is_main:
            if metrics["hylo"]:
                self.print(f"HyLo: {metrics['hylo']['refreshes']} refreshes, modes {metrics['hylo']['modes']}, "
                           f"timers (s) {metrics['hylo']['timers_s']}")
            path = self.metrics_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(metrics, indent=2, default=str))
            self.print(f"parameters sha256 {metrics['parameters_sha256'][:16]}... ({torch.get_num_threads()} "
                       f"thread(s) per process)\nwrote {path}\ntotal wall time {metrics['seconds']:.0f} s")
        from ds_hylo.accelerate import shutdown

        self.engine = self.optimizer = None
        shutdown(self.accelerator)  # barrier, release the engine, destroy the process groups
        return metrics


class InterleavedBatches(torch.utils.data.Sampler):
    """Accelerate's sharding, for the deepspeed path: global batch b goes to rank b % world_size.

    The global batches come from ``BatchSampler(RandomSampler(dataset, generator), drop_last=True)``,
    exactly what a shuffled ``DataLoader(..., drop_last=True, generator=generator)`` draws, and
    incomplete rounds are dropped as Accelerate's ``BatchSamplerShard`` does. So for the same seed both
    launchers feed every rank the same samples in the same order.
    """

    def __init__(self, dataset: Dataset, batch_size: int, rank: int, world_size: int,
                 generator: torch.Generator) -> None:
        self.batches = torch.utils.data.BatchSampler(
            torch.utils.data.RandomSampler(dataset, generator=generator), batch_size, drop_last=True)
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        batches = list(self.batches)
        usable = len(batches) // self.world_size * self.world_size
        yield from batches[self.rank:usable:self.world_size]

    def __len__(self) -> int:
        return len(self.batches) // self.world_size


def step_schedule(steps_per_epoch: int, warmup_epochs: float, milestones: Iterable[int], decay: float,
                  warmup_start: float = 0.1) -> Callable[[int], float]:
    """LR factor per optimizer step: linear warmup from ``warmup_start`` to 1, then x``decay`` per milestone epoch."""
    warmup_steps = max(0, int(round(warmup_epochs * steps_per_epoch)))
    boundaries = sorted(int(m) * steps_per_epoch for m in milestones)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return warmup_start + (1.0 - warmup_start) * step / warmup_steps
        return decay ** sum(step >= b for b in boundaries)

    return factor


def linear_schedule(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warmup to 1 over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


@torch.no_grad()
@torch.no_grad()  # no graph, and no curvature rows captured from evaluation passes
def evaluate_classifier(session: "Session", x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of session.engine over (x, y); each rank scores its shard.

    x: (N, ...) inputs, y: (N,) int64 labels.
    """
    engine = session.engine
    engine.eval()
    idx = torch.tensor(list(session.shard(len(x))), dtype=torch.long)
    loss_sum = correct = 0.0
    for i in range(0, len(idx), batch):
        xb, yb = session.to_device((x[idx[i:i + batch]], y[idx[i:i + batch]]))
        logits = engine(xb).float()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, yb, reduction="sum"))
        correct += float((logits.argmax(1) == yb).sum())
    engine.train()
    loss_sum, correct = session.all_sum(loss_sum, correct)
    return loss_sum / len(x), correct / len(x)
