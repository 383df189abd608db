"""HyLo as a torch optimizer: the HyLo preconditioner in front of an elementwise base update.

The base update is ``torch.optim.AdamW``'s (``base="adamw"``, the default) or ``torch.optim.SGD``'s
(``base="sgd"``: momentum, Nesterov, weight decay), with ``lr`` (and ``betas`` / ``momentum``) in
``param_groups`` for LR schedulers; see ``ds_hylo.base_update``. It is elementwise, so it works
unchanged on DeepSpeed ZeRO-1's flat 1-D partitions; the layer-wise preconditioning happens on the
full-shape gradients, either inside ``step()`` (standalone, DDP) or earlier from a DeepSpeed hook
(see ``ds_hylo.deepspeed``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import textwrap
import warnings
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

from . import memory
from .exchange import Exchange, group_exchange
from . import config as config_module
from .base_update import BaseUpdate, base_hyperparameters
from .config import HyLoConfig
from .preconditioner import Preconditioner

ParamsT = Union[Iterable[torch.Tensor], Iterable[dict[str, Any]]]

logger = logging.getLogger("ds_hylo")

# HyLo's default weight decay (0.0) differs from torch.optim.AdamW's (0.01); said once per process.
WEIGHT_DECAY_NOTE = (
    "HyLo's default weight_decay is 0.0 (torch.optim.AdamW's is 0.01); pass weight_decay=0.01 to match AdamW"
)
_weight_decay_noted = False

# DeepSpeed's optimizer wrappers step the client optimizer on zero gradients at most once each
# while they initialise; more suspended steps than this mean training is running on a suspended HyLo.
MAX_SUSPENDED_STEPS = 4
_SUSPENDED_HELP = (
    "ds_hylo suspends HyLo only while DeepSpeed initialises its optimizer wrappers (they step on zero "
    "gradients), and resumes it right after: ds_hylo.initialize and ds_hylo.accelerate.prepare after "
    "DeepSpeed's initialize, HyLoTrainer in create_scheduler once HyLo is attached to the DeepSpeed engine. "
    "Something kept it suspended (e.g. a create_scheduler override that does not call "
    "HyLoTrainer.create_scheduler, or hylo.suspended = True set by hand): set hylo.suspended = False "
    "(after ds_hylo.deepspeed.attach(engine, hylo) under DeepSpeed) before training"
)


def _world_size(comm: Optional[Exchange]) -> int:
    """Ranks of the given exchange, else of the default group (without fixing the exchange: the
    DeepSpeed glue sets it after construction)."""
    if comm is not None:
        return comm.world_size
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _note_default_weight_decay(options: dict[str, Any], params: list[Any], base: str) -> None:
    """Warn once per process, on the ``ds_hylo`` logger, that HyLo's AdamW base decays less than AdamW.

    Only where the difference is in effect: ``base="adamw"``, ``weight_decay`` not among the
    options, and not every param group giving its own ``weight_decay`` (any value, 0.0 included,
    counts as a choice).
    """
    global _weight_decay_noted
    if _weight_decay_noted or base != "adamw" or "weight_decay" in options:
        return
    if params and all(isinstance(group, dict) and "weight_decay" in group for group in params):
        return
    _weight_decay_noted = True
    logger.warning(WEIGHT_DECAY_NOTE)


def _positive_scale(name: str, value: Union[float, torch.Tensor]) -> float:
    scale = float(value)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"HyLo: {name}={scale} is not a loss scale; it must be a finite number > 0")
    return scale


class HyLo(torch.optim.Optimizer):
    """Hybrid low-rank natural gradient descent (Mu et al., SC'22) as a torch optimizer.

    Every ``update_freq`` steps HyLo captures the per-sample inputs and output gradients of each
    ``nn.Linear`` / ``nn.Conv2d`` layer during forward and backward, reduces them to a few rows
    (KIS: importance sampling; KID: interpolative decomposition; SNGD: all rows) and inverts the
    small s x s kernel; every ``step()`` then replaces each such layer's gradient by the damped
    natural gradient (Sherman-Morrison-Woodbury) and hands it to the base update: torch.optim.AdamW's
    (``base="adamw"``, the default: betas, eps, decoupled weight decay) or torch.optim.SGD's
    (``base="sgd"``: momentum, Nesterov, weight decay). Every other parameter gets its plain
    gradient, so with the default base it is trained by plain AdamW.

    Example (every number is the default, so this equals ``HyLo(model)``)::

        import torch
        import torch.nn.functional as F
        from ds_hylo import HyLo

        model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        opt = HyLo(model, lr=1e-3, damping=0.1, mode="kis", rank_ratio=0.1, update_freq=10)
        for step in range(20):
            x, y = torch.randn(64, 20), torch.randint(0, 10, (64,))
            logits = model(x)
            opt.sample_fisher(logits)  # needed with fisher="sampled"; a no-op otherwise
            loss = F.cross_entropy(logits, y)
            loss.backward()
            opt.step()
            opt.zero_grad()  # also drops curvature rows of passes that never reached step()
        print(opt.stats()["refreshes"], opt.layer_modes())

    Mixed precision: the ``torch.amp.GradScaler`` recipe works unchanged
    (``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()``) and gives the update of
    the unscaled run; after ``scaler.unscale_(opt)`` (to clip) call
    ``scaler.step(opt, loss_scale=scaler.get_scale())``. Passes differentiated with
    ``torch.autograd.grad`` (gradient penalties, a second loss) never add curvature rows: only
    backward passes that accumulate into ``.grad`` do. Other extra passes that must not count
    (evaluation with ``.backward()``) go inside ``with opt.no_capture():``. Checkpoints: ``state_dict()`` / ``load_state_dict()`` carry
    HyLo's state (step count, factors, generator, hybrid policy) under the key ``"hylo"``.
    Under DeepSpeed use ``ds_hylo.initialize`` with ``"optimizer": {"type": "HyLo", "params":
    {...}}``; the params are the options below.

    The base update is torch's own: ``param_groups`` and the per-parameter state are exactly those
    of ``torch.optim.SGD`` (``momentum_buffer``) or ``torch.optim.AdamW`` (``step``, ``exp_avg``,
    ``exp_avg_sq``), so LR schedulers (including ones that cycle ``momentum`` / ``betas``) and
    checkpoints work as with those optimizers. With ``base="adamw"`` (the default) the learning
    rate has AdamW's scale (default 1e-3), with ``base="sgd"`` SGD's (e.g. 0.05 with momentum 0.9).

    Args:
        model: the model; its nn.Linear / nn.Conv2d layers are preconditioned, every other
            parameter gets its plain gradient.
        params: optional parameters or param groups (default: every model parameter, frozen ones
            included, as with ``torch.optim.AdamW(model.parameters())``: a frozen parameter is left
            alone while it has no gradient, and a layer unfrozen later trains and is preconditioned
            from its first refresh after the ``step()`` that sees it trainable; frozen layers hold
            no hooks and no rows). Parameters added later with ``add_param_group`` are preconditioned
            too where they complete a layer; the others are named in a warning.
        comm: optional Exchange (default: the default process group, if any).
        process_group: the data-parallel process group whose ranks exchange curvature rows
            (default: the default group). With tensor, pipeline or sequence parallelism beside
            data parallelism, pass the data-parallel group: rows are only exchanged between ranks
            that hold the same parameters. Not together with ``comm``.
        **options: the options below (the fields of ``ds_hylo.HyLoConfig``); an unknown name
            or a value outside what is allowed raises ValueError naming both.

    Options (``name=default``, then what is allowed and what it does):
    """

    # torch.amp.GradScaler hands HyLo the loss scale instead of unscaling .grad itself (see step()).
    _step_supports_amp_scaling = True

    def __init__(
        self,
        model: nn.Module,
        params: Optional[ParamsT] = None,
        comm: Optional[Exchange] = None,
        process_group: Optional[Any] = None,
        **options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"HyLo needs the model (an nn.Module) as first argument, got {type(model).__name__}")
        if process_group is not None:
            if comm is not None:
                raise ValueError("HyLo: give comm or process_group, not both")
            comm = group_exchange(process_group)
        self.config = HyLoConfig.from_dict(options, where="HyLo arguments")
        if params is None:
            # every parameter, frozen ones included, as torch.optim.AdamW(model.parameters()): the
            # base update skips parameters without a gradient, and a layer unfrozen later trains
            # (progressive unfreezing) and is preconditioned from its first refresh after that
            params = list(model.parameters())
        if not isinstance(params, torch.Tensor):  # torch.optim.Optimizer refuses a bare tensor itself
            params = list(params)  # may be a generator: read here and by torch.optim.Optimizer
        cfg = self.config
        _note_default_weight_decay(options, params, cfg.base)
        self.base = BaseUpdate(cfg.base, base_hyperparameters(cfg))
        super().__init__(params, self.base.defaults)
        self.preconditioner = Preconditioner(model, cfg, comm, owned_params=[p for g in self.param_groups for p in g["params"]])
        # the learning rate a refresh step will see, read when its rows start to be captured (hybrid
        # mode decides then whether KIS may draw them as they come)
        self.preconditioner.lr_source = lambda: float(self.param_groups[0]["lr"])
        first = next(iter(self.preconditioner.layers.values()))
        memory.warn_at_construction(model, dict(options), _world_size(comm), first.weight.device)
        # Set to False by integrations that precondition earlier (before DeepSpeed's reduction).
        self.precondition_in_step = True
        # DeepSpeed's wrappers call step() on zero gradients while they initialise optimizer
        # state; with weight decay that would move the weights, so integrations suspend it.
        self.suspended = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group``, and the new parameters' layers preconditioned.

        Layers whose weight and bias are all in HyLo's param groups now are hooked and
        preconditioned from their first refresh (a typical use: progressive unfreezing that adds
        each unfrozen block's parameters). Added parameters that get the plain base step instead
        (no HyLo kernel for their layer, a layer in ``skip_layers``, partly in another optimizer,
        not a parameter of the model) are named in one warning, with the reason.
        """
        super().add_param_group(param_group)
        preconditioner = getattr(self, "preconditioner", None)
        if preconditioner is None:  # torch.optim.Optimizer.__init__ adding the initial groups
            return
        new_layers, plain = preconditioner.add_owned(self.param_groups[-1]["params"])
        if new_layers:
            logger.info("HyLo: the added param group's layers %s are preconditioned from their first refresh",
                        new_layers)
        if plain:
            listed = "; ".join(f"{name}: {why}" for name, why in list(plain.items())[:20])
            more = f" (and {len(plain) - 20} more)" if len(plain) > 20 else ""
            warnings.warn(
                f"HyLo.add_param_group: {len(plain)} added parameter(s) get the plain base step "
                f"(not preconditioned): {listed}{more}",
                UserWarning,
                stacklevel=2,
            )

    @property
    def suspended(self) -> bool:
        """While True, ``step()`` does nothing, and raises RuntimeError rather than drop a real update.

        Set by the DeepSpeed / Accelerate / HF Trainer integrations while DeepSpeed initialises
        (its optimizer wrappers call ``step()`` on zero gradients, which with weight decay would
        move the weights). A suspended ``step()`` that finds a non-zero gradient, or more than
        ``MAX_SUSPENDED_STEPS`` suspended steps in a row, means training runs on a suspended HyLo:
        it raises instead of skipping updates silently. Setting it restarts the count.
        """
        return self._suspended

    @suspended.setter
    def suspended(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"HyLo.suspended must be a bool, got {value!r} ({type(value).__name__})")
        self._suspended = value
        self._suspended_steps = 0

    def _suspended_step(self) -> None:
        """A ``step()`` while suspended: allowed only on zero gradients, at most MAX_SUSPENDED_STEPS times."""
        self._suspended_steps += 1
        nonzero = [p for g in self.param_groups for p in g["params"] if p.grad is not None and bool(p.grad.any())]
        if nonzero:
            shapes = [tuple(p.shape) for p in nonzero[:3]]
            raise RuntimeError(
                f"HyLo.step() was called while HyLo is suspended, on non-zero gradients ({len(nonzero)} "
                f"parameter(s), shapes {shapes}{'...' if len(nonzero) > 3 else ''}): this update would be "
                f"skipped silently. {_SUSPENDED_HELP}"
            )
        if self._suspended_steps > MAX_SUSPENDED_STEPS:
            raise RuntimeError(
                f"HyLo.step() was called {self._suspended_steps} times while HyLo is suspended (DeepSpeed's "
                f"initialisation needs at most {MAX_SUSPENDED_STEPS}): training is running without updates. "
                f"{_SUSPENDED_HELP}"
            )

    @torch.no_grad()
    def step(
        self,
        closure: Optional[Callable[[], float]] = None,
        *,
        loss_scale: Optional[Union[float, torch.Tensor]] = None,
    ) -> Optional[float]:
        """Precondition the gradients (unless an integration already did), then one base update.

        On a refresh step (step count a multiple of ``update_freq``) HyLo first builds new
        factors (A_S (s, d_in), G_S (s, d_out), C (s, s) per layer) from the rows captured since
        the last step. Every step, each preconditioned layer's gradient [W | b], of shape
        (d_out, d_in) with the bias as an extra column, is replaced in place by the damped
        natural-gradient direction of the same shape; then the base update (torch.optim.SGD's or
        AdamW's) updates all parameters. The step count (``stats()["step"]``) advances by one.

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
            self._suspended_step()
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
        # torch's optimizer behind self.base never sees GradScaler's grad_scale/found_inf
        # attributes (they are set on HyLo, which has already used them).
        self.base.step(self.param_groups, self.state)
        return loss

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
        """With ``fisher="sampled"``: capture curvature rows at labels drawn from the model's predictions.

        Call after the forward pass and before ``loss.backward()`` on every step; off refresh steps
        and with ``fisher="empirical"`` it returns False at once, so a loop can always call it.

        Args:
            logits: (..., C) model output, still attached to its graph.
            mask: optional bool tensor of shape (...) marking the positions that count (e.g.
                non-padding tokens).

        Returns:
            True if rows were captured (a refresh step with ``fisher="sampled"``), else False.
        """
        return self.preconditioner.sample_fisher(logits, mask)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``, and drop curvature rows no ``step()`` has consumed.

        Rows captured by forward/backward passes whose step never happened (a loop that skips a
        step on a NaN loss) would otherwise reach the next refresh; ``zero_grad()`` is the boundary between steps, so they are discarded here.
        """
        super().zero_grad(set_to_none=set_to_none)
        self.preconditioner.discard_captured()

    def no_capture(self) -> contextlib.AbstractContextManager:
        """Context manager: forward and backward passes inside it add no curvature rows.

        Use it for extra passes that are not the training loss and whose backward writes ``.grad``
        (evaluation with ``.backward()``). A ``torch.autograd.grad`` pass (gradient penalty, a
        second loss) adds no rows even outside it, since its gradient never reaches ``.grad``;
        wrapping it costs nothing and also skips holding its inputs until the refresh::

            with opt.no_capture():
                penalty = gradient_penalty(model, x)
        """
        return self.preconditioner.no_capture()

    # ------------------------------------------------------------ reporting
    @property
    def damping(self) -> float:
        """Damping lambda for the current step (after any ``damping_target`` decay)."""
        return self.preconditioner.damping()

    def layer_modes(self) -> dict[str, str]:
        """{layer name: "sngd" | "kis" | "kid"}: the reduction each preconditioned layer used at its
        last refresh (before the first refresh: the one it will use)."""
        return self.preconditioner.modes()

    def timing_summary(self) -> dict[str, dict[str, float]]:
        """Cumulative wall-clock time per HyLo phase.

        Returns:
            {phase: {"seconds": total seconds, "calls": count, "mean_ms": milliseconds per call}}
            for "capture" (hooks; calls = refreshes) and every phase run so far among "fisher",
            "reduce", "communicate", "invert", "apply". CUDA work is synchronised, so times are real.
        """
        return self.preconditioner.timing_summary()

    def stats(self) -> dict[str, Any]:
        """Counters, modes and timers in one dict, for logs and benchmarks.

        Returns:
            {"step": committed optimizer steps (int), "refreshes": factor refreshes (int),
            "damping": current lambda (float), "modes": ``layer_modes()``,
            "timers": ``timing_summary()``, "bytes_sent": {collective: bytes this rank sent},
            "nonfinite_events": refreshes or updates dropped for inf/NaN (int),
            "ill_conditioned_events": refreshes refused because (*) would cancel beyond float64 (int),
            "apply_dtypes": {layer: "float32" | "float64"}, the dtype of each layer's per-step
            products (``apply_precision``),
            "refused_passes": {layer: forward passes not captured because they would pass
            ``max_captured_mib``} (layers with none are left out),
            "kl_scale": last KL-clip factor (float, 1.0 without kl_clip),
            "switches": hybrid mode switches as [{"step", "layer", "mode", "reason"}]
            (empty for fixed modes)}.
        """
        p = self.preconditioner
        return {
            "step": p.steps,
            "refreshes": p.refreshes,
            "damping": p.damping(),
            "modes": p.modes(),
            "timers": p.timing_summary(),
            "bytes_sent": p.bytes_sent(),
            "nonfinite_events": p.nonfinite_events,
            "ill_conditioned_events": p.ill_conditioned_events,
            "apply_dtypes": p.apply_dtypes(),
            "refused_passes": {name: layer.refused_passes for name, layer in p.layers.items()
                               if layer.refused_passes},
            "kl_scale": p.last_kl_scale,
            "switches": p.policy.switch_log() if hasattr(p.policy, "switch_log") else [],
        }

    # ----------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict ("state", "param_groups", as torch.optim.SGD / AdamW
        write it) plus HyLo's under "hylo".

        "hylo" holds the step and refresh counts, the factors per layer, the KIS generator state
        and the hybrid policy: everything needed to continue bit-identically. It loads with
        ``torch.load(..., weights_only=True)``.
        """
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
        self._validate_base_state(state_dict)
        if hylo_state is not None:
            self.preconditioner.validate_state_dict(hylo_state)
        super().load_state_dict(state_dict)
        if hylo_state is not None:
            self.preconditioner.load_state_dict(hylo_state)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """As torch.optim.SGD/AdamW do: groups saved by another torch version get the keys they lack."""
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def _validate_base_state(self, state_dict: dict[str, Any]) -> None:
        """Raise ValueError unless the torch.optim part fits these param groups (count, sizes, shapes)
        and was written by the same base (``base="sgd"`` groups carry momentum, ``"adamw"`` betas).

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
            missing = self.base.missing_group_keys(saved)
            if missing:
                raise ValueError(
                    f"HyLo state dict's param group {g} lacks {missing}, which base={self.config.base!r} "
                    "needs: the checkpoint was saved with another base update"
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


# ------------------------------------------------------------------ option help
# What each HyLoConfig field accepts and does; the defaults come from HyLoConfig itself, so the
# help text cannot drift from them (tests/test_help.py checks that every field is listed).
_OPTION_HELP: dict[str, str] = {
    "lr": "float >= 0. Learning rate of the base update; lives in param_groups, so LR schedulers drive it.",
    "momentum": "float in [0, 1). SGD momentum, applied to the preconditioned gradient (base='sgd' only).",
    "dampening": "float in [0, 1]. SGD dampening of the momentum (base='sgd' only).",
    "nesterov": "bool. Nesterov momentum (needs momentum > 0 and dampening = 0; base='sgd' only).",
    "weight_decay": "float >= 0. Weight decay applied by the base update after preconditioning: L2 added to "
                    "the gradient with base='sgd', decoupled (p *= 1 - lr * weight_decay) with base='adamw'.",
    "mode": f"one of {list(config_module.MODES)}. sngd: exact SMW over all samples; kis: importance-sampled "
            "rows; kid: interpolative-decomposition rows; hybrid: KID in critical phases, KIS elsewhere.",
    "rank_ratio": "float in (0, 1]. Fraction of each worker's samples kept per layer at a refresh (at least one).",
    "max_global_samples": "None or int >= 1. Cap on the rows kept per layer over all workers "
                          "(max_global_samples // world_size per worker); the default 512 keeps the refresh's "
                          "memory and time independent of tokens per step and of ranks. None: no cap.",
    "contributing_ranks": "None or int >= 1. Ranks whose rows form each refresh, rotating from refresh to "
                          "refresh so every rank contributes over a window; bounds the bytes per refresh at any "
                          "number of ranks (None: every rank, one all-gather).",
    "update_freq": "int >= 1. Capture and refresh the factors every this many steps; reuse them between.",
    "damping": "float > 0, or a callable step -> float > 0. The damping lambda of (F + lambda I)^-1.",
    "damping_target": "None or float > 0. With damping_decay_steps: lambda decays geometrically from damping to this.",
    "damping_decay_steps": "None or int >= 1. Steps over which damping decays to damping_target (give both or neither).",
    "step_scale": f"one of {list(config_module.STEP_SCALES)}. sgd: the natural step times lambda (equals the plain "
                  "gradient outside the sampled span, so lr keeps SGD's scale); natural: the raw (F + lambda I)^-1 grad.",
    "kl_clip": "None or float > 0. K-FAC's KL clipping of the update; None disables it.",
    "sequence_convention": f"one of {list(config_module.SEQUENCE_CONVENTIONS)}. Linear layers on (batch, seq, "
                           "features): expand makes every position a sample; reduce averages inputs and sums "
                           "output gradients per sequence.",
    "loss_reduction": f"one of {list(config_module.LOSS_REDUCTIONS)}. Whether the training loss is the mean or "
                      "the sum over samples.",
    "fisher": f"one of {list(config_module.FISHER_TYPES)}. empirical: per-sample gradients of the training loss; "
              "sampled: gradients at labels drawn from the model's predictions (call sample_fisher(logits)).",
    "skip_layers": "list of glob patterns (fnmatch) of module names that keep their plain gradient.",
    "seed": "int >= 0. Seed of the KIS sampling generator (and of sampled-Fisher labels).",
    "switch_window": "int >= 1. Hybrid mode: committed steps per window; the summed gradient norms of "
                     "consecutive windows decide the mode of the next one.",
    "switch_threshold": "float > 0. Hybrid mode: relative change of the windowed gradient-norm sum (or of the "
                        "learning rate) at or above which a phase is critical and uses KID.",
    "switch_scope": f"one of {list(config_module.SWITCH_SCOPES)}. Hybrid mode: switch each layer on its own "
                    "or all layers together.",
    "kid_schedule": "None or a list of [start_step, end_step) int pairs. Hybrid mode: KID inside these ranges, "
                    "KIS elsewhere (replaces the gradient-norm switching).",
    "max_captured_mib": "float > 0. Bound on the captured rows one layer holds between steps (MiB of float32); "
                        "passes past it are not captured, with a one-time warning (memory stays bounded even "
                        "when step() is never called).",
    "base": f"one of {list(config_module.BASES)}. The elementwise update applied to the preconditioned gradient: "
            "torch.optim.SGD's (momentum, dampening, nesterov) or torch.optim.AdamW's (betas, eps, bias correction; "
            "lr on AdamW's scale).",
    "betas": "two floats in [0, 1). AdamW's moment coefficients (beta1, beta2); base='adamw' or graft='adamw' only.",
    "eps": "float > 0. AdamW's term added to sqrt(v_hat); base='adamw' or graft='adamw' only.",
    "graft": f"one of {list(config_module.GRAFTS)}. Per-layer step length from another method with HyLo's "
             "direction (sgd: the raw gradient's norm; adamw: the norm of Adam's direction on the raw gradient).",
    "apply_precision": '"auto", "float32" or "float64": dtype of the per-step products of the preconditioner. '
                       '"auto" uses float32 for each layer whose refresh finds the step safe from cancellation '
                       '(float64 for the others, listed in stats()["apply_dtypes"]); the s x s work is float64.',
    "delayed_refresh": "null, true or false: true uses a refresh step's factors from the next step on (the refresh "
                       "step applies the previous factors), so the refresh overlaps the following work (side CUDA "
                       "stream); null (default) means false, or true under ZeRO-2/3, which need it.",
}


def _option_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def options_help() -> str:
    """Every HyLoConfig option as ``name=default`` and a wrapped line of what is allowed and what it does."""
    lines = []
    for f in dataclasses.fields(HyLoConfig):
        lines.append(f"        {f.name}={_option_default(f)!r}")
        text = _OPTION_HELP.get(f.name, "(not documented yet)")
        lines += textwrap.wrap(text, width=96, initial_indent=" " * 12, subsequent_indent=" " * 12)
    return "\n".join(lines) + "\n"


HyLo.__doc__ = (HyLo.__doc__ or "").rstrip(" ") + "\n" + options_help()
