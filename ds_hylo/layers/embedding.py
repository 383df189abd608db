"""nn.Embedding as a Linear on one-hot inputs, with its input rows kept as token ids.

z = weight[t] = e_t^T weight: an Embedding(V, D) is a Linear(V -> D, no bias) whose weight is the
embedding's transposed, fed the one-hot row e_t of each token t. So d_in = V (num_embeddings),
d_out = D (embedding_dim), and the gradient matrix (d_out, d_in) is the transposed view of the
weight's (V, D) gradient. An input row is the token id, an int64 (n, 1) column (never a dense
(n, V) one-hot row); a ``padding_idx`` token has a zero one-hot row (torch never accumulates a
gradient into that weight row), marked by the id -1. ``ds_hylo.kernels`` computes the kernel,
the projection and the expansion from the ids (docs/design.md section 1.10).

Rows are always token-level ("expand", one row per position): the "reduce" convention's mean of
one-hot inputs over a sequence is a bag of tokens, not a token id, so an Embedding keeps one row
per token whatever ``sequence_convention`` says (``fixed_convention``).

Not adapted (first-order fallback, reason in ``ds_hylo.layers.fallback_reason``): ``max_norm``
(the forward renormalises weight rows in place), ``sparse=True`` (sparse gradients),
``scale_grad_by_freq=True`` (the weight gradient divides each token's sum by its count in the
batch, which the output gradients do not show), and subclasses that override ``forward``.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import nn

from .base import LayerAdapter, token_positions


class EmbeddingAdapter(LayerAdapter):
    """Rows of an nn.Embedding: token ids (int64, -1 for ``padding_idx``) and output-gradient rows."""

    kind = "embedding"
    index_rows: ClassVar[bool] = True
    fixed_convention: ClassVar[Optional[str]] = "expand"

    def __init__(self, module: nn.Embedding) -> None:
        super().__init__(module, module.num_embeddings, module.embedding_dim)
        self.padding_idx = module.padding_idx  # torch keeps it in [0, V) (a negative one is wrapped)

    @staticmethod
    def accepts(module: nn.Module) -> bool:
        """A dense nn.Embedding with nn.Embedding's own forward, no max_norm, no per-batch
        frequency scaling of its gradient (see ``ds_hylo.layers.fallback_reason`` for each)."""
        return embedding_problem(module) is None and isinstance(module, nn.Embedding)

    def input_positions(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Token ids (B, ...) -> (B, P, 1) int64 (``dtype`` is not used: ids are never floats);
        ``padding_idx`` -> -1 (a zero one-hot row)."""
        batch, positions = self.shape_of_positions(x)
        ids = x.reshape(batch, positions, 1).to(torch.long)
        if self.padding_idx is not None:
            ids = torch.where(ids == self.padding_idx, torch.full_like(ids, -1), ids)
        return ids

    def output_grad_positions(self, grad_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return token_positions(grad_out, dtype)

    def shape_of_positions(self, x: torch.Tensor) -> tuple[int, int]:
        """(B, P) of ids of shape (B, ...): the output (B, ..., D) has the positions of a Linear's."""
        if x.dim() == 0:
            return 1, 1
        positions = 1
        for size in x.shape[1:]:
            positions *= size
        return x.shape[0], positions

    def weight_matrix(self, weight_grad: torch.Tensor) -> torch.Tensor:
        """The (V, D) weight gradient (or a flat view of it) as the (D, V) gradient matrix: its
        transposed view."""
        return weight_grad.reshape(self.d_in, self.d_out).T

    def write_weight_matrix(self, weight_grad: torch.Tensor, mat: torch.Tensor) -> None:
        """Copy a (D, V) matrix into the (V, D) weight gradient (or a flat view of it), in its dtype."""
        weight_grad.copy_(mat.T.reshape(weight_grad.shape))


def embedding_problem(module: nn.Module) -> Optional[str]:
    """Why an nn.Embedding (or subclass) cannot be adapted, or None if it can (or is no Embedding)."""
    if not isinstance(module, nn.Embedding):
        return None
    if type(module).forward is not nn.Embedding.forward:
        return f"{type(module).__name__} overrides nn.Embedding.forward: its rows are unknown"
    if module.max_norm is not None:
        return (
            f"max_norm={module.max_norm}: the forward renormalises weight rows in place, so the rows "
            "seen are not those of a fixed weight"
        )
    if module.sparse:
        return "sparse=True: its gradient is a sparse tensor, HyLo writes dense gradient matrices"
    if module.scale_grad_by_freq:
        return (
            "scale_grad_by_freq=True: the weight gradient divides each token's sum by its count in the "
            "batch, which the captured output gradients do not show"
        )
    return None
