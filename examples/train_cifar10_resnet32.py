#!/usr/bin/env python
"""ResNet-32 on CIFAR-10 with HyLo: the HyLo paper's CIFAR-10 recipe under Accelerate or DeepSpeed.

Recipe (configs/deepspeed/resnet32_cifar10_hylo.json + the schedule options below; see
examples/launch/README.md for where the values come from): local batch 128, momentum 0.9, weight
decay 4e-4, 100 epochs, LR 0.3 after a 5-epoch linear warmup (from 0.1 x), x0.35 at epochs
30/50/70/90, HyLo hybrid KID/KIS with rank_ratio 0.1 and a curvature refresh every 10 steps,
damping from ``damping`` to ``damping_target`` over ``damping_decay_steps``. Random crop + flip.

From the repository root::

    # 8 GPUs, one node:
    accelerate launch --config_file configs/accelerate/multi_gpu_8.yaml \\
        examples/train_cifar10_resnet32.py --data-dir data/cifar10 --download
    # same JSON, deepspeed launcher:
    deepspeed --num_gpus 8 examples/train_cifar10_resnet32.py \\
        --deepspeed_config configs/deepspeed/resnet32_cifar10_hylo.json --data-dir data/cifar10
    # first-order baseline with the same schedule: --optimizer sgd

``--data-dir`` holds the CIFAR-10 binary release (``cifar-10-batches-bin`` or its .bin files);
``--download`` fetches it (rank 0 downloads, the others wait).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hylo_session import (  # noqa: E402
    Session, add_session_args, evaluate_classifier, parse_session_args, step_schedule)

from data import augment_cifar, load_cifar10  # noqa: E402
from models import resnet32  # noqa: E402

DEFAULT_CONFIG = "configs/deepspeed/resnet32_cifar10_hylo.json"
RUN_NAME = "cifar10_resnet32"  # metrics: runs/cifar10_resnet32-<launcher>/metrics.json


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", required=True, help="CIFAR-10 binary release folder")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 into --data-dir if missing")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--warmup-epochs", type=float, default=5.0, help="linear LR warmup from 0.1 x lr")
    p.add_argument("--milestones", type=int, nargs="*", default=[30, 50, 70, 90], help="LR decay epochs")
    p.add_argument("--lr-decay", type=float, default=0.35, help="LR factor at each milestone")
    p.add_argument("--damping-decay-epochs", type=float, default=None,
                   help="set HyLo damping_decay_steps to this many epochs (default: the JSON's steps)")
    p.add_argument("--no-augment", action="store_true", help="no random crop / flip")
    p.add_argument("--train-subset", type=int, default=None, help="use only the first N training images")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on the first N test images")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs")
    add_session_args(p, DEFAULT_CONFIG, adamw_lr=1e-3, run_name=RUN_NAME)
    return parse_session_args(p, argv)


def load_data(args: argparse.Namespace, session: Session):
    # Only rank 0 downloads; the others wait for it and then read the files.
    if args.download and session.world_size > 1 and dist.is_initialized():
        if session.is_main:
            load_cifar10(args.data_dir, download=True)
        dist.barrier()
    train_x, train_y, test_x, test_y = load_cifar10(args.data_dir, download=args.download)
    if args.train_subset:
        train_x, train_y = train_x[: args.train_subset], train_y[: args.train_subset]
    if args.test_subset:
        test_x, test_y = test_x[: args.test_subset], test_y[: args.test_subset]
    return train_x, train_y, test_x, test_y


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    session = Session(args)
    train_x, train_y, test_x, test_y = load_data(args, session)
    torch.manual_seed(args.seed)
    model = resnet32()

    global_batch = session.micro_batch_size * session.world_size * session.gradient_accumulation_steps
    steps_per_epoch = max(1, len(train_x) // global_batch)
    overrides = {}
    if args.damping_decay_epochs is not None and session.hylo_params().get("damping_target") is not None:
        overrides["damping_decay_steps"] = max(1, int(round(args.damping_decay_epochs * steps_per_epoch)))
    schedule = step_schedule(steps_per_epoch, args.warmup_epochs, args.milestones, args.lr_decay)
    loader = session.prepare(model, TensorDataset(train_x, train_y), lr_lambda=schedule, hylo_overrides=overrides)
    session.print(f"CIFAR-10: {len(train_x)} train / {len(test_x)} test images, global batch {global_batch}, "
                  f"{steps_per_epoch} steps/epoch, {args.epochs} epochs, warmup {args.warmup_epochs} epochs, "
                  f"LR x{args.lr_decay} at epochs {args.milestones}\n  " + session.describe())

    augment_gen = torch.Generator().manual_seed(args.seed * 1000 + session.rank)
    history, window, first_loss = [], [], None
    for epoch in range(1, args.epochs + 1):
        session.set_epoch(loader, epoch)
        bar = session.progress(len(loader), f"epoch {epoch}/{args.epochs}")
        correct = seen = 0
        for x, y in loader:
            if not args.no_augment:
                x = augment_cifar(x, augment_gen)
            with session.accumulate():
                x, y = session.to_device((x, y))
                logits = session.engine(x)
                session.sample_fisher(logits)
                logits = logits.float()
                loss = F.cross_entropy(logits, y)
                session.backward(loss)
            value = float(loss.detach())
            first_loss = value if first_loss is None else first_loss
            window.append(value)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}", acc=f"{100 * correct / seen:.1f}%", lr=f"{session.lr():.3g}")
            if session.step % args.log_every == 0 and session.engine.is_gradient_accumulation_boundary():
                damping = f"  damping {session.hylo.damping:.4g}" if session.hylo else ""
                session.print(f"step {session.step}: train loss {sum(window) / len(window):.4f}  "
                              f"lr {session.lr():.4g}{damping}")
                window = []
            if session.done() or not math.isfinite(value):
                break
        bar.close()
        record = {"epoch": epoch, "step": session.step, "train_loss_last": value,
                  "train_acc": correct / max(1, seen)}
        last = session.done() or epoch == args.epochs or not math.isfinite(value)
        if epoch % args.eval_every == 0 or last:
            record["test_loss"], record["test_acc"] = evaluate_classifier(session, test_x, test_y, batch=500)
            session.print(f"epoch {epoch}: train acc {100 * record['train_acc']:.2f}%  test loss "
                          f"{record['test_loss']:.4f}  test acc {100 * record['test_acc']:.2f}%  "
                          f"({session.step} steps)")
        history.append(record)
        if last:
            break
    final = history[-1]
    return session.finish({
        "first_train_loss": first_loss,
        "last_train_loss": final["train_loss_last"],
        "final_test_loss": final.get("test_loss"),
        "final_test_acc": final.get("test_acc"),
        "steps_per_epoch": steps_per_epoch,
        "history": history,
    })


if __name__ == "__main__":
    main()
