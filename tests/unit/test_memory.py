"""ds_hylo.estimate_memory against the bytes HyLo actually holds after a refresh (issue 19 item 5).

Measured: the storage of every factor tensor (rows, C, the apply's work copies; shared storage
counted once) plus the base optimizer's state tensors, after two steps (a refresh and a plain
step). The estimate must be within 10 % of it on an MLP and a small transformers Llama at a few
token counts; docs in ``ds_hylo/memory.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import ds_hylo
from ds_hylo import HyLo
from ds_hylo.memory import MemoryEstimate, free_memory, held_factor_bytes, warn_if_over


def _measured(opt: HyLo) -> tuple[int, int]:
    held = held_factor_bytes(opt.preconditioner)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    return held, state


def _run(model, batch, loss_fn, steps=2, **options):
    opt = HyLo(model, **options)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model, *batch()).backward()
        opt.step()
    measured = _measured(opt)
    opt.preconditioner.remove_hooks()
    return measured


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 10))


def _mlp_loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("n", [32, 200])
@pytest.mark.parametrize("options", [{}, {"max_global_samples": 8, "base": "sgd", "momentum": 0.9},
                                     {"mode": "kid", "rank_ratio": 0.25}, {"apply_precision": "float64"}])
def test_mlp_estimate_within_10_percent(n, options):
    model = _mlp()
    est = ds_hylo.estimate_memory(model, n, 1, **options)
    held, state = _run(model, lambda: (torch.randn(n, 20), torch.randint(0, 10, (n,))), _mlp_loss, **options)
    assert est.base_state_bytes == state
    assert abs(est.total_bytes - (held + state)) <= 0.1 * (held + state)
    assert abs(est.held_bytes - held) <= 0.1 * held


def _llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("batch,seq", [(2, 16), (4, 32)])
@pytest.mark.parametrize("options", [{}, {"max_global_samples": 16}])
def test_llama_estimate_within_10_percent(batch, seq, options):
    model = _llama()
    est = ds_hylo.estimate_memory(model, batch * seq, 1, sequence_length=seq, **options)
    assert {l.kind for l in est.layers} == {"Linear", "Embedding"} and len(est.layers) == 2 * 7 + 2
    emb = next(l for l in est.layers if l.kind == "Embedding")
    # an embedding row is one int64 id and D floats, never a num_embeddings-wide row
    assert emb.d_in == 128 and emb.rows_bytes == emb.s * (8 + 32 * 4)
    # every position carries a target (with labels=ids the last token of each sequence has none,
    # its rows are dropped and the estimate, counting tokens_per_step rows, is a few % high)
    held, state = _run(model, lambda: (torch.randint(0, 128, (batch, seq)), torch.randint(0, 128, (batch * seq,))),
                       lambda m, ids, y: nn.functional.cross_entropy(m(input_ids=ids).logits.reshape(-1, 128), y),
                       **options)
    assert abs(est.total_bytes - (held + state)) <= 0.1 * (held + state)
    assert abs(est.held_bytes - held) <= 0.1 * held


def test_world_size_and_caps_follow_row_budget():
    model = _mlp()
    est = ds_hylo.estimate_memory(model, 1024, 8, max_global_samples=64)
    for layer in est.layers:
        assert layer.rows_per_rank == 128 and layer.budget == 8 and layer.s == 64
    uncapped = ds_hylo.estimate_memory(model, 1024, 8)
    assert all(l.s == 8 * round(0.1 * 128) for l in uncapped.layers)
    assert uncapped.held_bytes > est.held_bytes
    # the gathered buffer exists only with several ranks
    assert ds_hylo.estimate_memory(model, 1024, 1).phases["refresh"] < ds_hylo.estimate_memory(model, 8192, 8).phases["refresh"]


def test_reduce_convention_and_conv_count_samples():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    est = ds_hylo.estimate_memory(model, 4096, 2, sequence_length=64)
    conv, linear = est.layers
    assert conv.kind == "Conv2d" and conv.rows_per_rank == 32  # one row per sample
    assert linear.rows_per_rank == 2048  # "expand": every token
    reduced = ds_hylo.estimate_memory(model, 4096, 2, sequence_length=64, sequence_convention="reduce")
    assert reduced.layers[1].rows_per_rank == 32


def test_refused_layers_and_meta_models():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4096, 28672, bias=False))
    est = ds_hylo.estimate_memory(model, 8192, 1)
    assert est.refused_layers() == ["0"]  # 8192 rows x (4096 + 28672) floats > 512 MiB
    assert ds_hylo.estimate_memory(model, 4096, 1).refused_layers() == []  # exactly 512 MiB
    assert ds_hylo.estimate_memory(model, 8192, 1, max_captured_mib=1024.0).refused_layers() == []
    # the apply holds one copy of every preconditioned gradient
    assert est.phases["apply"] >= 4096 * 28672 * 4


def test_peak_table_and_dict():
    est = ds_hylo.estimate_memory(_mlp(), 256, 1)
    assert isinstance(est, MemoryEstimate)
    assert est.peak_bytes == est.total_bytes + est.workspace_bytes >= est.total_bytes
    assert est.workspace_bytes == max(est.phases.values())
    d = est.as_dict()
    assert d["by_kind"]["Linear"]["layers"] == 2 and d["held_bytes"] == est.held_bytes
    text = est.table()
    assert "Linear" in text and "peak" in text and str(est) == text


def test_sampled_options_validated_like_hylo():
    with pytest.raises(ValueError, match="rank_ratio"):
        ds_hylo.estimate_memory(_mlp(), 256, 1, rank_ratio=2.0)
    with pytest.raises(ValueError, match="tokens_per_step"):
        ds_hylo.estimate_memory(_mlp(), 0, 1)


def test_estimate_leaves_no_hooks():
    model = _mlp()
    ds_hylo.estimate_memory(model, 64, 1)
    assert all(not m._forward_hooks for m in model.modules())


def test_warn_if_over():
    est = ds_hylo.estimate_memory(_mlp(), 256, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_over(est, "cpu", free_bytes=10 * est.peak_bytes) is False
    with pytest.warns(UserWarning, match="exceeds"):
        assert warn_if_over(est, "cpu", free_bytes=est.peak_bytes // 2) is True
    assert free_memory("cpu") is None or free_memory("cpu") > 0


def test_apply_transient_follows_where_hylo_runs():
    """One layer's direction alive at a time standalone and under ZeRO-2/3; every layer's at once under
    ZeRO-0/1 on several ranks (their one shared decision) and with grafting."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(1024, 2048, bias=False), nn.Linear(2048, 1024, bias=False))
    direction = 1024 * 2048 * 4
    apply = {key: ds_hylo.estimate_memory(model, 256, 2, **kw).phases["apply"] for key, kw in {
        "standalone": {}, "zero1": {"zero_stage": 1}, "zero3": {"zero_stage": 3},
        "graft": {"graft": "sgd", "base": "sgd"}}.items()}
    assert apply["zero1"] - apply["standalone"] == direction
    assert apply["zero3"] == apply["standalone"]
    assert apply["graft"] - apply["standalone"] == direction


def test_constructor_warns_when_hylo_alone_exceeds_free_memory(monkeypatch):
    """Issue 19: building HyLo warns once, naming the option to lower, when its own bytes at the row cap
    exceed the device's free memory; silent otherwise, and without a row cap (the bound needs tokens)."""
    from ds_hylo import memory

    monkeypatch.setattr(memory, "free_memory", lambda device=None: 1024)
    with pytest.warns(UserWarning, match="lower max_global_samples"):
        ds_hylo.HyLo(_mlp())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds_hylo.HyLo(_mlp(), max_global_samples=None)
        monkeypatch.setattr(memory, "free_memory", lambda device=None: 2**40)
        ds_hylo.HyLo(_mlp())
