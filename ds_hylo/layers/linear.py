"""nn.Linear and its subclasses that keep Linear's forward (e.g. NonDynamicallyQuantizableLinear).

z = x W^T + b on (..., d_in) inputs: weight (d_out, d_in) is already the gradient matrix's layout.
"""

from __future__ import annotations

from torch import nn

from .base import TokenAdapter


class LinearAdapter(TokenAdapter):
    """Rows of a Linear: one position per leading index but the first (tokens of a sequence)."""

    kind = "linear"

    def __init__(self, module: nn.Linear) -> None:
        super().__init__(module, module.in_features, module.out_features)

    @staticmethod
    def accepts(module: nn.Module) -> bool:
        """A Linear whose forward is nn.Linear's own (a subclass that overrides forward may compute
        anything: its rows would be silently wrong)."""
        return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward

