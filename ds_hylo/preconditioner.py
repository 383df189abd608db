"""The HyLo preconditioner: refresh (capture -> reduce -> gather -> owner inverts -> broadcast), apply.

It owns the layer hooks, the stored factors (A_S, G_S, C) per layer, the refresh schedule, the
KIS random generator and the timers. It modifies gradients in place and knows nothing about
learning rates beyond what KL-clipping needs; the base update lives in ``optimizer.py``.

Refreshes are two-phase so that a step that is later skipped (fp16 overflow in DeepSpeed) leaves
the state untouched: ``precondition()`` computes and uses new factors as *pending*, and only
``commit()`` (called from the optimizer's ``step``) makes them current and advances the step.
"""

from __future__ import annotations

import fnmatch
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from . import fisher, kernels
from .capture import GradAccessor, LayerCapture, is_supported
from .comm import Communicator, default_communicator
from .config import HyLoConfig
from .switching import ModePolicy, build_policy
from .timers import PhaseTimers

logger = logging.getLogger("ds_hylo")

_RANK_SEED_STRIDE = 7919


@dataclass
class LayerFactors:
    """What (*) needs for one layer: rows a (s, d_in), g (s, d_out), c (s, s), and the damping used."""

    a: torch.Tensor
    g: torch.Tensor
    c: torch.Tensor
    damping: float
    mode: str


@dataclass
class _LocalReduction:
    """One layer's rows on this rank after KIS/KID/SNGD selection, before the gather."""

    name: str
    mode: str
    a: torch.Tensor
    g: torch.Tensor
    m_factor: Optional[torch.Tensor]  # KID only: (r, r)
    num_rows: int  # local captured rows
    padded_rows: int  # row count every rank sends (the largest budget over ranks)


class Preconditioner:
    """Layer-wise HyLo preconditioner for one model.

    Args:
        model: the module whose Linear/Conv2d layers are preconditioned.
        config: HyLoConfig.
        comm: collectives; defaults to the default process group when one with >1 rank is
            initialised at the first refresh, otherwise a single-process no-op.
    """

    def __init__(self, model: nn.Module, config: HyLoConfig, comm: Optional[Communicator] = None) -> None:
        self.config = config
        self._comm = comm
        self.layers: dict[str, LayerCapture] = {}
        self.fallback_layers: list[str] = []
        self.skipped_layers: list[str] = []
        for name, module in model.named_modules():
            own_params = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own_params:
                continue
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in config.skip_layers):
                self.skipped_layers.append(name)
            elif is_supported(module):
                self.layers[name] = LayerCapture(
                    name, module, config.sequence_convention, keep_outputs=config.fisher == "sampled"
                )
            else:
                self.fallback_layers.append(f"{name} ({type(module).__name__})")
        if not self.layers:
            raise ValueError("the model has no Linear or Conv2d layer that HyLo can precondition")
        logger.info(
            "HyLo preconditions %d layers; first-order fallback for %s; skipped by skip_layers: %s",
            len(self.layers),
            self.fallback_layers or "none",
            self.skipped_layers or "none",
        )
        self.policy: ModePolicy = build_policy(config, list(self.layers))
        self.factors: dict[str, LayerFactors] = {}
        self.steps = 0
        self.generator = torch.Generator()
        self._generator_seeded = False
        self.timers = PhaseTimers()
        self.nonfinite_events = 0
        self.refreshes = 0
        self.last_kl_scale = 1.0
        self._pending: Optional[dict[str, Any]] = None
        self._awaiting_commit = False
        self._grads_are_local = False
        self._fisher_calls = 0
        # True while sample_fisher's private backward runs (integrations refuse to react to it).
        self.fisher_backward_active = False
        self._set_capture(self._is_refresh_step(self.steps))

    # ------------------------------------------------------------- schedule
    @property
    def comm(self) -> Communicator:
        if self._comm is None:
            self._comm = default_communicator()
        return self._comm

    def _is_refresh_step(self, step: int) -> bool:
        return step % self.config.update_freq == 0

    def _set_capture(self, enabled: bool) -> None:
        self._fisher_calls = 0
        for layer in self.layers.values():
            layer.enabled = enabled
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
        with self.timers.phase("fisher"):
            generator = torch.Generator(device=logits.device)
            generator.manual_seed(self._fisher_seed())
            self._fisher_calls += 1
            loss = fisher.sampled_label_loss(logits, generator, mask)
            self.fisher_backward_active = True
            try:
                with torch.enable_grad(), fisher.tensor_hooks_suspended(logits):
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
        """
        self._discard_pending()
        self._check_sampled_fisher_called()
        self.policy.observe_lr(lr)
        damping = self.damping()
        refreshed: dict[str, LayerFactors] = {}
        # KIS draws from a copy, so the committed generator only moves when the step happens.
        work_generator = torch.Generator()
        if self._is_refresh_step(self.steps) and any(layer.has_data() for layer in self.layers.values()):
            self._seed_generator_once()
            work_generator.set_state(self.generator.get_state())
            refreshed = self._refresh(damping, grad_scale, work_generator)
        for layer in self.layers.values():
            layer.clear()
        self._pending = {"factors": refreshed, "rng_state": work_generator.get_state() if refreshed else None}
        self._awaiting_commit = True
        self._apply({**self.factors, **refreshed}, lr, grad_scale, grads_are_local, grad_of)

    def commit(self) -> None:
        """Make the pending refresh current and advance one step; a no-op without a precondition()."""
        if not self._awaiting_commit:
            return
        if self._pending is not None:
            if self._pending["factors"]:
                self.factors.update(self._pending["factors"])
                self.generator.set_state(self._pending["rng_state"])
                self.refreshes += 1
            self._pending = None
        self._awaiting_commit = False
        self.policy.end_step(self.steps, self.comm.all_reduce_mean if self._grads_are_local else None)
        self.steps += 1
        self._set_capture(self._is_refresh_step(self.steps))

    def _discard_pending(self) -> None:
        """Forget a precondition() whose step never happened (e.g. skipped for fp16 overflow)."""
        if self._pending is not None:
            self.policy.discard_step()
        self._pending = None
        self._awaiting_commit = False

    # ---------------------------------------------------------------- refresh
    def _seed_generator_once(self) -> None:
        if not self._generator_seeded:
            self.generator.manual_seed(self.config.seed + _RANK_SEED_STRIDE * self.comm.rank)
            self._generator_seeded = True

    def _refresh(self, damping: float, grad_scale: float, generator: torch.Generator) -> dict[str, LayerFactors]:
        comm = self.comm
        names = [name for name, layer in self.layers.items() if layer.has_data()]
        captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        budgets: list[int] = []
        modes = {name: self.policy.mode_for(name, self.steps) for name in names}
        row_counts: list[int] = []
        with self.timers.phase("reduce"):
            for name in names:
                layer = self.layers[name]
                num_rows = layer.num_rows
                if self.config.fisher == "sampled":  # already per-sample, and never loss-scaled
                    scale = 1.0
                else:
                    scale = (num_rows if self.config.loss_reduction == "mean" else 1.0) * grad_scale
                captured[name] = layer.take(scale)
                row_counts.append(num_rows)
                budgets.append(self._row_budget(modes[name], num_rows, comm.world_size))
        with self.timers.phase("communicate"):
            table = comm.all_gather(torch.tensor(row_counts + budgets, dtype=torch.long))
        global_rows = table[:, : len(names)].sum(dim=0).tolist()
        padded_budgets = table[:, len(names):].max(dim=0).values.tolist()

        reductions = []
        with self.timers.phase("reduce"):
            for i, name in enumerate(names):
                a, g = captured[name]
                reductions.append(
                    self._reduce_locally(
                        name, modes[name], a, g, padded_budgets[i], budgets[i], damping, global_rows[i], generator
                    )
                )
        gathered = self._gather(reductions)
        return self._invert_and_share(gathered, damping, global_rows)

    def _row_budget(self, mode: str, num_rows: int, world_size: int) -> int:
        if mode == "sngd":
            return num_rows
        budget = max(1, round(self.config.rank_ratio * num_rows))
        if self.config.max_global_samples is not None:
            budget = min(budget, max(1, self.config.max_global_samples // world_size))
        return min(budget, num_rows)

    def _reduce_locally(
        self,
        name: str,
        mode: str,
        a: torch.Tensor,
        g: torch.Tensor,
        padded: int,
        budget: int,
        damping: float,
        global_rows: int,
        generator: torch.Generator,
    ) -> _LocalReduction:
        m_factor = None
        if mode == "sngd":
            rows = torch.arange(a.shape[0], device=a.device)
        elif mode == "kis":
            rows = kernels.kis_select(a, g, budget, generator)
        else:  # kid
            local_kernel = kernels.kernel(a.double(), g.double())
            try:
                rows, m_factor = kernels.kid_local(local_kernel, budget, damping, global_rows)
            except kernels.FactorizationError:
                rows = torch.arange(min(budget, a.shape[0]), device=a.device)
                m_factor = a.new_full((rows.numel(), rows.numel()), float("nan"))
            m_factor = _pad(m_factor, padded, padded)
        return _LocalReduction(name, mode, _pad(a[rows], padded), _pad(g[rows], padded), m_factor, rows.numel(), padded)

    def _gather(self, reductions: list[_LocalReduction]) -> list[dict[str, Any]]:
        """One fused all-gather of every layer's rows (and KID factors) with its valid-row count."""
        dtype = torch.float64 if any(r.a.dtype == torch.float64 for r in reductions) else torch.float32
        pieces = []
        for r in reductions:
            pieces += [r.a.reshape(-1), r.g.reshape(-1)]
            if r.m_factor is not None:
                pieces.append(r.m_factor.reshape(-1))
            pieces.append(torch.tensor([float(r.num_rows)], device=r.a.device))
        payload = torch.cat([p.to(dtype) for p in pieces])
        with self.timers.phase("communicate"):
            everything = self.comm.all_gather(payload)  # (P, total)
        results = []
        offset = 0
        for r in reductions:
            pad, d_in, d_out = r.padded_rows, r.a.shape[1], r.g.shape[1]
            sizes = [pad * d_in, pad * d_out] + ([pad * pad] if r.m_factor is not None else []) + [1]
            chunks = []
            for size in sizes:
                chunks.append(everything[:, offset: offset + size])
                offset += size
            valid = chunks[-1][:, 0].round().long().tolist()
            layer_dtype = r.a.dtype
            a_rows = [chunks[0][p].reshape(pad, d_in)[: valid[p]] for p in range(len(valid))]
            g_rows = [chunks[1][p].reshape(pad, d_out)[: valid[p]] for p in range(len(valid))]
            entry = {
                "name": r.name,
                "mode": r.mode,
                "a": torch.cat(a_rows).to(layer_dtype),
                "g": torch.cat(g_rows).to(layer_dtype),
            }
            if r.m_factor is not None:
                blocks = [chunks[2][p].reshape(pad, pad)[: valid[p], : valid[p]] for p in range(len(valid))]
                entry["m_factor"] = torch.block_diag(*blocks).to(layer_dtype)
            results.append(entry)
        return results

    def _invert_and_share(
        self, gathered: list[dict[str, Any]], damping: float, global_rows: list[int]
    ) -> dict[str, LayerFactors]:
        comm = self.comm
        sizes = [entry["a"].shape[0] for entry in gathered]
        owners = assign_owners([s**3 for s in sizes], comm.world_size)
        inverses: dict[int, torch.Tensor] = {}
        with self.timers.phase("invert"):
            for i, entry in enumerate(gathered):
                if owners[i] == comm.rank:
                    inverses[i] = self._small_inverse(entry, damping, global_rows[i])
        with self.timers.phase("communicate"):
            for owner in range(comm.world_size):
                owned = [i for i in range(len(gathered)) if owners[i] == owner]
                if not owned or comm.world_size == 1:
                    continue
                # C is symmetric: send its upper triangle, in float64 (same bytes as a full fp32 C).
                triangles = [torch.triu_indices(sizes[i], sizes[i]) for i in owned]
                if owner == comm.rank:
                    buffer = torch.cat([inverses[i][t[0], t[1]] for i, t in zip(owned, triangles)])
                else:
                    buffer = torch.empty(sum(t.shape[1] for t in triangles), dtype=torch.float64)
                comm.broadcast(buffer, owner)
                offset = 0
                for i, t in zip(owned, triangles):
                    c_mat = buffer.new_zeros(sizes[i], sizes[i])
                    c_mat[t[0], t[1]] = buffer[offset: offset + t.shape[1]]
                    inverses[i] = c_mat + c_mat.triu(1).T
                    offset += t.shape[1]
        factors = {}
        for i, entry in enumerate(gathered):
            c_mat = inverses[i]
            if not all(torch.isfinite(t).all() for t in (entry["a"], entry["g"], c_mat)):
                self._note_nonfinite(entry["name"])
                continue
            factors[entry["name"]] = LayerFactors(entry["a"], entry["g"], c_mat, damping, entry["mode"])
        return factors

    @staticmethod
    def _small_inverse(entry: dict[str, Any], damping: float, global_rows: int) -> torch.Tensor:
        """C in float64: the s x s solves are cheap, and K's dynamic range against lam*s can exceed
        what float32 resolves (C then stops being a contraction and the step can grow)."""
        a, g = entry["a"].double(), entry["g"].double()
        try:
            gram = kernels.kernel(a, g)
            if entry["mode"] == "kid":
                return kernels.kid_inverse(gram, entry["m_factor"].double())
            if entry["mode"] == "kis":
                return kernels.kis_inverse(gram, damping)
            return kernels.sngd_inverse(gram, damping, global_rows)
        except kernels.FactorizationError:
            return a.new_full((a.shape[0], a.shape[0]), float("nan"))

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
        self._grads_are_local = grads_are_local
        with self.timers.phase("apply"):
            grads = {name: layer.gradient_matrix(grad_of) for name, layer in self.layers.items()}
            grads = {name: grad for name, grad in grads.items() if grad is not None}
            if getattr(self.policy, "needs_grad_norms", True) and grads:
                norms = torch.stack([grad.float().norm() for grad in grads.values()]).tolist()
                for name, norm in zip(grads, norms):
                    self.policy.observe(name, norm * grad_scale)
            updates = []
            for name, grad in grads.items():
                f = factors.get(name)
                if f is None:
                    continue
                raw = grad.to(f.a.dtype)
                step_scale = f.damping if self.config.step_scale == "sgd" else 1.0
                direction = kernels.apply_smw(raw, f.a, f.g, f.c, f.damping, step_scale)
                updates.append((self.layers[name], raw, direction))
            if updates:  # one device sync for all layers instead of one per layer
                # a sum is non-finite iff some entry is (inf - inf gives nan): cheaper than isfinite().all()
                finite = torch.isfinite(torch.stack([d.sum() for _, _, d in updates])).tolist()
                for (layer, raw, _), ok in zip(updates, finite):
                    if not ok and torch.isfinite(raw).all():
                        self._note_nonfinite(layer.name)
                updates = [u for u, ok in zip(updates, finite) if ok]
            scale = self._kl_scale(updates, lr, grad_scale, grads_are_local)
            for layer, _, direction in updates:
                layer.set_gradient_matrix(direction * scale if scale != 1.0 else direction, grad_of)

    def _kl_scale(self, updates: list, lr: float, grad_scale: float, grads_are_local: bool) -> float:
        """K-FAC's KL clip: nu = min(1, sqrt(kl_clip / (lr^2 sum v.g))); 1 when disabled."""
        if self.config.kl_clip is None or not updates:
            return 1.0
        vg = sum(float((v * g).sum()) for _, g, v in updates) * (grad_scale**2) * lr**2
        if grads_are_local:
            vg = float(self.comm.all_reduce_mean(torch.tensor([vg], dtype=torch.float64))[0])
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
        """Everything needed to continue exactly; loadable with torch.load(weights_only=True)."""
        return {
            "steps": self.steps,
            "refreshes": self.refreshes,
            "nonfinite_events": self.nonfinite_events,
            "rng_state": self.generator.get_state(),
            "rng_seeded": self._generator_seeded,
            "factors": {
                name: {"a": f.a, "g": f.g, "c": f.c, "damping": f.damping, "mode": f.mode}
                for name, f in self.factors.items()
            },
            "policy": self.policy.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = sorted(set(state["factors"]) - set(self.layers))
        if unknown:
            raise ValueError(f"HyLo state has factors for layers this model lacks: {unknown}")
        self._discard_pending()
        self.steps = int(state["steps"])
        self.refreshes = int(state["refreshes"])
        self.nonfinite_events = int(state["nonfinite_events"])
        self.generator.set_state(state["rng_state"])
        self._generator_seeded = bool(state["rng_seeded"])
        device_of = {name: layer.module.weight.device for name, layer in self.layers.items()}
        self.factors = {
            name: LayerFactors(
                f["a"].to(device_of[name]), f["g"].to(device_of[name]), f["c"].to(device_of[name]),
                float(f["damping"]), str(f["mode"]),
            )
            for name, f in state["factors"].items()
        }
        self.policy.load_state_dict(state["policy"])
        self._set_capture(self._is_refresh_step(self.steps))

    def remove_hooks(self) -> None:
        for layer in self.layers.values():
            layer.remove()


def assign_owners(costs: list[float], world_size: int) -> list[int]:
    """Greedy longest-first assignment of items to ranks balancing the summed cost -> owner per item."""
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += costs[i]
    return owners


def _pad(tensor: torch.Tensor, rows: int, cols: Optional[int] = None) -> torch.Tensor:
    """Zero-pad a (n, d) tensor to (rows, d) (or (rows, cols))."""
    n, d = tensor.shape
    cols = d if cols is None else cols
    if n == rows and d == cols:
        return tensor
    out = tensor.new_zeros(rows, cols)
    out[:n, :d] = tensor
    return out
