"""An Embedding's preconditioned step on 2 gloo ranks equals the single-process step (SNGD).

Each rank takes half of every batch and averages the gradients before ``opt.step()`` (as DDP does);
SNGD gathers every rank's rows, so K, C and the step are the single-process ones up to round-off.
The token ids cross the fused all-gather bit-cast into the float payload (one float64 word, or two
float32 words: both dtypes are run), docs/design.md section 1.10.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distributed import run_distributed

from ds_hylo import HyLo

V, D, C, PAD = 300, 6, 4, 1
STEPS = 3


class _EmbedNet(nn.Module):
    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=PAD, dtype=dtype)
        self.head = nn.Linear(D, C, dtype=dtype)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def _batches():
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(250, V, (4, 5), generator=gen)  # ids above 256, repeated within and across samples
        ids[:, 0] = 299
        ids[3, -2:] = PAD
        out.append((ids, torch.randint(0, C, (4, 5), generator=gen)))
    return out


def _train(dtype_name: str, rank: int, world: int) -> dict[str, torch.Tensor]:
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(1)
    model = _EmbedNet(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = HyLo(model, lr=0.05, base="sgd", mode="sngd", update_freq=2, damping=0.05)
    for ids, labels in _batches():
        share = ids.shape[0] // world
        ids, labels = ids[rank * share:(rank + 1) * share], labels[rank * share:(rank + 1) * share]
        opt.zero_grad()
        F.cross_entropy(model(ids).reshape(-1, C), labels.reshape(-1)).backward()
        if world > 1:
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
    assert set(opt.preconditioner.factors) == {"emb", "head"}
    return {"emb": model.emb.weight.detach().clone(), "head": model.head.weight.detach().clone(),
            "a": opt.preconditioner.factors["emb"].a.clone()}


def embedding_on_ranks(dtype_name: str) -> dict[str, torch.Tensor]:
    return _train(dtype_name, dist.get_rank(), dist.get_world_size())


@pytest.mark.parametrize("dtype_name, tol", [("float64", 1e-10), ("float32", 2e-5)])
def test_two_rank_embedding_step_equals_single_process(dtype_name, tol):
    single = _train(dtype_name, 0, 1)
    ranks = run_distributed(embedding_on_ranks, dtype_name, world_size=2)
    for out in ranks:
        assert out["a"].dtype == torch.long
        assert sorted(out["a"][:, 0].tolist()) == sorted(single["a"][:, 0].tolist())  # every id, exactly
        for key in ("emb", "head"):
            torch.testing.assert_close(out[key], single[key], rtol=tol, atol=tol)
    assert torch.equal(ranks[0]["emb"], ranks[1]["emb"])
    assert ranks[0]["emb"][PAD].abs().max() == 0  # the padding row is never written
