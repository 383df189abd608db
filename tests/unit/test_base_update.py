"""HyLo's base update (base="sgd" | "adamw") and the grafting functions of ds_hylo.base_update.

The base update must be torch's own: bit-for-bit torch.optim.AdamW on the parameters HyLo does
not precondition and on the preconditioned gradient of those it does, with torch's state
(exp_avg, exp_avg_sq, step), checkpoints that resume bit-exactly, LR schedulers that drive it,
and ZeRO-1's flat partitions (2 ranks == 1 process). Grafting is checked against hand computations.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from conftest import MLP, cross_entropy
from ds_hylo import HyLo, HyLoConfig
from ds_hylo.base_update import (
    BaseUpdate,
    Grafting,
    adam_graft_direction,
    graft_scale,
    make_grafting,
)

DT = torch.float64
ADAMW = dict(base="adamw", lr=0.01, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.05,
             mode="sngd", rank_ratio=1.0, damping=0.1, update_freq=2)


class TwoBranch(nn.Module):
    """A preconditioned Linear branch and a first-order branch (LayerNorm + a bare parameter) whose
    losses are added: the fallback branch's gradients never depend on the Linear's weights."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.norm = nn.LayerNorm(4)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def losses(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        first_order = ((self.norm(z) * self.scale - 0.3) ** 2).mean()
        return cross_entropy(self.fc(x), y) + first_order


def _batches(steps: int, seed: int = 0, n: int = 8):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 5, generator=gen, dtype=DT), torch.randint(0, 3, (n,), generator=gen),
             torch.randn(n, 4, generator=gen, dtype=DT)) for _ in range(steps)]


def _two_branch(seed: int = 3) -> TwoBranch:
    torch.manual_seed(seed)
    return TwoBranch().to(DT)


# ------------------------------------------------------------------------ AdamW base: torch's own
def test_first_order_parameters_follow_torch_adamw_bit_for_bit():
    """Parameters HyLo does not precondition get exactly torch.optim.AdamW's update, state and
    schedule (LambdaLR driving lr every step)."""
    model = _two_branch()
    twin = copy.deepcopy(model)
    opt = HyLo(model, **ADAMW)
    fallback = [twin.norm.weight, twin.norm.bias, twin.scale]
    ref = torch.optim.AdamW(fallback, lr=0.01, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda s: 1.0 / (1 + s))
    start = [p.detach().clone() for p in fallback]
    for x, y, z in _batches(5):
        for o, m in ((opt, model), (ref, twin)):
            o.zero_grad()
            m.losses(x, y, z).backward()
            o.step()
        sched.step()
        ref_sched.step()
    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == pytest.approx(0.01 / 6, rel=1e-15)
    for p, q, p0 in zip([model.norm.weight, model.norm.bias, model.scale], fallback, start):
        assert not torch.equal(q, p0)
        assert torch.equal(p, q)
        assert set(opt.state[p]) == set(ref.state[q]) == {"step", "exp_avg", "exp_avg_sq"}
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], ref.state[q][key]), key
    assert opt.preconditioner.layers.keys() == {"fc"}


def test_preconditioned_layer_gets_torch_adamw_of_the_preconditioned_gradient():
    """On the preconditioned layer, HyLo's update is AdamW's applied to HyLo's direction (which
    ``step()`` leaves in ``.grad``), and that direction is not the raw gradient."""
    model = _two_branch()
    opt = HyLo(model, **ADAMW)
    shadow = [p.detach().clone() for p in (model.fc.weight, model.fc.bias)]
    ref = torch.optim.AdamW(shadow, lr=0.01, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.05)
    for x, y, z in _batches(4):
        opt.zero_grad()
        model.losses(x, y, z).backward()
        raw = model.fc.weight.grad.clone()
        opt.step()
        assert (model.fc.weight.grad - raw).abs().max() > 1e-3 * raw.abs().max(), "nothing preconditioned"
        for s, p in zip(shadow, (model.fc.weight, model.fc.bias)):
            s.grad = p.grad.clone()
        ref.step()
        for s, p in zip(shadow, (model.fc.weight, model.fc.bias)):
            assert torch.equal(s, p)


def test_sgd_base_state_dict_is_torch_sgd_format():
    """base="sgd" (the default) keeps torch.optim.SGD's format: momentum_buffer, SGD's group keys;
    its state dict loads into torch.optim.SGD and SGD's loads into HyLo."""
    torch.manual_seed(0)
    model = MLP(5, 4, 3).to(DT)
    opt = HyLo(model, lr=0.1, base="sgd", momentum=0.9, mode="sngd", rank_ratio=1.0)
    x, y = torch.randn(8, 5, dtype=DT), torch.randint(0, 3, (8,))
    cross_entropy(model(x), y).backward()
    opt.step()
    state = opt.state_dict()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert set(state["param_groups"][0]) == set(sgd.state_dict()["param_groups"][0])
    assert all(set(s) == {"momentum_buffer"} for s in state["state"].values())
    sgd.load_state_dict({k: v for k, v in state.items() if k != "hylo"})
    sgd_state = sgd.state_dict()
    sgd_state["hylo"] = state["hylo"]
    fresh = HyLo(model, lr=0.1, base="sgd", momentum=0.9, mode="sngd", rank_ratio=1.0)
    fresh.load_state_dict(sgd_state)
    assert torch.equal(fresh.state[model.fc1.weight]["momentum_buffer"], opt.state[model.fc1.weight]["momentum_buffer"])


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_resume_is_bit_exact(base):
    options = ADAMW if base == "adamw" else dict(lr=0.2, base="sgd", momentum=0.9, weight_decay=1e-3, mode="sngd",
                                                 rank_ratio=1.0, damping=0.1, update_freq=2)
    batches = _batches(7, seed=5)

    def train(model, opt, part):
        for x, y, z in part:
            opt.zero_grad()
            model.losses(x, y, z).backward()
            opt.step()

    model = _two_branch()
    opt = HyLo(model, **options)
    train(model, opt, batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, batches[3:])

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _two_branch(seed=99)
    resumed.load_state_dict(saved["model"])
    resumed_opt = HyLo(resumed, **options)
    resumed_opt.load_state_dict(saved["opt"])
    train(resumed, resumed_opt, batches[3:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_checkpoint_of_another_base_is_refused_and_changes_nothing():
    model = _two_branch()
    sgd = HyLo(model, lr=0.1, base="sgd", momentum=0.9, mode="sngd", rank_ratio=1.0)
    adamw = HyLo(model, **ADAMW)
    x, y, z = _batches(1)[0]
    for opt in (sgd, adamw):
        opt.zero_grad()
        model.losses(x, y, z).backward()
        opt.step()
    before = copy.deepcopy(adamw.state_dict())
    with pytest.raises(ValueError, match=r"lacks \['betas', 'eps', 'amsgrad'\].*base='adamw'"):
        adamw.load_state_dict(sgd.state_dict())
    after = adamw.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for key, entry in before["state"].items():
        assert all(torch.equal(entry[k], after["state"][key][k]) for k in entry)
    with pytest.raises(ValueError, match=r"lacks \['momentum', 'dampening', 'nesterov'\].*base='sgd'"):
        sgd.load_state_dict(before)


def test_one_cycle_lr_drives_lr_and_betas():
    """Schedulers that cycle momentum find AdamW's betas in HyLo's groups, and the update uses them."""
    model = _two_branch()
    opt = HyLo(model, **ADAMW)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10, base_momentum=0.7,
                                                max_momentum=0.9)
    seen = []
    for x, y, z in _batches(3):
        opt.zero_grad()
        model.losses(x, y, z).backward()
        opt.step()
        sched.step()
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[0]["betas"][0]))
    assert len({lr for lr, _ in seen}) == 3 and len({b for _, b in seen}) == 3


def test_grad_scaler_with_adamw_matches_no_scaler():
    batches = _batches(4)

    def run(scaler):
        model = _two_branch()
        opt = HyLo(model, **ADAMW)
        for x, y, z in batches:
            opt.zero_grad()
            loss = model.losses(x, y, z)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
        return model

    plain, scaled = run(None), run(torch.amp.GradScaler("cpu", init_scale=2.0**12))
    for p, q in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------ config errors
@pytest.mark.parametrize(
    "options,match",
    [
        ({"base": "adam"}, r"base='adam' is not allowed; choose one of \['sgd', 'adamw'\]"),
        ({"base": "adamw", "betas": [0.9]}, r"betas=\[0.9\] is not allowed; give a list of two floats"),
        ({"base": "adamw", "betas": 0.9}, r"betas=0.9 is not allowed"),
        ({"base": "adamw", "betas": [0.9, 1.0]}, r"betas\[1\]=1.0 is out of range; allowed: \[0.0, 1.0\)"),
        ({"base": "adamw", "betas": [-0.1, 0.9]}, r"betas\[0\]=-0.1 is out of range"),
        ({"base": "adamw", "eps": 0.0}, r"eps=0.0 is out of range; allowed: \(0.0, inf\)"),
        ({"base": "adamw", "eps": float("nan")}, r"eps=nan is out of range"),
        ({"base": "adamw", "momentum": 0.9}, r"momentum=0.9 applies to base='sgd' only"),
        ({"base": "sgd", "eps": 1e-6}, r"eps=1e-06 is used only by base='adamw' or graft='adamw'"),
        ({"base": "sgd", "betas": [0.5, 0.9]}, r"betas=\[0.5, 0.9\] is used only by base='adamw'"),
        ({"graft": "adam"}, r"graft='adam' is not allowed; choose one of \['none', 'sgd', 'adamw'\]"),
    ],
)
def test_bad_base_options_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        HyLoConfig.from_dict(options)
    with pytest.raises(ValueError, match=match):
        HyLo(MLP(), **options)


def test_json_style_params_build_an_adamw_base():
    config = HyLoConfig.from_dict({"base": "adamw", "betas": [0.85, 0.95], "eps": 1e-6, "lr": 1e-3})
    opt = HyLo(MLP(), **{k: getattr(config, k) for k in ("base", "betas", "eps", "lr")})
    assert opt.param_groups[0]["betas"] == (0.85, 0.95) and opt.param_groups[0]["eps"] == 1e-6
    assert "momentum" not in opt.param_groups[0]


@pytest.mark.parametrize("mode", ["kis", "kid"])
def test_sgd_grafting_gives_each_layer_the_raw_gradients_length(mode):
    """graft='sgd' end to end: per layer, the update has HyLo's direction and the plain gradient's norm."""
    torch.manual_seed(0)
    model = MLP(5, 4, 3).to(torch.float64)
    opt = HyLo(model, lr=0.1, base="sgd", mode=mode, rank_ratio=0.5, update_freq=1, damping=0.3, graft="sgd")
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(16, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        cross_entropy(model(x), y).backward()
        raw = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        for layer in ("fc1", "fc2"):
            step = torch.cat([(before[f"{layer}.{k}"] - dict(model.named_parameters())[f"{layer}.{k}"].detach())
                              .reshape(4 if layer == "fc1" else 3, -1) for k in ("weight", "bias")], dim=1) / 0.1
            grad = torch.cat([raw[f"{layer}.{k}"].reshape(step.shape[0], -1) for k in ("weight", "bias")], dim=1)
            assert torch.allclose(step.norm(), grad.norm(), rtol=1e-9), layer
            assert not torch.allclose(step, grad), "the direction must be HyLo's, not the plain gradient"


def test_base_update_refuses_unknown_base():
    with pytest.raises(ValueError, match="base='lion'"):
        BaseUpdate("lion", {})


# ------------------------------------------------------------------------------------ grafting
def test_graft_scale_by_hand():
    direction = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=DT)  # norm 5
    assert float(graft_scale(direction, torch.tensor(10.0, dtype=DT))) == 2.0
    assert float(graft_scale(torch.zeros(2, 2, dtype=DT), torch.tensor(1.0, dtype=DT))) == 0.0


def test_adam_graft_direction_by_hand():
    b1, b2, eps = 0.5, 0.75, 0.1
    g1 = torch.tensor([[2.0, -1.0]], dtype=DT)
    g2 = torch.tensor([[0.0, 3.0]], dtype=DT)
    d1, s1 = adam_graft_direction(g1, None, (b1, b2), eps)
    # step 1: m_hat = g, v_hat = g^2 -> g / (|g| + eps)
    torch.testing.assert_close(d1, torch.tensor([[2 / 2.1, -1 / 1.1]], dtype=DT), rtol=1e-14, atol=0)
    d2, s2 = adam_graft_direction(g2, s1, (b1, b2), eps)
    m = torch.tensor([[0.5 * 0.5 * 2, 0.5 * 0.5 * -1 + 0.5 * 3]], dtype=DT)  # (1-b1) (b1 g1 + g2)
    v = torch.tensor([[0.25 * 0.75 * 4, 0.25 * 0.75 * 1 + 0.25 * 9]], dtype=DT)
    m_hat, v_hat = m / (1 - b1**2), v / (1 - b2**2)
    torch.testing.assert_close(d2, m_hat / (v_hat.sqrt() + eps), rtol=1e-14, atol=0)
    assert s2.step == 2 and s1.step == 1 and torch.equal(s1.exp_avg, (1 - b1) * g1), "inputs must not change"


def test_adam_graft_direction_is_minus_one_torch_adam_step():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 4, generator=gen, dtype=DT) for _ in range(3)]
    state = None
    for g in grads:
        param = torch.zeros(3, 4, dtype=DT, requires_grad=True)
        adam = torch.optim.Adam([param], lr=1.0, betas=(0.8, 0.9), eps=1e-3)
        if state is not None:
            adam.state[param] = {"step": torch.tensor(float(state.step)), "exp_avg": state.exp_avg.clone(),
                                 "exp_avg_sq": state.exp_avg_sq.clone()}
        param.grad = g
        adam.step()
        direction, state = adam_graft_direction(g, state, (0.8, 0.9), 1e-3)
        assert torch.equal(direction, -param.detach())


def test_sgd_grafting_gives_the_raw_norm_and_keeps_the_direction():
    raw = torch.tensor([[1.0, 2.0], [2.0, 0.0]], dtype=DT)  # norm 3
    direction = torch.tensor([[0.0, 0.5], [0.0, 0.0]], dtype=DT)
    (out,) = Grafting("sgd").rescale([("fc", raw, direction)])
    torch.testing.assert_close(out, torch.tensor([[0.0, 3.0], [0.0, 0.0]], dtype=DT), rtol=1e-15, atol=0)


def test_adam_grafting_state_is_two_phase_and_round_trips():
    grafting = make_grafting(HyLoConfig(graft="adamw", betas=(0.5, 0.75), eps=0.1))
    assert isinstance(grafting, Grafting) and make_grafting(HyLoConfig()) is None
    raw = torch.tensor([[2.0, -1.0]], dtype=DT)
    direction = torch.tensor([[1.0, 1.0]], dtype=DT)
    (out,) = grafting.rescale([("fc", raw, direction)])
    adam_norm = math.hypot(2 / 2.1, 1 / 1.1)
    torch.testing.assert_close(out, direction * adam_norm / math.sqrt(2), rtol=1e-14, atol=0)
    assert grafting.states == {}, "moments must stay pending until commit()"
    grafting.discard()
    grafting.commit()
    assert grafting.states == {}, "a discarded step must leave no moments"
    grafting.rescale([("fc", raw, direction)])
    grafting.commit()
    assert grafting.states["fc"].step == 1
    state = grafting.state_dict()
    other = Grafting("adamw", (0.5, 0.75), 0.1)
    other.load_state_dict(state, {"fc": (1, 2)}, {"fc": torch.device("cpu")})
    (a,) = grafting.rescale([("fc", raw, direction)])
    (b,) = other.rescale([("fc", raw, direction)])
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(state, {"fc": (2, 2)}, {"fc": torch.device("cpu")})
    with pytest.raises(ValueError, match="graft='adamw'.*graft='sgd'"):
        Grafting("sgd").load_state_dict(state, {"fc": (1, 2)}, {"fc": torch.device("cpu")})
    with pytest.raises(ValueError, match="'nope'"):
        Grafting("adamw").load_state_dict({"method": "adamw", "states": {"nope": state["states"]["fc"]}},
                                          {"fc": (1, 2)}, {"fc": torch.device("cpu")})


@pytest.mark.parametrize("method", ["sgd", "adamw"])
def test_grafting_local_gradients_equals_one_process(method):
    """With local gradients and a mean over ranks (simulated for two ranks), the average of the
    ranks' grafted directions equals grafting the averaged gradient in one process: the direction
    is linear (d = P g) and the factor comes from the averaged raw gradient and direction."""
    gen = torch.Generator().manual_seed(1)
    precond = torch.randn(6, 6, generator=gen, dtype=DT)
    raws = [[torch.randn(2, 3, generator=gen, dtype=DT), torch.randn(3, 1, generator=gen, dtype=DT)]
            for _ in range(2)]

    def updates(rank_raws):
        out = [("a", rank_raws[0], (precond @ rank_raws[0].reshape(-1)).reshape(2, 3))]
        return out + [("b", rank_raws[1], 3.0 * rank_raws[1])]

    flats = {}

    def mean_for(rank):
        def all_reduce_mean(flat):
            flats[rank] = flat
            other = _flat(updates(raws[1 - rank]))
            return (flat + other) / 2
        return all_reduce_mean

    ranks = [Grafting(method, (0.8, 0.9), 1e-3) for _ in range(2)]
    local = [ranks[r].rescale(updates(raws[r]), mean_for(r)) for r in range(2)]
    single = Grafting(method, (0.8, 0.9), 1e-3).rescale(updates([(a + b) / 2 for a, b in zip(*raws)]))
    for i in range(2):
        torch.testing.assert_close((local[0][i] + local[1][i]) / 2, single[i], rtol=1e-12, atol=1e-14)
    assert flats[0].numel() == 2 * (6 + 3), "one collective of every raw gradient and direction"


@pytest.mark.parametrize("method", ["sgd", "adamw"])
def test_grafting_with_a_layer_missing_on_one_rank_equals_one_process(method):
    """Rank 1 has no gradient for layer "b" (unused there): the collective keeps its size (zeros for
    "b" on rank 1, laid out over the shared layout) and the average of the ranks' grafted
    directions equals one process on the averaged gradient, in which "b" has half rank 0's."""
    gen = torch.Generator().manual_seed(2)
    raw_a = [torch.randn(2, 3, generator=gen, dtype=DT) for _ in range(2)]
    raw_b = torch.randn(3, 1, generator=gen, dtype=DT)
    layout = [("a", (2, 3), DT), ("b", (3, 1), DT)]
    per_rank = [[("a", raw_a[0], 2.0 * raw_a[0]), ("b", raw_b, -raw_b)], [("a", raw_a[1], 2.0 * raw_a[1])]]
    sent = {}

    def mean_for(rank):
        def all_reduce_mean(flat):
            sent[rank] = flat.numel()
            other = per_rank[1 - rank]
            padded = dict((name, (raw, d)) for name, raw, d in other)
            pieces = [t.reshape(-1) for name, shape, _ in layout
                      for t in (padded.get(name) or (torch.zeros(shape, dtype=DT),) * 2)]
            return (flat + torch.cat(pieces)) / 2
        return all_reduce_mean

    ranks = [Grafting(method, (0.8, 0.9), 1e-3) for _ in range(2)]
    local = [ranks[r].rescale(per_rank[r], mean_for(r), layout=layout) for r in range(2)]
    assert sent[0] == sent[1] == 2 * (6 + 3)
    mean_a = (raw_a[0] + raw_a[1]) / 2
    single = Grafting(method, (0.8, 0.9), 1e-3).rescale([("a", mean_a, 2.0 * mean_a), ("b", raw_b / 2, -raw_b / 2)])
    torch.testing.assert_close((local[0][0] + local[1][0]) / 2, single[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(local[0][1] / 2, single[1], rtol=1e-12, atol=1e-14)


def _flat(updates):
    """The collective's layout: each layer's raw gradient then its direction, layer by layer."""
    return torch.cat([t.reshape(-1) for _, raw, d in updates for t in (raw, d)])


# ------------------------------------------------------------------------------------ ZeRO-1
ZERO_PARAMS = {"lr": 0.02, "mode": "sngd", "rank_ratio": 1.0, "update_freq": 2, "damping": 0.1,
               "base": "adamw", "betas": [0.8, 0.95], "weight_decay": 0.05}


def _zero1_worker(steps: int, ckpt_dir: str) -> dict:
    """In each rank: ZeRO-1 runs with and without accumulation, and a save/resume; one spawn for all."""
    from ds_workers import checkpoint_run, deepspeed_suite, ds_config

    cases = {f"z1-gas{gas}": ds_config(ZERO_PARAMS, stage=1, gas=gas) for gas in (1, 2)}
    out = deepspeed_suite(cases, steps)
    out["checkpoint"] = checkpoint_run(ds_config(ZERO_PARAMS, stage=1), 6, 3, ckpt_dir)
    return out


@pytest.mark.slow
def test_adamw_base_under_zero1_two_ranks_equal_single_process(tmp_path):
    """AdamW on ZeRO-1's flat fp32 partitions: 2 gloo ranks step by step equal one process (with and
    without gradient accumulation), and a ZeRO-1 checkpoint resumes bit-exactly."""
    pytest.importorskip("deepspeed")
    from distributed import run_distributed
    from ds_workers import train_reference

    steps = 4
    reference = train_reference(ZERO_PARAMS, steps)
    sgd_reference = train_reference({**ZERO_PARAMS, "base": "sgd", "betas": [0.9, 0.999]}, steps)
    assert max(float((a - b).abs().max()) for a, b in zip(reference[-1], sgd_reference[-1])) > 1e-3
    for rank_result in run_distributed(_zero1_worker, steps, str(tmp_path)):
        for name in ("z1-gas1", "z1-gas2"):
            result = rank_result[name]
            for step, (got, want) in enumerate(zip(result["params"], reference)):
                diff = max(float((g - w).abs().max()) for g, w in zip(got, want))
                assert diff < 2e-5, f"{name}: differs from one process at step {step} by {diff}"
            assert result["stats"]["refreshes"] == steps // 2
        resumed = rank_result["checkpoint"]
        for a, b in zip(resumed["uninterrupted"], resumed["resumed"]):
            assert torch.equal(a, b)
