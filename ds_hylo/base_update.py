"""The update HyLo applies after preconditioning (its "base"), and per-layer grafting.

Base update. HyLo's ``step()`` first replaces each preconditioned layer's gradient by HyLo's
direction, then applies an elementwise first-order update to every parameter: ``torch.optim.SGD``'s
(``base="sgd"``) or ``torch.optim.AdamW``'s (``base="adamw"``). The update is torch's own: a
private torch optimizer of that class is pointed at HyLo's ``param_groups`` and ``state`` and
stepped, so the per-parameter state is exactly torch's (``momentum_buffer``; ``step``,
``exp_avg``, ``exp_avg_sq``), checkpoints have torch's format, LR schedulers drive ``lr`` (and
``betas`` / ``momentum``) in HyLo's param groups, and the update is elementwise: it works
unchanged on DeepSpeed ZeRO-1's flat 1-D fp32 partitions.

Grafting (Distributed Shampoo's): keep HyLo's direction per layer but give it the step length of
another method computed from the raw gradient. For a layer with raw gradient ``g`` and HyLo
direction ``d`` (both (d_out, d_in), bias as the last column), the grafted direction is
``d * ||u|| / ||d||`` where ``u = g`` ("sgd") or ``u = m_hat / (sqrt(v_hat) + eps)``, Adam's
direction from moments kept on the raw gradient ("adamw"). ``graft_scale`` and
``adam_graft_direction`` are the pure functions; ``Grafting`` holds the per-layer state for the
preconditioner, two-phase like its factors (``rescale`` proposes, ``commit`` keeps, ``discard``
forgets a step that was skipped).
"""

from __future__ import annotations

import functools

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from .config import HyLoConfig

# Group keys each base reads; a checkpoint's param groups must carry them.
REQUIRED_GROUP_KEYS: dict[str, tuple[str, ...]] = {
    "sgd": ("lr", "momentum", "dampening", "weight_decay", "nesterov"),
    "adamw": ("lr", "betas", "eps", "weight_decay", "amsgrad"),
}
_TORCH_CLASSES: dict[str, type[torch.optim.Optimizer]] = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}


def base_hyperparameters(config: HyLoConfig) -> dict[str, Any]:
    """The constructor arguments of the torch optimizer of ``config.base`` (same names as torch's)."""
    if config.base == "sgd":
        return {"lr": config.lr, "momentum": config.momentum, "dampening": config.dampening,
                "weight_decay": config.weight_decay, "nesterov": config.nesterov}
    if config.base == "adamw":
        return {"lr": config.lr, "betas": tuple(float(b) for b in config.betas), "eps": config.eps,
                "weight_decay": config.weight_decay, "amsgrad": False}
    raise ValueError(f"base={config.base!r} is not allowed; choose one of {list(REQUIRED_GROUP_KEYS)}")


class BaseUpdate:
    """torch's SGD or AdamW step, applied to param groups and state that someone else owns.

    Args:
        base: "sgd" or "adamw".
        hyperparameters: the torch optimizer's constructor arguments (``base_hyperparameters``).

    ``defaults`` are exactly the torch optimizer's (every group key it reads: ``lr``, ``betas``,
    ``foreach``, ``fused``...), so the owner's ``param_groups`` look like that optimizer's.
    """

    def __init__(self, base: str, hyperparameters: dict[str, Any]) -> None:
        if base not in _TORCH_CLASSES:
            raise ValueError(f"base={base!r} is not allowed; choose one of {list(_TORCH_CLASSES)}")
        self.name = base
        placeholder = torch.nn.Parameter(torch.zeros(0, device="cpu"))  # torch refuses an empty list
        self._torch = _TORCH_CLASSES[base]([placeholder], **hyperparameters)
        self.defaults: dict[str, Any] = dict(self._torch.defaults)
        self._torch.param_groups = []
        self._torch.state = defaultdict(dict)

    def step(self, param_groups: list[dict[str, Any]], state: defaultdict) -> None:
        """One update of every parameter with a gradient, in place; ``state`` gains torch's entries.

        Args:
            param_groups: the owner's groups (any parameter shapes: full tensors or ZeRO-1's flat
                1-D partitions), read at call time so schedulers and ``load_state_dict`` are seen.
            state: the owner's ``defaultdict(dict)`` keyed by parameter.
        """
        self._torch.param_groups = param_groups
        self._torch.state = state
        try:
            self._torch.step()
        finally:  # hold no references to the owner's tensors between steps
            self._torch.param_groups = []
            self._torch.state = defaultdict(dict)

    def missing_group_keys(self, group: dict[str, Any]) -> list[str]:
        """Keys this base reads that a (saved) param group lacks."""
        return [key for key in REQUIRED_GROUP_KEYS[self.name] if key not in group]


# ------------------------------------------------------------------------------------ grafting
@dataclass
class AdamGraftState:
    """Adam's moments of one layer's raw gradient: exp_avg, exp_avg_sq (shape of the gradient), step."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: int


def adam_graft_direction(
    raw: torch.Tensor, state: Optional[AdamGraftState], betas: Sequence[float], eps: float
) -> tuple[torch.Tensor, AdamGraftState]:
    """Adam's direction m_hat / (sqrt(v_hat) + eps) after one more raw gradient; pure (no tensor changes).

    The operations follow torch.optim.Adam's single-tensor path (lerp for the first moment,
    ``v * beta2 + (1 - beta2) g^2``, bias corrections as Python floats), so the direction equals
    minus what one Adam step with lr=1 and no weight decay moves a parameter by.

    Args:
        raw: the layer's raw gradient, any shape (e.g. (d_out, d_in)).
        state: the moments so far, or None before the first step.
        betas: (beta1, beta2) in [0, 1).
        eps: added to sqrt(v_hat).

    Returns:
        (direction of raw's shape, the new state). ``state`` is left as it was.
    """
    beta1, beta2 = float(betas[0]), float(betas[1])
    if state is None:
        state = AdamGraftState(torch.zeros_like(raw), torch.zeros_like(raw), 0)
    step = state.step + 1
    exp_avg = state.exp_avg.lerp(raw, 1 - beta1)
    exp_avg_sq = state.exp_avg_sq.mul(beta2).addcmul_(raw, raw, value=1 - beta2)
    step_size = 1 / (1 - beta1**step)  # torch: lr / bias_correction1, with lr = 1
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    direction = exp_avg.mul(step_size).div_(denom)  # torch: param.addcdiv_(exp_avg, denom, value=-step_size)
    return direction, AdamGraftState(exp_avg, exp_avg_sq, step)


def graft_scale(direction: torch.Tensor, graft_norm: torch.Tensor) -> torch.Tensor:
    """The factor that gives ``direction`` the length ``graft_norm``: ||u|| / ||d||, 0 where d = 0.

    Args:
        direction: HyLo's direction of one layer, any shape.
        graft_norm: 0-d tensor, the norm of the grafting method's direction for that layer.

    Returns:
        0-d tensor on ``direction``'s device (no host synchronisation).
    """
    norm = torch.linalg.vector_norm(direction)
    positive = norm > 0
    safe_norm = torch.where(positive, norm, torch.ones_like(norm))
    return torch.where(positive, graft_norm / safe_norm, torch.zeros_like(norm))


UpdateT = tuple[str, torch.Tensor, torch.Tensor]


class Grafting:
    """Per-layer grafting state and its two-phase life cycle, for ``Preconditioner._apply``.

    Args:
        method: "sgd" (step length of the raw gradient) or "adamw" (of Adam's direction on the
            raw gradient, with moments kept per layer here).
        betas, eps: Adam's coefficients for method "adamw".
    """

    def __init__(self, method: str, betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        if method not in ("sgd", "adamw"):
            raise ValueError(f"graft={method!r} has no grafting state; choose 'sgd' or 'adamw'")
        self.method = method
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.states: dict[str, AdamGraftState] = {}
        self._pending: dict[str, AdamGraftState] = {}

    def rescale(
        self,
        updates: Sequence[UpdateT],
        all_reduce_mean: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        layout: Optional[Sequence[tuple[str, tuple[int, int], torch.dtype]]] = None,
        device: Optional[torch.device] = None,
    ) -> list[torch.Tensor]:
        """Grafted directions: each ``direction * ||u(raw)|| / ||direction||``.

        Args:
            updates: (layer name, raw gradient, HyLo direction) per preconditioned layer; raw and
                direction share one shape (d_out, d_in) and dtype.
            all_reduce_mean: when the gradients are this rank's local ones (DeepSpeed, before its
                reduction): the mean over ranks. Norms and Adam moments then come from the
                averaged raw gradients and directions (one collective of all of them), so every
                rank applies the same factor and the result equals one process on the whole batch.
            layout: with ``all_reduce_mean``, (name, shape, dtype) of every layer the ranks
                precondition, in one order on every rank: the collective is laid out over it, a
                layer missing from this rank's ``updates`` (no gradient here) sending zeros.
                Default: the layers of ``updates``. device: where the buffer lives when
                ``updates`` is empty.

        Returns:
            The rescaled directions, in order (local ones when ``all_reduce_mean`` is given).
            The "adamw" moments are pending until ``commit()``.
        """
        if not updates and all_reduce_mean is None:
            return []
        raws = [raw for _, raw, _ in updates]
        directions = [direction for _, _, direction in updates]
        if all_reduce_mean is not None:
            if layout is None:
                layout = [(name, tuple(raw.shape), raw.dtype) for name, raw, _ in updates]
            raws, directions = _mean_over_ranks(updates, all_reduce_mean, layout, device)
        self._pending = {}
        out = []
        for (name, _, local_direction), raw, direction in zip(updates, raws, directions):
            if self.method == "sgd":
                norm = torch.linalg.vector_norm(raw)
            else:
                adam, self._pending[name] = adam_graft_direction(raw, self.states.get(name), self.betas, self.eps)
                norm = torch.linalg.vector_norm(adam)
            out.append(local_direction * graft_scale(direction, norm).to(local_direction.dtype))
        return out

    def commit(self) -> None:
        """Keep the moments of the last ``rescale`` (its step happened)."""
        self.states.update(self._pending)
        self._pending = {}

    def discard(self) -> None:
        """Forget the moments of the last ``rescale`` (its step was skipped)."""
        self._pending = {}

    def state_dict(self) -> dict[str, Any]:
        """{"method", "states": {layer: {"exp_avg", "exp_avg_sq", "step"}}}; loads with weights_only=True."""
        return {"method": self.method,
                "states": {name: {"exp_avg": s.exp_avg, "exp_avg_sq": s.exp_avg_sq, "step": s.step}
                           for name, s in self.states.items()}}

    def validate_state_dict(self, state: Any, shapes: dict[str, tuple[int, ...]]) -> None:
        """Raise ValueError naming the problem unless ``state`` fits this method and these layer shapes."""
        if not isinstance(state, dict) or set(state) != {"method", "states"}:
            raise ValueError("HyLo graft state must be a dict with keys ['method', 'states']")
        if state["method"] != self.method:
            raise ValueError(f"HyLo graft state was saved with graft={state['method']!r}; this optimizer has "
                             f"graft={self.method!r}")
        for name, entry in state["states"].items():
            if name not in shapes:
                raise ValueError(f"HyLo graft state has layer {name!r}, which this model does not precondition")
            for key in ("exp_avg", "exp_avg_sq"):
                if tuple(entry[key].shape) != tuple(shapes[name]):
                    raise ValueError(f"HyLo graft state: layer {name!r} {key} has shape {tuple(entry[key].shape)}, "
                                     f"the layer's gradient matrix has {tuple(shapes[name])}")

    def load_state_dict(self, state: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                        device_of: dict[str, torch.device]) -> None:
        """Restore ``state_dict()``'s output (validated first), moving tensors to each layer's device."""
        self.validate_state_dict(state, shapes)
        self._pending = {}
        self.states = {
            name: AdamGraftState(entry["exp_avg"].to(device_of[name]), entry["exp_avg_sq"].to(device_of[name]),
                                 int(entry["step"]))
            for name, entry in state["states"].items()
        }


def make_grafting(config: HyLoConfig) -> Optional[Grafting]:
    """The Grafting object ``config.graft`` asks for, or None for graft="none"."""
    if config.graft == "none":
        return None
    return Grafting(config.graft, config.betas, config.eps)


def _mean_over_ranks(
    updates: Sequence[UpdateT],
    all_reduce_mean: Callable[[torch.Tensor], torch.Tensor],
    layout: Sequence[tuple[str, tuple[int, int], torch.dtype]],
    device: Optional[torch.device],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Average the raw gradients and directions of ``updates`` over ranks with one collective.

    The buffer is laid out over ``layout`` (raw then direction per layer), in the widest dtype of
    the layout, so every rank sends the same size whatever layers it has gradients for; returns
    the averaged (raws, directions) of ``updates``' layers, in their order, shapes and dtypes.
    """
    dtype = functools.reduce(torch.promote_types, [entry[2] for entry in layout], torch.float32)
    if updates:
        device = updates[0][1].device
    present = {name: (raw, direction) for name, raw, direction in updates}
    pieces = []
    for name, shape, _ in layout:
        numel = shape[0] * shape[1]
        if name in present:
            pieces += [present[name][0].reshape(-1).to(dtype), present[name][1].reshape(-1).to(dtype)]
        else:
            pieces.append(torch.zeros(2 * numel, dtype=dtype, device=device))
    flat = all_reduce_mean(torch.cat(pieces))
    averaged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    offset = 0
    for name, shape, _ in layout:
        numel = shape[0] * shape[1]
        if name in present:
            raw, direction = present[name]
            averaged[name] = (flat[offset: offset + numel].view(shape).to(raw.dtype),
                              flat[offset + numel: offset + 2 * numel].view(shape).to(direction.dtype))
        offset += 2 * numel
    names = [name for name, _, _ in updates]
    return [averaged[n][0] for n in names], [averaged[n][1] for n in names]
