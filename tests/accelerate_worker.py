"""Training script launched by tests/integration/test_accelerate.py under `accelerate launch` or torchrun.

    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml tests/accelerate_worker.py \
        --launcher accelerate --configs A.json B.json --out DIR
    torchrun --nproc_per_node 2 tests/accelerate_worker.py --launcher deepspeed --configs A.json B.json --out DIR

For every config it trains the same small MLP on the same data (seeded, no shuffling) and writes
DIR/<launcher>_<config stem>_rank<r>.pt with the final parameters, the per-step losses and the
full-data loss before and after training. Under Accelerate, process r gets global batches
r, r + world, ... (Accelerate's BatchSamplerShard); the deepspeed path shards the same way.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IN, HIDDEN, CLASSES = 12, 16, 4


def make_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=gen)
    teacher = torch.randn(IN, CLASSES, generator=gen)
    return x, (x @ teacher).argmax(1)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(),
                         nn.Linear(HIDDEN, CLASSES))


@torch.no_grad()
def full_loss(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(F.cross_entropy(module(x.to(next(module.parameters()).dtype)).float(), y))


def run_accelerate(configs: list[str], steps: int, out: Path) -> None:
    from ds_hylo.accelerate import make_accelerator, micro_batch_size, prepare, shutdown

    accelerator = make_accelerator()
    for path in configs:
        model = make_model()
        # Every config after the first replaces the plugin's config (the first one came from the yaml).
        from_yaml = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
        config = None if os.path.exists(from_yaml) and os.path.samefile(path, from_yaml) else path
        if config is not None:
            from ds_hylo.deepspeed import load_config

            micro = int(load_config(path)["train_micro_batch_size_per_gpu"])
        else:
            micro = micro_batch_size(accelerator)
        world = accelerator.num_processes
        x, y = make_data(micro * world * steps)
        loader = DataLoader(TensorDataset(x, y), batch_size=micro, shuffle=False)
        start = time.perf_counter()
        engine, optimizer, loader = prepare(accelerator, model, loader, config=config)
        before = full_loss(engine.module, x, y)
        losses = []
        dtype = next(engine.module.parameters()).dtype
        for xb, yb in loader:
            with accelerator.accumulate(engine):
                loss = F.cross_entropy(engine(xb.to(dtype)).float(), yb)
                accelerator.backward(loss)
            losses.append(float(loss.detach()))
        dump(out, "accelerate", path, accelerator.process_index, engine, losses, before, full_loss(engine.module, x, y),
             time.perf_counter() - start)
        if path == configs[0]:
            checkpoint_roundtrip(accelerator, engine, out / "checkpoint")
        accelerator.free_memory()
        del engine, optimizer
    shutdown(accelerator)


def checkpoint_roundtrip(accelerator, engine, directory: Path) -> None:
    """accelerator.save_state / load_state go through the engine's (HyLo-aware) save/load_checkpoint."""
    precond = engine.hylo.preconditioner
    saved_steps, saved_factors = precond.steps, {n: f.c.clone() for n, f in precond.factors.items()}
    accelerator.save_state(str(directory))
    precond.steps += 100  # disturb the state, then restore it from the checkpoint
    for factors in precond.factors.values():
        factors.c.zero_()
    accelerator.load_state(str(directory))
    restored = precond.steps == saved_steps and all(
        torch.equal(precond.factors[n].c, c) for n, c in saved_factors.items())
    # Each rank writes its HyLo file before DeepSpeed's save (whose first barrier orders it); wait
    # for the others before listing the files anyway.
    accelerator.wait_for_everyone()
    torch.save({"restored": restored, "files": sorted(p.name for p in directory.rglob("hylo_state_rank*.pt"))},
               directory.parent / f"checkpoint_rank{accelerator.process_index}.pt")


def run_deepspeed(configs: list[str], steps: int, out: Path) -> None:
    import torch.distributed as dist

    import ds_hylo
    from ds_hylo.accelerate import shutdown
    from ds_hylo.deepspeed import load_config

    for path in configs:
        model = make_model()
        engine, _, _, _ = ds_hylo.initialize(model=model, config=path)
        rank, world = dist.get_rank(), dist.get_world_size()
        micro = int(load_config(path)["train_micro_batch_size_per_gpu"])
        x, y = make_data(micro * world * steps)
        start = time.perf_counter()
        before = full_loss(engine.module, x, y)
        losses = []
        batches = list(DataLoader(TensorDataset(x, y), batch_size=micro, shuffle=False))
        dtype = next(engine.module.parameters()).dtype
        for xb, yb in batches[rank::world]:
            loss = F.cross_entropy(engine(xb.to(dtype)).float(), yb)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        dump(out, "deepspeed", path, rank, engine, losses, before, full_loss(engine.module, x, y),
             time.perf_counter() - start)
        del engine
    shutdown()


def full_params(engine) -> dict[str, torch.Tensor]:
    """The engine's parameters at full shape (gathered under ZeRO-3, which keeps (0,) placeholders)."""
    named = list(engine.module.named_parameters())
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().float().clone() for n, p in named}
    return {n: p.detach().float().clone() for n, p in named}


def dump(out: Path, launcher: str, config: str, rank: int, engine, losses, before, after, seconds) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "params": full_params(engine),
            "losses": losses,
            "loss_before": before,
            "loss_after": after,
            "seconds": seconds,
            "world_size": engine.world_size,
            "hylo": engine.hylo.stats(),
            "zero_stage": engine.zero_optimization_stage(),
        },
        out / f"{launcher}_{Path(config).stem}_rank{rank}.pt",
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--launcher", choices=("accelerate", "deepspeed"), required=True)
    parser.add_argument("--configs", nargs="+", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.launcher == "accelerate":
        run_accelerate(args.configs, args.steps, Path(args.out))
    else:
        run_deepspeed(args.configs, args.steps, Path(args.out))


if __name__ == "__main__":
    main()
