#!/usr/bin/env python
"""Train MNIST (MnistCNN) or MNIST-1D (MLP) with HyLo under Accelerate + DeepSpeed ZeRO-1.

HyLo comes from the DeepSpeed JSON's ``"optimizer": {"type": "HyLo", ...}`` section; the same JSON
runs under ``accelerate launch`` and under the ``deepspeed`` launcher (``train_mnist_deepspeed.py``
is this same program under the name the deepspeed-launcher commands use), and the same JSON and
seed give the same parameters under either, with the same threads per process (``--threads``, 1 by
default on a CPU-only host; the parameters' SHA-256 is printed at the end). Rank 0 writes the metrics
to ``runs/mnist-<launcher>/metrics.json`` (``--metrics-out`` elsewhere) and prints the path.
``--help`` prints once, on rank 0. From the repository root::

    # 2 CPU processes (tests use this), MNIST-1D generated locally:
    OMP_NUM_THREADS=1 accelerate launch --config_file configs/accelerate/cpu_2proc.yaml \\
        examples/train_mnist_accelerate.py
    # real MNIST:
    ... examples/train_mnist_accelerate.py --data-dir ../shared/data/mnist --epochs 1
    # same JSON, deepspeed launcher:
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 examples/train_mnist_accelerate.py \\
        --deepspeed_config configs/deepspeed/zero1_kid_fp32.json
    # baselines / other modes: --optimizer {hylo,hylo-kid,hylo-kis,hylo-hybrid,hylo-sngd,sgd,adamw}

The micro batch (per process) is the JSON's ``train_micro_batch_size_per_gpu``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hylo_session import Session, add_session_args, evaluate_classifier, parse_session_args  # noqa: E402

from data import load_mnist, load_mnist1d  # noqa: E402
from models import build_model  # noqa: E402

DEFAULT_CONFIG = "configs/deepspeed/zero1_kid_fp32.json"
RUN_NAME = "mnist"  # metrics: runs/mnist-<launcher>/metrics.json (runs/mnist/ is train_mnist.py's)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=None,
                   help="folder with the MNIST idx files (e.g. ../shared/data/mnist); "
                        "default: MNIST-1D generated locally")
    p.add_argument("--epochs", type=int, default=None, help="default: 1 for MNIST, 10 for MNIST-1D")
    p.add_argument("--train-subset", type=int, default=None, help="use only the first N training samples")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on the first N test samples")
    p.add_argument("--mnist1d-samples", type=int, default=10000, help="MNIST-1D samples (80%% train)")
    add_session_args(p, DEFAULT_CONFIG, adamw_lr=1e-3, run_name=RUN_NAME)
    return parse_session_args(p, argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    session = Session(args)
    torch.manual_seed(args.seed)
    if args.data_dir:
        train_x, train_y, test_x, test_y = load_mnist(args.data_dir)
        model, dataset = build_model("mnist_cnn"), "mnist"
    else:
        train_x, train_y, test_x, test_y = load_mnist1d(seed=args.seed, num_samples=args.mnist1d_samples)
        model, dataset = build_model("mlp", in_features=train_x.shape[1]), "mnist1d"
    if args.train_subset:
        train_x, train_y = train_x[: args.train_subset], train_y[: args.train_subset]
    if args.test_subset:
        test_x, test_y = test_x[: args.test_subset], test_y[: args.test_subset]
    epochs = args.epochs or (1 if dataset == "mnist" else 10)

    loader = session.prepare(model, TensorDataset(train_x, train_y))
    session.print(f"{dataset}: {len(train_x)} train / {len(test_x)} test samples, {epochs} epoch(s)\n  "
                  + session.describe())
    init_loss, init_acc = evaluate_classifier(session, test_x, test_y, batch=1000)
    session.print(f"before training: test loss {init_loss:.4f}  test acc {100 * init_acc:.2f}%")

    history, window = [], []
    for epoch in range(1, epochs + 1):
        session.set_epoch(loader, epoch)
        bar = session.progress(len(loader), f"epoch {epoch}/{epochs}")
        for x, y in loader:
            with session.accumulate():
                x, y = session.to_device((x, y))
                logits = session.engine(x)
                session.sample_fisher(logits)
                loss = F.cross_entropy(logits.float(), y)
                session.backward(loss)
            window.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{window[-1]:.4f}", lr=f"{session.lr():.3g}")
            if session.step % args.log_every == 0 and window and session.engine.is_gradient_accumulation_boundary():
                session.print(f"step {session.step}: train loss {sum(window) / len(window):.4f}  lr {session.lr():.4g}"
                              + (f"  damping {session.hylo.damping:.4g}" if session.hylo else ""))
                window = []
            if session.done():
                break
        bar.close()
        test_loss, test_acc = evaluate_classifier(session, test_x, test_y, batch=1000)
        history.append({"epoch": epoch, "step": session.step, "test_loss": test_loss, "test_acc": test_acc})
        session.print(f"epoch {epoch}: test loss {test_loss:.4f}  test acc {100 * test_acc:.2f}%  "
                      f"({session.step} steps)")
        if session.done() or not math.isfinite(test_loss):
            break
    return session.finish({
        "dataset": dataset,
        "initial_test_loss": init_loss,
        "initial_test_acc": init_acc,
        "final_test_loss": history[-1]["test_loss"],
        "final_test_acc": history[-1]["test_acc"],
        "history": history,
    })


if __name__ == "__main__":
    main()
