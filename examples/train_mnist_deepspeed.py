"""Train MNIST (or MNIST-1D) with HyLo as a DeepSpeed client optimizer, chosen in the JSON config.

Launch (2 CPU processes here; use --num_gpus N on a GPU node):

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 examples/train_mnist_deepspeed.py \\
        --deepspeed_config configs/deepspeed/zero1_kid_fp32.json --data-dir ../shared/data/mnist

The script calls ``ds_hylo.initialize`` exactly where it would call ``deepspeed.initialize``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import TensorBatches, load_mnist, load_mnist1d  # noqa: E402
from models import build_model  # noqa: E402

import ds_hylo  # noqa: E402
from ds_hylo.accelerate import shutdown  # noqa: E402
from ds_hylo.deepspeed import disable_cpu_shm_comm  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="MNIST idx folder; default: MNIST-1D generated locally")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    parser.add_argument("--train-subset", type=int, default=None, help="use only the first N training samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-dir", default=None, help="save a DeepSpeed checkpoint here at the end")
    parser.add_argument("--metrics-out", default=None, help="write final metrics (JSON) here, from rank 0")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args(argv)


@torch.no_grad()
def accuracy(engine, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    engine.eval()
    dtype = next(engine.module.parameters()).dtype
    correct = sum(
        int((engine(x[i:i + batch].to(engine.device, dtype)).argmax(1).cpu() == y[i:i + batch]).sum())
        for i in range(0, len(x), batch)
    )
    engine.train()
    return correct / len(x)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available():
        disable_cpu_shm_comm()
        deepspeed.init_distributed(dist_backend="gloo")
    else:
        deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)

    if args.data_dir:
        train_x, train_y, test_x, test_y = load_mnist(args.data_dir)
        model = build_model("mnist_cnn")
    else:
        train_x, train_y, test_x, test_y = load_mnist1d(seed=args.seed)
        model = build_model("mlp")
    if args.train_subset:
        train_x, train_y = train_x[: args.train_subset], train_y[: args.train_subset]

    engine, optimizer, _, _ = ds_hylo.initialize(args=args, model=model)
    micro = engine.train_micro_batch_size_per_gpu()
    # Every rank sees the same shuffled order and takes its own slice of each global batch.
    batches = TensorBatches(train_x, train_y, batch_size=micro * world, shuffle=True, drop_last=True, seed=args.seed)
    dtype = next(engine.module.parameters()).dtype
    start, step = time.perf_counter(), 0
    for epoch in range(args.epochs):
        bar = tqdm(batches, desc=f"epoch {epoch}", disable=rank != 0)
        for x, y in bar:
            x, y = x[rank * micro:(rank + 1) * micro], y[rank * micro:(rank + 1) * micro]
            logits = engine(x.to(engine.device, dtype))
            if hasattr(engine, "hylo"):  # the JSON's "fisher": "sampled" captures here; else a no-op
                engine.hylo.sample_fisher(logits)
            loss = F.cross_entropy(logits.float(), y.to(engine.device))
            engine.backward(loss)
            engine.step()
            if engine.is_gradient_accumulation_boundary():
                step += 1
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if args.max_steps and step >= args.max_steps:
                break
        if args.max_steps and step >= args.max_steps:
            break
    elapsed = time.perf_counter() - start
    metrics = {
        "world_size": world,
        "steps": step,
        "seconds": elapsed,
        "test_accuracy": accuracy(engine, test_x, test_y),
        "hylo": engine.hylo.stats() if hasattr(engine, "hylo") else None,
    }
    if args.save_dir:
        engine.save_checkpoint(args.save_dir)
    if rank == 0:
        print(f"world {world}  steps {step}  time {elapsed:.1f}s  test accuracy {metrics['test_accuracy']:.4f}")
        if metrics["hylo"]:
            timers = {k: round(v["seconds"], 3) for k, v in metrics["hylo"]["timers"].items()}
            print(f"HyLo modes {set(metrics['hylo']['modes'].values())}  timers (s) {timers}  "
                  f"bytes sent {metrics['hylo']['bytes_sent']}")
        if args.metrics_out:
            Path(args.metrics_out).write_text(json.dumps(metrics, indent=2, default=str))
    shutdown()
    return metrics


if __name__ == "__main__":
    main()
