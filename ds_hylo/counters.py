"""Counting, not guessing: matmul FLOPs by dtype and would-be host-device synchronisations.

Both are ``TorchDispatchMode`` context managers that see every aten op run inside them (the
model's forward and backward, HyLo's refresh and apply), on any device:

- :class:`FlopsByDtype` adds the FLOPs of each matrix product (torch's own formulas,
  ``torch.utils.flop_counter.flop_registry``) to the dtype it runs in, so a claim such as "the
  per-step apply issues no float64 products" is a number.
- :class:`HostSyncs` counts the ops that make the host wait for a CUDA device: reading a value
  (``.item()``, ``bool()``, ``int()`` -> ``aten._local_scalar_dense``), ops whose output size
  depends on the data (boolean-mask indexing, ``nonzero``, ``masked_select``, ``unique``), copies
  between devices, and tensors made from host data (``torch.tensor(list)``, a host-to-device copy
  on CUDA). ``Tensor.tolist()`` does not pass through the dispatcher; the mode counts it by
  wrapping the method while active. On a CPU-only machine this finds, op by op, what would
  synchronise on a GPU; on CUDA, ``torch.cuda.set_sync_debug_mode`` is the ground truth.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

__all__ = ["FlopsByDtype", "HostSyncs"]

_aten = torch.ops.aten


class FlopsByDtype(TorchDispatchMode):
    """Matmul FLOPs per dtype of everything run inside ``with FlopsByDtype() as flops:``.

    ``flops.by_dtype``: {torch.dtype: FLOPs}; ``flops.share(torch.float64)``: that dtype's share of
    all counted FLOPs (0.0 when nothing was counted); ``flops.shapes[dtype]``: the output shape of
    every counted product in that dtype.
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_dtype: Counter = Counter()
        self.shapes: dict[torch.dtype, list[tuple[int, ...]]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if first is not None:
                self.by_dtype[first.dtype] += int(formula(*args, **kwargs, out_val=out))
                result = out[0] if isinstance(out, (tuple, list)) else out
                self.shapes.setdefault(first.dtype, []).append(tuple(getattr(result, "shape", ())))
        return out

    def total(self) -> int:
        return sum(self.by_dtype.values())

    def share(self, dtype: torch.dtype) -> float:
        total = self.total()
        return self.by_dtype[dtype] / total if total else 0.0


_DATA_DEPENDENT = {
    _aten.nonzero, _aten.masked_select, _aten._unique2, _aten.unique_dim, _aten.unique_consecutive,
    _aten.repeat_interleave,
}


class HostSyncs(TorchDispatchMode):
    """Would-be host-device synchronisations of everything run inside ``with HostSyncs() as syncs:``.

    ``syncs.counts``: Counter by kind: "read" (a value read by the host: ``_local_scalar_dense``,
    ``tolist``), "data_dependent" (output size read from the data: ``nonzero``, boolean-mask
    indexing, ...), "cross_device" (a copy between two devices), "host_data" (a tensor made from
    host data: a host-to-device copy where the target is a GPU). ``syncs.total()`` sums them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()
        self._tolist = None

    def __enter__(self) -> "HostSyncs":
        original = torch.Tensor.tolist
        counts = self.counts
        depth = [0]

        def counted_tolist(tensor: torch.Tensor) -> Any:
            # only the outermost call: a torch function mode (a default device set with
            # torch.set_default_device) calls the method again from inside
            if not depth[0]:
                counts["read"] += 1
            depth[0] += 1
            try:
                return original(tensor)
            finally:
                depth[0] -= 1

        self._tolist = original
        torch.Tensor.tolist = counted_tolist  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.Tensor.tolist = self._tolist  # type: ignore[method-assign]
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet is _aten._local_scalar_dense:
            self.counts["read"] += 1
        elif packet in _DATA_DEPENDENT:
            self.counts["data_dependent"] += 1
        elif packet is _aten.index and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])
        ):
            self.counts["data_dependent"] += 1
        elif packet in (_aten.lift_fresh, _aten.lift_fresh_copy):
            self.counts["host_data"] += 1
        elif packet in (_aten._to_copy, _aten.copy_):
            devices = {a.device for a in args if isinstance(a, torch.Tensor)}
            if "device" in kwargs and kwargs["device"] is not None:
                devices.add(torch.device(kwargs["device"]))
            if len(devices) > 1:
                self.counts["cross_device"] += 1
        return func(*args, **kwargs)

    def total(self) -> int:
        return sum(self.counts.values())
