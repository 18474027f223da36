"""Global statistics of a distributed step: sums over ranks, the global gradient norm and clipping.

Every decision that changes the model (clip coefficient, skipping a step on a non-finite loss or norm,
router-bias moves) is made from all-reduced values, so every rank makes the same one. Without an
initialised process group every function here is the one-process computation.
"""
from __future__ import annotations

import math
import sys

import torch
import torch.distributed as dist


def is_dtensor(t) -> bool:
    """Whether `t` is a DTensor, without importing DTensor (slow) when no DTensor can exist yet."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def barrier() -> None:
    if distributed():
        dist.barrier()


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (sharing its storage); a plain tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) `t` in place across all ranks; returns it."""
    if distributed():
        dist.all_reduce(t)
    return t


def sum_values(values: list[float], device: torch.device) -> list[float]:
    """Host numbers summed over ranks (float64 on `device`, which the backend must reach)."""
    if not distributed():
        return list(values)
    return sum_over_ranks(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def _copies(t: torch.Tensor) -> int:
    """How many ranks hold each element of `t`: the product of its replicated mesh dims."""
    if not is_dtensor(t):
        return world_size()
    from torch.distributed.tensor import Replicate
    return math.prod(t.device_mesh.size(i) for i, p in enumerate(t.placements) if isinstance(p, Replicate))


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all gradients of `params` over all ranks (fp32 0-d tensor on the gradients' device).

    One process: ‖(‖g_1‖, ‖g_2‖, ...)‖ as `torch.nn.utils.clip_grad_norm_`. Sharded: every rank sums the
    squares of its local shards, each divided by the number of ranks holding a copy (the HSDP replicas),
    and one all-reduce adds them."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm([local(g) for g in grads], 2, dtype=torch.float32)   # one launch per dtype
    if not distributed():
        return torch.linalg.vector_norm(torch.stack(norms))
    squares = torch.stack([n.square() / _copies(g) for n, g in zip(norms, grads)]).sum()
    return sum_over_ranks(squares).sqrt()


@torch.no_grad()
def clip_grads_(params: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale every gradient by min(1, max_norm / (total_norm + 1e-6)), as `clip_grad_norm_` does."""
    coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    by_dtype: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            g = local(p.grad)
            by_dtype.setdefault((g.device, g.dtype), []).append(g)
    for (device, dtype), grads in by_dtype.items():          # one foreach launch per device and dtype
        torch._foreach_mul_(grads, coef.to(device, dtype))
