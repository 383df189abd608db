"""The HyLo preconditioner: the orchestrator of capture -> reduce -> exchange -> invert -> apply.

It owns the layer hooks, the stored factors (A_S, G_S, C) per layer, the refresh schedule and the
timers; the per-mode math lives in ``reduce.py``, the collectives in ``exchange.py``, the tensor
math in ``kernels.py``. It modifies gradients in place and knows nothing about learning rates
beyond what KL-clipping needs; the base update lives in ``optimizer.py``.

Refreshes are two-phase so that a step that is later skipped (fp16 overflow in DeepSpeed) leaves
the state untouched: ``precondition()`` computes and uses new factors as *pending*, and only
``commit()`` (called from the optimizer's ``step``) makes them current and advances the step.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable, Optional, Sequence

import torch
from torch import nn

from . import fisher, kernels
from .base_update import make_grafting
from .capture import GradAccessor, LayerCapture, no_capture, private_backward
from .config import HyLoConfig
from .exchange import (
    Exchange, GatheredRows, agree_rows, assign_owners, contributors, default_exchange, gather_rows, share_inverses,
)
from .layers import LayerAdapter, adapter_for, fallback_reason, param_grad, unreachable_layers
from . import reduce as reduce_module
from .reduce import KIS, REDUCTIONS, row_budget
from .sampling import KISReservoir
from .switching import ModePolicy, build_policy
from .timers import PhaseTimers

logger = logging.getLogger("ds_hylo")

_RANK_SEED_STRIDE = 7919


@dataclass
class LayerFactors:
    """What (*) needs for one layer: rows a (s, d_in) (id rows (s, 1) int64 for an Embedding), g (s, d_out),
    c (s, s) float64, the damping
    used, and the cancellation factor of (*) on these factors (``kernels.smw_amplification``),
    which decides the dtype of the per-step products (``work_dtype``)."""

    a: torch.Tensor
    g: torch.Tensor
    c: torch.Tensor
    damping: float
    mode: str
    amplification: float = 1.0
    work_dtype: torch.dtype = torch.float64
    # a and g in work_dtype, made once at the first apply instead of at every step
    _work: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default=None, repr=False, compare=False)

    def work_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a (s, d_in), g (s, d_out) in ``work_dtype``, C (s, s) float64), converted once per refresh.

        C stays float64: the s-dimensional coefficient C (U_S^T grad) costs s^2 per step against the
        2 s d_out d_in of the two products, and in float32 it would add its own error to the step's.
        """
        if self._work is None:
            dtype = self.work_dtype
            self._work = (kernels.rows_to(self.a, dtype), self.g.to(dtype), self.c)  # ids stay int64
        return self._work


def apply_dtype(precision: str, amplification: float, rows_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the per-step products of (*) for one layer (``HyLoConfig.apply_precision``).

    float32 (float64 for float64 rows, i.e. a float64 model) unless ``precision`` is "float64",
    or "auto" finds the cancellation factor above ``kernels.FLOAT32_APPLY_MAX_AMPLIFICATION``.
    """
    if precision == "float64" or rows_dtype == torch.float64:
        return torch.float64
    if precision == "auto" and not amplification <= kernels.FLOAT32_APPLY_MAX_AMPLIFICATION:
        return torch.float64
    return torch.float32


class Preconditioner:
    """Layer-wise HyLo preconditioner for one model.

    Args:
        model: the module whose Linear/Conv2d layers are preconditioned.
        config: HyLoConfig.
        comm: collectives (an ``Exchange``); defaults to the default process group when one with
            >1 rank is initialised at the first refresh, otherwise a single-process no-op.
        owned_params: the parameters of the optimizer's param groups (None: every parameter).
            Only layers whose parameters are all owned are preconditioned: HyLo never rewrites a
            gradient another optimizer steps on. ``add_owned`` takes parameters added later.

    Frozen layers (``requires_grad=False``) are followed at every step: one frozen when HyLo is
    built is *dormant* (no hook, no rows: a LoRA base layer costs nothing) and is hooked once its
    weight and bias train, preconditioned from its first refresh; a preconditioned layer frozen
    again is neither captured nor preconditioned while it stays frozen; a layer with only one of
    weight and bias trainable keeps its plain gradient, warned once (``inactive_layers``).

    A layer whose parameter is shared with another module (two Linear layers sharing a weight,
    an LM head tied to the token embedding) keeps its plain gradient, with a one-time warning
    naming it: its per-sample rows would come from one use only.

    Streamed KIS: on a refresh step whose mode for a layer is KIS (``policy.planned_mode``, asked at
    the layer's first captured pass with the learning rate ``lr_source()`` then gives), the layer
    draws its KIS rows as each pass's output gradient arrives and holds only those
    (``ds_hylo.sampling``), seeded as the refresh-time draw is. ``stream_kis = False`` stores every
    row and draws at the refresh instead (the reference the benchmarks and tests compare with).
    """

    def __init__(
        self,
        model: nn.Module,
        config: HyLoConfig,
        comm: Optional[Exchange] = None,
        owned_params: Optional[Iterable[torch.Tensor]] = None,
    ) -> None:
        self.config = config
        self._comm = comm
        self.model = model
        self.layers: dict[str, LayerCapture] = {}
        # every layer HyLo can precondition whenever its weight and bias both train, in model order:
        # name -> adapter. Those frozen when HyLo was built are *dormant* (no hook, no rows) until
        # unfrozen (``_sync_trainable``); then they join ``layers``.
        self._candidates: dict[str, LayerAdapter] = {}
        # layers of ``layers`` not captured or preconditioned now: name -> why (frozen, half frozen)
        self.inactive_layers: dict[str, str] = {}
        self._warned_partial: set[str] = set()
        self._owned: Optional[set[int]] = None if owned_params is None else {id(p) for p in owned_params}
        self._resolve_layers(initial=True)
        if not self.layers and not self._candidates:
            raise ValueError(
                "the model has no Linear or Conv2d layer that HyLo can precondition among the optimizer's "
                f"parameters (fallback: {self.fallback_layers or 'none'}; skipped: {self.skipped_layers or 'none'})"
            )
        if not self.layers:
            raise ValueError(
                "HyLo: every Linear or Conv2d layer it could precondition is frozen (requires_grad=False) "
                f"now: {list(self._candidates)}. Build HyLo once at least one of them trains"
            )
        logger.info(
            "HyLo preconditions %d layers (%s); first-order fallback (plain gradient) for %d: %s; "
            "skipped by skip_layers: %s; frozen now (preconditioned once unfrozen): %d",
            len(self.layers),
            _count_kinds(layer.adapter.kind for layer in self.layers.values()),
            len(self.fallback_layers),
            _fallback_summary(self.fallback_layers, self.fallback_reasons) or "none",
            self.skipped_layers or "none",
            len(self.dormant_layers),
        )
        self.policy: ModePolicy = build_policy(config, list(self.layers))
        self.factors: dict[str, LayerFactors] = {}
        self.steps = 0
        self.timers = PhaseTimers()
        self.nonfinite_events = 0
        self.ill_conditioned_events = 0
        self._warned_float64_apply = False
        self._side_stream: Optional[Any] = None  # torch.cuda.Stream of delayed refreshes, made on first use
        self.refreshes = 0
        self.contributed_refreshes = 0  # committed refreshes that used this rank's rows (contributing_ranks)
        self._pending_contributed = False
        self.last_kl_scale = 1.0
        self._pending: Optional[dict[str, LayerFactors]] = None
        self._awaiting_commit = False
        self._grads_are_local = False
        self._fisher_calls = 0
        # precondition_layer's per-step statistics, read once by finish_layerwise_step
        self._layerwise_flags: list[tuple[str, torch.Tensor]] = []
        self._layerwise_squares: dict[str, torch.Tensor] = {}
        self._warned_unrefreshed: set[str] = set()
        # True while sample_fisher's private backward runs (integrations refuse to react to it).
        self.fisher_backward_active = False
        self.grafting = make_grafting(config)
        # Streamed KIS (see the class docstring): the learning rate a planned refresh will see.
        self.lr_source: Optional[Callable[[], float]] = None
        self.stream_kis = True
        self._warned_sampled_mode: set[str] = set()
        self._assign_row_plans()
        self._sync_trainable()
        self._set_capture(self._is_refresh_step(self.steps))

    # ---------------------------------------------------------------- layers
    def _resolve_layers(self, initial: bool = False) -> list[str]:
        """Sort every module of the model by what HyLo does with it, against the owned parameters.

        Rebuilds ``fallback_layers`` / ``fallback_reasons``, ``skipped_layers``, ``unowned_layers`` and
        the candidates (layers HyLo preconditions whenever their weight and bias both train). A
        module whose parameters are all frozen is a candidate when HyLo owns them (``HyLo(model)``
        owns every model parameter, as ``torch.optim.AdamW(model.parameters())`` does): it gets no
        hook and no rows while frozen (a LoRA base layer costs nothing) and is preconditioned once
        unfrozen. Otherwise a frozen module is passed over silently. On the first call the hooks of
        the candidates that train now are installed; later calls (``add_param_group``) leave
        activation to ``_sync_trainable``.

        Returns:
            The names of candidates that were not candidates before this call, in model order.
        """
        config, owned, model = self.config, self._owned, self.model
        users = _parameter_users(model)
        unreachable = unreachable_layers(model)
        candidates: dict[str, LayerAdapter] = {}
        fallback: list[str] = []
        reasons: dict[str, str] = {}
        skipped: list[str] = []
        unowned: list[str] = []
        shared: list[str] = []
        for name, module in model.named_modules():
            params = list(module.parameters(recurse=False))
            trainable = [p for p in params if p.requires_grad]
            considered = trainable or params  # frozen modules are judged by all their parameters
            if not considered:
                continue  # a container: no hooks, no rows
            owned_here = [owned is None or id(p) in owned for p in considered]
            adapter = None if id(module) in unreachable else adapter_for(module)
            if not any(owned_here):
                if trainable:
                    unowned.append(name)  # another optimizer's layer: not ours to touch
            elif any(fnmatch.fnmatchcase(name, pattern) for pattern in config.skip_layers):
                if trainable:
                    skipped.append(name)
            elif not all(owned_here):
                if trainable:
                    fallback.append(f"{name} ({type(module).__name__}, parameters partly in other optimizers)")
                    reasons[name] = "parameters partly in other optimizers"
            elif any(len(users[id(p)]) > 1 for p in considered):
                if trainable:
                    others = sorted({u for p in considered for u in users[id(p)]} - {name})
                    fallback.append(f"{name} ({type(module).__name__}, shares parameters with {others})")
                    reasons[name] = (
                        f"a parameter shared with {others} (tied weights): its rows would come from one use "
                        "only, so neither module is preconditioned"
                    )
                    if adapter is not None or _shares_with_adapted(module, users, model):
                        shared.append(f"{name} (shared with {others})")
            elif adapter is not None and _coverage_problem(adapter, trainable, owned) is None:
                candidates[name] = adapter
                if _trainability(adapter) == "partial":
                    fallback.append(f"{name} ({type(module).__name__})")
                    reasons[name] = PARTLY_FROZEN
            elif trainable:
                fallback.append(f"{name} ({type(module).__name__})")
                if id(module) in unreachable:
                    reasons[name] = unreachable[id(module)]
                elif adapter is not None:
                    reasons[name] = _coverage_problem(adapter, trainable, owned)
                else:
                    reasons[name] = fallback_reason(module)
        if shared:
            warnings.warn(
                "HyLo: these layers share a parameter with another module and keep their plain gradient "
                f"(first-order fallback): {shared}",
                UserWarning,
                stacklevel=4,
            )
        new = [name for name in candidates if name not in self._candidates]
        for name in self.layers:  # a layer once preconditioned stays known
            candidates.setdefault(name, self.layers[name].adapter)
        self._candidates = candidates
        self.fallback_layers, self.fallback_reasons = fallback, reasons
        self.skipped_layers, self.unowned_layers = skipped, unowned
        if initial:
            for name, adapter in candidates.items():
                state = _trainability(adapter)
                if state == "train":
                    self.layers[name] = self._new_capture(name, adapter)
                elif state == "partial":
                    self._warned_partial.add(name)  # reported in fallback_reasons and the log line
        return new

    def _new_capture(self, name: str, adapter: LayerAdapter) -> LayerCapture:
        config = self.config
        return LayerCapture(
            name, adapter.module, config.sequence_convention, keep_outputs=config.fisher == "sampled",
            max_rows=_max_rows(adapter, config.max_captured_mib), adapter=adapter,
        )

    def _assign_row_plans(self) -> None:
        for index, (name, layer) in enumerate(self.layers.items()):
            layer.row_plan = self._row_plan(index, name)

    @property
    def dormant_layers(self) -> list[str]:
        """Layers HyLo will precondition once their parameters train: frozen since HyLo was built
        (they hold no hook and no rows meanwhile, e.g. LoRA base layers)."""
        return [name for name in self._candidates if name not in self.layers]

    def _activate(self, names: list[str]) -> None:
        """Hook dormant layers (their capture starts at the next refresh step; until their first
        refresh they keep their plain gradient). ``layers`` stays in model order."""
        for name in names:
            self.layers[name] = self._new_capture(name, self._candidates[name])
        order = [name for name in self._candidates if name in self.layers]
        order += [name for name in self.layers if name not in self._candidates]
        self.layers = {name: self.layers[name] for name in order}
        self.policy.add_layers(names)
        self._assign_row_plans()
        logger.info("HyLo: layers %s now train and are preconditioned from their first refresh", names)

    def _sync_trainable(self) -> None:
        """Follow ``requires_grad`` (progressive unfreezing): dormant layers whose weight and bias now
        train are hooked; preconditioned layers that are frozen, or half frozen, now are neither
        captured nor preconditioned (``inactive_layers``). A half-frozen layer is warned once.
        Attribute reads only (no device work); every rank changes ``layers`` at the same step."""
        activate = []
        for name, adapter in self._candidates.items():
            state = _trainability(adapter)
            if name in self.layers:
                if state == "train":
                    if self.inactive_layers.pop(name, None) is not None:
                        self.layers[name].seen_while_disabled = False  # it ran frozen, not off-schedule
                else:
                    self.inactive_layers[name] = "frozen" if state == "frozen" else PARTLY_FROZEN
            elif state == "train":
                activate.append(name)
            if state == "partial" and name not in self._warned_partial:
                self._warned_partial.add(name)
                trains = [n for n, p in adapter.module.named_parameters(recurse=False) if p.requires_grad]
                warnings.warn(
                    f"HyLo: layer {name!r} has {trains} trainable and the rest of [weight | bias] frozen: "
                    "HyLo's kernel covers weight and bias as one block, so the layer gets its plain gradient "
                    "(first-order) while this lasts. Freeze or unfreeze its weight and bias together.",
                    UserWarning,
                    stacklevel=4,
                )
        if activate:
            self._activate(activate)

    def add_owned(self, params: Iterable[torch.Tensor]) -> tuple[list[str], dict[str, str]]:
        """Take parameters added to the optimizer after it was built (``add_param_group``).

        Layers whose parameters are now all owned are preconditioned like the others (hooked now,
        preconditioned from their first refresh; frozen ones once they train).

        Returns:
            (names of the layers newly preconditioned, {parameter name: why it gets the plain
            base step} for the added parameters that are not part of such a layer).
        """
        params = list(params)
        if self._owned is not None:
            self._owned.update(id(p) for p in params)
        new = self._resolve_layers()
        self._sync_trainable()
        if self._is_refresh_step(self.steps) and self._awaiting_commit is False:
            for name in new:
                if name in self.layers:
                    self.layers[name].enabled = True
        covered = {id(p) for name in self._candidates for p in self._candidates[name].params()}
        names = {id(p): n for n, p in self.model.named_parameters(remove_duplicate=False)}
        plain: dict[str, str] = {}
        for param in params:
            if id(param) in covered:
                continue
            pname = names.get(id(param))
            if pname is None:
                plain[f"<parameter of shape {tuple(param.shape)}>"] = "not a parameter of the model HyLo was built on"
                continue
            module_name = pname.rpartition(".")[0]
            if module_name in self.skipped_layers:
                why = "its layer is listed in skip_layers"
            else:
                why = self.fallback_reasons.get(module_name, "its layer kind has no HyLo kernel")
            plain[pname] = why
        return [name for name in new if name in self.layers], plain

    # ------------------------------------------------------------- schedule
    @property
    def comm(self) -> Exchange:
        if self._comm is None:
            self._comm = default_exchange()
        return self._comm

    @property
    def _device(self) -> torch.device:
        """The device of the first preconditioned layer (where the timed work runs)."""
        return next(iter(self.layers.values())).module.weight.device

    def _is_refresh_step(self, step: int) -> bool:
        return step % self.config.update_freq == 0

    def _set_capture(self, enabled: bool) -> None:
        self._fisher_calls = 0
        for layer in self.layers.values():
            layer.enabled = enabled  # a frozen layer's hook captures nothing (LayerCapture)
            if not enabled:
                layer.clear()

    def damping(self) -> float:
        """Damping lambda for the current step."""
        return self.config.damping_at(self.steps)

    def modes(self) -> dict[str, str]:
        """Mode each layer used at its last refresh (or will use at the first one)."""
        return {name: (self.factors[name].mode if name in self.factors else self.policy.mode_for(name, self.steps))
                for name in self.layers}

    # ---------------------------------------------------------- sampled Fisher
    def sample_fisher(self, logits: torch.Tensor, mask: Optional[torch.Tensor] = None) -> bool:
        """Capture output gradients at labels sampled from ``logits`` (``fisher="sampled"``).

        Call after each forward pass and before its backward; off refresh steps it returns at once.
        Runs one backward from the sampled-label loss to the layer outputs only: no parameter
        gradient is touched (DeepSpeed's and DDP's gradient hooks do not fire), and hooks on
        ``logits`` itself (DeepSpeed's engine output hooks) are suspended meanwhile.

        Args:
            logits: (..., C) model output with its graph.
            mask: optional bool (...) marking the rows that count (e.g. non-padding tokens).

        Returns:
            Whether curvature rows were captured: True on refresh steps with ``fisher="sampled"``;
            False otherwise (with ``fisher="empirical"`` it does nothing, so a training loop can
            always call it and let the config choose).
        """
        if self.config.fisher != "sampled":
            return False
        pending = [(layer, slot, out) for layer in self.layers.values() for slot, out in layer.awaiting_output_grads()]
        if not pending:
            return False
        with self.timers.phase("fisher", logits.device):
            generator = torch.Generator(device=logits.device)
            generator.manual_seed(self._fisher_seed())
            self._fisher_calls += 1
            loss = fisher.sampled_label_loss(logits, generator, mask)
            self.fisher_backward_active = True
            try:
                with torch.enable_grad(), fisher.tensor_hooks_suspended(logits), private_backward():
                    grads = torch.autograd.grad(
                        loss, [out for _, _, out in pending], retain_graph=True, allow_unused=True
                    )
            finally:
                self.fisher_backward_active = False
            for (layer, slot, _), grad in zip(pending, grads):
                layer.set_output_grad(slot, grad)
        return True

    def _fisher_seed(self) -> int:
        """Deterministic in (seed, rank, step, call): resuming from a checkpoint draws the same labels."""
        key = (self.config.seed, self.comm.rank, self.steps, self._fisher_calls)
        return (key[0] * 1_000_003 + key[1] * _RANK_SEED_STRIDE + key[2] * 104_729 + key[3] * 31) % (2**62)

    def _check_sampled_fisher_called(self) -> None:
        if self.config.fisher != "sampled" or not self._is_refresh_step(self.steps):
            return
        layers = self.layers.values()
        lost = [layer.name for layer in layers if layer.recompute_not_captured]
        if lost:
            raise RuntimeError(
                f"HyLo fisher='sampled' cannot capture layers {lost}: they run inside reentrant activation "
                "checkpointing (torch.utils.checkpoint(use_reentrant=True)), whose forward pass has no graph "
                "for the sampled-label backward. Use use_reentrant=False (e.g. "
                "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})) "
                "or fisher='empirical'"
            )
        if any(layer.awaiting_output_grads() for layer in layers) and not any(layer.has_data() for layer in layers):
            raise RuntimeError(
                "HyLo fisher='sampled': this is a curvature refresh step and sample_fisher(logits) was not "
                "called after the forward pass (call it before backward on every step; it is free off "
                "refresh steps), or set fisher='empirical'"
            )

    # -------------------------------------------------------------- precondition
    @torch.no_grad()
    def precondition(
        self,
        lr: float,
        grad_scale: float = 1.0,
        grads_are_local: bool = False,
        grad_of: Optional[GradAccessor] = None,
    ) -> None:
        """Replace each preconditioned layer's gradient by the HyLo update direction, in place.

        Args:
            lr: learning rate, used only by KL-clipping.
            grad_scale: factor that turns the stored gradients and captured output gradients
                into true ones (e.g. 1 / fp16 loss scale).
            grad_of: where a parameter's full-shape gradient lives (default ``param.grad``).
            grads_are_local: the gradients are this rank's, not yet averaged (DeepSpeed ZeRO
                path); statistics that are not linear in the gradient are then averaged over ranks.

        On a refresh step every rank takes part in the refresh's collectives, whether or not it
        captured rows (a rank with an empty batch, a layer unused on this rank).

        With ``delayed_refresh`` the step applies the current factors first and only then
        builds the new ones (used from the next step on); on CUDA that work goes to a side
        stream, which the next apply waits for, so it overlaps what the device does after the
        apply (the base update, DeepSpeed's reduction). The refresh's host reads (row table,
        row counts, finiteness) still wait for it.
        """
        damping, refresh = self._begin_step(lr)
        if self.config.delayed_refresh:
            self._wait_for_side_stream()
            self._apply(dict(self.factors), lr, grad_scale, grads_are_local, grad_of)
            refreshed = self._refresh_on_side_stream(damping, grad_scale) if refresh else {}
        else:
            refreshed = self._refresh(damping, grad_scale) if refresh else {}
        self._hold_for_commit(refreshed)
        if not self.config.delayed_refresh:
            self._apply({**self.factors, **refreshed}, lr, grad_scale, grads_are_local, grad_of)

    # ----------------------------------------------- one step's lifecycle (every integration)
    # begin (_begin_step) -> apply (precondition / precondition_layer) -> refresh -> hold
    # (_hold_for_commit) -> commit() from step(), or discard at the next begin if step() never ran.
    def _begin_step(self, lr: float) -> tuple[float, bool]:
        """Start the step's preconditioning: forget an uncommitted step, follow freezing, check the
        sampled Fisher was drawn, feed the lr to the policy. Returns (damping, whether to refresh)."""
        self._discard_pending()
        self._sync_trainable()
        self._check_sampled_fisher_called()
        self.policy.observe_lr(lr)
        refresh = self._is_refresh_step(self.steps)
        if refresh:
            self._warn_unrefreshed_layers()
        return self.damping(), refresh

    def _hold_for_commit(self, refreshed: dict[str, LayerFactors]) -> None:
        """Drop the captured rows and keep the new factors pending until ``commit`` (two-phase)."""
        for layer in self.layers.values():
            layer.clear()
        self._pending = refreshed
        self._awaiting_commit = True

    # ------------------------------------------- layer by layer (gradients reduced during backward)
    def precondition_layer(self, name: str, grad_of: Optional[GradAccessor] = None) -> None:
        """Write (*) into one layer's local gradient in place, with the committed factors; no host read.

        For integrations that reduce gradients layer by layer during backward (DeepSpeed ZeRO-2,
        docs/design.md section 3.5): called once a layer's weight and bias gradients of the current
        micro-batch are complete, before they are reduced. (*) is linear in the gradient, so
        preconditioning each micro-batch's local gradient equals preconditioning their reduced sum.
        Only the delayed refresh fits here (the factors must exist before the backward that uses
        them); ``finish_layerwise_step`` then does the rest of ``precondition`` at the boundary.
        A non-finite direction leaves the layer's raw gradient (decided on the device); the step's
        one host read in ``finish_layerwise_step`` counts it.
        """
        if name in self.inactive_layers:
            return
        layer = self.layers[name]
        grad = layer.gradient_matrix(grad_of)
        if grad is None:
            return
        if self.policy.needs_grad_norms:  # summed over micro-batches: sqrt of the sum of squares
            square = grad.float().pow(2).sum()
            held = self._layerwise_squares.get(name)
            self._layerwise_squares[name] = square if held is None else held + square
        f = self.factors.get(name)
        if f is None:
            return
        self._wait_for_side_stream()
        flags, _ = self._write_direction(layer, f, grad, grad_of)
        self._layerwise_flags.append((name, flags))

    @torch.no_grad()
    def finish_layerwise_step(self, lr: float, grad_scale: float = 1.0) -> None:
        """``precondition``'s work besides the apply, after a backward whose layers went through
        ``precondition_layer``: the step's one host read (non-finite directions, the hybrid
        policy's gradient norms), then the delayed refresh from this step's rows (pending until
        ``commit``). Raises ValueError unless the delayed refresh is on."""
        if not self.config.delayed_refresh:
            raise ValueError(
                "HyLo: preconditioning layer by layer during backward needs delayed_refresh=True (a refresh's "
                "factors used from the next step on); this optimizer has delayed_refresh="
                f"{self.config.delayed_refresh!r}"
            )
        damping, refresh = self._begin_step(lr)
        self._grads_are_local = True
        flags, squares = self._layerwise_flags, self._layerwise_squares
        self._layerwise_flags, self._layerwise_squares = [], {}
        if squares:
            home = next(iter(squares.values())).device
            norms = torch.stack([square.to(home) for square in squares.values()]).sqrt()
            self.policy.observe_norms(list(squares), norms * grad_scale)
        if flags:
            home = flags[0][1].device
            host = torch.stack([flag.to(home) for _, flag in flags]).tolist()  # the step's one host read
            self._note_nonfinite_directions([name for name, _ in flags], host)
        self._hold_for_commit(self._refresh_on_side_stream(damping, grad_scale) if refresh else {})

    def _refresh_on_side_stream(self, damping: float, grad_scale: float) -> dict[str, LayerFactors]:
        """``_refresh`` on a side CUDA stream where the layers live on CUDA (inline elsewhere)."""
        device = self._device
        if device.type != "cuda":
            return self._refresh(damping, grad_scale)
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device=device)
        self._side_stream.wait_stream(torch.cuda.current_stream(device))  # the captured rows are ready
        with torch.cuda.stream(self._side_stream):
            return self._refresh(damping, grad_scale)

    def _wait_for_side_stream(self) -> None:
        """Order the current stream after the last refresh's side-stream work (no host wait)."""
        if self._side_stream is not None:
            torch.cuda.current_stream(self._side_stream.device).wait_stream(self._side_stream)

    def commit(self) -> None:
        """Make the pending refresh current and advance one step; a no-op without a precondition()."""
        if not self._awaiting_commit:
            return
        if self._pending:
            self.factors.update(self._pending)
            self.refreshes += 1
        self._pending = None
        self._awaiting_commit = False
        self.contributed_refreshes += int(self._pending_contributed)
        self._pending_contributed = False
        if self.grafting is not None:
            self.grafting.commit()
        self.policy.end_step(self.steps, self.comm.all_reduce_mean if self._grads_are_local else None)
        self.steps += 1
        self._sync_trainable()
        self._set_capture(self._is_refresh_step(self.steps))

    def _discard_pending(self) -> None:
        """Forget a precondition() whose step never happened (e.g. skipped for fp16 overflow)."""
        if self._pending is not None:
            self.policy.discard_step()
        self._pending = None
        self._awaiting_commit = False
        self._pending_contributed = False
        if self.grafting is not None:
            self.grafting.discard()

    def discard_captured(self) -> None:
        """Drop the rows of passes whose backward ran but never reached ``step()`` (``zero_grad``
        after a skipped batch): they must not leak into the next refresh. Passes still awaiting
        their backward (``zero_grad`` between forward and backward) keep their rows."""
        for layer in self.layers.values():
            layer.drop_completed()
        if not any(layer.held_rows for layer in self.layers.values()):
            self._fisher_calls = 0  # nothing left: the next pass draws as if the skipped one never ran

    def no_capture(self) -> ContextManager[None]:
        """Context manager: forward and backward passes inside it capture no rows (extra passes)."""
        return no_capture()

    def _warn_unrefreshed_layers(self) -> None:
        """Warn once per layer that ran only while capture was off: it is never preconditioned."""
        for name, layer in self.layers.items():
            if (layer.seen_while_disabled and not layer.has_data() and name not in self.factors
                    and name not in self.inactive_layers):
                if name not in self._warned_unrefreshed:
                    self._warned_unrefreshed.add(name)
                    warnings.warn(
                        f"HyLo: layer {name!r} runs only on steps that are not curvature refresh steps "
                        f"(every {self.config.update_freq} steps), so it is never preconditioned and keeps "
                        "its plain gradient",
                        UserWarning,
                        stacklevel=4,
                    )

    # ---------------------------------------------------------------- refresh
    def _kis_seed(self, layer_index: int, rank: Optional[int] = None) -> int:
        """Deterministic in (seed, rank, step, layer): draws never depend on device or history."""
        key = (self.config.seed, self.comm.rank if rank is None else rank, self.steps, layer_index)
        return (key[0] * 1_000_003 + key[1] * _RANK_SEED_STRIDE + key[2] * 104_729 + key[3] * 7_561 + 17) % (2**62)

    def _row_plan(self, index: int, name: str) -> Callable[[LayerCapture], Optional[KISReservoir]]:
        """The layer's ``row_plan``: at its first captured pass of a refresh step, a reservoir when
        that refresh will reduce it by KIS (its rows are then drawn as they come), else None."""

        def plan(layer: LayerCapture) -> Optional[KISReservoir]:
            if not self.stream_kis:
                return None
            lr = self.lr_source() if self.lr_source is not None else None
            if self.policy.planned_mode(name, self.steps, lr) != "kis":
                return None
            # the collectives' world as the refresh will see it, without fixing self.comm before the
            # first refresh (a process group may still be initialised before it)
            comm = self._comm if self._comm is not None else default_exchange()
            cfg, world = self.config, comm.world_size

            def capacity(rows: int) -> int:
                return row_budget("kis", rows, cfg.rank_ratio, world, cfg.max_global_samples)

            return KISReservoir(self._kis_seed(index, comm.rank), capacity, name)

        return plan

    def _warn_sampled_mode(self, name: str, mode: str) -> None:
        if name in self._warned_sampled_mode:
            return
        self._warned_sampled_mode.add(name)
        warnings.warn(
            f"HyLo: layer {name!r} drew its KIS rows while they were captured, but this refresh uses "
            f"{mode!r} (the hybrid policy switched after the step's first forward pass, e.g. the learning "
            f"rate changed between forward and step()); {mode!r} runs on the drawn rows this once. Set the "
            "learning rate before the forward pass. Warned once per layer.",
            RuntimeWarning,
            stacklevel=4,
        )

    def _row_scale(self, layer: LayerCapture, grad_scale: float) -> float:
        """Factor turning captured output gradients into per-sample gradients."""
        if self.config.fisher == "sampled":  # already per-sample, and never loss-scaled
            return 1.0
        return (layer.num_rows if self.config.loss_reduction == "mean" else 1.0) * grad_scale

    def _refresh(self, damping: float, grad_scale: float) -> dict[str, LayerFactors]:
        """Capture -> reduce -> agree -> gather -> owners invert -> broadcast C, for every layer
        with rows on some rank. Returns the new factors of the layers that refreshed cleanly."""
        comm = self.comm
        names = list(self.layers)
        modes = {name: self.policy.mode_for(name, self.steps) for name in names}
        sources = contributors(self.steps // self.config.update_freq, comm.world_size, self.config.contributing_ranks)
        contributing = sources is None or comm.rank in sources
        self._pending_contributed = contributing
        captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        presampled: set[str] = set()  # rows drawn by streamed KIS while they were captured
        row_counts, budgets = [], []
        with self.timers.phase("reduce"):
            for name, layer in self.layers.items():
                num_rows = layer.num_rows if contributing else 0
                budget = row_budget(
                    modes[name], num_rows, self.config.rank_ratio, comm.world_size, self.config.max_global_samples
                )
                if num_rows and layer.sampled:
                    if modes[name] != "kis":
                        self._warn_sampled_mode(name, modes[name])
                    budget = min(budget, layer.sampled_rows)
                    presampled.add(name)
                if num_rows:
                    captured[name] = layer.take(self._row_scale(layer, grad_scale))
                row_counts.append(num_rows)
                budgets.append(budget)
        with self.timers.phase("communicate"):
            table = agree_rows(comm, row_counts, budgets)
        if not table.layers:
            return {}
        refreshed = [names[i] for i in table.layers]
        local_rows = []
        with self.timers.phase("reduce", self._device):
            for index, name, global_rows, padded in zip(table.layers, refreshed, table.global_rows, table.padded):
                a, g = captured[name] if name in captured else _empty_rows(self.layers[name])
                if name in presampled and modes[name] == "kis":
                    local_rows.append(KIS.reduce_sampled(a, g, budgets[index], padded))
                    continue
                generator = None
                if modes[name] == "kis":
                    generator = torch.Generator(device=a.device)
                    generator.manual_seed(self._kis_seed(index))
                local_rows.append(REDUCTIONS[modes[name]].reduce(
                    a, g, budgets[index], padded, damping, global_rows, generator
                ))
        with self.timers.phase("communicate", self._device):
            gathered = gather_rows(comm, local_rows, sources)
        sizes = [rows.a.shape[0] for rows in gathered]
        owners = assign_owners([s**3 for s in sizes], comm.world_size)
        inverses: dict[int, torch.Tensor] = {}
        amplifications: dict[int, torch.Tensor] = {}
        with self.timers.phase("invert", self._device):
            # the factorizations' statuses are read once for every owned layer; the few that failed
            # are redone with the jittered retries (one read each)
            statuses: dict[int, list[torch.Tensor]] = {}
            for i, (name, rows) in enumerate(zip(refreshed, gathered)):
                if owners[i] == comm.rank:
                    statuses[i] = []
                    inverses[i], amplifications[i] = self._small_inverse(
                        modes[name], rows, damping, table.global_rows[i], statuses[i]
                    )
            for i in _failed(statuses):
                inverses[i], amplifications[i] = self._small_inverse(
                    modes[refreshed[i]], gathered[i], damping, table.global_rows[i]
                )
        with self.timers.phase("communicate", self._device):
            devices = [rows.a.device for rows in gathered]
            inverses, amplifications = share_inverses(comm, owners, inverses, sizes, devices, amplifications)
        # the refresh's last host read: finiteness and cancellation factor of every layer at once
        home = devices[0]
        checks = _host_floats([
            (torch.isfinite(rows.a).all() & torch.isfinite(rows.g).all() & torch.isfinite(inverses[i]).all()).to(
                device=home, dtype=torch.float64)
            for i, rows in enumerate(gathered)
        ] + [amplifications[i].to(device=home, dtype=torch.float64) for i in range(len(gathered))])
        finite, amplification = checks[: len(gathered)], checks[len(gathered):]
        factors = {}
        for i, (name, rows) in enumerate(zip(refreshed, gathered)):
            if not finite[i] or math.isnan(amplification[i]):
                self._note_nonfinite(name)
                continue
            if not amplification[i] <= kernels.MAX_AMPLIFICATION:
                self._note_ill_conditioned(name, amplification[i])
                continue
            rows_dtype = kernels.rows_dtype(rows.a, rows.g)
            work_dtype = apply_dtype(self.config.apply_precision, amplification[i], rows_dtype)
            if work_dtype == torch.float64 and rows_dtype != torch.float64:
                self._note_float64_apply(name, amplification[i])
            factors[name] = LayerFactors(
                rows.a, rows.g, inverses[i], damping, modes[name], amplification[i], work_dtype
            )
        return factors

    @staticmethod
    def _small_inverse(
        mode: str, rows: GatheredRows, damping: float, global_rows: int,
        deferred: Optional[list[torch.Tensor]] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """C (s, s) and the cancellation factor of (*) with it (0-d), both float64: the s x s solves
        are cheap, and K's dynamic range against lam*s can exceed what float32 resolves (C then
        stops being a contraction and the step can grow). ``deferred``: collect the Cholesky
        statuses instead of reading them (``kernels.cholesky_with_jitter``)."""
        try:
            gram = reduce_module.gram(rows)
            c_mat = REDUCTIONS[mode].inverse(rows, damping, global_rows, gram, deferred)
            return c_mat, kernels.smw_amplification(gram, c_mat)
        except kernels.FactorizationError:
            s = rows.a.shape[0]
            nan = torch.full((s, s), float("nan"), dtype=torch.float64, device=rows.a.device)
            return nan, nan.new_full((), float("nan"))

    def _note_ill_conditioned(self, name: str, amplification: float) -> None:
        """A refresh whose (*) would cancel beyond float64 (a wild step): refused, counted, warned once."""
        self.ill_conditioned_events += 1
        if self.ill_conditioned_events == 1:
            warnings.warn(
                f"HyLo: layer {name!r}: the new factors would shrink the gradient by a factor "
                f"{amplification:.3g} (> {kernels.MAX_AMPLIFICATION:.0e}), beyond what even float64 "
                "evaluates: inputs at a very large scale against the damping. The layer keeps its "
                "previous factors (or its plain gradient). Normalise the layer's inputs or raise "
                "damping. Further events are counted in stats()['ill_conditioned_events'].",
                RuntimeWarning,
                stacklevel=3,
            )

    def _note_float64_apply(self, name: str, amplification: float) -> None:
        """apply_precision="auto" keeps float64 for a layer whose float32 step would cancel: warned once."""
        if self._warned_float64_apply:
            return
        self._warned_float64_apply = True
        warnings.warn(
            f"HyLo: layer {name!r} applies its preconditioner in float64 (slow on GPUs): its inputs' "
            f"scale against the damping makes the step {amplification:.3g}x smaller than the "
            "gradient, which float32 cannot resolve. Normalised inputs (or a larger damping) keep "
            "it in float32; stats()['apply_dtypes'] lists every layer's dtype. Warned once.",
            UserWarning,
            stacklevel=3,
        )

    def _note_nonfinite(self, name: str) -> None:
        self.nonfinite_events += 1
        if self.nonfinite_events == 1:
            warnings.warn(
                f"HyLo: non-finite values while refreshing layer {name!r}; it keeps its previous factors "
                "(or its plain gradient). Further events are counted in nonfinite_events.",
                RuntimeWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ apply
    def _apply(
        self,
        factors: dict[str, LayerFactors],
        lr: float,
        grad_scale: float,
        grads_are_local: bool,
        grad_of: Optional[GradAccessor],
    ) -> None:
        """Write (*) into every preconditioned gradient. One host read in all (finiteness, KL).

        With ``grads_are_local`` (DeepSpeed: each rank's gradients, before the reduction) the
        per-step statistics travel in one collective laid out over every layer with factors, which
        are the same on every rank: a layer without a gradient on some rank (unused there) sends
        zeros instead of shifting the others, and the non-finite fall-back is one decision for all
        ranks (a rank never keeps its raw gradient while the others precondition).
        """
        self._grads_are_local = grads_are_local
        with self.timers.phase("apply", self._device):
            grads = {name: layer.gradient_matrix(grad_of) for name, layer in self.layers.items()
                     if name not in self.inactive_layers}  # frozen or half-frozen layers: plain gradient
            grads = {name: grad for name, grad in grads.items() if grad is not None}
            home = next(iter(grads.values())).device if grads else self._device
            if self.policy.needs_grad_norms and grads:
                norms = torch.stack([grad.float().norm().to(home) for grad in grads.values()])
                self.policy.observe_norms(list(grads), norms * grad_scale)
            # every layer with factors, in one order: the same on every rank
            layout = [name for name in self.layers if name in factors]
            agree = grads_are_local and self.comm.world_size > 1
            if not layout or not (grads or agree):
                return
            if not agree and self.grafting is None:
                self._apply_layer_by_layer(factors, layout, grads, lr, grad_scale, grad_of, home)
                return
            updates = []
            for name in layout:
                grad = grads.get(name)
                if grad is None:
                    continue
                raw, direction = self._direction(factors[name], grad)
                updates.append((self.layers[name], raw, direction))
            if self.grafting is not None:  # HyLo's direction with the grafted method's per-layer length
                shapes = [(name, (self.layers[name].d_out, self.layers[name].d_in), factors[name].work_dtype)
                          for name in layout]
                grafted = self.grafting.rescale(
                    [(layer.name, raw, direction) for layer, raw, direction in updates],
                    self.comm.all_reduce_mean if grads_are_local else None,
                    layout=shapes,
                    device=home,
                )
                updates = [(layer, raw, direction) for (layer, raw, _), direction in zip(updates, grafted)]
            # per layer of the layout: a sum of the direction (non-finite iff some entry is: inf - inf
            # gives nan, cheaper than isfinite().all()) and, for the KL clip, v . g; zeros where this
            # rank has no gradient
            zero = torch.zeros((), dtype=torch.float64, device=home)
            by_name = {layer.name: (raw, direction) for layer, raw, direction in updates}
            sums = [by_name[n][1].sum().double().to(home) if n in by_name else zero for n in layout]
            terms = []
            if self.config.kl_clip is not None:
                terms = [(by_name[n][1] * by_name[n][0]).sum().double().to(home) if n in by_name else zero
                         for n in layout]
            stats = torch.stack(sums + terms)
            if agree:  # one decision for all ranks; the KL terms as the mean of the ranks' v . g
                stats = self.comm.all_reduce_mean(stats)
            host = stats.tolist()  # the step's one host-device synchronisation
            finite = dict(zip(layout, (math.isfinite(x) for x in host[: len(layout)])))
            for layer, raw, _ in updates:
                if not finite[layer.name] and torch.isfinite(raw).all():  # rare path: a second read is fine
                    self._note_nonfinite(layer.name)
            scale = 1.0
            if self.config.kl_clip is not None:
                vg_sum = sum(t for n, t in zip(layout, host[len(layout):]) if finite[n] and math.isfinite(t))
                scale = self._kl_scale(vg_sum * (grad_scale**2) * lr**2)
            for layer, _, direction in updates:
                if finite[layer.name]:
                    layer.set_gradient_matrix(direction * scale if scale != 1.0 else direction, grad_of)

    def _apply_layer_by_layer(
        self,
        factors: dict[str, LayerFactors],
        layout: list[str],
        grads: dict[str, torch.Tensor],
        lr: float,
        grad_scale: float,
        grad_of: Optional[GradAccessor],
        home: torch.device,
    ) -> None:
        """``_apply`` where no other rank takes part in the decision (the gradients are already the
        reduced ones, or there is one rank) and nothing needs every layer's direction at once (no
        grafting): each layer's direction is written back as soon as it exists, so one layer's
        (d_out, d_in) direction is alive at a time, not every layer's (docs/design.md section 1.8).
        The non-finite fall-back is decided on the device (``torch.where``: the raw gradient where
        the direction is not finite); the flags, and the KL clip's v . g terms, are read once at
        the end, and the KL scale is applied to the written gradients in place."""
        kl = self.config.kl_clip is not None
        flags, terms, written = [], [], []
        for name in layout:
            grad = grads.get(name)
            if grad is None:
                continue
            layer = self.layers[name]
            flag, term = self._write_direction(layer, factors[name], grad, grad_of, kl_term=kl)
            flags.append(flag.to(home))
            if kl:
                terms.append(term.to(home))
            written.append(layer)
        if not flags:
            return
        stats = torch.cat([torch.stack(flags).double().flatten()] + ([torch.stack(terms)] if terms else []))
        host = stats.tolist()  # the step's one host-device synchronisation
        self._note_nonfinite_directions([layer.name for layer in written], list(zip(host[0::2], host[1::2])))
        if kl:
            vg_sum = sum(t for t in host[2 * len(written):] if math.isfinite(t))
            scale = self._kl_scale(vg_sum * (grad_scale**2) * lr**2)
            if scale != 1.0:
                grad_of = grad_of or param_grad
                for index, layer in enumerate(written):
                    if not host[2 * index]:
                        continue  # it kept its raw gradient, which the clip does not scale
                    for param in layer.adapter.params():
                        grad = grad_of(param)
                        if grad is not None:
                            grad.mul_(scale)

    def _write_direction(
        self,
        layer: LayerCapture,
        f: LayerFactors,
        grad: torch.Tensor,
        grad_of: Optional[GradAccessor],
        kl_term: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Write (*) of one layer's (d_out, d_in) gradient back in place, or keep the raw gradient
        where the direction is not finite (decided on the device: no host read). Returns the
        (direction finite, raw finite) flags, shape (2,), and with ``kl_term`` the KL clip's v . g
        (0 where the raw gradient was kept), float64 scalar; the direction is freed on return."""
        raw, direction = self._direction(f, grad)
        finite = torch.isfinite(direction.sum())
        flags = torch.stack([finite, torch.isfinite(raw.sum())])
        term = torch.where(finite, (direction * raw).sum(), 0.0).double() if kl_term else None
        layer.set_gradient_matrix(torch.where(finite, direction, raw), grad_of)
        return flags, term

    def _note_nonfinite_directions(self, names: list[str], host_flags: Sequence[Sequence[float]]) -> None:
        """Count the layers whose direction was not finite though their raw gradient was (read flags)."""
        for name, (direction_finite, raw_finite) in zip(names, host_flags):
            if not direction_finite and raw_finite:
                self._note_nonfinite(name)

    def _direction(self, f: LayerFactors, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the gradient matrix in the factors' work dtype, (*) applied to it), both (d_out, d_in)."""
        raw = grad.to(f.work_dtype)
        step_scale = f.damping if self.config.step_scale == "sgd" else 1.0
        a_work, g_work, c_work = f.work_factors()
        return raw, kernels.apply_smw(raw, a_work, g_work, c_work, f.damping, step_scale, work_dtype=f.work_dtype)

    def _kl_scale(self, vg: float) -> float:
        """K-FAC's KL clip: nu = min(1, sqrt(kl_clip / (lr^2 sum v.g))), from the summed lr^2 v.g."""
        scale = 1.0 if vg <= 0 else min(1.0, (self.config.kl_clip / vg) ** 0.5)
        self.last_kl_scale = scale
        return scale

    # -------------------------------------------------------------- reporting
    def timing_summary(self) -> dict[str, dict[str, float]]:
        summary = self.timers.summary()
        capture = sum(layer.capture_seconds for layer in self.layers.values())
        summary["capture"] = {"seconds": capture, "calls": self.refreshes, "mean_ms": 1e3 * capture / max(1, self.refreshes)}
        return summary

    def bytes_sent(self) -> dict[str, int]:
        return dict(self.comm.bytes_sent)

    # ------------------------------------------------------------ state dict
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly; loadable with torch.load(weights_only=True).

        KIS draws are seeded from (seed, rank, step, layer), so no generator state is needed.
        """
        return {
            "steps": self.steps,
            "refreshes": self.refreshes,
            "nonfinite_events": self.nonfinite_events,
            "ill_conditioned_events": self.ill_conditioned_events,
            "factors": {
                name: {"a": f.a, "g": f.g, "c": f.c, "damping": f.damping, "mode": f.mode,
                       "amplification": f.amplification}
                for name, f in self.factors.items()
            },
            "policy": self.policy.state_dict(),
            **({"graft": self.grafting.state_dict()} if self.grafting is not None else {}),
        }

    def validate_state_dict(self, state: Any) -> None:
        """Raise ValueError naming the problem if ``state`` does not fit this model and config.

        Checks everything ``load_state_dict`` relies on (keys, layer names, factor shapes and
        modes, the mode policy) without changing anything.
        """
        if not isinstance(state, dict):
            raise ValueError(f"HyLo state must be a dict, got {type(state).__name__}")
        missing = sorted({"steps", "refreshes", "nonfinite_events", "factors", "policy"} - set(state))
        if missing:
            raise ValueError(f"HyLo state lacks key(s) {missing}")
        unknown = sorted(set(state["factors"]) - set(self._candidates))
        if unknown:
            raise ValueError(f"HyLo state has factors for layers this model lacks: {unknown}")
        woken = self._dormant_in_state(state)
        layer_names = [name for name in self._candidates if name in self.layers or name in woken]
        shapes = {name: (adapter.d_out, adapter.d_in) for name, adapter in self._candidates.items()
                  if name in layer_names}
        allowed_modes = {"sngd", "kis", "kid"} if self.config.mode == "hybrid" else {self.config.mode}
        for name, f in state["factors"].items():
            layer = self._candidates[name]
            if f.get("mode") not in allowed_modes:
                raise ValueError(
                    f"HyLo state: layer {name!r} was refreshed in mode {f.get('mode')!r}; this optimizer "
                    f"uses mode={self.config.mode!r}"
                )
            s = f["a"].shape[0]
            expected = {"a": (s, layer.row_width), "g": (s, layer.d_out), "c": (s, s)}
            for key, shape in expected.items():
                if tuple(f[key].shape) != shape:
                    rows = ("token-id rows (s, 1)" if layer.index_rows
                            else f"d_in={layer.d_in} including the bias column")
                    raise ValueError(
                        f"HyLo state: layer {name!r} factor {key!r} has shape {tuple(f[key].shape)}, this "
                        f"model needs {shape} ({rows}, d_out={layer.d_out})"
                    )
            if f["a"].is_floating_point() == layer.index_rows:
                allowed = "int64 token ids" if layer.index_rows else "floating-point rows"
                raise ValueError(
                    f"HyLo state: layer {name!r} factor 'a' has dtype {f['a'].dtype}; this {layer.kind} layer "
                    f"needs {allowed}"
                )
        probe = build_policy(self.config, layer_names)
        probe.load_state_dict(state["policy"])
        if self.grafting is not None and "graft" in state:
            self.grafting.validate_state_dict(state["graft"], shapes)

    def _dormant_in_state(self, state: dict[str, Any]) -> list[str]:
        """Dormant layers a checkpoint has state for (preconditioned when it was saved): loading it
        hooks them, so that the policy, factors and grafting state find their layer."""
        named = set(state.get("factors", {}))
        policy = state.get("policy")
        if isinstance(policy, dict) and isinstance(policy.get("current"), dict):
            named |= set(policy["current"])
        graft = state.get("graft")
        if isinstance(graft, dict) and isinstance(graft.get("states"), dict):
            named |= set(graft["states"])
        return [name for name in self.dormant_layers if name in named]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output; validated first, so a bad state changes nothing."""
        self.validate_state_dict(state)
        self._discard_pending()
        woken = self._dormant_in_state(state)
        if woken:
            self._activate(woken)
            self._sync_trainable()  # still frozen here: hooked, but neither captured nor preconditioned
        self.policy.load_state_dict(state["policy"])
        self.steps = int(state["steps"])
        self.refreshes = int(state["refreshes"])
        self.nonfinite_events = int(state["nonfinite_events"])
        self.ill_conditioned_events = int(state.get("ill_conditioned_events", 0))
        device_of = {name: layer.module.weight.device for name, layer in self.layers.items()}
        self.factors = {
            name: self._loaded_factors(f, device_of[name]) for name, f in state["factors"].items()
        }
        if self.grafting is not None and "graft" in state:
            self.grafting.load_state_dict(state["graft"], self._matrix_shapes(), device_of)
        self._set_capture(self._is_refresh_step(self.steps))

    def _loaded_factors(self, f: dict[str, Any], device: torch.device) -> LayerFactors:
        """One layer's factors from ``state_dict()``; checkpoints written before the cancellation
        factor was stored get it recomputed from their rows."""
        a, g, c = f["a"].to(device), f["g"].to(device), f["c"].to(device)
        amplification = f.get("amplification")
        if amplification is None:
            gram = kernels.kernel(kernels.rows_to(a, torch.float64), g.double())
            amplification = kernels.smw_amplification(gram, c.double()).item()
        amplification = float(amplification)
        work_dtype = apply_dtype(self.config.apply_precision, amplification, kernels.rows_dtype(a, g))
        return LayerFactors(a, g, c, float(f["damping"]), str(f["mode"]), amplification, work_dtype)

    def apply_dtypes(self) -> dict[str, str]:
        """Dtype of the per-step products of (*) per refreshed layer ("float32" / "float64")."""
        return {name: str(f.work_dtype).removeprefix("torch.") for name, f in self.factors.items()}

    def _matrix_shapes(self) -> dict[str, tuple[int, int]]:
        """(d_out, d_in) of each preconditioned layer's gradient matrix (bias as the last column)."""
        return {name: (layer.d_out, layer.d_in) for name, layer in self.layers.items()}

    def remove_hooks(self) -> None:
        for layer in self.layers.values():
            layer.remove()


def _failed(statuses: dict[int, list[torch.Tensor]]) -> list[int]:
    """Items whose deferred factorization statuses (0-d ints, 0 = success) include a failure; one
    host read for all of them (none when there is nothing to read)."""
    flat = [(i, status) for i, items in statuses.items() for status in items]
    if not flat:
        return []
    bad = torch.stack([status.reshape(()).long() != 0 for _, status in flat]).tolist()
    return sorted({i for (i, _), failed in zip(flat, bad) if failed})


def _host_floats(values: list[torch.Tensor]) -> list[float]:
    """0-d float64 tensors on one device -> host floats with one transfer."""
    if not values:
        return []
    return [float(x) for x in torch.stack(values).tolist()]


def _parameter_users(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> names of every module that holds it directly (shared weights: several)."""
    users: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            names = users.setdefault(id(param), [])
            if name not in names:
                names.append(name)
    return users


def _empty_rows(layer: LayerCapture) -> tuple[torch.Tensor, torch.Tensor]:
    """(0, d_in) (id rows: (0, 1) int64) and (0, d_out) rows in the layer's row dtype and device: a
    rank with no rows."""
    adapter = layer.adapter
    weight = adapter.weight
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return (
        torch.empty(0, adapter.row_width, dtype=adapter.row_dtype(dtype), device=weight.device),
        torch.empty(0, layer.d_out, dtype=dtype, device=weight.device),
    )


def _max_rows(adapter: LayerAdapter, budget_mib: float) -> int:
    """Row bound of one layer: ``budget_mib`` MiB of float32 input and output-gradient rows (an id row:
    one int64)."""
    return max(1, int(budget_mib * 2**20 // (adapter.a_row_bytes(4) + 4 * adapter.d_out)))


PARTLY_FROZEN = "weight or bias frozen while the other trains: the kernel covers [W | b] as one block"


def _coverage_problem(
    adapter: LayerAdapter, trainable: list[torch.Tensor], owned: Optional[set[int]]
) -> Optional[str]:
    """Why the adapter's [W | b] gradient matrix can never match the module's parameters (None when
    it can): trainable parameters beyond weight and bias, or a frozen weight or bias HyLo does not
    own beside a trainable one (the kernel treats weight and bias as one block)."""
    covered = {id(p) for p in adapter.params()}
    if not all(id(p) in covered for p in trainable):
        return "trainable parameters beyond its weight and bias"
    if owned is not None and not all(id(p) in owned for p in adapter.params()):
        return PARTLY_FROZEN + " (and the frozen one is in no param group of HyLo)"
    return None


def _trainability(adapter: LayerAdapter) -> str:
    """"train" if the layer's weight and bias all require grad, "frozen" if none does, else "partial"."""
    flags = [p.requires_grad for p in adapter.params()]
    return "train" if all(flags) else ("frozen" if not any(flags) else "partial")


def _shares_with_adapted(module: nn.Module, users: dict[int, list[str]], model: nn.Module) -> bool:
    """Whether a parameter of ``module`` is also held by a module HyLo could precondition (a tied
    LM head makes its Embedding worth a warning too)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    names = {u for p in module.parameters(recurse=False) for u in users[id(p)]}
    return any(adapter_for(modules[n]) is not None for n in names if n in modules)


def _count_kinds(kinds: Iterable[str]) -> str:
    counts: dict[str, int] = {}
    for kind in kinds:
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{kind} x{count}" for kind, count in counts.items())


def _fallback_summary(fallback: list[str], reasons: dict[str, str]) -> str:
    """Fallback layers grouped by reason: 'reason: [names]; ...' (names as listed in fallback)."""
    groups: dict[str, list[str]] = {}
    for entry in fallback:
        name = entry.split(" (", 1)[0]
        groups.setdefault(reasons.get(name, "unknown"), []).append(entry)
    return "; ".join(f"{reason}: {entries}" for reason, entries in groups.items())
