"""Loops run inside spawned ranks by tests/distributed/test_groups.py (issue 20).

- ``train_two_groups``: 4 ranks as 2 data-parallel groups ({0, 1}, {2, 3}) x 2 "model-parallel"
  groups ({0, 2}, {1, 3}). Each data-parallel group trains its own model on its own data with
  ``HyLo(model, process_group=dp_group)`` and averages gradients inside the group; a collective on
  the model-parallel group runs every step beside them. Rows must only travel inside a
  data-parallel group: each group's run equals one process on the group's whole batch.
- ``train_local_gradients``: 2 ranks on the path DeepSpeed uses (each rank preconditions its local
  gradients before the average, ``grads_are_local=True``), with a layer unused on rank 1, with KL
  clipping and grafting; and the same on the path DDP uses (average, then precondition).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import ds_hylo

D_IN, HIDDEN, CLASSES, GROUP_BATCH = 6, 8, 3, 16


def group_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))


def group_batches(group: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(50 + group)
    return [(torch.randn(GROUP_BATCH, D_IN, generator=gen), torch.randint(0, CLASSES, (GROUP_BATCH,), generator=gen))
            for _ in range(steps)]


def train_group_reference(group: int, options: dict, steps: int) -> list[list[torch.Tensor]]:
    """One process on the data-parallel group's whole batches."""
    model = group_model(seed=group)
    opt = ds_hylo.HyLo(model, **options)
    out = []
    for x, y in group_batches(group, steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        out.append([p.detach().clone() for p in model.parameters()])
    return out


def train_two_groups(cases: dict[str, dict], steps: int) -> dict[str, Any]:
    rank = dist.get_rank()
    dp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    group, local = divmod(rank, 2)
    dp_group, mp_group = dp_groups[group], mp_groups[local]
    results: dict[str, Any] = {}
    for name, options in cases.items():
        model = group_model(seed=group)
        opt = ds_hylo.HyLo(model, process_group=dp_group, **options)
        params = []
        half = GROUP_BATCH // 2
        for x, y in group_batches(group, steps):
            x, y = x[local * half:(local + 1) * half], y[local * half:(local + 1) * half]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            for p in model.parameters():
                dist.all_reduce(p.grad, group=dp_group)
                p.grad /= 2
            marker = torch.ones(1)
            dist.all_reduce(marker, group=mp_group)  # the model-parallel peers talk in between
            opt.step()
            params.append([p.detach().clone() for p in model.parameters()])
        results[name] = {"params": params, "group": group, "bytes": dict(opt.preconditioner.bytes_sent()),
                         "refreshes": opt.stats()["refreshes"]}
    return results


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(D_IN, HIDDEN)
        self.branch = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor, use_branch: bool) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        if use_branch:
            h = h + torch.tanh(self.branch(h))
        return self.head(h)


def train_local_gradients(cases: dict[str, dict], steps: int) -> dict[str, Any]:
    """Each case on both paths: "local" (precondition, then average: DeepSpeed's order) and
    "averaged" (average, then precondition: DDP's). Rank 1 never uses ``branch``."""
    rank, world = dist.get_rank(), dist.get_world_size()
    results: dict[str, Any] = {}
    for name, options in cases.items():
        for path in ("local", "averaged"):
            model = Branchy()
            opt = ds_hylo.HyLo(model, **options)
            opt.precondition_in_step = path == "averaged"
            gen = torch.Generator().manual_seed(7 + rank)
            params = []
            for _ in range(steps):
                x, y = torch.randn(8, D_IN, generator=gen), torch.randint(0, CLASSES, (8,), generator=gen)
                opt.zero_grad()
                nn.functional.cross_entropy(model(x, use_branch=rank == 0), y).backward()
                if path == "local":
                    opt.preconditioner.precondition(lr=opt.param_groups[0]["lr"], grads_are_local=True)
                for p in model.parameters():
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
                    p.grad /= world  # DeepSpeed's convention: each rank's mean-loss gradient, averaged
                opt.step()
                params.append([p.detach().clone() for p in model.parameters()])
            results[(name, path)] = {"params": params, "refreshes": opt.stats()["refreshes"],
                                     "kl_scale": opt.stats()["kl_scale"]}
    return results
