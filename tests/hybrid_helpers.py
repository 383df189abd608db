"""Helpers shared by the hybrid-policy tests (unit and 2-rank): drive a policy, a tiny model."""

from __future__ import annotations

import torch
from torch import nn

from ds_hylo import HyLo
from ds_hylo.switching import ModePolicy, SwitchEvent



def drive(policy: ModePolicy, norms: dict[str, list[float]], lrs=None, reduce_mean=None, discard=()) -> list[dict]:
    """Feed per-step norms (and learning rates) through observe/end_step like the preconditioner does.

    Returns, per step, the modes the policy gave for that step's refresh (queried after
    ``observe_lr``, before ``end_step``, as in ``Preconditioner.precondition``). Steps listed in
    ``discard`` are first preconditioned with garbage (norm 1e9, lr 1e-9) and skipped.
    """
    layers = list(norms)
    steps = len(norms[layers[0]])
    seen = []
    for step in range(steps):
        if step in discard:
            policy.observe_lr(1e-9)
            for name in layers:
                policy.observe(name, 1e9)
            policy.discard_step()
        if lrs is not None:
            policy.observe_lr(lrs[step])
        seen.append({name: policy.mode_for(name, step) for name in layers})
        for name in layers:
            policy.observe(name, norms[name][step])
        policy.end_step(step, reduce_mean)
    return seen


def per_step(window_sums: list[float], window: int) -> list[float]:
    """Spread each window sum evenly over its steps."""
    return [s / window for s in window_sums for _ in range(window)]


def modes_from_history(history: list[SwitchEvent], layers: list[str], steps: int) -> list[dict[str, str]]:
    """The per-step modes a switch history implies."""
    current = {name: None for name in layers}
    out = []
    events = sorted(history, key=lambda e: e.step)
    for step in range(steps):
        for e in events:
            if e.step == step:
                for name in layers if e.layer == "*" else [e.layer]:
                    current[name] = e.mode
        out.append(dict(current))
    return out


def feed_lr(opt: HyLo) -> None:
    """Give the policy this step's learning rate before ``opt.step()``.

    Idempotent: harmless once ``Preconditioner.precondition`` calls ``policy.observe_lr(lr)``
    itself (see test_preconditioner_feeds_the_learning_rate_to_the_policy).
    """
    opt.preconditioner.policy.observe_lr(opt.param_groups[0]["lr"])


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def tiny_batches(steps: int, seed: int = 1, batch: int = 16):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 6, generator=gen), torch.randint(0, 3, (batch,), generator=gen)) for _ in range(steps)]


