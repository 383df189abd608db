"""The authors' public HyLo code as a refresh-cost peer for ``precondition_cost.py`` (never vendored).

The SC'22 paper's code (https://github.com/hylo-dso/hylo, class ``dso.optimizers.ngd.NGDOptimizer``)
is imported from a checkout the user names (``--authors-dir``). One refresh of one layer is timed
with the authors' own methods on the same rows ds_hylo gets, split the same way as
``precondition_cost.py`` splits ds_hylo's (one worker's local work + the owner's s x s work):

- KIS: the worker's importance sampling, which the authors run inside the layer's backward hook
  (``_save_grad_output``: the multinomial draw on ||a_i||^2 ||g_i||^2), then the owner's
  ``compute_factors`` (A_S A_S^T, G_S G_S^T) and ``update_inv`` ((K_S / s + lam I)^-1).
- KID: the worker's ``interpolative_decomposition`` (sort, kernel, QR, R11^-1 R12, the residual's
  inverse), then the owner's ``compute_factors``, ``update_inv`` and ``compute_projection``; the
  other workers' R D R^T blocks are made once beforehand, as ds_hylo's other workers' M factors are.

The authors' code works in the rows' dtype (float32 here); ds_hylo forms kernels and solves in float64
(``ds_hylo.reduce``), which the comparison includes.
"""

from __future__ import annotations

import contextlib
import io
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn


class _OneProcess:
    """The authors' ``backend`` interface for a single process (rank 0 of 1)."""

    def rank(self) -> int:
        return 0

    def size(self) -> int:
        return 1


def load_ngd_optimizer(authors_dir: str) -> type:
    """``NGDOptimizer`` from a checkout of github.com/hylo-dso/hylo at ``authors_dir``.

    Raises:
        FileNotFoundError: the folder has no ``dso/optimizers/ngd.py``.
    """
    root = Path(authors_dir).expanduser().resolve()
    if not (root / "dso" / "optimizers" / "ngd.py").is_file():
        raise FileNotFoundError(f"--authors-dir {authors_dir!r}: no dso/optimizers/ngd.py there; give the root of a "
                                "checkout of https://github.com/hylo-dso/hylo")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from dso.optimizers.ngd import NGDOptimizer  # noqa: E402  (the user's checkout)

    return NGDOptimizer


class AuthorsRefresh:
    """One layer's refresh with the authors' ``NGDOptimizer`` methods on rows given as tensors.

    Args:
        ngd_cls: ``NGDOptimizer`` (``load_ngd_optimizer``).
        damping: lambda.
        rank_ratio: the authors' ``compression_ratio`` (rows kept per worker: int(n * ratio)).
        device: where the dummy layer lives (the authors' code moves its eye/zeros there).
    """

    def __init__(self, ngd_cls: type, damping: float, rank_ratio: float, device: torch.device) -> None:
        self.module = nn.Linear(1, 1).to(device)  # only a dict key for the authors' per-layer state
        with contextlib.redirect_stdout(io.StringIO()):  # it prints the modules it keeps
            self.opt = ngd_cls(nn.Sequential(self.module), lr=0.1, init_damping=damping, target_damping=damping,
                               damping_decay_steps=1, weight_decay=0.0, freq=1, momentum=0.0, batch_size=1, iters=1,
                               warmup_epochs=0, backend=_OneProcess(), compression_ratio=rank_ratio,
                               adaptive=[0, 0, 0])
        self.opt.steps = 0  # a refresh step (steps % freq == 0)
        self.opt.acc_stats = True

    def _sample(self, a_local: torch.Tensor, g_local: torch.Tensor, randk: bool) -> None:
        """The worker's part inside the authors' backward hook; the hook scales the output gradient by n."""
        opt, m = self.opt, self.module
        opt.randk = randk
        opt.m_I[m] = a_local
        with warnings.catch_warnings():  # torch.qr's deprecation notice, once per call in the authors' KID
            warnings.simplefilter("ignore", UserWarning)
            opt._save_grad_output(m, None, (g_local / a_local.shape[0],))

    def kis(self, a_local: torch.Tensor, g_local: torch.Tensor, a_others: torch.Tensor,
            g_others: torch.Tensor) -> torch.Tensor:
        """Worker: sample r of its n rows (n, d_in), (n, d_out); owner: C over those and the others' rows."""
        opt, m = self.opt, self.module
        self._sample(a_local, g_local, randk=True)
        opt.m_I[m] = torch.cat([opt.m_I[m], a_others])
        opt.m_G[m] = torch.cat([opt.m_G[m], g_others])
        opt.compute_factors()
        opt.update_inv()
        return opt.m_K[m]

    def kid_blocks(self, a_rows: Sequence[torch.Tensor], g_rows: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The R D R^T block of each other worker (its n rows), made before timing."""
        blocks = []
        for a, g in zip(a_rows, g_rows):
            self._sample(a, g, randk=False)
            blocks.append(self.opt.m_RDR[self.module])
        return blocks

    def kid(self, a_local: torch.Tensor, g_local: torch.Tensor, a_others: torch.Tensor, g_others: torch.Tensor,
            other_blocks: Sequence[torch.Tensor]) -> Any:
        """Worker: interpolative decomposition of its n rows; owner: the projected s x s matrix."""
        opt, m = self.opt, self.module
        self._sample(a_local, g_local, randk=False)
        opt.m_I[m] = torch.cat([opt.m_I[m], a_others])
        opt.m_G[m] = torch.cat([opt.m_G[m], g_others])
        opt.m_RDR[m] = [opt.m_RDR[m], *other_blocks] if other_blocks else opt.m_RDR[m]
        opt.compute_factors()
        opt.update_inv()
        opt.compute_projection()
        return opt.m_K[m]
