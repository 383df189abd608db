"""Host reads per optimizer step (issue 10): at most one on a step that reuses the factors, and a
number per refresh that grows with the layers, never with the rank (no per-pivot reads).

Counted at Python level (``int()``, ``float()``, ``bool()``, ``.item()``, ``.tolist()`` on a
tensor): on a GPU each is a host-device synchronisation. ``benchmarks/step_time.py`` counts the
real CUDA synchronisations with ``torch.cuda.set_sync_debug_mode`` on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ds_hylo
from conftest import HostReads

def _model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(6, width), nn.Tanh()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 3))


def _reads_per_step(monkeypatch, mode: str, depth: int, batch: int, steps: int = 4) -> list[int]:
    model = _model(16, depth)
    hybrid = {"switch_window": 1000} if mode == "hybrid" else {}  # a hybrid-mode option (refused otherwise)
    opt = ds_hylo.HyLo(model, lr=0.05, base="sgd", momentum=0.9, mode=mode, rank_ratio=0.5, update_freq=2, damping=0.3,
                       kl_clip=1e-2, **hybrid)
    reads = HostReads(monkeypatch, active=False)
    gen = torch.Generator().manual_seed(1)
    counts = []
    for _ in range(steps):
        x, y = torch.randn(batch, 6, generator=gen), torch.randint(0, 3, (batch,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        counts.append(reads.during(opt.step))
    return counts


@pytest.mark.parametrize("mode", ["kis", "kid", "hybrid", "sngd"])
def test_one_host_read_per_step_between_refreshes(monkeypatch, mode):
    counts = _reads_per_step(monkeypatch, mode, depth=4, batch=16)
    assert counts[1] <= 1 and counts[3] <= 1, f"reads per step (refresh, reuse, ...): {counts}"


@pytest.mark.parametrize("mode", ["kis", "kid", "sngd"])
def test_refresh_reads_grow_with_layers_not_with_rank(monkeypatch, mode):
    """Doubling the batch (so the kept rank) leaves the refresh's reads unchanged; they are O(1) per layer."""
    small = _reads_per_step(monkeypatch, mode, depth=4, batch=16)[0]
    large = _reads_per_step(monkeypatch, mode, depth=4, batch=64)[0]
    assert small == large, (small, large)
    deeper = _reads_per_step(monkeypatch, mode, depth=8, batch=16)[0]
    assert deeper <= small + 4 * 4, (small, deeper)  # at most 4 reads per added layer
    assert small <= 4 * 4 + 4, small


def _syncs_per_step(mode: str, depth: int, steps: int = 3) -> list[int]:
    """Every would-be synchronisation of ``opt.step()`` (ds_hylo.counters.HostSyncs: value reads,
    tolist, data-dependent shapes, host-data copies), base SGD without momentum (no reads of its own)."""
    from ds_hylo.counters import HostSyncs

    model = _model(16, depth)
    opt = ds_hylo.HyLo(model, lr=0.05, base="sgd", mode=mode, rank_ratio=0.5, update_freq=2, damping=0.3)
    gen = torch.Generator().manual_seed(1)
    counts = []
    for _ in range(steps):
        x, y = torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        with HostSyncs() as syncs:
            opt.step()
        counts.append(syncs.total())
    return counts


@pytest.mark.parametrize("mode", ["kis", "sngd"])
def test_kis_and_sngd_refresh_syncs_do_not_grow_with_layers(mode):
    """O(1) per refresh (issue 20): the factorizations' statuses, the gathered row counts and the
    finiteness/cancellation checks are each read once for all layers; one read on a plain step."""
    shallow, deep = _syncs_per_step(mode, depth=3), _syncs_per_step(mode, depth=9)
    assert shallow[0] == deep[0] <= 6, (shallow, deep)
    assert shallow[1] == deep[1] == 1, (shallow, deep)


def test_a_failed_deferred_factorization_is_redone(monkeypatch):
    """The refresh reads the Cholesky statuses once; a layer whose first attempt failed is redone
    with the jittered retries, so its factors equal those of a run whose first attempts succeed."""
    from ds_hylo import kernels

    def factors(fail_first: bool):
        original = kernels.cholesky_with_jitter

        def flaky(matrix, max_tries=6, deferred=None):
            if deferred is not None and fail_first:
                deferred.append(torch.ones((), dtype=torch.int32))
                return torch.eye(matrix.shape[0], dtype=matrix.dtype)  # the placeholder of a failed attempt
            return original(matrix, max_tries, deferred)

        monkeypatch.setattr(kernels, "cholesky_with_jitter", flaky)
        model = _model(8, 3)
        opt = ds_hylo.HyLo(model, lr=0.05, base="sgd", mode="kis", rank_ratio=0.5, update_freq=2, damping=0.3)
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        monkeypatch.setattr(kernels, "cholesky_with_jitter", original)
        return opt.preconditioner.factors, opt.stats()["nonfinite_events"]

    redone, events = factors(fail_first=True)
    clean, _ = factors(fail_first=False)
    assert events == 0 and set(redone) == set(clean)
    for name in clean:
        assert torch.equal(redone[name].c, clean[name].c), name
