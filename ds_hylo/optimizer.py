"""HyLo as a torch optimizer: the HyLo preconditioner in front of an elementwise SGD update.

The base update is ``torch.optim.SGD`` (momentum, Nesterov, weight decay, ``lr`` in
``param_groups`` for LR schedulers). It is elementwise, so it works unchanged on DeepSpeed ZeRO-1's
flat 1-D partitions; the layer-wise preconditioning happens on the full-shape gradients, either
inside ``step()`` (standalone, DDP) or earlier from a DeepSpeed hook (see ``ds_hylo.deepspeed``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

from .comm import Communicator
from .config import HyLoConfig
from .preconditioner import Preconditioner

ParamsT = Union[Iterable[torch.Tensor], Iterable[dict[str, Any]]]


def _positive_scale(name: str, value: Union[float, torch.Tensor]) -> float:
    scale = float(value)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"HyLo: {name}={scale} is not a loss scale; it must be a finite number > 0")
    return scale


class HyLo(torch.optim.SGD):
    """Hybrid low-rank natural gradient descent (Mu et al., SC'22).

    Example::

        opt = HyLo(model, lr=0.1, momentum=0.9, damping=0.03, mode="kis", rank_ratio=0.1, update_freq=10)
        loss.backward(); opt.step(); opt.zero_grad()

    Args:
        model: the model; its nn.Linear / nn.Conv2d layers are preconditioned, every other
            parameter gets its plain gradient.
        params: optional parameters or param groups (default: every trainable model parameter).
        comm: optional Communicator (default: the default process group, if any).
        **options: any ``HyLoConfig`` field (lr, momentum, weight_decay, nesterov, dampening,
            mode, rank_ratio, update_freq, damping, damping_target, damping_decay_steps,
            step_scale, kl_clip, sequence_convention, loss_reduction, skip_layers, seed,
            max_global_samples, switch_window, switch_threshold, switch_scope, kid_schedule).
    """

    # torch.amp.GradScaler hands HyLo the loss scale instead of unscaling .grad itself (see step()).
    _step_supports_amp_scaling = True

    def __init__(
        self,
        model: nn.Module,
        params: Optional[ParamsT] = None,
        comm: Optional[Communicator] = None,
        **options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"HyLo needs the model (an nn.Module) as first argument, got {type(model).__name__}")
        self.config = HyLoConfig.from_dict(options, where="HyLo arguments")
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        cfg = self.config
        super().__init__(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            dampening=cfg.dampening,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov,
        )
        self.preconditioner = Preconditioner(model, cfg, comm)
        # Set to False by integrations that precondition earlier (before DeepSpeed's reduction).
        self.precondition_in_step = True
        # DeepSpeed's wrappers call step() on zero gradients while they initialise optimizer
        # state; with weight decay that would move the weights, so integrations suspend it.
        self.suspended = False

    @torch.no_grad()
    def step(
        self,
        closure: Optional[Callable[[], float]] = None,
        *,
        loss_scale: Optional[Union[float, torch.Tensor]] = None,
    ) -> Optional[float]:
        """Precondition the gradients (unless an integration already did), then one SGD update.

        Under ``torch.amp.GradScaler`` (``scaler.step(opt)``) HyLo does the unscaling itself: the
        curvature rows it captured during backward carry the loss scale just as ``.grad`` does, so
        it preconditions the scaled gradients with consistently scaled rows and unscales the
        result; the update equals the one without a scaler. A step the scaler finds non-finite
        (``found_inf``) is skipped entirely: parameters, momentum, step count, factors and the
        KIS generator stay as they were, and the rows captured on it are dropped.

        Args:
            closure: re-evaluates the model and returns the loss (as in ``torch.optim``); not
                allowed under GradScaler (torch's rule).
            loss_scale: the factor the loss was multiplied by before backward, i.e. the scale the
                captured rows carry while ``.grad`` is already unscaled. Needed only after
                ``scaler.unscale_(opt)`` (e.g. to clip gradients): pass
                ``scaler.step(opt, loss_scale=scaler.get_scale())``. Otherwise leave it None.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if self.suspended:
            return loss
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        skip, grads_scale, rows_scale = self._loss_scaling(loss_scale)
        if skip:
            self._skip_step()
            return loss
        if self.precondition_in_step:
            if rows_scale != grads_scale:  # .grad was unscaled by scaler.unscale_, the rows were not
                self._scale_grads_(rows_scale / grads_scale)
            self.preconditioner.precondition(lr=self.param_groups[0]["lr"], grad_scale=1.0 / rows_scale)
            if rows_scale != 1.0:
                self._scale_grads_(1.0 / rows_scale)
        elif (grads_scale, rows_scale) != (1.0, 1.0):
            raise RuntimeError(
                "HyLo: torch.amp.GradScaler (or loss_scale) cannot be combined with an integration that "
                "preconditions before step() (DeepSpeed); use DeepSpeed's own fp16 loss scaling"
            )
        self.preconditioner.commit()
        self._sgd_step()
        return loss

    def _sgd_step(self) -> None:
        """torch.optim.SGD's update on the (now true) gradients.

        SGD would read GradScaler's ``grad_scale``/``found_inf`` attributes and unscale again (or
        refuse them on its non-fused path); HyLo has already used them, so they are hidden meanwhile
        and put back for GradScaler, which deletes them after step() returns.
        """
        hidden = {name: self.__dict__.pop(name) for name in ("grad_scale", "found_inf") if name in self.__dict__}
        try:
            super().step()
        finally:
            self.__dict__.update(hidden)

    def _loss_scaling(self, loss_scale: Optional[Union[float, torch.Tensor]]) -> tuple[bool, float, float]:
        """Read torch.amp.GradScaler's protocol -> (skip the step, scale of .grad, scale of the rows).

        torch >= 2.1's GradScaler.step, for an optimizer with ``_step_supports_amp_scaling``, sets
        ``opt.found_inf`` (a tensor, nonzero if some gradient is inf/NaN) and ``opt.grad_scale``
        (the loss scale still in ``.grad``, or None if ``scaler.unscale_(opt)`` already removed
        it), calls ``opt.step()`` and deletes both. One host sync per step, on this path only.
        """
        if loss_scale is not None:
            loss_scale = _positive_scale("loss_scale", loss_scale)
        has_found_inf, has_grad_scale = hasattr(self, "found_inf"), hasattr(self, "grad_scale")
        if not has_found_inf:
            if has_grad_scale:
                raise RuntimeError(
                    "HyLo: optimizer.grad_scale is set but optimizer.found_inf is not: this is not the "
                    "torch.amp.GradScaler protocol HyLo handles (it sets both before step())"
                )
            return False, 1.0, 1.0 if loss_scale is None else loss_scale
        if float(self.found_inf) != 0.0:
            return True, 1.0, 1.0
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is None:  # scaler.unscale_(opt) ran: .grad is true, the captured rows are not
            if loss_scale is None:
                raise RuntimeError(
                    "HyLo: scaler.unscale_(optimizer) was called before scaler.step(optimizer); the "
                    "gradients are unscaled but HyLo's captured curvature rows still carry the loss "
                    "scale. Call scaler.step(optimizer, loss_scale=scaler.get_scale()) instead"
                )
            return False, 1.0, loss_scale
        scale = _positive_scale("optimizer.grad_scale", grad_scale)
        if loss_scale is not None and loss_scale != scale:
            raise ValueError(
                f"HyLo: loss_scale={loss_scale} differs from GradScaler's scale {scale}; pass "
                "loss_scale only after scaler.unscale_(optimizer), with scaler.get_scale()"
            )
        return False, scale, scale

    def _skip_step(self) -> None:
        """A step the loss scaler skipped: forget what precondition() or the hooks gathered for it."""
        self.preconditioner._discard_pending()
        for layer in self.preconditioner.layers.values():
            layer.clear()

    def _scale_grads_(self, factor: float) -> None:
        """Multiply every gradient of this optimizer's parameters by ``factor``, in place."""
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        for grads in groups.values():
            torch._foreach_mul_(grads, factor)

    def sample_fisher(self, logits: torch.Tensor, mask: Optional[torch.Tensor] = None) -> bool:
        """With ``fisher="sampled"``: call after the forward pass, before backward (see Preconditioner)."""
        return self.preconditioner.sample_fisher(logits, mask)

    # ------------------------------------------------------------ reporting
    @property
    def damping(self) -> float:
        return self.preconditioner.damping()

    def layer_modes(self) -> dict[str, str]:
        """Reduction (sngd/kis/kid) each preconditioned layer used at its last refresh."""
        return self.preconditioner.modes()

    def timing_summary(self) -> dict[str, dict[str, float]]:
        """Per-phase seconds: capture, reduce, communicate, invert, apply."""
        return self.preconditioner.timing_summary()

    def stats(self) -> dict[str, Any]:
        """Timers, modes, byte counters and event counts in one dict, for logs and benchmarks."""
        p = self.preconditioner
        return {
            "step": p.steps,
            "refreshes": p.refreshes,
            "damping": p.damping(),
            "modes": p.modes(),
            "timers": p.timing_summary(),
            "bytes_sent": p.bytes_sent(),
            "nonfinite_events": p.nonfinite_events,
            "kl_scale": p.last_kl_scale,
            "switches": p.policy.switch_log() if hasattr(p.policy, "switch_log") else [],
        }

    # ----------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["hylo"] = self.preconditioner.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what ``state_dict()`` returned; validates everything before changing anything.

        A checkpoint from another mode, another model width or other param groups raises
        ValueError naming the problem, and this optimizer (momentum buffers, step count, factors,
        generator) is then exactly as it was. The preconditioner checks its part (modes, layer
        names and factor shapes against this model) in ``Preconditioner.validate_state_dict``.
        """
        state_dict = dict(state_dict)
        hylo_state = state_dict.pop("hylo", None)
        self._validate_sgd_state(state_dict)
        if hylo_state is not None:
            self.preconditioner.validate_state_dict(hylo_state)
        super().load_state_dict(state_dict)
        if hylo_state is not None:
            self.preconditioner.load_state_dict(hylo_state)

    def _validate_sgd_state(self, state_dict: dict[str, Any]) -> None:
        """Raise ValueError unless the torch.optim part fits these param groups (count, sizes, shapes).

        torch's own load checks group count and sizes but loads momentum buffers of another shape
        (a model of another width with the same number of parameters) and fails at the next step.
        """
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"HyLo state dict has no {key!r} entry; expected the output of HyLo.state_dict()")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"HyLo state dict has {len(saved_groups)} param group(s), this optimizer has {len(self.param_groups)}"
            )
        params_by_id: dict[Any, tuple[int, int, torch.Tensor]] = {}
        for g, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"HyLo state dict's param group {g} has {len(saved['params'])} parameters, this "
                    f"optimizer's has {len(group['params'])}"
                )
            for i, (saved_id, param) in enumerate(zip(saved["params"], group["params"])):
                params_by_id[saved_id] = (g, i, param)
        for saved_id, entry in state_dict["state"].items():
            if saved_id not in params_by_id:
                continue  # torch ignores state of unknown ids too
            g, i, param = params_by_id[saved_id]
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(
                        f"HyLo state dict's {key!r} of parameter {i} in param group {g} has shape "
                        f"{tuple(value.shape)}, the parameter has shape {tuple(param.shape)} (another model?)"
                    )
