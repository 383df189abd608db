"""Capture hooks: the captured rows (A, G) must give the true per-sample gradients u_i = vec(g_i a_i^T).

References are independent of ds_hylo.capture: torch.func.vmap(grad) per-sample gradients on a
hook-free copy, conv2d-probe mean patches (no unfold) or unfold's mean patches, and plain autograd
output gradients.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import (
    CONV_VARIANTS,
    DT,
    ConvNet,
    TokenMLP,
    conv_id,
    conv_mean_patches,
    layer_io,
    layer_rows_from_grads,
    mse,
    outer_rows,
    per_sample_grads,
    rel_err,
)
from ds_hylo import capture, kernels
from ds_hylo.capture import LayerCapture, is_supported
from ds_hylo.layers import conv as conv_layers


def _capture(model: nn.Module, names, convention: str = "expand") -> dict[str, LayerCapture]:
    modules = dict(model.named_modules())
    caps = {n: LayerCapture(n, modules[n], convention) for n in names}
    for cap in caps.values():
        cap.enabled = True
    return caps


def _rows(cap: LayerCapture, scale: float) -> torch.Tensor:
    a, g = cap.take(scale)
    return outer_rows(g, a, has_bias=False)  # a already carries the ones column when there is a bias


# --------------------------------------------------------------------------- Linear 2D


@pytest.mark.parametrize("bias", [True, False])
def test_linear_rows_equal_per_sample_gradients(bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4, bias=bias), nn.Tanh(), nn.Linear(4, 3, bias=bias)).to(DT)
    x = torch.randn(7, 5, dtype=DT)
    y = torch.randn(7, 3, dtype=DT)
    psg = per_sample_grads(model, mse, x, y)
    caps = _capture(model, ["0", "2"])
    mse(model(x), y).backward()
    for name, cap in caps.items():
        assert cap.num_rows == 7
        grad = cap.gradient_matrix().clone()
        rows = _rows(cap, 7)
        expected = layer_rows_from_grads(psg, name, has_bias=bias)
        torch.testing.assert_close(rows, expected, rtol=1e-12, atol=1e-14)
        # the batch gradient is the mean of the per-sample gradients
        torch.testing.assert_close(rows.mean(0), grad.reshape(-1), rtol=1e-12, atol=1e-14)
        assert not cap.has_data()  # take() clears


def test_capture_accumulates_micro_batches_and_ignores_no_grad_and_disabled():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 2)).to(DT)
    (cap,) = _capture(model, ["0"]).values()
    x1, x2 = torch.randn(4, 3, dtype=DT), torch.randn(5, 3, dtype=DT)
    model(x1).sum().backward()
    with torch.no_grad():
        model(torch.randn(6, 3, dtype=DT))
    model(torch.randn(2, 3, dtype=DT))  # forward whose backward never happens: dropped
    model(x2).sum().backward()
    assert cap.num_rows == 9
    a, g = cap.take(1.0)
    torch.testing.assert_close(a[:, :3], torch.cat([x1, x2]))
    torch.testing.assert_close(a[:, 3], torch.ones(9, dtype=DT))
    torch.testing.assert_close(g, torch.ones(9, 2, dtype=DT))
    cap.enabled = False
    model(x1).sum().backward()
    assert not cap.has_data()
    with pytest.raises(RuntimeError):
        cap.take(1.0)


def test_supported_layer_types():
    assert is_supported(nn.Linear(2, 2))
    assert is_supported(nn.Conv2d(2, 2, 3))
    assert not is_supported(nn.Conv2d(4, 4, 3, groups=2))
    assert not is_supported(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    assert is_supported(nn.Embedding(5, 2))
    for module in (nn.Embedding(5, 2, sparse=True), nn.LayerNorm(3), nn.BatchNorm2d(3), nn.Conv1d(2, 2, 3)):
        assert not is_supported(module)
    with pytest.raises(TypeError):
        LayerCapture("emb", nn.Embedding(5, 2, sparse=True))


# --------------------------------------------------------------------------- Conv2d


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("kwargs", CONV_VARIANTS, ids=conv_id)
def test_conv_rows_are_mean_patches_and_summed_output_grads(kwargs):
    torch.manual_seed(2)
    model = ConvNet(**kwargs).to(DT)
    x = torch.randn(4, 2, 7, 8, dtype=DT)
    y = torch.randn(4, 2, dtype=DT)
    x_ref, dldz, _ = layer_io(model, "conv", lambda m: mse(m(x), y))
    (cap,) = _capture(model, ["conv"]).values()
    mse(model(x), y).backward()
    a, g = cap.take(4)
    expected_a = conv_mean_patches(model.conv, x_ref)
    if model.conv.bias is not None:
        expected_a = torch.cat([expected_a, torch.ones(4, 1, dtype=DT)], dim=1)
    torch.testing.assert_close(a, expected_a, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g, 4 * dldz.sum(dim=(2, 3)), rtol=1e-12, atol=1e-14)
    assert cap.d_in == a.shape[1] and cap.d_out == g.shape[1] == 3


# CONV_VARIANTS plus a 1x1 conv and a non-square kernel with non-square stride and dilation.
PATCH_MEAN_GEOMETRIES = CONV_VARIANTS + [
    dict(kernel_size=1),
    dict(kernel_size=(3, 2), stride=(2, 1), dilation=(1, 2)),
]


def _unfold_patch_means(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """mean over positions of F.unfold's patches, (B, C*kh*kw), with the conv's zero padding
    ("same": total dilation*(kernel-1) per axis, the odd extra at the end, as conv2d does)."""
    if isinstance(conv.padding, str):
        (kh, kw), (dh, dw) = conv.kernel_size, conv.dilation
        th, tw = (dh * (kh - 1), dw * (kw - 1)) if conv.padding == "same" else (0, 0)
        pads = [tw // 2, tw - tw // 2, th // 2, th - th // 2]
    else:
        pads = [conv.padding[1], conv.padding[1], conv.padding[0], conv.padding[0]]
    x = F.pad(x, pads)
    return F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride).mean(dim=2)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("kron_max_entries", [0, 10**9], ids=["two_axis_gemms", "kron_gemm"])
@pytest.mark.parametrize("kwargs", PATCH_MEAN_GEOMETRIES, ids=conv_id)
def test_conv_patch_means_match_unfold(kwargs, kron_max_entries, monkeypatch):
    """Both forms of the Conv2d adapter's patch means (forced by the size threshold) equal unfold's mean patches.

    Odd and even sizes: a stride larger than the dilation leaves unread rows/columns at the end."""
    monkeypatch.setattr(conv_layers, "_KRON_MAX_ENTRIES", kron_max_entries)
    torch.manual_seed(7)
    conv = nn.Conv2d(3, 4, **kwargs).to(DT)
    cap = LayerCapture("conv", conv)
    for size in [(7, 8), (10, 9)]:
        x = torch.randn(5, 3, *size, dtype=DT)
        expected = _unfold_patch_means(conv, x)
        got = cap.adapter.patch_means(x)
        assert got.shape == expected.shape == (5, 3 * conv.kernel_size[0] * conv.kernel_size[1])
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs", [dict(kernel_size=3), dict(kernel_size=2, stride=2, dilation=2)])
def test_conv_surrogate_exact_for_spatially_constant_inputs(kwargs):
    """Without padding, constant inputs give the same patch at every position, so
    sum_p g_p patch_p^T = (sum_p g_p) mean_patch^T: the surrogate IS the per-sample gradient."""
    torch.manual_seed(3)
    model = ConvNet(**kwargs).to(DT)
    x = torch.randn(5, 2, 1, 1, dtype=DT).expand(5, 2, 8, 8).contiguous()
    y = torch.randn(5, 2, dtype=DT)
    psg = per_sample_grads(model, mse, x, y)
    (cap,) = _capture(model, ["conv"]).values()
    mse(model(x), y).backward()
    rows = _rows(cap, 5)
    torch.testing.assert_close(rows, layer_rows_from_grads(psg, "conv"), rtol=1e-10, atol=1e-13)


def _smooth_images(batch: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """Spatially correlated images: a 3x3 random field upsampled bicubically, plus a mean."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, channels, 3, 3, generator=gen, dtype=DT)
    offset = torch.randn(batch, channels, 1, 1, generator=gen, dtype=DT)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True) + offset


def test_conv_surrogate_kernel_trace_matches_exact_on_smooth_inputs():
    """trace(K) = sum_b ||u_b||^2 sets the kernel's scale against damping lam N.

    The exact conv per-sample gradient is u_b = sum_p g_bp patch_bp^T over output positions p.
    The "reduce" surrogate (sum_p g_bp)(mean_p patch_bp)^T equals it when the patches (or the
    output gradients) do not vary over p, and stays close when the input is spatially smooth and
    the output gradients do not cancel over positions (here: ReLU then global average pooling, as
    in real CNN heads). So its trace is within a small factor of the exact kernel's trace. The
    public reference code also AVERAGED the output gradients over the P positions, which shrinks
    the trace by P^2 (here P = 144): the test shows that convention fails by far.
    """
    torch.manual_seed(4)
    model = ConvNet(kernel_size=3, padding=1).to(DT)
    batch = 6
    x = _smooth_images(batch, 2, 12, seed=5)
    y = torch.randn(batch, 2, dtype=DT)
    exact_rows = layer_rows_from_grads(per_sample_grads(model, mse, x, y), "conv")
    exact_trace = float(exact_rows.pow(2).sum())
    (cap,) = _capture(model, ["conv"]).values()
    mse(model(x), y).backward()
    a, g = cap.take(batch)
    surrogate_trace = float(kernels.kernel(a, g).trace())
    ratio = surrogate_trace / exact_trace
    assert 0.2 < ratio < 5.0, ratio
    positions = 12 * 12
    assert ratio / positions**2 < 0.2 / 100  # mean-of-output-grads convention: off by P^2


# --------------------------------------------------------------------------- Linear on sequences


def test_expand_rows_equal_per_token_gradients():
    """With a token-wise loss averaged over B*T tokens, each position's row is its token's gradient."""
    torch.manual_seed(6)
    model = TokenMLP().to(DT)
    batch, seq = 3, 4
    x = torch.randn(batch, seq, 4, dtype=DT)
    y = torch.randn(batch, seq, 3, dtype=DT)
    psg = per_sample_grads(model, mse, x.reshape(-1, 4), y.reshape(-1, 3))  # one sample per token
    caps = _capture(model, ["inp", "out"], "expand")
    mse(model(x), y).backward()
    for name, cap in caps.items():
        assert cap.num_rows == batch * seq
        rows = _rows(cap, batch * seq)
        torch.testing.assert_close(rows, layer_rows_from_grads(psg, name), rtol=1e-12, atol=1e-14)


def test_reduce_rows_on_sequences():
    """"reduce": a_b = mean_t x_bt, g_b = B sum_t dL/dz_bt; exact per-sequence gradient when x is
    constant along the sequence."""
    torch.manual_seed(7)
    model = TokenMLP().to(DT)
    batch, seq = 3, 5

    def seq_loss(out, target):  # per-sequence loss that mixes positions
        return ((torch.tanh(out).mean(dim=-2) - target) ** 2).mean()

    x = torch.randn(batch, seq, 4, dtype=DT)
    y = torch.randn(batch, 3, dtype=DT)
    x_ref, dldz, _ = layer_io(model, "inp", lambda m: seq_loss(m(x), y))
    caps = _capture(model, ["inp"], "reduce")
    seq_loss(model(x), y).backward()
    a, g = caps["inp"].take(batch)
    torch.testing.assert_close(a[:, :4], x_ref.mean(dim=1), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a[:, 4], torch.ones(batch, dtype=DT))
    torch.testing.assert_close(g, batch * dldz.sum(dim=1), rtol=1e-12, atol=1e-14)

    x_const = torch.randn(batch, 1, 4, dtype=DT).expand(batch, seq, 4).contiguous()
    psg = per_sample_grads(model, seq_loss, x_const, y)
    caps = _capture(model, ["inp"], "reduce")
    seq_loss(model(x_const), y).backward()
    rows = _rows(caps["inp"], batch)
    torch.testing.assert_close(rows, layer_rows_from_grads(psg, "inp"), rtol=1e-10, atol=1e-13)


def test_gradient_matrix_roundtrip():
    conv = nn.Conv2d(2, 3, 2).to(DT)
    (conv.weight.sum() * 2 + conv.bias.sum() * 3).backward()
    cap = LayerCapture("c", conv)
    mat = cap.gradient_matrix()
    assert mat.shape == (3, 2 * 2 * 2 + 1)
    torch.testing.assert_close(mat[:, :-1], torch.full((3, 8), 2.0, dtype=DT))
    torch.testing.assert_close(mat[:, -1], torch.full((3,), 3.0, dtype=DT))
    new = torch.arange(27, dtype=DT).reshape(3, 9)
    cap.set_gradient_matrix(new)
    torch.testing.assert_close(conv.weight.grad.reshape(3, -1), new[:, :-1])
    torch.testing.assert_close(conv.bias.grad, new[:, -1])
    assert rel_err(cap.gradient_matrix(), new) == 0.0


# --------------------------------------------------------------------------- lifecycle


def test_no_capture_keeps_an_extra_autograd_grad_pass_out_of_the_rows():
    """An extra forward + autograd.grad pass (e.g. a gradient-norm probe) on a refresh step must not
    add rows: its backward never reaches .grad, so even without no_capture() its pass stays
    unmatched (held until the refresh clears it, never taken); inside no_capture() it is not even
    held. Either way the rows equal the training pass's."""
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x, x_extra = torch.randn(6, 3, dtype=DT), torch.randn(6, 3, dtype=DT)
    params = list(model.parameters())

    def run(extra_context):
        caps = _capture(model, ["0", "2"])
        mse(model(x), torch.zeros(6, 2, dtype=DT)).backward()
        with extra_context():
            torch.autograd.grad(model(x_extra).pow(2).sum(), params)
        out = {name: (cap.num_rows, cap.held_rows, *cap.take(1.0)) for name, cap in caps.items()}
        for cap in caps.values():
            cap.remove()
        return out

    unmatched = run(contextlib.nullcontext)
    kept = run(capture.no_capture)
    caps = _capture(model, ["0", "2"])
    mse(model(x), torch.zeros(6, 2, dtype=DT)).backward()
    for name, cap in caps.items():
        rows, held, a, g = kept[name]
        assert rows == held == 6
        ref_a, ref_g = cap.take(1.0)
        torch.testing.assert_close(a, ref_a, rtol=0, atol=0)
        torch.testing.assert_close(g, ref_g, rtol=0, atol=0)
        rows, held, a, g = unmatched[name]
        assert rows == 6 and held == 12  # 12 rows (both passes' gradients) before issue 22
        torch.testing.assert_close(a, ref_a, rtol=0, atol=0)
        torch.testing.assert_close(g, ref_g, rtol=0, atol=0)


def test_no_capture_nests_and_ignores_output_gradients_arriving_inside_it():
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(3, 2)).to(DT)
    (cap,) = _capture(model, ["0"]).values()
    out = model(torch.randn(4, 3, dtype=DT))  # captured: slot awaiting its gradient
    with capture.no_capture():
        with capture.no_capture():
            model(torch.randn(5, 3, dtype=DT)).sum().backward()
        assert capture.capture_suspended()
        out.sum().backward(retain_graph=True)  # the hook fires inside no_capture: ignored
    assert not capture.capture_suspended()
    assert cap.held_rows == 4 and cap.num_rows == 0 and cap.has_unmatched_inputs()
    out.sum().backward()
    assert cap.num_rows == 4


def test_output_gradients_of_several_backwards_through_one_pass_add_up():
    """loss1.backward(retain_graph=True); loss2.backward() accumulates parameter gradients, so each
    sample's gradient, and its output-gradient row, is the sum of the two."""
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(3, 2)).to(DT)
    x = torch.randn(4, 3, dtype=DT)
    (cap,) = _capture(model, ["0"]).values()
    out = model(x)
    out.pow(2).sum().backward(retain_graph=True)
    (3 * out).sum().backward()
    _, g = cap.take(1.0)
    torch.testing.assert_close(g, 2 * out.detach() + 3, rtol=1e-14, atol=1e-14)


def test_max_rows_keeps_the_first_passes_and_bounds_memory():
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(3, 2)).to(DT)
    cap = LayerCapture("0", model[0], max_rows=10)
    cap.enabled = True
    xs = [torch.randn(4, 3, dtype=DT) for _ in range(3)]
    for x in xs:
        model(x).sum().backward()
    assert cap.overflowed and cap.refused_passes == 1
    assert cap.held_rows == cap.num_rows == 8
    model(torch.randn(1, 3, dtype=DT)).sum().backward()  # would fit, but the rule keeps the first passes
    assert cap.refused_passes == 2 and cap.num_rows == 8
    a, _ = cap.take(1.0)
    torch.testing.assert_close(a[:, :3], torch.cat(xs[:2]), rtol=0, atol=0)
    assert not cap.overflowed  # take() clears, and clear() starts again
    for _ in range(50):  # step() never called: the rows held stay bounded
        model(torch.randn(4, 3, dtype=DT)).sum().backward()
        assert cap.held_rows <= 10
    assert cap.refused_passes == 50


@pytest.mark.parametrize("convention, rows_per_pass", [("expand", 12), ("reduce", 3)])
def test_max_rows_counts_rows_as_captured(convention, rows_per_pass):
    model = TokenMLP().to(DT)
    cap = LayerCapture("inp", model.inp, convention, max_rows=rows_per_pass)
    cap.enabled = True
    for _ in range(2):
        model(torch.randn(3, 4, 4, dtype=DT)).sum().backward()
    assert cap.held_rows == cap.num_rows == rows_per_pass and cap.overflowed


@pytest.mark.parametrize("bad", [0, -1, 2.5, "10", True])
def test_max_rows_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="max_rows"):
        LayerCapture("fc", nn.Linear(2, 2), max_rows=bad)


def test_late_backward_of_a_cleared_pass_never_writes_into_a_new_slot():
    """clear() between a forward and its backward (e.g. a skipped step): the late backward must not
    fill the slot that a later pass reuses."""
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(3, 2)).to(DT)
    (cap,) = _capture(model, ["0"]).values()
    old_out = model(torch.randn(4, 3, dtype=DT))
    cap.clear()
    x = torch.randn(4, 3, dtype=DT)
    new_out = model(x)
    (5 * old_out).sum().backward()  # late backward of the cleared pass
    assert cap.num_rows == 0 and cap.has_unmatched_inputs()
    new_out.sum().backward()
    a, g = cap.take(1.0)
    torch.testing.assert_close(a[:, :3], x, rtol=0, atol=0)
    torch.testing.assert_close(g, torch.ones(4, 2, dtype=DT), rtol=0, atol=0)


def test_seen_while_disabled_records_no_tensor():
    model = nn.Sequential(nn.Linear(3, 2)).to(DT)
    cap = LayerCapture("0", model[0])
    with torch.no_grad():
        model(torch.randn(2, 3, dtype=DT))
    with capture.no_capture():
        model(torch.randn(2, 3, dtype=DT)).sum().backward()
    assert not cap.seen_while_disabled
    model(torch.randn(2, 3, dtype=DT)).sum().backward()
    assert cap.seen_while_disabled
    assert cap.held_rows == 0 and not cap._inputs and not cap._output_grads
    cap.clear()
    assert cap.seen_while_disabled  # a fact about the module, not about the rows held


# --------------------------------------------------------------------------- activation checkpointing


class CheckpointedMLP(nn.Module):
    """Linear -> tanh -> Linear -> tanh (optionally checkpointed as one block) -> Linear."""

    def __init__(self, use_reentrant=None):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.use_reentrant = use_reentrant

    def block(self, x):
        return torch.tanh(self.b(torch.tanh(self.a(x))))

    def forward(self, x):
        if self.use_reentrant is None:
            return self.c(self.block(x))
        return self.c(torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=self.use_reentrant))


def _checkpoint_rows(use_reentrant, keep_outputs=False, micro_batches=2):
    """Rows captured over micro-batches of a CheckpointedMLP (same weights and data for every mode).

    keep_outputs=True mimics the sampled Fisher: after each forward, the kept outputs get their
    gradients from one autograd.grad of a second loss, then the training backward runs."""
    torch.manual_seed(15)
    model = CheckpointedMLP(use_reentrant).to(DT)
    caps = {n: LayerCapture(n, getattr(model, n), keep_outputs=keep_outputs) for n in "abc"}
    for cap in caps.values():
        cap.enabled = True
    for _ in range(micro_batches):
        x = torch.randn(5, 3, dtype=DT, requires_grad=True)  # reentrant checkpoint needs a grad input
        out = model(x)
        if keep_outputs:
            pending = [(cap, slot, o) for cap in caps.values() for slot, o in cap.awaiting_output_grads()]
            grads = torch.autograd.grad(out.sin().sum(), [o for *_, o in pending], retain_graph=True, allow_unused=True)
            for (cap, slot, _), grad in zip(pending, grads):
                cap.set_output_grad(slot, grad)
        out.pow(2).sum().backward()
    state = {n: (cap.num_rows, cap.held_rows, cap.has_unmatched_inputs(), len(cap.awaiting_output_grads()))
             for n, cap in caps.items()}
    rows = {n: cap.take(1.0) for n, cap in caps.items() if cap.has_data()}
    return state, rows, caps


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpointing_captures_the_same_rows_once(use_reentrant):
    """Non-reentrant checkpointing recomputes the forward inside the backward (its hooks fire
    again); reentrant runs the original pass without gradients and recomputes with them. Either
    way: the same rows, held once, as without checkpointing."""
    ref_state, ref_rows, _ = _checkpoint_rows(None)
    state, rows, _ = _checkpoint_rows(use_reentrant)
    assert ref_state == {n: (10, 10, False, 0) for n in "abc"}
    assert state == ref_state
    for name, (a, g) in ref_rows.items():
        torch.testing.assert_close(rows[name][0], a, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(rows[name][1], g, rtol=1e-14, atol=1e-14)


def test_checkpointing_fallback_without_recompute_detection(monkeypatch):
    """Should torch's checkpoint internals change (no recomputation detected), the passes made
    inside the backward that never get an output gradient are dropped when that backward ends."""
    monkeypatch.setattr(capture, "in_nonreentrant_recompute", lambda: False)
    ref_state, ref_rows, _ = _checkpoint_rows(None)
    for use_reentrant in (False, True):
        state, rows, _ = _checkpoint_rows(use_reentrant)
        assert state == ref_state
        for name, (a, g) in ref_rows.items():
            torch.testing.assert_close(rows[name][0], a, rtol=1e-14, atol=1e-14)
            torch.testing.assert_close(rows[name][1], g, rtol=1e-14, atol=1e-14)


def test_nonreentrant_recompute_is_detected():
    seen = []

    def block(x):
        seen.append(capture.in_nonreentrant_recompute())
        return torch.tanh(x)

    x = torch.randn(3, requires_grad=True)
    torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False).sum().backward()
    torch.utils.checkpoint.checkpoint(block, x, use_reentrant=True).sum().backward()
    assert seen == [False, True, False, False]
    assert not capture.in_nonreentrant_recompute()


def test_checkpointing_with_kept_outputs_nonreentrant_holds_no_extra_rows():
    """Sampled-Fisher capture (keep_outputs): the recomputations in both the sampled-label
    autograd.grad and the training backward are not kept (they would stay awaiting forever, and
    a later sample_fisher would give them zero rows)."""
    ref_state, ref_rows, _ = _checkpoint_rows(None, keep_outputs=True)
    state, rows, _ = _checkpoint_rows(False, keep_outputs=True)
    assert ref_state == {n: (10, 10, False, 0) for n in "abc"}
    assert state == ref_state
    for name, (a, g) in ref_rows.items():
        torch.testing.assert_close(rows[name][0], a, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(rows[name][1], g, rtol=1e-14, atol=1e-14)


def test_checkpointing_with_kept_outputs_reentrant_is_flagged():
    """Reentrant checkpointing + keep_outputs: the checkpointed layers' only gradient-enabled pass
    runs inside the training backward, where no sampled-label gradient can reach it. The layers get
    no rows and say so (``recompute_not_captured``) instead of keeping outputs that never get one."""
    state, rows, caps = _checkpoint_rows(True, keep_outputs=True)
    assert state["a"] == state["b"] == (0, 0, False, 0)
    assert caps["a"].recompute_not_captured and caps["b"].recompute_not_captured
    assert state["c"] == (10, 10, False, 0) and not caps["c"].recompute_not_captured
