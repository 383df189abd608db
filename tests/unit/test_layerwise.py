"""Layer-by-layer preconditioning (what ZeRO-2's gradient hooks run, docs/design.md section 3.5):
``precondition_layer`` per layer and micro-batch, then ``finish_layerwise_step`` at the boundary,
equals ``precondition`` with the delayed refresh, in float64; no host read inside the hooks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ds_hylo
from ds_hylo.counters import HostSyncs

STEPS = 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6, bias=False), nn.Tanh(), nn.Linear(6, 3)).double()


def _batches(micro: int):
    gen = torch.Generator().manual_seed(3)
    return [[(torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen))
             for _ in range(micro)] for _ in range(STEPS)]


def _options(mode: str) -> dict:
    extra = {"switch_window": 2} if mode == "hybrid" else {}
    return {"lr": 0.3, "base": "sgd", "momentum": 0.9, "mode": mode, "rank_ratio": 1.0, "update_freq": 2,
            "damping": 0.1, "delayed_refresh": True, **extra}


def _reference(mode: str, micro: int) -> list[list[torch.Tensor]]:
    model = _model()
    opt = ds_hylo.HyLo(model, **_options(mode))
    out = []
    for batch in _batches(micro):
        opt.zero_grad()
        for x, y in batch:
            (nn.functional.cross_entropy(model(x), y) / micro).backward()
        opt.step()
        out.append([p.detach().clone() for p in model.parameters()])
    return out


def _layerwise(mode: str, micro: int) -> tuple[list[list[torch.Tensor]], ds_hylo.HyLo]:
    """As ZeRO-2 does: each micro-batch's gradient is preconditioned per layer, then moved out of .grad
    (DeepSpeed copies it into its buckets and accumulates the reduced partitions)."""
    model = _model()
    opt = ds_hylo.HyLo(model, **_options(mode))
    opt.precondition_in_step = False
    pre = opt.preconditioner
    out = []
    for batch in _batches(micro):
        summed = [torch.zeros_like(p) for p in model.parameters()]
        for x, y in batch:
            for p in model.parameters():
                p.grad = None  # not opt.zero_grad(): that drops the rows of the step's earlier micro-batches
            (nn.functional.cross_entropy(model(x), y) / micro).backward()
            for name in reversed(list(pre.layers)):  # the backward's order
                pre.precondition_layer(name)
            for total, p in zip(summed, model.parameters()):
                total += p.grad
        for total, p in zip(summed, model.parameters()):
            p.grad = total
        pre.finish_layerwise_step(lr=opt.param_groups[0]["lr"])
        opt.step()
        out.append([p.detach().clone() for p in model.parameters()])
    return out, opt


@pytest.mark.parametrize("mode", ["sngd", "kis", "kid", "hybrid"])
@pytest.mark.parametrize("micro", [1, 2])
def test_layerwise_equals_precondition_with_delayed_refresh(mode, micro):
    reference = _reference(mode, micro)
    got, opt = _layerwise(mode, micro)
    for step, (a, b) in enumerate(zip(got, reference)):
        assert max(float((x - y).abs().max()) for x, y in zip(a, b)) < 1e-10, f"step {step}"
    assert opt.stats()["refreshes"] == STEPS // 2


def test_layerwise_preconditions():
    """Guard for the comparison above: with factors, the hooked layer's gradient changes."""
    got, _ = _layerwise("kis", 1)
    model = _model()
    opt = ds_hylo.HyLo(model, **{**_options("kis"), "damping": 1e6})
    for batch in _batches(1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(batch[0][0]), batch[0][1]).backward()
        opt.step()
    assert max(float((x - y.detach()).abs().max()) for x, y in zip(got[-1], model.parameters())) > 1e-3


def test_no_host_read_inside_the_hooks():
    _, opt = _layerwise("kis", 1)  # has factors now
    pre = opt.preconditioner
    model = pre.model
    x, y = _batches(1)[0][0]
    counts = []
    for _ in range(2):  # a refresh step (4), then a step that reuses the factors (5)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        with HostSyncs() as syncs:
            for name in pre.layers:
                pre.precondition_layer(name)
        assert syncs.total() == 0, syncs.counts
        with HostSyncs() as syncs:
            pre.finish_layerwise_step(lr=0.3)
        counts.append(syncs.total())
        opt.step()
    assert counts[1] == 1, counts  # the step's one read; the refresh step adds the refresh's own


def test_non_finite_direction_keeps_the_raw_gradient_and_is_counted():
    _, opt = _layerwise("kis", 1)
    pre = opt.preconditioner
    name = next(iter(pre.factors))
    pre.factors[name].c.fill_(float("nan"))
    model = pre.model
    x, y = _batches(1)[0][0]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    raw = pre.layers[name].gradient_matrix().clone()
    pre.precondition_layer(name)
    assert torch.equal(pre.layers[name].gradient_matrix(), raw)
    before = pre.nonfinite_events
    with pytest.warns(RuntimeWarning, match="non-finite"):
        pre.finish_layerwise_step(lr=0.3)
    assert pre.nonfinite_events == before + 1


def test_finish_refuses_without_the_delayed_refresh():
    opt = ds_hylo.HyLo(_model(), **{**_options("kis"), "delayed_refresh": False})
    with pytest.raises(ValueError, match="delayed_refresh=True"):
        opt.preconditioner.finish_layerwise_step(lr=0.3)


def test_standalone_apply_keeps_one_direction_alive(monkeypatch):
    """Issue 19: the apply's transient is one layer's direction, not every layer's. Standalone (the
    gradients are the reduced ones) each direction is written back before the next is computed."""
    import weakref

    from ds_hylo import kernels

    original = kernels.apply_smw
    alive_at_call: list[int] = []
    outputs: list[weakref.ref] = []

    def recording(*args, **kwargs):
        alive_at_call.append(sum(ref() is not None for ref in outputs))
        out = original(*args, **kwargs)
        outputs.append(weakref.ref(out))
        return out

    monkeypatch.setattr(kernels, "apply_smw", recording)
    model = _model()
    opt = ds_hylo.HyLo(model, **{**_options("kis"), "delayed_refresh": False, "kl_clip": 1e-3})
    for x, y in [b[0] for b in _batches(1)][:2]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert len(alive_at_call) == 2 * 3 and max(alive_at_call) == 0, alive_at_call
