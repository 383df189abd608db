"""Loops run inside spawned ranks by tests/distributed/test_nonfinite_agreement.py (issue 22 item 9).

``train_with_poisoned_direction``: 2 ranks on the path DeepSpeed uses (each rank preconditions its
local gradients, ``grads_are_local=True``, then the gradients are averaged and ``step()`` runs the
base update). On the ranks in ``poisoned_ranks``, at step ``poison_step``, layer ``POISONED``'s
preconditioned direction gets one inf entry (``kernels.apply_smw`` is wrapped): its gradient is
finite, only the direction is not. The non-finite fall-back must be one decision for all ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import ds_hylo
from ds_hylo import preconditioner as preconditioner_module

D_IN, HIDDEN, CLASSES, BATCH = 6, 8, 3, 8
POISONED = "0"  # the first Linear: its gradient matrix is (HIDDEN, D_IN + 1)
OPTIONS = dict(base="sgd", lr=0.3, momentum=0.9, mode="kis", rank_ratio=1.0, update_freq=2, damping=0.1)


def _model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES)).to(torch.float64)


def train_with_poisoned_direction(poisoned_ranks: list[int], poison_step: int, steps: int) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model()
    opt = ds_hylo.HyLo(model, **OPTIONS)
    opt.precondition_in_step = False
    state = {"step": -1}
    apply_smw = preconditioner_module.kernels.apply_smw

    def poisoned_apply_smw(raw, *args, **kwargs):
        direction = apply_smw(raw, *args, **kwargs)
        if state["step"] == poison_step and rank in poisoned_ranks and tuple(raw.shape) == (HIDDEN, D_IN + 1):
            direction = direction.clone()
            direction[0, 0] = float("inf")
        return direction

    preconditioner_module.kernels.apply_smw = poisoned_apply_smw
    try:
        gen = torch.Generator().manual_seed(11 + rank)
        for step in range(steps):
            state["step"] = step
            x = torch.randn(BATCH, D_IN, generator=gen, dtype=torch.float64)
            y = torch.randint(0, CLASSES, (BATCH,), generator=gen)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.preconditioner.precondition(lr=opt.param_groups[0]["lr"], grads_are_local=True)
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world  # DeepSpeed's convention: each rank's mean-loss gradient, averaged
            opt.step()
    finally:
        preconditioner_module.kernels.apply_smw = apply_smw
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "nonfinite_events": opt.stats()["nonfinite_events"],
        "refreshes": opt.stats()["refreshes"],
    }
