"""Which reduction (SNGD, KIS or KID) each layer uses at a refresh: fixed, scheduled or detected online.

Hybrid mode uses KID (accurate) in critical phases of training and KIS (cheap) elsewhere. The
online detector (``AccordionPolicy``) follows Accordion (Agarwal et al., MLSys 2021), which has
two rules; both are implemented:

1. Gradient-norm rule. Training is cut into *windows* of ``switch_window`` committed optimizer
   steps (steps skipped for fp16 overflow do not count; to reproduce Accordion's per-epoch
   windows set ``switch_window`` to the number of steps per epoch). In each window the policy sums
   every layer's gradient norm (``switch_scope="global"``: the sum over all layers). When window
   ``k`` closes, its relative change against window ``k-1``,

       change_k = |S_k - S_{k-1}| / S_{k-1},

   decides the mode of window ``k+1``: KID if ``change_k >= switch_threshold`` (critical), KIS
   otherwise. The first window of a phase (see rule 2) has no predecessor and counts as critical,
   so windows 0 and 1 of a phase use KID; the first data-driven decision applies to window 2.
   ``S_{k-1} = 0`` counts as critical unless ``S_k = 0`` too; a non-finite change counts as critical.

2. Learning-rate rule. A learning-rate decay marks a critical regime by itself (Accordion's
   "second rule": at every decay point it goes back to its accurate setting). Rule 1 alone cannot
   see it: once the gradient norm is dominated by mini-batch noise, a 10x smaller step changes the
   windowed norm sum by far less than 50% (measured on MNIST, windows of 25 steps around a 10x
   drop: MLP -27%, MnistCNN -5% to +8%), so KIS would stay on right where the optimizer starts to
   settle into a new basin. (Accordion's statistic, the norm of the *accumulated* gradient, equals
   |delta theta| / lr for SGD and so reacts to the lr; the preconditioner only reports per-step
   norms, hence the explicit rule.) When the learning rate passed to ``observe_lr`` (the step's
   lr, ``param_groups[0]["lr"]``, before the step's refresh; LR schedulers thus count) differs from the one the current phase started with by a relative amount
   ``>= switch_threshold`` (a decay or a warm-up jump), every layer switches to KID *from that step
   on* (the refresh of that step already uses KID) and a new phase starts: the partial window is
   dropped, the new lr becomes the phase's reference, and the phase's first window is critical as
   at the start of training. Continuous schedules (cosine, linear) thus trigger each time the lr
   has moved by the threshold since the last trigger, not every step. (KIS draws its rows while
   they are captured: the preconditioner asks ``planned_mode`` with the lr of the step's first
   forward pass, so an lr set before the forward pass, as LR schedulers do, switches that step's
   refresh to KID with every row captured; an lr changed between forward and step still switches,
   and KID then runs on the rows KIS drew, with a warning.)

All decisions depend only on committed steps, on the window sums (averaged over ranks with
``reduce_mean`` when gradients are rank-local) and on the learning rate, which every rank shares,
so every rank takes the same decision at the same step.

Inspecting decisions: ``policy.history`` lists the mode switches as ``SwitchEvent(step, layer,
mode)`` tuples (``step``: first step whose refresh uses the new mode; ``layer``: a layer name, or
"*" for all layers under global scope); ``policy.switch_log()`` gives the same as dicts with the
``reason`` ("start", "norm": gradient-norm rule, "lr": learning-rate rule, "schedule");
``policy.decisions`` lists one dict per closed window (its steps, sums, relative changes, critical
flags and the modes chosen for the next window); ``policy.lr_changes`` lists the phases the
learning-rate rule started. All three survive ``state_dict``/``load_state_dict``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, NamedTuple, Optional

import torch

from .config import SWITCH_SCOPES, HyLoConfig

logger = logging.getLogger("ds_hylo")

ReduceMean = Callable[[torch.Tensor], torch.Tensor]

KID = "kid"
KIS = "kis"
ALL_LAYERS = "*"
MAX_DECISION_RECORDS = 1000


class SwitchEvent(NamedTuple):
    """From step ``step`` on, ``layer`` ("*" = every layer) uses ``mode``."""

    step: int
    layer: str
    mode: str


def relative_change(new: float, old: float) -> float:
    """|new - old| / old, with 0 -> x counting as an infinite change (0 -> 0 as none)."""
    if old == 0.0:
        return 0.0 if new == 0.0 else math.inf
    return abs(new - old) / abs(old)


class ModePolicy:
    """Base policy: one fixed mode for every layer.

    Protocol per optimizer step: ``observe_lr(lr)`` first (before the refresh), ``mode_for`` at a
    refresh, ``observe`` once per layer with its gradient norm, then ``end_step`` when the step
    is committed or ``discard_step`` when it is skipped.
    """

    kind = "fixed"
    needs_grad_norms = False  # the preconditioner skips computing norms for policies that ignore them

    def __init__(self, mode: str) -> None:
        self.mode = mode

    @property
    def history(self) -> list[SwitchEvent]:
        """Mode switches so far (a fixed policy has only its start)."""
        return [SwitchEvent(0, ALL_LAYERS, self.mode)]

    def switch_log(self) -> list[dict[str, Any]]:
        """``history`` as dicts {"step", "layer", "mode", "reason"}."""
        return [{**event._asdict(), "reason": reason} for event, reason in zip(self.history, self._reasons())]

    def _reasons(self) -> list[str]:
        return ["start"] + ["schedule"] * (len(self.history) - 1)

    def mode_for(self, layer: str, step: int) -> str:
        return self.mode

    def planned_mode(self, layer: str, step: int, lr: Optional[float] = None) -> str:
        """The mode ``mode_for`` will give at step ``step``'s refresh if ``observe_lr(lr)`` is called
        with this learning rate before it (None: the one observed, if any). Changes nothing; asked
        when the step's rows start to be captured, to know whether KIS may draw them as they come."""
        return self.mode_for(layer, step)

    def add_layers(self, layers: list[str]) -> None:
        """Layers that joined the preconditioned ones (unfrozen, or added with a param group)."""

    def observe(self, layer: str, grad_norm: float) -> None:
        """Record a layer's gradient norm for the current (uncommitted) step."""

    def observe_norms(self, layers: list[str], grad_norms: torch.Tensor) -> None:
        """Record gradient norms (len(layers),) of the current step; they stay on their device."""
        for layer, norm in zip(layers, grad_norms.tolist()):
            self.observe(layer, norm)

    def observe_lr(self, lr: float) -> None:
        """Record the learning rate of the current (uncommitted) step; call before its refresh."""

    def end_step(self, step: int, reduce_mean: Optional[ReduceMean] = None) -> None:
        """The step ``step`` happened; ``reduce_mean`` averages statistics over ranks when needed."""

    def discard_step(self) -> None:
        """The current step was skipped: forget what ``observe``/``observe_lr`` recorded for it."""

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "policy": self.kind}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode") != self.mode:
            raise ValueError(f"saved HyLo policy is for mode {state.get('mode')!r}, this optimizer uses {self.mode!r}")
        if state.get("policy", self.kind) != self.kind:
            raise ValueError(f"saved HyLo hybrid policy is {state.get('policy')!r} (kid_schedule given or not), "
                             f"this optimizer uses {self.kind!r}")


class ScheduledPolicy(ModePolicy):
    """KID inside the given [start, end) step ranges, KIS elsewhere (reproduces fixed-epoch recipes)."""

    kind = "scheduled"

    def __init__(self, kid_ranges: list[tuple[int, int]]) -> None:
        super().__init__("hybrid")
        self.kid_ranges = [(int(s), int(e)) for s, e in kid_ranges]

    def mode_for(self, layer: str, step: int) -> str:
        return KID if any(s <= step < e for s, e in self.kid_ranges) else KIS

    @property
    def history(self) -> list[SwitchEvent]:
        """The switches the schedule implies, in step order."""
        boundaries = sorted({0} | {s for s, _ in self.kid_ranges} | {e for _, e in self.kid_ranges})
        events: list[SwitchEvent] = []
        for step in boundaries:
            mode = self.mode_for(ALL_LAYERS, step)
            if not events or events[-1].mode != mode:
                events.append(SwitchEvent(step, ALL_LAYERS, mode))
        return events

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "kid_ranges": [list(r) for r in self.kid_ranges]}


class AccordionPolicy(ModePolicy):
    """Online critical-regime detection per layer (or globally); see the module docstring for the rules.

    Args:
        layers: names of the preconditioned layers.
        window: steps per window (``switch_window``).
        threshold: relative change that marks a critical regime (``switch_threshold``).
        scope: "layer" (each layer decides from its own norm) or "global" (one decision from the
            sum over all layers).
    """

    kind = "accordion"
    needs_grad_norms = True

    def __init__(self, layers: list[str], window: int, threshold: float, scope: str = "layer") -> None:
        super().__init__("hybrid")
        if scope not in SWITCH_SCOPES:
            raise ValueError(f"switch_scope={scope!r} is not allowed; choose one of {list(SWITCH_SCOPES)}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"switch_window={window!r} is not allowed; it must be an integer >= 1")
        if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"switch_threshold={threshold!r} is out of range; allowed: (0.0, inf)")
        if not layers:
            raise ValueError("AccordionPolicy needs at least one layer")
        self.layers = list(layers)
        self.window = window
        self.threshold = float(threshold)
        self.scope = scope
        self._index = {name: i for i, name in enumerate(self.layers)}
        self._index_tensors: dict[tuple[tuple[str, ...], torch.device], torch.Tensor] = {}
        self.current = {name: KID for name in self.layers}
        self._history: list[SwitchEvent] = [SwitchEvent(0, ALL_LAYERS, KID)]
        self._history_reasons: list[str] = ["start"]
        self.decisions: list[dict[str, Any]] = []
        self.lr_changes: list[dict[str, Any]] = []  # phases started by the learning-rate rule
        # Committed state of the running window / phase.
        cpu = torch.device("cpu")
        self.window_sums = torch.zeros(len(self.layers), dtype=torch.float64, device=cpu)
        self.window_steps = 0  # committed steps in the running window
        self.window_start = 0  # first step of the running window
        self.windows_closed = 0  # windows closed since training started
        self.previous_sums: Optional[torch.Tensor] = None  # None: the next window to close is a phase's first
        self.lr_reference: Optional[float] = None  # learning rate the current phase started with
        # The current (uncommitted) step.
        self._pending = torch.zeros(len(self.layers), dtype=torch.float64, device=cpu)
        self._pending_lr: Optional[float] = None
        self._pending_lr_switch = False

    # ------------------------------------------------------------------ queries
    @property
    def history(self) -> list[SwitchEvent]:
        return list(self._history)

    def _reasons(self) -> list[str]:
        return list(self._history_reasons)

    def mode_for(self, layer: str, step: int) -> str:
        if self._pending_lr_switch:
            return KID
        return self.current[layer]

    def planned_mode(self, layer: str, step: int, lr: Optional[float] = None) -> str:
        if lr is not None and self._lr_switches(float(lr)):
            return KID
        return self.mode_for(layer, step)

    def _lr_switches(self, lr: float) -> bool:
        """Whether ``lr`` starts a new phase (the learning-rate rule)."""
        return self.lr_reference is not None and not relative_change(lr, self.lr_reference) < self.threshold

    # --------------------------------------------------------------- observation
    def add_layers(self, layers: list[str]) -> None:
        """New layers start in KID with zero window sums: their first window counts as critical."""
        new = [name for name in layers if name not in self._index]
        if not new:
            return
        self.layers += new
        self._index = {name: i for i, name in enumerate(self.layers)}
        self._index_tensors.clear()
        for name in new:
            self.current[name] = KID

        def grown(sums: torch.Tensor) -> torch.Tensor:
            return torch.cat([sums, sums.new_zeros(len(new))])

        self.window_sums, self._pending = grown(self.window_sums), grown(self._pending)
        if self.previous_sums is not None:
            self.previous_sums = grown(self.previous_sums)

    def observe(self, layer: str, grad_norm: float) -> None:
        self._pending[self._index[layer]] += float(grad_norm)

    def observe_norms(self, layers: list[str], grad_norms: torch.Tensor) -> None:
        """Accumulate on the norms' device: no host transfer until a window closes."""
        if self._pending.device != grad_norms.device:
            self._pending = self._pending.to(grad_norms.device)
        if self.window_sums.device != grad_norms.device:
            self.window_sums = self.window_sums.to(grad_norms.device)
        key = (tuple(layers), grad_norms.device)
        index = self._index_tensors.get(key)
        if index is None:  # made once per layer set and device: no host-to-device copy per step
            index = torch.tensor([self._index[name] for name in layers], dtype=torch.long, device=torch.device("cpu"))
            index = self._index_tensors[key] = index.to(grad_norms.device)
        self._pending.index_add_(0, index, grad_norms.to(torch.float64))

    def observe_lr(self, lr: float) -> None:
        lr = float(lr)
        self._pending_lr = lr
        self._pending_lr_switch = self._lr_switches(lr)

    def discard_step(self) -> None:
        self._pending.zero_()
        self._pending_lr = None
        self._pending_lr_switch = False

    def end_step(self, step: int, reduce_mean: Optional[ReduceMean] = None) -> None:
        lr, lr_switch = self._pending_lr, self._pending_lr_switch
        self._pending_lr, self._pending_lr_switch = None, False
        if lr_switch:
            self._start_phase(step, lr)
        elif lr is not None and self.lr_reference is None:
            self.lr_reference = lr
        if self.window_steps == 0:
            self.window_start = step
        self.window_sums += self._pending
        self._pending.zero_()
        self.window_steps += 1
        if self.window_steps < self.window:
            return
        sums = self.window_sums.clone()
        if reduce_mean is not None:
            sums = reduce_mean(sums)
        self.decide(sums, next_step=step + 1)
        self.window_sums.zero_()
        self.window_steps = 0

    # ----------------------------------------------------------------- decisions
    def _start_phase(self, step: int, lr: float) -> None:
        """Learning-rate rule: every layer uses KID from ``step``; a new phase (and window) starts."""
        logger.info("HyLo hybrid: step %d learning rate %.3g (phase started at %.3g) -> kid", step, lr,
                    self.lr_reference)
        self._switch({name: KID for name in self.layers}, step, "lr")
        self.lr_changes.append({"step": step, "lr": lr, "previous_lr": self.lr_reference})
        self.lr_reference = lr
        self.previous_sums = None
        self.window_sums.zero_()
        self.window_steps = 0

    def decide(self, sums: torch.Tensor, next_step: int) -> None:
        """Gradient-norm rule: given the closing window's per-layer norm sums, choose the next window's modes."""
        if self.scope == "global":
            sums = sums.sum().reshape(1).expand(len(self.layers)).clone()
        sums = sums.detach().to(torch.float64).cpu()
        values = sums.tolist()
        if self.previous_sums is None:
            changes: list[Optional[float]] = [None] * len(self.layers)
            critical = [True] * len(self.layers)
        else:
            changes = [relative_change(new, old) for new, old in zip(values, self.previous_sums.tolist())]
            critical = [not (c < self.threshold) for c in changes]  # NaN counts as critical
        modes = {name: KID if critical[i] else KIS for name, i in self._index.items()}
        self._switch(modes, next_step, "norm")
        self._record(next_step, values, changes, critical)
        self.previous_sums = sums

    def _switch(self, modes: dict[str, str], step: int, reason: str) -> None:
        changed = [name for name in self.layers if modes[name] != self.current[name]]
        if changed:
            if self.scope == "global":
                events = [SwitchEvent(step, ALL_LAYERS, modes[changed[0]])]
            else:
                events = [SwitchEvent(step, name, modes[name]) for name in changed]
            self._history.extend(events)
            self._history_reasons.extend([reason] * len(events))
            for name in changed:
                logger.info("HyLo hybrid: step %d layer %s -> %s (%s)", step, name, modes[name], reason)
        self.current = dict(modes)

    def _record(self, next_step: int, sums: list[float], changes: list[Optional[float]], critical: list[bool]) -> None:
        keys = [ALL_LAYERS] if self.scope == "global" else self.layers
        picks = [0] if self.scope == "global" else range(len(self.layers))
        self.decisions.append({
            "window": self.windows_closed,
            "start": self.window_start,
            "end": next_step,
            "phase_first": changes[0] is None,
            "sums": {k: sums[i] for k, i in zip(keys, picks)},
            "change": {k: changes[i] for k, i in zip(keys, picks)},
            "critical": {k: critical[i] for k, i in zip(keys, picks)},
            "next_modes": {k: self.current[self.layers[i]] for k, i in zip(keys, picks)},
        })
        del self.decisions[:-MAX_DECISION_RECORDS]
        self.windows_closed += 1

    # ---------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """Committed state only (what ``observe`` saw for an uncommitted step is not saved)."""
        return {
            **super().state_dict(),
            "scope": self.scope,
            "layers": list(self.layers),
            "current": dict(self.current),
            "window_sums": self.window_sums.detach().cpu().clone(),
            "window_steps": self.window_steps,
            "window_start": self.window_start,
            "windows_closed": self.windows_closed,
            "previous_sums": None if self.previous_sums is None else self.previous_sums.detach().cpu().clone(),
            "lr_reference": self.lr_reference,
            "history": [[*event, reason] for event, reason in zip(self._history, self._history_reasons)],
            "decisions": [dict(d) for d in self.decisions],
            "lr_changes": [dict(c) for c in self.lr_changes],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if set(state["current"]) != set(self.layers):
            raise ValueError("saved hybrid-policy state names different layers than this model")
        saved_scope = state.get("scope", self.scope)
        if saved_scope != self.scope:
            raise ValueError(f"saved hybrid-policy state uses switch_scope={saved_scope!r}, this optimizer "
                             f"uses switch_scope={self.scope!r}")
        saved_layers = list(state.get("layers", self.layers))
        order = torch.tensor([saved_layers.index(name) for name in self.layers], device=torch.device("cpu"))

        def per_layer(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.detach().to(torch.float64).cpu()[order].clone()

        self.current = {name: str(state["current"][name]) for name in self.layers}
        self.window_sums = per_layer(state["window_sums"])
        self.previous_sums = per_layer(state["previous_sums"])
        self.window_steps = int(state.get("window_steps", 0))
        self.window_start = int(state.get("window_start", 0))
        self.windows_closed = int(state.get("windows_closed", 0))
        lr_reference = state.get("lr_reference")
        self.lr_reference = None if lr_reference is None else float(lr_reference)
        self._history = [SwitchEvent(int(e[0]), str(e[1]), str(e[2])) for e in state["history"]]
        self._history_reasons = [str(e[3]) if len(e) > 3 else ("start" if i == 0 else "norm")
                                 for i, e in enumerate(state["history"])]
        self.decisions = [dict(d) for d in state.get("decisions", [])]
        self.lr_changes = [dict(c) for c in state.get("lr_changes", [])]
        self.discard_step()


def build_policy(config: HyLoConfig, layers: list[str]) -> ModePolicy:
    """The policy for ``config.mode`` over the named layers."""
    if config.mode != "hybrid":
        return ModePolicy(config.mode)
    if config.kid_schedule is not None:
        return ScheduledPolicy([tuple(r) for r in config.kid_schedule])
    return AccordionPolicy(layers, config.switch_window, config.switch_threshold, config.switch_scope)
