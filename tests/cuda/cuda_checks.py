"""The device-parametrised checks behind ``tests/cuda``: every test here takes a ``device`` fixture.

``test_cuda.py`` runs them with ``device = "cuda"`` (marked ``cuda``, skipped with the reason where
CUDA is absent); ``test_cuda_checks_on_cpu.py`` runs the very same functions with ``device = "cpu"``
so that their bodies are exercised on every machine (and CI). This module is not collected by
itself (its name does not start with ``test_``); the spawned ranks import their functions from it.

References are computed on the CPU in float64 with the helpers of ``tests/conftest.py`` (per-sample
gradients by ``torch.func``, dense solves), independently of the device under test.
"""

from __future__ import annotations

import copy
import math
import traceback
from typing import Any, Optional

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
    mse,
    outer_rows,
    param_matrix,
    per_sample_grads,
    rel_err,
)
from distributed import run_distributed

import ds_hylo
from ds_hylo import HyLo

LAM = 0.1
MODES = ("sngd", "kis", "kid", "hybrid")
HOST = "cpu"

# ds_hylo still creates some tensors on the default device (issue 10, item 1), which a "meta"
# default exposes on any machine. Set to True once it no longer does; until then the "meta"
# cases are strict xfails, so they start failing (and remind you) the moment they pass.
DEFAULT_DEVICE_FIXED = True


def _expect_default_device_bug(request: pytest.FixtureRequest, default: str) -> None:
    if default == "meta" and not DEFAULT_DEVICE_FIXED:
        request.applymarker(pytest.mark.xfail(
            strict=True, reason="issue 10 item 1: ds_hylo creates tensors on the default device"))


def _role(role: str, device: str) -> str:
    """'device' -> the device under test, 'host' -> the CPU, anything else as given ('meta')."""
    return {"device": device, "host": HOST}.get(role, role)


# =========================================================================== 1. dense references
# Each case: a float64 CPU model, the batch loss, 3 CPU batches and the reference rows per layer
# (on the CPU, from a CPU copy of the model under test at that step).


def _case_mlp():
    torch.manual_seed(11)
    model = MLP(6, 5, 3).to(DT)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 6, generator=gen, dtype=DT), torch.randint(0, 3, (8,), generator=gen))
               for _ in range(3)]

    def rows(m, x, y):
        psg = per_sample_grads(m, cross_entropy, x, y)
        return {name: layer_rows_from_grads(psg, name) for name in ("fc1", "fc2")}

    return model, cross_entropy, batches, rows, {}


def _case_conv():
    torch.manual_seed(12)
    model = ConvNet(kernel_size=3, stride=2, padding=1).to(DT)
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(5, 2, 7, 8, generator=gen, dtype=DT), torch.randn(5, 2, generator=gen, dtype=DT))
               for _ in range(3)]

    def rows(m, x, y):
        x_in, dldz, _ = layer_io(m, "conv", lambda c: mse(c(x), y))
        return {"conv": conv_surrogate_rows(m.conv, x_in, dldz),
                "fc": layer_rows_from_grads(per_sample_grads(m, mse, x, y), "fc")}

    return model, mse, batches, rows, {}


def _case_sequence():
    torch.manual_seed(13)
    model = TokenMLP().to(DT)
    batch, seq = 3, 4
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(batch, seq, 4, generator=gen, dtype=DT), torch.randn(batch, 3, generator=gen, dtype=DT))
               for _ in range(3)]

    def loss(out, y):  # mixes positions: not a sum of per-token losses
        return ((torch.tanh(out).mean(dim=1) - y) ** 2).mean()

    def rows(m, x, y):  # "expand": every position a sample, u_bt = B T dL/dz_bt [x_bt, 1]^T
        out = {}
        for name in ("inp", "out"):
            x_in, dldz, _ = layer_io(m, name, lambda c: loss(c(x), y))
            out[name] = outer_rows(batch * seq * dldz.reshape(-1, dldz.shape[-1]),
                                   x_in.reshape(-1, x_in.shape[-1]), has_bias=True)
        return out

    return model, loss, batches, rows, {"sequence_convention": "expand"}


DENSE_CASES = {"mlp": _case_mlp, "conv": _case_conv, "seq": _case_sequence}


def _exact(model: nn.Module, mode: str, **kwargs: Any) -> HyLo:
    """rank_ratio = 1, lr = 1, no momentum, the raw natural step: every mode is exact SMW."""
    options = dict(lr=1.0, base="sgd", momentum=0.0, weight_decay=0.0, damping=LAM, mode=mode, rank_ratio=1.0,
                   update_freq=2, step_scale="natural")
    options.update(kwargs)
    return HyLo(model, **options)


def _device_step(model, opt, loss_fn, x, y, names, device):
    """One step on ``device``; returns ({layer: delta [W|b]}, {layer: grad [W|b]}) on the CPU."""
    modules = dict(model.named_modules())
    before = {n: param_matrix(modules[n]).cpu() for n in names}
    opt.zero_grad()
    loss_fn(model(x.to(device)), y.to(device)).backward()
    grads = {n: grad_matrix(modules[n]).cpu() for n in names}
    opt.step()
    return {n: param_matrix(modules[n]).cpu() - before[n] for n in names}, grads


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("case", list(DENSE_CASES))
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_equals_dense_float64_reference(device, mode, case):
    """3 steps with update_freq=2 on ``device`` in float64: refresh, reuse, refresh. Each step moves
    [W | b] by -(F_k + lam I)^-1 grad_t, F_k from the rows of the last refresh step k."""
    model, loss_fn, batches, reference_rows, kwargs = DENSE_CASES[case]()
    model = model.to(device)
    opt = _exact(model, mode, **kwargs)
    rows = None
    for step, (x, y) in enumerate(batches):
        if step % 2 == 0:
            rows = reference_rows(copy.deepcopy(model).to(HOST), x, y)
        deltas, grads = _device_step(model, opt, loss_fn, x, y, list(rows), device)
        for name, layer_rows in rows.items():
            expected = -dense_natural_step(layer_rows, grads[name], LAM)
            assert rel_err(deltas[name], expected) < 1e-8, (step, name, rel_err(deltas[name], expected))
            assert rel_err(deltas[name], -grads[name] / LAM) > 1e-3, "a rescaled gradient, not a preconditioner"
    assert opt.preconditioner.refreshes == 2 and opt.preconditioner.nonfinite_events == 0
    assert all(p.device.type == torch.device(device).type for p in model.parameters())


@pytest.mark.parametrize("mode", MODES)
def test_delayed_refresh_uses_the_refresh_before_each_step(device, mode):
    """delayed_refresh on ``device`` (a side CUDA stream on CUDA): 4 steps with update_freq=2. Step 0
    takes the plain gradient, steps 1 and 2 the factors of step 0's rows, step 3 those of step 2's."""
    model, loss_fn, batches, reference_rows, kwargs = DENSE_CASES["mlp"]()
    batches = batches + batches[:1]
    model = model.to(device)
    opt = _exact(model, mode, delayed_refresh=True, **kwargs)
    held = None
    for step, (x, y) in enumerate(batches):
        fresh = reference_rows(copy.deepcopy(model).to(HOST), x, y) if step % 2 == 0 else None
        deltas, grads = _device_step(model, opt, loss_fn, x, y, list(fresh or held), device)
        for name in deltas:
            expected = -grads[name] if held is None else -dense_natural_step(held[name], grads[name], LAM)
            assert rel_err(deltas[name], expected) < 1e-8, (step, name, rel_err(deltas[name], expected))
        held = fresh or held
    assert opt.preconditioner.refreshes == 2


# ====================================================== 2 and 3. ranks and the default device
STEPS = 4
GLOBAL_BATCH = 16


def _rank_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


def _rank_batches(steps: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator(device=HOST).manual_seed(seed)
    return [(torch.randn(GLOBAL_BATCH, 6, generator=gen, dtype=DT, device=HOST),
             torch.randint(0, 3, (GLOBAL_BATCH,), generator=gen, device=HOST)) for _ in range(steps)]


def _rank_options(mode: str) -> dict:
    return dict(lr=0.5, mode=mode, rank_ratio=1.0, update_freq=2, damping=0.1, base="sgd", momentum=0.9)


def train(mode: str, device: str, default: Optional[str] = None, ddp: bool = False,
          steps: int = STEPS) -> list[list[torch.Tensor]]:
    """HyLo on ``device`` (this rank's shard when torch.distributed is initialised, else the whole
    batch), with ``torch.set_default_device(default)`` around the optimizer's construction and
    every step. Gradients are averaged by DDP or by hand. Returns the parameters after each step (CPU)."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    model = _rank_model().to(device)
    batches = _rank_batches(steps)
    net = nn.parallel.DistributedDataParallel(model) if ddp else model
    history = []
    previous = torch.get_default_device()
    if default is not None:
        torch.set_default_device(default)
    try:
        opt = HyLo(model, **_rank_options(mode))
        for x, y in batches:
            per_rank = x.shape[0] // world
            x, y = (t[rank * per_rank:(rank + 1) * per_rank].to(device) for t in (x, y))
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            if distributed and not ddp:
                for p in model.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= world
            opt.step()
            history.append([p.detach().to(HOST, copy=True) for p in model.parameters()])
    finally:
        torch.set_default_device(previous)
    return history


def rank_suite(cases: dict[str, dict]) -> dict[str, Any]:
    """Several ``train`` runs in one spawned rank; a failing case returns its traceback (a string)."""
    results: dict[str, Any] = {}
    for name, kwargs in cases.items():
        try:
            results[name] = train(**kwargs)
        except Exception:  # noqa: BLE001 - reported to the test, which fails with it
            results[name] = traceback.format_exc()
    return results


def _max_rel(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(rel_err(a, b) for a, b in zip(got, want))


def _assert_same_history(got: Any, want: list[list[torch.Tensor]], what: str, tol: float = 1e-9) -> None:
    assert not isinstance(got, str), f"{what} failed:\n{got}"
    assert len(got) == len(want), what
    for step, (a, b) in enumerate(zip(got, want)):
        assert _max_rel(a, b) < tol, f"{what}: step {step} differs by {_max_rel(a, b):.2e}"


@pytest.fixture(scope="module")
def two_rank_results(device) -> list[dict[str, Any]]:
    cases = {f"{mode}-ddp{int(ddp)}": dict(mode=mode, device=device, ddp=ddp) for mode in MODES for ddp in (False, True)}
    return run_distributed(rank_suite, cases, world_size=2, backend="gloo", device=device)


@pytest.mark.slow
@pytest.mark.parametrize("ddp", [False, True], ids=["manual", "ddp"])
@pytest.mark.parametrize("mode", MODES)
def test_two_gloo_ranks_on_one_device_equal_one_process(device, two_rank_results, mode, ddp):
    """At rank_ratio = 1, 2 gloo ranks (CUDA tensors on one shared GPU under ``cuda``) give the
    parameters of one process on the whole batch after every step."""
    reference = train(mode, device)
    for rank, result in enumerate(two_rank_results):
        _assert_same_history(result[f"{mode}-ddp{int(ddp)}"], reference, f"rank {rank} {mode} ddp={ddp}")
    assert _max_rel(reference[-1], _sgd_history(device)[-1]) > 1e-3, "HyLo equals SGD here: no coverage"


def _sgd_history(device: str) -> list[list[torch.Tensor]]:
    model = _rank_model().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    history = []
    for x, y in _rank_batches(STEPS):
        opt.zero_grad()
        F.cross_entropy(model(x.to(device)), y.to(device)).backward()
        opt.step()
        history.append([p.detach().to(HOST, copy=True) for p in model.parameters()])
    return history


DEFAULT_ROLES = [("device", "host"), ("host", "device"), ("device", "meta")]
ROLE_IDS = ["model-on-device,default-host", "model-on-host,default-device", "model-on-device,default-meta"]


@pytest.mark.parametrize("model_on, default", DEFAULT_ROLES, ids=ROLE_IDS)
@pytest.mark.parametrize("mode", MODES)
def test_default_device_does_not_change_the_result(device, mode, model_on, default, request):
    """One process: the parameters do not depend on torch.set_default_device."""
    model_device, default_device = _role(model_on, device), _role(default, device)
    _expect_default_device_bug(request, default_device)
    normal = train(mode, model_device, default=model_device)
    other = train(mode, model_device, default=default_device)
    _assert_same_history(other, normal, f"model on {model_device}, default {default_device}", tol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("model_on, default", DEFAULT_ROLES, ids=ROLE_IDS)
def test_two_ranks_with_another_default_device_equal_one_process(device, model_on, default, request):
    model_device, default_device = _role(model_on, device), _role(default, device)
    if model_device == default_device:
        pytest.skip("the default device is the model's: test_two_gloo_ranks_on_one_device_equal_one_process")
    _expect_default_device_bug(request, default_device)
    cases = {mode: dict(mode=mode, device=model_device, default=default_device) for mode in ("kis", "hybrid")}
    results = run_distributed(rank_suite, cases, world_size=2, backend="gloo", device=device, timeout=300)
    for mode in cases:
        reference = train(mode, model_device)
        for rank, result in enumerate(results):
            _assert_same_history(result[mode], reference, f"rank {rank} {mode}")


# ============================================================== 4. DeepSpeed ZeRO-1, world size 1
DS_PRECISIONS = ("fp32", "bf16", "fp16")
DS_STAGES = (1, 2, 3)
DS_STEPS = 12


def _ds_config(precision: str, stage: int = 1) -> dict:
    config = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "optimizer": {"type": "HyLo", "params": {"lr": 0.2, "mode": "kis", "rank_ratio": 0.5, "update_freq": 2,
                                                 "damping": 0.1, "base": "sgd", "momentum": 0.9}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
        if stage < 3:
            config["data_types"] = {"grad_accum_dtype": "fp32"}
    elif precision == "bf16-grads":  # bf16 gradients: overflow is checked, as with fp16
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 1000}
    return config


def _teacher_batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two fixed batches labelled by a random linear teacher (learnable), cycled."""
    gen = torch.Generator(device=HOST).manual_seed(5)
    teacher = torch.randn(6, 3, generator=gen, device=HOST)
    pool = []
    for _ in range(2):
        x = torch.randn(GLOBAL_BATCH, 6, generator=gen, device=HOST)
        pool.append((x, (x @ teacher).argmax(dim=1)))
    return [pool[i % 2] for i in range(steps)]


def _hylo_state(engine) -> dict[str, Any]:
    p = engine.hylo.preconditioner
    return {"steps": p.steps, "refreshes": p.refreshes, "policy": repr(p.policy.state_dict()),
            "factors": {n: [t.to(HOST, copy=True) for t in (f.a, f.g, f.c)] for n, f in p.factors.items()}}


def ds_train(precision: str, steps: int, bad_step: Optional[int] = None, stage: int = 1) -> dict[str, Any]:
    """ZeRO-``stage`` training with ds_hylo.initialize on this rank's accelerator; with ``bad_step``, an
    infinite loss is back-propagated before that step (the engine must skip it)."""
    import deepspeed  # noqa: F401 - fail here, not inside ds_hylo, where it is missing

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    engine, _, _, _ = ds_hylo.initialize(model=model, config=_ds_config(precision, stage))
    dtype = next(engine.module.parameters()).dtype
    losses, before, after = [], None, None
    for i, (x, y) in enumerate(_teacher_batches(steps)):
        x, y = x.to(engine.device, dtype), y.to(engine.device)
        if i == bad_step:
            before = _hylo_state(engine)
            engine.backward(F.cross_entropy(engine(x).float(), y) * float("inf"))
            engine.step()
            after = _hylo_state(engine)
        loss = F.cross_entropy(engine(x).float(), y)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
        params = [p.detach().float().to(HOST, copy=True) for p in engine.module.parameters()]
        dtype = next(engine.module.parameters()).dtype
    return {"losses": losses, "params": params, "dtype": str(dtype), "device": str(engine.device),
            "skipped": engine.skipped_steps, "stats": engine.hylo.stats(), "before": before, "after": after}


def ds_suite(precisions: list[str], skip_precision: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stage in DS_STAGES:
        for precision in precisions:
            try:
                out[f"{precision}-z{stage}"] = ds_train(precision, DS_STEPS, stage=stage)
            except Exception:  # noqa: BLE001
                out[f"{precision}-z{stage}"] = traceback.format_exc()
        try:
            out[f"skip-z{stage}"] = ds_train(skip_precision, 6, bad_step=3, stage=stage)
        except Exception:  # noqa: BLE001
            out[f"skip-z{stage}"] = traceback.format_exc()
    return out


def _ds_precisions(device: str) -> list[str]:
    return list(DS_PRECISIONS) if device == "cuda" else ["fp32", "bf16"]  # DeepSpeed's fp16 is GPU-only


@pytest.fixture(scope="module")
def ds_results(device) -> dict[str, Any]:
    pytest.importorskip("deepspeed")
    skip_precision = "fp16" if device == "cuda" else "bf16-grads"
    backend = "nccl" if device == "cuda" else "gloo"
    (result,) = run_distributed(ds_suite, _ds_precisions(device), skip_precision, world_size=1, backend=backend,
                                device=device)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("stage", DS_STAGES)
@pytest.mark.parametrize("precision", DS_PRECISIONS)
def test_deepspeed_world1_trains(device, ds_results, precision, stage):
    """ZeRO-1, 2 and 3 (per-layer preconditioning in the gradient hooks, docs/design.md section 3.5) in
    fp32, bf16 and (GPUs) fp16: the loss falls, nothing is skipped or non-finite."""
    if precision not in _ds_precisions(device):
        pytest.skip(f"DeepSpeed runs {precision} on GPUs only")
    result = ds_results[f"{precision}-z{stage}"]
    assert not isinstance(result, str), f"DeepSpeed {precision} failed:\n{result}"
    assert result["device"].startswith(device), result["device"]
    expected_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert result["dtype"] == str(expected_dtype)
    losses = result["losses"]
    assert all(math.isfinite(v) for v in losses), losses
    assert sum(losses[-2:]) < 0.8 * sum(losses[:2]), losses
    assert all(torch.isfinite(p).all() for p in result["params"])
    assert result["skipped"] == 0
    assert result["stats"]["refreshes"] == DS_STEPS // 2 and result["stats"]["nonfinite_events"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("stage", DS_STAGES)
def test_deepspeed_loss_scale_skipped_step_leaves_hylo_state_untouched(device, ds_results, stage):
    """fp16 on CUDA (bf16 gradients on the CPU): an overflowing step is skipped by the engine and
    HyLo's step counter, policy and factors stay as they were."""
    result = ds_results[f"skip-z{stage}"]
    assert not isinstance(result, str), f"DeepSpeed skipped-step run failed:\n{result}"
    before, after = result["before"], result["after"]
    assert result["skipped"] == 1
    assert before["steps"] == after["steps"] == 3 and before["refreshes"] == after["refreshes"]
    assert before["policy"] == after["policy"]
    assert before["factors"].keys() == after["factors"].keys() and before["factors"]
    for name in before["factors"]:
        assert all(torch.equal(a, b) for a, b in zip(before["factors"][name], after["factors"][name])), name
    assert all(torch.isfinite(p).all() for p in result["params"])


# ==================================================================== 5. the sampled Fisher
@pytest.mark.parametrize("mode", ["sngd", "kis", "kid"])
def test_sampled_fisher_equals_dense_float64_reference(device, mode, monkeypatch):
    """fisher="sampled" on ``device``: the step equals the CPU float64 dense solve over per-sample
    gradients at the labels the run drew (recorded from ds_hylo.fisher.sample_labels)."""
    import ds_hylo.fisher

    drawn: list[torch.Tensor] = []
    original = ds_hylo.fisher.sample_labels

    def recording(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        labels = original(logits, generator)
        assert labels.device == logits.device
        drawn.append(labels.to(HOST, copy=True))
        return labels

    monkeypatch.setattr(ds_hylo.fisher, "sample_labels", recording)
    torch.manual_seed(21)
    cpu_model = MLP(6, 5, 4).to(DT)
    model = copy.deepcopy(cpu_model).to(device)
    x, y = torch.randn(10, 6, dtype=DT), torch.randint(0, 4, (10,))
    opt = _exact(model, mode, fisher="sampled", update_freq=1)
    modules = dict(model.named_modules())
    before = {n: param_matrix(modules[n]).cpu() for n in ("fc1", "fc2")}
    logits = model(x.to(device))
    assert opt.sample_fisher(logits)
    F.cross_entropy(logits, y.to(device)).backward()
    grads = {n: grad_matrix(modules[n]).cpu() for n in ("fc1", "fc2")}
    opt.step()
    (labels,) = drawn
    assert not torch.equal(labels, y), "sampled labels equal the true ones: the test would not tell them apart"
    psg = per_sample_grads(cpu_model, cross_entropy, x, labels)
    empirical = per_sample_grads(cpu_model, cross_entropy, x, y)
    for name in ("fc1", "fc2"):
        delta = param_matrix(modules[name]).cpu() - before[name]
        expected = -dense_natural_step(layer_rows_from_grads(psg, name), grads[name], LAM)
        assert rel_err(delta, expected) < 1e-8, (name, rel_err(delta, expected))
        assert rel_err(delta, -dense_natural_step(layer_rows_from_grads(empirical, name), grads[name], LAM)) > 1e-3


def _argmin_labels(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A deterministic stand-in sampler: the same labels on every device."""
    return logits.detach().argmin(dim=-1)


def _sampled_run(device: str, steps: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(4)
    model = MLP(6, 5, 3).to(DT).to(device)
    opt = HyLo(model, lr=0.3, base="sgd", momentum=0.9, damping=LAM, mode="kid", rank_ratio=0.5, update_freq=2,
               fisher="sampled")
    gen = torch.Generator(device=HOST).manual_seed(7)
    for _ in range(steps):
        x, y = torch.randn(12, 6, generator=gen, dtype=DT), torch.randint(0, 3, (12,), generator=gen)
        opt.zero_grad()
        logits = model(x.to(device))
        opt.sample_fisher(logits)
        F.cross_entropy(logits, y.to(device)).backward()
        opt.step()
    return [p.detach().to(HOST, copy=True) for p in model.parameters()]


def test_sampled_fisher_on_device_equals_cpu_float64_run(device, monkeypatch):
    """With the same labels (a deterministic stand-in sampler), 3 low-rank KID steps on ``device``
    give the CPU float64 run's parameters."""
    import ds_hylo.fisher

    monkeypatch.setattr(ds_hylo.fisher, "sample_labels", _argmin_labels)
    got, want = _sampled_run(device), _sampled_run(HOST)
    assert _max_rel(got, want) < 1e-9, _max_rel(got, want)


# ===================================================================== 6. checkpoint to the CPU
CKPT_OPTIONS = dict(lr=0.2, base="sgd", momentum=0.9, damping=0.1, rank_ratio=0.5, update_freq=2, seed=3)


def _ckpt_train(model: nn.Module, opt: HyLo, batches: list, device: str) -> None:
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x.to(device)), y.to(device)).backward()
        opt.step()


@pytest.mark.parametrize("mode", ["kis", "kid", "hybrid"])
def test_checkpoint_written_on_device_continues_on_the_cpu(device, mode, tmp_path):
    """opt.state_dict() saved with torch.save from a run on ``device`` loads into a CPU model's HyLo
    (torch.load(weights_only=True, map_location="cpu")) and training continues; for the
    deterministic KID the continuation equals continuing on ``device``."""
    options = dict(CKPT_OPTIONS, mode=mode)
    if mode == "hybrid":
        options.update(switch_window=2, switch_threshold=0.1)
    batches = _rank_batches(6, seed=9)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT).to(device)
    opt = HyLo(model, **options)
    _ckpt_train(model, opt, batches[:3], device)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    _ckpt_train(model, opt, batches[3:], device)  # continuing where it was written

    torch.manual_seed(123)  # other initial weights: everything must come from the checkpoint
    cpu_model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    cpu_opt = HyLo(cpu_model, **options)
    checkpoint = torch.load(path, map_location=HOST, weights_only=True)
    cpu_model.load_state_dict(checkpoint["model"])
    cpu_opt.load_state_dict(checkpoint["optimizer"])
    pre = cpu_opt.preconditioner
    assert pre.steps == 3 and pre.refreshes == 2
    assert all(t.device.type == HOST for f in pre.factors.values() for t in (f.a, f.g, f.c))
    _ckpt_train(cpu_model, cpu_opt, batches[3:], HOST)
    assert (pre.steps, pre.refreshes) == (6, 3)
    assert all(torch.isfinite(p).all() for p in cpu_model.parameters())
    if mode == "kid":
        got = [p.detach() for p in cpu_model.parameters()]
        want = [p.detach().to(HOST) for p in model.parameters()]
        assert _max_rel(got, want) < 1e-9, _max_rel(got, want)
