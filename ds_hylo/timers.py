"""Cumulative timers per phase (fisher, reduce, communicate, invert, apply) that never stall the device.

CPU work is timed with ``time.perf_counter``. Work on a CUDA device is timed with CUDA events
recorded on the current stream: recording does not synchronise, and the elapsed times are read
only when a summary is asked for (or, to bound memory, once many events are pending).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator, Optional

import torch

PHASES = ("capture", "fisher", "reduce", "communicate", "invert", "apply")
_MAX_PENDING_EVENTS = 4096


class PhaseTimers:
    """Total seconds and call counts per phase, without host-device synchronisation on the hot path."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def phase(self, name: str, device: Optional[torch.device] = None) -> Iterator[None]:
        """Time the enclosed work; ``device`` says where it runs (CUDA: events, else wall clock)."""
        self.counts[name] += 1
        if device is not None and device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(device))
            try:
                yield
            finally:
                end.record(torch.cuda.current_stream(device))
                self._events.append((name, start, end))
                if len(self._events) > _MAX_PENDING_EVENTS:
                    self._resolve()
            return
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - begin

    def _resolve(self) -> None:
        """Fold recorded CUDA events into the totals (waits for them: off the hot path)."""
        for name, start, end in self._events:
            end.synchronize()
            self.seconds[name] += start.elapsed_time(end) / 1e3
        self._events.clear()

    def summary(self) -> dict[str, dict[str, float]]:
        """{phase: {"seconds": total, "calls": n, "mean_ms": per call}} for every phase seen."""
        self._resolve()
        return {
            name: {
                "seconds": self.seconds[name],
                "calls": self.counts[name],
                "mean_ms": 1e3 * self.seconds[name] / max(1, self.counts[name]),
            }
            for name in sorted(self.counts)
        }
