"""Layer adapters: which modules HyLo preconditions, and how each kind gives its kernel rows.

``adapter_for(module)`` returns the adapter of a supported module or None; ``fallback_reason``
says in words why a module keeps its plain gradient. Supported kinds:

- ``nn.Linear`` and subclasses that keep Linear's forward (``NonDynamicallyQuantizableLinear``,
  the ``lora_A`` / ``lora_B`` layers of peft's LoRA, whose frozen base layer has no trainable
  parameter and is never hooked);
- transformers' ``Conv1D`` (GPT-2 family), recognised without importing transformers;
- ``nn.Conv2d`` with groups=1 and zero padding;
- ``nn.Embedding`` (dense gradients): a Linear(num_embeddings -> embedding_dim) on one-hot inputs
  whose input rows are kept as token ids, int64 (n, 1), never as dense (n, num_embeddings) rows.
  The kernels take them directly (docs/design.md section 1.10): K = [t_i == t_j] o (G G^T),
  U^T grad = (g_i . grad[:, t_i])_i, U c = index_add of c_i g_i into column t_i; a ``padding_idx``
  token is a zero row (id -1: its weight row is never written). Rows are always token-level
  ("expand"), whatever ``sequence_convention`` says.

First-order fallback, with the reason reported:

- ``nn.Embedding`` with ``max_norm`` (the forward renormalises weight rows in place),
  ``sparse=True`` (sparse gradients), ``scale_grad_by_freq=True`` (the gradient divides by token
  counts the output gradients do not show), or a subclass overriding ``forward``;
- an Embedding whose weight is tied to another module's (an LM head, ``tie_weights()``): both
  modules keep their plain gradient and the reason names them (``Preconditioner``); the shared
  parameter would otherwise be preconditioned from two half-kernels.
- ``nn.MultiheadAttention``: its forward calls ``F.multi_head_attention_forward`` with the packed
  ``in_proj_weight`` and ``out_proj.weight`` directly, so no hook sees the q/k/v projections'
  outputs (nor their gradients) or the attention output that is ``out_proj``'s input. Its
  ``out_proj`` is a Linear subclass whose forward never runs: it is reported as fallback too
  (``unreachable_layers``), never registered as a layer that would silently never capture.
- every other kind with trainable parameters (LayerNorm, BatchNorm, grouped convolutions, ...).
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from .base import GradAccessor, LayerAdapter, param_grad, storage_dtype
from .conv import Conv2dAdapter
from .conv1d import HFConv1DAdapter, _conv1d_class
from .embedding import EmbeddingAdapter, embedding_problem
from .linear import LinearAdapter

__all__ = [
    "GradAccessor",
    "LayerAdapter",
    "LinearAdapter",
    "HFConv1DAdapter",
    "Conv2dAdapter",
    "EmbeddingAdapter",
    "adapter_for",
    "fallback_reason",
    "unreachable_layers",
    "param_grad",
    "storage_dtype",
]

_ADAPTERS: list[type[LayerAdapter]] = [LinearAdapter, HFConv1DAdapter, Conv2dAdapter, EmbeddingAdapter]

def adapter_for(module: nn.Module) -> Optional[LayerAdapter]:
    """The adapter of ``module`` if HyLo can precondition its kind, else None (first-order fallback)."""
    for cls in _ADAPTERS:
        if cls.accepts(module):
            return cls(module)
    return None

_MHA_REASON = (
    "F.multi_head_attention_forward uses in_proj_weight directly: no hook sees the q/k/v projections' "
    "outputs or their gradients"
)

def fallback_reason(module: nn.Module) -> str:
    """Why ``module`` keeps its plain gradient (its kind has no adapter), in a few words."""
    if isinstance(module, nn.Embedding):
        return embedding_problem(module) or "no HyLo kernel for this layer kind"
    if isinstance(module, nn.MultiheadAttention):
        return _MHA_REASON
    if isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward:
        return f"{type(module).__name__} overrides nn.Linear.forward: its rows are unknown"
    if _conv1d_class(module) is not None:
        return f"{type(module).__name__} overrides Conv1D.forward or has no 2-D weight: its rows are unknown"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"groups={module.groups}: only groups=1 has a kernel"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}: only zero padding has a kernel"
        return f"{type(module).__name__} overrides nn.Conv2d's forward: its rows are unknown"
    return "no HyLo kernel for this layer kind"

def unreachable_layers(model: nn.Module) -> dict[int, str]:
    """id(module) -> reason, for supported-looking modules whose forward never runs.

    ``nn.MultiheadAttention.out_proj`` is an ``nn.Linear`` subclass, but the attention's forward
    uses its weight directly: hooks on it never fire, so it must not be registered.
    """
    found: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) and isinstance(getattr(module, "out_proj", None), nn.Module):
            found[id(module.out_proj)] = (
                f"out_proj of nn.MultiheadAttention {name!r}: F.multi_head_attention_forward uses its weight "
                "directly and its forward never runs"
            )
    return found
