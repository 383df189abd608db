"""Sampled-label loss whose per-sample gradients give the Monte-Carlo estimate of the true Fisher.

For a categorical model p(y | x) = softmax(z), the Fisher is E_{y ~ p(y|x)}[grad log p(y|x) grad^T].
Drawing one label per row from the model's own distribution and back-propagating the cross-entropy
at those labels gives per-sample gradients whose outer products estimate it without bias. Unlike the
empirical Fisher (true labels), their span does not contain the batch gradient, so the
Sherman-Morrison-Woodbury step does not cancel it (Kunstner et al., 2019).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F


def sample_labels(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One label per row drawn from softmax(logits): (N, C) -> (N,) long, on logits' device."""
    probs = torch.softmax(logits.detach().float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def sampled_label_loss(
    logits: torch.Tensor,
    generator: torch.Generator,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sum over rows of the cross-entropy of ``logits`` at labels sampled from them.

    A sum, so that its gradient at each row's layer outputs is that row's own per-sample gradient
    whatever the training loss's reduction or the number of accumulated micro-batches.

    Args:
        logits: (..., C) class scores with their autograd graph; leading dims are rows
            (e.g. (B, C) for classification, (B, T, V) for token prediction).
        generator: random generator on logits' device.
        mask: optional bool tensor of logits' leading shape; False rows contribute nothing.

    Returns:
        A scalar tensor (float32 or float64).
    """
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (..., num_classes), got {tuple(logits.shape)}")
    if not logits.requires_grad:
        raise ValueError(
            "logits carry no autograd graph: pass the model's output from a forward pass with "
            "gradients enabled, before backward"
        )
    flat = logits.reshape(-1, logits.shape[-1])
    flat = flat if flat.dtype == torch.float64 else flat.float()
    labels = sample_labels(flat, generator)
    per_row = F.cross_entropy(flat, labels, reduction="none")
    if mask is not None:
        if mask.shape != logits.shape[:-1]:
            raise ValueError(f"mask must have logits' leading shape {tuple(logits.shape[:-1])}, got {tuple(mask.shape)}")
        per_row = per_row * mask.reshape(-1).to(per_row.dtype)
    return per_row.sum()


@contextlib.contextmanager
def tensor_hooks_suspended(tensor: torch.Tensor) -> Iterator[None]:
    """Disable the backward hooks registered on ``tensor`` (``tensor.register_hook``) inside the block.

    The sampled-label backward is private to HyLo: hooks that frameworks put on a model's outputs
    (DeepSpeed's engine starts its backward prologue, loss-scaling and reduction from them) must
    only see the training backward.
    """
    hooks = getattr(tensor, "_backward_hooks", None)
    saved = dict(hooks) if hooks else {}
    if hooks:
        hooks.clear()
    try:
        yield
    finally:
        if hooks is not None:
            hooks.update(saved)
