"""Per-mode reductions of one layer's captured rows: SNGD (all rows), KIS (sampled), KID (skeleton).

Each mode is one small class with the same two steps of the refresh (docs/design.md section 1):

- ``reduce``: this rank's (n, d) rows -> the rows it sends, zero-padded to the agreed size;
- ``inverse``: the gathered rows (s rows from every rank) -> the s x s matrix C of (*), float64.

The classes hold no state; ``REDUCTIONS`` maps a mode name to its instance.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import kernels
from .exchange import GatheredRows, LocalRows


def row_budget(
    mode: str, num_rows: int, rank_ratio: float, world_size: int, max_global_samples: Optional[int] = None
) -> int:
    """Rows one rank keeps for a layer: all for SNGD; else rank_ratio * n (>= 1), capped by the
    global sample budget ``max_global_samples // world_size``, never more than n (0 for no rows)."""
    if num_rows == 0:
        return 0
    if mode == "sngd":
        return num_rows
    budget = max(1, round(rank_ratio * num_rows))
    if max_global_samples is not None:
        budget = min(budget, max(1, max_global_samples // world_size))
    return min(budget, num_rows)


def gram(rows: GatheredRows) -> torch.Tensor:
    """K_S = (A_S A_S^T) o (G_S G_S^T) of gathered rows in float64: (s, d_in), (s, d_out) -> (s, s).
    Id rows (s, 1) stay ids (``kernels.rows_to``)."""
    return kernels.kernel(kernels.rows_to(rows.a, torch.float64), rows.g.double())


def _gram(rows: GatheredRows, given: Optional[torch.Tensor]) -> torch.Tensor:
    return gram(rows) if given is None else given


def _pad(tensor: torch.Tensor, rows: int, cols: Optional[int] = None) -> torch.Tensor:
    """Zero-pad a (n, d) tensor to (rows, d) (or (rows, cols)), on its device. Padded id rows get id 0
    with a zero output-gradient row: they contribute nothing (docs/design.md section 1.10)."""
    n, d = tensor.shape
    cols = d if cols is None else cols
    if n == rows and d == cols:
        return tensor
    out = tensor.new_zeros(rows, cols)
    out[:n, :d] = tensor
    return out


class Reduction:
    """Interface of one mode. ``name`` is the mode's config name."""

    name = ""

    def reduce(
        self, a: torch.Tensor, g: torch.Tensor, budget: int, padded: int, damping: float,
        global_rows: int, generator: Optional[torch.Generator],
    ) -> LocalRows:
        """a (n, d_in), g (n, d_out) -> LocalRows padded to ``padded`` rows (n may be 0)."""
        raise NotImplementedError

    def inverse(
        self, rows: GatheredRows, damping: float, global_rows: int, gram: Optional[torch.Tensor] = None,
        deferred: Optional[list[torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Gathered rows (s rows) -> C (s, s) in float64; raises kernels.FactorizationError.

        ``gram``: the rows' kernel K_S (s, s) in float64 if the caller has it (:func:`gram`).
        ``deferred``: collect the Cholesky statuses instead of reading them
        (``kernels.cholesky_with_jitter``).
        """
        raise NotImplementedError


class SNGD(Reduction):
    """Exact SMW over every captured row: C = (K + lam N I)^-1."""

    name = "sngd"

    def reduce(self, a, g, budget, padded, damping, global_rows, generator):
        return LocalRows(_pad(a, padded), _pad(g, padded), None, a.shape[0])

    def inverse(self, rows, damping, global_rows, gram=None, deferred=None):
        return kernels.sngd_inverse(_gram(rows, gram), damping, global_rows, deferred)


class KIS(Reduction):
    """Kernel importance sampling: rows drawn ~ ||u_i||^2; C = (K_S + lam s I)^-1."""

    name = "kis"

    def reduce(self, a, g, budget, padded, damping, global_rows, generator):
        if a.shape[0] == 0:
            return LocalRows(_pad(a, padded), _pad(g, padded), None, 0)
        picked = kernels.kis_select(a, g, budget, generator)
        return LocalRows(_pad(a[picked], padded), _pad(g[picked], padded), None, picked.numel())

    def inverse(self, rows, damping, global_rows, gram=None, deferred=None):
        return kernels.kis_inverse(_gram(rows, gram), damping, deferred)

    @staticmethod
    def reduce_sampled(a: torch.Tensor, g: torch.Tensor, budget: int, padded: int) -> LocalRows:
        """Rows already drawn while they were captured (streamed KIS, ``ds_hylo.sampling``), in draw
        order: the first ``budget`` of them, zero-padded to ``padded``. No random draw."""
        a, g = a[:budget], g[:budget]
        return LocalRows(_pad(a, padded), _pad(g, padded), None, a.shape[0])


class KID(Reduction):
    """Kernel interpolative decomposition: skeleton rows and a factor of M_p per rank.

    Up to ``exact_max_rows`` captured rows, the local kernel is formed densely and factored exactly
    (:func:`kernels.kid_local`, O(n^2) memory, O(n^3) time). Above it (token-level rows of long
    sequences), :func:`kernels.kid_local_rows` takes the same skeleton without the (n, n) kernel and
    keeps the residual E only on diagonal blocks of ``residual_block_rows`` rows: memory and time
    grow linearly in n for a fixed rank (see its docstring for the approximation).
    ``exact_max_rows=None`` always takes the exact path (benchmarks compare the two).
    Deterministic: no random draw, the ``generator`` argument is not used.
    """

    name = "kid"

    def __init__(self, exact_max_rows: Optional[int] = 1024, residual_block_rows: int = 512) -> None:
        if exact_max_rows is not None and (not isinstance(exact_max_rows, int) or exact_max_rows < 1):
            raise ValueError(f"exact_max_rows must be None or an int >= 1, got {exact_max_rows!r}")
        if not isinstance(residual_block_rows, int) or residual_block_rows < 1:
            raise ValueError(f"residual_block_rows must be an int >= 1, got {residual_block_rows!r}")
        self.exact_max_rows = exact_max_rows
        self.residual_block_rows = residual_block_rows

    def uses_exact_path(self, num_rows: int) -> bool:
        """Whether ``num_rows`` captured rows go through the dense exact KID."""
        return self.exact_max_rows is None or num_rows <= self.exact_max_rows

    def reduce(self, a, g, budget, padded, damping, global_rows, generator):
        if a.shape[0] == 0:
            return LocalRows(
                _pad(a, padded), _pad(g, padded),
                torch.zeros(padded, padded, dtype=kernels.rows_dtype(a, g), device=a.device), 0,
            )
        try:
            if self.uses_exact_path(a.shape[0]):
                local_kernel = kernels.kernel(kernels.rows_to(a, torch.float64), g.double())
                picked, m_factor = kernels.kid_local(local_kernel, budget, damping, global_rows)
            else:
                picked, m_factor = kernels.kid_local_rows(
                    kernels.rows_to(a, torch.float64), g.double(), budget, damping, global_rows,
                    self.residual_block_rows,
                )
        except kernels.FactorizationError:
            # NaN factor: the owner's inverse turns non-finite and the layer keeps its old factors.
            picked = torch.arange(min(budget, a.shape[0]), device=a.device)
            m_factor = g.new_full((picked.numel(), picked.numel()), float("nan"))
        m_factor = _pad(m_factor.to(kernels.rows_dtype(a, g)), padded, padded)
        return LocalRows(_pad(a[picked], padded), _pad(g[picked], padded), m_factor, picked.numel())

    def inverse(self, rows, damping, global_rows, gram=None, deferred=None):
        return kernels.kid_inverse(_gram(rows, gram), rows.m_factor.double(), deferred)


REDUCTIONS: dict[str, Reduction] = {r.name: r for r in (SNGD(), KIS(), KID())}
