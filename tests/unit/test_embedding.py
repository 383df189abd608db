"""nn.Embedding preconditioned from token-id rows (docs/design.md section 1.10).

The reference is the dense one-hot computation: an Embedding(V, D) is a Linear(V -> D, no bias)
whose weight is the embedding's transposed, fed the one-hot row of each token (a zero row for a
``padding_idx`` token, whose weight row torch never updates). Every kernel helper on id rows is
checked against the same helper on the dense one-hot rows, and whole HyLo runs on an Embedding
model against the same runs on the one-hot Linear model, in float64, to round-off.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ds_hylo import HyLo, kernels
from ds_hylo.exchange import LocalRows, SingleProcess, gather_rows
from ds_hylo.layers import EmbeddingAdapter, adapter_for, fallback_reason
from ds_hylo.reduce import REDUCTIONS
from ds_hylo.sampling import KISReservoir

DT = torch.float64
V, D, C = 13, 5, 4
PAD = 2


def one_hot(ids: torch.Tensor, vocab: int, padding_idx=None, dtype=DT) -> torch.Tensor:
    """Dense one-hot rows of ids (..., ) -> (..., vocab); a padding id (or -1) gives a zero row."""
    dense = F.one_hot(ids.clamp_min(0), vocab).to(dtype)
    zero = ids < 0
    if padding_idx is not None:
        zero = zero | (ids == padding_idx)
    return torch.where(zero.unsqueeze(-1), torch.zeros_like(dense), dense)


def _id_rows(n: int, vocab: int, seed: int, pad_rows: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(vocab, 6), (n, 1), generator=gen)  # few distinct ids: many repeats
    if pad_rows:
        ids[-pad_rows:] = -1
    return ids


# --------------------------------------------------------------------------- kernel helpers
def _rows(n: int, seed: int, pad_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(id rows (n, 1), the same rows as dense one-hot (n, V) float64, output-gradient rows (n, D))."""
    ids = _id_rows(n, V, seed=seed, pad_rows=pad_rows)
    g = torch.randn(n, D, dtype=DT, generator=torch.Generator().manual_seed(seed + 1))
    return ids, one_hot(ids[:, 0], V), g


@pytest.mark.parametrize("pad_rows", [0, 3])
def test_kernel_helpers_match_the_dense_one_hot_rows(pad_rows):
    n = 11
    ids, dense, g = _rows(n, seed=1, pad_rows=pad_rows)
    grad = torch.randn(D, V, dtype=DT, generator=torch.Generator().manual_seed(3))
    c = torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(4))
    assert kernels.index_rows(ids) and not kernels.index_rows(dense)
    torch.testing.assert_close(kernels.kernel(ids, g), kernels.kernel(dense, g), rtol=0, atol=1e-14)
    torch.testing.assert_close(kernels.kernel_diag(ids, g), kernels.kernel_diag(dense, g), rtol=0, atol=1e-14)
    index = torch.tensor([0, 4, 7])
    torch.testing.assert_close(kernels.kernel_columns(ids, g, index), kernels.kernel_columns(dense, g, index))
    torch.testing.assert_close(kernels.project(ids, g, grad), kernels.project(dense, g, grad))
    torch.testing.assert_close(kernels.expand(ids, g, c, width=V), kernels.expand(dense, g, c))
    torch.testing.assert_close(kernels.expand(ids, g, c, subtract_from=grad), kernels.expand(dense, g, c, subtract_from=grad))
    with pytest.raises(ValueError, match="width"):
        kernels.expand(ids, g, c)
    # the batched input gram of the KID row path
    batched = ids.reshape(1, n, 1)
    torch.testing.assert_close(kernels.input_gram(batched, batched, DT), (dense @ dense.T).reshape(1, n, n))
    # KIS: same keys, same draw
    draw = kernels.kis_select(ids, g, 5, torch.Generator().manual_seed(9))
    torch.testing.assert_close(draw, kernels.kis_select(dense, g, 5, torch.Generator().manual_seed(9)))
    # (*) in float64 and in float32 (the id rows are never converted)
    k_mat = kernels.kernel(dense, g)
    c_mat = kernels.sngd_inverse(k_mat, 0.1, n)
    for work in (DT, torch.float32):
        out = kernels.apply_smw(grad, ids, g, c_mat, 0.1, 1.0, work_dtype=work)
        ref = kernels.apply_smw(grad, dense, g, c_mat, 0.1, 1.0, work_dtype=work)
        torch.testing.assert_close(out, ref, rtol=1e-5 if work == torch.float32 else 1e-12, atol=1e-12)
    torch.testing.assert_close(kernels.smw_amplification(kernels.kernel(ids, g), c_mat),
                               kernels.smw_amplification(k_mat, c_mat))


def test_padding_rows_contribute_nothing():
    ids = torch.tensor([[3], [-1], [3]])
    g = torch.ones(3, D, dtype=DT)
    k_mat = kernels.kernel(ids, g)
    assert k_mat[1].abs().sum() == 0 and k_mat[:, 1].abs().sum() == 0
    assert kernels.kernel_diag(ids, g).tolist() == [D, 0.0, D]
    out = kernels.expand(ids, g, torch.ones(3, dtype=DT), width=V)
    assert out[:, 0].abs().sum() == 0  # the -1 row never writes column 0 (its clamped index)
    assert out[:, 3].tolist() == [2.0] * D


@pytest.mark.parametrize("pad_rows", [0, 2])
def test_kid_exact_and_row_paths_match_the_dense_rows(pad_rows):
    n = 14
    ids, dense, g = _rows(n, seed=5, pad_rows=pad_rows)
    piv_i, m_i = kernels.kid_local(kernels.kernel(ids, g), 4, 0.1, 2 * n)
    piv_d, m_d = kernels.kid_local(kernels.kernel(dense, g), 4, 0.1, 2 * n)
    assert piv_i.tolist() == piv_d.tolist()
    torch.testing.assert_close(m_i @ m_i.T, m_d @ m_d.T, rtol=1e-10, atol=1e-12)
    piv_i, m_i = kernels.kid_local_rows(ids, g, 4, 0.1, 2 * n, block_rows=5)
    piv_d, m_d = kernels.kid_local_rows(dense, g, 4, 0.1, 2 * n, block_rows=5)
    assert piv_i.tolist() == piv_d.tolist()
    torch.testing.assert_close(m_i @ m_i.T, m_d @ m_d.T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["sngd", "kis", "kid"])
def test_reductions_and_gather_keep_ids(mode):
    n = 9
    ids = _id_rows(n, V, seed=7, pad_rows=1)
    g = torch.randn(n, D, dtype=torch.float32, generator=torch.Generator().manual_seed(8))
    gen = torch.Generator().manual_seed(3) if mode == "kis" else None
    local = REDUCTIONS[mode].reduce(ids, g, 5 if mode != "sngd" else n, 12, 0.1, n, gen)
    assert local.a.dtype == torch.long and local.a.shape == (12, 1)
    if local.m_factor is not None:
        assert local.m_factor.dtype == torch.float32
    (gathered,) = gather_rows(SingleProcess(), [local])
    assert gathered.a.dtype == torch.long and torch.equal(gathered.a, local.a[: local.valid])


def test_gather_bit_casts_ids_beyond_float_precision():
    """Ids above 2^24 (float32's exact integers) and above 2^53 cross the float payload unchanged."""
    ids = torch.tensor([[2**24 + 1], [2**53 + 3], [-1], [999]])
    g = torch.randn(4, 3, dtype=torch.float32)
    dense = LocalRows(torch.randn(4, 2, dtype=torch.float32), torch.randn(4, 3, dtype=torch.float32), None, 4)
    out = gather_rows(SingleProcess(), [LocalRows(ids, g, None, 4), dense])
    assert torch.equal(out[0].a, ids) and torch.equal(out[0].g, g) and torch.equal(out[1].a, dense.a)


def test_streamed_reservoir_takes_id_rows_like_dense_rows():
    ids = _id_rows(10, V, seed=11, pad_rows=2)
    dense = one_hot(ids[:, 0], V, dtype=torch.float32)
    g = torch.randn(10, D, generator=torch.Generator().manual_seed(12))
    out = []
    for a in (ids, dense):
        res = KISReservoir(5, lambda rows: 4)
        res.merge(0, a, g, bias=False, droppable=True)
        out.append(res.take(4))
    assert out[0][0].dtype == torch.long
    torch.testing.assert_close(one_hot(out[0][0][:, 0], V, dtype=torch.float32), out[1][0])
    torch.testing.assert_close(out[0][1], out[1][1])


# --------------------------------------------------------------------------- the adapter


def test_adapter_rows_and_gradient_view():
    emb = nn.Embedding(V, D, padding_idx=PAD)
    adapter = adapter_for(emb)
    assert isinstance(adapter, EmbeddingAdapter)
    assert (adapter.d_in, adapter.d_out, adapter.row_width, adapter.has_bias) == (V, D, 1, False)
    x = torch.tensor([[1, PAD, 3], [4, 4, PAD]])
    rows = adapter.input_rows(x)
    assert rows.dtype == torch.long and rows[:, 0].tolist() == [1, -1, 3, 4, 4, -1]
    assert adapter.input_rows(torch.tensor(7)).tolist() == [[7]]
    assert adapter.shape_of_positions(torch.zeros(3, dtype=torch.long)) == (3, 1)
    emb.weight.grad = torch.randn(V, D)
    mat = adapter.gradient_matrix()
    assert mat.shape == (D, V) and torch.equal(mat, emb.weight.grad.T)
    expected = 2 * mat.clone()  # mat is a view of the gradient
    adapter.set_gradient_matrix(expected)
    torch.testing.assert_close(emb.weight.grad.T, expected)


@pytest.mark.parametrize("kwargs, words", [
    ({"max_norm": 1.0}, "max_norm"),
    ({"sparse": True}, "sparse"),
    ({"scale_grad_by_freq": True}, "scale_grad_by_freq"),
])
def test_unsupported_embeddings_fall_back_with_a_reason(kwargs, words):
    emb = nn.Embedding(V, D, **kwargs)
    assert adapter_for(emb) is None
    assert words in fallback_reason(emb)


def test_embedding_subclass_overriding_forward_falls_back():
    class Scaled(nn.Embedding):
        def forward(self, x):
            return 2 * super().forward(x)

    assert adapter_for(Scaled(V, D)) is None and "overrides" in fallback_reason(Scaled(V, D))


# --------------------------------------------------------------------------- end to end vs one-hot Linear


class EmbedNet(nn.Module):
    def __init__(self, padding_idx=PAD, vocab=V, dtype=DT):
        super().__init__()
        self.emb = nn.Embedding(vocab, D, padding_idx=padding_idx, dtype=dtype)
        self.head = nn.Linear(D, C, dtype=dtype)
        self.padding_idx = padding_idx

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


class OneHotNet(nn.Module):
    """The same model with the Embedding as a bias-free Linear on explicit one-hot rows."""

    def __init__(self, emb_net: EmbedNet):
        super().__init__()
        vocab = emb_net.emb.num_embeddings
        self.emb = nn.Linear(vocab, D, bias=False, dtype=DT)
        self.head = copy.deepcopy(emb_net.head)
        with torch.no_grad():
            self.emb.weight.copy_(emb_net.emb.weight.T)
        self.padding_idx, self.vocab = emb_net.padding_idx, vocab

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(one_hot(ids, self.vocab, self.padding_idx))))


def _batches(steps: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, 7, (3, 6), generator=gen)  # 7 of 13 ids: repeats within and across samples
        ids[0, 0] = ids[0, 3] = ids[1, 2] = 5  # a token repeated within a sample and across samples
        ids[2, -2:] = PAD  # padded positions (their loss still counts: nonzero output gradients)
        labels = torch.randint(0, C, (3, 6), generator=gen)
        out.append((ids, labels))
    return out


def _train(model, batches, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = HyLo(model, lr=0.05, update_freq=2, damping=0.05, seed=3, **options)
    for ids, labels in batches:
        opt.zero_grad()
        loss = F.cross_entropy(model(ids).reshape(-1, C), labels.reshape(-1))
        loss.backward()
        opt.step()
    return opt


def _emb_weight(model):
    w = model.emb.weight.detach()
    return w if isinstance(model.emb, nn.Embedding) else w.T


@pytest.mark.parametrize("mode, options", [
    ("sngd", {}),
    ("kis", {"rank_ratio": 0.5, "max_global_samples": None}),
    ("kis", {"rank_ratio": 0.3, "max_global_samples": None, "stream": False}),
    ("kid", {"rank_ratio": 0.4, "max_global_samples": None}),
    ("hybrid", {"rank_ratio": 0.4, "max_global_samples": None}),
])
def test_embedding_steps_equal_the_one_hot_linear_steps(mode, options):
    options = dict(options)
    stream = options.pop("stream", True)
    torch.manual_seed(0)
    emb_model = EmbedNet()
    dense_model = OneHotNet(emb_model)
    batches = _batches(5)
    opts = []
    for model in (emb_model, dense_model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = HyLo(model, lr=0.05, update_freq=2, damping=0.05, seed=3, mode=mode, **options)
        opt.preconditioner.stream_kis = stream
        for ids, labels in batches:
            opt.zero_grad()
            F.cross_entropy(model(ids).reshape(-1, C), labels.reshape(-1)).backward()
            opt.step()
        opts.append(opt)
    assert set(opts[0].preconditioner.factors) == {"emb", "head"}
    assert opts[0].preconditioner.layers["emb"].adapter.kind == "embedding"
    f_emb, f_dense = opts[0].preconditioner.factors["emb"], opts[1].preconditioner.factors["emb"]
    assert f_emb.a.dtype == torch.long and f_emb.a.shape == (f_dense.a.shape[0], 1)
    torch.testing.assert_close(one_hot(f_emb.a[:, 0], V), f_dense.a, rtol=0, atol=0)
    torch.testing.assert_close(_emb_weight(emb_model), _emb_weight(dense_model), rtol=0, atol=1e-10)
    torch.testing.assert_close(emb_model.head.weight, dense_model.head.weight, rtol=0, atol=1e-10)
    # the padding row is never written: it stays at its initial zeros
    assert emb_model.emb.weight[PAD].abs().max() == 0


def test_kid_row_path_equals_the_one_hot_linear(monkeypatch):
    monkeypatch.setattr(REDUCTIONS["kid"], "exact_max_rows", 4)
    monkeypatch.setattr(REDUCTIONS["kid"], "residual_block_rows", 5)
    torch.manual_seed(1)
    emb_model = EmbedNet()
    dense_model = OneHotNet(emb_model)
    batches = _batches(3, seed=1)
    _train(emb_model, batches, mode="kid", rank_ratio=0.3, max_global_samples=None)
    _train(dense_model, batches, mode="kid", rank_ratio=0.3, max_global_samples=None)
    torch.testing.assert_close(_emb_weight(emb_model), _emb_weight(dense_model), rtol=0, atol=1e-10)


def test_reduce_convention_keeps_token_rows_for_embeddings():
    torch.manual_seed(2)
    model = EmbedNet()
    opt = _train(model, _batches(1), mode="sngd", sequence_convention="reduce")
    layers = opt.preconditioner.layers
    assert layers["emb"].sequence_convention == "expand" and layers["head"].sequence_convention == "reduce"
    assert opt.preconditioner.factors["emb"].a.shape == (18, 1)  # 3 x 6 tokens
    assert opt.preconditioner.factors["head"].a.shape[0] == 3  # one row per sample


# --------------------------------------------------------------------------- checkpoint, bf16, tied weights


def test_checkpoint_round_trip_gives_the_same_next_step(tmp_path):
    torch.manual_seed(4)
    model = EmbedNet()
    batches = _batches(4, seed=4)
    opt = _train(model, batches[:3], mode="kis", rank_ratio=0.5, max_global_samples=None)
    state = {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict())}
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    a = opt.preconditioner.factors["emb"].a
    assert a.dtype == torch.long and a.shape[1] == 1

    def next_step(m, o):
        o.zero_grad()
        ids, labels = batches[3]
        F.cross_entropy(m(ids).reshape(-1, C), labels.reshape(-1)).backward()
        o.step()
        return m.emb.weight.detach().clone()

    expected = next_step(model, opt)
    loaded = torch.load(path, weights_only=True)
    model2 = EmbedNet()
    model2.load_state_dict(loaded["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt2 = HyLo(model2, lr=0.05, update_freq=2, damping=0.05, seed=3, mode="kis", rank_ratio=0.5,
                    max_global_samples=None)
    opt2.load_state_dict(loaded["opt"])
    assert torch.equal(next_step(model2, opt2), expected)
    # a dense (s, V) factor, or float ids, do not fit an embedding layer
    bad = copy.deepcopy(loaded["opt"])
    hylo = bad["hylo"]
    f = hylo["factors"]["emb"]
    s = f["a"].shape[0]
    f["a"] = torch.zeros(s, V, dtype=DT)
    with pytest.raises(ValueError, match=r"factor 'a' has shape"):
        opt2.preconditioner.validate_state_dict(hylo)
    f["a"] = torch.zeros(s, 1, dtype=DT)
    with pytest.raises(ValueError, match="int64 token ids"):
        opt2.preconditioner.validate_state_dict(hylo)


def test_bf16_model_keeps_ids_exact_above_256():
    vocab = 1000
    torch.manual_seed(5)
    model = EmbedNet(padding_idx=None, vocab=vocab, dtype=torch.bfloat16)
    ids = torch.tensor([[999, 998, 997, 257], [513, 999, 1, 0]])
    labels = torch.randint(0, C, (2, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = HyLo(model, lr=0.05, update_freq=1, mode="sngd", damping=0.05)
    before = model.emb.weight.detach().clone()
    F.cross_entropy(model(ids).reshape(-1, C).float(), labels.reshape(-1)).backward()
    opt.step()
    a = opt.preconditioner.factors["emb"].a
    assert a.dtype == torch.long and sorted(a[:, 0].tolist()) == sorted(ids.reshape(-1).tolist())
    moved = (model.emb.weight.detach() != before).any(dim=1).nonzero().reshape(-1).tolist()
    assert moved == sorted(set(ids.reshape(-1).tolist()))  # exactly the rows of the tokens seen


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.mid = nn.Linear(D, D)
        self.lm_head = nn.Linear(D, V, bias=False)
        self.lm_head.weight = self.emb.weight  # tied, as transformers' tie_weights()

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.mid(self.emb(ids))))


def test_tied_embedding_is_reported_not_preconditioned_twice():
    model = TiedLM()
    with pytest.warns(UserWarning, match="share a parameter"):
        opt = HyLo(model, lr=0.05, update_freq=1, mode="sngd")
    pre = opt.preconditioner
    assert set(pre.layers) == {"mid"}
    for name, other in (("emb", "lm_head"), ("lm_head", "emb")):
        assert other in pre.fallback_reasons[name] and "tied" in pre.fallback_reasons[name]
    ids = torch.randint(0, V, (2, 5))
    before = model.emb.weight.detach().clone()
    loss = F.cross_entropy(model(ids).reshape(-1, V), ids.reshape(-1))
    loss.backward()
    raw = model.emb.weight.grad.clone()
    opt.step()
    assert set(pre.factors) == {"mid"}
    # the tied weight took a plain AdamW step from its raw gradient (first step: -lr * sign)
    expected = before - 0.05 * raw / (raw.abs() + 1e-8)
    torch.testing.assert_close(model.emb.weight.detach(), expected, rtol=1e-5, atol=1e-6)
