"""What rotating contributors costs in steps: MNIST CNN on 4 gloo ranks, every rank vs 1 rank per refresh.

``contributing_ranks=k`` bounds the bytes per refresh (``rotation.py``) by letting only k ranks,
rotating every refresh, contribute their rows. With fewer rows per refresh the curvature is
estimated from fewer samples; this script measures what that costs in optimizer steps to a test
accuracy, on real processes: 4 gloo CPU ranks, DistributedDataParallel, local batch 32 (global
128), HyLo-KIS on momentum SGD (``base="sgd"``, the ``hylo-kis`` row of ``convergence.py``) with
its tuned MNIST learning rate, damping and momentum named below, ``contributing_ranks`` in
{None (all 4), 2, 1}.
Every variant sees the same initial weights and the same batches at a given seed; test accuracy on a
fixed 2000-image subset every ``--eval-every`` steps. Wall time is not compared (4 ranks share 2 cores).

    python benchmarks/rotation_steps.py                    # ~10 min on 2 cores
    python benchmarks/rotation_steps.py --steps 60 --seeds 0 --eval-every 20   # smoke run

Writes ``benchmarks/results/rotation_steps.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "benchmarks"))
from _env import git_revision  # noqa: E402

WORLD = 4
LOCAL_BATCH = 32
TARGETS = (97.0, 98.0)


def _rank_main(rank: int, port: int, out_dir: str, contributing: Optional[int], seed: int, args: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from data import load_mnist
        from models import MnistCNN

        import ds_hylo

        train_x, train_y, test_x, test_y = load_mnist(args["data_dir"])
        pick = torch.randperm(test_x.shape[0], generator=torch.Generator().manual_seed(54321))[:2000]
        test_x, test_y = test_x[pick], test_y[pick]
        torch.manual_seed(seed)
        model = MnistCNN()
        options = dict(lr=args["lr"], damping=args["damping"], base="sgd", momentum=args["momentum"], mode="kis", seed=seed)
        if contributing is not None:
            options["contributing_ranks"] = contributing
        opt = ds_hylo.HyLo(model, **options)
        net = torch.nn.parallel.DistributedDataParallel(model)
        order = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(1000 + seed))
        curve = []
        global_batch = WORLD * LOCAL_BATCH
        for step in range(args["steps"] + 1):
            if step % args["eval_every"] == 0 or step == args["steps"]:
                model.eval()
                with torch.no_grad():
                    acc = 100.0 * float((model(test_x).argmax(1) == test_y).float().mean())
                model.train()
                curve.append({"step": step, "acc": round(acc, 3)})
            if step == args["steps"]:
                break
            start = (step * global_batch) % (train_x.shape[0] - global_batch)
            idx = order[start + rank * LOCAL_BATCH: start + (rank + 1) * LOCAL_BATCH]
            opt.zero_grad()
            loss = F.cross_entropy(net(train_x[idx]), train_y[idx])
            loss.backward()
            opt.step()
        if rank == 0:
            stats = opt.stats()
            result = {"curve": curve, "refreshes": stats["refreshes"],
                      "bytes_sent_rank0": {k: int(v) for k, v in stats["bytes_sent"].items()}}
            Path(out_dir, "result.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(contributing: Optional[int], seed: int, args: dict) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank_main, args=(_free_port(), out, contributing, seed, args), nprocs=WORLD, join=True)
        return json.loads(Path(out, "result.json").read_text())


def steps_to(curve: list[dict[str, float]], target: float) -> Optional[int]:
    return next((p["step"] for p in curve if p["acc"] >= target), None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=430, help="optimizer steps per run (430 = one epoch at 128)")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--contributing", nargs="+", default=["all", "2", "1"], help="'all' or k values")
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--damping", type=float, default=1.0)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "mnist"))
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "rotation_steps.json")
    a = p.parse_args(argv)
    settings = {"steps": a.steps, "eval_every": a.eval_every, "lr": a.lr, "damping": a.damping,
                "momentum": a.momentum, "data_dir": a.data_dir}
    t0 = time.perf_counter()
    runs = []
    for seed in a.seeds:
        for k in a.contributing:
            contributing = None if k == "all" else int(k)
            result = train(contributing, seed, settings)
            runs.append({"contributing_ranks": k, "seed": seed, **result})
            reach = {f"steps_to_{t:g}": steps_to(result["curve"], t) for t in TARGETS}
            print(f"contributing={k:>3s} seed={seed}: final {result['curve'][-1]['acc']:.2f}% {reach}", flush=True)
    rows = []
    for k in a.contributing:
        mine = [r for r in runs if r["contributing_ranks"] == k]
        row: dict[str, Any] = {"contributing_ranks": k}
        for t in TARGETS:
            hits = [steps_to(r["curve"], t) for r in mine]
            row[f"steps_to_{t:g}"] = hits
        row["final_acc"] = [r["curve"][-1]["acc"] for r in mine]
        rows.append(row)
    record = {
        "benchmark": "rotation_steps", "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python"] + [str(x) for x in sys.argv]), "seconds": round(time.perf_counter() - t0, 1),
        "git": git_revision(only="ds_hylo"), "world_size": WORLD, "local_batch": LOCAL_BATCH, "targets": list(TARGETS),
        "settings": {k: v for k, v in settings.items() if k != "data_dir"}, "rows": rows, "runs": runs,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(record, indent=1))
    print(f"{'contributing':>12s} " + " ".join(f"{'steps to ' + format(t, 'g') + '%':>18s}" for t in TARGETS)
          + f" {'final %':>16s}")
    for row in rows:
        print(f"{row['contributing_ranks']:>12s} " + " ".join(f"{str(row[f'steps_to_{t:g}']):>18s}" for t in TARGETS)
              + f" {str(row['final_acc']):>16s}")
    print(f"wrote {a.out} in {record['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
