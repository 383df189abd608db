"""HyLo under torch.amp.GradScaler (the standard fp16 recipe) gives the same result as without it.

HyLo takes over unscaling (``_step_supports_amp_scaling``): the curvature rows it captures during
backward carry the loss scale just like ``.grad`` does, so the optimizer, not the scaler, must
undo the scale on both. A step the scaler skips (inf/NaN gradients) must leave HyLo's state
untouched, and the rows captured on it must not reach the next refresh.

GradScaler("cpu") works on CPU for float32 and float64 gradients without autocast, which isolates
the scaling itself: every scale is a power of two, so the scaled and unscaled runs agree to
rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import MLP, cross_entropy
from ds_hylo import HyLo

DT = torch.float64
STEPS = 6


def _batches(steps: int, n: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 6, generator=gen, dtype=DT), torch.randint(0, 3, (n,), generator=gen))
            for _ in range(steps)]


CASES = {
    "sngd": dict(mode="sngd", rank_ratio=1.0),
    "kis-full": dict(mode="kis", rank_ratio=1.0),
    "kis": dict(mode="kis", rank_ratio=0.5),
    "kid": dict(mode="kid", rank_ratio=0.5),
    "hybrid": dict(mode="hybrid", rank_ratio=0.5, switch_window=2, switch_threshold=0.1),
    "kl_clip": dict(mode="kis", rank_ratio=1.0, kl_clip=1e-4),
}


def _run(options: dict, seed: int = 4) -> tuple[MLP, HyLo]:
    torch.manual_seed(seed)
    model = MLP(6, 5, 3).to(DT)
    base = dict(lr=0.3, base="sgd", momentum=0.9, weight_decay=1e-3, damping=0.1, update_freq=2, seed=1)
    base.update(options)
    return model, HyLo(model, **base)


def _train_plain(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        cross_entropy(model(x), y).backward()
        opt.step()


def _train_scaled(model, opt, batches, scaler, poison=(), unscale_first=False, **step_kwargs):
    """The GradScaler recipe; batches whose index is in ``poison`` get an infinite loss."""
    skipped = []
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        loss = cross_entropy(model(x), y)
        if i in poison:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        if unscale_first:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9)  # a no-op clip
        before = opt.preconditioner.steps
        scaler.step(opt, **step_kwargs)
        scaler.update()
        skipped.append(opt.preconditioner.steps == before)
    return skipped


def _assert_same_params(a: torch.nn.Module, b: torch.nn.Module, moved_from: dict):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9, msg=lambda m: f"{name}: {m}")
        assert not torch.equal(p, moved_from[name]), f"{name} never moved: the comparison is empty"


@pytest.mark.parametrize("case", list(CASES))
def test_grad_scaler_matches_no_scaler(case):
    batches = _batches(STEPS)
    plain, plain_opt = _run(CASES[case])
    start = {n: p.detach().clone() for n, p in plain.named_parameters()}
    _train_plain(plain, plain_opt, batches)
    scaled, scaled_opt = _run(CASES[case])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    skipped = _train_scaled(scaled, scaled_opt, batches, scaler)

    assert not any(skipped)
    assert scaler.get_scale() == 2.0**16, "the scaler must still scale (no overflow expected here)"
    assert scaled_opt.preconditioner.steps == plain_opt.preconditioner.steps == STEPS
    assert scaled_opt.preconditioner.refreshes == plain_opt.preconditioner.refreshes == STEPS // 2
    _assert_same_params(scaled, plain, start)
    for (p, q) in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(scaled_opt.state[q]["momentum_buffer"], plain_opt.state[p]["momentum_buffer"],
                                   rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("case", ["kis-full", "kid"])
def test_grad_scaler_with_unscale_first_needs_the_loss_scale(case):
    """``scaler.unscale_(opt)`` (e.g. to clip) unscales .grad but not HyLo's rows: pass the scale."""
    batches = _batches(4)
    plain, plain_opt = _run(CASES[case])
    start = {n: p.detach().clone() for n, p in plain.named_parameters()}
    _train_plain(plain, plain_opt, batches)

    scaled, scaled_opt = _run(CASES[case])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _train_scaled(scaled, scaled_opt, batches, scaler, unscale_first=True, loss_scale=scaler.get_scale())
    _assert_same_params(scaled, plain, start)

    other, other_opt = _run(CASES[case])
    with pytest.raises(RuntimeError, match=r"scaler\.unscale_.*loss_scale=scaler\.get_scale\(\)"):
        _train_scaled(other, other_opt, batches, torch.amp.GradScaler("cpu"), unscale_first=True)


def _hylo_state(opt: HyLo) -> dict:
    pre = opt.preconditioner
    return copy.deepcopy({
        "hylo": pre.state_dict(),
        "momentum": {id(p): opt.state[p]["momentum_buffer"].clone() for p in opt.state},
        "awaiting": pre._awaiting_commit,
        "pending": pre._pending,
    })


def _assert_state_equal(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            _assert_state_equal(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_state_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("case", ["kis", "kid", "hybrid"])
@pytest.mark.parametrize("bad", [2, 3], ids=["refresh-step", "reuse-step"])
def test_skipped_step_leaves_state_untouched(case, bad):
    """An inf loss: the scaler skips the step, HyLo's state is unchanged, and the run continues exactly
    like one that never saw that batch (its rows, captured on a refresh step, are dropped)."""
    batches = _batches(STEPS)
    clean = batches[:bad] + batches[bad + 1:]
    reference, reference_opt = _run(CASES[case])
    start = {n: p.detach().clone() for n, p in reference.named_parameters()}
    _train_plain(reference, reference_opt, clean)

    model, opt = _run(CASES[case])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    _train_scaled(model, opt, batches[:bad], scaler)
    state = _hylo_state(opt)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert _train_scaled(model, opt, batches[bad:bad + 1], scaler, poison=(0,)) == [True]
    assert scaler.get_scale() == 2.0**15, "the scaler saw the overflow"
    _assert_state_equal(_hylo_state(opt), state, "hylo state after the skipped step")
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]), name
    assert not any(layer.has_data() for layer in opt.preconditioner.layers.values()), "rows of the skipped batch"

    _train_scaled(model, opt, batches[bad + 1:], scaler)
    assert opt.preconditioner.steps == reference_opt.preconditioner.steps == STEPS - 1
    assert opt.preconditioner.nonfinite_events == 0
    _assert_same_params(model, reference, start)


def test_unknown_scaling_protocol_fails_loudly():
    model, opt = _run(CASES["kis"])
    x, y = _batches(1)[0]
    cross_entropy(model(x), y).backward()
    opt.grad_scale = torch.tensor(4.0)  # a grad scale without found_inf is no protocol HyLo knows
    with pytest.raises(RuntimeError, match="found_inf"):
        opt.step()
    assert opt.preconditioner.steps == 0


def test_torch_grad_scaler_protocol_is_the_one_hylo_handles():
    """GradScaler must hand HyLo the scale (``grad_scale``/``found_inf`` attributes), not unscale itself."""
    model, opt = _run(CASES["kis"])
    assert opt._step_supports_amp_scaling is True
    seen = {}
    original = opt.step

    def spy(*args, **kwargs):
        seen.update(grad_scale=getattr(opt, "grad_scale", None), found_inf=getattr(opt, "found_inf", None),
                    kwargs=dict(kwargs))
        return original(*args, **kwargs)

    opt.step = spy
    x, y = _batches(1)[0]
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    assert float(seen["grad_scale"]) == 8.0 and float(seen["found_inf"]) == 0.0 and seen["kwargs"] == {}
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
