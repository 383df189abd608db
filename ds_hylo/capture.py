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

What a forward pass leaves (captured, refused by ``max_rows``, skipped under :func:`no_capture` or
as an activation-checkpointing recomputation) is described on ``LayerCapture``.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import warnings
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from .config import SEQUENCE_CONVENTIONS

GradAccessor = Callable[[torch.Tensor], Optional[torch.Tensor]]


def is_supported(module: nn.Module) -> bool:
    """Whether HyLo has a kernel for this module type (exact type checks: subclasses may differ)."""
    if type(module) is nn.Linear:
        return True
    if type(module) is nn.Conv2d:
        return module.groups == 1 and module.padding_mode == "zeros"
    return False


# ----------------------------------------------------------------- capture switches

_suspend_lock = threading.Lock()
_suspend_depth = 0


@contextlib.contextmanager
def no_capture() -> Iterator[None]:
    """Capture nothing inside the block: for extra forward/backward passes (e.g. an extra
    ``torch.autograd.grad`` pass) that must not add curvature rows.

    No LayerCapture records a forward pass (and none registers an output-gradient hook) while any
    ``no_capture`` block is open, in any thread (so also in DataParallel replicas and on autograd
    device threads); output-gradient hooks that fire meanwhile, for passes captured before, record
    nothing either. Blocks nest.
    """
    global _suspend_depth
    with _suspend_lock:
        _suspend_depth += 1
    try:
        yield
    finally:
        with _suspend_lock:
            _suspend_depth -= 1


def capture_suspended() -> bool:
    """Whether a ``no_capture`` block is open."""
    return _suspend_depth > 0


@torch.compiler.disable  # reads autograd state: run eagerly, no tracing warning under torch.compile
def in_nonreentrant_recompute() -> bool:
    """Whether the current forward is a recomputation by non-reentrant activation checkpointing.

    ``torch.utils.checkpoint(use_reentrant=False)`` recomputes inside its own saved-tensors hooks
    (``torch.utils.checkpoint._recomputation_hook``), the innermost ones while it runs. torch has
    no public flag for this; if its internals change this returns False and the fallback in
    ``LayerCapture`` (drop forward passes made inside a backward that get no output gradient)
    keeps the rows right, though held until that backward ends.
    """
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return False
    try:
        hooks = top(False)
    except (RuntimeError, TypeError):
        return False
    if not hooks:
        return False
    pack = hooks[0]
    return getattr(pack, "__module__", None) == "torch.utils.checkpoint" and getattr(
        pack, "__qualname__", ""
    ).startswith("_recomputation_hook.")


@torch.compiler.disable
def _in_backward() -> bool:
    """Whether an autograd backward (graph task) is running in this thread."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def _queue_end_of_backward(callback: Callable[[], None]) -> None:
    """Run ``callback`` when the running backward (graph task) ends."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


class LayerCapture:
    """Hooks and captured rows of one supported layer.

    Each forward pass captured is one *slot*: its input rows, and its output-gradient rows once
    the backward reaches the layer (several backward passes through the same output add up, as
    parameter gradients do). What is not captured:

    - passes inside :func:`no_capture`, with gradients disabled, or whose output needs no gradient;
    - passes while ``enabled`` is False (only ``seen_while_disabled`` is set);
    - passes that would take the rows held past ``max_rows`` (``overflowed`` is set; the first
      passes are kept);
    - the recomputation of a forward pass by non-reentrant activation checkpointing
      (``torch.utils.checkpoint(..., use_reentrant=False)``): the original pass was captured.
      Reentrant checkpointing runs the original pass without gradients and the recomputation
      inside the backward: that recomputation is the one captured (once). With
      ``keep_outputs=True`` it cannot be (the sampled-label backward cannot reach outputs made
      inside the training backward): ``recompute_not_captured`` is set instead.

    ``clear()`` starts a new generation: output-gradient hooks of earlier passes (a late backward)
    never write into the slots of later ones.

    Attributes:
        name: module name in the model.
        module: the nn.Linear or nn.Conv2d.
        d_in: input width including the bias column; d_out: output width.
        max_rows: bound on the rows held (captured inputs, with or without output gradient), or None.
        enabled: whether forward passes are captured.
        overflowed: a pass was refused since the last ``clear()`` because of ``max_rows``.
        refused_passes: number of passes refused because of ``max_rows`` (never reset).
        seen_while_disabled: the module ran a forward pass with gradients, outside ``no_capture``,
            while ``enabled`` was False (never reset; no tensor is kept).
        recompute_not_captured: a reentrant-checkpointing recomputation was not captured because
            ``keep_outputs`` is True (never reset).
    """

    def __init__(
        self,
        name: str,
        module: nn.Module,
        sequence_convention: str = "expand",
        keep_outputs: bool = False,
        *,
        max_rows: Optional[int] = None,
    ) -> None:
        if not is_supported(module):
            raise TypeError(f"layer {name!r} of type {type(module).__name__} has no HyLo kernel")
        if sequence_convention not in SEQUENCE_CONVENTIONS:
            raise ValueError(f"sequence_convention={sequence_convention!r}; choose one of {SEQUENCE_CONVENTIONS}")
        if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
            raise ValueError(f"max_rows={max_rows!r} for layer {name!r}; allowed: None or an int >= 1")
        self.name = name
        self.module = module
        self.sequence_convention = sequence_convention
        # Sampled Fisher: keep the outputs (with their graph) instead of hooking the training
        # backward; the output gradients then come from ``set_output_grad``.
        self.keep_outputs = keep_outputs
        self.max_rows = max_rows
        self.has_bias = module.bias is not None
        weight = module.weight
        self.d_out = weight.shape[0]
        self.d_in = weight[0].numel() + int(self.has_bias)
        self.enabled = False
        self.capture_seconds = 0.0
        self.overflowed = False
        self.refused_passes = 0
        self.seen_while_disabled = False
        self.recompute_not_captured = False
        # Slot i holds _inputs[i] (None once dropped) and _output_grads[i] (None until its backward).
        self._inputs: list[Optional[torch.Tensor]] = []
        self._output_grads: list[Optional[torch.Tensor]] = []
        self._outputs: dict[int, torch.Tensor] = {}
        self._held_rows = 0
        self._generation = 0  # bumped by clear(): hooks of older passes are ignored
        self._handle = module.register_forward_hook(self._forward_hook)

    # ------------------------------------------------------------------ hooks
    def remove(self) -> None:
        self._handle.remove()

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if capture_suspended() or not torch.is_grad_enabled() or not output.requires_grad:
            return
        if not self.enabled:
            self.seen_while_disabled = True
            return
        if in_nonreentrant_recompute():
            return  # the original pass was captured (or refused) already
        in_backward = _in_backward()
        if in_backward and self.keep_outputs:
            self.recompute_not_captured = True
            return
        x = inputs[0]
        rows = self._row_count(x)
        if self.max_rows is not None and (self.overflowed or self._held_rows + rows > self.max_rows):
            if self.refused_passes == 0:
                warnings.warn(
                    f"HyLo: layer {self.name!r} holds {self._held_rows} captured rows and a pass of {rows} "
                    f"more would pass its bound max_rows={self.max_rows}; further passes are not captured "
                    "until the next step (is the optimizer's step() called? under DeepSpeed, is the engine "
                    "built by ds_hylo?). Warned once per layer.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self.overflowed = True
            self.refused_passes += 1
            return
        start = time.perf_counter()
        slot = len(self._inputs)
        self._inputs.append(self._input_rows(x.detach()))
        self._output_grads.append(None)
        self._held_rows += rows
        if self.keep_outputs:
            self._outputs[slot] = output
        else:
            output.register_hook(self._make_grad_hook(self._generation, slot))
            if in_backward:
                # A forward inside a backward that is not a recognised non-reentrant
                # recomputation: reentrant checkpointing (its nested backward delivers the output
                # gradient before this backward ends) or a recomputation not recognised (no
                # gradient ever comes): drop the slot at the end of this backward if unmatched.
                _queue_end_of_backward(self._make_drop_unmatched(self._generation, slot))
        self.capture_seconds += time.perf_counter() - start

    def _make_grad_hook(self, generation: int, slot: int) -> Callable[[torch.Tensor], None]:
        def hook(grad_output: torch.Tensor) -> None:
            if generation != self._generation or capture_suspended() or self._inputs[slot] is None:
                return
            start = time.perf_counter()
            rows = self._output_grad_rows(grad_output.detach())
            previous = self._output_grads[slot]
            self._output_grads[slot] = rows if previous is None else previous + rows
            self.capture_seconds += time.perf_counter() - start

        return hook

    def _make_drop_unmatched(self, generation: int, slot: int) -> Callable[[], None]:
        def drop() -> None:
            if generation == self._generation and self._output_grads[slot] is None:
                self._drop_slot(slot)

        return drop

    def _drop_slot(self, slot: int) -> None:
        rows = self._inputs[slot]
        if rows is not None:
            self._held_rows -= rows.shape[0]
            self._inputs[slot] = None

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

    def _row_count(self, x: torch.Tensor) -> int:
        """Rows ``_input_rows(x)`` will have, from the shape alone (no tensor work)."""
        if isinstance(self.module, nn.Conv2d) or (x.dim() > 2 and self.sequence_convention == "reduce"):
            return x.shape[0]
        return math.prod(x.shape[:-1])

    def awaiting_output_grads(self) -> list[tuple[int, torch.Tensor]]:
        """(slot, output) of kept forward outputs that have no output gradient yet (sampled Fisher)."""
        return sorted(self._outputs.items())

    def set_output_grad(self, slot: int, grad_output: Optional[torch.Tensor]) -> None:
        """Record dloss/dz for a kept output (zeros when the loss does not depend on it) and drop the output."""
        if slot not in self._outputs:
            raise KeyError(f"layer {self.name!r}: slot {slot} has no kept output awaiting its gradient")
        output = self._outputs.pop(slot)
        if grad_output is None:
            grad_output = torch.zeros_like(output)
        start = time.perf_counter()
        self._output_grads[slot] = self._output_grad_rows(grad_output.detach())
        self.capture_seconds += time.perf_counter() - start

    # -------------------------------------------------------------- consumers
    def _matched(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(a, g) for a, g in zip(self._inputs, self._output_grads) if a is not None and g is not None]

    @property
    def num_rows(self) -> int:
        """Rows with both input and output gradient (what ``take`` returns)."""
        return sum(a.shape[0] for a, _ in self._matched())

    @property
    def held_rows(self) -> int:
        """Rows of captured inputs held, with or without their output gradient (<= ``max_rows``)."""
        return self._held_rows

    def has_data(self) -> bool:
        return self.num_rows > 0

    def take(self, per_sample_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Return and clear the captured rows: A (n, d_in) and G (n, d_out) = raw * per_sample_scale.

        Forward passes whose backward never reached this layer are dropped.
        """
        pairs = self._matched()
        self.clear()
        if not pairs:
            raise RuntimeError(f"layer {self.name!r} has no captured rows")
        a = torch.cat([a for a, _ in pairs])
        g = torch.cat([g for _, g in pairs]) * per_sample_scale
        return a, g

    def has_unmatched_inputs(self) -> bool:
        """Whether some captured forward pass has no output gradient (its backward never came)."""
        return any(a is not None and g is None for a, g in zip(self._inputs, self._output_grads))

    def clear(self) -> None:
        """Drop every captured row and start a new generation (hooks of earlier passes are ignored).

        Resets ``overflowed``; ``refused_passes``, ``seen_while_disabled`` and
        ``recompute_not_captured`` are kept.
        """
        self._inputs.clear()
        self._output_grads.clear()
        self._outputs.clear()
        self._held_rows = 0
        self._generation += 1
        self.overflowed = False

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
