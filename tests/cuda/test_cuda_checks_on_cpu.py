"""The checks of ``cuda_checks.py`` with ``device = "cpu"``: cheap proof, on every machine, that the
bodies of the CUDA tests work (CPU references, ranks, DeepSpeed loops, checkpoints). Not marked
``cuda``; the multi-process ones are marked ``slow``."""

from __future__ import annotations

import pytest

from cuda_checks import *  # noqa: F401,F403 - the shared, device-parametrised test functions and fixtures


@pytest.fixture(scope="module")
def device() -> str:
    return "cpu"
