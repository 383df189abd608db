"""HyLo rewrites only gradients it owns (issue 12 item 3): parameters outside its param groups,
weights shared by several modules, an LM head tied to an embedding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ds_hylo

DT = torch.float64
OPTIONS = dict(lr=0.1, mode="kis", rank_ratio=1.0, update_freq=1, damping=0.3)


def _data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 5, generator=gen, dtype=DT), torch.randint(0, 3, (16,), generator=gen)


def test_layers_of_another_optimizer_keep_their_gradient():
    """HyLo(model, params=subset) beside a second optimizer: the other layers' .grad is untouched."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    hylo = ds_hylo.HyLo(model, params=list(model[2].parameters()), **OPTIONS)
    assert list(hylo.preconditioner.layers) == ["2"] and hylo.preconditioner.unowned_layers == ["0"]
    x, y = _data()
    nn.functional.cross_entropy(model(x), y).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    hylo.step()
    assert torch.equal(model[0].weight.grad, before["0.weight"]) and torch.equal(model[0].bias.grad, before["0.bias"])
    assert not torch.equal(model[2].weight.grad, before["2.weight"]), "HyLo's own layer must be preconditioned"


def test_a_layer_partly_owned_falls_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3)).to(DT)
    with pytest.raises(ValueError, match="no Linear or Conv2d layer"):
        ds_hylo.HyLo(model, params=[model[0].weight], **OPTIONS)


class SharedWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(5, 5, bias=False)
        self.second = nn.Linear(5, 5, bias=False)
        self.second.weight = self.first.weight  # one weight, two modules
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


def test_a_shared_weight_falls_back_with_one_warning():
    torch.manual_seed(0)
    model = SharedWeight().to(DT)
    with pytest.warns(UserWarning, match="share a parameter") as record:
        opt = ds_hylo.HyLo(model, **OPTIONS)
    assert len([w for w in record if "share a parameter" in str(w.message)]) == 1
    assert list(opt.preconditioner.layers) == ["head"]
    x, y = _data()
    nn.functional.cross_entropy(model(x), y).backward()
    shared_grad = model.first.weight.grad.clone()
    opt.step()
    # the shared weight moved by its plain gradient (SGD, no momentum)
    assert torch.allclose(model.first.weight.grad, shared_grad)


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)
        self.lm_head = nn.Linear(6, 11, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, tokens):
        return self.lm_head(torch.tanh(self.mix(self.embed(tokens))))


def test_an_lm_head_tied_to_the_embedding_keeps_the_shared_gradient():
    torch.manual_seed(0)
    model = TiedLM().to(DT)
    with pytest.warns(UserWarning, match="lm_head"):
        opt = ds_hylo.HyLo(model, **OPTIONS)
    assert "lm_head" not in opt.preconditioner.layers and "mix" in opt.preconditioner.layers
    tokens = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(1))
    nn.functional.cross_entropy(model(tokens).reshape(-1, 11), tokens.reshape(-1)).backward()
    shared = model.embed.weight.grad.clone()
    opt.step()
    assert torch.equal(model.embed.weight.grad, shared), "the tied weight's gradient must stay the plain one"
