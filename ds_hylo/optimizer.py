"""HyLo as a torch optimizer: the HyLo preconditioner in front of an elementwise SGD update.

The base update is ``torch.optim.SGD`` (momentum, Nesterov, weight decay, ``lr`` in
``param_groups`` for LR schedulers). It is elementwise, so it works unchanged on DeepSpeed ZeRO-1's
flat 1-D partitions; the layer-wise preconditioning happens on the full-shape gradients, either
inside ``step()`` (standalone, DDP) or earlier from a DeepSpeed hook (see ``ds_hylo.deepspeed``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

from .comm import Communicator
from .config import HyLoConfig
from .preconditioner import Preconditioner

ParamsT = Union[Iterable[torch.Tensor], Iterable[dict[str, Any]]]


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
        self.preconditioner = Preconditioner(model, cfg, comm, owned_params=[p for g in self.param_groups for p in g["params"]])
        # Set to False by integrations that precondition earlier (before DeepSpeed's reduction).
        self.precondition_in_step = True
        # DeepSpeed's wrappers call step() on zero gradients while they initialise optimizer
        # state; with weight decay that would move the weights, so integrations suspend it.
        self.suspended = False

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Precondition the gradients (unless an integration already did), then one SGD update."""
        loss = None
        if self.suspended:
            return loss
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.precondition_in_step:
            self.preconditioner.precondition(lr=self.param_groups[0]["lr"])
        self.preconditioner.commit()
        super().step()
        return loss

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
        state_dict = dict(state_dict)
        hylo_state = state_dict.pop("hylo", None)
        super().load_state_dict(state_dict)
        if hylo_state is not None:
            self.preconditioner.load_state_dict(hylo_state)
