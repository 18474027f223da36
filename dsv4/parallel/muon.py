"""Muon on sharded parameters: Newton–Schulz on whole, logically independent matrices.

FSDP2 shards a matrix by rows, but Muon's orthogonalisation needs the whole matrix. Per step, the
matrices of one shard group are assigned to its ranks (longest-processing-time first: the largest
Newton–Schulz cost to the least loaded rank), then

    gather   one all-to-all sends every rank's rows of each matrix to the matrix's owner;
    update   the owner runs `fn` (Muon's scaled Newton–Schulz) on the whole matrix;
    scatter  one all-to-all sends each rank its rows of the update.

The owner computes exactly what one process would on the same matrix, so distributed Muon equals
single-process Muon. Matrices whose shards are whole matrices already (routed experts sharded over
the expert dimension) never travel: `MuonAdamW` updates them locally.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard


@dataclass
class ShardedMatrix:
    """One Muon parameter sharded by rows (dim 0) over mesh dim `dim` of its DTensor's mesh."""
    local: torch.Tensor          # this rank's rows of the Nesterov gradient
    shape: torch.Size            # the global shape
    group: dist.ProcessGroup
    size: int                    # ranks in the group
    coord: int                   # this rank's index in the group

    def rows(self) -> list[int]:
        """Rows held by each rank of the group: `torch.chunk` sizes, as DTensor's Shard(0)."""
        n, k = self.shape[0], self.size
        per = -(-n // k) if n else 0
        return [max(0, min(per, n - i * per)) for i in range(k)]

    def numel_per_row(self) -> int:
        return math.prod(self.shape[1:])


def whole_matrices_local(p: DTensor, batch_dims: int) -> bool:
    """True when each local shard holds whole matrices: only dims that index matrices are sharded."""
    return all(not isinstance(pl, Shard) or pl.dim < batch_dims or p.device_mesh.size(i) == 1
               for i, pl in enumerate(p.placements))


def row_sharded(p: DTensor, local: torch.Tensor) -> ShardedMatrix:
    """Describe `p` (sharded on dim 0 over one mesh dim, replicated over the others) for `sharded_updates`."""
    dims = [i for i, pl in enumerate(p.placements) if not isinstance(pl, Replicate) and p.device_mesh.size(i) > 1]
    if len(dims) != 1 or p.placements[dims[0]] != Shard(0):
        raise NotImplementedError(f"Muon supports parameters sharded on dim 0 over one mesh dimension (FSDP); got "
                                  f"placements {p.placements} on a mesh of shape {tuple(p.device_mesh.shape)}")
    d = dims[0]
    m = ShardedMatrix(local, p.shape, p.device_mesh.get_group(d), p.device_mesh.size(d),
                      p.device_mesh.get_local_rank(d))
    if local.shape[0] != m.rows()[m.coord]:
        raise RuntimeError(f"unexpected shard of {tuple(p.shape)}: {local.shape[0]} rows on rank {m.coord} of "
                           f"{m.size}, expected {m.rows()[m.coord]} (torch.chunk layout)")
    return m


def assign_owners(costs: list[float], ranks: int) -> list[int]:
    """Owner of each item: largest cost first, each to the least loaded rank (ties to the lowest rank)."""
    load, owner = [0.0] * ranks, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        owner[i], load[r] = r, load[r] + costs[i]
    return owner


def ns_cost(shape: torch.Size) -> float:
    """Newton–Schulz work on an n × m matrix (m = the other dims flattened): n·m·min(n, m)."""
    n, m = shape[0], math.prod(shape[1:])
    return float(n * m * min(n, m))


def sharded_updates(mats: list[ShardedMatrix], fn: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """`fn` of each whole matrix, returned as this rank's rows (shaped like `mats[i].local`).

    Matrices sharing a process group and dtype travel together: two all-to-alls per group."""
    out: list[torch.Tensor | None] = [None] * len(mats)
    buckets: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        buckets.setdefault((m.group, m.local.dtype, m.local.device), []).append(i)
    for members in buckets.values():
        for i, u in zip(members, _exchange([mats[i] for i in members], fn)):
            out[i] = u
    return out


def _exchange(mats: list[ShardedMatrix], fn) -> list[torch.Tensor]:
    P, me, group = mats[0].size, mats[0].coord, mats[0].group
    owner = assign_owners([ns_cost(m.shape) for m in mats], P)
    rows = [m.rows() for m in mats]
    width = [m.numel_per_row() for m in mats]
    mine = [j for j in range(len(mats)) if owner[j] == me]
    # gather: rank r's rows of every matrix owned by rank o go to o (ordered by owner, then matrix)
    send = [mats[j].local.reshape(-1) for o in range(P) for j in range(len(mats)) if owner[j] == o]
    send_sizes = [sum(rows[j][me] * width[j] for j in range(len(mats)) if owner[j] == o) for o in range(P)]
    recv_sizes = [sum(rows[j][r] * width[j] for j in mine) for r in range(P)]
    got = _all_to_all(send, send_sizes, recv_sizes, mats[0].local, group)
    pieces, at = {j: [] for j in mine}, 0
    for r in range(P):
        for j in mine:
            n = rows[j][r] * width[j]
            pieces[j].append(got[at:at + n])
            at += n
    updates = {j: fn(torch.cat(pieces[j]).view(mats[j].shape)) for j in mine}
    # scatter: the owner sends each rank r its rows of the update
    starts = {j: [sum(rows[j][:r]) for r in range(P)] for j in mine}
    send = [updates[j][starts[j][r]:starts[j][r] + rows[j][r]].reshape(-1) for r in range(P) for j in mine]
    send_sizes = recv_sizes
    recv_sizes = [sum(rows[j][me] * width[j] for j in range(len(mats)) if owner[j] == o) for o in range(P)]
    got = _all_to_all(send, send_sizes, recv_sizes, mats[0].local, group)
    result, at = [None] * len(mats), 0
    for o in range(P):
        for j in range(len(mats)):
            if owner[j] == o:
                n = rows[j][me] * width[j]
                result[j] = got[at:at + n].view(mats[j].local.shape)
                at += n
    return result


def _all_to_all(pieces: list[torch.Tensor], send_sizes: list[int], recv_sizes: list[int], like: torch.Tensor,
                group: dist.ProcessGroup) -> torch.Tensor:
    inp = torch.cat(pieces) if pieces else like.new_empty(0)
    out = like.new_empty(sum(recv_sizes))
    dist.all_to_all_single(out, inp.contiguous(), recv_sizes, send_sizes, group=group)
    return out
