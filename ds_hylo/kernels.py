"""Pure tensor math of HyLo: per-sample kernels, KIS/KID reductions, the small solves, and (*).

Notation (see docs/design.md section 1.1). One layer, weight gradient ``grad`` of shape
(d_out, d_in) with the bias folded in as the last input column. The N captured samples give
``A`` (N, d_in) and ``G`` (N, d_out); sample i has per-sample gradient u_i = vec(g_i a_i^T),
and the empirical Fisher is F = U U^T / N. Nothing of size d_in * d_out x N is ever formed:

    K = U^T U = (A A^T) o (G G^T)                    (N, N)
    U^T grad = rowsum((G grad) o A)                  (N,)
    U c = G^T diag(c) A                              (d_out, d_in)

HyLo keeps s sample rows (A_S, G_S) and an s x s matrix C and applies

    v = (1 / lam) * (grad - U_S C U_S^T grad)                               (*)

Index rows (``nn.Embedding``, docs/design.md section 1.10): a layer whose inputs are one-hot
vectors e_{t_i} of a vocabulary of d_in = V tokens keeps each input row as its token id, an int64
(n, 1) column, never as a dense (n, V) row; -1 marks a zero row (a ``padding_idx`` token, whose
one-hot input row is zero: its weight row gets no gradient). Every function here that takes ``a``
accepts either kind and tells them apart by dtype alone (:func:`index_rows`: integer rows are ids):

    A A^T = [t_i == t_j >= 0]              ||a_i||^2 = [t_i >= 0]
    U^T grad = (g_i . grad[:, t_i])_i      U c = index_add of c_i g_i into column t_i

The dispatch lives in the small helpers below (:func:`input_gram`, :func:`input_sq_norms`,
:func:`rows_to`, :func:`rows_dtype`, and the id branches of :func:`project` and :func:`expand`).

This module has no ``nn``, no hooks and no communication: every function maps tensors to tensors.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = [
    "index_rows",
    "rows_to",
    "rows_dtype",
    "input_gram",
    "input_sq_norms",
    "kernel",
    "kernel_diag",
    "project",
    "expand",
    "apply_smw",
    "smw_amplification",
    "FLOAT32_APPLY_MAX_AMPLIFICATION",
    "MAX_AMPLIFICATION",
    "cholesky_with_jitter",
    "spd_inverse",
    "sngd_inverse",
    "kis_select",
    "kis_keys",
    "kis_order",
    "kis_inverse",
    "pivoted_cholesky",
    "kid_local",
    "kid_local_rows",
    "kernel_columns",
    "kid_inverse",
    "FactorizationError",
]


class FactorizationError(RuntimeError):
    """A Cholesky factorization failed even after the jitter retries."""


def index_rows(a: torch.Tensor) -> bool:
    """Whether ``a`` holds token ids (int64 (n, 1), -1 for a zero row) rather than dense input rows.

    Decided by dtype alone: dense rows are always floating point, ids never are (so a 1-wide dense
    Linear input (n, 1) is never mistaken for ids)."""
    return not a.is_floating_point()


def rows_to(a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Dense rows converted to ``dtype``; id rows unchanged (ids are never converted to floats)."""
    return a if index_rows(a) else a.to(dtype)


def rows_dtype(a: torch.Tensor, g: torch.Tensor) -> torch.dtype:
    """The floating dtype of a layer's rows: a's for dense rows, g's for id rows."""
    return g.dtype if index_rows(a) else a.dtype


def input_gram(a: torch.Tensor, b: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A B^T of input rows (batched over leading axes): (..., n, d), (..., m, d) -> (..., n, m).

    For id rows (..., n, 1) and (..., m, 1): [a_i == b_j and a_i >= 0] in ``dtype`` (required then:
    the dtype of the output-gradient rows it is multiplied with)."""
    if not index_rows(a):
        return a @ b.mT
    if dtype is None:
        raise ValueError("input_gram: dtype is required for id rows (got dtype=None); pass g's dtype")
    return ((a == b.mT) & (a >= 0)).to(dtype)


def input_sq_norms(a: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """||a_i||^2 over the last axis: (..., n, d) -> (..., n); for id rows 1, or 0 for a -1 (zero) row,
    in ``dtype`` (required then)."""
    if not index_rows(a):
        return a.pow(2).sum(dim=-1)
    if dtype is None:
        raise ValueError("input_sq_norms: dtype is required for id rows (got dtype=None); pass g's dtype")
    return (a[..., 0] >= 0).to(dtype)


def _ids(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Id rows (n, 1) -> (column index (n,) with -1 clamped to 0, valid (n,) bool)."""
    ids = a[:, 0]
    valid = ids >= 0
    return ids.clamp_min(0), valid


def kernel(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample gradient Gram matrix K = (A A^T) o (G G^T).

    a: (n, d_in) or id rows (n, 1), g: (n, d_out) -> (n, n), symmetric positive semi-definite.
    """
    return input_gram(a, a, g.dtype) * (g @ g.T)


def kernel_diag(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Diagonal of K, K_ii = ||a_i||^2 ||g_i||^2 = ||u_i||^2: (n, d_in), (n, d_out) -> (n,)."""
    return input_sq_norms(a, g.dtype) * g.pow(2).sum(dim=1)


def project(a: torch.Tensor, g: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """U^T vec(grad), i.e. (g_i^T grad a_i)_i: (n, d_in), (n, d_out), (d_out, d_in) -> (n,).

    Id rows (n, 1): g_i . grad[:, t_i] (0 for a -1 row), gathering n columns of grad."""
    if index_rows(a):
        ids, valid = _ids(a)
        dots = (g * grad.index_select(1, ids).T).sum(dim=1)
        return torch.where(valid, dots, torch.zeros_like(dots))
    return ((g @ grad) * a).sum(dim=1)


def _weighted_ids(a: torch.Tensor, g: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Id rows: (column index (n,), (d_out, n) columns c_i g_i, zero for -1 rows)."""
    ids, valid = _ids(a)
    weighted = g * c.unsqueeze(1)
    return ids, torch.where(valid.unsqueeze(1), weighted, torch.zeros_like(weighted)).T


def expand(
    a: torch.Tensor, g: torch.Tensor, c: torch.Tensor, subtract_from: Optional[torch.Tensor] = None,
    *, width: Optional[int] = None,
) -> torch.Tensor:
    """U c reshaped to a weight matrix, G^T diag(c) A: (n, d_in), (n, d_out), (n,) -> (d_out, d_in).

    With ``subtract_from`` (d_out, d_in): ``subtract_from - U c`` as one fused matrix product.
    Id rows (n, 1): c_i g_i added into column t_i (``index_add``); without ``subtract_from`` the
    matrix width d_in (the vocabulary) is not in the rows and ``width`` gives it.
    """
    if index_rows(a):
        ids, columns = _weighted_ids(a, g, c)
        if subtract_from is not None:
            return subtract_from.index_add(1, ids, columns, alpha=-1.0)
        if width is None:
            raise ValueError("expand: width (the vocabulary size d_in) is required for id rows, got width=None")
        out = torch.zeros(g.shape[1], width, dtype=columns.dtype, device=g.device)
        return out.index_add_(1, ids, columns)
    weighted = (g * c.unsqueeze(1)).T
    if subtract_from is None:
        return weighted @ a
    return torch.addmm(subtract_from, weighted, a, alpha=-1.0)


def apply_smw(
    grad: torch.Tensor,
    a_s: torch.Tensor,
    g_s: torch.Tensor,
    c_mat: torch.Tensor,
    damping: float,
    step_scale: float = 1.0,
    *,
    work_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Formula (*), times ``step_scale``: (step_scale / lam) (grad - U_S C U_S^T grad).

    grad: (d_out, d_in); a_s: (s, d_in) or id rows (s, 1); g_s: (s, d_out); c_mat: (s, s) ->
    (d_out, d_in) in grad's dtype. With step_scale = lam (HyLo's "sgd" step scale) no scaling pass is made.

    Precision (docs/design.md section 1.8): the result is usually far smaller than grad. The
    batch gradient lies (nearly) in the span of the sampled rows, so U_S C U_S^T grad ~= grad up
    to the cancellation factor :func:`smw_amplification` (~1e10 for inputs at scale 1e3), and
    in a dtype with unit round-off eps the step comes out wrong by about eps times that factor
    (cancellation, not a bad C; no rescaling of the rows removes it). The products run in
    ``work_dtype``, by default the wider of grad's and c_mat's dtypes; the preconditioner passes
    float32 rows, C and gradient for layers whose factor allows it and float64 for the others
    (``HyLoConfig.apply_precision``): two (s x d_out x d_in) matrix products and one
    (d_out, d_in) temporary in that dtype.
    """
    work = torch.promote_types(grad.dtype, c_mat.dtype) if work_dtype is None else work_dtype
    grad_w, a_w, g_w = grad.to(work), rows_to(a_s, work), g_s.to(work)
    coeff = (c_mat @ project(a_w, g_w, grad_w).to(c_mat.dtype)).to(work)  # s-dim: in C's dtype
    if grad_w is grad:  # same dtype: do not overwrite the caller's gradient
        out = expand(a_w, g_w, coeff, subtract_from=grad_w)
    elif index_rows(a_w):  # grad_w is our own copy: subtract in place
        ids, columns = _weighted_ids(a_w, g_w, coeff)
        out = grad_w.index_add_(1, ids, columns, alpha=-1.0)
    else:
        out = grad_w.addmm_((g_w * coeff.unsqueeze(1)).T, a_w, alpha=-1.0)
    factor = step_scale / damping
    if factor != 1.0:
        out = out.mul_(factor)
    return out.to(grad.dtype)


# Cancellation factor (see :func:`smw_amplification`) up to which (*) is evaluated in float32:
# the float32 step's relative error grows about linearly in the factor (measured against the dense
# float64 solve on the rows of tests/unit/test_precision.py, 20 seeds x 7 input scales x 5 modes:
# worst 7e-5 at an estimated factor of 1e3, 3.6e-4 at 3e3-4e3, 1.1e-3 at 8e3), so 3e3 keeps the
# float32 step within ~4e-4 of the float64 one, under the 1e-3 the precision tests hold it to.
FLOAT32_APPLY_MAX_AMPLIFICATION = 3e3
# Beyond this even float64 loses the step (relative error ~4e-17 times the factor > 1e-3):
# the refresh refuses such factors rather than take a wild step.
MAX_AMPLIFICATION = 1e13


def smw_amplification(k_mat: torch.Tensor, c_mat: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """How much (*) shrinks a gradient in the span of the kept rows: 1 / (1 - mu_max(C K)).

    In the span of U_S the map grad -> grad - U_S C U_S^T grad has eigenvalues 1 - mu with mu
    the eigenvalues of C K (in [0, 1) for every mode: KIS lam s / (sigma^2 + lam s), ...), so a
    gradient along the top direction comes out ``amplification`` times smaller than it went in.
    Evaluated in a precision with unit round-off eps, (*) is then wrong by about
    eps * amplification relative to its result (cancellation): the factor decides whether the
    per-step products may run in float32 (docs/design.md section 1.8).

    Power iteration on C K from the all-ones vector (the direction of the batch gradient, the
    sum of the rows), with the Rayleigh quotient of the symmetric K^1/2 C K^1/2: a lower bound
    that converges quickly to the top eigenvalue; O(iterations * s^2), no host read.
    k_mat: (s, s) Gram of the kept rows, c_mat: (s, s) C, both float64 -> () float64 >= 1
    (inf when the top eigenvalue rounds to 1, nan for non-finite input).
    """
    s = k_mat.shape[0]
    if s == 0:
        return k_mat.new_ones(())
    x = k_mat.new_ones(s)
    mu = k_mat.new_zeros(())
    for _ in range(iterations):
        kx = k_mat @ x
        mu = (kx @ (c_mat @ kx)) / (x @ kx).clamp_min(torch.finfo(k_mat.dtype).tiny)
        x = c_mat @ kx
        x = x / x.norm().clamp_min(torch.finfo(k_mat.dtype).tiny)
    return 1.0 / (1.0 - mu.clamp(0.0, 1.0))


def cholesky_with_jitter(
    matrix: torch.Tensor, max_tries: int = 6, deferred: Optional[list[torch.Tensor]] = None
) -> torch.Tensor:
    """Lower Cholesky factor of a symmetric positive (semi-)definite matrix.

    On failure, adds jitter = 10^k * eps * mean(diag) * I for growing k and retries; raises
    FactorizationError when every try fails or the matrix is not finite.
    matrix: (n, n) -> (n, n) lower triangular.

    ``deferred``: instead of reading the first attempt's status back to the host (one
    synchronisation per call), append it (a 0-d int tensor, 0 on success) to this list and return
    the first attempt's factor, or the identity where the status is not 0 (a placeholder that
    keeps what follows free of errors): the caller reads every status of a refresh at once and
    redoes the failed ones without ``deferred``.
    """
    sym = 0.5 * (matrix + matrix.T)
    factor, info = torch.linalg.cholesky_ex(sym)
    if deferred is not None:
        deferred.append(info)
        eye = torch.eye(sym.shape[0], dtype=sym.dtype, device=sym.device)
        return torch.where(info == 0, factor, eye)
    if int(info) == 0:
        return factor
    if not torch.isfinite(sym).all():
        raise FactorizationError("matrix has non-finite entries")
    eps = torch.finfo(sym.dtype).eps
    scale = float(sym.diagonal().abs().mean()) or 1.0
    eye = torch.eye(sym.shape[0], dtype=sym.dtype, device=sym.device)
    for k in range(max_tries):
        jitter = scale * eps * (10.0 ** (2 * k + 1))
        factor, info = torch.linalg.cholesky_ex(sym + jitter * eye)
        if int(info) == 0:
            return factor
    raise FactorizationError(f"Cholesky failed after {max_tries} jitter retries")


def spd_inverse(matrix: torch.Tensor, deferred: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
    """Inverse of a symmetric positive definite matrix through its Cholesky factor: (n, n) -> (n, n).

    ``deferred``: see :func:`cholesky_with_jitter`."""
    return torch.cholesky_inverse(cholesky_with_jitter(matrix, deferred=deferred))


def _shifted(k_mat: torch.Tensor, shift: float) -> torch.Tensor:
    return k_mat + shift * torch.eye(k_mat.shape[0], dtype=k_mat.dtype, device=k_mat.device)


def sngd_inverse(
    k_mat: torch.Tensor, damping: float, num_samples: int, deferred: Optional[list[torch.Tensor]] = None
) -> torch.Tensor:
    """Exact SMW: C = (K + lam N I)^-1. k_mat: (N, N) -> (N, N). ``deferred``: see :func:`cholesky_with_jitter`."""
    return spd_inverse(_shifted(k_mat, damping * num_samples), deferred)


def kis_select(
    a: torch.Tensor, g: torch.Tensor, num_keep: int, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Kernel importance sampling: draw ``num_keep`` distinct rows with probability ~ ||a_i||^2 ||g_i||^2.

    Successive sampling without replacement (the law of ``torch.multinomial(w, k, replacement=False)``)
    by an exponential race: with E_i ~ Exp(1) i.i.d., row i "arrives" at time E_i / w_i and the
    first ``num_keep`` arrivals are kept. The first arrival is row i with probability w_i / sum(w),
    and by memorylessness each next one is drawn ~ w among the rows not yet taken.
    Rows of zero (or non-finite) weight never arrive; they are only taken once every positive-weight
    row has been, in uniformly random order (so a dead layer, all weights zero, still yields a
    uniform draw instead of an error).

    The only random draw is n uniforms from ``generator`` (on its device, the default generator of
    a's device when None); they are copied to a's device without blocking and everything else runs
    there, so there is no host-device synchronisation. Deterministic for a given generator state.
    a: (n, d_in), g: (n, d_out) -> (min(num_keep, n),) int64 row indices on a's device, in draw order.

    The race is streamable: the keys of rows are independent, so keeping the smallest keys of
    each batch of rows as they arrive (:func:`kis_keys`, :func:`kis_order`) selects the same rows
    as one call on all of them (``ds_hylo.sampling.KISReservoir``).
    """
    n = a.shape[0]
    num_keep = max(0, min(num_keep, n))
    draw_device = a.device if generator is None else generator.device
    uniforms = torch.rand(n, generator=generator, dtype=torch.float64, device=draw_device)
    uniforms = uniforms.to(a.device, non_blocking=True)
    keys, positive = kis_keys(kernel_diag(a, g), uniforms)
    return kis_order(keys, (~positive).to(torch.uint8))[:num_keep]


def kis_keys(weights: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exponential-race keys of :func:`kis_select`: row i arrives at E_i / w_i, E_i = -log(1 - U_i).

    weights (n,) (any float dtype), uniforms (n,) float64 in [0, 1) on the same device ->
    (keys (n,) float64: log(E_i / w_i) for rows of positive finite weight, log E_i otherwise;
    positive (n,) bool). Log scale: no overflow for tiny weights. No host read.
    """
    arrival = torch.log(-torch.log1p(-uniforms))  # log E_i, E_i ~ Exp(1)
    weights = weights.double()
    positive = torch.isfinite(weights) & (weights > 0)
    log_weights = torch.where(positive, weights, torch.ones_like(weights)).log()
    return torch.where(positive, arrival - log_weights, arrival), positive


def kis_order(keys: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Rows in arrival order: by ``classes`` (uint8, smaller first), then by key, then by position.

    keys (n,) float64, classes (n,) uint8 -> (n,) int64 permutation. Two stable sorts, no host read.
    """
    order = torch.argsort(keys, stable=True)
    return order[torch.argsort(classes[order], stable=True)]


def kis_inverse(
    k_sampled: torch.Tensor, damping: float, deferred: Optional[list[torch.Tensor]] = None
) -> torch.Tensor:
    """KIS: C = (K_S + lam s I)^-1 with s the number of sampled rows. k_sampled: (s, s) -> (s, s).
    ``deferred``: see :func:`cholesky_with_jitter`."""
    return spd_inverse(_shifted(k_sampled, damping * k_sampled.shape[0]), deferred)


def _pivoted_cholesky_device(
    k_mat: torch.Tensor, max_rank: int, rel_tol: Optional[float] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sync-free core of :func:`pivoted_cholesky`: runs ``min(max_rank, n)`` steps as tensor ops.

    Instead of breaking at the stop criterion, a device-side ``active`` flag turns every later step
    into a no-op (zero column, residual unchanged), so nothing is read back to the host.
    k_mat: (n, n) -> (pivots (m,) int64, factor (n, m), rank () int64 on k_mat's device) with
    m = min(max_rank, n); only the first ``rank`` pivots and columns are meaningful (the rest of
    the columns are zero).
    """
    return _greedy_pivots(
        k_mat.diagonal(), lambda index: k_mat.index_select(1, index).squeeze(1), max_rank, rel_tol
    )


def _greedy_pivots(
    diagonal: torch.Tensor,
    column: Callable[[torch.Tensor], torch.Tensor],
    max_rank: int,
    rel_tol: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pivoted Cholesky loop given K's diagonal (n,) and a function index (1,) -> K[:, index] (n,).

    Returns what :func:`_pivoted_cholesky_device` returns; only the requested columns of K are ever
    formed, so memory is O(n * max_rank) beyond what ``column`` uses.
    """
    n = diagonal.shape[0]
    steps = max(0, min(max_rank, n))
    if rel_tol is None:
        rel_tol = 4.0 * torch.finfo(diagonal.dtype).eps
    factor = diagonal.new_zeros(n, steps)
    pivots = torch.zeros(steps, dtype=torch.long, device=diagonal.device)
    rank = torch.zeros((), dtype=torch.long, device=diagonal.device)
    if steps == 0:
        return pivots, factor, rank
    residual = diagonal.clone()
    threshold = rel_tol * residual.max().clamp_min(0)
    used = torch.zeros(n, dtype=torch.bool, device=diagonal.device)
    positions = torch.arange(n, device=diagonal.device)
    active = torch.ones((), dtype=torch.bool, device=diagonal.device)
    for j in range(steps):
        index = torch.argmax(residual).reshape(1)  # (1,) on the device: no host read
        pivot_value = residual.index_select(0, index).squeeze(0)
        active = active & torch.isfinite(pivot_value) & (pivot_value > threshold) & (pivot_value > 0)
        row = factor.index_select(0, index).squeeze(0)[:j]
        col = column(index) - factor[:, :j] @ row
        col = col / torch.where(active, pivot_value, torch.ones_like(pivot_value)).sqrt()
        col = torch.where(active, col, torch.zeros_like(col))
        factor[:, j] = col
        residual = residual - col.pow(2)
        # zero the residual of every pivot taken so far (round-off could resurrect a used pivot)
        used = used | ((positions == index) & active)
        residual = torch.where(used, torch.zeros_like(residual), residual)
        pivots[j] = index[0]
        rank = rank + active.long()
    return pivots, factor, rank


def pivoted_cholesky(
    k_mat: torch.Tensor, max_rank: int, rel_tol: Optional[float] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy diagonally pivoted partial Cholesky of a PSD matrix (= column-pivoted QR of U).

    Stops after ``max_rank`` pivots or once the largest residual diagonal falls below
    ``rel_tol * max(diag(K))``; the default (a few machine epsilons) stops only where the residual
    is round-off, so the pivots found represent the kernel to working precision.
    k_mat: (n, n) -> (pivots (r,) int64, factor L (n, r)) with K ~= L L^T, exact on the pivot
    rows and columns; L[pivots] is lower triangular.
    The loop runs on k_mat's device; the rank r is the one value read back to the host (one sync).
    """
    pivots, factor, rank = _pivoted_cholesky_device(k_mat, max_rank, rel_tol)
    r = int(rank)
    return pivots[:r], factor[:, :r]


def kid_local(
    k_local: torch.Tensor, max_rank: int, damping: float, num_samples_global: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """KID on one worker's kernel: skeleton rows and a square factor of M_p.

    With skeleton S (pivoted Cholesky), Z = K_SS^-1 K_S: (r, n), E = K - Z^T K_SS Z and
    M_p = Z (E + lam N I)^-1 Z^T (r, r). Returns (pivots (r,), L_p (r, r)) with M_p = L_p L_p^T.
    L_p is obtained from a QR of (E + lam N I)^{-1/2} Z^T, so M_p is never factored directly and
    stays usable when it is singular (e.g. zero-padded rows).
    Host reads: the rank with the finiteness check (one), and the Cholesky's success flag (one).
    k_local: (n, n) -> (r,) int64, (r, r), where r <= max_rank (fewer when rank(K) < max_rank).
    """
    pivots, factor, rank_t = _pivoted_cholesky_device(k_local, max_rank)
    pivots, factor, z_mat = _skeleton(pivots, factor, rank_t, torch.isfinite(k_local).all())
    if pivots.numel() == 0:
        return pivots, k_local.new_zeros(0, 0)
    residual = k_local - factor @ factor.T
    shifted_factor = cholesky_with_jitter(_shifted(residual, damping * num_samples_global))
    whitened = torch.linalg.solve_triangular(shifted_factor, z_mat.T, upper=False)  # (n, r)
    _, r_factor = torch.linalg.qr(whitened, mode="r")  # whitened = Q R, M_p = R^T R
    return pivots, r_factor.T.contiguous()


def _skeleton(
    pivots: torch.Tensor, factor: torch.Tensor, rank: torch.Tensor, finite: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KID's skeleton from a pivoted Cholesky: one host read (rank and finiteness together).

    pivots (max_rank,), factor L (n, max_rank), rank and finite 0-d tensors ->
    (pivots (r,), L (n, r), Z = K_SS^-1 K_S (r, n)); r may be 0 (then Z is (0, n)).
    Raises FactorizationError on non-finite input: pivoted Cholesky stops at a non-finite pivot
    and returns rank 0, which would silently replace the layer's factors by "no preconditioning".
    """
    rank, is_finite = torch.stack([rank, finite.long()]).tolist()
    if not is_finite:
        raise FactorizationError("local kernel has non-finite entries")
    pivots, factor = pivots[:rank], factor[:, :rank]
    if rank == 0:
        return pivots, factor, factor.T
    skeleton_factor = factor[pivots]  # (r, r) lower triangular, K_SS = L_S L_S^T
    # Z = K_SS^-1 K_S = L_S^-T L^T, because K_:S = L L_S^T (exact property of pivoted Cholesky).
    return pivots, factor, torch.linalg.solve_triangular(skeleton_factor.T, factor.T, upper=True)


def kernel_columns(a: torch.Tensor, g: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Columns of K = (A A^T) o (G G^T) without forming K.

    a: (n, d_in), g: (n, d_out), index: (m,) int64 -> K[:, index] (n, m); O(n m (d_in + d_out)).
    """
    return input_gram(a, a.index_select(0, index), g.dtype) * (g @ g.index_select(0, index).T)


def _block_residual_whiten(
    a: torch.Tensor, g: torch.Tensor, factor: torch.Tensor, rhs: torch.Tensor, shift: float, block_rows: int
) -> torch.Tensor:
    """B^{-1/2} rhs with B = blockdiag(E) + shift I, E = K - L L^T restricted to row blocks.

    Rows are cut into consecutive blocks of ``block_rows`` (the last one zero-padded, its padded
    rows get B = I and rhs = 0, so they add nothing). All blocks go through one batched Cholesky;
    blocks that fail it are retried one by one with :func:`cholesky_with_jitter`.
    a: (n, d_in), g: (n, d_out), factor L: (n, r), rhs: (n, r) -> (n, r). One host read (the
    batched Cholesky's status). Memory O(n * (block_rows + r + d_in + d_out)).
    """
    n, r = rhs.shape
    blocks = -(-n // block_rows)
    rows = blocks * block_rows

    def batched(t: torch.Tensor) -> torch.Tensor:
        if rows == n:  # a view, no copy
            return t.reshape(blocks, block_rows, t.shape[1])
        padded = t.new_zeros(rows, t.shape[1])
        padded[:n] = t
        return padded.reshape(blocks, block_rows, t.shape[1])

    a_b, g_b, l_b, rhs_b = batched(a), batched(g), batched(factor), batched(rhs)
    # E on the blocks, in place: (A A^T) o (G G^T) - L L^T, (blocks, b, b); Cholesky reads the lower half
    residual = input_gram(a_b, a_b, g_b.dtype).mul_(g_b @ g_b.mT).baddbmm_(l_b, l_b.mT, alpha=-1.0)
    diag_shift = torch.full((rows,), shift, dtype=rhs.dtype, device=rhs.device)
    diag_shift[n:] = 1.0
    residual.diagonal(dim1=-2, dim2=-1).add_(diag_shift.reshape(blocks, block_rows))
    chol, info = torch.linalg.cholesky_ex(residual)
    if bool((info != 0).any()):  # the one host read; rare: lam N is tiny against round-off of E
        chol = torch.stack([
            cholesky_with_jitter(residual[i]) if int(info[i]) else chol[i] for i in range(blocks)
        ])
    whitened = torch.linalg.solve_triangular(chol, rhs_b, upper=False)  # (blocks, b, r)
    return whitened.reshape(rows, r)[:n]


def kid_local_rows(
    a: torch.Tensor,
    g: torch.Tensor,
    max_rank: int,
    damping: float,
    num_samples_global: int,
    block_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KID from the rows, without the dense (n, n) kernel: what :func:`kid_local` returns, bounded.

    Skeleton and Z are exact: the greedy pivoted Cholesky needs only diag(K) (:func:`kernel_diag`)
    and the r pivot columns of K (:func:`kernel_columns`), so the pivots and L (n, r) are those of
    ``kid_local(kernel(a, g), ...)`` up to round-off, and Z = K_SS^-1 K_S: as there.

    One approximation, in the residual only: E = K - L L^T (n, n) is replaced by its block diagonal
    over consecutive blocks of ``block_rows`` rows (the residual correlations between rows of
    different blocks are dropped; in GP terms the "partially independent" conditional of a Nystrom
    approximation). M_p = Z (blockdiag(E) + lam N I)^-1 Z^T with the same global N, so nothing is
    reweighted. It is exact (to round-off) when n <= block_rows (one block) and whenever
    rank(K) <= max_rank (then E = 0, e.g. rank_ratio = 1), and the error is second order in the
    dropped off-block part of E, which the pivots have already made small (E's diagonal is below
    the last pivot's residual). With token rows stored sequence by sequence, a block holds
    neighbouring tokens, the rows whose residuals correlate most.

    Cost: O(n r (d_in + d_out + r + block_rows) + n block_rows (d_in + d_out + block_rows)) time,
    O(n (r + block_rows)) memory: linear in n for fixed r and block_rows.
    a: (n, d_in), g: (n, d_out) (float64 advised) -> (pivots (r,) int64, L_p (r, r)), r <= max_rank.
    Host reads: rank with finiteness (one), the batched Cholesky's status (one).
    """
    if block_rows < 1:
        raise ValueError(f"block_rows must be an int >= 1, got {block_rows!r}")
    diagonal = kernel_diag(a, g)
    pivots, factor, rank_t = _greedy_pivots(diagonal, lambda index: kernel_columns(a, g, index).squeeze(1), max_rank)
    finite = torch.isfinite(diagonal).all() & torch.isfinite(factor).all()
    pivots, factor, z_mat = _skeleton(pivots, factor, rank_t, finite)
    if pivots.numel() == 0:
        return pivots, g.new_zeros(0, 0)
    whitened = _block_residual_whiten(a, g, factor, z_mat.T, damping * num_samples_global, block_rows)
    _, r_factor = torch.linalg.qr(whitened, mode="r")  # M_p = R^T R
    return pivots, r_factor.T.contiguous()


def kid_inverse(
    k_skeleton: torch.Tensor, m_factor: torch.Tensor, deferred: Optional[list[torch.Tensor]] = None
) -> torch.Tensor:
    """KID: C = (M^-1 + K_S)^-1 computed as L (I + L^T K_S L)^-1 L^T with M = L L^T.

    The middle matrix has eigenvalues >= 1, so this is well conditioned even where M is
    (near) singular. k_skeleton: (s, s) Gram of all gathered skeleton rows; m_factor: (s, s)
    block-diagonal factor of M -> (s, s). ``deferred``: see :func:`cholesky_with_jitter`.
    """
    inner = m_factor.T @ k_skeleton @ m_factor
    inner = _shifted(inner, 1.0)
    return m_factor @ spd_inverse(inner, deferred) @ m_factor.T
