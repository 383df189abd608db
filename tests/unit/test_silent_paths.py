"""Paths that used to go silently wrong (issue 22, "No surprises"): a layer frozen when HyLo was built
and unfrozen later, a param group added after construction, an extra autograd.grad pass."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from conftest import cross_entropy
import ds_hylo

DT = torch.float64
# SGD without momentum and a refresh every step: each step depends only on the parameters and the
# batch, so a run can be compared with a HyLo built at any point of another one
OPTIONS = dict(lr=0.2, base="sgd", momentum=0.0, weight_decay=0.0, mode="sngd", rank_ratio=1.0, update_freq=1,
               damping=0.3)


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def _batches(n: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(10, 5, generator=gen, dtype=DT), torch.randint(0, 3, (10,), generator=gen)) for _ in range(n)]


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        cross_entropy(model(x), y).backward()
        opt.step()


def _same_model(model: nn.Module) -> nn.Module:
    twin = _model()
    twin.load_state_dict(model.state_dict())
    return twin


# --------------------------------------------------------------------------- item 1: unfreezing


def test_a_layer_unfrozen_after_construction_trains_and_is_preconditioned():
    """Progressive unfreezing: frozen at HyLo(model), unfrozen after two steps. While frozen it holds
    no hook and does not move; once unfrozen it trains at once, and from its first refresh its steps
    are those of a HyLo built on the unfrozen model."""
    model = _model()
    model[0].requires_grad_(False)
    opt = ds_hylo.HyLo(model, **OPTIONS)
    pre = opt.preconditioner
    assert pre.dormant_layers == ["0"] and set(pre.layers) == {"2", "4"}
    assert not model[0]._forward_hooks  # frozen: no hook, no rows
    frozen = [p.detach().clone() for p in model[0].parameters()]
    batches = _batches(5)
    _train(model, opt, batches[:2])
    assert all(torch.equal(p, q) for p, q in zip(model[0].parameters(), frozen))

    model[0].requires_grad_(True)
    _train(model, opt, batches[2:3])  # hooked at this step's precondition(): plain gradient this once
    assert not all(torch.equal(p, q) for p, q in zip(model[0].parameters(), frozen)), "the unfrozen layer must train"
    assert list(pre.layers) == ["0", "2", "4"] and pre.dormant_layers == []

    twin = _same_model(model)
    twin_opt = ds_hylo.HyLo(twin, **OPTIONS)
    before = model[0].weight.detach().clone()
    _train(model, opt, batches[3:])
    _train(twin, twin_opt, batches[3:])
    assert "0" in pre.factors and opt.layer_modes()["0"] == "sngd"
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert not torch.equal(model[0].weight, before)


def test_a_layer_frozen_again_costs_no_capture_and_keeps_its_parameters():
    """Freezing a preconditioned layer turns its capture off (its output still needs a gradient
    because the layers before it train); unfreezing it again resumes preconditioning."""
    model = _model()
    opt = ds_hylo.HyLo(model, **OPTIONS)
    batches = _batches(4)
    _train(model, opt, batches[:1])
    model[2].requires_grad_(False)
    _train(model, opt, batches[1:2])  # the step() that sees it frozen
    x, y = batches[2]
    opt.zero_grad()
    cross_entropy(model(x), y).backward()
    layer = opt.preconditioner.layers["2"]
    assert layer.held_rows == 0 and opt.preconditioner.layers["0"].held_rows == 10
    kept = model[2].weight.detach().clone()
    opt.step()
    assert torch.equal(model[2].weight, kept)
    model[2].requires_grad_(True)
    refreshes = opt.preconditioner.refreshes
    _train(model, opt, batches[3:])
    _train(model, opt, batches[3:])
    assert not torch.equal(model[2].weight, kept) and opt.preconditioner.refreshes == refreshes + 2


def test_a_layer_unfrozen_by_half_is_warned_and_keeps_its_plain_gradient():
    model = _model()
    model[0].requires_grad_(False)
    opt = ds_hylo.HyLo(model, **OPTIONS)
    model[0].bias.requires_grad_(True)  # the kernel covers [W | b] as one block
    batches = _batches(2)
    with pytest.warns(UserWarning, match=r"layer '0' has \['bias'\] trainable.*Freeze or unfreeze its weight and bias"):
        _train(model, opt, batches[:1])
    assert "0" not in opt.preconditioner.layers
    x, y = batches[1]
    opt.zero_grad()
    cross_entropy(model(x), y).backward()
    bias, grad = model[0].bias.detach().clone(), model[0].bias.grad.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once
        opt.step()
    torch.testing.assert_close(model[0].bias, bias - OPTIONS["lr"] * grad, rtol=0, atol=1e-15)


# --------------------------------------------------------------------------- item 2: add_param_group


def test_a_param_group_added_later_is_preconditioned_like_the_others():
    """HyLo(model, params=head) then add_param_group(rest): the added layers are preconditioned from
    their first refresh, exactly as if HyLo had owned them from the start."""
    model = _model()
    twin = _same_model(model)
    opt = ds_hylo.HyLo(model, params=list(model[4].parameters()), **OPTIONS)
    assert list(opt.preconditioner.layers) == ["4"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say: every added parameter is preconditioned
        opt.add_param_group({"params": list(model[0].parameters()) + list(model[2].parameters())})
    assert list(opt.preconditioner.layers) == ["0", "2", "4"]
    twin_opt = ds_hylo.HyLo(twin, **OPTIONS)
    batches = _batches(3)
    _train(model, opt, batches)
    _train(twin, twin_opt, batches)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_an_added_param_group_with_a_plain_step_is_named_in_one_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3)).to(DT)
    stray = nn.Parameter(torch.zeros(2, dtype=DT))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the initial groups (torch's __init__ adds them too) say nothing
        opt = ds_hylo.HyLo(model, params=[{"params": list(model[0].parameters())},
                                          {"params": list(model[2].parameters())}], **OPTIONS)
    with pytest.warns(UserWarning) as record:
        opt.add_param_group({"params": list(model[1].parameters()) + [stray]})
    messages = [str(w.message) for w in record if "add_param_group" in str(w.message)]
    assert len(messages) == 1
    message = messages[0]
    assert "3 added parameter(s) get the plain base step" in message
    assert "1.weight: no HyLo kernel for this layer kind" in message and "1.bias" in message
    assert "<parameter of shape (2,)>: not a parameter of the model" in message


# --------------------------------------------------------------------------- item 3: autograd.grad passes


def _pair():
    model = _model()
    twin = _same_model(model)
    options = dict(OPTIONS, mode="kis", rank_ratio=0.5, update_freq=2, momentum=0.9)
    return (model, ds_hylo.HyLo(model, **options)), (twin, ds_hylo.HyLo(twin, **options))


def test_a_second_loss_through_autograd_grad_adds_no_rows():
    """An extra forward whose backward is torch.autograd.grad (its gradient never reaches .grad):
    without no_capture() the refresh sees the training pass's rows only, as the twin does."""
    (model, opt), (twin, twin_opt) = _pair()
    for x, y in _batches(4):
        opt.zero_grad()
        extra = model(x + 1.0).pow(2).sum()  # a second loss, differentiated on the side
        side = torch.autograd.grad(extra, list(model.parameters()))
        cross_entropy(model(x), y).backward()
        rows = {name: layer.num_rows for name, layer in opt.preconditioner.layers.items()}
        opt.step()
        twin_opt.zero_grad()
        cross_entropy(twin(x), y).backward()
        twin_opt.step()
        assert set(rows.values()) <= {0, 10}, rows  # 20 when the side pass counted
    assert all(g.abs().sum() > 0 for g in side)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_a_gradient_penalty_counts_only_the_backward_that_reaches_grad():
    """R1-style penalty: autograd.grad(create_graph=True) on the training pass's output, then
    (loss + penalty).backward(). The rows are those of that last backward, exactly as when the
    autograd.grad call runs inside no_capture()."""
    (model, opt), (twin, twin_opt) = _pair()

    def loss_of(net, x, y, quiet):
        x = x.clone().requires_grad_(True)
        out = net(x)
        with opt.no_capture() if quiet else _nothing():
            (grad_x,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        return cross_entropy(out, y) + 0.5 * grad_x.pow(2).sum()

    for x, y in _batches(4):
        opt.zero_grad()
        loss_of(model, x, y, quiet=False).backward()
        opt.step()
        twin_opt.zero_grad()
        loss_of(twin, x, y, quiet=True).backward()
        twin_opt.step()
    assert opt.preconditioner.refreshes == twin_opt.preconditioner.refreshes == 2
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_a_checkpoint_saved_after_unfreezing_loads_into_a_hylo_built_frozen():
    """Resume: the script freezes the layer again before building HyLo, then loads a checkpoint in
    which the layer was preconditioned; the factors find their layer, and unfreezing continues
    exactly as the uninterrupted run."""
    model = _model()
    model[0].requires_grad_(False)
    opt = ds_hylo.HyLo(model, **OPTIONS)
    batches = _batches(5)
    _train(model, opt, batches[:1])
    model[0].requires_grad_(True)
    _train(model, opt, batches[1:3])
    assert "0" in opt.preconditioner.factors
    resumed = _same_model(model)
    resumed[0].requires_grad_(False)
    resumed_opt = ds_hylo.HyLo(resumed, **OPTIONS)
    resumed_opt.load_state_dict(opt.state_dict())
    resumed[0].requires_grad_(True)
    _train(model, opt, batches[3:])
    _train(resumed, resumed_opt, batches[3:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
