"""Rows and steps that do not line up (issue 12 item 4): skipped steps, zero_grad placement, extra
passes, a step() that never comes, layers used only between refreshes."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from conftest import MLP, cross_entropy
import ds_hylo

DT = torch.float64
OPTIONS = dict(lr=0.1, base="sgd", momentum=0.9, mode="kis", rank_ratio=0.5, update_freq=2, damping=0.3)


def _batches(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(12, 5, generator=gen, dtype=DT), torch.randint(0, 3, (12,), generator=gen)) for _ in range(n)]


def _pair(**extra):
    torch.manual_seed(0)
    model = MLP(5, 4, 3).to(DT)
    twin = copy.deepcopy(model)
    return (model, ds_hylo.HyLo(model, **OPTIONS, **extra)), (twin, ds_hylo.HyLo(twin, **OPTIONS, **extra))


def _forward(model, opt, x):
    logits = model(x)
    opt.sample_fisher(logits)
    return logits


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_a_skipped_batch_leaves_no_rows_behind(fisher):
    """backward, then the loop skips the step (zero_grad and continue): the next refresh equals a
    run that never saw that batch (today's main: parameters 6e-3 off)."""
    (model, opt), (twin, twin_opt) = _pair(fisher=fisher)
    skipped, *batches = _batches(4)
    opt.zero_grad()
    cross_entropy(_forward(model, opt, skipped[0]), skipped[1]).backward()
    opt.zero_grad()  # e.g. the loss was NaN: skip this batch
    for x, y in batches:
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            cross_entropy(_forward(m, o, x), y).backward()
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert opt.preconditioner.refreshes == twin_opt.preconditioner.refreshes == 2


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_zero_grad_between_forward_and_backward_keeps_the_rows(fisher):
    """forward; zero_grad; backward; step (a common loop) equals zero_grad; forward; backward; step."""
    (model, opt), (twin, twin_opt) = _pair(fisher=fisher)
    for x, y in _batches(3):
        logits = _forward(model, opt, x)
        opt.zero_grad()
        cross_entropy(logits, y).backward()
        opt.step()
        twin_opt.zero_grad()
        cross_entropy(_forward(twin, twin_opt, x), y).backward()
        twin_opt.step()
    assert opt.preconditioner.refreshes == 2
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_an_extra_pass_inside_no_capture_changes_nothing():
    """An extra autograd.grad pass on a refresh step doubles the rows unless it runs in no_capture()."""
    (model, opt), (twin, twin_opt) = _pair()
    for x, y in _batches(2):
        opt.zero_grad()
        with opt.no_capture():
            extra = model(x).pow(2).sum()
            torch.autograd.grad(extra, list(model.parameters()))
        cross_entropy(model(x), y).backward()
        rows = {name: layer.num_rows for name, layer in opt.preconditioner.layers.items()}
        opt.step()
        twin_opt.zero_grad()
        cross_entropy(twin(x), y).backward()
        twin_opt.step()
    assert rows == {"fc1": 0, "fc2": 0} or all(v in (0, 12) for v in rows.values())
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_rows_stay_bounded_when_step_is_never_called():
    """HF Trainer under DeepSpeed can replace the optimizer: HyLo's hooks must not grow without end."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3)).to(DT)
    opt = ds_hylo.HyLo(model, **OPTIONS, max_captured_mib=0.05)  # ~100 rows of width 64+65
    gen = torch.Generator().manual_seed(0)
    with pytest.warns(RuntimeWarning, match="further passes are not captured"):
        for _ in range(40):
            x = torch.randn(16, 64, generator=gen, dtype=DT)
            model(x).sum().backward()  # no step(), no zero_grad()
    for layer in opt.preconditioner.layers.values():
        assert layer.held_rows <= layer.max_rows < 40 * 16


def test_a_layer_used_only_between_refreshes_is_reported():
    class Sometimes(nn.Module):
        def __init__(self):
            super().__init__()
            self.always = nn.Linear(5, 3)
            self.odd = nn.Linear(3, 3)

        def forward(self, x, use_odd):
            h = self.always(x)
            return self.odd(h) if use_odd else h

    torch.manual_seed(0)
    model = Sometimes().to(DT)
    opt = ds_hylo.HyLo(model, **{**OPTIONS, "update_freq": 2})
    caught = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, (x, y) in enumerate(_batches(4)):
            opt.zero_grad()
            cross_entropy(model(x, use_odd=step % 2 == 1), y).backward()  # odd runs on steps 1, 3 only
            opt.step()
    messages = [str(w.message) for w in caught if "never preconditioned" in str(w.message)]
    assert len(messages) == 1 and "'odd'" in messages[0], messages
    assert "odd" not in opt.preconditioner.factors


@pytest.mark.parametrize("mode", ["sngd", "kis", "kid", "hybrid"])
@pytest.mark.parametrize("shape", [(0, 5), (0, 4, 5), (0, 2, 8, 8)], ids=["linear", "sequence", "conv"])
def test_an_empty_batch_steps_cleanly(mode, shape):
    """A ragged last batch can be empty on a rank: capture, refresh and apply must take 0 rows."""
    torch.manual_seed(0)
    if len(shape) == 4:
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3)).to(DT)
    else:
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    opt = ds_hylo.HyLo(model, **{**OPTIONS, "mode": mode, "update_freq": 1})
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(*shape, dtype=DT)).sum().backward()
    opt.step()
    assert opt.preconditioner.refreshes == 0
    for p, q in zip(model.parameters(), before):
        assert torch.isfinite(p).all() and torch.equal(p, q)  # zero gradient, no momentum yet: no move


# ------------------------------------------------------------------ suspended HyLo (DeepSpeed start-up)
def _snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_suspended_step_on_zero_gradients_is_a_no_op():
    """What DeepSpeed's wrappers do while they initialise: step() on zero gradients; with weight decay
    a real step would move the weights, a suspended one does not, and resuming starts afresh."""
    torch.manual_seed(0)
    model = MLP(5, 4, 3).to(DT)
    opt = ds_hylo.HyLo(model, **OPTIONS, weight_decay=0.1)
    before = _snapshot(model)
    opt.suspended = True
    for _ in range(ds_hylo.optimizer.MAX_SUSPENDED_STEPS - 1):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        assert opt.step() is None
    opt.zero_grad()
    opt.step()  # no gradients at all: nothing to lose either
    opt.suspended = False
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(model)))
    assert opt.stats()["step"] == 0


def test_suspended_step_on_real_gradients_raises():
    """A training step on a HyLo the integration never resumed used to be dropped silently."""
    torch.manual_seed(0)
    model = MLP(5, 4, 3).to(DT)
    opt = ds_hylo.HyLo(model, **OPTIONS)
    opt.suspended = True
    before = _snapshot(model)
    x, y = _batches(1)[0]
    cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"called while HyLo is suspended, on non-zero gradients") as info:
        opt.step()
    assert "set hylo.suspended = False" in str(info.value) and "create_scheduler" in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(model)))
    opt.suspended = False  # resumed: the same step goes through
    opt.step()
    assert opt.stats()["step"] == 1 and not all(torch.equal(a, b) for a, b in zip(before, _snapshot(model)))


def test_many_suspended_steps_raise_and_resuming_restarts_the_count():
    torch.manual_seed(0)
    model = MLP(5, 4, 3).to(DT)
    opt = ds_hylo.HyLo(model, **OPTIONS)
    limit = ds_hylo.optimizer.MAX_SUSPENDED_STEPS
    opt.suspended = True
    for _ in range(limit):
        opt.step()
    opt.suspended = True  # set again (a second deepspeed.initialize): the count starts over
    for _ in range(limit):
        opt.step()
    with pytest.raises(RuntimeError, match=rf"called {limit + 1} times while HyLo is suspended"):
        opt.step()
    with pytest.raises(TypeError, match="must be a bool"):
        opt.suspended = 1


def test_backward_into_an_attached_engine_while_suspended_raises():
    """Under DeepSpeed the first training backward reaches the engine's gradient reduction, where
    HyLo preconditions: still suspended there means every step() would be skipped."""
    pytest.importorskip("deepspeed")
    from types import SimpleNamespace

    from ds_hylo.deepspeed import attach

    torch.manual_seed(0)
    model = MLP(5, 4, 3).to(DT)
    opt = ds_hylo.HyLo(model, **OPTIONS)
    reduced = []
    engine = SimpleNamespace(
        zero_optimization_stage=lambda: 1, enable_backward_allreduce=True, optimizer=object(), global_rank=1,
        allreduce_gradients=lambda *a, **k: reduced.append(True), is_gradient_accumulation_boundary=lambda: False,
        _backward_prologue=lambda *a, **k: None, save_checkpoint=lambda *a, **k: None,
        load_checkpoint=lambda *a, **k: (None, None),
    )
    attach(engine, opt)
    engine.allreduce_gradients()
    assert reduced == [True]
    opt.suspended = True
    with pytest.raises(RuntimeError, match="reached DeepSpeed's gradient reduction while HyLo is still suspended"):
        engine.allreduce_gradients()
    assert reduced == [True]
