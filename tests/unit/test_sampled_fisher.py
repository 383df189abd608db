"""fisher="sampled": kernel rows from labels drawn from the model (Monte-Carlo true Fisher).

Dense reference: one step at rank_ratio=1 with step_scale="natural", lr=1 must move [W | b] by
-(F_s + lam I)^-1 grad, where F_s = (1/N) sum_i u_i u_i^T over the per-sample gradients u_i of the
cross-entropy at the *sampled* labels and grad is the training loss's (true labels) gradient.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import (
    DT,
    MLP,
    ConvNet,
    TokenMLP,
    conv_surrogate_rows,
    cross_entropy,
    dense_natural_step,
    grad_matrix,
    layer_io,
    layer_rows_from_grads,
    outer_rows,
    param_matrix,
    per_sample_grads,
    rel_err,
    straight_and_resumed,
)
from ds_hylo import HyLo
from ds_hylo.fisher import sample_labels, sampled_label_loss

LAM = 0.1


def _natural(model: nn.Module, mode: str, **kwargs) -> HyLo:
    options = dict(lr=1.0, base="sgd", momentum=0.0, damping=LAM, mode=mode, rank_ratio=1.0, update_freq=1,
                   step_scale="natural", fisher="sampled")
    options.update(kwargs)
    return HyLo(model, **options)


def _labels_drawn_by(opt: HyLo, logits: torch.Tensor) -> torch.Tensor:
    """The labels the next sample_fisher() call will draw (same seed, same sampler)."""
    generator = torch.Generator().manual_seed(opt.preconditioner._fisher_seed())
    return sample_labels(logits.reshape(-1, logits.shape[-1]), generator)


def _sampled_step(model, opt, x, y, names, logits_to_loss=F.cross_entropy):
    modules = dict(model.named_modules())
    before = {n: param_matrix(modules[n]) for n in names}
    opt.zero_grad()
    logits = model(x)
    labels = _labels_drawn_by(opt, logits)
    assert opt.sample_fisher(logits)
    assert all(p.grad is None for p in model.parameters()), "sample_fisher must not touch parameter gradients"
    logits_to_loss(logits, y).backward()
    grads = {n: grad_matrix(modules[n]) for n in names}
    opt.step()
    return {n: param_matrix(modules[n]) - before[n] for n in names}, grads, labels


@pytest.mark.parametrize("mode", ["sngd", "kis", "kid"])
def test_mlp_step_equals_dense_sampled_fisher_step(mode):
    torch.manual_seed(21)
    model = MLP(6, 5, 4).to(DT)
    x, y = torch.randn(10, 6, dtype=DT), torch.randint(0, 4, (10,))
    twin = copy.deepcopy(model)
    deltas, grads, labels = _sampled_step(model, _natural(model, mode), x, y, ["fc1", "fc2"])
    assert not torch.equal(labels, y), "sampled labels equal the true ones: the test would not tell them apart"
    psg = per_sample_grads(twin, cross_entropy, x, labels)
    for name in ("fc1", "fc2"):
        rows = layer_rows_from_grads(psg, name)
        expected = -dense_natural_step(rows, grads[name], LAM)
        assert rel_err(deltas[name], expected) < 1e-8, (name, rel_err(deltas[name], expected))
        # and not the empirical-Fisher step (true labels)
        empirical = -dense_natural_step(layer_rows_from_grads(per_sample_grads(twin, cross_entropy, x, y), name),
                                        grads[name], LAM)
        assert rel_err(deltas[name], empirical) > 1e-3


def test_conv_step_uses_sampled_output_gradients():
    torch.manual_seed(22)
    model = ConvNet(classes=3, kernel_size=3, stride=2, padding=1).to(DT)
    x, y = torch.randn(6, 2, 7, 8, dtype=DT), torch.randint(0, 3, (6,))
    twin = copy.deepcopy(model)
    deltas, grads, labels = _sampled_step(model, _natural(model, "sngd"), x, y, ["conv", "fc"])

    def sampled_loss(m):
        return F.cross_entropy(m(x), labels)

    x_in, dldz, _ = layer_io(twin, "conv", sampled_loss)
    rows = {"conv": conv_surrogate_rows(twin.conv, x_in, dldz),
            "fc": layer_rows_from_grads(per_sample_grads(twin, cross_entropy, x, labels), "fc")}
    for name, layer_rows in rows.items():
        expected = -dense_natural_step(layer_rows, grads[name], LAM)
        assert rel_err(deltas[name], expected) < 1e-8, name


def test_sequence_rows_are_tokens_with_mask():
    """(B, T, V) logits: one sampled label per token; masked tokens contribute zero rows."""
    torch.manual_seed(23)
    model = TokenMLP().to(DT)
    batch, seq = 3, 4
    x, y = torch.randn(batch, seq, 4, dtype=DT), torch.randint(0, 3, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[0, 2:] = False
    twin = copy.deepcopy(model)
    opt = _natural(model, "sngd")
    before = {n: param_matrix(getattr(model, n)) for n in ("inp", "out")}
    logits = model(x)
    labels = _labels_drawn_by(opt, logits).reshape(batch, seq)
    opt.sample_fisher(logits, mask=mask)
    F.cross_entropy(logits.reshape(-1, 3), y.reshape(-1)).backward()
    grads = {n: grad_matrix(getattr(model, n)) for n in ("inp", "out")}
    opt.step()

    def sampled_loss(m):  # summed token losses, masked ones dropped: dl/dz of each token is its row
        per_token = F.cross_entropy(m(x).reshape(-1, 3), labels.reshape(-1), reduction="none")
        return (per_token * mask.reshape(-1)).sum()

    for name in ("inp", "out"):
        x_in, dldz, _ = layer_io(twin, name, sampled_loss)
        g = dldz.reshape(-1, dldz.shape[-1])
        rows = outer_rows(g, x_in.reshape(-1, x_in.shape[-1]), has_bias=True)
        assert float(rows[2:4].abs().max()) == 0.0  # the masked tokens of sequence 0
        rows = rows[mask.reshape(-1)]  # masked tokens carry no signal: they are not samples
        expected = -dense_natural_step(rows, grads[name], LAM)
        delta = param_matrix(getattr(model, name)) - before[name]
        assert rel_err(delta, expected) < 1e-8, name


def test_sampled_labels_follow_the_softmax():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 3.0]], dtype=DT)
    draws = 20000
    generator = torch.Generator().manual_seed(0)
    labels = sample_labels(logits.repeat_interleave(draws, dim=0), generator).reshape(2, draws)
    probs = torch.softmax(logits, dim=-1)
    for row in range(2):
        freq = torch.bincount(labels[row], minlength=3).double() / draws
        # 5 standard errors of a binomial proportion
        tolerance = 5 * torch.sqrt(probs[row] * (1 - probs[row]) / draws) + 1e-3
        assert torch.all((freq - probs[row]).abs() < tolerance), (freq, probs[row])


def test_sampled_label_loss_checks_its_input():
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="autograd graph"):
        sampled_label_loss(torch.randn(4, 3), generator)
    with pytest.raises(ValueError, match="num_classes"):
        sampled_label_loss(torch.randn(4, requires_grad=True), generator)
    with pytest.raises(ValueError, match="mask"):
        sampled_label_loss(torch.randn(4, 3, requires_grad=True), generator, mask=torch.ones(3, dtype=torch.bool))


def _train(model, opt, batches, call_sample_fisher=True):
    for x, y in batches:
        opt.zero_grad()
        logits = model(x)
        if call_sample_fisher:
            opt.sample_fisher(logits)
        F.cross_entropy(logits, y).backward()
        opt.step()


def _batches(steps, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(12, 6, generator=gen), torch.randint(0, 3, (12,), generator=gen)) for _ in range(steps)]


def test_missing_sample_fisher_call_is_an_error_and_other_calls_are_free():
    torch.manual_seed(0)
    model = MLP(6, 5, 3)
    opt = HyLo(model, fisher="sampled", update_freq=3)
    with pytest.raises(RuntimeError, match=r"sample_fisher\(logits\) was not called"):
        _train(model, opt, _batches(1), call_sample_fisher=False)
    opt = HyLo(model, fisher="sampled", update_freq=3)
    _train(model, opt, _batches(1))
    logits = model(torch.randn(4, 6))
    assert opt.sample_fisher(logits) is False  # step 1 is not a refresh step
    assert opt.preconditioner.timers.summary()["fisher"]["calls"] == 1
    empirical_model = MLP(6, 5, 3)
    empirical = HyLo(empirical_model, fisher="empirical")
    assert empirical.sample_fisher(empirical_model(torch.randn(4, 6))) is False  # a no-op: loops can always call it
    assert "fisher" not in empirical.preconditioner.timers.summary()


def test_bad_fisher_value_is_named():
    with pytest.raises(ValueError, match=r"fisher='true'.*'empirical', 'sampled'"):
        HyLo(MLP(6, 5, 3), fisher="true")


def test_resume_draws_the_same_labels(tmp_path):
    options = dict(lr=0.2, base="sgd", momentum=0.9, fisher="sampled", mode="kis", rank_ratio=0.5, update_freq=2, damping=0.1)
    batches = _batches(7)

    def make_run():
        model = MLP(6, 5, 3)
        return model, HyLo(model, **options)

    straight, _, resumed, _ = straight_and_resumed(make_run, _train, batches, 3, tmp_path / "ckpt.pt")
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_gradient_accumulation_equals_one_batch():
    """Two micro-batches (loss / 2 each) give the step of one batch with the same sampled labels."""
    torch.manual_seed(4)
    model = MLP(6, 5, 3).to(DT)
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 6, dtype=DT), torch.randint(0, 3, (8,))
    opt = _natural(model, "sngd")
    labels = []
    for half in (slice(0, 4), slice(4, 8)):
        logits = model(x[half])
        labels.append(_labels_drawn_by(opt, logits))
        opt.sample_fisher(logits)
        (F.cross_entropy(logits, y[half]) / 2).backward()
    assert opt.preconditioner.layers["fc1"].num_rows == 8
    grads = {n: grad_matrix(getattr(model, n)) for n in ("fc1", "fc2")}
    before = {n: param_matrix(getattr(model, n)) for n in ("fc1", "fc2")}
    opt.step()
    psg = per_sample_grads(twin, cross_entropy, x, torch.cat(labels))
    for name in ("fc1", "fc2"):
        expected = -dense_natural_step(layer_rows_from_grads(psg, name), grads[name], LAM)
        assert rel_err(param_matrix(getattr(model, name)) - before[name], expected) < 1e-8, name
