"""How much memory HyLo needs per rank, before it runs: ``estimate_memory`` and ``warn_if_over``.

In the spirit of DeepSpeed's ``estimate_zero2_model_states_mem_needs_all_live``: from the model and
the options alone, the bytes one rank holds for HyLo beside the base optimizer's state, per layer
kind and in total, and the peak a refresh step adds on top. Nothing is run on the model: the layers
are resolved exactly as HyLo resolves them (a ``HyLo`` is built on the model, its layer list read,
its hooks removed).

What is counted, per preconditioned layer (d_in counts the bias column; docs/design.md sections 1
and 2; s = the global kept rows, the sum over ranks of ``ds_hylo.reduce.row_budget``):

- *held between refreshes*: the rows A_S (s, d_in) (an Embedding's: one int64 token id per row,
  never a num_embeddings-wide row) and G_S (s, d_out) in the rows' dtype (float32,
  float64 for a float64 model), C (s, s) float64, and the apply's work copies
  (``LayerFactors.work_factors``: the rows in the apply's dtype where it differs from theirs;
  C is used in float64 as it is).
- *refresh-step workspace* (transient, the largest of three phases, each summed over the layers
  alive at once):

  * capture (the backward of a refresh step): streamed KIS (``ds_hylo.sampling.KISReservoir``)
    holds each layer's row budget, plus one pass's key computation (squared rows) at a time;
    stored rows (KID, SNGD, hybrid, ``stream_kis=False``) hold every local row of every layer
    (rows_per_rank x (d_in + d_out) x 4 bytes, bounded by ``max_captured_mib`` per layer);
  * refresh: the rows taken for the reduction, the fused gather's packed buffer and, with P > 1
    ranks, its gathered copy, the new factors (rows and C, beside the current ones until the
    step commits), and one layer's float64 Gram work (s x (d_in + d_out) float64 copies, a few
    s x s float64 matrices; KID's local n x n kernel);
  * apply (``Preconditioner._apply``), beside the new factors and their work copies: a layer's
    direction is one (d_out, d_in) work-dtype copy of its gradient (two where the gradient matrix
    is itself a copy: a bias column concatenated, or a gradient dtype other than the work dtype).
    Standalone, under DDP and under ZeRO-2/3 each direction is written back before the next is
    computed (one layer's alive: the largest); under DeepSpeed ZeRO-0/1 on several ranks, and
    with grafting, every layer's direction is alive at once, until the one decision all ranks
    share (``apply_all_layers_at_once``).

- *base optimizer state*: AdamW two moments per parameter in the parameter's dtype (+ a scalar
  ``step`` per tensor), SGD one momentum buffer (none with momentum 0), for every trainable
  parameter the optimizer steps; grafting with ``graft="adamw"`` adds two (d_out, d_in) float32
  moments per preconditioned layer.

Not counted: the model, its gradients and activations (the same for any optimizer), allocator
fragmentation, and (since it depends on the data) the float64 apply a layer may fall back to
under ``apply_precision="auto"`` (counted as float32; ``apply_precision="float64"`` is counted).

Row counts: tokens_per_step / world_size rows per rank for Linear layers with
``sequence_convention="expand"`` and for Embedding layers whatever the convention (every token a
row; a model without sequences passes its global batch size as tokens_per_step), tokens /
sequence_length samples with ``"reduce"`` and for Conv2d (one row per sample). One forward pass per
step is assumed: a pass with more rows than a layer's ``max_captured_mib`` bound is not captured at
all (the layer is then never preconditioned), which the estimate reports as ``refused``; streamed
KIS passes of sequences are never refused.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from .config import HyLoConfig
from .exchange import SingleProcess

__all__ = ["LayerMemory", "MemoryEstimate", "estimate_memory", "free_memory", "held_factor_bytes", "warn_if_over"]

MIB = 2**20
_RESERVOIR_ROW_EXTRA = 8 + 1 + 8 + 8  # KISReservoir keys (float64), classes (uint8), slots, positions (int64)


@dataclass
class LayerMemory:
    """One preconditioned layer's bytes per rank (see the module docstring for each term).

    rows_per_rank: rows one rank captures per step; budget: rows it keeps (``row_budget``);
    s: global kept rows (budget x world_size); refused: a pass of rows_per_rank rows exceeds the
    layer's ``max_captured_mib`` bound, so it is never captured (its bytes are then the would-be ones).
    """

    name: str
    kind: str
    d_in: int
    d_out: int
    rows_per_rank: int
    budget: int
    s: int
    refused: bool
    rows_bytes: int
    c_bytes: int
    work_bytes: int
    graft_bytes: int
    capture_bytes: int
    capture_transient_bytes: int
    refresh_bytes: int
    refresh_transient_bytes: int
    apply_bytes: int
    apply_direction_bytes: int = 0  # the part of apply_bytes that is the layer's direction

    @property
    def held_bytes(self) -> int:
        """Held between refreshes: rows, C, the apply's work copies (and grafting moments)."""
        return self.rows_bytes + self.c_bytes + self.work_bytes + self.graft_bytes


@dataclass
class MemoryEstimate:
    """Per-rank bytes of HyLo's state beside the base optimizer's (``estimate_memory``).

    Attributes:
        world_size, tokens_per_step, sequence_length, options: the inputs.
        base: "adamw" or "sgd"; base_state_bytes: its per-parameter state over every trainable
            parameter; params: their number.
        layers: one ``LayerMemory`` per preconditioned layer; fallback: layers with a plain gradient.
        held_bytes: HyLo's factors between refreshes (sum over layers).
        workspace_bytes: the refresh step's transient peak on top of held_bytes (largest phase).
        phases: that transient per phase ("capture", "refresh", "apply").
        total_bytes: base_state_bytes + held_bytes (between refreshes).
        peak_bytes: total_bytes + workspace_bytes (a refresh step).
    """

    world_size: int
    tokens_per_step: int
    sequence_length: Optional[int]
    options: dict[str, Any]
    base: str
    params: int
    base_state_bytes: int
    layers: list[LayerMemory]
    fallback: list[str] = field(default_factory=list)
    apply_all_layers_at_once: bool = False

    @property
    def held_bytes(self) -> int:
        return sum(layer.held_bytes for layer in self.layers)

    @property
    def phases(self) -> dict[str, int]:
        """Transient bytes on top of the held factors in each phase of a refresh step."""
        layers = self.layers
        return {
            "capture": sum(l.capture_bytes for l in layers) + max((l.capture_transient_bytes for l in layers), default=0),
            "refresh": sum(l.refresh_bytes for l in layers) + max((l.refresh_transient_bytes for l in layers), default=0),
            "apply": sum(l.apply_bytes - l.apply_direction_bytes for l in layers) + (
                sum(l.apply_direction_bytes for l in layers) if self.apply_all_layers_at_once
                else max((l.apply_direction_bytes for l in layers), default=0)),
        }

    @property
    def workspace_bytes(self) -> int:
        return max(self.phases.values(), default=0)

    @property
    def total_bytes(self) -> int:
        return self.base_state_bytes + self.held_bytes

    @property
    def peak_bytes(self) -> int:
        return self.total_bytes + self.workspace_bytes

    def by_kind(self) -> dict[str, dict[str, int]]:
        """{layer kind: {"layers", "rows_bytes", "c_bytes", "work_bytes", "held_bytes", "apply_bytes"}}."""
        kinds: dict[str, dict[str, int]] = {}
        for l in self.layers:
            entry = kinds.setdefault(l.kind, {"layers": 0, "rows_bytes": 0, "c_bytes": 0, "work_bytes": 0,
                                              "graft_bytes": 0, "held_bytes": 0, "apply_bytes": 0})
            entry["layers"] += 1
            for key in ("rows_bytes", "c_bytes", "work_bytes", "graft_bytes", "held_bytes", "apply_bytes"):
                entry[key] += getattr(l, key)
        return kinds

    def refused_layers(self) -> list[str]:
        return [l.name for l in self.layers if l.refused]

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready): inputs, totals, phases, per kind and per layer."""
        return {
            "world_size": self.world_size, "tokens_per_step": self.tokens_per_step,
            "sequence_length": self.sequence_length, "options": dict(self.options), "base": self.base,
            "params": self.params, "base_state_bytes": self.base_state_bytes, "held_bytes": self.held_bytes,
            "workspace_bytes": self.workspace_bytes, "phases": self.phases, "total_bytes": self.total_bytes,
            "peak_bytes": self.peak_bytes, "by_kind": self.by_kind(), "refused": self.refused_layers(),
            "fallback": list(self.fallback),
            "layers": [{**asdict(l), "held_bytes": l.held_bytes} for l in self.layers],
        }

    def table(self) -> str:
        """A printable per-kind table with the totals (MiB per rank)."""

        def mib(x: float) -> str:
            return f"{x / MIB:10.1f}"

        lines = [
            f"HyLo memory per rank: {self.tokens_per_step} tokens per step over {self.world_size} rank(s)"
            + (f", sequence length {self.sequence_length}" if self.sequence_length else "")
            + (f"; options {self.options}" if self.options else ""),
            f"{'layer kind':<14} {'layers':>6} {'rows MiB':>10} {'C MiB':>10} {'work MiB':>10} {'held MiB':>10}"
            f" {'apply MiB':>10}",
        ]
        for kind, e in self.by_kind().items():
            lines.append(f"{kind:<14} {e['layers']:>6} {mib(e['rows_bytes'])} {mib(e['c_bytes'])} "
                         f"{mib(e['work_bytes'] + e['graft_bytes'])} {mib(e['held_bytes'])} {mib(e['apply_bytes'])}")
        ph = self.phases
        lines += [
            f"HyLo held between refreshes: {self.held_bytes / MIB:.1f} MiB; base {self.base} state "
            f"({self.params / 1e6:.1f}M parameters): {self.base_state_bytes / MIB:.1f} MiB; "
            f"total {self.total_bytes / MIB:.1f} MiB",
            f"refresh-step workspace: capture {ph['capture'] / MIB:.1f}, refresh {ph['refresh'] / MIB:.1f}, "
            f"apply {ph['apply'] / MIB:.1f} MiB; peak {self.peak_bytes / MIB:.1f} MiB "
            f"(+{self.workspace_bytes / MIB:.1f} MiB on a refresh step)",
        ]
        if self.refused_layers():
            lines.append(f"never captured (one pass exceeds max_captured_mib): {self.refused_layers()}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _rows_per_rank(layer, tokens_per_rank: int, sequence_length: Optional[int], convention: str) -> int:
    samples = math.ceil(tokens_per_rank / sequence_length) if sequence_length else tokens_per_rank
    if layer.adapter.kind == "conv2d" or convention == "reduce":
        return samples
    return tokens_per_rank


def estimate_memory(
    model: nn.Module,
    tokens_per_step: int,
    world_size: int = 1,
    *,
    sequence_length: Optional[int] = None,
    stream_kis: bool = True,
    zero_stage: Optional[int] = None,
    print_table: bool = False,
    **hylo_options: Any,
) -> MemoryEstimate:
    """Per-rank bytes of HyLo's state and refresh workspace beside the base optimizer's state.

    Args:
        model: the model HyLo would precondition (only its layers and parameters are read).
        tokens_per_step: rows of one optimizer step over all ranks: tokens for sequence models
            (global batch x sequence length), the global batch size for models without sequences.
        world_size: data-parallel ranks P; every rank gets tokens_per_step / P.
        sequence_length: tokens per sample (for ``sequence_convention="reduce"`` and Conv2d rows,
            one per sample); None: every token is a sample.
        stream_kis: whether KIS refreshes stream their rows (``Preconditioner.stream_kis``, True by
            default in HyLo).
        zero_stage: the DeepSpeed ZeRO stage HyLo runs under (None: standalone or DDP). At stages
            0-1 on several ranks every layer's direction is alive at once in the apply; elsewhere
            one layer's at a time.
        print_table: print ``table()``.
        **hylo_options: HyLo's options (``HyLoConfig`` fields), validated as HyLo validates them.

    Returns:
        a ``MemoryEstimate`` (``.as_dict()``, ``.table()``, ``.peak_bytes``, ...).
    """
    from .preconditioner import Preconditioner, _max_rows, apply_dtype
    from .reduce import row_budget

    if not isinstance(tokens_per_step, int) or tokens_per_step < 1:
        raise ValueError(f"tokens_per_step={tokens_per_step!r}; it must be an int >= 1")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r}; it must be an int >= 1")
    cfg = HyLoConfig.from_dict(hylo_options, where="estimate_memory options")
    log = logging.getLogger("ds_hylo")
    level = log.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        log.setLevel(logging.WARNING)  # HyLo's own construction already logs which layers it preconditions
        try:
            pre = Preconditioner(model, cfg, SingleProcess())  # the layers HyLo(model) would precondition
        finally:
            log.setLevel(level)
    try:
        P = world_size
        tokens_per_rank = math.ceil(tokens_per_step / P)
        modes = ("kis", "kid") if cfg.mode == "hybrid" else (cfg.mode,)
        streamed = stream_kis and modes == ("kis",)
        layers = []
        for name, layer in pre.layers.items():
            weight = layer.adapter.weight
            row_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
            rb = 8 if row_dtype == torch.float64 else 4
            work = apply_dtype(cfg.apply_precision, 1.0, row_dtype)
            wb = 8 if work == torch.float64 else 4
            gb = weight.element_size()
            d_in, d_out, adapter = layer.d_in, layer.d_out, layer.adapter
            # one row (A and G) in the rows' float dtype, in float64, in the work dtype: an Embedding's
            # input row is one int64 token id (never converted), not a dense num_embeddings-wide row
            row_b = adapter.a_row_bytes(rb) + d_out * rb
            row_64 = adapter.a_row_bytes(8) + d_out * 8
            a_float = 0 if adapter.index_rows else d_in  # input columns that are floats (converted)
            n = _rows_per_rank(layer, tokens_per_rank, sequence_length, layer.sequence_convention)
            # a streamed KIS pass (token rows of sequences) is never refused: it holds a reference to
            # its input until its rows are drawn into the budget-sized reservoir (capture.py)
            streamed_pass = streamed and layer.sequence_convention == "expand" and (sequence_length or 1) > 1
            refused = not streamed_pass and n > _max_rows(layer.adapter, cfg.max_captured_mib)
            budget = max(row_budget(m, n, cfg.rank_ratio, P, cfg.max_global_samples) for m in modes)
            s = budget * P
            kid = "kid" in modes
            sngd = modes == ("sngd",)
            # held: rows, C (float64, used as it is by the apply), work copies of the rows only
            # when the work dtype differs from theirs
            rows_bytes = s * row_b
            c_bytes = s * s * 8
            work_bytes = s * (a_float + d_out) * wb if wb != rb else 0
            graft_bytes = 2 * d_out * d_in * 4 if cfg.graft == "adamw" else 0
            # capture phase: reservoir (streamed) or every local row (stored); bf16/fp16 layers convert
            convert = n * (a_float + d_out) * 4 if weight.dtype not in (torch.float32, torch.float64) else 0
            if streamed:
                capture = budget * (row_b + _RESERVOIR_ROW_EXTRA)
                # one pass's keys: squared rows, the live mask, the pass's picked rows and the merge
                capture_transient = n * row_b + n * d_out + 2 * budget * (row_b + _RESERVOIR_ROW_EXTRA) + convert
            else:
                capture = n * row_b
                capture_transient = convert
            # refresh phase: rows taken, reduced and packed, the gathered buffer, the new factors
            taken = (budget if streamed else n) * row_b + (budget if streamed else n) * d_out * rb
            packed = budget * row_b + (budget * budget * rb if kid else 0)
            gathered = P * packed if P > 1 else 0
            refresh = taken + packed + gathered + rows_bytes + c_bytes
            # one layer at a time: the take's copies, the reduction's work and the owner's float64 Gram
            reduce_work = n * row_b  # KIS keys: squared rows
            if kid:
                reduce_work = n * row_64 + (n * n * 8 if n <= 1024 else 4 * n * budget * 8)
            if sngd:
                reduce_work = 0
            gram = s * (a_float + d_out) * (8 if rb != 8 else 0) + 6 * s * s * 8 + (s * s * (rb + 8) if kid else 0)
            refresh_transient = (0 if streamed else n * row_b) + max(reduce_work, gram)
            # apply phase: every layer's direction at once (+ the gradient matrix where it is a copy),
            # beside the new factors and their work copies
            copies = 1 + int(layer.has_bias) + int(gb != wb)
            direction = copies * d_out * d_in * wb
            apply = direction + rows_bytes + c_bytes + work_bytes
            layers.append(LayerMemory(
                name, type(layer.module).__name__, d_in, d_out, n, budget, s, refused, rows_bytes, c_bytes,
                work_bytes, graft_bytes, capture, capture_transient, refresh, refresh_transient, apply, direction,
            ))
        params = list(model.parameters())
        if cfg.base == "adamw":
            state = sum(2 * p.numel() * p.element_size() + 4 for p in params)
        else:
            state = sum(p.numel() * p.element_size() for p in params) if cfg.momentum > 0 else 0
        fallback = list(pre.fallback_layers)
    finally:
        pre.remove_hooks()
    all_at_once = cfg.graft != "none" or (zero_stage in (0, 1) and P > 1)
    estimate = MemoryEstimate(P, tokens_per_step, sequence_length, dict(hylo_options), cfg.base,
                              sum(p.numel() for p in params), state, layers, fallback, all_at_once)
    if print_table:
        print(estimate.table())
    return estimate


def free_memory(device: Union[str, torch.device, None] = None) -> Optional[int]:
    """Free bytes on ``device``: ``torch.cuda.mem_get_info`` on CUDA; on the CPU psutil's available
    memory, else /proc/meminfo's MemAvailable; None where neither can be read."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def held_factor_bytes(preconditioner: Any) -> int:
    """Bytes HyLo's factors hold right now (rows, C, the apply's work copies; a storage shared by
    several of them counted once): the measured counterpart of ``MemoryEstimate.held_bytes``."""
    seen, total = set(), 0
    for f in preconditioner.factors.values():
        for t in (f.a, f.g, f.c) + tuple(f._work or ()):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def warn_at_construction(model: nn.Module, options: dict[str, Any], world_size: int,
                         device: Union[str, torch.device, None], free_bytes: Optional[int] = None) -> bool:
    """HyLo's constructor check (issue 19): one ``UserWarning`` when HyLo's own peak bytes per rank at
    the row cap (factors, their refresh-step copy and the refresh workspace; not the base
    optimizer's state, which ZeRO may partition) exceed the free memory of ``device``. Only with a
    row cap (``max_global_samples``) and a mode that keeps it: the bound is then independent of the
    tokens per step. Returns whether it warned."""
    cap, rank_ratio = options.get("max_global_samples", 512), options.get("rank_ratio", 0.1)
    if cap is None or options.get("mode", "kis") == "sngd":
        return False
    tokens = world_size * math.ceil(cap / max(rank_ratio, 1e-9))  # enough rows per step for the cap to bind
    estimate = estimate_memory(model, tokens, world_size, **options)
    own = estimate.peak_bytes - estimate.base_state_bytes
    free = free_memory(device) if free_bytes is None else free_bytes
    if free is None or own <= free:
        return False
    warnings.warn(
        f"HyLo: its own memory per rank at a refresh step, at the row cap max_global_samples={cap}, is estimated "
        f"at {own / MIB:.0f} MiB (factors {estimate.held_bytes / MIB:.0f} MiB + refresh workspace "
        f"{estimate.workspace_bytes / MIB:.0f} MiB), more than the {free / MIB:.0f} MiB free on {device or 'cpu'} "
        "now; lower max_global_samples (or list the largest layers in skip_layers). "
        "ds_hylo.estimate_memory(model, tokens_per_step, world_size, ...) gives the table per layer",
        UserWarning,
        stacklevel=3,
    )
    return True


def warn_if_over(estimate: MemoryEstimate, device: Union[str, torch.device, None] = None,
                 free_bytes: Optional[int] = None) -> bool:
    """Warn (one ``UserWarning`` line) when ``estimate.peak_bytes`` exceeds the free memory of
    ``device``; returns whether it does. ``free_bytes`` overrides the measurement (tests).

    Call it before the optimizer's state exists (after the model is on its device, before the
    first step), e.g. right after building HyLo, with the step's tokens per rank.
    """
    free = free_memory(device) if free_bytes is None else free_bytes
    if free is None or estimate.peak_bytes <= free:
        return False
    warnings.warn(
        f"HyLo: estimated optimizer memory per rank {estimate.peak_bytes / MIB:.0f} MiB at a refresh step "
        f"(base {estimate.base} state {estimate.base_state_bytes / MIB:.0f} MiB + HyLo factors "
        f"{estimate.held_bytes / MIB:.0f} MiB + refresh workspace {estimate.workspace_bytes / MIB:.0f} MiB) exceeds "
        f"the {free / MIB:.0f} MiB free on {device or 'cpu'}; lower max_global_samples or rank_ratio",
        UserWarning,
        stacklevel=2,
    )
    return True
