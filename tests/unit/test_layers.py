"""Layer adapters: which modules HyLo preconditions in real transformer stacks, and that every one
of them gets the exact natural-gradient step of its own per-sample rows.

The reference is independent of ds_hylo: a hook-free copy of the model gives each layer's input x
and output gradient dL/dz by plain autograd; in the "expand" convention every position whose output
gradient is nonzero is a sample, u_t = N dL/dz_t [x_t, 1]^T with N the number of such positions;
the rows must average to the layer's true gradient (a check of the gradient view, e.g. Conv1D's
transposed weight), and one HyLo step at rank_ratio = 1 must move [W | b] by the dense float64
-(F + lam I)^-1 grad with F = U U^T / N (docs/design.md section 1.2).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import DT, outer_rows, rel_err, strip_hooks, tiny_bert
from ds_hylo import HyLo
from ds_hylo.capture import LayerCapture
from ds_hylo.layers import (
    Conv2dAdapter, EmbeddingAdapter, HFConv1DAdapter, LinearAdapter, adapter_for, fallback_reason,
)
from ds_hylo.layers import conv as conv_layers

transformers = pytest.importorskip("transformers")

LAM = 0.1


# --------------------------------------------------------------------------- reference helpers


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def _matrix(module: nn.Module, weight: torch.Tensor, bias) -> torch.Tensor:
    """[W | b] as (d_out, d_in); transformers' Conv1D and nn.Embedding (a Linear on one-hot rows) store
    W transposed."""
    transposed = _is_conv1d(module) or isinstance(module, nn.Embedding)
    w = weight.T if transposed else weight.reshape(weight.shape[0], -1)
    if bias is not None:
        w = torch.cat([w, bias.reshape(-1, 1)], dim=1)
    return w.detach().clone()


def _param_matrix(module):
    return _matrix(module, module.weight, getattr(module, "bias", None))


def _dense_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's dense input rows: an Embedding's ids as one-hot rows (a zero row for padding_idx)."""
    if not isinstance(module, nn.Embedding):
        return x
    rows = F.one_hot(x, module.num_embeddings).to(DT)
    if module.padding_idx is not None:
        rows = rows * (x != module.padding_idx).unsqueeze(-1).to(DT)
    return rows


def _io_and_grads(model: nn.Module, names, loss_of):
    """On a hook-free copy: {name: (x, dL/dz, [dW | db])} for the named layers."""
    clone = strip_hooks(model)
    modules = dict(clone.named_modules())
    store = {}
    handles = []
    for name in names:
        def hook(mod, inputs, output, name=name):
            assert name not in store, f"{name} ran twice"
            output.retain_grad()
            store[name] = (inputs[0].detach(), output)
        handles.append(modules[name].register_forward_hook(hook))
    loss_of(clone).backward()
    for handle in handles:
        handle.remove()
    out = {}
    for name in names:
        module = modules[name]
        x, z = store[name]
        bias_grad = None if getattr(module, "bias", None) is None else module.bias.grad
        out[name] = (_dense_inputs(module, x), z.grad.detach(), _matrix(module, module.weight.grad, bias_grad))
    return out


def _expand_rows(x: torch.Tensor, dldz: torch.Tensor, has_bias: bool) -> torch.Tensor:
    """Per-position rows u_t = N dL/dz_t [x_t, 1]^T over positions with a nonzero output gradient."""
    a = x.reshape(-1, x.shape[-1])
    g = dldz.reshape(-1, dldz.shape[-1])
    live = g.ne(0).any(dim=1)
    if live.any():
        a, g = a[live], g[live]
    return outer_rows(a.shape[0] * g, a, has_bias)


def _dense_step(rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    n, dim = rows.shape
    system = rows.T @ rows / n + LAM * torch.eye(dim, dtype=DT)
    return torch.linalg.solve(system, grad.reshape(-1)).reshape(grad.shape)


def _hylo(model, mode="sngd", **kwargs):
    options = dict(lr=1.0, base="sgd", momentum=0.0, weight_decay=0.0, damping=LAM, mode=mode, rank_ratio=1.0,
                   update_freq=1, step_scale="natural")
    options.update(kwargs)
    return HyLo(model, **options)


def _check_every_layer_against_dense(model, opt, loss_of, expected_rows=None):
    """One HyLo step equals the dense natural step of each preconditioned layer's per-position rows."""
    names = sorted(opt.preconditioner.layers)
    modules = dict(model.named_modules())
    reference = _io_and_grads(model, names, loss_of)
    before = {n: _param_matrix(modules[n]) for n in names}
    opt.zero_grad()
    loss_of(model).backward()
    opt.step()
    for name in names:
        module = modules[name]
        x, dldz, grad = reference[name]
        rows = _expand_rows(x, dldz, getattr(module, "bias", None) is not None)
        if expected_rows is not None and name in expected_rows:
            assert rows.shape[0] == expected_rows[name], (name, rows.shape[0])
        # the rows are the layer's per-position gradients: they average to its true gradient
        torch.testing.assert_close(rows.mean(0), grad.reshape(-1), rtol=1e-9, atol=1e-12)
        expected = -_dense_step(rows, grad)
        delta = _param_matrix(module) - before[name]
        assert rel_err(delta, expected) < 1e-8, (name, rel_err(delta, expected))
        assert rel_err(delta, -grad / LAM) > 1e-3, name  # a real preconditioner, not a rescaled gradient
    assert opt.preconditioner.refreshes == 1 and opt.preconditioner.nonfinite_events == 0


def _block_names(prefix: str, layers: int, suffixes) -> set[str]:
    return {f"{prefix}.{i}.{s}" for i in range(layers) for s in suffixes}


# --------------------------------------------------------------------------- GPT-2 (transformers Conv1D)


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=8, n_head=2, vocab_size=50, n_positions=16, bos_token_id=1, eos_token_id=1,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager",
    )
    return transformers.GPT2LMHeadModel(config).to(DT)


GPT2_CONV1D = _block_names("transformer.h", 2, ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"])
GPT2_LAYERS = GPT2_CONV1D | {"transformer.wpe"}  # the position embedding; wte is tied to the LM head


@pytest.mark.parametrize("mode", ["sngd", "kis", "kid"])
def test_gpt2_every_conv1d_projection_is_preconditioned_exactly(mode):
    model = _gpt2()
    with pytest.warns(UserWarning, match="share a parameter"):
        opt = _hylo(model, mode)
    pre = opt.preconditioner
    assert set(pre.layers) == GPT2_LAYERS
    assert {layer.adapter.kind for layer in pre.layers.values()} == {"conv1d", "embedding"}
    # the LM head is tied to the token embedding: both keep their plain gradient
    fallback = {entry.split(" (")[0] for entry in pre.fallback_layers}
    assert {"lm_head", "transformer.wte"} <= fallback and "transformer.wpe" not in fallback
    assert "transformer.wte" in pre.fallback_reasons["lm_head"] and "lm_head" in pre.fallback_reasons["transformer.wte"]
    ids = torch.randint(0, 50, (2, 4), generator=torch.Generator().manual_seed(1))
    # causal LM: the last position of each sequence predicts nothing, so its rows carry no signal
    _check_every_layer_against_dense(
        model, opt, lambda m: m(input_ids=ids, labels=ids).loss, {n: 2 * 3 for n in GPT2_CONV1D}
    )


def test_gpt2_tied_head_and_embedding_gradients_stay_plain():
    model = _gpt2()
    with pytest.warns(UserWarning, match="lm_head"):
        opt = HyLo(model, lr=0.1, base="sgd", momentum=0.0, damping=LAM, mode="sngd", update_freq=1)
    ids = torch.randint(0, 50, (2, 4), generator=torch.Generator().manual_seed(2))
    weight = model.transformer.wte.weight
    assert weight is model.lm_head.weight
    before = weight.detach().clone()
    opt.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    grad = weight.grad.clone()
    opt.step()
    torch.testing.assert_close(weight.detach(), before - 0.1 * grad, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------- Llama


def _llama():
    torch.manual_seed(3)
    config = transformers.LlamaConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=50, max_position_embeddings=16, attn_implementation="eager",
        initializer_range=0.5,  # large weights: the kernel must matter against damping
    )
    return transformers.LlamaForCausalLM(config).to(DT)


LLAMA_LAYERS = _block_names(
    "model.layers", 2,
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
) | {"lm_head", "model.embed_tokens"}


def test_llama_every_projection_is_preconditioned_exactly():
    model = _llama()
    opt = _hylo(model)
    assert set(opt.preconditioner.layers) == LLAMA_LAYERS
    assert opt.preconditioner.layers["model.embed_tokens"].adapter.kind == "embedding"
    ids = torch.randint(0, 50, (3, 3), generator=torch.Generator().manual_seed(4))
    # the last position predicts nothing; the first position's query sees one key only (a softmax of
    # one score has zero derivative), so its q_proj row is exactly zero too
    counts = {n: 3 * (1 if n.endswith("q_proj") else 2) for n in LLAMA_LAYERS if n != "model.embed_tokens"}
    _check_every_layer_against_dense(model, opt, lambda m: m(input_ids=ids, labels=ids).loss, counts)


# --------------------------------------------------------------------------- BERT


def _bert():
    return tiny_bert(5)


BERT_LAYERS = _block_names(
    "bert.encoder.layer", 2,
    ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
     "intermediate.dense", "output.dense"],
) | {"bert.pooler.dense", "classifier"} | {f"bert.embeddings.{e}_embeddings" for e in ("word", "position", "token_type")}


def test_bert_every_projection_is_preconditioned_exactly():
    model = _bert()
    opt = _hylo(model)
    assert set(opt.preconditioner.layers) == BERT_LAYERS
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 50, (3, 4), generator=gen)
    labels = torch.randint(0, 3, (3,), generator=gen)
    # the pooler reads the first token only: in the last block, the query and everything after the
    # attention carry signal at that position only
    last = "bert.encoder.layer.1."
    counts = {last + s: 3 for s in ["attention.self.query", "attention.output.dense", "intermediate.dense",
                                    "output.dense"]}
    counts.update({"bert.pooler.dense": 3, "classifier": 3, last + "attention.self.key": 12})
    _check_every_layer_against_dense(model, opt, lambda m: m(input_ids=ids, labels=labels).loss, counts)


# --------------------------------------------------------------------------- torch's TransformerEncoderLayer


def test_transformer_encoder_layer_linears_exact_and_attention_reported():
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=12, dropout=0.0, batch_first=True),
        nn.Linear(8, 3),
    ).to(DT)
    opt = _hylo(model)
    pre = opt.preconditioner
    assert set(pre.layers) == {"0.linear1", "0.linear2", "1"}
    # MultiheadAttention uses in_proj_weight and out_proj.weight directly: both reported, no hook
    assert "in_proj_weight" in pre.fallback_reasons["0.self_attn"]
    assert "never runs" in pre.fallback_reasons["0.self_attn.out_proj"]
    assert not model[0].self_attn.out_proj._forward_hooks
    x = torch.randn(2, 4, 8, dtype=DT)
    y = torch.randn(2, 4, 3, dtype=DT)
    _check_every_layer_against_dense(model, opt, lambda m: F.mse_loss(m(x), y))


# --------------------------------------------------------------------------- LoRA


class LoraLike(nn.Module):
    """peft's LoRA layout: a frozen base Linear plus trainable lora_A (down) and lora_B (up)."""

    def __init__(self, d_in: int, d_out: int, rank: int):
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.base.requires_grad_(False)
        self.lora_A = nn.Linear(d_in, rank, bias=False)
        self.lora_B = nn.Linear(rank, d_out, bias=False)
        nn.init.normal_(self.lora_B.weight)  # peft starts at zero; nonzero gives lora_A a signal

    def forward(self, x):
        return self.base(x) + 2.0 * self.lora_B(self.lora_A(x))


def test_lora_adapters_preconditioned_and_frozen_base_untouched():
    torch.manual_seed(8)
    model = nn.Sequential(LoraLike(6, 5, 2), nn.Tanh(), LoraLike(5, 3, 2)).to(DT)
    opt = _hylo(model)
    pre = opt.preconditioner
    assert set(pre.layers) == {"0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"}
    for block in (model[0], model[2]):
        assert not block.base._forward_hooks  # no hooks, no rows
    assert not any(".base" in entry for entry in pre.fallback_layers + pre.skipped_layers)
    frozen = [model[0].base.weight.detach().clone(), model[2].base.weight.detach().clone()]
    x = torch.randn(3, 4, 6, dtype=DT)
    y = torch.randn(3, 4, 3, dtype=DT)
    _check_every_layer_against_dense(model, opt, lambda m: F.mse_loss(m(x), y))
    assert model[0].base.weight.grad is None and model[2].base.weight.grad is None
    torch.testing.assert_close(model[0].base.weight.detach(), frozen[0], rtol=0, atol=0)
    torch.testing.assert_close(model[2].base.weight.detach(), frozen[1], rtol=0, atol=0)


# --------------------------------------------------------------------------- the registry


class _ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2.0 * super().forward(x)


def test_registry_kinds_and_fallback_reasons():
    mha = nn.MultiheadAttention(4, 2)
    assert isinstance(adapter_for(mha.out_proj), LinearAdapter)  # alone it looks like a Linear...
    assert adapter_for(mha) is None and "in_proj_weight" in fallback_reason(mha)
    assert isinstance(adapter_for(nn.Conv2d(2, 3, 3)), Conv2dAdapter)
    assert isinstance(adapter_for(transformers.pytorch_utils.Conv1D(5, 3)), HFConv1DAdapter)
    assert adapter_for(_ScaledLinear(2, 2)) is None
    assert "overrides nn.Linear.forward" in fallback_reason(_ScaledLinear(2, 2))
    assert "groups=2" in fallback_reason(nn.Conv2d(4, 4, 3, groups=2))
    assert "reflect" in fallback_reason(nn.Conv2d(2, 2, 3, padding_mode="reflect"))
    assert isinstance(adapter_for(nn.Embedding(5, 2)), EmbeddingAdapter)
    assert "max_norm" in fallback_reason(nn.Embedding(5, 2, max_norm=1.0))
    for module in (nn.Embedding(5, 2, sparse=True), nn.LayerNorm(3), nn.Conv1d(2, 2, 3)):
        assert adapter_for(module) is None


def test_overriding_linear_subclass_and_partly_frozen_layers_fall_back_with_reasons():
    model = nn.Sequential(_ScaledLinear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    model[1].bias.requires_grad_(False)  # the kernel covers [W | b] as one block
    pre = HyLo(model, lr=0.1).preconditioner
    assert set(pre.layers) == {"2"}
    assert "overrides" in pre.fallback_reasons["0"] and "frozen" in pre.fallback_reasons["1"]


def test_conv1d_gradient_matrix_is_the_transposed_weight_gradient():
    conv = transformers.pytorch_utils.Conv1D(3, 5).to(DT)  # nf=3 outputs, nx=5 inputs: weight (5, 3)
    adapter = adapter_for(conv)
    assert (adapter.d_in, adapter.d_out) == (6, 3)
    x = torch.randn(2, 4, 5, dtype=DT)
    conv(x).pow(2).sum().backward()
    mat = adapter.gradient_matrix()
    torch.testing.assert_close(mat[:, :5], conv.weight.grad.T, rtol=0, atol=0)
    torch.testing.assert_close(mat[:, 5], conv.bias.grad, rtol=0, atol=0)
    new = torch.arange(18, dtype=DT).reshape(3, 6)
    adapter.set_gradient_matrix(new)
    torch.testing.assert_close(conv.weight.grad, new[:, :5].T, rtol=0, atol=0)
    torch.testing.assert_close(conv.bias.grad, new[:, 5], rtol=0, atol=0)


def test_conv1d_detection_does_not_import_transformers():
    code = (
        "import sys, torch; from ds_hylo.layers import adapter_for; "
        "assert adapter_for(torch.nn.Linear(2, 2)) is not None; "
        "assert adapter_for(torch.nn.LayerNorm(2)) is None; "
        "assert 'transformers' not in sys.modules, 'transformers imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("kron_max_entries", [0, 10**9], ids=["two_axis_gemms", "kron_gemm"])
def test_conv2d_adapter_positions_match_unfold_in_both_forms(kron_max_entries, monkeypatch):
    """The capture path (``input_positions``) in both forms of the patch means, against unfold."""
    monkeypatch.setattr(conv_layers, "_KRON_MAX_ENTRIES", kron_max_entries)
    torch.manual_seed(9)
    conv = nn.Conv2d(3, 4, kernel_size=3, stride=2, padding=1).to(DT)
    x = torch.randn(5, 3, 9, 8, dtype=DT)
    expected = F.unfold(F.pad(x, [1, 1, 1, 1]), 3, stride=2).mean(dim=2)
    got = adapter_for(conv).input_positions(x, DT)
    assert got.shape == (5, 1, 27)
    torch.testing.assert_close(got[:, 0], expected, rtol=1e-12, atol=1e-12)


def test_layer_capture_accepts_an_explicit_adapter_and_rejects_a_foreign_one():
    linear = nn.Linear(3, 2)
    cap = LayerCapture("fc", linear, adapter=LinearAdapter(linear))
    assert cap.adapter.module is linear
    with pytest.raises(ValueError, match="another module"):
        LayerCapture("fc", linear, adapter=LinearAdapter(nn.Linear(3, 2)))
    with pytest.raises(TypeError, match="no HyLo kernel"):
        LayerCapture("ln", nn.LayerNorm(4))
