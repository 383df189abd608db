"""delayed_refresh (issue 20): a refresh step's factors come from its own rows and are used from the
next step on; the refresh step itself applies the factors it had (none before the first refresh).

The reference is written from the definition: each step's update is the plain SGD step on
(*) evaluated in float64 with the factors held before that step, and the factors a refresh leaves
are those an immediate-refresh optimizer builds from the same parameters and batch.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ds_hylo
from conftest import rel_err
from ds_hylo import kernels

LR, DAMPING = 0.1, 0.1


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _batches(steps: int):
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(12, 5, generator=gen), torch.randint(0, 3, (12,), generator=gen)) for _ in range(steps)]


def _matrix(layer: nn.Linear, grads: dict) -> torch.Tensor:
    return torch.cat([grads[layer.weight], grads[layer.bias].unsqueeze(1)], dim=1)


@pytest.mark.parametrize("mode", ["sngd", "kis", "kid"])
def test_each_step_uses_the_factors_of_the_refresh_before_it(mode):
    model = _model()
    opt = ds_hylo.HyLo(model, base="sgd", lr=LR, damping=DAMPING, mode=mode, rank_ratio=1.0, update_freq=2,
                       delayed_refresh=True, apply_precision="float64")
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for step, (x, y) in enumerate(_batches(5)):
        held = {name: (f.a.double(), f.g.double(), f.c) for name, f in opt.preconditioner.factors.items()}
        assert bool(held) == (step > 0), step  # no factors before the first refresh has been committed
        before = [(layer.weight.detach().clone(), layer.bias.detach().clone()) for layer in linears]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grads = {p: p.grad.detach().double().clone() for p in model.parameters()}
        opt.step()
        for index, (layer, (w0, b0)) in zip(("0", "2"), zip(linears, before)):
            grad = _matrix(layer, grads)
            if index in held:
                a, g, c = held[index]
                direction = kernels.apply_smw(grad, a, g, c, DAMPING, step_scale=DAMPING)
            else:
                direction = grad
            got = torch.cat([layer.weight.detach() - w0, (layer.bias.detach() - b0).unsqueeze(1)], dim=1)
            assert rel_err(got.double(), -LR * direction) < 1e-5, (mode, step, index)


def test_a_refresh_leaves_the_factors_an_immediate_refresh_builds():
    model = _model()
    opt = ds_hylo.HyLo(model, base="sgd", lr=LR, damping=DAMPING, mode="sngd", update_freq=2, delayed_refresh=True)
    for step, (x, y) in enumerate(_batches(3)):
        twin_model = copy.deepcopy(model)
        twin = ds_hylo.HyLo(twin_model, base="sgd", lr=LR, damping=DAMPING, mode="sngd", update_freq=1)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        nn.functional.cross_entropy(twin_model(x), y).backward()
        opt.step()
        twin.step()
        if step % 2 == 0:  # a refresh step of the delayed optimizer
            for name, f in opt.preconditioner.factors.items():
                t = twin.preconditioner.factors[name]
                assert torch.equal(f.a, t.a) and torch.equal(f.g, t.g) and torch.allclose(f.c, t.c, rtol=1e-12)


def test_delayed_refresh_is_saved_and_resumed_exactly(tmp_path):
    """A checkpoint taken right after a delayed refresh carries the new factors: the resumed run
    takes the same steps as the uninterrupted one."""
    batches = _batches(6)
    options = dict(base="sgd", lr=LR, damping=DAMPING, mode="kis", rank_ratio=0.5, update_freq=2,
                   delayed_refresh=True)

    def run(model, opt, part):
        for x, y in part:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    model = _model()
    opt = ds_hylo.HyLo(model, **options)
    run(model, opt, batches)
    resumed_model = _model()
    resumed = ds_hylo.HyLo(resumed_model, **options)
    run(resumed_model, resumed, batches[:3])
    torch.save({"model": resumed_model.state_dict(), "opt": resumed.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fresh_model = _model()
    fresh_model.load_state_dict(state["model"])
    fresh = ds_hylo.HyLo(fresh_model, **options)
    fresh.load_state_dict(state["opt"])
    run(fresh_model, fresh, batches[3:])
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(p, q)
