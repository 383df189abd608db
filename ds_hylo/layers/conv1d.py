"""transformers' ``Conv1D`` (GPT-2 family): a Linear with the weight stored transposed.

Its weight is (nx, nf) = (d_in, d_out) and its forward is ``addmm(bias, x.view(-1, nx), weight)``,
so the gradient matrix (d_out, d_in) is the transposed weight gradient. transformers is never
imported here: the class is recognised by name and module path, so a process that has not loaded
transformers pays nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import TokenAdapter, full_shape

_CONV1D_CLASS = ("transformers.pytorch_utils", "Conv1D")


def _conv1d_class(module: nn.Module) -> type | None:
    """transformers' Conv1D class if ``module`` is one (or a subclass of one), else None."""
    for cls in type(module).__mro__:
        if (cls.__module__, cls.__name__) == _CONV1D_CLASS:
            return cls
    return None


class HFConv1DAdapter(TokenAdapter):
    """Rows of a transformers Conv1D: those of the equivalent Linear (positions = tokens)."""

    kind = "conv1d"

    def __init__(self, module: nn.Module) -> None:
        d_in, d_out = full_shape(module.weight)
        super().__init__(module, d_in, d_out)

    @staticmethod
    def accepts(module: nn.Module) -> bool:
        """A transformers Conv1D whose forward is Conv1D's own, with a 2-D (nx, nf) weight."""
        cls = _conv1d_class(module)
        if cls is None or type(module).forward is not cls.forward:
            return False
        weight = getattr(module, "weight", None)
        return isinstance(weight, torch.Tensor) and len(full_shape(weight)) == 2


    def weight_matrix(self, weight_grad: torch.Tensor) -> torch.Tensor:
        return weight_grad.T  # (d_in, d_out) -> (d_out, d_in)

    def write_weight_matrix(self, weight_grad: torch.Tensor, mat: torch.Tensor) -> None:
        weight_grad.copy_(mat.T)
