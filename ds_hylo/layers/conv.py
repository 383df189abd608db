"""nn.Conv2d with groups=1 and zero padding: the "reduce" rank-1 surrogate (docs/design.md section 1.5).

Each sample is one row whatever the sequence convention: the mean over output positions of the
unfolded input patches (channel, kh, kw order, as ``weight.reshape(d_out, -1)``) and the sum over
output positions of the output gradients, so the surrogate per-sample gradient has the true one's
scale.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .base import LayerAdapter, full_shape

# Largest kh*kw*H*W for which ``patch_means`` uses its single-GEMM (Kronecker) form: that
# operator (<= 32 KiB in float32) stays in cache; beyond it the two one-axis GEMMs are faster
# (measured on CPU, 1 thread: the crossover lies between 6400 and 12500 over 3x3 to 7x7 kernels).
_KRON_MAX_ENTRIES = 8192


class Conv2dAdapter(LayerAdapter):
    """Rows of a Conv2d: (B, 1, C*kh*kw) patch means and (B, 1, d_out) summed output gradients."""

    kind = "conv2d"

    def __init__(self, module: nn.Conv2d) -> None:
        shape = full_shape(module.weight)
        super().__init__(module, math.prod(shape[1:]), shape[0])

    @staticmethod
    def accepts(module: nn.Module) -> bool:
        """A Conv2d with Conv2d's own forward, groups=1 and zero padding (the rows assume all three)."""
        return (
            isinstance(module, nn.Conv2d)
            and type(module).forward is nn.Conv2d.forward
            and type(module)._conv_forward is nn.Conv2d._conv_forward
            and module.groups == 1
            and module.padding_mode == "zeros"
        )

    def input_positions(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = x.unsqueeze(0) if x.dim() == 3 else x  # unbatched (C, H, W)
        return self.patch_means(x.to(dtype)).unsqueeze(1)

    def output_grad_positions(self, grad_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        g = grad_out.unsqueeze(0) if grad_out.dim() == 3 else grad_out
        return g.to(dtype).sum(dim=(2, 3)).unsqueeze(1)

    def shape_of_positions(self, x: torch.Tensor) -> tuple[int, int]:
        return (1 if x.dim() == 3 else x.shape[0]), 1

    def patch_means(self, x: torch.Tensor, kron_max_entries: Optional[int] = None) -> torch.Tensor:
        """Mean over output positions of the unfolded input patches: (B, C, H, W) -> (B, C*kh*kw).

        Entry (c, i, j) of sample b is the mean of x_pad[b, c, i*dh + p*sh, j*dw + q*sw] over the
        out_h x out_w output positions (p, q). The average factorises over the two axes:
        mean = T_h x[b, c] T_w^T, with T_h (kh, H) holding 1/out_h where input row r is read by
        kernel row i at some output row (``tap_matrix``), and T_w (kw, W) likewise. Zero padding
        only adds zero terms, so x is never padded: padding shifts the taps and the padded rows and
        columns are simply left out of T_h and T_w. Small layers run one GEMM
        (B*C, H*W) @ kron(T_h, T_w)^T (kh*kw multiply-adds per input element, one cache-resident
        operand); larger ones contract W and then H (kw + kh*kw/W per element). No unfold tensor
        (B, C*kh*kw, positions) is materialised; values are unfold's, in its (channel, kh, kw) order.
        ``kron_max_entries`` (default ``_KRON_MAX_ENTRIES``) is the largest kh*kw*H*W of the GEMM form.
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
        taps_h = tap_matrix(height, kh, dh, sh, out_h, top, x)  # (kh, H)
        taps_w = tap_matrix(width, kw, dw, sw, out_w, left, x)  # (kw, W)
        limit = _KRON_MAX_ENTRIES if kron_max_entries is None else kron_max_entries
        if kh * kw * height * width <= limit:
            means = x.reshape(batch * channels, height * width) @ torch.kron(taps_h, taps_w).T
            return means.reshape(batch, channels * kh * kw)  # explicit sizes: batch may be empty
        cols = (x.reshape(batch * channels * height, width) @ taps_w.T).reshape(batch * channels, height, kw)
        means = cols.transpose(1, 2).reshape(batch * channels * kw, height) @ taps_h.T  # (B*C*kw, kh)
        return means.reshape(batch, channels, kw, kh).transpose(2, 3).reshape(batch, channels * kh * kw)


def tap_matrix(
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
