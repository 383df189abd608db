"""Streamed KIS (issue 11 item 5): a layer on a KIS refresh draws its rows as each pass's output
gradient arrives and holds only the drawn ones (``ds_hylo.sampling.KISReservoir``).

References: the refresh-time draw over every stored row (``kernels.kis_select``, or the optimizer
with ``preconditioner.stream_kis = False``) and the dense float64 natural-gradient solve on the
drawn rows (``conftest.exact_smw``).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import DT, MLP, ConvNet, HostReads, TokenMLP, exact_smw, grad_matrix, param_matrix, rel_err
from ds_hylo import HyLo, kernels
from ds_hylo.capture import LayerCapture
from ds_hylo.reduce import row_budget
from ds_hylo.sampling import KISReservoir

LAM = 0.1


def _rows(n: int, d_in: int, d_out: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=gen, dtype=DT), torch.randn(n, d_out, generator=gen, dtype=DT)


def _budget(rank_ratio: float, cap=None):
    return lambda rows: row_budget("kis", rows, rank_ratio, 1, cap)


def _with_bias(a: torch.Tensor) -> torch.Tensor:
    return torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)


def _stream(passes, capacity, seed=7, droppable=False):
    """Merge (a, g) passes (a without its bias column) into a reservoir; returns it."""
    reservoir = KISReservoir(seed, capacity, "fc")
    for slot, (a, g) in enumerate(passes):
        reservoir.merge(slot, a, g, bias=True, droppable=droppable)
    return reservoir


def _refresh_time_draw(a, g, budget, seed=7, scale=3.0):
    """Today's draw at the refresh: kis_select over every kept row, g scaled as the refresh scales it."""
    picked = kernels.kis_select(_with_bias(a), g * scale, budget, torch.Generator().manual_seed(seed))
    return _with_bias(a)[picked], g[picked]


# --------------------------------------------------------------------------- the reservoir


@pytest.mark.parametrize("rank_ratio", [0.1, 0.5, 1.0])
def test_one_pass_draws_the_refresh_time_rows(rank_ratio):
    a, g = _rows(200, 6, 4, seed=1)
    g[[3, 50, 51]] = 0.0  # zero-weight samples (2-D rows: they count, and come last)
    reservoir = _stream([(a, g)], _budget(rank_ratio))
    n, available = reservoir.counts()
    budget = row_budget("kis", n, rank_ratio, 1)
    assert n == 200 and available == reservoir.size >= budget
    got_a, got_g = reservoir.take(budget)
    want_a, want_g = _refresh_time_draw(a, g, budget)
    assert torch.equal(got_a, want_a) and torch.equal(got_g, want_g)


def test_zero_rows_of_positions_are_not_samples_and_do_not_shift_the_draw():
    """Droppable rows with a zero output gradient (padding) are left out of N and of the draw, as
    the refresh-time path leaves them out before drawing: the same rows come out."""
    a, g = _rows(120, 5, 3, seed=2)
    g[40:70] = 0.0
    live = g.ne(0).any(dim=1)
    reservoir = _stream([(a, g)], _budget(0.25), droppable=True)
    n, available = reservoir.counts()
    assert n == int(live.sum()) == 90
    budget = row_budget("kis", n, 0.25, 1)
    got_a, got_g = reservoir.take(budget)
    want_a, want_g = _refresh_time_draw(a[live], g[live], budget)
    assert torch.equal(got_a, want_a) and torch.equal(got_g, want_g)


def test_dead_layer_draws_uniformly_from_every_row():
    a, g = _rows(30, 4, 3, seed=3)
    g.zero_()
    reservoir = _stream([(a, g)], _budget(0.2), droppable=True)
    n, available = reservoir.counts()
    assert n == 30 and available == reservoir.size == 6
    got_a, _ = reservoir.take(6)
    want_a, _ = _refresh_time_draw(a, g, 6)
    assert torch.equal(got_a, want_a)


@pytest.mark.parametrize("capacity, budget_of", [
    (_budget(0.3, cap=12), lambda n: row_budget("kis", n, 0.3, 1, 12)),  # a fixed budget (max_global_samples)
    (_budget(1.0), lambda n: n),  # every row kept
])
def test_passes_draw_the_rows_of_one_pass_when_the_budget_allows(capacity, budget_of):
    """Gradient accumulation: with a fixed budget (or every row) the stream is exact over passes."""
    a, g = _rows(150, 5, 4, seed=4)
    cuts = [0, 40, 41, 100, 150]
    reservoir = _stream([(a[i:j], g[i:j]) for i, j in zip(cuts, cuts[1:])], capacity)
    n, _ = reservoir.counts()
    budget = budget_of(n)
    got_a, got_g = reservoir.take(budget)
    want_a, want_g = _refresh_time_draw(a, g, budget)
    assert torch.equal(got_a, want_a) and torch.equal(got_g, want_g)


def test_growing_budget_over_passes_holds_the_budget_and_stays_close():
    """rank_ratio budget over several passes: never more than the budget of the rows seen is held;
    the draw may let an early row go that the refresh-time draw keeps (see ds_hylo.sampling), so
    only most rows agree."""
    a, g = _rows(400, 6, 4, seed=5)
    capacity = _budget(0.1)
    reservoir = KISReservoir(7, capacity, "fc")
    for slot, start in enumerate(range(0, 400, 100)):
        reservoir.merge(slot, a[start:start + 100], g[start:start + 100], bias=True, droppable=False)
        assert reservoir.size == capacity(start + 100)
    got_a, _ = reservoir.take(40)
    want_a, _ = _refresh_time_draw(a, g, 40)
    common = len({tuple(r.tolist()) for r in got_a} & {tuple(r.tolist()) for r in want_a})
    assert common >= 36, common


def test_drop_every_pass_starts_over_as_if_never_seen():
    a, g = _rows(60, 4, 3, seed=6)
    reservoir = _stream([(a[:30], g[:30])], _budget(0.5))
    reservoir.drop_slots([0])
    assert reservoir.size == reservoir.rows_seen == 0 and reservoir.counts() == (0, 0)
    reservoir.merge(1, a[30:], g[30:], bias=True, droppable=False)
    fresh = _stream([(a[30:], g[30:])], _budget(0.5))
    assert torch.equal(reservoir.take(15)[0], fresh.take(15)[0])


def test_drop_some_passes_never_takes_their_rows():
    a, g = _rows(80, 4, 3, seed=7)
    reservoir = _stream([(a[:40], g[:40]), (a[40:], g[40:])], _budget(0.5))
    reservoir.drop_slots([0])
    n, available = reservoir.counts()
    assert n == 40 and available <= reservoir.size
    got_a, _ = reservoir.take(available)
    second = {tuple(r.tolist()) for r in _with_bias(a[40:])}
    assert all(tuple(r.tolist()) in second for r in got_a)


def test_merge_never_reads_the_host(monkeypatch):
    a, g = _rows(500, 8, 5, seed=8)
    g[100:200] = 0.0
    reads = HostReads(monkeypatch)
    reservoir = _stream([(a[:250], g[:250]), (a[250:], g[250:])], _budget(0.1), droppable=True)
    assert reads.count == 0
    reservoir.counts()
    assert reads.count == 1  # zero rows: the live count is read once, at the refresh


# --------------------------------------------------------------------------- through the optimizer


def _padded_tokens(seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, 4, generator=gen, dtype=DT)
    weights = torch.ones(3, 7, 1, dtype=DT)
    weights[0, 4:] = 0.0  # positions the loss ignores: zero output gradients
    weights[2, 2:] = 0.0
    return x, weights


def _cases():
    torch.manual_seed(30)
    x, y = torch.randn(16, 6, dtype=DT), torch.randint(0, 3, (16,))
    xt, wt = _padded_tokens(31)
    xc, yc = torch.randn(5, 2, 7, 8, dtype=DT), torch.randn(5, 2, dtype=DT)
    return {
        "mlp": (MLP(6, 5, 3).to(DT), lambda m: F.cross_entropy(m(x), y), {}),
        "tokens_expand_padded": (TokenMLP().to(DT), lambda m: (m(xt) * wt).pow(2).mean(), {}),
        "tokens_reduce": (TokenMLP().to(DT), lambda m: (m(xt) * wt).pow(2).mean(), {"sequence_convention": "reduce"}),
        "conv": (ConvNet(kernel_size=3).to(DT), lambda m: F.mse_loss(m(xc), yc), {}),
    }


def _kis_optimizer(model, stream: bool, rank_ratio=0.5, **options) -> HyLo:
    """HyLo-KIS refreshing every step with the natural step; ``stream``: streamed or stored draw."""
    opt = HyLo(model, lr=1.0, base="sgd", damping=LAM, mode="kis", rank_ratio=rank_ratio, update_freq=1,
               step_scale="natural", **options)
    opt.preconditioner.stream_kis = stream
    return opt


def _kis_step(model, loss_of, stream: bool, rank_ratio=0.5, micro_batches=None, **options):
    """One KIS refresh step; returns (factors, {layer: (held rows after backward, streamed?)}, deltas)."""
    opt = _kis_optimizer(model, stream, rank_ratio, **options)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for loss in (micro_batches or [loss_of]):
        loss(model).backward()
    held = {n: (layer.held_rows, layer.sampled) for n, layer in opt.preconditioner.layers.items()}
    opt.step()
    deltas = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    return opt.preconditioner.factors, held, deltas


@pytest.mark.parametrize("case", list(_cases()))
def test_streamed_kis_is_the_stored_kis_bit_for_bit(case):
    model, loss_of, options = _cases()[case]
    streamed, held, deltas = _kis_step(copy.deepcopy(model), loss_of, True, **options)
    stored, held_all, deltas_all = _kis_step(copy.deepcopy(model), loss_of, False, **options)
    assert set(streamed) == set(stored)
    for name in stored:
        assert held[name][1] and not held_all[name][1]
        assert held[name][0] < held_all[name][0], (name, held[name], held_all[name])
        s, t = streamed[name], stored[name]
        assert torch.equal(s.a, t.a) and torch.equal(s.g, t.g) and torch.equal(s.c, t.c), name
    for name in deltas:
        assert torch.equal(deltas[name], deltas_all[name]), name


def test_streamed_kis_step_matches_the_dense_float64_reference():
    """The step is (F_S + lam I)^-1 grad, F_S = U_S^T U_S / s over the rows today's draw takes."""
    model, loss_of, _ = _cases()["tokens_expand_padded"]
    reference = copy.deepcopy(model)
    captures = {n: LayerCapture(n, getattr(reference, n)) for n in ("inp", "out")}
    for cap in captures.values():
        cap.enabled = True
    loss_of(reference).backward()
    opt = HyLo(model, lr=1.0, base="sgd", damping=LAM, mode="kis", rank_ratio=0.5, update_freq=1,
               step_scale="natural")
    seeds = {n: opt.preconditioner._kis_seed(i) for i, n in enumerate(opt.preconditioner.layers)}
    before = {n: param_matrix(getattr(model, n)) for n in captures}
    loss_of(model).backward()
    grads = {n: grad_matrix(getattr(model, n)) for n in captures}
    assert all(layer.sampled for layer in opt.preconditioner.layers.values())
    opt.step()
    for name, cap in captures.items():
        n = cap.num_rows
        a, g = cap.take(float(n))  # mean loss: per-sample gradients are N times the rows
        budget = row_budget("kis", n, 0.5, 1)
        picked = kernels.kis_select(a, g, budget, torch.Generator().manual_seed(seeds[name]))
        expected = -exact_smw(a[picked], g[picked], grads[name], LAM)
        step = param_matrix(getattr(model, name)) - before[name]
        assert rel_err(step, expected) < 1e-9, name


def test_long_sequence_holds_no_more_than_the_budget():
    """seq 2048: the layer holds the KIS budget of its 16384 token rows, not the rows themselves."""
    torch.manual_seed(32)
    batch, seq, width, rank_ratio = 8, 2048, 32, 0.05
    model = nn.Linear(width, width)
    x, y = torch.randn(batch, seq, width), torch.randn(batch, seq, width)
    held = {}
    for stream in (True, False):
        # no row cap: the budget is rank_ratio's (the default cap of 512 is tested in test_row_cap.py)
        opt = HyLo(model, lr=0.01, mode="kis", rank_ratio=rank_ratio, update_freq=1, max_global_samples=None)
        opt.preconditioner.stream_kis = stream
        layer = opt.preconditioner.layers[""]
        F.mse_loss(model(x), y).backward()
        held[stream] = (layer.held_rows, layer.held_bytes())
        opt.step()
        opt.zero_grad()
        opt.preconditioner.remove_hooks()
    rows = batch * seq
    budget = row_budget("kis", rows, rank_ratio, 1)
    row_bytes = 4 * (width + 1 + width)  # float32 input row with its bias column, output-gradient row
    assert held[True][0] == budget == 819
    assert held[True][1] <= budget * (row_bytes + 8 + 1 + 8 + 8)  # rows, key, class, pass, position
    assert held[False][0] == rows and held[False][1] >= rows * row_bytes
    assert held[False][1] > 15 * held[True][1]


def test_long_sequence_budget_is_fixed_with_max_global_samples():
    torch.manual_seed(33)
    model = nn.Linear(16, 16)
    opt = HyLo(model, lr=0.01, mode="kis", rank_ratio=0.5, update_freq=1, max_global_samples=64)
    layer = opt.preconditioner.layers[""]
    for _ in range(3):  # gradient accumulation: the bound holds over passes
        F.mse_loss(model(torch.randn(4, 2048, 16)), torch.zeros(4, 2048, 16)).backward()
        assert layer.held_rows == 64
    opt.step()
    assert opt.preconditioner.factors[""].a.shape[0] == 64


@pytest.mark.parametrize("options", [dict(rank_ratio=1.0), dict(rank_ratio=0.5, max_global_samples=5)],
                         ids=["every_row", "fixed_budget"])
def test_gradient_accumulation_equals_one_batch(options):
    """Two micro-batches (loss / 2 each) give the step of one batch, where the budget allows the
    stream to be exact: every row kept, or a fixed budget (max_global_samples)."""
    torch.manual_seed(34)
    model = MLP(6, 5, 3).to(DT)
    x, y = torch.randn(16, 6, dtype=DT), torch.randint(0, 3, (16,))
    halves = [lambda m, s=s: F.cross_entropy(m(x[s]), y[s]) / 2 for s in (slice(0, 8), slice(8, 16))]
    _, _, accumulated = _kis_step(copy.deepcopy(model), None, True, micro_batches=halves, **options)
    _, _, one_batch = _kis_step(copy.deepcopy(model), lambda m: F.cross_entropy(m(x), y), True, **options)
    for name in one_batch:
        assert rel_err(accumulated[name], one_batch[name]) < 1e-10, name


def test_sampled_fisher_streams_and_zero_grad_keeps_rows_awaiting_their_backward():
    torch.manual_seed(35)
    model = MLP(6, 5, 3).to(DT)
    x, y = torch.randn(12, 6, dtype=DT), torch.randint(0, 3, (12,))
    results = {}
    for stream in (True, False):
        twin = copy.deepcopy(model)
        opt = _kis_optimizer(twin, stream, fisher="sampled")
        logits = twin(x)
        assert opt.sample_fisher(logits)
        opt.zero_grad()  # between sample_fisher and backward: the pass is not spent
        assert opt.preconditioner.layers["fc1"].held_rows == (6 if stream else 12)
        F.cross_entropy(logits, y).backward()
        opt.step()
        results[stream] = opt.preconditioner.factors
    for name in results[False]:
        assert torch.equal(results[True][name].a, results[False][name].a), name
        assert torch.equal(results[True][name].c, results[False][name].c), name


def test_zero_grad_after_a_skipped_step_drops_the_drawn_rows():
    torch.manual_seed(36)
    model = MLP(6, 5, 3).to(DT)
    opt = HyLo(model, lr=0.1, mode="kis", rank_ratio=0.5, update_freq=1)
    x, y = torch.randn(10, 6, dtype=DT), torch.randint(0, 3, (10,))
    F.cross_entropy(model(x), y).backward()
    layer = opt.preconditioner.layers["fc1"]
    assert layer.sampled and layer.held_rows == 5
    opt.zero_grad()  # no step: those rows must not reach the next refresh
    assert layer.held_rows == 0 and not layer.has_data()
    twin = copy.deepcopy(model)
    twin_opt = HyLo(twin, lr=0.1, mode="kis", rank_ratio=0.5, update_freq=1)
    for m, o in ((model, opt), (twin, twin_opt)):
        F.cross_entropy(m(x[:6]), y[:6]).backward()
        o.step()
    assert torch.equal(opt.preconditioner.factors["fc1"].a, twin_opt.preconditioner.factors["fc1"].a)


def test_second_backward_through_a_drawn_pass_adds_to_the_kept_rows():
    """loss1.backward(retain_graph=True); loss2.backward(): the rows were drawn at the first
    backward; the second adds its output gradients to them (warned). With every row kept the
    step is the stored path's (the draw order may differ, the kernel does not)."""
    torch.manual_seed(42)
    model = MLP(6, 5, 3).to(DT)
    x = torch.randn(10, 6, dtype=DT)
    deltas = {}
    for stream in (True, False):
        twin = copy.deepcopy(model)
        opt = _kis_optimizer(twin, stream, rank_ratio=1.0, loss_reduction="sum")
        before = {n: p.detach().clone() for n, p in twin.named_parameters()}
        out = twin(x)
        out.pow(2).sum().backward(retain_graph=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            (3 * out).sum().backward()
        assert any("second backward" in str(w.message) for w in caught) == stream
        opt.step()
        deltas[stream] = {n: p.detach() - before[n] for n, p in twin.named_parameters()}
    for name in deltas[False]:
        assert rel_err(deltas[True][name], deltas[False][name]) < 1e-10, name


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpointed_passes_are_drawn_once(use_reentrant):
    """Activation checkpointing recomputes forward passes inside the backward: the streamed draw
    sees each pass once, as the stored path does."""

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            block = lambda h: torch.tanh(self.b(torch.tanh(self.a(h))))  # noqa: E731
            return self.c(torch.utils.checkpoint.checkpoint(block, x, use_reentrant=use_reentrant))

    torch.manual_seed(43)
    model = Checkpointed().to(DT)
    xs = [torch.randn(6, 3, dtype=DT, requires_grad=True) for _ in range(2)]
    micro = [lambda m, x=x: m(x).pow(2).sum() for x in xs]
    streamed, held, _ = _kis_step(copy.deepcopy(model), None, True, rank_ratio=1.0, micro_batches=micro)
    stored, held_all, _ = _kis_step(copy.deepcopy(model), None, False, rank_ratio=1.0, micro_batches=micro)
    for name in "abc":
        assert held[name] == (12, True) and held_all[name] == (12, False)
        assert torch.equal(streamed[name].a, stored[name].a) and torch.equal(streamed[name].c, stored[name].c)


def test_backward_hooks_read_nothing_from_the_host(monkeypatch):
    torch.manual_seed(37)
    model = TokenMLP()
    opt = HyLo(model, lr=0.1, mode="kis", rank_ratio=0.2, update_freq=1)
    x, weights = _padded_tokens(38)
    reads = HostReads(monkeypatch, active=False)
    assert reads.during(lambda: (model(x.float()) * weights.float()).pow(2).mean().backward()) == 0
    assert all(layer.sampled for layer in opt.preconditioner.layers.values())


def test_off_refresh_steps_plan_nothing():
    torch.manual_seed(39)
    model = MLP(6, 5, 3)
    opt = HyLo(model, lr=0.1, mode="kis", rank_ratio=0.5, update_freq=3)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    sampled = []
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sampled.append([layer.sampled for layer in opt.preconditioner.layers.values()])
        opt.step()
    assert sampled == [[True, True], [False, False], [False, False], [True, True]]


def test_planning_does_not_fix_the_collectives_before_the_first_refresh():
    """The draw is planned at the first forward pass; the process group is still looked up at the
    first refresh (one may be initialised in between), as before streaming."""
    torch.manual_seed(44)
    model = MLP(6, 5, 3)
    opt = HyLo(model, lr=0.1, mode="kis", rank_ratio=0.5, update_freq=1)
    F.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
    assert opt.preconditioner.layers["fc1"].sampled and opt.preconditioner._comm is None
    opt.step()
    assert opt.preconditioner._comm is not None


# --------------------------------------------------------------------------- hybrid


def test_hybrid_streams_in_its_kis_phase_and_stores_in_its_kid_phase():
    torch.manual_seed(40)
    model = MLP(6, 5, 3)
    opt = HyLo(model, lr=0.1, mode="hybrid", rank_ratio=0.5, update_freq=1, kid_schedule=[[2, 4]])
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    seen = []
    for _ in range(6):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        streamed = opt.preconditioner.layers["fc1"].sampled
        opt.step()
        seen.append((streamed, opt.layer_modes()["fc1"]))
    assert seen == [(True, "kis")] * 2 + [(False, "kid")] * 2 + [(True, "kis")] * 2


def _accordion_in_kis(lr=0.1):
    """A hybrid optimizer whose online policy has moved every layer to KIS."""
    torch.manual_seed(41)
    model = MLP(6, 5, 3)
    opt = HyLo(model, lr=lr, mode="hybrid", rank_ratio=0.5, update_freq=1, switch_window=1, switch_threshold=0.5)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for _ in range(3):  # windows 0 and 1 are critical (KID), then the norm rule picks KIS
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert set(opt.layer_modes().values()) == {"kis"}
    return model, opt, x, y


def test_hybrid_learning_rate_drop_before_the_forward_switches_to_kid_with_every_row():
    model, opt, x, y = _accordion_in_kis()
    opt.param_groups[0]["lr"] = 0.01  # an LR scheduler's step, before the next forward
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert not opt.preconditioner.layers["fc1"].sampled  # planned KID: every row stored
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        opt.step()
    assert set(opt.layer_modes().values()) == {"kid"}
    assert opt.preconditioner.policy.lr_changes[-1]["lr"] == 0.01


def test_hybrid_learning_rate_drop_after_the_forward_still_switches_with_a_warning():
    model, opt, x, y = _accordion_in_kis()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert opt.preconditioner.layers["fc1"].sampled  # planned KIS with the lr of the forward pass
    opt.param_groups[0]["lr"] = 0.01
    with pytest.warns(RuntimeWarning, match="drew its KIS rows"):
        opt.step()
    assert set(opt.layer_modes().values()) == {"kid"}  # every rank takes the policy's mode
    assert all(torch.isfinite(p).all() for p in model.parameters())
