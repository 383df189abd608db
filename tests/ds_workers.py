"""Training loops run inside spawned ranks by the distributed tests (importable, picklable)."""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

import ds_hylo

GLOBAL_BATCH = 16
IN_FEATURES, HIDDEN, CLASSES = 6, 8, 3


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES)).to(dtype)


def make_batches(steps: int, seed: int = 1, batch: int = GLOBAL_BATCH) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, IN_FEATURES, generator=gen), torch.randint(0, CLASSES, (batch,), generator=gen))
        for _ in range(steps)
    ]


def shard(batch: tuple[torch.Tensor, torch.Tensor], rank: int, world: int, micro: int = 0, num_micro: int = 1):
    """This rank's slice of a global batch, and micro-batch ``micro`` of ``num_micro`` within it."""
    x, y = batch
    per_rank = x.shape[0] // world
    x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
    per_micro = per_rank // num_micro
    return x[micro * per_micro:(micro + 1) * per_micro], y[micro * per_micro:(micro + 1) * per_micro]


def ds_config(hylo_params: dict, stage: int = 1, gas: int = 1, world: int = 2, precision: str = "fp32",
              clip: float = 0.0) -> dict:
    config = {
        "train_batch_size": GLOBAL_BATCH,
        "gradient_accumulation_steps": gas,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // (world * gas),
        "gradient_clipping": clip,
        "optimizer": {"type": "HyLo", "params": hylo_params},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    if precision in ("bf16", "bf16-grads"):
        config["bf16"] = {"enabled": True}
        if stage == 1 and precision == "bf16":  # BF16_Optimizer (fp32 accumulation); else bf16 grads
            config["data_types"] = {"grad_accum_dtype": "fp32"}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 1000}
    return config


def engine_params(engine: Any) -> list[torch.Tensor]:
    """Copies of the engine's parameters at their full shapes (gathered under ZeRO-3, whose module
    holds (0,) placeholders outside forward)."""
    params = list(engine.module.parameters())
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().clone() for p in params]
    return [p.detach().clone() for p in params]


def train_deepspeed(config: dict, steps: int, seed: int = 0, zero_init: bool = False) -> dict[str, Any]:
    """Train with ds_hylo.initialize on this rank's shard; return final params and per-step losses.
    ``zero_init``: build the model inside ``deepspeed.zero.Init`` (ZeRO-3: partitioned from the start)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if zero_init:
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=config):
            model = make_model(seed)
    else:
        model = make_model(seed)
    engine, _, _, _ = ds_hylo.initialize(model=model, config=copy.deepcopy(config))
    gas = engine.gradient_accumulation_steps()
    dtype = next(engine.module.parameters()).dtype
    losses, params_per_step = [], []
    for batch in make_batches(steps):
        for micro in range(gas):
            x, y = shard(batch, rank, world, micro, gas)
            loss = nn.functional.cross_entropy(engine(x.to(dtype)).float(), y)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        params_per_step.append([p.float() for p in engine_params(engine)])
    return {"params": params_per_step, "losses": losses, "stats": engine.hylo.stats()}


def train_reference(hylo_params: dict, steps: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """Single process, no DeepSpeed: HyLo on the whole global batch."""
    model = make_model(seed)
    opt = ds_hylo.HyLo(model, **hylo_params)
    params_per_step = []
    for x, y in make_batches(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        params_per_step.append([p.detach().clone() for p in model.parameters()])
    return params_per_step


def deepspeed_suite(cases: dict[str, dict], steps: int) -> dict[str, dict[str, Any]]:
    """Run several DeepSpeed configs in one process (one spawn is the expensive part)."""
    return {name: train_deepspeed(config, steps, zero_init=name.endswith("zero-init")) for name, config in cases.items()}


def train_torch_distributed(hylo_params: dict, steps: int, use_ddp: bool, seed: int = 0) -> list[list[torch.Tensor]]:
    """Standalone HyLo over plain torch.distributed (manual gradient averaging) or DDP."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model(seed)
    opt = ds_hylo.HyLo(model, **hylo_params)
    net = nn.parallel.DistributedDataParallel(model) if use_ddp else model
    params_per_step = []
    for batch in make_batches(steps):
        x, y = shard(batch, rank, world)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        if not use_ddp:
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        params_per_step.append([p.detach().clone() for p in model.parameters()])
    return params_per_step


def torch_distributed_suite(hylo_params_by_mode: dict[str, dict], steps: int) -> dict[str, Any]:
    return {
        (mode, use_ddp): train_torch_distributed(hp, steps, use_ddp)
        for mode, hp in hylo_params_by_mode.items()
        for use_ddp in (False, True)
    }


def hylo_state_snapshot(engine: Any) -> dict[str, Any]:
    p = engine.hylo.preconditioner
    return {
        "steps": p.steps,
        "refreshes": p.refreshes,
        "factors": {n: (f.a.clone(), f.g.clone(), f.c.clone()) for n, f in p.factors.items()},
    }


def skipped_step_run(config: dict, steps: int, bad_step: int) -> dict[str, Any]:
    """Train, injecting a non-finite loss before step ``bad_step``: DeepSpeed skips that step."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model(0)
    engine, _, _, _ = ds_hylo.initialize(model=model, config=copy.deepcopy(config))
    before = after = None
    for i, batch in enumerate(make_batches(steps)):
        x, y = shard(batch, rank, world)
        x = x.to(next(engine.module.parameters()).dtype)
        if i == bad_step:
            before = hylo_state_snapshot(engine)
            loss = nn.functional.cross_entropy(engine(x).float(), y) * float("inf")
            engine.backward(loss)
            engine.step()
            after = hylo_state_snapshot(engine)
        loss = nn.functional.cross_entropy(engine(x).float(), y)
        engine.backward(loss)
        engine.step()
    return {
        "params": engine_params(engine),
        "before": before,
        "after": after,
        "skipped": engine.skipped_steps,
    }


def checkpoint_run(config: dict, steps: int, save_at: int, ckpt_dir: str) -> dict[str, Any]:
    """Uninterrupted run that saves at ``save_at``; then a fresh engine loads and continues."""
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = make_batches(steps)

    def run(engine: Any, batch_list: list) -> None:
        for batch in batch_list:
            x, y = shard(batch, rank, world)
            engine.backward(nn.functional.cross_entropy(engine(x), y))
            engine.step()

    engine, _, _, _ = ds_hylo.initialize(model=make_model(0), config=copy.deepcopy(config))
    run(engine, batches[:save_at])
    engine.save_checkpoint(ckpt_dir, tag="ckpt")
    run(engine, batches[save_at:])
    uninterrupted = engine_params(engine)

    resumed_engine, _, _, _ = ds_hylo.initialize(model=make_model(123), config=copy.deepcopy(config))
    resumed_engine.load_checkpoint(ckpt_dir, tag="ckpt")
    run(resumed_engine, batches[save_at:])
    resumed = engine_params(resumed_engine)
    return {"uninterrupted": uninterrupted, "resumed": resumed}


def _deterministic_labels(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Stand-in sampler for the fisher="sampled" comparisons: a function of each row's logits only,
    so one process and two ranks (which seed their samplers differently) draw the same labels."""
    return logits.detach().argmin(dim=-1)


def train_sampled_fisher(hylo_params: dict, steps: int, config: Any = None, seed: int = 0) -> list[list[torch.Tensor]]:
    """fisher="sampled" training: under DeepSpeed (``config`` given, this rank's shard) or in one process."""
    import ds_hylo.fisher

    original_sampler = ds_hylo.fisher.sample_labels
    ds_hylo.fisher.sample_labels = _deterministic_labels
    try:
        return _train_sampled_fisher(hylo_params, steps, config, seed)
    finally:  # the reference runs inside the pytest process: leave the sampler as found
        ds_hylo.fisher.sample_labels = original_sampler


def _train_sampled_fisher(hylo_params: dict, steps: int, config: Any, seed: int) -> list[list[torch.Tensor]]:
    model = make_model(seed)
    if config is None:
        opt = ds_hylo.HyLo(model, **hylo_params)
        forward, hylo, gas, rank, world = model, opt, 1, 0, 1
    else:
        engine, _, _, _ = ds_hylo.initialize(model=model, config=copy.deepcopy(config))
        forward, hylo, gas = engine, engine.hylo, engine.gradient_accumulation_steps()
        rank, world = dist.get_rank(), dist.get_world_size()
    params_per_step = []
    for batch in make_batches(steps):
        for micro in range(gas):
            x, y = shard(batch, rank, world, micro, gas)
            logits = forward(x)
            hylo.sample_fisher(logits)
            loss = nn.functional.cross_entropy(logits, y)
            if config is None:
                opt.zero_grad()
                loss.backward()
                opt.step()
            else:
                engine.backward(loss)
                engine.step()
        params_per_step.append([p.detach().float().clone() for p in model.parameters()])
    return params_per_step


def sampled_fisher_suite(cases: dict[str, dict], hylo_params: dict, steps: int) -> dict[str, Any]:
    return {name: train_sampled_fisher(hylo_params, steps, config) for name, config in cases.items()}


def sampled_fisher_from_derived_tensor(config: dict) -> str:
    """sample_fisher on a tensor computed from the engine's output: the error message, or "" if none."""
    model = make_model(0)
    engine, _, _, _ = ds_hylo.initialize(model=model, config=copy.deepcopy(config))
    x, _ = shard(make_batches(1)[0], dist.get_rank(), dist.get_world_size())
    try:
        engine.hylo.sample_fisher(engine(x) * 1.0)
    except RuntimeError as exc:
        return str(exc)
    return ""


class _Records(logging.Handler):
    """Collects the messages logged to one logger."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _capture(name: str) -> tuple[_Records, int]:
    handler, log = _Records(), logging.getLogger(name)
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler, level


def initialize_logs(config: dict) -> dict[str, Any]:
    """DeepSpeed's and ds_hylo's log messages from ds_hylo.initialize, and, as a control, from a plain
    deepspeed.initialize given HyLo as client optimizer under the same ZeRO config."""
    import deepspeed

    from ds_hylo.deepspeed import split_hylo_config

    ds_records, ds_level = _capture("DeepSpeed")
    hylo_records, hylo_level = _capture("ds_hylo")
    filters_before = list(logging.getLogger("DeepSpeed").filters)
    try:
        ds_hylo.initialize(model=make_model(0), config=copy.deepcopy(config))
        result = {"deepspeed": list(ds_records.messages), "ds_hylo": list(hylo_records.messages),
                  "filters_left": logging.getLogger("DeepSpeed").filters != filters_before}
        ds_records.messages.clear()
        ds_config_out, params = split_hylo_config(copy.deepcopy(config))
        model = make_model(0)
        deepspeed.initialize(model=model, optimizer=ds_hylo.HyLo(model, **params), config=ds_config_out)
        result["control"] = list(ds_records.messages)
    finally:
        logging.getLogger("DeepSpeed").removeHandler(ds_records)
        logging.getLogger("DeepSpeed").setLevel(ds_level)
        logging.getLogger("ds_hylo").removeHandler(hylo_records)
        logging.getLogger("ds_hylo").setLevel(hylo_level)
    return result


def checkpoint_faults(config: dict, steps: int, ckpt_dir: str) -> dict[str, Any]:
    """One engine saves tags "a" (after ``steps`` steps) and "b" (after ``2 * steps``); then
    checkpoints with mixed, damaged, old-format or missing HyLo files are loaded into it, and a
    crash while HyLo's state is being saved under a new tag is simulated. Returns what each load
    said ("" = loaded)."""
    import ds_hylo.deepspeed as glue

    rank, world = dist.get_rank(), dist.get_world_size()
    root = Path(ckpt_dir)
    name = glue.STATE_FILE.format(rank=rank)
    engine, _, _, _ = ds_hylo.initialize(model=make_model(0), config=copy.deepcopy(config))

    def run(count: int) -> None:
        for batch in make_batches(count):
            x, y = shard(batch, rank, world)
            engine.backward(nn.functional.cross_entropy(engine(x), y))
            engine.step()

    def load(tag: Any = None) -> str:
        try:
            engine.load_checkpoint(str(root), tag=tag)
        except Exception as exc:  # the message is the result
            return f"{type(exc).__name__}: {exc}"
        return ""

    def variant(source: str, tag: str, state_file: Any) -> str:
        """Copy tag ``source`` to ``tag`` with its HyLo file replaced (bytes, a path to copy, or None: removed)."""
        shutil.copytree(root / source, root / tag)
        target = root / tag / name
        if state_file is None:
            target.unlink()
        elif isinstance(state_file, bytes):
            target.write_bytes(state_file)
        else:
            shutil.copyfile(state_file, target)
        return str(target)

    run(steps)
    engine.save_checkpoint(str(root), tag="a")
    run(steps)
    engine.save_checkpoint(str(root), tag="b")
    saved = torch.load(root / "b" / name, weights_only=True)
    good = (root / "b" / name).read_bytes()
    result: dict[str, Any] = {
        "saved": {k: v for k, v in saved.items() if k != "hylo"},
        "saved_hylo_steps": saved.get("hylo", saved)["steps"],
        "temporary_files": sorted(p.name for p in root.rglob("*") if p.name.endswith(".tmp")),
        "files": {},
        "loads": {},
    }
    legacy = root / "legacy_state.pt"
    torch.save(saved.get("hylo", saved), legacy)  # the format before the step stamp: the bare preconditioner state
    cases = {
        "hylo_behind": ("b", root / "a" / name),  # DeepSpeed at 2*steps, HyLo at steps
        "hylo_ahead": ("a", root / "b" / name),  # DeepSpeed at steps, HyLo at 2*steps
        "empty": ("b", b""),
        "truncated": ("b", good[: len(good) // 2]),
        "garbage": ("b", b"this is not a checkpoint"),
        "legacy": ("b", legacy),
        "missing": ("b", None),
    }
    for tag, (source, state_file) in cases.items():
        result["files"][tag] = variant(source, tag, state_file)
        result["loads"][tag] = load(tag)
    result["loads"]["b"] = load("b")
    result["after_clean_load"] = {"global_steps": engine.global_steps, "hylo_steps": engine.hylo.preconditioner.steps}

    original_save = torch.save

    def crash_on_hylo_file(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if "hylo_state" in str(getattr(f, "name", f)):
            raise OSError("simulated crash while HyLo writes its state")
        original_save(obj, f, *args, **kwargs)

    torch.save = crash_on_hylo_file  # every torch.save in this process, DeepSpeed's included
    try:
        engine.save_checkpoint(str(root), tag="c")
    except OSError as exc:
        result["crash"] = str(exc)
    finally:
        torch.save = original_save
    result["temporary_files_after_crash"] = sorted(p.name for p in root.rglob("*") if p.name.endswith(".tmp"))
    result["latest_after_crash"] = (root / "latest").read_text().strip()
    result["loads"]["latest_after_crash"] = load()
    return result


class ActivationCheckpointed(nn.Module):
    """make_model's shape with its first two layers under torch.utils.checkpoint (LLM fine-tuning's
    gradient checkpointing): the backward recomputes them, in a second phase when reentrant."""

    def __init__(self, reentrant: bool, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.reentrant = reentrant
        self.first, self.second = nn.Linear(IN_FEATURES, HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def _block(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.second(torch.tanh(self.first(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        return self.head(checkpoint(self._block, x.requires_grad_(self.reentrant), use_reentrant=self.reentrant))


def train_checkpointed(config: dict, steps: int, reentrant: bool) -> list[list[torch.Tensor]]:
    """ActivationCheckpointed under ds_hylo.initialize(config) on this rank's shard, or, outside a
    process group, standalone HyLo with the config's HyLo params and the delayed refresh on the
    whole global batch (the reference)."""
    model = ActivationCheckpointed(reentrant)
    out = []
    if not dist.is_initialized():
        opt = ds_hylo.HyLo(model, **{**config["optimizer"]["params"], "delayed_refresh": True})
        for x, y in make_batches(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            out.append([p.detach().clone() for p in model.parameters()])
        return out
    rank, world = dist.get_rank(), dist.get_world_size()
    engine, _, _, _ = ds_hylo.initialize(model=model, config=copy.deepcopy(config))
    for batch in make_batches(steps):
        x, y = shard(batch, rank, world)
        engine.backward(nn.functional.cross_entropy(engine(x), y))
        engine.step()
        out.append(engine_params(engine))
    return out


def partitioned_suite(cases: dict[str, dict], steps: int, checkpoint_configs: dict[str, dict],
                      skip_configs: dict[str, dict], ckpt_dir: str,
                      checkpointed: Optional[dict[str, tuple[dict, bool]]] = None) -> dict[str, Any]:
    """The ZeRO-2/3 cases of one spawn: training runs, checkpoint save/resume, skipped-step runs and
    activation-checkpointed runs (name -> (config, reentrant))."""
    results: dict[str, Any] = deepspeed_suite(cases, steps)
    for name, (config, reentrant) in (checkpointed or {}).items():
        results[name] = train_checkpointed(config, steps, reentrant)
    for name, config in checkpoint_configs.items():
        results[name] = checkpoint_run(config, 6, 3, f"{ckpt_dir}/{name}")
    for name, config in skip_configs.items():
        results[name] = (skipped_step_run(config, 5, bad_step=-1), skipped_step_run(config, 5, bad_step=2))
    return results
