"""Process groups and the shared per-step layout (issue 20), with real gloo ranks.

- 4 ranks = 2 data-parallel x 2 model-parallel groups: ``HyLo(model, process_group=dp_group)``
  exchanges rows inside its data-parallel group only; each group's run equals one process on
  that group's batches (so, transitively, an independent 2-rank run), and the two groups differ.
- A layer unused on one rank, on DeepSpeed's path (local gradients preconditioned before the
  average) with grafting and with KL clipping: no hang, the ranks agree, and grafting equals the
  path that averages first (the preconditioner is linear; grafting averages raw gradients and
  directions over the shared layout).
- DeepSpeed set-ups HyLo does not support (tensor, pipeline, sequence parallelism) are refused by
  name (``ds_hylo.deepspeed.data_parallel_exchange``).
"""

from __future__ import annotations

import types

import pytest
import torch

from distributed import run_distributed
from group_workers import train_group_reference, train_local_gradients, train_two_groups

pytestmark = pytest.mark.slow

STEPS = 4
GROUP_CASES = {
    mode: {"base": "sgd", "lr": 0.3, "momentum": 0.9, "mode": mode, "rank_ratio": 1.0, "update_freq": 2, "damping": 0.1}
    for mode in ("kis", "kid")
}


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def test_rows_stay_inside_each_data_parallel_group():
    results = run_distributed(train_two_groups, GROUP_CASES, STEPS, world_size=4)
    for mode, options in GROUP_CASES.items():
        references = [train_group_reference(group, options, STEPS) for group in (0, 1)]
        for rank, result in enumerate(results):
            got = result[mode]
            assert got["group"] == rank // 2 and got["refreshes"] == STEPS // 2
            assert got["bytes"], "the data-parallel peers exchanged rows"
            for step in range(STEPS):
                assert _max_diff(got["params"][step], references[rank // 2][step]) < 2e-5, (mode, rank, step)
        assert _max_diff(references[0][-1], references[1][-1]) > 1e-2  # the groups really differ


LOCAL_CASES = {
    "graft": {"base": "sgd", "lr": 0.2, "mode": "kis", "rank_ratio": 1.0, "update_freq": 2, "damping": 0.1,
              "graft": "adamw"},
    "kl": {"base": "sgd", "lr": 0.2, "mode": "kid", "rank_ratio": 1.0, "update_freq": 2, "damping": 0.1,
           "kl_clip": 1e-3},
}


def test_a_layer_unused_on_one_rank_with_local_gradients():
    rank0, rank1 = run_distributed(train_local_gradients, LOCAL_CASES, STEPS)
    for key in rank0:
        assert rank0[key]["refreshes"] == STEPS // 2, key
        for step in range(STEPS):
            for p, q in zip(rank0[key]["params"][step], rank1[key]["params"][step]):
                assert torch.isfinite(p).all() and torch.equal(p, q), (key, step)
    local, averaged = rank0[("graft", "local")]["params"], rank0[("graft", "averaged")]["params"]
    for step in range(STEPS):
        assert _max_diff(local[step], averaged[step]) < 2e-5, step
    assert rank0[("kl", "local")]["kl_scale"] < 1.0  # the clip was active


def _engine(**attributes):
    defaults = {"pipeline_parallelism": False, "mp_world_size": 1, "sequence_parallel_size": 1,
                "autotp_size": lambda: 0, "data_parallel_group": None}
    return types.SimpleNamespace(**{**defaults, **attributes})


@pytest.mark.parametrize("attributes, named", [
    ({"mp_world_size": 2}, "tensor/model parallelism (mp_world_size=2"),
    ({"autotp_size": lambda: 4}, "autotp_size=4"),
    ({"pipeline_parallelism": True}, "pipeline parallelism"),
    ({"sequence_parallel_size": 2}, "sequence parallelism (sequence_parallel_size=2)"),
])
def test_unsupported_parallelism_is_refused_by_name(attributes, named):
    pytest.importorskip("deepspeed")
    from ds_hylo.config import ConfigError
    from ds_hylo.deepspeed import data_parallel_exchange

    with pytest.raises(ConfigError, match="supports data parallelism only") as error:
        data_parallel_exchange(_engine(**attributes))
    assert named in str(error.value)
