#!/usr/bin/env python
"""Peak memory per rank under DeepSpeed ZeRO stages 1, 2 and 3: HyLo against AdamW (issue 21).

A transformers ``LlamaForCausalLM`` built from a config (the 77.5M Llama of ``memory_peak.py``:
hidden 768, MLP 2048, 4 layers, vocabulary 32000, untied head), random tokens, next-token
cross-entropy, on 2 and 4 gloo CPU ranks (``torch.distributed.run``). Each (ranks, stage,
optimizer) runs in its own launch: DeepSpeed's AdamW (``torch_adam``) from the JSON, or HyLo from
the JSON with its defaults but ``update_freq=2`` (steps 0 and 2 refresh; step 2 is the first with
old factors beside the new ones). Every rank records its peak RSS (``VmHWM``, the whole process:
Python, torch, DeepSpeed and the model included) and its RSS after ``initialize``; the table
reports the largest rank's, and HyLo's peak as a ratio to AdamW's at the same ranks and stage.

    python benchmarks/zero_memory.py                 # ~10 minutes on 2 CPU cores
    python benchmarks/zero_memory.py --tiny --worlds 2 --stages 3   # seconds (test/smoke)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

_REPO = Path(__file__).resolve().parents[1]
for _path in (str(_REPO), str(_REPO / "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from _env import cpu_model, git_revision  # noqa: E402

MIB = 2**20
RESULTS = _REPO / "benchmarks" / "results"
OPTIMIZERS = ("adamw", "hylo")


def _status(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+)", text).group(1)) * 1024


def ds_config(optimizer: str, stage: int, micro_batch: int) -> dict[str, Any]:
    """The JSON of one run: the same but for the optimizer section."""
    section = (
        {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0, "torch_adam": True}}
        if optimizer == "adamw"
        else {"type": "HyLo", "params": {"lr": 1e-3, "update_freq": 2}}
    )
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "optimizer": section,
        "zero_optimization": {"stage": stage, "overlap_comm": stage >= 2, "contiguous_gradients": True},
    }


def worker(args: argparse.Namespace) -> None:
    """One rank: build, initialize, train ``steps`` steps, write this rank's measurements."""
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ds_hylo
    from ds_hylo.deepspeed import disable_cpu_shm_comm
    from memory_peak import llama_config
    from transformers import LlamaForCausalLM

    disable_cpu_shm_comm()  # both optimizers: gloo, no ~70 s JIT build of the shared-memory collectives
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(args.tiny))
    parameters = sum(p.numel() for p in model.parameters())
    config = ds_config(args.optimizer, args.stage, args.batch)
    engine, _, _, _ = ds_hylo.initialize(model=model, config=config)
    rank = engine.global_rank
    after_init = _status("VmRSS")
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1 + rank)
    seconds = []
    for _ in range(args.steps):
        tokens = torch.randint(0, vocab, (args.batch, args.seq), generator=gen)
        start = time.perf_counter()
        loss = engine(input_ids=tokens, labels=tokens).loss
        engine.backward(loss)
        engine.step()
        seconds.append(time.perf_counter() - start)
    hylo = getattr(engine, "hylo", None)
    result = {
        "rank": rank,
        "parameters": parameters,
        "peak_rss": _status("VmHWM"),
        "rss_after_initialize": after_init,
        "step_seconds": seconds,
        "refreshes": hylo.stats()["refreshes"] if hylo is not None else None,
        "loss": float(loss.detach()),
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(result))


def launch(world: int, stage: int, optimizer: str, args: argparse.Namespace) -> dict[str, Any]:
    """One ``torch.distributed.run`` launch; the ranks' measurements."""
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(_REPO), str(_REPO / "benchmarks")]))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
               "--master_port", str(_free_port()), __file__, "--worker", "--stage", str(stage),
               "--optimizer", optimizer, "--out", out, "--steps", str(args.steps), "--batch", str(args.batch),
               "--seq", str(args.seq)] + (["--tiny"] if args.tiny else [])
        started = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
        ranks = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(world)]
    return {"world": world, "stage": stage, "optimizer": optimizer, "wall_seconds": time.perf_counter() - started,
            "ranks": ranks, "peak_rss": max(r["peak_rss"] for r in ranks),
            "rss_after_initialize": max(r["rss_after_initialize"] for r in ranks)}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (ranks, stage): AdamW's and HyLo's peak RSS per rank and HyLo's as a ratio to AdamW's."""
    rows = []
    for world in sorted({r["world"] for r in runs}):
        for stage in sorted({r["stage"] for r in runs}):
            pair = {r["optimizer"]: r for r in runs if r["world"] == world and r["stage"] == stage}
            if set(pair) != set(OPTIMIZERS):
                continue
            adamw, hylo = pair["adamw"]["peak_rss"], pair["hylo"]["peak_rss"]
            rows.append({"world": world, "stage": stage, "adamw_peak_mib": adamw / MIB, "hylo_peak_mib": hylo / MIB,
                         "hylo_over_adamw": hylo / adamw, "hylo_refreshes": pair["hylo"]["ranks"][0]["refreshes"]})
    return rows


def format_table(summary: list[dict[str, Any]]) -> str:
    lines = ["| ranks | ZeRO stage | AdamW peak RSS per rank | HyLo peak RSS per rank | HyLo / AdamW |",
             "|---|---|---|---|---|"]
    for row in summary:
        lines.append(f"| {row['world']} | {row['stage']} | {row['adamw_peak_mib']:.0f} MiB | "
                     f"{row['hylo_peak_mib']:.0f} MiB | {row['hylo_over_adamw']:.3f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="sequences per rank and step")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--tiny", action="store_true", help="a seconds-long model (tests)")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--json", default=None, help="default: benchmarks/results/zero_memory.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    started = time.time()
    runs = []
    for world in args.worlds:
        for stage in args.stages:
            for optimizer in OPTIMIZERS:
                run = launch(world, stage, optimizer, args)
                print(f"ranks {world} stage {stage} {optimizer}: peak {run['peak_rss'] / MIB:.0f} MiB "
                      f"({run['wall_seconds']:.0f} s)", flush=True)
                runs.append(run)
    summary = summarise(runs)
    print(format_table(summary))
    result = {
        "protocol": {"model": "tiny Llama" if args.tiny else "Llama 768x4 (77.5M parameters), untied head",
                     "tokens_per_rank_per_step": args.batch * args.seq, "steps": args.steps,
                     "hylo": ds_config("hylo", 1, args.batch)["optimizer"]["params"],
                     "adamw": ds_config("adamw", 1, args.batch)["optimizer"]["params"],
                     "measure": "peak RSS (VmHWM) of the largest rank, whole process"},
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
        "git_revision": git_revision(),
        "seconds": time.time() - started,
        "runs": runs,
        "summary": summary,
    }
    path = Path(args.json) if args.json else RESULTS / "zero_memory.json"
    if args.json or not args.tiny:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
