#!/usr/bin/env python
"""Train MNIST (or MNIST-1D) with HyLo as a DeepSpeed client optimizer, chosen in the JSON config.

The same program as ``train_mnist_accelerate.py`` (one training loop, one set of defaults, the
launcher detected from the environment), under the name the ``deepspeed`` launcher commands use,
so the same JSON and seed give the same result under ``deepspeed`` and ``accelerate launch``::

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 examples/train_mnist_deepspeed.py \\
        --deepspeed_config configs/deepspeed/zero1_kid_fp32.json --data-dir ../shared/data/mnist

Under the deepspeed launcher the engine comes from ``ds_hylo.initialize``, called exactly where
``deepspeed.initialize`` would be. Options: ``--help`` (printed once, by rank 0).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_mnist_accelerate import main  # noqa: E402

if __name__ == "__main__":
    main()
