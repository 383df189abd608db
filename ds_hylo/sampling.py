"""Streamed KIS: the rows of one layer are sampled as each pass's output gradient arrives.

KIS keeps ``s = row_budget(N)`` of a layer's N rows, drawn by an exponential race (see
:func:`ds_hylo.kernels.kis_select`): row i gets the key E_i / w_i (E_i ~ Exp(1), w_i = ||a_i||^2
||g_i||^2) and the s smallest keys win. Keys are independent of each other, so the race runs as
the rows arrive: :class:`KISReservoir` holds, after every pass, the rows with the smallest keys
seen so far, at most ``capacity(H)`` of them (H: rows seen so far, zero rows included;
``capacity`` is the budget rule, so it bounds the final s from above, ``N <= H``). A layer on a
KIS refresh thus holds O(budget) rows instead of every token's.

Row classes (sorted first, then by key, then by arrival): 0 positive weight; 1 zero or non-finite
weight (taken only after every class-0 row, in random order); 2 rows of positions with an exactly
zero output gradient (padding; not samples, see ``ds_hylo.capture``: taken only when the layer
has no other row, a dead layer); 3 rows of passes dropped since (``drop_slots``), never taken.

How this relates to drawing at the refresh from every stored row (``kis_select`` on the rows
``LayerCapture.take`` returns, with the generator seeded the same way):

- Uniforms: each pass draws as many float64 uniforms as it has rows from one generator per layer
  and refresh (seeded by the caller, on the rows' device); the k-th row of the pass that carries
  signal takes the k-th uniform (a zero row, class 2, takes the uniform of its own position).
  On the CPU, uniforms drawn in pieces are the pieces of one draw, so a single pass, or passes
  without zero rows, give every row the uniform the refresh-time draw gives it. (Passes after one
  with zero rows start later in the stream than the refresh-time draw, which skips zero rows:
  other uniforms, the same law. CUDA's Philox stream is not split-invariant at all: there the
  draw has the same law, not the same values.)
- Weights are computed from the raw output gradients, before the per-sample scale (N times the
  loss scale for a mean loss) that the refresh applies: every key of class 0 moves by the same
  2 log(scale), so the order is the same up to round-off of the weights (near-ties only).
- Budget: the selection is the refresh-time one whenever the reservoir's capacity at every pass
  was at least the final budget, i.e. with one pass per refresh, or when the budget is fixed
  (``max_global_samples`` reached) or covers every row (``rank_ratio=1``). With several passes
  (gradient accumulation) and a budget that grows with N, no bounded stream can do that: an early
  pass would have to keep as many rows as the final budget, which is not known yet. The
  reservoir keeps the budget of the rows seen so far, so a row of an early pass that would be
  among the final s smallest keys, but was not among the smallest ``capacity(H_t)`` when it was
  seen, has been let go and the next key takes its place. Every kept row is still a draw of the
  same race (importance ~ w, without replacement, no row counted twice), but early passes are
  slightly under-represented: by a few rows near the budget's key threshold, where keys (so
  importances) of kept and lost rows are close.

No host-device synchronisation: sizes come from shapes and the capacity rule (host ints), the
live-row counts stay on the device until the refresh reads them with the other counts.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

from . import kernels

POSITIVE, ZERO_WEIGHT, SILENT, REMOVED = 0, 1, 2, 3


class KISReservoir:
    """The running KIS selection of one layer for one refresh.

    Args:
        seed: seed of the layer's generator for this refresh (the preconditioner's KIS seed).
        capacity: rows seen (int) -> rows to keep: the KIS row budget of that many rows.
        name: layer name, for warnings.

    Attributes:
        rows_seen: H, rows of the passes merged (and not dropped), zero rows included.
        size: rows held (<= capacity(rows_seen); rows of dropped passes included until the next merge).
    """

    def __init__(self, seed: int, capacity: Callable[[int], int], name: str = "") -> None:
        self.seed = int(seed)
        self.capacity = capacity
        self.name = name
        self.rows_seen = 0
        self.size = 0
        self._generator: Optional[torch.Generator] = None
        self.keys: Optional[torch.Tensor] = None  # (size,) float64
        self.classes: Optional[torch.Tensor] = None  # (size,) uint8
        self.a: Optional[torch.Tensor] = None  # (size, d_in), bias column included
        self.g: Optional[torch.Tensor] = None  # (size, d_out), raw output gradients
        self.slots: Optional[torch.Tensor] = None  # (size,) int64: the pass each row came from
        self.positions: Optional[torch.Tensor] = None  # (size,) int64: its row in that pass
        self._slot_rows: dict[int, int] = {}  # merged pass -> its rows (host)
        self._slot_live: dict[int, torch.Tensor] = {}  # merged pass with droppable rows -> live rows (device)
        self._damaged = False  # some rows belong to dropped passes (class 3)
        self._warned_late_grad = False

    # ------------------------------------------------------------------ merge
    def merge(self, slot: int, a_rows: torch.Tensor, g_rows: torch.Tensor, *, bias: bool, droppable: bool) -> None:
        """Add one pass's rows and keep the ``capacity(rows_seen)`` smallest keys.

        a_rows: (n, d_w) input rows, or id rows (n, 1) int64 (a view is fine: only the kept rows
        are copied); ``bias``: append the ones column to them (it adds 1 to every ||a_i||^2). g_rows: (n, d_out) raw
        output gradients. ``droppable``: rows with an exactly zero output gradient are class 2
        (positions without signal) rather than zero-weight samples.
        """
        n = g_rows.shape[0]
        device = g_rows.device
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        uniforms = torch.rand(n, generator=self._generator, dtype=torch.float64, device=self._generator.device)
        uniforms = uniforms.to(device, non_blocking=True)
        live = g_rows.ne(0).any(dim=1) if droppable else None
        if live is not None:
            # the k-th row with signal takes the k-th uniform, as when zero rows are left out first
            rank = torch.cumsum(live, dim=0) - 1
            uniforms = uniforms[torch.where(live, rank, torch.arange(n, device=device))]
        a_norms = kernels.input_sq_norms(a_rows, g_rows.dtype)  # id rows: 1 (0 for a -1 row)
        if bias:
            a_norms = a_norms + 1.0
        keys, positive = kernels.kis_keys(a_norms * g_rows.pow(2).sum(dim=1), uniforms)
        classes = torch.where(positive, POSITIVE, ZERO_WEIGHT).to(torch.uint8)
        if live is not None:
            classes = torch.where(live, classes, torch.full_like(classes, SILENT))
            self._slot_live[slot] = live.sum()
        self._slot_rows[slot] = n
        self.rows_seen += n
        keep = min(self.capacity(self.rows_seen), self.size + n)
        # this pass's best rows first (never more than will be kept), then the merge with the held ones
        picked = kernels.kis_order(keys, classes)[:keep]
        new_a = a_rows.index_select(0, picked)
        if bias:
            new_a = torch.cat([new_a, new_a.new_ones(new_a.shape[0], 1)], dim=1)
        new = (keys[picked], classes[picked], new_a, g_rows.index_select(0, picked),
               torch.full((picked.numel(),), slot, dtype=torch.long, device=device), picked)
        if self.size == 0:
            merged = new
        else:
            held = (self.keys, self.classes, self.a, self.g, self.slots, self.positions)
            merged = tuple(torch.cat([h, x.to(h.dtype)]) for h, x in zip(held, new))
            order = kernels.kis_order(merged[0], merged[1])[:keep]
            merged = tuple(t.index_select(0, order) for t in merged)
        self.keys, self.classes, self.a, self.g, self.slots, self.positions = merged
        self.size = keep

    def add_to_merged(self, slot: int, g_rows: torch.Tensor) -> None:
        """A later backward through a pass already merged: add its output gradients to the kept
        rows of that pass. The selection (and which rows carry signal) stays the one made from the
        first backward's gradients, as "reduce" keeps the first backward's mask; warned once."""
        if slot not in self._slot_rows or self.size == 0:
            return
        if not self._warned_late_grad:
            self._warned_late_grad = True
            warnings.warn(
                f"HyLo: layer {self.name!r} got a second backward through a pass whose KIS rows were already "
                "drawn (from the first backward's output gradients); the kept rows add the new gradients, the "
                "draw is not redone. Warned once per layer and refresh.",
                RuntimeWarning,
                stacklevel=3,
            )
        mine = self.slots == slot
        index = torch.where(mine, self.positions, torch.zeros_like(self.positions)).clamp_(max=g_rows.shape[0] - 1)
        extra = g_rows.index_select(0, index).to(self.g.dtype)
        self.g = self.g + torch.where(mine.unsqueeze(1), extra, torch.zeros_like(extra))

    # ------------------------------------------------------------------ drop
    def merged_slots(self) -> list[int]:
        return list(self._slot_rows)

    def drop_slots(self, slots: list[int]) -> None:
        """Forget the rows of these passes (their step never came). When no pass is left the
        reservoir starts over, generator included, as if they had never been seen."""
        slots = [s for s in slots if s in self._slot_rows]
        if not slots:
            return
        for slot in slots:
            self.rows_seen -= self._slot_rows.pop(slot)
            self._slot_live.pop(slot, None)
        if not self._slot_rows:
            self._reset()
            return
        gone = torch.zeros_like(self.slots, dtype=torch.bool)
        for slot in slots:  # no host list copied to the device
            gone |= self.slots == slot
        self.classes = torch.where(gone, torch.full_like(self.classes, REMOVED), self.classes)
        order = kernels.kis_order(self.keys, self.classes)  # the dropped rows last
        held = (self.keys, self.classes, self.a, self.g, self.slots, self.positions)
        self.keys, self.classes, self.a, self.g, self.slots, self.positions = (t.index_select(0, order) for t in held)
        self._damaged = True

    def _reset(self) -> None:
        self.rows_seen = self.size = 0
        self._generator = None
        self.keys = self.classes = self.a = self.g = self.slots = self.positions = None
        self._slot_rows.clear()
        self._slot_live.clear()
        self._damaged = False

    # ---------------------------------------------------------------- consume
    def counts(self) -> tuple[int, int]:
        """(N, available): the layer's samples N (rows with signal; every row in a dead layer) and
        the rows held that may be taken (class <= 1, or <= 2 in a dead layer).

        No host read when no merged pass had droppable rows and none was dropped (then N is the
        rows seen and every held row may be taken); otherwise one.
        """
        if self.size == 0 and not self._slot_rows:
            return 0, 0
        if not self._slot_live and not self._damaged:
            return self.rows_seen, self.size
        fixed = sum(rows for slot, rows in self._slot_rows.items() if slot not in self._slot_live)
        device = self.classes.device if self.classes is not None else torch.device("cpu")
        live = [count.to(device) for count in self._slot_live.values()]
        live_total = torch.stack(live).sum() if live else torch.zeros((), dtype=torch.long, device=device)
        if self.classes is None:
            signal = every = torch.zeros((), dtype=torch.long, device=device)
        else:
            signal, every = (self.classes <= ZERO_WEIGHT).sum(), (self.classes <= SILENT).sum()
        live_rows, signal, every = (int(x) for x in torch.stack([live_total, signal, every]).tolist())
        live_rows += fixed
        if live_rows > 0:
            return live_rows, signal
        return self.rows_seen, every  # a dead layer: every row counts (its kernel is zero)

    def take(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``count`` rows in arrival order: A (count, d_in), raw G (count, d_out)."""
        if self.a is None:
            raise RuntimeError(f"layer {self.name!r} has no sampled rows")
        return self.a[:count], self.g[:count]

    def held_bytes(self) -> int:
        """Bytes of the rows and keys held."""
        tensors = (self.keys, self.classes, self.a, self.g, self.slots, self.positions)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)
