"""Module hooks that capture per-sample layer inputs A and output gradients G.

Which modules are supported, and how each kind turns its input and output gradient into rows, is
the business of the layer adapters (``ds_hylo.layers``: Linear and its subclasses, transformers'
Conv1D, Conv2d with groups=1 and zero padding, Embedding with token-id rows). This module owns the
hook lifecycle: when a pass is captured, the bound on the rows held, ``no_capture()``, activation-
checkpointing recomputations, and which captured rows count as samples.

Row conventions (each captured row is one "sample" of the kernel):
- one row per sample for (batch, features) inputs and for Conv2d (mean of the unfolded patches,
  sum of the output gradients over positions: a rank-1 surrogate with the true gradient's scale);
- layers on sequences (batch, ..., features): "expand", one row per position; or "reduce", one
  row per sample with the output gradients summed over positions and the inputs averaged over the
  positions that carry signal (see below).

Positions without signal are not samples (padding invariance). A position whose output gradient
is exactly zero has u = g a^T = 0: it adds nothing to U, so leaving it out changes neither the
kernel nor U^T grad, but counting it would change the sample count N (the mean-loss scale of the
rows and the damping shift lam*N) and the KIS budget. Padded positions (masked keys, labels
ignored by the loss) have exactly zero output gradients, so in "expand" the rows of positions
(of inputs with several positions per sample) with a zero output gradient are dropped, and the
same batch padded differently gives the same rows and the same N. In "reduce", such positions are
left out of the mean of the inputs (the mask is taken at the first backward through a pass; a
sample with no such position averages all of them). Whole samples (one row per sample: 2-D
inputs, Conv2d, "reduce") always count, even with a zero gradient (a sample that is correctly
fitted, or dead behind a ReLU, is still a sample of the mean loss). If every droppable row of a
layer is zero (a dead layer) all rows are kept: the kernel is then zero and the update does not
depend on their number. ``num_rows`` counts the kept rows, and ``take`` returns only those. The
zero test runs when the rows are consumed (one host read per layer at a refresh), not inside the
backward hooks, which stay free of host-device syncs.

The gradient matrix of a layer is (d_out, d_in) with the bias, if any, as the last input column.
Captured output gradients are stored raw (as the hooks see dloss/dz); the preconditioner rescales
them to per-sample gradients (see ``LayerCapture.take``).

What a forward pass leaves (captured, refused by ``max_rows``, skipped under :func:`no_capture` or
as an activation-checkpointing recomputation) is described on ``LayerCapture``.

Streamed KIS: on a refresh step whose reduction is KIS, the layer does not keep its rows. Its
``row_plan`` (set by the preconditioner) hands it a :class:`ds_hylo.sampling.KISReservoir` at the
first captured pass; each pass then keeps a reference to its input (the tensor autograd saves for
the weight gradient; a copy only where rows are converted) until its output gradient arrives, and
the output-gradient hook draws the pass's rows into the reservoir and lets the rest go. The layer
holds at most the KIS row budget of the rows seen (plus the inputs of passes awaiting their
backward), and ``take`` returns the drawn rows in draw order.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from .config import SEQUENCE_CONVENTIONS
from .layers import GradAccessor, LayerAdapter, adapter_for, storage_dtype
from .sampling import KISReservoir


def is_supported(module: nn.Module) -> bool:
    """Whether HyLo has a kernel for this module (``ds_hylo.layers.adapter_for`` finds an adapter)."""
    return adapter_for(module) is not None


# ----------------------------------------------------------------- capture switches

_suspend_lock = threading.Lock()
_suspend_depth = 0


@contextlib.contextmanager
def no_capture() -> Iterator[None]:
    """Capture nothing inside the block: for extra forward/backward passes that must not add
    curvature rows (a ``torch.autograd.grad`` pass adds none anyway: ``backward_accumulates``).

    No LayerCapture records a forward pass (and none registers an output-gradient hook) while any
    ``no_capture`` block is open, in any thread (so also in DataParallel replicas and on autograd
    device threads); output-gradient hooks that fire meanwhile, for passes captured before, record
    nothing either. Blocks nest.
    """
    global _suspend_depth
    with _suspend_lock:
        _suspend_depth += 1
    try:
        yield
    finally:
        with _suspend_lock:
            _suspend_depth -= 1


_PRIVATE_BACKWARD = [0]


@contextlib.contextmanager
def private_backward() -> Iterator[None]:
    """Marks HyLo's own sampled-label backward: it does not count as a pass's training backward."""
    _PRIVATE_BACKWARD[0] += 1
    try:
        yield
    finally:
        _PRIVATE_BACKWARD[0] -= 1


def capture_suspended() -> bool:
    """Whether a ``no_capture`` block is open."""
    return _suspend_depth > 0


@torch.compiler.disable  # reads autograd state: run eagerly, no tracing warning under torch.compile
def in_nonreentrant_recompute() -> bool:
    """Whether the current forward is a recomputation by non-reentrant activation checkpointing.

    ``torch.utils.checkpoint(use_reentrant=False)`` recomputes inside its own saved-tensors hooks
    (``torch.utils.checkpoint._recomputation_hook``), the innermost ones while it runs. torch has
    no public flag for this; if its internals change this returns False and the fallback in
    ``LayerCapture`` (drop forward passes made inside a backward that get no output gradient)
    keeps the rows right, though held until that backward ends.
    """
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return False
    try:
        hooks = top(False)
    except (RuntimeError, TypeError):
        return False
    if not hooks:
        return False
    pack = hooks[0]
    return getattr(pack, "__module__", None) == "torch.utils.checkpoint" and getattr(
        pack, "__qualname__", ""
    ).startswith("_recomputation_hook.")


@torch.compiler.disable
def _in_backward() -> bool:
    """Whether an autograd backward (graph task) is running in this thread."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


@torch.compiler.disable
def backward_accumulates(param: torch.Tensor) -> bool:
    """Whether the running backward accumulates into ``param.grad``.

    True for ``Tensor.backward`` / ``torch.autograd.backward`` (also with ``inputs`` that include
    ``param``); False for ``torch.autograd.grad`` (a gradient penalty, a second loss: its result is
    returned, never added to ``.grad``) and for ``backward(inputs=...)`` without ``param``. Read
    from the engine (``torch._C._will_engine_execute_node`` on the parameter's AccumulateGrad node,
    which torch refuses for leaves during ``autograd.grad``); where torch lacks it, True (every
    backward counts, as before). Only valid inside a backward hook; no device work.
    """
    will_execute = getattr(torch._C, "_will_engine_execute_node", None)
    gradient_edge = getattr(torch.autograd.graph, "get_gradient_edge", None)
    if will_execute is None or gradient_edge is None:
        return True
    try:
        node = gradient_edge(param).node
    except RuntimeError:
        return True
    try:
        return bool(will_execute(node))
    except RuntimeError as err:  # "A leaf node was passed ... we are currently running autograd.grad()"
        return "autograd.grad" not in str(err)


def _queue_end_of_backward(callback: Callable[[], None]) -> None:
    """Run ``callback`` when the running backward (graph task) ends."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


class LayerCapture:
    """Hooks and captured rows of one supported layer.

    Each forward pass captured is one *slot*: its input rows, and its output-gradient rows once
    the backward reaches the layer (several backward passes through the same output add up, as
    parameter gradients do). Only backward passes that accumulate into the layer's ``.grad``
    count (``backward_accumulates``): a ``torch.autograd.grad`` pass (gradient penalty, second
    loss) adds no rows, so a pass whose only backward is one is never matched. What is not captured:

    - passes inside :func:`no_capture`, with gradients disabled, or whose output needs no gradient;
    - passes while the layer's weight or bias is frozen (``requires_grad=False``);
    - passes while ``enabled`` is False (only ``seen_while_disabled`` is set);
    - passes that would take the rows held past ``max_rows`` (``overflowed`` is set; the first
      passes are kept);
    - the recomputation of a forward pass by non-reentrant activation checkpointing
      (``torch.utils.checkpoint(..., use_reentrant=False)``): the original pass was captured.
      Reentrant checkpointing runs the original pass without gradients and the recomputation
      inside the backward: that recomputation is the one captured (once). With
      ``keep_outputs=True`` it cannot be (the sampled-label backward cannot reach outputs made
      inside the training backward): ``recompute_not_captured`` is set instead.

    In "expand", rows of positions whose output gradient is exactly zero are not samples (see the
    module docstring): ``num_rows`` and ``take`` leave them out (``drop_zero_rows=False`` keeps them).

    In "reduce" on sequences the forward hook keeps a reference to the layer's input (the tensor
    autograd saves for the weight gradient: no copy unless its dtype is converted) until the
    output gradient says which positions to average; it is counted as one row per sample.

    ``clear()`` starts a new generation: output-gradient hooks of earlier passes (a late backward)
    never write into the slots of later ones.

    Streamed KIS (``row_plan`` returns a reservoir for the generation): a pass is *merged* into
    the reservoir when its output gradient arrives (the training backward, or ``set_output_grad``
    for kept outputs) and its rows are dropped; only the drawn ones stay. ``num_rows`` is then N
    of the rows seen, ``sampled_rows`` the rows that may be taken, and ``take(scale)`` returns
    them in draw order (the KIS budget is their first rows). ``drop_completed`` forgets the drawn
    rows of spent passes. A later backward through a merged pass adds its gradients to that
    pass's kept rows (the draw made from the first backward stays).

    Attributes:
        name: module name in the model.
        module: the module; adapter: its ``ds_hylo.layers`` adapter.
        d_in: input width including the bias column; d_out: output width.
        max_rows: bound on the rows held (captured inputs, with or without output gradient), or None.
        enabled: whether forward passes are captured.
        overflowed: a pass was refused since the last ``clear()`` because of ``max_rows``.
        refused_passes: number of passes refused because of ``max_rows`` (never reset).
        seen_while_disabled: the module ran a forward pass with gradients, outside ``no_capture``,
            while ``enabled`` was False (never reset; no tensor is kept).
        recompute_not_captured: a reentrant-checkpointing recomputation was not captured because
            ``keep_outputs`` is True (never reset).
        row_plan: called with the layer at the first captured pass of a generation; returns a
            ``KISReservoir`` to stream that generation's rows into, or None to store them all.
    """

    def __init__(
        self,
        name: str,
        module: nn.Module,
        sequence_convention: str = "expand",
        keep_outputs: bool = False,
        *,
        max_rows: Optional[int] = None,
        adapter: Optional[LayerAdapter] = None,
        drop_zero_rows: bool = True,
    ) -> None:
        adapter = adapter if adapter is not None else adapter_for(module)
        if adapter is None:
            raise TypeError(f"layer {name!r} of type {type(module).__name__} has no HyLo kernel")
        if adapter.module is not module:
            raise ValueError(f"layer {name!r}: the adapter given wraps another module")
        if sequence_convention not in SEQUENCE_CONVENTIONS:
            raise ValueError(f"sequence_convention={sequence_convention!r}; choose one of {SEQUENCE_CONVENTIONS}")
        if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
            raise ValueError(f"max_rows={max_rows!r} for layer {name!r}; allowed: None or an int >= 1")
        if not isinstance(drop_zero_rows, bool):
            raise ValueError(f"drop_zero_rows={drop_zero_rows!r} for layer {name!r}; allowed: True or False")
        self.name = name
        self.module = module
        self.adapter = adapter
        # an Embedding keeps token-level rows whatever the config says (ds_hylo.layers.embedding)
        self.sequence_convention = adapter.fixed_convention or sequence_convention
        # Sampled Fisher: keep the outputs (with their graph) instead of hooking the training
        # backward; the output gradients then come from ``set_output_grad``.
        self.keep_outputs = keep_outputs
        self.max_rows = max_rows
        self.drop_zero_rows = drop_zero_rows
        self.has_bias = adapter.has_bias
        self.d_out = adapter.d_out
        self.d_in = adapter.d_in
        self.enabled = False
        self.capture_seconds = 0.0
        self.overflowed = False
        self.refused_passes = 0
        self.seen_while_disabled = False
        self.recompute_not_captured = False
        # Slot i holds _inputs[i] (None once dropped; the raw input while in _reduce_pending) and
        # _output_grads[i] (None until its backward); _slot_rows[i] rows count towards max_rows.
        self._inputs: list[Optional[torch.Tensor]] = []
        self._output_grads: list[Optional[torch.Tensor]] = []
        self._slot_rows: list[int] = []
        self._droppable: list[bool] = []  # rows are positions ("expand", several per sample)
        self._reduce_pending: set[int] = set()
        self._trained: set[int] = set()  # kept-output slots whose training backward has run
        self._outputs: dict[int, torch.Tensor] = {}
        self._held_rows = 0
        self._generation = 0  # bumped by clear(): hooks of older passes are ignored
        self._version = 0  # bumped by every change of the matched rows (keys the kept-row cache)
        self._kept_cache: Optional[tuple[int, Optional[list[torch.Tensor]], int]] = None
        # Streamed KIS (see the class docstring): the generation's reservoir, whether it was planned,
        # "expand" slots holding their raw input, slots merged into the reservoir.
        self.row_plan: Optional[Callable[["LayerCapture"], Optional[KISReservoir]]] = None
        self._sampler: Optional[KISReservoir] = None
        self._planned = False
        self._raw_rows: set[int] = set()
        self._merged: set[int] = set()
        self._counts_cache: Optional[tuple[int, tuple[int, int]]] = None
        self._handle = module.register_forward_hook(self._forward_hook)

    @property
    def weight(self) -> torch.Tensor:
        """The layer's weight (its device and dtype)."""
        return self.adapter.weight

    # ------------------------------------------------------------------ hooks
    def remove(self) -> None:
        self._handle.remove()

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if capture_suspended() or not torch.is_grad_enabled() or not output.requires_grad:
            return
        if not all(p.requires_grad for p in self.adapter.params()):
            return  # frozen (or half frozen) now: no rows, nothing held (read at each pass: unfreezing counts at once)
        if not self.enabled:
            self.seen_while_disabled = True
            return
        if in_nonreentrant_recompute():
            return  # the original pass was captured (or refused) already
        in_backward = _in_backward()
        if in_backward and self.keep_outputs:
            self.recompute_not_captured = True
            return
        if not self._planned:
            self._planned = True
            self._sampler = self.row_plan(self) if self.row_plan is not None else None
        x = inputs[0]
        rows = self.adapter.row_count(x, self.sequence_convention)
        # A streamed KIS pass keeps only a reference to its input (the tensor autograd saves for the
        # weight gradient anyway) until its output gradient arrives and its rows are drawn into the
        # reservoir, which never holds more than the row budget: no bound on the rows it sees.
        reduces = self._reduces_positions(x)
        streamed = self._sampler is not None and not reduces and self.adapter.shape_of_positions(x)[1] > 1
        if not streamed and self.max_rows is not None and (self.overflowed or self.held_rows + rows > self.max_rows):
            if self.refused_passes == 0:
                warnings.warn(
                    f"HyLo: layer {self.name!r} holds {self.held_rows} captured rows and a pass of {rows} "
                    f"more would pass its bound max_rows={self.max_rows} (max_captured_mib); further passes "
                    "are not captured until the next step, so this refresh sees fewer rows. If step() is "
                    "called (under DeepSpeed: the engine is built by ds_hylo), the passes are too large for "
                    "the bound: raise max_captured_mib, or use mode='kis', whose streamed draw holds only "
                    "the row budget. Counted in stats()['refused_passes']. Warned once per layer.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self.overflowed = True
            self.refused_passes += 1
            return
        start = time.perf_counter()
        slot = len(self._inputs)
        if reduces:
            self._inputs.append(x.detach())  # averaged once the output gradient marks the live positions
            self._reduce_pending.add(slot)
        elif streamed:
            self._inputs.append(x.detach())  # rows drawn from it once the output gradient arrives
            self._raw_rows.add(slot)
        else:
            self._inputs.append(self.adapter.input_rows(x.detach(), self.sequence_convention))
        self._output_grads.append(None)
        self._slot_rows.append(rows)
        self._droppable.append(self.sequence_convention == "expand" and self.adapter.shape_of_positions(x)[1] > 1)
        self._held_rows += rows
        if self.keep_outputs:
            self._outputs[slot] = output
            output.register_hook(self._make_trained_hook(self._generation, slot))
        else:
            output.register_hook(self._make_grad_hook(self._generation, slot))
            if in_backward:
                # A forward inside a backward that is not a recognised non-reentrant
                # recomputation: reentrant checkpointing (its nested backward delivers the output
                # gradient before this backward ends) or a recomputation not recognised (no
                # gradient ever comes): drop the slot at the end of this backward if unmatched.
                _queue_end_of_backward(self._make_drop_unmatched(self._generation, slot))
        self.capture_seconds += time.perf_counter() - start

    def _reduces_positions(self, x: torch.Tensor) -> bool:
        """Whether this pass's rows average several positions per sample ("reduce" on sequences)."""
        return self.sequence_convention == "reduce" and self.adapter.shape_of_positions(x)[1] > 1

    def _make_grad_hook(self, generation: int, slot: int) -> Callable[[torch.Tensor], None]:
        def hook(grad_output: torch.Tensor) -> None:
            if generation != self._generation or capture_suspended():
                return
            if self._inputs[slot] is None and slot not in self._merged:
                return
            if not backward_accumulates(self.adapter.weight):
                return  # autograd.grad (gradient penalty, second loss): its gradient never reaches .grad
            start = time.perf_counter()
            self._record_output_grad(slot, grad_output.detach())
            self.capture_seconds += time.perf_counter() - start

        return hook

    def _record_output_grad(self, slot: int, grad_output: torch.Tensor) -> None:
        """Add one backward's output gradient to a slot (finishing a pending "reduce" input first)."""
        positions = self.adapter.output_grad_positions(grad_output, storage_dtype(grad_output))  # (B, P, d_out)
        if slot in self._reduce_pending:
            self._inputs[slot] = self._masked_input_mean(self._inputs[slot], positions)
            self._reduce_pending.discard(slot)
        if self.sequence_convention == "expand":
            rows = positions.reshape(-1, positions.shape[-1])
        else:
            rows = positions.sum(dim=1)
        self._version += 1
        if slot in self._merged:  # a later backward through a pass whose rows were drawn
            self._sampler.add_to_merged(slot, rows)
            return
        previous = self._output_grads[slot]
        self._output_grads[slot] = rows if previous is None else previous + rows
        if self._sampler is not None:
            self._merge(slot)

    def _merge(self, slot: int) -> None:
        """Draw a matched pass's rows into the reservoir and drop the pass's own rows (streamed KIS)."""
        inputs, grads = self._inputs[slot], self._output_grads[slot]
        if slot in self._raw_rows:
            positions = self.adapter.input_positions(inputs, storage_dtype(inputs))
            a_rows, bias = positions.reshape(-1, positions.shape[-1]), self.adapter.has_bias
        else:
            a_rows, bias = inputs, False  # rows built at the forward pass, bias column included
        self._sampler.merge(slot, a_rows, grads, bias=bias, droppable=self._droppable[slot] and self.drop_zero_rows)
        self._held_rows -= self._slot_rows[slot]
        self._inputs[slot] = None
        self._output_grads[slot] = None
        self._raw_rows.discard(slot)
        self._merged.add(slot)

    def _masked_input_mean(self, x: torch.Tensor, grad_positions: torch.Tensor) -> torch.Tensor:
        """"reduce" input rows (B, d_in): each sample's mean input over the positions whose output
        gradient is nonzero (over all positions when none is, or with ``drop_zero_rows=False``).
        No host-device sync."""
        positions = self.adapter.input_positions(x, storage_dtype(x))  # (B, P, d)
        count = positions.shape[1]
        if not self.drop_zero_rows:
            return self.adapter.with_bias_column(positions.mean(dim=1))
        live = grad_positions.ne(0).any(dim=-1).to(positions.dtype)  # (B, P)
        live_count = live.sum(dim=1, keepdim=True)
        weights = torch.where(live_count > 0, live / live_count.clamp_min(1), torch.full_like(live, 1.0 / count))
        means = (weights.unsqueeze(1) @ positions).squeeze(1)  # (B, d)
        return self.adapter.with_bias_column(means)

    def _make_trained_hook(self, generation: int, slot: int) -> Callable[[torch.Tensor], None]:
        """Kept outputs (sampled Fisher): note when the training backward (not the private
        sampled-label one) passes through the output, so ``drop_completed`` knows the pass is spent."""
        def hook(grad_output: torch.Tensor) -> None:
            if generation == self._generation and not _PRIVATE_BACKWARD[0] and backward_accumulates(self.adapter.weight):
                self._trained.add(slot)

        return hook

    def drop_completed(self) -> int:
        """Drop passes whose training backward has run (their gradient was just zeroed without a
        step); keep passes still awaiting their backward. Returns the number of slots dropped.

        Called at ``zero_grad()``: a loop that zeroes before ``backward()`` keeps its rows, a loop
        that skips a step (backward done, no ``step()``) loses the stale ones.
        """
        dropped = 0
        for slot, (a, g) in enumerate(zip(self._inputs, self._output_grads)):
            if a is None:
                continue
            spent = slot in self._trained if self.keep_outputs else g is not None
            if spent:
                self._drop_slot(slot)
                self._outputs.pop(slot, None)
                dropped += 1
        spent_merged = [slot for slot in sorted(self._merged) if not self.keep_outputs or slot in self._trained]
        if spent_merged:
            self._sampler.drop_slots(spent_merged)
            self._merged.difference_update(spent_merged)
            self._version += 1
            dropped += len(spent_merged)
        return dropped

    def _make_drop_unmatched(self, generation: int, slot: int) -> Callable[[], None]:
        def drop() -> None:
            if generation == self._generation and self._output_grads[slot] is None:
                self._drop_slot(slot)

        return drop

    def _drop_slot(self, slot: int) -> None:
        if self._inputs[slot] is not None:
            self._held_rows -= self._slot_rows[slot]
            self._inputs[slot] = None
            self._reduce_pending.discard(slot)
            self._raw_rows.discard(slot)
            self._version += 1

    # ------------------------------------------------------------ row building
    def awaiting_output_grads(self) -> list[tuple[int, torch.Tensor]]:
        """(slot, output) of kept forward outputs that have no output gradient yet (sampled Fisher)."""
        return sorted(self._outputs.items())

    def set_output_grad(self, slot: int, grad_output: Optional[torch.Tensor]) -> None:
        """Record dloss/dz for a kept output (zeros when the loss does not depend on it) and drop the output."""
        if slot not in self._outputs:
            raise KeyError(f"layer {self.name!r}: slot {slot} has no kept output awaiting its gradient")
        output = self._outputs.pop(slot)
        if grad_output is None:
            grad_output = torch.zeros_like(output)
        start = time.perf_counter()
        self._output_grads[slot] = None
        self._record_output_grad(slot, grad_output.detach())
        self.capture_seconds += time.perf_counter() - start

    # -------------------------------------------------------------- consumers
    def _matched_slots(self) -> list[int]:
        return [
            slot for slot, (a, g) in enumerate(zip(self._inputs, self._output_grads))
            if a is not None and g is not None and slot not in self._reduce_pending
        ]

    def _matched(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self._inputs[slot], self._output_grads[slot]) for slot in self._matched_slots()]

    def _kept(self) -> tuple[Optional[list[torch.Tensor]], int]:
        """(per-slot keep masks, or None to keep every row; number of rows kept) of the matched slots.

        One host read per call (cached until the rows change)."""
        if self._kept_cache is not None and self._kept_cache[0] == self._version:
            return self._kept_cache[1], self._kept_cache[2]
        slots = self._matched_slots()
        total = sum(self._output_grads[slot].shape[0] for slot in slots)
        masks: Optional[list[torch.Tensor]] = None
        kept = total
        droppable = [slot for slot in slots if self._droppable[slot]]
        if self.drop_zero_rows and droppable:
            live = {slot: self._output_grads[slot].ne(0).any(dim=1) for slot in droppable}
            dropped = sum(self._output_grads[slot].shape[0] for slot in droppable) - sum(
                _host_ints([mask.sum() for mask in live.values()])
            )
            if 0 < dropped < total:  # dropped == total: a dead layer, every row is kept
                masks = [live[slot] if slot in live else self._all_rows(slot) for slot in slots]
                kept = total - dropped
        self._kept_cache = (self._version, masks, kept)
        return masks, kept

    def _all_rows(self, slot: int) -> torch.Tensor:
        rows = self._output_grads[slot]
        return torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)

    @property
    def num_rows(self) -> int:
        """Samples N: matched rows (input and output gradient) that carry signal; ``take`` returns
        them all, or (streamed KIS) the rows drawn from them."""
        if self._sampler is not None:
            return self._sampled_counts()[0]
        return self._kept()[1]

    @property
    def sampled(self) -> bool:
        """Whether this generation's rows are streamed into a KIS reservoir (``take`` gives drawn rows)."""
        return self._sampler is not None

    @property
    def sampled_rows(self) -> int:
        """Streamed KIS: drawn rows ``take`` can return (>= the KIS budget of ``num_rows``); else ``num_rows``."""
        if self._sampler is not None:
            return self._sampled_counts()[1]
        return self.num_rows

    def _sampled_counts(self) -> tuple[int, int]:
        """The reservoir's (N, rows that may be taken), cached until the rows change (<= one host read)."""
        if self._counts_cache is None or self._counts_cache[0] != self._version:
            self._counts_cache = (self._version, self._sampler.counts())
        return self._counts_cache[1]

    @property
    def held_rows(self) -> int:
        """Rows held: captured inputs, with or without their output gradient, and rows drawn into the
        KIS reservoir (<= ``max_rows``)."""
        return self._held_rows + (self._sampler.size if self._sampler is not None else 0)

    def held_bytes(self) -> int:
        """Bytes of the tensors this layer holds for the next refresh (inputs kept by reference count
        in full, though autograd may share them until the backward)."""
        tensors = [t for t in self._inputs + self._output_grads if t is not None]
        total = sum(t.numel() * t.element_size() for t in tensors)
        return total + (self._sampler.held_bytes() if self._sampler is not None else 0)

    def has_data(self) -> bool:
        return self.num_rows > 0

    def take(self, per_sample_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Return and clear the captured rows: A (n, d_in) and G (n, d_out) = raw * per_sample_scale.

        n = ``num_rows``: rows with a zero output gradient are left out (unless all are), and
        forward passes whose backward never reached this layer are dropped. Streamed KIS: the
        ``sampled_rows`` rows drawn, in draw order (the KIS budget is the first ones).
        """
        if self._sampler is not None:
            count = self.sampled_rows
            if count < 1:
                self.clear()
                raise RuntimeError(f"layer {self.name!r} has no captured rows")
            a, g = self._sampler.take(count)
            self.clear()
            return a, g * per_sample_scale
        pairs = self._matched()
        masks, _ = self._kept()
        self.clear()
        if not pairs:
            raise RuntimeError(f"layer {self.name!r} has no captured rows")
        a = torch.cat([a for a, _ in pairs])
        g = torch.cat([g for _, g in pairs])
        if masks is not None:
            keep = torch.cat(masks)
            a, g = a[keep], g[keep]
        return a, g * per_sample_scale

    def has_unmatched_inputs(self) -> bool:
        """Whether some captured forward pass has no output gradient (its backward never came)."""
        return any(a is not None and g is None for a, g in zip(self._inputs, self._output_grads))

    def clear(self) -> None:
        """Drop every captured row and start a new generation (hooks of earlier passes are ignored).

        Resets ``overflowed``; ``refused_passes``, ``seen_while_disabled`` and
        ``recompute_not_captured`` are kept.
        """
        self._inputs.clear()
        self._output_grads.clear()
        self._slot_rows.clear()
        self._droppable.clear()
        self._reduce_pending.clear()
        self._trained.clear()
        self._outputs.clear()
        self._held_rows = 0
        self._generation += 1
        self._version += 1
        self._kept_cache = None
        self._counts_cache = None
        self._sampler = None
        self._planned = False
        self._raw_rows.clear()
        self._merged.clear()
        self.overflowed = False

    # ------------------------------------------------------------- gradients
    def gradient_matrix(self, grad_of: Optional[GradAccessor] = None) -> Optional[torch.Tensor]:
        """The layer's gradient as (d_out, d_in) (bias last column), or None if it has no grad.

        ``grad_of(param)`` says where a parameter's gradient lives (default: ``param.grad``).
        """
        return self.adapter.gradient_matrix(grad_of)

    def set_gradient_matrix(self, mat: torch.Tensor, grad_of: Optional[GradAccessor] = None) -> None:
        """Write a (d_out, d_in) matrix back into the weight's (and bias's) gradient, in their dtype."""
        self.adapter.set_gradient_matrix(mat, grad_of)


def _host_ints(counts: list[torch.Tensor]) -> list[int]:
    """0-d integer tensors -> host ints with one transfer per device (usually one in all)."""
    if len({count.device for count in counts}) == 1:
        return [int(x) for x in torch.stack(counts).tolist()]
    return [int(count) for count in counts]
