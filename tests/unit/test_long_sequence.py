"""KID at token-level row counts (issue 11 item 5): no dense (n, n) kernel above the threshold.

Below ``KID.exact_max_rows`` the reduction is today's dense path bit for bit; above it
``kernels.kid_local_rows`` takes the exact skeleton from the rows and keeps the residual on
diagonal blocks. Checked against dense float64 references (kid_local, exact SMW).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import DT, exact_smw, rel_err
from ds_hylo import kernels
from ds_hylo.reduce import KID

DAMPING = 0.1


def _rows(n: int, d_in: int, d_out: int, seed: int = 0, dtype: torch.dtype = DT):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d_in, generator=gen, dtype=DT)
    g = torch.randn(n, d_out, generator=gen, dtype=DT)
    return a.to(dtype), g.to(dtype)


def _low_rank_rows(n: int, d_in: int, d_out: int, rank_a: int, rank_g: int, seed: int = 0):
    """Rows with a_i (g_i) in a rank_a (rank_g) dimensional subspace: rank(K) <= rank_a * rank_g."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, rank_a, generator=gen, dtype=DT) @ torch.randn(rank_a, d_in, generator=gen, dtype=DT)
    g = torch.randn(n, rank_g, generator=gen, dtype=DT) @ torch.randn(rank_g, d_out, generator=gen, dtype=DT)
    return a, g


def _old_reduce(a, g, budget, padded, damping, global_rows):
    """KID.reduce as it was before the bounded path (the dense kernel for every n)."""
    local_kernel = kernels.kernel(a.double(), g.double())
    picked, m_factor = kernels.kid_local(local_kernel, budget, damping, global_rows)
    return a[picked], g[picked], m_factor.to(a.dtype)


def _step(reduction: KID, a, g, grad, budget, damping=DAMPING):
    """One rank's KID step through the reduction's reduce and inverse, then (*)."""
    n = a.shape[0]
    rows = reduction.reduce(a, g, budget, budget, damping, n, None)
    c_mat = reduction.inverse(rows, damping, n)
    return kernels.apply_smw(grad, rows.a.double(), rows.g.double(), c_mat, damping)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(item, torch.Tensor):
                self.largest = max(self.largest, item.numel())
        return out


# --------------------------------------------------------------------------- (1) below the threshold


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [5, 40])  # 40 == exact_max_rows: still the dense path
def test_below_threshold_is_bit_identical_to_dense_path(monkeypatch, dtype, n):
    a, g = _rows(n, 6, 4, seed=1, dtype=dtype)

    def refuse(*args, **kwargs):
        raise AssertionError("the bounded path ran below the threshold")

    monkeypatch.setattr(kernels, "kid_local_rows", refuse)
    budget = 7
    rows = KID(exact_max_rows=40).reduce(a, g, budget, budget + 2, DAMPING, 3 * n, None)
    want_a, want_g, want_m = _old_reduce(a, g, budget, budget + 2, DAMPING, 3 * n)
    kept = want_a.shape[0]  # min(budget, n)
    assert rows.valid == kept == min(budget, n)
    assert torch.equal(rows.a[:kept], want_a) and torch.equal(rows.g[:kept], want_g)
    assert torch.equal(rows.m_factor[:kept, :kept], want_m)
    assert not rows.a[kept:].any() and not rows.m_factor[kept:].any() and not rows.m_factor[:, kept:].any()


def test_exact_flag_forces_dense_path_at_any_size(monkeypatch):
    a, g = _rows(60, 5, 4, seed=2)
    monkeypatch.setattr(kernels, "kid_local_rows", lambda *args: (_ for _ in ()).throw(AssertionError))
    rows = KID(exact_max_rows=None).reduce(a, g, 9, 9, DAMPING, 60, None)
    want_a, _, want_m = _old_reduce(a, g, 9, 9, DAMPING, 60)
    assert torch.equal(rows.a, want_a) and torch.equal(rows.m_factor, want_m)


def test_default_threshold_keeps_dense_path_for_existing_problem_sizes():
    assert KID().uses_exact_path(1024) and not KID().uses_exact_path(1025)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(exact_max_rows=0), r"exact_max_rows.*None or an int >= 1.*0"),
        (dict(exact_max_rows=2.5), r"exact_max_rows.*2.5"),
        (dict(residual_block_rows=0), r"residual_block_rows.*int >= 1.*0"),
    ],
)
def test_bad_settings_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KID(**kwargs)


# --------------------------------------------------------------------------- (2) bounded memory


def test_above_threshold_never_forms_an_n_by_n_tensor(monkeypatch):
    """Largest tensor of the bounded reduce is O(n * (r + block + d)), against n^2 for the dense one."""
    n, d_in, d_out, budget, block = 600, 12, 10, 20, 32
    a, g = _rows(n, d_in, d_out, seed=3)
    seen_kernel_rows = []
    original_kernel = kernels.kernel
    monkeypatch.setattr(kernels, "kernel", lambda x, y: seen_kernel_rows.append(x.shape[0]) or original_kernel(x, y))

    bounded, dense = _LargestTensor(), _LargestTensor()
    with bounded:
        KID(exact_max_rows=100, residual_block_rows=block).reduce(a, g, budget, budget, DAMPING, n, None)
    assert seen_kernel_rows == []  # the dense kernel is not built at all
    with dense:
        KID(exact_max_rows=None).reduce(a, g, budget, budget, DAMPING, n, None)
    assert seen_kernel_rows == [n]
    assert dense.largest >= n * n  # the measure sees the dense kernel: it can fail
    assert bounded.largest <= n * max(budget, block, d_in, d_out) + 4 * n


# --------------------------------------------------------------------------- (3) accuracy


def test_single_block_equals_dense_kid_local():
    """One residual block (n <= block_rows) is the dense KID to round-off, on a full-rank kernel."""
    a, g = _rows(90, 7, 5, seed=4)
    pivots, factor = kernels.kid_local(kernels.kernel(a, g), 15, DAMPING, 200)
    got_pivots, got_factor = kernels.kid_local_rows(a, g, 15, DAMPING, 200, block_rows=90)
    assert torch.equal(got_pivots, pivots)
    assert rel_err(got_factor @ got_factor.T, factor @ factor.T) < 1e-10


def test_skeleton_is_the_dense_skeleton_with_small_blocks():
    a, g = _rows(150, 6, 5, seed=5)
    pivots, _ = kernels.kid_local(kernels.kernel(a, g), 25, DAMPING, 150)
    got, _ = kernels.kid_local_rows(a, g, 25, DAMPING, 150, block_rows=16)
    assert torch.equal(got, pivots)


@pytest.mark.parametrize("block", [1, 16, 500])
def test_low_rank_kernel_step_is_exact_smw(block):
    """rank(K) = 12 < r: the skeleton spans every row, E = 0 and the step is exact SMW at any block size."""
    n = 300
    a, g = _low_rank_rows(n, 10, 8, rank_a=4, rank_g=3, seed=6)
    grad = g.T @ a / n + 0.01 * torch.randn(8, 10, generator=torch.Generator().manual_seed(7), dtype=DT)
    step = _step(KID(exact_max_rows=50, residual_block_rows=block), a, g, grad, budget=20)
    assert rel_err(step, exact_smw(a, g, grad, DAMPING)) < 1e-6


def test_full_rank_kernel_step_close_to_dense_kid():
    """Full-rank kernel, r < rank(K): the block residual changes the step a little, and it descends."""
    n = 256
    a, g = _rows(n, 8, 6, seed=8)
    grad = g.T @ a / n
    dense = _step(KID(exact_max_rows=None), a, g, grad, budget=32)
    bounded = _step(KID(exact_max_rows=64, residual_block_rows=64), a, g, grad, budget=32)
    assert rel_err(bounded, dense) < 0.05
    cosine = float((bounded * grad).sum() / (bounded.norm() * grad.norm()))
    assert cosine > 0.5


def test_float32_rows_above_threshold():
    a, g = _low_rank_rows(200, 6, 5, rank_a=3, rank_g=2, seed=9)
    grad = (g.T @ a / 200).float()
    step = _step(KID(exact_max_rows=50, residual_block_rows=32), a.float(), g.float(), grad, budget=10)
    assert step.dtype == torch.float32
    assert rel_err(step.double(), exact_smw(a.float().double(), g.float().double(), grad.double(), DAMPING)) < 1e-4


# --------------------------------------------------------------------------- (4) determinism, failures


def test_bounded_path_is_deterministic_and_ignores_the_generator():
    a, g = _rows(300, 6, 5, seed=10)
    reduction = KID(exact_max_rows=64, residual_block_rows=40)
    first = reduction.reduce(a, g, 20, 24, DAMPING, 300, None)
    second = reduction.reduce(a, g, 20, 24, DAMPING, 300, torch.Generator().manual_seed(123))
    assert torch.equal(first.a, second.a) and torch.equal(first.m_factor, second.m_factor)


def test_bounded_path_reads_the_host_at_most_twice(monkeypatch):
    from conftest import HostReads

    a, g = _rows(120, 5, 4, seed=11)
    reads = HostReads(monkeypatch)
    pivots, factor = kernels.kid_local_rows(a, g, 10, DAMPING, 120, block_rows=32)
    assert reads.count <= 2
    assert pivots.numel() == 10 and factor.shape == (10, 10)


def test_nonfinite_rows_give_a_nan_factor_not_silent_identity():
    a, g = _rows(100, 5, 4, seed=12)
    a[17, 2] = float("nan")
    with pytest.raises(kernels.FactorizationError, match="non-finite"):
        kernels.kid_local_rows(a, g, 10, DAMPING, 100, block_rows=32)
    rows = KID(exact_max_rows=50).reduce(a, g, 10, 10, DAMPING, 100, None)
    assert torch.isnan(rows.m_factor).all()


def test_zero_rows_give_an_empty_skeleton():
    a = torch.zeros(80, 4, dtype=DT)
    g = torch.randn(80, 3, dtype=DT)
    pivots, factor = kernels.kid_local_rows(a, g, 10, DAMPING, 80, block_rows=16)
    assert pivots.numel() == 0 and factor.shape == (0, 0)


def test_bad_block_rows_is_refused():
    a, g = _rows(10, 3, 2)
    with pytest.raises(ValueError, match=r"block_rows.*0"):
        kernels.kid_local_rows(a, g, 4, DAMPING, 10, block_rows=0)
