"""The interface every layer adapter implements.

An adapter tells the capture hooks how one kind of layer turns its forward input and its output
gradient into kernel rows, and how its parameters' gradients map to the (d_out, d_in) gradient
matrix of docs/design.md section 1.1 (bias, if any, as the last input column). It holds no rows and no
hooks: the hook lifecycle lives in ``ds_hylo.capture``.

Rows come in *positions*: ``input_positions(x)`` is (B, P, d_w) and ``output_grad_positions(grad)``
is (B, P, d_out), where B is the number of samples, P the positions of each sample that share the
weight (tokens of a sequence; P = 1 for a plain (B, features) input), and d_w = d_in without the
bias column. The capture turns positions into rows by the sequence convention: "expand" makes every
position a row, "reduce" makes one row per sample (mean of inputs, sum of output gradients).
Adapters whose kind already reduces (Conv2d: patch means, summed output gradients) return P = 1.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Optional

import torch
from torch import nn

GradAccessor = Callable[[torch.Tensor], Optional[torch.Tensor]]


def param_grad(param: torch.Tensor) -> Optional[torch.Tensor]:
    """Default gradient accessor: ``param.grad``."""
    return param.grad


def full_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's real shape: DeepSpeed ZeRO-3 leaves a (0,) placeholder outside forward and keeps
    the real shape in ``ds_shape`` (docs/design.md section 3.5)."""
    return torch.Size(getattr(param, "ds_shape", param.shape))


def storage_dtype(tensor: torch.Tensor) -> torch.dtype:
    """Rows are kept in float64 for float64 layers and in float32 otherwise (bf16/fp16 included)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


class LayerAdapter:
    """Per-kind row building and gradient view of one module.

    Attributes:
        kind: short name of the layer kind (``"linear"``, ``"conv2d"``, ``"conv1d"``, ``"embedding"``).
        module: the adapted module.
        has_bias: whether the layer has a bias (folded in as the last input column).
        d_in: input width including the bias column; d_out: output width.
    """

    kind: ClassVar[str] = ""
    # Input rows are token ids (int64 (n, 1), -1 for a zero row) instead of dense (n, d_in) rows:
    # ``nn.Embedding`` (docs/design.md section 1.10); ``ds_hylo.kernels`` dispatches on the rows' dtype.
    index_rows: ClassVar[bool] = False
    # The sequence convention this kind always uses whatever the config says (None: the config's).
    fixed_convention: ClassVar[Optional[str]] = None

    def __init__(self, module: nn.Module, d_weight_in: int, d_out: int) -> None:
        self.module = module
        self.has_bias = getattr(module, "bias", None) is not None
        self.d_out = int(d_out)
        self.d_in = int(d_weight_in) + int(self.has_bias)

    # ------------------------------------------------------------- parameters
    @property
    def weight(self) -> nn.Parameter:
        """The weight parameter (its device and dtype are the layer's)."""
        return self.module.weight

    def params(self) -> list[nn.Parameter]:
        """The parameters the gradient matrix covers: [weight] or [weight, bias]."""
        return [self.weight] + ([self.module.bias] if self.has_bias else [])

    @property
    def row_width(self) -> int:
        """Columns of one input row: d_in for dense rows, 1 for id rows."""
        return 1 if self.index_rows else self.d_in

    def row_dtype(self, float_dtype: torch.dtype) -> torch.dtype:
        """Dtype of the input rows of a layer whose float rows are ``float_dtype`` (int64 for ids)."""
        return torch.long if self.index_rows else float_dtype

    def a_row_bytes(self, float_bytes: int) -> int:
        """Bytes of one input row with ``float_bytes`` per float: 8 (one int64 id) for id rows."""
        return 8 if self.index_rows else float_bytes * self.d_in

    # -------------------------------------------------------------- positions
    def input_positions(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Forward input (as the module receives it) -> (B, P, d_in - has_bias) in ``dtype``."""
        raise NotImplementedError

    def output_grad_positions(self, grad_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """dloss/d(output) -> (B, P, d_out) in ``dtype``, position-aligned with ``input_positions``."""
        raise NotImplementedError

    def shape_of_positions(self, x: torch.Tensor) -> tuple[int, int]:
        """(B, P) of ``input_positions(x)`` from the shape alone (no tensor work)."""
        raise NotImplementedError

    def row_count(self, x: torch.Tensor, convention: str) -> int:
        """Rows ``input_rows(x, convention)`` will have, from the shape alone."""
        batch, positions = self.shape_of_positions(x)
        return batch * positions if convention == "expand" else batch

    # ------------------------------------------------------------------- rows
    def with_bias_column(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, d_in - has_bias) -> (n, d_in): a ones column appended when the layer has a bias."""
        if not self.has_bias:
            return rows
        return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)

    def input_rows(self, x: torch.Tensor, convention: str = "expand") -> torch.Tensor:
        """Input rows (rows, d_in), bias column included; "reduce" averages over all positions."""
        pos = self.input_positions(x, storage_dtype(x))
        rows = pos.reshape(-1, pos.shape[-1]) if convention == "expand" else pos.mean(dim=1)
        return self.with_bias_column(rows)

    def output_grad_rows(self, grad_out: torch.Tensor, convention: str = "expand") -> torch.Tensor:
        """Raw output-gradient rows (rows, d_out) matching ``input_rows``; "reduce" sums over positions."""
        pos = self.output_grad_positions(grad_out, storage_dtype(grad_out))
        return pos.reshape(-1, pos.shape[-1]) if convention == "expand" else pos.sum(dim=1)

    # -------------------------------------------------------------- gradients
    def weight_matrix(self, weight_grad: torch.Tensor) -> torch.Tensor:
        """The weight's gradient as (d_out, d_in - has_bias) (a view where possible)."""
        return weight_grad.reshape(self.d_out, -1)

    def write_weight_matrix(self, weight_grad: torch.Tensor, mat: torch.Tensor) -> None:
        """Copy a (d_out, d_in - has_bias) matrix into the weight's gradient tensor, in its dtype."""
        weight_grad.copy_(mat.reshape(weight_grad.shape))

    def gradient_matrix(self, grad_of: Optional[GradAccessor] = None) -> Optional[torch.Tensor]:
        """The layer's gradient as (d_out, d_in) (bias last column), or None if the weight has none.

        ``grad_of(param)`` says where a parameter's gradient lives (default: ``param.grad``).
        """
        grad_of = grad_of or param_grad
        weight_grad = grad_of(self.weight)
        if weight_grad is None:
            return None
        mat = self.weight_matrix(weight_grad)
        if self.has_bias:
            bias_grad = grad_of(self.module.bias)
            if bias_grad is None:
                bias_grad = torch.zeros(self.d_out, dtype=mat.dtype, device=mat.device)
            mat = torch.cat([mat, bias_grad.reshape(-1, 1).to(mat.dtype)], dim=1)
        return mat

    def set_gradient_matrix(self, mat: torch.Tensor, grad_of: Optional[GradAccessor] = None) -> None:
        """Write a (d_out, d_in) matrix back into the weight's (and bias's) gradient, in their dtype."""
        grad_of = grad_of or param_grad
        n_weight = mat.shape[1] - int(self.has_bias)
        self.write_weight_matrix(grad_of(self.weight), mat[:, :n_weight])
        if self.has_bias:
            bias_grad = grad_of(self.module.bias)
            if bias_grad is not None:
                bias_grad.copy_(mat[:, n_weight].reshape(bias_grad.shape))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(d_in={self.d_in}, d_out={self.d_out}, bias={self.has_bias})"


class TokenAdapter(LayerAdapter):
    """Adapters of layers applied to the last axis of (B, ..., d) inputs: every leading index but the
    first is a position (a token of a sequence); Linear and transformers' Conv1D."""

    def input_positions(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return token_positions(x, dtype)

    def output_grad_positions(self, grad_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return token_positions(grad_out, dtype)

    def shape_of_positions(self, x: torch.Tensor) -> tuple[int, int]:
        return token_shape(x)


def token_positions(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., d) features-last tensor -> (B, P, d): B the leading axis (1 for a 1-D input), P the rest."""
    if t.dim() <= 1:
        return t.to(dtype).reshape(1, 1, -1)
    batch, positions = token_shape(t)  # explicit sizes: an empty batch has no -1 to infer
    return t.to(dtype).reshape(batch, positions, t.shape[-1])


def token_shape(t: torch.Tensor) -> tuple[int, int]:
    """(B, P) of ``token_positions(t)`` from the shape alone."""
    if t.dim() <= 1:
        return 1, 1
    positions = 1
    for size in t.shape[1:-1]:
        positions *= size
    return t.shape[0], positions
