"""Run a function on N real processes (gloo or NCCL, CPU or CUDA) and collect what each rank returns.

Like kfac-pytorch's ``distributed_test``: the function must be importable (module level), its
arguments and return values picklable. Each rank's return value comes back through a file.

    run_distributed(fn, arg1, arg2)                                   # 2 gloo ranks on the CPU
    run_distributed(fn, arg, world_size=2, device="cuda")             # 2 gloo ranks sharing the GPUs
    run_distributed(fn, arg, world_size=2, backend="nccl", device="cuda")  # needs >= 2 GPUs

With ``device="cuda"`` rank r uses GPU ``r % torch.cuda.device_count()`` (set as the current
device before ``fn`` runs), so several gloo ranks can share one GPU; NCCL needs one GPU per rank.
DeepSpeed in the ranks is pointed at the matching accelerator (``DS_ACCELERATOR``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BACKENDS = ("gloo", "nccl")
DEVICES = ("cpu", "cuda")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(
    rank: int, world_size: int, port: int, out_dir: str, backend: str, device: str, fn: Callable, args: tuple
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        result = fn(*args)
        torch.save({"ok": True, "result": result}, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:  # report any failure to the parent with its traceback
        torch.save({"ok": False, "error": traceback.format_exc()}, Path(out_dir) / f"rank{rank}.pt")
        raise
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables for the processes spawned inside the block (spawned children copy
    the parent's environment when they start, before they unpickle ``fn`` and import its module)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _check_arguments(world_size: int, backend: str, device: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not allowed; choose one of {list(BACKENDS)}")
    if device not in DEVICES:
        raise ValueError(f"device={device!r} is not allowed; choose one of {list(DEVICES)}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} is not allowed; it must be an integer >= 1")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available")
    if backend == "nccl":
        if device != "cuda":
            raise ValueError(f"backend='nccl' takes CUDA tensors only; got device={device!r}, use device='cuda'")
        if torch.cuda.device_count() < world_size:
            raise ValueError(
                f"backend='nccl' needs one GPU per rank: world_size={world_size} but "
                f"{torch.cuda.device_count()} GPU(s); use backend='gloo' to share GPUs"
            )


def run_distributed(
    fn: Callable, *args: Any, world_size: int = 2, backend: str = "gloo", device: str = "cpu",
    timeout: float = 600.0,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` ranks; return the per-rank results in rank order.

    Args:
        fn: a module-level function (spawned processes import it); its return value must pickle.
        world_size: number of processes.
        backend: "gloo" (CPU or CUDA tensors, ranks may share a GPU) or "nccl" (one GPU per rank).
        device: "cpu", or "cuda" to make rank r's current device GPU r % device_count.
        timeout: seconds to wait for every rank before giving up (hung ranks are terminated).
    """
    _check_arguments(world_size, backend, device)
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(target=_entry, args=(rank, world_size, port, out_dir, backend, device, fn, args))
            for rank in range(world_size)
        ]
        with _environment(DS_ACCELERATOR=device):
            for p in procs:
                p.start()
        for p in procs:
            p.join(timeout=timeout)
        hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
        for rank in hung:
            procs[rank].terminate()
            procs[rank].join()
        results = []
        for rank in range(world_size):
            path = Path(out_dir) / f"rank{rank}.pt"
            if not path.exists():
                state = "still running after the timeout" if rank in hung else f"exit code {procs[rank].exitcode}"
                raise RuntimeError(f"rank {rank} produced no result ({state})")
            payload = torch.load(path, weights_only=False)
            if not payload["ok"]:
                raise RuntimeError(f"rank {rank} failed:\n{payload['error']}")
            results.append(payload["result"])
        return results
