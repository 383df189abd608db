"""Loops run inside spawned ranks by tests/distributed/test_disagreement.py: ranks whose captured rows differ.

Two situations users meet (issue 10): a layer used on some ranks only at a refresh step
(mixture-of-experts routing, LayerDrop, a branch) and a rank with an empty local batch (ragged last
batch). Every loop returns the final parameters and HyLo's factors, so the test can check that the
ranks agree.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

import ds_hylo

IN_FEATURES, HIDDEN, CLASSES = 6, 8, 3
BATCH = 8


class Branchy(nn.Module):
    """trunk -> (branch only where ``use_branch``) -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(IN_FEATURES, HIDDEN)
        self.branch = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor, use_branch: bool = True) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        if use_branch:
            h = h + torch.tanh(self.branch(h))
        return self.head(h)


def _batches(steps: int, rank: int, empty_at: Optional[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(100 + rank)
    out = []
    for step in range(steps):
        size = 0 if (empty_at == step and rank == 1) else BATCH
        out.append((torch.randn(size, IN_FEATURES, generator=gen), torch.randint(0, CLASSES, (size,), generator=gen)))
    return out


def _loss(logits: torch.Tensor, y: torch.Tensor, global_count: int) -> torch.Tensor:
    """Sum over this rank's samples / samples over all ranks: finite on an empty batch."""
    return nn.functional.cross_entropy(logits, y, reduction="sum") / global_count


def _uses_branch(rank: int, step: int, scenario: str) -> bool:
    return not (scenario == "branch" and rank == 1)


def _result(model: nn.Module, pre: Any) -> dict[str, Any]:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "factors": {n: (f.a.clone(), f.g.clone(), f.c.clone()) for n, f in pre.factors.items()},
        "refreshes": pre.refreshes,
        "contributed": pre.contributed_refreshes,
    }


def train_ddp(scenario: str, mode: str, steps: int = 4) -> dict[str, Any]:
    """Standalone HyLo under DDP; scenario "branch" (layer unused on rank 1) or "empty" (rank 1's
    batch empty at step 0, a refresh step)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = Branchy()
    rotation = {"contributing_ranks": 1, "update_freq": 1} if scenario == "rotation" else {"update_freq": 2}
    opt = ds_hylo.HyLo(model, lr=0.1, base="sgd", momentum=0.9, mode=mode, rank_ratio=0.5, damping=0.1, **rotation)
    net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=scenario == "branch")
    empty_at = 0 if scenario == "empty" else None
    for step, (x, y) in enumerate(_batches(steps, rank, empty_at)):
        opt.zero_grad()
        global_count = BATCH * world - (BATCH if empty_at == step else 0)
        _loss(net(x, _uses_branch(rank, step, scenario)), y, global_count).backward()
        opt.step()
    return _result(model, opt.preconditioner)


def train_deepspeed(scenario: str, mode: str, steps: int = 4, optimizer: str = "HyLo") -> dict[str, Any]:
    """The same under ds_hylo.initialize with ZeRO-1 (DeepSpeed averages the gradients)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = Branchy()
    config = {
        "train_batch_size": BATCH * world,
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_clipping": 0.0,
        "optimizer": {"type": "HyLo", "params": {"lr": 0.1, "base": "sgd", "momentum": 0.9, "mode": mode, "rank_ratio": 0.5,
                                                  "update_freq": 2, "damping": 0.1}},
        "zero_optimization": {"stage": 1},
        "steps_per_print": 10**9,
    }
    if optimizer != "HyLo":
        config["optimizer"] = {"type": optimizer, "params": {"lr": 0.1}}
        config["zero_allow_untested_optimizer"] = True
    engine, _, _, _ = ds_hylo.initialize(model=model, config=copy.deepcopy(config))
    empty_at = 0 if scenario == "empty" else None
    for step, (x, y) in enumerate(_batches(steps, rank, empty_at)):
        global_count = BATCH * world - (BATCH if empty_at == step else 0)
        # DeepSpeed averages over ranks; the loss is written as a sum over all samples / global count.
        loss = _loss(engine(x, _uses_branch(rank, step, scenario)), y, global_count) * world
        engine.backward(loss)
        engine.step()
    if optimizer != "HyLo":
        return {"params": {n: p.detach().clone() for n, p in engine.module.named_parameters()}}
    return _result(engine.module, engine.hylo.preconditioner)


def train_default_device(mode: str, default_device: Optional[str], steps: int = 4) -> dict[str, Any]:
    """Standalone HyLo on 2 ranks (manual gradient averaging), with ``torch.set_default_device``
    set to ``default_device`` after the model and data are made: results must not change."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = Branchy()
    batches = _batches(steps, rank, None)
    hybrid = {"switch_window": 2} if mode == "hybrid" else {}  # a hybrid-mode option (refused otherwise)
    opt = ds_hylo.HyLo(model, lr=0.1, base="sgd", momentum=0.9, mode=mode, rank_ratio=0.5, update_freq=2, damping=0.1,
                       kl_clip=1.0 if mode == "hybrid" else None, **hybrid)
    previous = torch.get_default_device()
    if default_device is not None:
        torch.set_default_device(default_device)
    try:
        for x, y in batches:
            opt.zero_grad()
            _loss(model(x), y, BATCH * world).backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
            opt.step()
    finally:
        torch.set_default_device(previous)
    return _result(model, opt.preconditioner)


def ddp_suite(cases: list[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Several (scenario, mode) DDP runs in one spawn (the spawn is the expensive part)."""
    return {case: train_ddp(*case) for case in cases}


def deepspeed_suite(modes: list[str]) -> dict[str, dict[str, Any]]:
    return {mode: train_deepspeed("empty", mode) for mode in modes}


def default_device_suite(modes: list[str]) -> dict[tuple[str, Optional[str]], dict[str, Any]]:
    return {(mode, device): train_default_device(mode, device) for mode in modes for device in (None, "meta")}
