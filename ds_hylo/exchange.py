"""Device-aware collectives of HyLo's refresh: the row table, the fused gather, owners and C.

One refresh exchanges (docs/design.md section 2.1):

1. ``agree_rows``: an all-gather of a small integer table (rows captured and row budget per
   layer per rank). Every rank derives from it the same set of layers to refresh (those with rows
   on some rank), the same padded sizes and the same owners, so collectives always match in
   count, order and size even where ranks disagree (a layer used on some ranks only, an empty
   local batch).
2. ``gather_rows``: one fused all-gather of every refreshed layer's reduced rows (and KID
   factors), packed into one flat buffer with the valid-row counts at its end.
3. ``share_inverses``: each layer's s x s matrix C is inverted by one owning rank (balanced by
   cost, ``assign_owners``) and broadcast as its upper triangle in float64, with its apply's
   cancellation factor.

The ``Exchange`` knows the device its backend works on (the current CUDA device under NCCL, the
CPU under gloo and others), makes every buffer there, stages data through it where the data lives
elsewhere, and returns results on the data's device. Bytes are counted as the payload each rank
sends. ``SingleProcess`` is the world of one: no collective, same results.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .kernels import index_rows, rows_dtype

# --------------------------------------------------------------------------- collectives

# torch 2.13 renamed all_gather_into_tensor (now deprecated, with a warning on every rank).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class Exchange:
    """Collectives over a ``torch.distributed`` process group (the default group if None).

    Every method takes and returns tensors on the caller's device; the backend sees tensors on
    ``self.device`` (CUDA for NCCL, CPU otherwise: gloo's CUDA support is partial).
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        self.group = group
        self.bytes_sent: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def device(self) -> torch.device:
        """Where the backend wants its tensors: the current CUDA device for NCCL, else the CPU."""
        backend = str(dist.get_backend(self.group)).lower()
        if "nccl" in backend and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _count(self, op: str, tensor: torch.Tensor) -> None:
        self.bytes_sent[op] += tensor.numel() * tensor.element_size()
        self.calls[op] += 1

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Gather equal-sized tensors from every rank: (n,) -> (world_size, n) on tensor's device."""
        self._count("all_gather", tensor)
        flat = tensor.reshape(-1).to(self.device).contiguous()
        out = flat.new_empty(self.world_size * flat.numel())
        _all_gather_single(out, flat, group=self.group)
        return out.view(self.world_size, -1).to(tensor.device)

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Broadcast from group rank ``src``; returns the result on ``tensor``'s device.

        ``tensor`` is the payload on ``src`` and a buffer of the same shape and dtype elsewhere.
        Only the source's send is counted.
        """
        if self.rank == src:
            self._count("broadcast", tensor)
        global_src = dist.get_global_rank(self.group, src) if self.group is not None else src
        staged = tensor.to(self.device).contiguous()
        dist.broadcast(staged, global_src, group=self.group)
        return staged.to(tensor.device)

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average over ranks; returns the mean on ``tensor``'s device (``tensor`` is not modified)."""
        self._count("all_reduce", tensor)
        staged = tensor.to(self.device, copy=True)
        dist.all_reduce(staged, op=dist.ReduceOp.SUM, group=self.group)
        return (staged / self.world_size).to(tensor.device)


class SingleProcess(Exchange):
    """World of one: every collective returns its input; nothing is sent."""

    def __init__(self) -> None:
        super().__init__(None)

    @property
    def world_size(self) -> int:
        return 1

    @property
    def rank(self) -> int:
        return 0

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(1, -1)

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        return tensor

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def group_exchange(group: dist.ProcessGroup) -> Exchange:
    """An Exchange over ``group`` (a no-op ``SingleProcess`` for a group of one rank)."""
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
    return Exchange(group) if dist.get_world_size(group) > 1 else SingleProcess()


def default_exchange() -> Exchange:
    """An Exchange over the default group when torch.distributed is initialised with >1 rank."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Exchange()
    return SingleProcess()


# --------------------------------------------------------------------------- row table


@dataclass(frozen=True)
class RowTable:
    """What every rank agrees on at a refresh, from the gathered (P, 2L) table.

    Attributes:
        layers: indices (into the caller's layer list) of the layers refreshed: rows on some rank.
        global_rows: per refreshed layer, rows captured over all ranks.
        padded: per refreshed layer, the largest row budget over ranks (what every rank sends).
    """

    layers: tuple[int, ...]
    global_rows: tuple[int, ...]
    padded: tuple[int, ...]


def agree_rows(exchange: Exchange, row_counts: Sequence[int], budgets: Sequence[int]) -> RowTable:
    """All-gather every rank's (rows, budget) per layer and derive the refresh all ranks agree on.

    row_counts, budgets: (L,) host ints over the same layer list on every rank (0 where this rank
    has no rows for a layer). One collective of 2L int64 (none for a single process).
    """
    local = list(row_counts) + list(budgets)
    if exchange.world_size == 1:
        table = [local]
    else:
        tensor = torch.tensor(local, dtype=torch.long, device=torch.device("cpu"))
        table = exchange.all_gather(tensor).tolist()  # the refresh's one read of the table
    num_layers = len(row_counts)
    layers, global_rows, padded = [], [], []
    for i in range(num_layers):
        total = sum(row[i] for row in table)
        if total > 0:
            layers.append(i)
            global_rows.append(total)
            padded.append(max(row[num_layers + i] for row in table))
    return RowTable(tuple(layers), tuple(global_rows), tuple(padded))


# --------------------------------------------------------------------------- fused gather


@dataclass
class LocalRows:
    """One layer's reduced rows on this rank, zero-padded to the agreed size.

    a: (padded, d_in) or id rows (padded, 1) int64; g: (padded, d_out); m_factor: (padded, padded) for KID, else None;
    valid: rows that are real (the rest is padding).
    """

    a: torch.Tensor
    g: torch.Tensor
    m_factor: Optional[torch.Tensor]
    valid: int


@dataclass
class GatheredRows:
    """One layer's rows from every rank, padding removed: a (s, d_in), g (s, d_out), and for
    KID the block-diagonal factor (s, s) of M with one block per rank."""

    a: torch.Tensor
    g: torch.Tensor
    m_factor: Optional[torch.Tensor]


def contributors(refresh_index: int, world_size: int, count: Optional[int]) -> Optional[list[int]]:
    """Ranks whose rows form refresh number ``refresh_index``: ``count`` consecutive ranks, the window
    moving by ``count`` each refresh so every rank contributes once per ceil(P / count) refreshes.
    None (every rank, fused all-gather) when ``count`` is None or >= world_size."""
    if count is None or count >= world_size:
        return None
    start = (refresh_index * count) % world_size
    return sorted((start + j) % world_size for j in range(count))


def gather_rows(
    exchange: Exchange, local: Sequence[LocalRows], sources: Optional[Sequence[int]] = None
) -> list[GatheredRows]:
    """Every layer's rows from every contributing rank, packed in one buffer of a common float dtype.

    Id rows (``nn.Embedding``, int64) travel bit for bit: their bytes are reinterpreted as the
    payload's float dtype (two float32 or one float64 per id) and back, never converted to a float
    value, so any vocabulary survives exactly (docs/design.md section 1.10).

    The payload is [a_1, g_1, (m_1), a_2, ..., valid_1 .. valid_L]: the valid counts travel at
    its end so all of them are read with one host transfer. With ``sources`` None every rank
    contributes through one all-gather; otherwise each source rank broadcasts its payload (the
    other ranks pass zero-row ``LocalRows`` of the agreed shapes). Results are on each layer's
    device and dtype.
    """
    if not local:
        return []
    dtype = torch.float64 if any(rows_dtype(r.a, r.g) == torch.float64 for r in local) else torch.float32
    device = local[0].a.device
    pieces = []
    for r in local:
        a_flat = r.a.reshape(-1).contiguous().view(dtype) if index_rows(r.a) else r.a.reshape(-1)
        pieces += [a_flat, r.g.reshape(-1)]
        if r.m_factor is not None:
            pieces.append(r.m_factor.reshape(-1))
    counts = torch.tensor([float(r.valid) for r in local], dtype=dtype, device=torch.device("cpu"))
    payload = torch.cat([p.to(device=device, dtype=dtype) for p in pieces] + [counts.to(device)])
    if sources is None:
        everything = exchange.all_gather(payload)  # (P, total)
    else:
        everything = torch.stack([exchange.broadcast(payload.clone(), src) for src in sources])  # (k, total)
    world = everything.shape[0]
    valid = everything[:, -len(local):].round().long().T.tolist()  # (L, P): one host read
    results, offset = [], 0
    for r, layer_valid in zip(local, valid):
        pad, d_in, d_out = r.a.shape[0], r.a.shape[1], r.g.shape[1]
        ids = index_rows(r.a)
        a_width = d_in * (r.a.element_size() // everything.element_size()) if ids else d_in
        sizes = [pad * a_width, pad * d_out] + ([pad * pad] if r.m_factor is not None else [])
        chunks = []
        for size in sizes:
            chunks.append(everything[:, offset: offset + size])
            offset += size
        if ids:  # the ids' own bytes back (a copy: a view of another dtype needs an aligned start)
            a_rows = [chunks[0][p].clone().view(r.a.dtype).reshape(pad, d_in)[: layer_valid[p]] for p in range(world)]
        else:
            a_rows = [chunks[0][p].reshape(pad, d_in)[: layer_valid[p]] for p in range(world)]
        g_rows = [chunks[1][p].reshape(pad, d_out)[: layer_valid[p]] for p in range(world)]
        m_factor = None
        if r.m_factor is not None:
            blocks = [chunks[2][p].reshape(pad, pad)[: layer_valid[p], : layer_valid[p]] for p in range(world)]
            m_factor = torch.block_diag(*blocks).to(device=r.a.device, dtype=rows_dtype(r.a, r.g))
        results.append(GatheredRows(
            torch.cat(a_rows).to(device=r.a.device, dtype=r.a.dtype),
            torch.cat(g_rows).to(device=r.g.device, dtype=r.g.dtype),
            m_factor,
        ))
    return results


# --------------------------------------------------------------------------- owners and C


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Greedy longest-first assignment of items to ranks balancing the summed cost -> owner per item."""
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += costs[i]
    return owners


def share_inverses(
    exchange: Exchange, owners: Sequence[int], inverses: dict[int, torch.Tensor],
    sizes: Sequence[int], devices: Sequence[torch.device],
    scalars: Optional[dict[int, torch.Tensor]] = None,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Broadcast each owner's C matrices (and one scalar per item) to every rank.

    ``inverses`` holds this rank's own items, ``scalars`` a 0-d float64 tensor per own item (e.g.
    the apply's cancellation factor; zeros when None); ``sizes`` and ``devices`` give every
    item's s and the device its C must end on. Returns (C (s_i, s_i) float64, scalar () float64)
    for every item. C is symmetric: its upper triangle is sent, followed by the item's scalar, one
    broadcast per owning rank (none for a single process).
    """
    if scalars is None:
        scalars = {i: inverses[i].new_zeros(()) for i in inverses}
    if exchange.world_size == 1:
        return dict(inverses), dict(scalars)
    result: dict[int, torch.Tensor] = {}
    result_scalars: dict[int, torch.Tensor] = {}
    for owner in range(exchange.world_size):
        owned = [i for i in range(len(owners)) if owners[i] == owner]
        if not owned:
            continue
        device = devices[owned[0]]
        triangles = [torch.triu_indices(sizes[i], sizes[i], device=device) for i in owned]
        if owner == exchange.rank:
            buffer = torch.cat([
                torch.cat([inverses[i].to(device)[t[0], t[1]], scalars[i].to(device=device, dtype=torch.float64).reshape(1)])
                for i, t in zip(owned, triangles)
            ])
        else:
            total = sum(t.shape[1] + 1 for t in triangles)
            buffer = torch.empty(total, dtype=torch.float64, device=device)
        buffer = exchange.broadcast(buffer, owner)
        offset = 0
        for i, t in zip(owned, triangles):
            c_mat = buffer.new_zeros(sizes[i], sizes[i])
            c_mat[t[0], t[1]] = buffer[offset: offset + t.shape[1]]
            result[i] = (c_mat + c_mat.triu(1).T).to(devices[i])
            result_scalars[i] = buffer[offset + t.shape[1]].to(devices[i])
            offset += t.shape[1] + 1
    return result, result_scalars
