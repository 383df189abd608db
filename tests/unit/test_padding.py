"""Padding invariance: positions that carry no signal are not samples.

The same examples padded to their longest length or to a fixed longer length give the same loss
and the same plain gradients (attention masks the padded keys, the loss ignores padded positions),
so HyLo must give the same update too, to round-off, in every mode: padded rows must count neither
in the kernel nor in the sample count N (the mean-loss scale of the rows, the damping shift lam*N)
nor in the KIS budget. Each test also runs a control with the zero-row rule switched off, which
must differ: the test can fail.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import DT, rel_err, tiny_bert
from ds_hylo import HyLo

transformers = pytest.importorskip("transformers")

LAM = 0.1
LENGTHS = [2, 4, 3]  # real tokens per example; padded to max(LENGTHS) = 4 and to 7
PAD = 0

MODES = [
    ("sngd", 1.0),
    ("kis", 1.0),
    ("kid", 1.0),
    ("kis", 0.5),  # the budget is round(0.5 * real rows) and the draw sees the real rows only
    ("kid", 0.5),
]


def _tokens(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 50, (n,), generator=gen) for n in LENGTHS]


def _pad(examples: list[torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, length) and attention mask (B, length)."""
    ids = torch.full((len(examples), length), PAD, dtype=torch.long)
    mask = torch.zeros(len(examples), length, dtype=torch.long)
    for i, example in enumerate(examples):
        ids[i, : len(example)] = example
        mask[i, : len(example)] = 1
    return ids, mask


def _bert():
    return tiny_bert(20)


def _llama():
    torch.manual_seed(21)
    config = transformers.LlamaConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=50, max_position_embeddings=16, attn_implementation="eager", initializer_range=0.5,
    )
    return transformers.LlamaForCausalLM(config).to(DT)


def _bert_loss(length: int):
    ids, mask = _pad(_tokens(22), length)
    labels = torch.tensor([0, 2, 1])
    return lambda m: m(input_ids=ids, attention_mask=mask, labels=labels).loss


def _llama_loss(length: int):
    ids, mask = _pad(_tokens(23), length)
    labels = ids.masked_fill(mask == 0, -100)  # padding is ignored by the loss
    return lambda m: m(input_ids=ids, attention_mask=mask, labels=labels).loss


CASES = {"bert_classifier": (_bert, _bert_loss), "llama_lm": (_llama, _llama_loss)}


def _step(model: nn.Module, loss_of, mode: str, rank_ratio: float, convention: str, drop_zero_rows: bool = True):
    """One HyLo step; returns (loss, {param: delta}, {layer: rows used at the refresh})."""
    opt = HyLo(model, lr=1.0, base="sgd", momentum=0.0, weight_decay=0.0, damping=LAM, mode=mode, rank_ratio=rank_ratio,
               update_freq=1, step_scale="natural", sequence_convention=convention)
    for layer in opt.preconditioner.layers.values():
        layer.drop_zero_rows = drop_zero_rows
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    loss = loss_of(model)
    loss.backward()
    loss = float(loss.detach())
    rows = {name: layer.num_rows for name, layer in opt.preconditioner.layers.items()}
    opt.step()
    deltas = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    return loss, deltas, rows


def _run_both(case: str, mode: str, rank_ratio: float, convention: str, drop_zero_rows: bool = True):
    make, loss_for = CASES[case]
    model = make()
    results = []
    for length in (max(LENGTHS), 7):
        results.append(_step(copy.deepcopy(model), loss_for(length), mode, rank_ratio, convention, drop_zero_rows))
    return results


def _max_rel_diff(a: dict, b: dict) -> float:
    """Largest relative difference of the update of one module (weight and bias together: the key
    bias's gradient is zero up to round-off, softmax being invariant to it, so alone it is noise)."""
    modules: dict[str, list[str]] = {}
    for name in a:
        modules.setdefault(name.rsplit(".", 1)[0], []).append(name)
    diffs = []
    for names in modules.values():
        flat_a = torch.cat([a[n].reshape(-1) for n in names])
        flat_b = torch.cat([b[n].reshape(-1) for n in names])
        if flat_b.norm() > 0:
            diffs.append(rel_err(flat_a, flat_b))
    return max(diffs)


@pytest.mark.parametrize("convention", ["expand", "reduce"])
@pytest.mark.parametrize("mode, rank_ratio", MODES, ids=[f"{m}-{r}" for m, r in MODES])
@pytest.mark.parametrize("case", list(CASES))
def test_padding_does_not_change_the_update(case, mode, rank_ratio, convention):
    (loss_a, deltas_a, rows_a), (loss_b, deltas_b, rows_b) = _run_both(case, mode, rank_ratio, convention)
    assert abs(loss_a - loss_b) < 1e-12 * abs(loss_a)
    assert rows_a == rows_b  # the padded positions are not samples
    diff = _max_rel_diff(deltas_a, deltas_b)
    assert diff < 1e-9, diff


@pytest.mark.parametrize("case", list(CASES))
def test_counting_padded_rows_would_change_the_update(case):
    """Control: with the zero-row rule off the padded rows count (the old behaviour) and the
    updates differ by far more than round-off, so the invariance test above can fail."""
    (_, deltas_a, rows_a), (_, deltas_b, rows_b) = _run_both(case, "sngd", 1.0, "expand", drop_zero_rows=False)
    assert all(rows_b[n] >= rows_a[n] for n in rows_a) and any(rows_b[n] > rows_a[n] for n in rows_a)
    assert _max_rel_diff(deltas_a, deltas_b) > 1e-2


def test_real_row_counts_llama():
    """Rows that remain are the positions with a signal: for the causal LM every position but the
    last real one of each example (it predicts a padded, ignored label), whatever the padding."""
    _, _, rows = _step(_llama(), _llama_loss(7), "sngd", 1.0, "expand")
    real_predicting = sum(n - 1 for n in LENGTHS)
    assert rows["model.layers.0.mlp.down_proj"] == rows["lm_head"] == real_predicting


def test_positions_with_zero_gradient_dropped_but_a_dead_layer_keeps_its_rows():
    """Capture level: in "expand" the zero-gradient positions are left out of the rows (and of
    num_rows); if every position of the layer is zero (a dead layer) every row is kept, the kernel
    being zero whatever their number; 2-D inputs (one row per sample) always keep every sample."""
    from conftest import TokenMLP
    from ds_hylo.capture import LayerCapture

    torch.manual_seed(24)
    model = TokenMLP().to(DT)
    caps = {n: LayerCapture(n, getattr(model, n)) for n in ("inp", "out")}
    for cap in caps.values():
        cap.enabled = True
    x = torch.randn(2, 5, 4, dtype=DT)
    weights = torch.ones(2, 5, 1, dtype=DT)
    weights[0, 3:] = 0.0  # positions the loss ignores
    (model(x) * weights).pow(2).sum().backward()
    assert caps["out"].held_rows == 10 and caps["out"].num_rows == 8
    a, g = caps["out"].take(1.0)
    torch.testing.assert_close(a[:, :5], torch.tanh(model.inp(torch.cat([x[0, :3], x[1]]))).detach())
    assert bool(g.ne(0).any(dim=1).all())

    with torch.no_grad():
        model.out.weight.zero_()  # inp's output gradients are all zero now
    caps["inp"].clear()
    model(x).pow(2).sum().backward()
    assert caps["inp"].num_rows == 10
    with pytest.raises(ValueError, match="drop_zero_rows"):
        LayerCapture("fc", nn.Linear(2, 2), drop_zero_rows=1)
