"""The non-finite fall-back is one decision for all ranks (issue 22 item 9), with 2 real gloo ranks.

On DeepSpeed's path (``grads_are_local=True``: each rank preconditions its local gradients before
the average) one rank's preconditioned direction of one layer turns non-finite while its gradient
stays finite. Every rank must then keep that layer's raw gradient at that step, as if every rank
had fallen back: otherwise the average mixes one rank's raw gradient with the others'
preconditioned directions, which is neither update. ``Preconditioner._apply`` sends the per-layer
finiteness sums in one all-reduce for this.
"""

from __future__ import annotations

import pytest
import torch

from distributed import run_distributed
from nonfinite_workers import train_with_poisoned_direction

pytestmark = pytest.mark.slow

STEPS, POISON_STEP = 4, 2


def test_one_ranks_nonfinite_direction_makes_every_rank_fall_back():
    one = run_distributed(train_with_poisoned_direction, [1], POISON_STEP, STEPS)
    both = run_distributed(train_with_poisoned_direction, [0, 1], POISON_STEP, STEPS)
    clean = run_distributed(train_with_poisoned_direction, [], POISON_STEP, STEPS)
    for rank in (0, 1):
        # the same update as when every rank falls back, bit for bit
        for p, q in zip(one[rank]["params"], both[rank]["params"]):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
        for p, q in zip(one[rank]["params"], one[0]["params"]):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
        # every rank counts the event, also the one whose own direction was finite
        assert one[rank]["nonfinite_events"] == 1, (rank, one[rank]["nonfinite_events"])
        assert clean[rank]["nonfinite_events"] == 0
        assert one[rank]["refreshes"] == clean[rank]["refreshes"] == STEPS // 2
    # the fall-back changed the update (the poisoned step really kept the raw gradient)
    assert not torch.equal(one[0]["params"][0], clean[0]["params"][0])
