"""Module hooks that capture per-sample layer inputs A and output gradients G.

Supported layers: ``nn.Linear`` on (batch, features) or (batch, ..., features) inputs, and
``nn.Conv2d`` with groups=1 and zero padding. Every other module with parameters keeps its plain
gradient (first-order fallback).

Row conventions (each captured row is one "sample" of the kernel):
- Linear 2D: one row per sample.
- Linear on sequences: "expand", one row per position; or "reduce", one row per sample with the
  inputs averaged and the output gradients summed over positions.
- Conv2d: "reduce" on the unfolded patches (mean of patches, sum of output gradients over
  positions), a rank-1 surrogate with the true per-sample gradient's scale.

The gradient matrix of a layer is (d_out, d_in) with the bias, if any, as the last input column.
Captured output gradients are stored raw (as the hooks see dloss/dz); the preconditioner rescales
them to per-sample gradients (see ``LayerCapture.take``).
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from .config import SEQUENCE_CONVENTIONS

GradAccessor = Callable[[torch.Tensor], Optional[torch.Tensor]]


_SUSPENDED = [0]


@contextlib.contextmanager
def no_capture() -> Iterator[None]:
    """TEMPORARY (replaced by the capture rework): passes inside capture nothing."""
    _SUSPENDED[0] += 1
    try:
        yield
    finally:
        _SUSPENDED[0] -= 1


def is_supported(module: nn.Module) -> bool:
    """Whether HyLo has a kernel for this module type (exact type checks: subclasses may differ)."""
    if type(module) is nn.Linear:
        return True
    if type(module) is nn.Conv2d:
        return module.groups == 1 and module.padding_mode == "zeros"
    return False


class LayerCapture:
    """Hooks and captured rows of one supported layer.

    Attributes:
        name: module name in the model.
        module: the nn.Linear or nn.Conv2d.
        d_in: input width including the bias column; d_out: output width.
    """

    def __init__(
        self, name: str, module: nn.Module, sequence_convention: str = "expand", keep_outputs: bool = False
    ) -> None:
        if not is_supported(module):
            raise TypeError(f"layer {name!r} of type {type(module).__name__} has no HyLo kernel")
        if sequence_convention not in SEQUENCE_CONVENTIONS:
            raise ValueError(f"sequence_convention={sequence_convention!r}; choose one of {SEQUENCE_CONVENTIONS}")
        self.name = name
        self.module = module
        self.sequence_convention = sequence_convention
        # Sampled Fisher: keep the outputs (with their graph) instead of hooking the training
        # backward; the output gradients then come from ``set_output_grad``.
        self.keep_outputs = keep_outputs
        self.has_bias = module.bias is not None
        weight = module.weight
        self.d_out = weight.shape[0]
        self.d_in = weight[0].numel() + int(self.has_bias)
        self.enabled = False
        self.seen_while_disabled = False
        self.capture_seconds = 0.0
        self._inputs: list[torch.Tensor] = []
        self._output_grads: list[Optional[torch.Tensor]] = []
        self._outputs: dict[int, torch.Tensor] = {}
        self._handle = module.register_forward_hook(self._forward_hook)

    # ------------------------------------------------------------------ hooks
    def remove(self) -> None:
        self._handle.remove()

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if _SUSPENDED[0] or not torch.is_grad_enabled() or not output.requires_grad:
            return
        if not self.enabled:
            self.seen_while_disabled = True
            return
        start = time.perf_counter()
        slot = len(self._inputs)
        self._inputs.append(self._input_rows(inputs[0].detach()))
        self._output_grads.append(None)
        if self.keep_outputs:
            self._outputs[slot] = output
        else:
            output.register_hook(self._make_grad_hook(slot))
        self.capture_seconds += time.perf_counter() - start

    def _make_grad_hook(self, slot: int) -> Callable[[torch.Tensor], None]:
        def hook(grad_output: torch.Tensor) -> None:
            start = time.perf_counter()
            if slot < len(self._output_grads):
                self._output_grads[slot] = self._output_grad_rows(grad_output.detach())
            self.capture_seconds += time.perf_counter() - start

        return hook

    # ------------------------------------------------------------ row building
    def _storage_dtype(self, tensor: torch.Tensor) -> torch.dtype:
        return torch.float64 if tensor.dtype == torch.float64 else torch.float32

    def _input_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Input rows: (rows, d_in) including a ones column for the bias."""
        dtype = self._storage_dtype(x)
        if isinstance(self.module, nn.Conv2d):
            rows = self._conv_patch_means(x.to(dtype))
        elif x.dim() <= 2:
            rows = x.reshape(-1, x.shape[-1]).to(dtype)
        else:
            seq = x.to(dtype).reshape(x.shape[0], -1, x.shape[-1])  # (B, T, d)
            rows = seq.reshape(-1, seq.shape[-1]) if self.sequence_convention == "expand" else seq.mean(dim=1)
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows

    def _conv_patch_means(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over output positions of the unfolded input patches: (B, C, H, W) -> (B, C*kh*kw).

        Entry (c, i, j) of sample b is the mean of x_pad[b, c, i*dh + p*sh, j*dw + q*sw] over the
        out_h x out_w output positions (p, q). The average factorises over the two axes:
        mean = T_h x[b, c] T_w^T, with T_h (kh, H) holding 1/out_h where input row r is read by
        kernel row i at some output row (``_tap_matrix``), and T_w (kw, W) likewise. Zero padding
        only adds zero terms, so x is never padded: padding shifts the taps and the padded rows and
        columns are simply left out of T_h and T_w. Small layers run one GEMM
        (B*C, H*W) @ kron(T_h, T_w)^T (kh*kw multiply-adds per input element, one cache-resident
        operand); larger ones contract W and then H (kw + kh*kw/W per element). No unfold tensor
        (B, C*kh*kw, positions) is materialised; values are unfold's, in its (channel, kh, kw) order.
        """
        conv = self.module
        (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
        if isinstance(conv.padding, str):
            pads = [0, 0, 0, 0]
            if conv.padding == "same":
                total_h, total_w = dh * (kh - 1), dw * (kw - 1)
                pads = [total_w // 2, total_w - total_w // 2, total_h // 2, total_h - total_h // 2]
        else:
            ph, pw = conv.padding
            pads = [pw, pw, ph, ph]
        left, right, top, bottom = pads
        batch, channels, height, width = x.shape
        out_h = (height + top + bottom - dh * (kh - 1) - 1) // sh + 1
        out_w = (width + left + right - dw * (kw - 1) - 1) // sw + 1
        taps_h = _tap_matrix(height, kh, dh, sh, out_h, top, x)  # (kh, H)
        taps_w = _tap_matrix(width, kw, dw, sw, out_w, left, x)  # (kw, W)
        if kh * kw * height * width <= _KRON_MAX_ENTRIES:
            means = x.reshape(batch * channels, height * width) @ torch.kron(taps_h, taps_w).T
            return means.reshape(batch, -1)
        cols = (x.reshape(-1, width) @ taps_w.T).reshape(batch * channels, height, kw)
        means = cols.transpose(1, 2).reshape(-1, height) @ taps_h.T  # (B*C*kw, kh)
        return means.reshape(batch, channels, kw, kh).transpose(2, 3).reshape(batch, -1)

    def _output_grad_rows(self, grad_output: torch.Tensor) -> torch.Tensor:
        """Raw output-gradient rows matching ``_input_rows``: (rows, d_out)."""
        dtype = self._storage_dtype(grad_output)
        g = grad_output.to(dtype)
        if isinstance(self.module, nn.Conv2d):
            return g.sum(dim=(2, 3))
        if g.dim() <= 2:
            return g.reshape(-1, g.shape[-1])
        seq = g.reshape(g.shape[0], -1, g.shape[-1])
        return seq.reshape(-1, seq.shape[-1]) if self.sequence_convention == "expand" else seq.sum(dim=1)

    def awaiting_output_grads(self) -> list[tuple[int, torch.Tensor]]:
        """(slot, output) of kept forward outputs that have no output gradient yet (sampled Fisher)."""
        return sorted(self._outputs.items())

    def set_output_grad(self, slot: int, grad_output: Optional[torch.Tensor]) -> None:
        """Record dloss/dz for a kept output (zeros when the loss does not depend on it) and drop the output."""
        output = self._outputs.pop(slot)
        if grad_output is None:
            grad_output = torch.zeros_like(output)
        start = time.perf_counter()
        self._output_grads[slot] = self._output_grad_rows(grad_output.detach())
        self.capture_seconds += time.perf_counter() - start

    # -------------------------------------------------------------- consumers
    @property
    def num_rows(self) -> int:
        return sum(a.shape[0] for a, g in zip(self._inputs, self._output_grads) if g is not None)

    def has_data(self) -> bool:
        return self.num_rows > 0

    def take(self, per_sample_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Return and clear the captured rows: A (n, d_in) and G (n, d_out) = raw * per_sample_scale.

        Forward passes whose backward never reached this layer are dropped.
        """
        pairs = [(a, g) for a, g in zip(self._inputs, self._output_grads) if g is not None]
        self.clear()
        if not pairs:
            raise RuntimeError(f"layer {self.name!r} has no captured rows")
        a = torch.cat([a for a, _ in pairs])
        g = torch.cat([g for _, g in pairs]) * per_sample_scale
        return a, g

    def has_unmatched_inputs(self) -> bool:
        """Whether some captured forward pass has no output gradient (its backward never came)."""
        return any(g is None for g in self._output_grads)

    def clear(self) -> None:
        self._inputs.clear()
        self._output_grads.clear()
        self._outputs.clear()

    # ------------------------------------------------------------- gradients
    def parameters(self) -> list[nn.Parameter]:
        return [self.module.weight] + ([self.module.bias] if self.has_bias else [])

    def gradient_matrix(self, grad_of: Optional[GradAccessor] = None) -> Optional[torch.Tensor]:
        """The layer's gradient as (d_out, d_in) (bias last column), or None if it has no grad.

        ``grad_of(param)`` says where a parameter's gradient lives (default: ``param.grad``).
        """
        grad_of = grad_of or _param_grad
        weight_grad = grad_of(self.module.weight)
        if weight_grad is None:
            return None
        mat = weight_grad.reshape(self.d_out, -1)
        if self.has_bias:
            bias_grad = grad_of(self.module.bias)
            if bias_grad is None:
                bias_grad = torch.zeros(self.d_out, dtype=mat.dtype, device=mat.device)
            mat = torch.cat([mat, bias_grad.reshape(-1, 1).to(mat.dtype)], dim=1)
        return mat

    def set_gradient_matrix(self, mat: torch.Tensor, grad_of: Optional[GradAccessor] = None) -> None:
        """Write a (d_out, d_in) matrix back into the weight's (and bias's) gradient, in their dtype."""
        grad_of = grad_of or _param_grad
        weight = self.module.weight
        n_weight = mat.shape[1] - int(self.has_bias)
        grad_of(weight).copy_(mat[:, :n_weight].reshape(weight.shape))
        if self.has_bias:
            bias_grad = grad_of(self.module.bias)
            if bias_grad is not None:
                bias_grad.copy_(mat[:, n_weight].reshape(bias_grad.shape))


# Largest kh*kw*H*W for which ``_conv_patch_means`` uses its single-GEMM (Kronecker) form: that
# operator (<= 32 KiB in float32) stays in cache; beyond it the two one-axis GEMMs are faster
# (measured on CPU, 1 thread: the crossover lies between 6400 and 12500 over 3x3 to 7x7 kernels).
_KRON_MAX_ENTRIES = 8192


def _tap_matrix(
    size: int, kernel: int, dilation: int, stride: int, out: int, lead: int, like: torch.Tensor
) -> torch.Tensor:
    """Averaging matrix of one conv axis: (kernel, size), 1/out where kernel tap i reads input index r.

    Tap i reads padded index i*dilation + p*stride at output position p (0 <= p < out), i.e.
    unpadded index r = i*dilation + p*stride - lead (``lead`` = padding before the input). Padded
    indices have no column: their values are zero. Made in ``like``'s dtype and device.
    """
    index = torch.arange(size, device=like.device)
    tap = torch.arange(kernel, device=like.device)[:, None]
    offset = index + lead - dilation * tap  # = p*stride where tap reads index
    hit = (offset >= 0) & (offset % stride == 0) & (offset < stride * out)
    return hit.to(like.dtype) / out


def _param_grad(param: torch.Tensor) -> Optional[torch.Tensor]:
    return param.grad
