"""End-to-end correctness of ds_hylo.HyLo against dense float64 references (docs/design.md section 1.2).

At rank_ratio = 1 every mode is exact SMW, so one step with lr = 1, momentum = 0, weight decay 0
and step_scale="natural" must move each preconditioned layer's [W | b] by -(F + lam I)^-1 grad,
where F = (1/N) sum_i u_i u_i^T over that layer's per-sample gradients (block-diagonal per layer).
"""

from __future__ import annotations

import copy
import logging
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import (
    CONV_VARIANTS,
    DT,
    MLP,
    ConvNet,
    TokenMLP,
    conv_id,
    conv_surrogate_rows,
    cross_entropy,
    dense_natural_step,
    grad_matrix,
    layer_io,
    layer_rows_from_grads,
    mse,
    outer_rows,
    param_matrix,
    per_sample_grads,
    rel_err,
    snapshot,
    straight_and_resumed,
)
from ds_hylo import HyLo, kernels

LAM = 0.1
ALL_MODES = ["sngd", "kis", "kid", "hybrid"]


def _natural(model: nn.Module, mode: str, **kwargs) -> HyLo:
    options = dict(lr=1.0, base="sgd", momentum=0.0, weight_decay=0.0, damping=LAM, mode=mode, rank_ratio=1.0,
                   update_freq=1, step_scale="natural")
    options.update(kwargs)
    return HyLo(model, **options)


def _step(model: nn.Module, opt: HyLo, loss_of, names):
    """One optimizer step; returns ({layer: delta [W|b]}, {layer: gradient [W|b] before the step})."""
    modules = dict(model.named_modules())
    before = {n: param_matrix(modules[n]) for n in names}
    opt.zero_grad()
    loss_of(model).backward()
    grads = {n: grad_matrix(modules[n]) for n in names}
    opt.step()
    return {n: param_matrix(modules[n]) - before[n] for n in names}, grads


# --------------------------------------------------------------------------- dense-reference cases
# Each case: (model, loss_of(model) -> batch loss, reference rows(model) -> {layer: (N, D)}, HyLo kwargs).


def _case_linear(bias: bool):
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(5, 4, bias=bias)).to(DT)
    x, y = torch.randn(8, 5, dtype=DT), torch.randn(8, 4, dtype=DT)

    def rows(m):
        return {"0": layer_rows_from_grads(per_sample_grads(m, mse, x, y), "0", has_bias=bias)}

    return model, lambda m: mse(m(x), y), rows, {}


def _case_mlp():
    torch.manual_seed(11)
    model = MLP(6, 5, 3).to(DT)
    x, y = torch.randn(8, 6, dtype=DT), torch.randint(0, 3, (8,))

    def rows(m):
        psg = per_sample_grads(m, cross_entropy, x, y)
        return {name: layer_rows_from_grads(psg, name) for name in ("fc1", "fc2")}

    return model, lambda m: cross_entropy(m(x), y), rows, {}


def _case_conv(kwargs):
    torch.manual_seed(12)
    model = ConvNet(**kwargs).to(DT)
    x, y = torch.randn(5, 2, 7, 8, dtype=DT), torch.randn(5, 2, dtype=DT)

    def loss_of(m):
        return mse(m(x), y)

    def rows(m):
        x_in, dldz, _ = layer_io(m, "conv", loss_of)
        return {
            "conv": conv_surrogate_rows(m.conv, x_in, dldz),  # the "reduce" rank-1 surrogate
            "fc": layer_rows_from_grads(per_sample_grads(m, mse, x, y), "fc"),  # exact
        }

    return model, loss_of, rows, {}


def _case_sequence(convention: str):
    torch.manual_seed(13)
    model = TokenMLP().to(DT)
    batch, seq = 3, 4
    x, y = torch.randn(batch, seq, 4, dtype=DT), torch.randn(batch, 3, dtype=DT)

    def loss_of(m):  # mixes positions: not a sum of per-token losses
        return ((torch.tanh(m(x)).mean(dim=1) - y) ** 2).mean()

    def rows(m):
        out = {}
        for name in ("inp", "out"):
            x_in, dldz, _ = layer_io(m, name, loss_of)
            if convention == "expand":  # every position a sample: u_bt = B T dL/dz_bt [x_bt, 1]^T
                g = batch * seq * dldz.reshape(-1, dldz.shape[-1])
                a = x_in.reshape(-1, x_in.shape[-1])
            else:  # per sequence: g_b = B sum_t dL/dz_bt, a_b = mean_t x_bt
                g = batch * dldz.sum(dim=1)
                a = x_in.mean(dim=1)
            out[name] = outer_rows(g, a, has_bias=True)
        return out

    return model, loss_of, rows, {"sequence_convention": convention}


CASES = {
    "linear": lambda: _case_linear(True),
    "linear_nobias": lambda: _case_linear(False),
    "mlp": _case_mlp,
    **{f"conv[{conv_id(kw)}]": (lambda kw=kw: _case_conv(kw)) for kw in CONV_VARIANTS},
    "seq_expand": lambda: _case_sequence("expand"),
    "seq_reduce": lambda: _case_sequence("reduce"),
}


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_one_step_equals_dense_natural_gradient(case, mode):
    model, loss_of, reference_rows, kwargs = CASES[case]()
    rows = reference_rows(model)
    opt = _natural(model, mode, **kwargs)
    assert set(opt.preconditioner.layers) == set(rows)
    deltas, grads = _step(model, opt, loss_of, list(rows))
    for name, layer_rows in rows.items():
        if not case.startswith("conv") or name == "fc":
            if not (case == "seq_reduce"):  # exact per-sample rows average to the batch gradient
                torch.testing.assert_close(layer_rows.mean(0), grads[name].reshape(-1), rtol=1e-10, atol=1e-12)
        expected = -dense_natural_step(layer_rows, grads[name], LAM)
        assert rel_err(deltas[name], expected) < 1e-8, (name, rel_err(deltas[name], expected))
        # a real preconditioner, not a rescaled gradient
        assert rel_err(deltas[name], -grads[name] / LAM) > 1e-3
    assert opt.preconditioner.refreshes == 1 and opt.preconditioner.nonfinite_events == 0


@pytest.mark.parametrize("mode", ["sngd", "kis", "kid"])
def test_sgd_step_scale_is_damping_times_natural(mode):
    model, loss_of, _, _ = _case_mlp()
    twin = copy.deepcopy(model)
    natural, _ = _step(model, _natural(model, mode), loss_of, ["fc1", "fc2"])
    scaled, _ = _step(twin, _natural(twin, mode, step_scale="sgd"), loss_of, ["fc1", "fc2"])
    for name in natural:
        torch.testing.assert_close(scaled[name], LAM * natural[name], rtol=1e-12, atol=1e-15)


def test_sum_loss_reduction():
    """loss_reduction="sum": u_i = d l_i/dW, F = (1/N) sum u u^T, grad = sum_i u_i."""
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(4, 3)).to(DT)
    x, y = torch.randn(6, 4, dtype=DT), torch.randn(6, 3, dtype=DT)

    def sum_mse(out, target):
        return F.mse_loss(out, target, reduction="sum")

    rows = layer_rows_from_grads(per_sample_grads(model, sum_mse, x, y), "0")
    opt = _natural(model, "sngd", loss_reduction="sum")
    deltas, grads = _step(model, opt, lambda m: sum_mse(m(x), y), ["0"])
    torch.testing.assert_close(rows.sum(0), grads["0"].reshape(-1), rtol=1e-10, atol=1e-12)
    assert rel_err(deltas["0"], -dense_natural_step(rows, grads["0"], LAM)) < 1e-8


# --------------------------------------------------------------------------- refresh schedule


def _mlp_batches(steps: int, n: int = 8, seed: int = 0, dtype=DT):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 6, generator=gen, dtype=dtype), torch.randint(0, 3, (n,), generator=gen))
            for _ in range(steps)]


@pytest.mark.parametrize("mode", ["sngd", "kis", "kid"])
def test_refresh_every_update_freq_steps_and_reuse_between(mode):
    torch.manual_seed(15)
    model = MLP(6, 5, 3).to(DT)
    opt = _natural(model, mode, update_freq=3, rank_ratio=0.5)
    pre = opt.preconditioner
    previous = None
    for step, (x, y) in enumerate(_mlp_batches(7)):
        assert pre.steps == step
        assert all(layer.enabled == (step % 3 == 0) for layer in pre.layers.values())
        stored = dict(pre.factors)
        deltas, grads = _step(model, opt, lambda m: cross_entropy(m(x), y), ["fc1", "fc2"])
        assert pre.refreshes == step // 3 + 1
        for name in ("fc1", "fc2"):
            current = pre.factors[name]
            if step % 3 == 0:
                assert previous is None or current is not previous[name]
                assert current.a.shape[0] == (8 if mode == "sngd" else 4)  # sngd keeps all; else 0.5 of 8
            else:
                assert current is previous[name]
                assert current is stored[name]
                # stored (A_S, G_S, C) applied to the NEW gradient
                expected = -kernels.apply_smw(grads[name], current.a, current.g, current.c, current.damping)
                torch.testing.assert_close(deltas[name], expected, rtol=1e-12, atol=1e-14)
                assert not all(layer.has_data() for layer in pre.layers.values())
        previous = dict(pre.factors)
    assert pre.refreshes == 3


# --------------------------------------------------------------------------- resume


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        cross_entropy(model(x), y).backward()
        opt.step()


def _model_and_hylo(options):
    model = MLP(6, 5, 3)
    return model, HyLo(model, **options)


def _resume_options(mode):
    options = dict(lr=0.05, base="sgd", momentum=0.9, damping=0.1, mode=mode, rank_ratio=0.5, update_freq=2, seed=3)
    if mode == "hybrid":
        options.update(switch_window=2, switch_threshold=0.1)
    return options


@pytest.mark.parametrize("mode", ["kis", "kid", "hybrid"])
def test_resume_is_bit_identical(mode, tmp_path):
    batches = _mlp_batches(9, seed=1, dtype=torch.float32)
    options = _resume_options(mode)
    straight, straight_opt, resumed, resumed_opt = straight_and_resumed(
        lambda: _model_and_hylo(options), _train, batches, 3, tmp_path / "ckpt.pt"
    )

    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    a, b = straight_opt.preconditioner, resumed_opt.preconditioner
    assert (a.steps, a.refreshes) == (b.steps, b.refreshes) == (9, 5)
    if mode == "hybrid":
        assert a.policy.history == b.policy.history
        assert len(a.policy.history) > 1, "the hybrid policy never switched: the test would not cover it"
        assert {m for _, _, m in a.policy.history} == {"kid", "kis"}


def _optimizer_state(opt: HyLo) -> dict:
    """Everything a failed load must leave alone: momentum buffers, step counts, factors, generator."""
    pre = opt.preconditioner
    return copy.deepcopy({
        "momentum": [opt.state[p].get("momentum_buffer") for group in opt.param_groups for p in group["params"]],
        "groups": [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups],
        "hylo": pre.state_dict(),
    })


def _assert_unchanged(opt: HyLo, before: dict) -> None:
    after = _optimizer_state(opt)
    assert len(after["momentum"]) == len(before["momentum"])
    for i, (a, b) in enumerate(zip(after["momentum"], before["momentum"])):
        assert (a is None and b is None) or torch.equal(a, b), f"momentum buffer {i} changed"
    assert after["groups"] == before["groups"]
    hylo_after, hylo_before = after["hylo"], before["hylo"]
    assert (hylo_after["steps"], hylo_after["refreshes"]) == (hylo_before["steps"], hylo_before["refreshes"])
    assert set(hylo_after["factors"]) == set(hylo_before["factors"])
    for name, f in hylo_after["factors"].items():
        for key in ("a", "g", "c"):
            assert torch.equal(f[key], hylo_before["factors"][name][key]), f"{name}.{key} changed"
        assert f["mode"] == hylo_before["factors"][name]["mode"]
    assert hylo_after["policy"] == hylo_before["policy"] or str(hylo_after["policy"]) == str(hylo_before["policy"])


def _trained(model, mode, steps, momentum=0.9, seed=0):
    opt = HyLo(model, lr=0.05, base="sgd", momentum=momentum, damping=0.1, mode=mode, rank_ratio=0.5, update_freq=2)
    _train(model, opt, _mlp_batches(steps, seed=seed, dtype=torch.float32))
    return opt


def test_load_state_dict_mode_mismatch_changes_nothing():
    """A kis checkpoint loaded into a kid optimizer: ValueError, and the kid optimizer is as it was.

    Depends on Preconditioner.validate_state_dict (it checks the mode before anything is loaded)."""
    torch.manual_seed(30)
    saved = _trained(MLP(6, 5, 3), "kis", 5).state_dict()
    torch.manual_seed(31)
    opt = _trained(MLP(6, 5, 3), "kid", 2, seed=1)
    before = _optimizer_state(opt)
    with pytest.raises(ValueError, match="kis"):
        opt.load_state_dict(saved)
    _assert_unchanged(opt, before)


@pytest.mark.parametrize("momentum", [0.9, 0.0], ids=["momentum", "no-momentum"])
def test_load_state_dict_width_mismatch_changes_nothing(momentum):
    """A checkpoint of a wider model (same parameter count): ValueError naming the shapes, nothing loaded.

    With momentum the torch.optim part (momentum buffer shapes) already refuses it; without, only the
    factor shapes differ: that case depends on Preconditioner.validate_state_dict."""
    torch.manual_seed(32)
    saved = _trained(MLP(6, 7, 3), "kis", 3, momentum=momentum).state_dict()
    torch.manual_seed(33)
    opt = _trained(MLP(6, 5, 3), "kis", 2, momentum=momentum, seed=1)
    before = _optimizer_state(opt)
    with pytest.raises(ValueError, match=r"shape"):
        opt.load_state_dict(saved)
    _assert_unchanged(opt, before)


def test_load_state_dict_param_group_mismatch_changes_nothing():
    torch.manual_seed(34)
    model = MLP(6, 5, 3)
    saved = _trained(model, "kis", 3).state_dict()
    opt = HyLo(model, params=[{"params": [model.fc1.weight, model.fc1.bias]},
                              {"params": [model.fc2.weight, model.fc2.bias], "lr": 0.01}])
    before = _optimizer_state(opt)
    with pytest.raises(ValueError, match="param group"):
        opt.load_state_dict(saved)
    _assert_unchanged(opt, before)


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(mode="exact"), r"mode='exact'.*'sngd', 'kis', 'kid', 'hybrid'"),
        (dict(rank_ratio=0), r"rank_ratio=0 .*\(0\.0, 1\.0\]"),
        (dict(rank_ratio=1.5), r"rank_ratio=1\.5 .*\(0\.0, 1\.0\]"),
        (dict(damping=-0.1), r"damping=-0\.1 .*\(0\.0, inf\)"),
        (dict(damping=0.0), r"damping=0\.0 .*\(0\.0, inf\)"),
        (dict(lr=-0.1), r"lr=-0\.1 .*\[0\.0, inf\)"),
        (dict(update_freq=0), r"update_freq=0 .*integer >= 1"),
        (dict(update_freq=1.5), r"update_freq=1\.5 .*integer >= 1"),
        (dict(base="sgd", momentum=1.0), r"momentum=1\.0 .*\[0\.0, 1\.0\)"),
        (dict(step_scale="huge"), r"step_scale='huge'.*'sgd', 'natural'"),
        (dict(sequence_convention="flat"), r"sequence_convention='flat'.*'expand', 'reduce'"),
        (dict(kl_clip=0.0), r"kl_clip=0\.0 .*\(0\.0, inf\)"),
        (dict(bogus=1), r"bogus"),
        (dict(damping_target=0.01), r"damping_target and damping_decay_steps"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        HyLo(MLP(), **kwargs)


def test_bad_model_arguments():
    with pytest.raises(TypeError):
        HyLo(list(MLP().parameters()))
    with pytest.raises(ValueError, match="no Linear or Conv2d"):
        HyLo(nn.Sequential(nn.LayerNorm(4)))


# --------------------------------------------------------------------------- non-finite safety


def _poison(monkeypatch, layer):
    """Make the layer's captured output-gradient rows contain +inf from now on."""
    original = layer.take

    def take(scale):
        a, g = original(scale)
        g = g.clone()
        g[0, 0] = float("inf")
        return a, g

    monkeypatch.setattr(layer, "take", take)


@pytest.mark.parametrize("mode", ["sngd", "kis", "kid"])
def test_nonfinite_refresh_keeps_previous_factors(mode, monkeypatch):
    torch.manual_seed(16)
    model = MLP(6, 5, 3).to(DT)
    opt = _natural(model, mode)
    pre = opt.preconditioner
    batches = _mlp_batches(3, seed=2)
    x, y = batches[0]
    _step(model, opt, lambda m: cross_entropy(m(x), y), ["fc1", "fc2"])
    old = dict(pre.factors)
    _poison(monkeypatch, pre.layers["fc1"])

    x, y = batches[1]
    with pytest.warns(RuntimeWarning, match="non-finite"):
        deltas, grads = _step(model, opt, lambda m: cross_entropy(m(x), y), ["fc1", "fc2"])
    assert pre.nonfinite_events == 1
    assert opt.stats()["nonfinite_events"] == 1
    assert pre.factors["fc1"] is old["fc1"], "the poisoned layer must keep its previous factors"
    assert pre.factors["fc2"] is not old["fc2"], "the healthy layer refreshes as usual"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    f = old["fc1"]
    expected = -kernels.apply_smw(grads["fc1"], f.a, f.g, f.c, f.damping)
    torch.testing.assert_close(deltas["fc1"], expected, rtol=1e-12, atol=1e-14)

    x, y = batches[2]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _step(model, opt, lambda m: cross_entropy(m(x), y), ["fc1", "fc2"])
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], "warn once, then count"
    assert pre.nonfinite_events == 2
    assert pre.factors["fc1"] is old["fc1"]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_first_refresh_falls_back_to_plain_gradient(monkeypatch):
    torch.manual_seed(17)
    model = MLP(6, 5, 3).to(DT)
    opt = _natural(model, "sngd", lr=0.5)
    _poison(monkeypatch, opt.preconditioner.layers["fc1"])
    x, y = _mlp_batches(1, seed=3)[0]
    with pytest.warns(RuntimeWarning):
        deltas, grads = _step(model, opt, lambda m: cross_entropy(m(x), y), ["fc1", "fc2"])
    assert "fc1" not in opt.preconditioner.factors and "fc2" in opt.preconditioner.factors
    torch.testing.assert_close(deltas["fc1"], -0.5 * grads["fc1"], rtol=1e-12, atol=1e-15)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_dead_layer_does_not_crash_kis():
    """fc2 = 0 makes every captured output gradient of fc1 zero: the KIS draw must still work."""
    torch.manual_seed(18)
    model = MLP(6, 5, 3).to(DT)
    with torch.no_grad():
        model.fc2.weight.zero_()
    opt = HyLo(model, lr=0.1, damping=LAM, mode="kis", rank_ratio=0.5, update_freq=1)
    x, y = _mlp_batches(1)[0]
    deltas, grads = _step(model, opt, lambda m: cross_entropy(m(x), y), ["fc1", "fc2"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.preconditioner.factors["fc1"].a.shape[0] == 4
    torch.testing.assert_close(deltas["fc1"], -0.1 * grads["fc1"])  # zero kernel: v = lam * grad / lam


# --------------------------------------------------------------------------- fallback and skipping


class _Mixed(nn.Module):
    """Embedding/LayerNorm tokens and grouped-conv/BatchNorm images into Linear and Conv2d layers."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4, scale_grad_by_freq=True)  # no kernel: its gradient divides by token counts
        self.ln = nn.LayerNorm(4)
        self.tok = nn.Linear(4, 3)
        self.gconv = nn.Conv2d(2, 4, 3, groups=2)
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 3, 3)
        self.head = nn.Linear(6, 2)

    def forward(self, tokens, images):
        t = self.tok(self.ln(self.emb(tokens))).mean(dim=1)
        c = self.conv(torch.relu(self.bn(self.gconv(images)))).mean(dim=(2, 3))
        return self.head(torch.cat([t, c], dim=1))


def test_fallback_and_skipped_layers_get_plain_sgd():
    torch.manual_seed(19)
    model = _Mixed().to(DT)
    lr, momentum = 0.1, 0.9
    opt = HyLo(model, lr=lr, base="sgd", momentum=momentum, damping=LAM, mode="sngd", rank_ratio=1.0, update_freq=1,
               skip_layers=["he*"])
    pre = opt.preconditioner
    assert sorted(pre.fallback_layers) == sorted(
        ["emb (Embedding)", "ln (LayerNorm)", "gconv (Conv2d)", "bn (BatchNorm2d)"]
    )
    assert pre.skipped_layers == ["head"]
    assert set(pre.layers) == {"tok", "conv"}
    plain = [n for n, _ in model.named_parameters() if n.split(".")[0] in {"emb", "ln", "gconv", "bn", "head"}]
    preconditioned = [n for n, _ in model.named_parameters() if n.split(".")[0] in {"tok", "conv"}]
    params = dict(model.named_parameters())
    buffers = {}
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        tokens = torch.randint(0, 10, (5, 3), generator=gen)
        images = torch.randn(5, 2, 6, 6, generator=gen, dtype=DT)
        labels = torch.randint(0, 2, (5,), generator=gen)
        before = snapshot(model)
        opt.zero_grad()
        cross_entropy(model(tokens, images), labels).backward()
        grads = {n: p.grad.clone() for n, p in params.items()}
        opt.step()
        for n in plain:  # torch.optim.SGD's recurrence: buf = momentum * buf + grad; p -= lr * buf
            buffers[n] = grads[n].clone() if n not in buffers else momentum * buffers[n] + grads[n]
            torch.testing.assert_close(params[n].detach(), before[n] - lr * buffers[n], rtol=1e-12, atol=1e-15)
        for n in preconditioned:
            assert rel_err(params[n].detach() - before[n], -lr * grads[n]) > 1e-3, n


# --------------------------------------------------------------------------- damping and learning rate


def test_damping_geometric_decay_schedule():
    torch.manual_seed(20)
    model = MLP(6, 5, 3).to(DT)
    opt = _natural(model, "sngd", damping=1.0, damping_target=0.01, damping_decay_steps=4)
    expected = {0: 1.0, 1: 0.01**0.25, 2: 0.1, 4: 0.01, 6: 0.01}
    for step, (x, y) in enumerate(_mlp_batches(7, seed=5)):
        lam = 1.0 * 0.01 ** (min(step, 4) / 4)
        if step in expected:
            assert math.isclose(opt.damping, expected[step], rel_tol=1e-12)
        assert math.isclose(opt.damping, lam, rel_tol=1e-12)
        assert math.isclose(opt.stats()["damping"], lam, rel_tol=1e-12)
        psg = per_sample_grads(model, cross_entropy, x, y)
        deltas, grads = _step(model, opt, lambda m: cross_entropy(m(x), y), ["fc1", "fc2"])
        for name in ("fc1", "fc2"):
            assert math.isclose(opt.preconditioner.factors[name].damping, lam, rel_tol=1e-12)
            reference = -dense_natural_step(layer_rows_from_grads(psg, name), grads[name], lam)
            assert rel_err(deltas[name], reference) < 1e-8


def test_callable_damping():
    torch.manual_seed(21)
    model = MLP(6, 5, 3).to(DT)

    def schedule(step):
        return 0.5 / (1 + step)

    opt = _natural(model, "kid", damping=schedule)
    for step, (x, y) in enumerate(_mlp_batches(3, seed=6)):
        assert math.isclose(opt.damping, schedule(step))
        psg = per_sample_grads(model, cross_entropy, x, y)
        deltas, grads = _step(model, opt, lambda m: cross_entropy(m(x), y), ["fc1"])
        assert opt.preconditioner.factors["fc1"].damping == schedule(step)
        reference = -dense_natural_step(layer_rows_from_grads(psg, "fc1"), grads["fc1"], schedule(step))
        assert rel_err(deltas["fc1"], reference) < 1e-8

    bad = HyLo(MLP(6, 5, 3), damping=lambda step: -1.0)
    with pytest.raises(ValueError, match="damping"):
        bad.damping


def test_lr_scheduler_drives_the_step():
    torch.manual_seed(22)
    model = MLP(6, 5, 3).to(DT)
    opt = HyLo(model, lr=0.4, base="sgd", damping=LAM, mode="kis", rank_ratio=0.5, update_freq=2)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for step, (x, y) in enumerate(_mlp_batches(4, seed=7)):
        lr = 0.4 * 0.5**step
        assert math.isclose(opt.param_groups[0]["lr"], lr)
        before = snapshot(model)
        opt.zero_grad()
        cross_entropy(model(x), y).backward()
        opt.step()
        scheduler.step()
        for name, p in model.named_parameters():  # p.grad now holds the preconditioned direction
            torch.testing.assert_close(p.detach() - before[name], -lr * p.grad, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------- momentum / nesterov / weight decay


@pytest.mark.parametrize(
    "sgd_options",
    [
        dict(momentum=0.9),
        dict(momentum=0.9, nesterov=True, weight_decay=0.01),
        dict(momentum=0.5, dampening=0.1, weight_decay=0.05),
    ],
    ids=["momentum", "nesterov+wd", "dampening+wd"],
)
@pytest.mark.parametrize("step_scale", ["sgd", "natural"])
def test_equals_torch_sgd_on_preconditioned_gradient(sgd_options, step_scale):
    torch.manual_seed(23)
    model = MLP(6, 5, 3).to(DT)
    reference = copy.deepcopy(model)  # before HyLo registers its hooks
    lr = 0.05
    opt = HyLo(model, lr=lr, base="sgd", damping=LAM, mode="sngd", rank_ratio=1.0, update_freq=1,
               step_scale=step_scale, **sgd_options)
    sgd = torch.optim.SGD(reference.parameters(), lr=lr, **sgd_options)
    ref_modules = dict(reference.named_modules())
    for x, y in _mlp_batches(4, seed=8):
        # reference: precondition by the dense float64 solve, then plain torch SGD
        psg = per_sample_grads(reference, cross_entropy, x, y)
        sgd.zero_grad()
        cross_entropy(reference(x), y).backward()
        for name in ("fc1", "fc2"):
            module = ref_modules[name]
            direction = dense_natural_step(layer_rows_from_grads(psg, name), grad_matrix(module), LAM)
            if step_scale == "sgd":
                direction = LAM * direction
            module.weight.grad.copy_(direction[:, :-1])
            module.bias.grad.copy_(direction[:, -1])
        sgd.step()

        opt.zero_grad()
        cross_entropy(model(x), y).backward()
        opt.step()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert rel_err(p.detach(), q.detach()) < 1e-10, name


# --------------------------------------------------------------------------- KL clipping


@pytest.mark.parametrize("mode", ["sngd", "kis"])
def test_kl_clip_scales_update(mode):
    torch.manual_seed(24)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    twin = copy.deepcopy(model)
    lr, kl_clip = 0.3, 1e-6
    options = dict(lr=lr, base="sgd", damping=LAM, mode=mode, rank_ratio=0.5, update_freq=1, seed=1)
    free = HyLo(model, **options)
    clipped = HyLo(twin, kl_clip=kl_clip, **options)
    x, y = _mlp_batches(1, seed=9)[0]

    def run(m, opt):
        before = snapshot(m)
        opt.zero_grad()
        cross_entropy(m(x), y).backward()
        raw = {n: p.grad.clone() for n, p in m.named_parameters()}
        opt.step()
        return {n: p.detach() - before[n] for n, p in m.named_parameters()}, raw, {
            n: p.grad.clone() for n, p in m.named_parameters()}

    free_delta, raw, direction = run(model, free)
    clip_delta, raw_twin, _ = run(twin, clipped)
    for n in raw:
        assert torch.equal(raw[n], raw_twin[n])
    layer_params = [n for n in raw if n.split(".")[0] in {"0", "3"}]
    vg = lr**2 * sum(float((direction[n] * raw[n]).sum()) for n in layer_params)
    nu = min(1.0, math.sqrt(kl_clip / vg))
    assert nu < 0.5
    assert math.isclose(clipped.stats()["kl_scale"], nu, rel_tol=1e-9)
    assert free.stats()["kl_scale"] == 1.0
    for n in raw:
        if n in layer_params:
            torch.testing.assert_close(clip_delta[n], nu * free_delta[n], rtol=1e-9, atol=1e-15)
        else:  # LayerNorm: first-order fallback, not clipped
            torch.testing.assert_close(clip_delta[n], free_delta[n], rtol=0, atol=0)

    # a generous budget leaves the update alone
    loose = copy.deepcopy(twin)
    loose_opt = HyLo(loose, kl_clip=1e6, **options)
    run(loose, loose_opt)
    assert loose_opt.stats()["kl_scale"] == 1.0


# --------------------------------------------------------------------------- reporting


def test_reporting_api():
    torch.manual_seed(25)
    model = MLP(6, 5, 3)
    opt = HyLo(model, mode="hybrid", rank_ratio=0.5, update_freq=2)
    assert opt.layer_modes() == {"fc1": "kid", "fc2": "kid"}
    _train(model, opt, _mlp_batches(3, dtype=torch.float32))
    stats = opt.stats()
    assert stats["step"] == 3 and stats["refreshes"] == 2 and stats["nonfinite_events"] == 0
    assert set(stats["modes"]) == {"fc1", "fc2"}
    timing = opt.timing_summary()
    for phase in ("capture", "reduce", "invert", "apply"):
        assert phase in timing and timing[phase]["seconds"] >= 0.0
    state = opt.preconditioner.state_dict()
    assert state["steps"] == 3 and set(state["factors"]) == {"fc1", "fc2"}


# ------------------------------------------------------------- default weight decay vs torch's AdamW
def _weight_decay_notes(caplog, build) -> list[str]:
    """The ``ds_hylo`` warnings about the default weight decay that ``build()`` logs."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ds_hylo"):
        build()
    return [r.getMessage() for r in caplog.records if r.name == "ds_hylo" and "weight_decay" in r.getMessage()]


def test_default_weight_decay_differs_from_adamw_said_once(caplog, monkeypatch):
    """base="adamw" without weight_decay: HyLo decays by 0.0 where torch.optim.AdamW decays by 0.01,
    which one warning per process says (the first HyLo built that way), never a UserWarning."""
    import ds_hylo.optimizer as optimizer_module

    assert HyLo(MLP(4, 3, 2)).config.weight_decay == 0.0 and torch.optim.AdamW([torch.zeros(1)]).defaults[
        "weight_decay"] == 0.01  # the difference the note is about
    monkeypatch.setattr(optimizer_module, "_weight_decay_noted", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no UserWarning
        first = _weight_decay_notes(caplog, lambda: HyLo(MLP(4, 3, 2)))
    assert first == ["HyLo's default weight_decay is 0.0 (torch.optim.AdamW's is 0.01); pass weight_decay=0.01 "
                     "to match AdamW"]
    assert _weight_decay_notes(caplog, lambda: HyLo(MLP(4, 3, 2), base="adamw")) == []  # once per process


@pytest.mark.parametrize("build", [
    lambda model: HyLo(model, weight_decay=0.0),
    lambda model: HyLo(model, weight_decay=0.01),
    lambda model: HyLo(model, base="sgd"),
    lambda model: HyLo(model, params=[{"params": list(model.parameters()), "weight_decay": 0.0}]),
], ids=["explicit-0.0", "explicit-0.01", "base-sgd", "groups-give-it"])
def test_explicit_weight_decay_or_sgd_base_says_nothing(caplog, monkeypatch, build):
    import ds_hylo.optimizer as optimizer_module

    monkeypatch.setattr(optimizer_module, "_weight_decay_noted", False)
    assert _weight_decay_notes(caplog, lambda: build(MLP(4, 3, 2))) == []
    assert _weight_decay_notes(caplog, lambda: HyLo(MLP(4, 3, 2))) != []  # still unsaid: the next default one says it


def test_default_weight_decay_note_is_said_for_a_deepspeed_json_without_it(caplog, monkeypatch):
    """The DeepSpeed JSON's params are HyLo's options: without "weight_decay" there, the note comes."""
    pytest.importorskip("deepspeed")
    import ds_hylo.optimizer as optimizer_module
    from ds_hylo.accelerate import build_hylo

    config = {"train_batch_size": 8, "optimizer": {"type": "HyLo", "params": {"lr": 1e-3}}}
    monkeypatch.setattr(optimizer_module, "_weight_decay_noted", False)
    with_decay = {**config, "optimizer": {"type": "HyLo", "params": {"lr": 1e-3, "weight_decay": 0.0}}}
    assert _weight_decay_notes(caplog, lambda: build_hylo(MLP(4, 3, 2), with_decay)) == []
    assert len(_weight_decay_notes(caplog, lambda: build_hylo(MLP(4, 3, 2), config))) == 1
