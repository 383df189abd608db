"""Hybrid KID/KIS switching on 2 ranks: every rank takes the same decisions from rank-local norms.

The detector rules (ds_hylo/switching.py): windows of ``switch_window`` committed steps; window
k's relative change of the summed gradient norm against window k-1 >= ``switch_threshold`` ->
KID for window k+1, else KIS; a phase's first window is critical (so windows 0 and 1 use KID);
a learning-rate change >= ``switch_threshold`` (relative) switches every layer to KID at once and
starts a new phase.
"""

from __future__ import annotations

import importlib.util
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from distributed import run_distributed

import ds_hylo
from ds_hylo import HyLo
from ds_hylo.exchange import Exchange
from ds_hylo.switching import AccordionPolicy



from hybrid_helpers import drive, feed_lr, tiny_batches, tiny_model  # noqa: E402

# --------------------------------------------------------------------------- ranks agree


def _rank_norms(rank: int, steps: int, window: int = 4) -> dict[str, list[float]]:
    """Rank-local gradient norms that differ per rank: flat on rank 0, jumping on rank 1."""
    if rank == 0:
        return {"l0": [1.0] * steps, "l1": [2.0] * steps}
    l0 = [1, 1, 3, 3, 1, 1, 3, 3, 1, 1]
    l1 = [2, 2, 2, 6, 6, 6, 2, 2, 2, 2]
    return {"l0": [float(l0[s // window]) for s in range(steps)], "l1": [float(l1[s // window]) for s in range(steps)]}


def _lr_schedule(steps: int) -> list[float]:
    return [0.1 if s < steps // 2 else 0.01 for s in range(steps)]


def detector_on_ranks(steps: int, window: int, threshold: float) -> dict:
    """Inside a rank: drive the detector with rank-local norms, averaged like the DeepSpeed path."""
    rank = dist.get_rank()
    comm = Exchange()
    out = {}
    for scope in ("layer", "global"):
        policy = AccordionPolicy(["l0", "l1"], window=window, threshold=threshold, scope=scope)
        seen = drive(policy, _rank_norms(rank, steps), lrs=_lr_schedule(steps), reduce_mean=comm.all_reduce_mean)
        out[scope] = {"history": policy.history, "seen": seen, "decisions": policy.decisions}
    return out


def hylo_on_ranks(steps: int) -> dict:
    """Inside a rank: HyLo hybrid over plain torch.distributed (gradients averaged before opt.step)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_model(seed=0)
    opt = HyLo(model, lr=0.2, base="sgd", momentum=0.9, mode="hybrid", rank_ratio=0.5, update_freq=2, damping=0.1,
               switch_window=2, switch_threshold=0.15)
    modes = []
    for step, (x, y) in enumerate(tiny_batches(steps, seed=5, batch=32)):
        if step == steps // 2:
            for group in opt.param_groups:
                group["lr"] *= 0.1
        per_rank = x.shape[0] // world
        xs, ys = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        opt.zero_grad()
        F.cross_entropy(model(xs), ys).backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        feed_lr(opt)
        opt.step()
        modes.append(opt.layer_modes())
    return {"modes": modes, "history": opt.preconditioner.policy.history,
            "log": opt.preconditioner.policy.switch_log(), "params": [p.detach().clone() for p in model.parameters()]}


def deepspeed_hybrid_on_ranks(steps: int) -> dict:
    """Inside a rank: HyLo hybrid through DeepSpeed ZeRO-1, which preconditions rank-local gradients."""
    from ds_workers import ds_config, make_batches, make_model, shard  # noqa: PLC0415

    rank, world = dist.get_rank(), dist.get_world_size()
    params = dict(lr=0.2, base="sgd", momentum=0.9, mode="hybrid", rank_ratio=0.5, update_freq=2, damping=0.1,
                  switch_window=2, switch_threshold=0.15)
    engine, _, _, _ = ds_hylo.initialize(model=make_model(0), config=ds_config(params, stage=1))
    hylo = engine.hylo
    modes = []
    for step, batch in enumerate(make_batches(steps, seed=5)):
        if step == steps // 2:
            for group in hylo.param_groups:
                group["lr"] *= 0.1
        x, y = shard(batch, rank, world)
        hylo.preconditioner.policy.observe_lr(hylo.param_groups[0]["lr"])
        engine.backward(F.cross_entropy(engine(x), y))
        engine.step()
        modes.append(hylo.layer_modes())
    policy = hylo.preconditioner.policy
    return {"modes": modes, "history": policy.history, "log": policy.switch_log(), "decisions": policy.decisions,
            "lr_changes": policy.lr_changes, "params": [p.detach().clone() for p in engine.module.parameters()]}


def ranks_suite(steps: int, window: int, threshold: float, train_steps: int) -> dict:
    """Everything the 2-rank tests need from one spawn (starting ranks is the expensive part)."""
    out = {"detector": detector_on_ranks(steps, window, threshold), "hylo": hylo_on_ranks(train_steps)}
    if importlib.util.find_spec("deepspeed") is None:
        out["deepspeed"] = None
    else:
        try:
            out["deepspeed"] = deepspeed_hybrid_on_ranks(train_steps)
        except Exception:  # reported by its own test, without failing the others
            out["deepspeed"] = traceback.format_exc()
    return out


@pytest.fixture(scope="module")
def rank_results():
    return run_distributed(ranks_suite, 40, 4, 0.5, 24)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_ranks_take_the_same_decisions_from_rank_local_norms(rank_results, scope):
    r0, r1 = (r["detector"][scope] for r in rank_results)
    assert r0["history"] == r1["history"]
    assert r0["seen"] == r1["seen"]
    assert r0["decisions"] == r1["decisions"]
    # ... and they are the decisions of one process that sees the rank-averaged norms.
    n0, n1 = _rank_norms(0, 40), _rank_norms(1, 40)
    mean = {k: [(a + b) / 2 for a, b in zip(n0[k], n1[k])] for k in n0}
    reference = AccordionPolicy(["l0", "l1"], window=4, threshold=0.5, scope=scope)
    drive(reference, mean, lrs=_lr_schedule(40))
    assert [tuple(e) for e in r0["history"]] == [tuple(e) for e in reference.history]
    assert {e.mode for e in reference.history} == {"kid", "kis"}
    # Without averaging the ranks would disagree: the test would catch a missing reduction.
    alone = []
    for rank in (0, 1):
        policy = AccordionPolicy(["l0", "l1"], window=4, threshold=0.5, scope=scope)
        drive(policy, _rank_norms(rank, 40), lrs=_lr_schedule(40))
        alone.append(policy.history)
    assert alone[0] != alone[1]


def test_hylo_hybrid_over_torch_distributed_agrees_on_every_rank(rank_results):
    h0, h1 = (r["hylo"] for r in rank_results)
    assert h0["modes"] == h1["modes"]
    assert h0["history"] == h1["history"]
    reasons = {entry["reason"] for entry in h0["log"]}
    assert {"norm", "lr"} <= reasons, h0["log"]
    assert {e.mode for e in h0["history"][1:]} == {"kid", "kis"}
    for p, q in zip(h0["params"], h1["params"]):
        assert torch.equal(p, q)


def test_deepspeed_hybrid_agrees_on_every_rank_with_rank_local_gradients(rank_results):
    r0, r1 = (r["deepspeed"] for r in rank_results)
    if r0 is None:
        pytest.skip("deepspeed is not installed")
    assert not isinstance(r0, str), r0
    assert not isinstance(r1, str), r1
    assert r0["modes"] == r1["modes"]
    assert r0["history"] == r1["history"] and r0["decisions"] == r1["decisions"]
    assert {e.mode for e in r0["history"][1:]} == {"kid", "kis"}, r0["log"]
    assert [c["step"] for c in r0["lr_changes"]] == [12], r0["log"]
    for p, q in zip(r0["params"], r1["params"]):
        assert torch.equal(p, q)


