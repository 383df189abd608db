"""The per-step apply in float32 (issue 20): FLOPs by dtype counted, the refresh's choice of dtype
per layer, and what happens where float32 (or even float64) cannot resolve the step.

The per-step products of (*) run in float32 wherever the refresh's cancellation factor
(``kernels.smw_amplification``) allows it (docs/design.md section 1.8); float64 is kept for the
s x s work of the refresh. ``ds_hylo.counters.FlopsByDtype`` counts every matrix product of a
whole training step (forward, backward, ``opt.step()``) by dtype.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import ds_hylo
from conftest import rel_err
from ds_hylo.counters import FlopsByDtype, HostSyncs


def _mlp(width: int, d_in: int, classes: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes))


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches) -> list[FlopsByDtype]:
    counted = []
    for x, y in batches:
        with FlopsByDtype() as flops:
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        counted.append(flops)
    return counted


def _batches(steps: int, n: int, d_in: int, classes: int, scale: float = 1.0, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(n, d_in, generator=gen), torch.randint(0, classes, (n,), generator=gen))
            for _ in range(steps)]


def test_a_plain_step_of_the_defaults_issues_no_float64_products():
    """The issue's case: a width-512 MLP fed 4096 tokens, HyLo(model) with its defaults. Before, 3.9 %
    of a non-refresh step's matmul FLOPs were float64 (the apply); the bound is 2 %."""
    model = _mlp(512, 512, 10)
    opt = ds_hylo.HyLo(model)
    counted = _train(model, opt, _batches(2, 4096, 512, 10))
    refresh, plain = counted
    assert plain.share(torch.float64) <= 0.02, dict(plain.by_dtype)
    assert plain.by_dtype[torch.float64] == 0
    assert set(opt.stats()["apply_dtypes"].values()) == {"float32"}
    # the refresh's float64 products are s x s: the Gram of the kept rows and the power iteration
    s = opt.state_dict()["hylo"]["factors"]["0"]["c"].shape[0]
    assert s == 410
    assert all(max(shape, default=0) <= s for shape in refresh.shapes[torch.float64]), refresh.shapes[torch.float64]


def test_float32_apply_follows_the_float64_apply():
    """Same model, same batches: the float32 apply gives the parameters of the float64 apply to ~1e-5."""
    params = {}
    for precision in ("auto", "float64"):
        model = _mlp(24, 10, 4)
        opt = ds_hylo.HyLo(model, base="sgd", lr=0.1, momentum=0.9, update_freq=2, rank_ratio=0.5,
                           apply_precision=precision)
        _train(model, opt, _batches(5, 64, 10, 4))
        params[precision] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        expected = "float32" if precision == "auto" else "float64"
        assert set(opt.stats()["apply_dtypes"].values()) == {expected}
    assert rel_err(params["auto"].double(), params["float64"].double()) < 1e-5


def test_large_input_scale_keeps_that_layer_in_float64_and_says_so():
    model = _mlp(16, 8, 3)
    opt = ds_hylo.HyLo(model, base="sgd", lr=0.01, update_freq=1, rank_ratio=1.0)
    with pytest.warns(UserWarning, match=r"layer '0' applies its preconditioner in float64"):
        _train(model, opt, _batches(1, 32, 8, 3, scale=1e3))
    assert opt.stats()["apply_dtypes"]["0"] == "float64"


def test_float64_model_applies_in_float64():
    model = _mlp(8, 5, 3).double()
    opt = ds_hylo.HyLo(model, apply_precision="float32")
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert set(opt.stats()["apply_dtypes"].values()) == {"float64"}


def test_a_step_beyond_float64_is_refused_not_taken():
    """Inputs at 1e12: (*) would cancel beyond float64 and the step would be wild (8.3e11 where the
    exact step is 3.3e-2, issue 22). The refresh refuses the layer's factors: it takes the plain
    gradient step, the event is counted and warned about once, and nothing is non-finite."""
    model = _mlp(16, 8, 3)
    before = model[0].weight.detach().clone()
    opt = ds_hylo.HyLo(model, base="sgd", lr=1e-12, update_freq=1, rank_ratio=1.0)
    x, y = _batches(1, 32, 8, 3, scale=1e12)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    plain_step = -1e-12 * model[0].weight.grad.clone()
    with pytest.warns(RuntimeWarning, match=r"layer '0'.*beyond what even float64"):
        opt.step()
    stats = opt.stats()
    assert stats["ill_conditioned_events"] >= 1
    assert "0" not in stats["apply_dtypes"]
    assert torch.isfinite(model[0].weight).all()
    assert plain_step.abs().max() > 1e-3  # a visible step: the plain gradient one
    assert torch.allclose(model[0].weight.detach() - before, plain_step, rtol=1e-3, atol=1e-7)


def test_checkpoint_keeps_the_apply_dtype():
    model = _mlp(16, 8, 3)
    opt = ds_hylo.HyLo(model, update_freq=1, rank_ratio=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _train(model, opt, _batches(1, 32, 8, 3, scale=1e3))
    state = opt.state_dict()
    restored = ds_hylo.HyLo(_mlp(16, 8, 3), update_freq=1, rank_ratio=1.0)
    del state["hylo"]["factors"]["2"]["amplification"]  # a checkpoint written before it was stored
    restored.load_state_dict(state)
    assert restored.stats()["apply_dtypes"] == opt.stats()["apply_dtypes"]
    assert restored.stats()["apply_dtypes"]["0"] == "float64"


def test_host_sync_counter_sees_what_python_level_counting_missed():
    """Reads, data-dependent shapes (boolean masks) and host data are each counted."""
    x = torch.randn(8)
    with HostSyncs() as syncs:
        x.sum().item()
        x.tolist()
        x[x > 0]
        torch.tensor([1.0, 2.0])
        torch.nonzero(x)
    assert syncs.counts == {"read": 2, "data_dependent": 2, "host_data": 1}


def test_host_sync_counter_counts_tolist_once_under_a_default_device():
    """torch.set_default_device installs a torch function mode that calls tolist again from inside."""
    previous = torch.get_default_device()
    torch.set_default_device("cpu")
    try:
        with HostSyncs() as syncs:
            torch.ones(3).tolist()
    finally:
        torch.set_default_device(previous)
    assert syncs.counts == {"read": 1}


def test_a_plain_step_reads_the_host_once():
    """Between refreshes HyLo reads the host once per step (finiteness and KL together), counted
    with data-dependent indexing and host-data copies included; the base update is torch.optim.SGD's
    (no reads of its own without momentum state reads)."""
    model = _mlp(16, 8, 3)
    opt = ds_hylo.HyLo(model, base="sgd", lr=0.05, momentum=0.9, update_freq=4, kl_clip=1e-2)
    counts = []
    for x, y in _batches(4, 32, 8, 3):
        nn.functional.cross_entropy(model(x), y).backward()
        with HostSyncs() as syncs:
            opt.step()
        opt.zero_grad()
        counts.append(dict(syncs.counts))
    assert counts[1] == counts[2] == counts[3] == {"read": 1}, counts
