"""nn.Linear and its subclasses that keep Linear's forward (e.g. NonDynamicallyQuantizableLinear).

z = x W^T + b on (..., d_in) inputs: weight (d_out, d_in) is already the gradient matrix's layout.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import LayerAdapter, token_positions, token_shape


class LinearAdapter(LayerAdapter):
    """Rows of a Linear: one position per leading index but the first (tokens of a sequence)."""

    kind = "linear"

    def __init__(self, module: nn.Linear) -> None:
        super().__init__(module, module.in_features, module.out_features)

    @staticmethod
    def accepts(module: nn.Module) -> bool:
        """A Linear whose forward is nn.Linear's own (a subclass that overrides forward may compute
        anything: its rows would be silently wrong)."""
        return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward

    def input_positions(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return token_positions(x, dtype)

    def output_grad_positions(self, grad_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return token_positions(grad_out, dtype)

    def shape_of_positions(self, x: torch.Tensor) -> tuple[int, int]:
        return token_shape(x)
