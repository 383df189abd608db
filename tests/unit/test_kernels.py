"""Pure-math tests of ds_hylo.kernels against dense float64 references (docs/design.md section 1)."""

from __future__ import annotations

import pytest
import torch

from conftest import DT, HostReads, exact_smw, outer_rows, rel_err
from ds_hylo import kernels


def _rows(n: int, d_in: int, d_out: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d_in, generator=gen, dtype=DT)
    g = torch.randn(n, d_out, generator=gen, dtype=DT)
    return a, g


def _low_rank_rows(n: int, d_in: int, d_out: int, rank_a: int, rank_g: int, seed: int = 0):
    """Rows whose a_i (g_i) lie in a rank_a (rank_g) dimensional subspace: rank(K) <= rank_a * rank_g."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, rank_a, generator=gen, dtype=DT) @ torch.randn(rank_a, d_in, generator=gen, dtype=DT)
    g = torch.randn(n, rank_g, generator=gen, dtype=DT) @ torch.randn(rank_g, d_out, generator=gen, dtype=DT)
    return a, g


def _mean_grad(a, g):
    """The batch gradient (1/N) sum_i g_i a_i^T of the rows, as a (d_out, d_in) matrix."""
    return g.T @ a / a.shape[0]


def _kid_direction(a, g, grad, damping, max_rank, blocks=1):
    """KID step emulating ``blocks`` workers: kid_local per row block, then one kid_inverse."""
    n = a.shape[0]
    pieces = torch.arange(n).chunk(blocks)
    skel_a, skel_g, factors = [], [], []
    for rows in pieces:
        k_local = kernels.kernel(a[rows], g[rows])
        pivots, m_factor = kernels.kid_local(k_local, max_rank, damping, n)
        skel_a.append(a[rows][pivots])
        skel_g.append(g[rows][pivots])
        factors.append(m_factor)
    a_s, g_s = torch.cat(skel_a), torch.cat(skel_g)
    c_mat = kernels.kid_inverse(kernels.kernel(a_s, g_s), torch.block_diag(*factors))
    return kernels.apply_smw(grad, a_s, g_s, c_mat, damping)


# --------------------------------------------------------------------------- building blocks


def test_kernel_project_expand_match_explicit_u():
    a, g = _rows(7, 4, 3)
    u = outer_rows(g, a, has_bias=False)  # (N, d_out*d_in), u_i = vec(g_i a_i^T)
    grad = torch.randn(3, 4, dtype=DT)
    c = torch.randn(7, dtype=DT)
    torch.testing.assert_close(kernels.kernel(a, g), u @ u.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kernels.kernel_diag(a, g), (u * u).sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kernels.project(a, g, grad), u @ grad.reshape(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kernels.expand(a, g, c), (u.T @ c).reshape(3, 4), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("damping", [1e-3, 0.1, 3.0])
def test_sngd_smw_equals_dense_solve(damping):
    a, g = _rows(9, 5, 4, seed=1)
    grad = _mean_grad(a, g) + 0.1 * torch.randn(4, 5, dtype=DT)
    c_mat = kernels.sngd_inverse(kernels.kernel(a, g), damping, a.shape[0])
    got = kernels.apply_smw(grad, a, g, c_mat, damping)
    assert rel_err(got, exact_smw(a, g, grad, damping)) < 1e-10


def test_kis_inverse_with_all_rows_is_exact_smw():
    a, g = _rows(8, 3, 4, seed=2)
    grad = _mean_grad(a, g)
    c_mat = kernels.kis_inverse(kernels.kernel(a, g), 0.05)
    got = kernels.apply_smw(grad, a, g, c_mat, 0.05)
    assert rel_err(got, exact_smw(a, g, grad, 0.05)) < 1e-10


def test_cholesky_with_jitter_handles_singular_and_rejects_nonfinite():
    v = torch.randn(5, 1, dtype=DT)
    singular = v @ v.T  # rank 1
    factor = kernels.cholesky_with_jitter(singular)
    assert torch.isfinite(factor).all()
    torch.testing.assert_close(factor @ factor.T, singular, rtol=0, atol=1e-6 * float(singular.diagonal().max()))
    bad = singular.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(kernels.FactorizationError):
        kernels.cholesky_with_jitter(bad)


# --------------------------------------------------------------------------- KID


def test_kid_full_rank_is_exact_smw():
    a, g = _rows(10, 4, 3, seed=3)
    grad = _mean_grad(a, g)
    got = _kid_direction(a, g, grad, 0.1, max_rank=10)
    assert rel_err(got, exact_smw(a, g, grad, 0.1)) < 1e-9


@pytest.mark.parametrize("max_rank", [4, 6])
def test_kid_exact_on_low_rank_kernel(max_rank):
    """rank(K) = 4 < r < N or = r < N: the skeleton spans every u_i, E = 0, and KID is exact."""
    a, g = _low_rank_rows(16, 5, 4, rank_a=2, rank_g=2, seed=4)
    k_mat = kernels.kernel(a, g)
    assert int(torch.linalg.matrix_rank(k_mat)) == 4
    grad = _mean_grad(a, g) + 0.3 * torch.randn(4, 5, dtype=DT, generator=torch.Generator().manual_seed(9))
    got = _kid_direction(a, g, grad, 0.05, max_rank=max_rank)
    assert rel_err(got, exact_smw(a, g, grad, 0.05)) < 1e-8


@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_kid_direction_descends_at_low_rank(blocks):
    """At r < rank(K) KID is approximate but must point downhill and never exceed grad / lam.

    v = (1/lam)(I - U_S C U_S^T) grad with 0 <= U_S C U_S^T <= I, so 0 < g.v <= |g|^2 / lam.
    (The public reference code's KID produced uphill steps 67x the gradient: docs/design.md section 1.4.)
    """
    a, g = _rows(24, 6, 5, seed=5)
    damping = 0.01
    grad = _mean_grad(a, g)
    v = _kid_direction(a, g, grad, damping, max_rank=3, blocks=blocks)
    cos = float((v * grad).sum() / (v.norm() * grad.norm()))
    assert cos > 0.0
    assert float(v.norm()) <= float(grad.norm()) / damping * (1 + 1e-9)
    # and it is a real preconditioner: not just grad / lam
    assert rel_err(v, grad / damping) > 1e-3


def test_kid_two_workers_full_rank_is_exact_smw():
    """Two workers: kid_local on each half, block-diagonal M, one kid_inverse == exact SMW."""
    a, g = _rows(12, 4, 3, seed=6)
    grad = _mean_grad(a, g)
    got = _kid_direction(a, g, grad, 0.2, max_rank=6, blocks=2)
    assert rel_err(got, exact_smw(a, g, grad, 0.2)) < 1e-9


def test_kid_two_workers_low_rank_kernel_is_exact():
    a, g = _low_rank_rows(20, 5, 4, rank_a=1, rank_g=3, seed=7)  # rank(K) = 3
    grad = _mean_grad(a, g)
    got = _kid_direction(a, g, grad, 0.02, max_rank=4, blocks=2)
    assert rel_err(got, exact_smw(a, g, grad, 0.02)) < 1e-8


def test_kid_local_on_zero_kernel_returns_empty_factor():
    pivots, m_factor = kernels.kid_local(torch.zeros(5, 5, dtype=DT), 3, 0.1, 5)
    assert pivots.numel() == 0 and m_factor.shape == (0, 0)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_kid_local_rejects_nonfinite_kernel(bad):
    """A non-finite kernel must raise, not come back as a silent rank-0 (= unpreconditioned) factor."""
    a, g = _rows(6, 3, 2, seed=16)
    g[2, 1] = bad
    with pytest.raises(kernels.FactorizationError):
        kernels.kid_local(kernels.kernel(a, g), 4, 0.1, 6)


# --------------------------------------------------------------------------- pivoted Cholesky


def test_pivoted_cholesky_exact_on_pivot_rows_and_columns():
    a, g = _rows(12, 4, 3, seed=8)
    k_mat = kernels.kernel(a, g)
    pivots, factor = kernels.pivoted_cholesky(k_mat, 5)
    assert pivots.numel() == 5 and factor.shape == (12, 5)
    assert len(set(pivots.tolist())) == 5
    approx = factor @ factor.T
    torch.testing.assert_close(approx[pivots], k_mat[pivots], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(approx[:, pivots], k_mat[:, pivots], rtol=1e-10, atol=1e-10)
    lower = factor[pivots]  # lower triangular up to round-off (the used pivot's column is ~eps, not 0)
    torch.testing.assert_close(lower, torch.tril(lower), rtol=0, atol=1e-12 * float(k_mat.diagonal().max()) ** 0.5)
    # greedy: the first pivot is the largest diagonal entry
    assert int(pivots[0]) == int(torch.argmax(k_mat.diagonal()))
    # the residual is PSD with a non-increasing largest diagonal (residual <= K in Loewner order)
    residual = k_mat - approx
    assert float(torch.linalg.eigvalsh(residual).min()) > -1e-9 * float(k_mat.diagonal().max())


def test_pivoted_cholesky_stops_at_numerical_rank():
    a, g = _low_rank_rows(10, 4, 3, rank_a=1, rank_g=2, seed=10)  # rank 2
    k_mat = kernels.kernel(a, g)
    pivots, factor = kernels.pivoted_cholesky(k_mat, 8)
    assert pivots.numel() == 2
    torch.testing.assert_close(factor @ factor.T, k_mat, rtol=0, atol=1e-10 * float(k_mat.abs().max()))


# --------------------------------------------------------------------------- KIS


def test_kis_sampling_frequencies_follow_kernel_diagonal():
    """r = 1 draws land on row i with probability ||a_i||^2 ||g_i||^2 / sum (chi-square check)."""
    gen_rows = torch.Generator().manual_seed(11)
    n = 6
    a = torch.randn(n, 3, generator=gen_rows, dtype=DT)
    g = torch.randn(n, 2, generator=gen_rows, dtype=DT)
    a[0] *= 3.0  # make the distribution clearly non-uniform
    g[5] *= 0.3
    weights = a.pow(2).sum(1) * g.pow(2).sum(1)
    probs = weights / weights.sum()
    draws = 6000
    gen = torch.Generator().manual_seed(12)
    counts = torch.zeros(n, dtype=DT)
    for _ in range(draws):
        idx = kernels.kis_select(a, g, 1, gen)
        assert idx.shape == (1,)
        counts[int(idx)] += 1
    expected = draws * probs
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # chi-square with 5 degrees of freedom: P(chi2 > 25.7) = 1e-4
    assert chi2 < 25.7, (counts, expected)
    # a uniform sampler would fail the same test by far
    uniform = torch.full((n,), draws / n, dtype=DT)
    assert float(((counts - uniform) ** 2 / uniform).sum()) > 100


def test_kis_select_without_replacement_and_seeded():
    a, g = _rows(10, 3, 2, seed=13)
    first = kernels.kis_select(a, g, 4, torch.Generator().manual_seed(5))
    second = kernels.kis_select(a, g, 4, torch.Generator().manual_seed(5))
    assert torch.equal(first, second)
    assert len(set(first.tolist())) == 4
    everything = kernels.kis_select(a, g, 10, torch.Generator().manual_seed(5))
    assert sorted(everything.tolist()) == list(range(10))
    assert kernels.kis_select(a, g, 50, torch.Generator()).numel() == 10  # clipped to n


def test_kis_select_dead_layer_and_zero_rows():
    """All-zero weights (a dead layer) give a valid uniform draw; zero rows come after positive ones."""
    gen = torch.Generator().manual_seed(14)
    a = torch.zeros(8, 3, dtype=DT)
    g = torch.randn(8, 2, dtype=DT)
    picked = kernels.kis_select(a, g, 3, gen)
    assert picked.numel() == 3 and len(set(picked.tolist())) == 3
    assert all(0 <= i < 8 for i in picked.tolist())

    a = torch.randn(8, 3, dtype=DT)
    g = torch.randn(8, 2, dtype=DT)
    g[[1, 4, 6, 7]] = 0.0  # 4 rows of zero weight
    for _ in range(10):
        picked = kernels.kis_select(a, g, 6, gen).tolist()
        assert len(set(picked)) == 6
        assert {0, 2, 3, 5} <= set(picked)
    for _ in range(10):
        assert set(kernels.kis_select(a, g, 3, gen).tolist()) <= {0, 2, 3, 5}

    # the whole KIS step on a dead layer: kernel 0, C = I/(lam s), v = grad / lam
    a = torch.zeros(6, 3, dtype=DT)
    g = torch.randn(6, 2, dtype=DT)
    rows = kernels.kis_select(a, g, 2, gen)
    c_mat = kernels.kis_inverse(kernels.kernel(a[rows], g[rows]), 0.1)
    grad = torch.randn(2, 3, dtype=DT)
    torch.testing.assert_close(kernels.apply_smw(grad, a[rows], g[rows], c_mat, 0.1), grad / 0.1)


def test_kis_direction_descends():
    a, g = _rows(30, 5, 4, seed=15)
    grad = _mean_grad(a, g)
    rows = kernels.kis_select(a, g, 5, torch.Generator().manual_seed(0))
    c_mat = kernels.kis_inverse(kernels.kernel(a[rows], g[rows]), 0.01)
    v = kernels.apply_smw(grad, a[rows], g[rows], c_mat, 0.01)
    assert float((v * grad).sum()) > 0
    assert float(v.norm()) <= float(grad.norm()) / 0.01 * (1 + 1e-9)


# --------------------------------------------------------------------------- device discipline


def _greedy_pivoted_cholesky(k_mat, max_rank, rel_tol=None):
    """Reference: the textbook greedy loop with host-side control flow (pivots list, factor (n, r))."""
    n = k_mat.shape[0]
    rel_tol = 4.0 * torch.finfo(k_mat.dtype).eps if rel_tol is None else rel_tol
    residual = k_mat.diagonal().clone()
    threshold = rel_tol * max(float(residual.max()), 0.0) if n else 0.0
    columns, pivots = [], []
    for _ in range(min(max_rank, n)):
        i = int(torch.argmax(residual))
        value = float(residual[i])
        if not value > max(threshold, 0.0) or value == float("inf"):
            break
        column = k_mat[:, i].clone()
        for previous in columns:
            column -= previous * previous[i]
        column /= value**0.5
        columns.append(column)
        residual = residual - column.pow(2)
        pivots.append(i)
        residual[pivots] = 0.0
    factor = torch.stack(columns, 1) if columns else k_mat.new_zeros(n, 0)
    return pivots, factor


def _kernels_for_pivoting():
    """Full-rank, rank-deficient, partly zero, all-zero and float32 kernels."""
    cases = []
    for seed, (n, rank_a, rank_g) in enumerate([(12, 4, 3), (10, 1, 2), (16, 2, 2), (9, 3, 1), (1, 1, 1)]):
        a, g = _low_rank_rows(n, 5, 4, rank_a, rank_g, seed=20 + seed)
        cases.append(kernels.kernel(a, g))
    a, g = _rows(8, 3, 2, seed=25)
    a[[1, 5]] = 0.0
    cases.append(kernels.kernel(a, g))
    cases.append(torch.zeros(4, 4, dtype=DT))
    cases.append(kernels.kernel(*_rows(10, 4, 3, seed=26)).float())
    return cases


@pytest.mark.parametrize("case", range(8))
@pytest.mark.parametrize("max_rank,rel_tol", [(3, None), (8, None), (40, None), (40, 1e-3), (40, 0.2), (0, None)])
def test_pivoted_cholesky_matches_greedy_reference(case, max_rank, rel_tol):
    """Same pivots as the host-side greedy loop, same factor to round-off, same rel_tol stop."""
    k_mat = _kernels_for_pivoting()[case]
    pivots, factor = kernels.pivoted_cholesky(k_mat, max_rank, rel_tol)
    ref_pivots, ref_factor = _greedy_pivoted_cholesky(k_mat, max_rank, rel_tol)
    assert pivots.tolist() == ref_pivots
    assert pivots.dtype == torch.long and factor.shape == ref_factor.shape and factor.dtype == k_mat.dtype
    scale = float(k_mat.diagonal().abs().max()) ** 0.5 or 1.0
    tol = 1e-5 if k_mat.dtype == torch.float32 else 1e-12
    torch.testing.assert_close(factor, ref_factor, rtol=0, atol=tol * scale)


def test_pivoted_cholesky_reads_the_host_once(monkeypatch):
    """One host read per call (the final rank), not two per pivot."""
    k_mat = kernels.kernel(*_rows(12, 4, 3, seed=27))
    reads = HostReads(monkeypatch)
    pivots, _ = kernels.pivoted_cholesky(k_mat, 6)
    assert reads.count == 1
    assert pivots.numel() == 6


def test_pivoted_cholesky_loop_runs_on_the_data_device():
    """On the meta device every value read raises: the pivoting loop must be pure device ops."""
    k_mat = torch.empty(7, 7, dtype=DT, device="meta")
    pivots, factor, rank = kernels._pivoted_cholesky_device(k_mat, 4)
    assert pivots.device.type == factor.device.type == rank.device.type == "meta"
    assert pivots.shape == (4,) and factor.shape == (7, 4) and rank.shape == ()


def test_kid_local_reads_the_host_at_most_twice(monkeypatch):
    """The rank with the finiteness check, and the Cholesky success flag: O(1), not O(rank)."""
    a, g = _rows(14, 4, 3, seed=28)
    k_mat = kernels.kernel(a, g)
    reads = HostReads(monkeypatch)
    pivots, m_factor = kernels.kid_local(k_mat, 6, 0.1, 14)
    assert reads.count <= 2
    assert pivots.numel() == 6 and m_factor.shape == (6, 6)


def test_kis_select_never_reads_the_host(monkeypatch):
    a, g = _rows(10, 3, 2, seed=29)
    g[[2, 3]] = 0.0
    reads = HostReads(monkeypatch)
    kernels.kis_select(a, g, 9, torch.Generator().manual_seed(0))
    assert reads.count == 0


@pytest.mark.parametrize("with_generator", [True, False])
def test_kis_select_runs_on_the_data_device(with_generator):
    """Data on the meta device (any value read raises); a CPU generator's draw is sent over to it."""
    a = torch.empty(9, 3, dtype=DT, device="meta")
    g = torch.empty(9, 2, dtype=DT, device="meta")
    generator = torch.Generator().manual_seed(0) if with_generator else None
    picked = kernels.kis_select(a, g, 4, generator)
    assert picked.device.type == "meta" and picked.shape == (4,) and picked.dtype == torch.long


def test_kis_select_draws_without_replacement_proportionally():
    """Ordered pairs (first, second) of 2-row draws follow successive sampling:
    P(i, j) = w_i / W * w_j / (W - w_i). Checked by chi-square; the plausible wrong law
    P(i, j) ~ w_i w_j (independent picks conditioned on i != j) fails the same check by far."""
    weights = torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=DT)
    a = weights.sqrt().unsqueeze(1)  # ||a_i||^2 ||g_i||^2 = w_i
    g = torch.ones(4, 1, dtype=DT)
    total = float(weights.sum())
    pairs = [(i, j) for i in range(4) for j in range(4) if i != j]
    right = torch.tensor([float(weights[i] / total * weights[j] / (total - weights[i])) for i, j in pairs], dtype=DT)
    wrong = torch.tensor([float(weights[i] * weights[j]) for i, j in pairs], dtype=DT)
    wrong = wrong / wrong.sum()
    draws = 8000
    gen = torch.Generator().manual_seed(30)
    counts = torch.zeros(len(pairs), dtype=DT)
    for _ in range(draws):
        first, second = kernels.kis_select(a, g, 2, gen).tolist()
        counts[pairs.index((first, second))] += 1

    def chi2(probs):
        expected = draws * probs
        return float(((counts - expected) ** 2 / expected).sum())

    # 11 degrees of freedom: P(chi2 > 35.7) = 2e-4
    assert chi2(right) < 35.7, (counts, draws * right)
    assert chi2(wrong) > 200


# --------------------------------------------------------------------------- CUDA

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@needs_cuda
def test_refresh_kernels_do_not_synchronise_on_cuda():
    """Pivoting loop and KIS draws (device or CPU generator) run without a host-device sync."""
    a, g = (t.cuda() for t in _rows(24, 5, 4, seed=31))
    k_mat = kernels.kernel(a, g)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pivots, factor, rank = kernels._pivoted_cholesky_device(k_mat, 8)
        device_draw = kernels.kis_select(a, g, 6, torch.Generator(device="cuda").manual_seed(0))
        host_draw = kernels.kis_select(a, g, 6, torch.Generator().manual_seed(0))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert pivots.is_cuda and factor.is_cuda and rank.is_cuda and device_draw.is_cuda and host_draw.is_cuda
    assert int(rank) == 8


@pytest.mark.cuda
@needs_cuda
def test_refresh_kernels_on_cuda_match_cpu():
    a, g = _rows(30, 5, 4, seed=32)
    k_mat = kernels.kernel(a, g)
    pivots, factor = kernels.pivoted_cholesky(k_mat, 10)
    pivots_cuda, factor_cuda = kernels.pivoted_cholesky(k_mat.cuda(), 10)
    assert pivots_cuda.tolist() == pivots.tolist()
    torch.testing.assert_close(factor_cuda.cpu(), factor, rtol=0, atol=1e-10 * float(k_mat.diagonal().max()) ** 0.5)
    # the same CPU generator state picks the same rows whether the data lives on the CPU or the GPU
    cpu_rows = kernels.kis_select(a, g, 10, torch.Generator().manual_seed(3))
    cuda_rows = kernels.kis_select(a.cuda(), g.cuda(), 10, torch.Generator().manual_seed(3))
    assert cuda_rows.is_cuda and set(cuda_rows.tolist()) == set(cpu_rows.tolist())
    # a CUDA generator is deterministic for a given state
    first = kernels.kis_select(a.cuda(), g.cuda(), 10, torch.Generator(device="cuda").manual_seed(4))
    second = kernels.kis_select(a.cuda(), g.cuda(), 10, torch.Generator(device="cuda").manual_seed(4))
    assert torch.equal(first, second)
