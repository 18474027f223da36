"""Expert-parallel inference: a model whose routed experts do not fit one device, served by several.

The routed experts of every MoE (about 95% of V4-Flash's bytes) are split over the ranks of a process
group in contiguous ranges (`expert_range`); everything else (embedding, attention, router, shared
expert, head, the decode cache) is replicated. Every rank runs the same forward on the same tokens,
so routing is identical everywhere; in each MoE a rank computes the (token, expert) pairs routed to
its own experts (the others contribute zero) and one all-reduce of the [tokens, D] output sums the
ranks' parts. With replicated tokens this is what all-to-all dispatch and combine reduce to, in one
collective per MoE layer and without host synchronisation (CUDA-graph capturable with NCCL).

Each rank reads only its own experts from the checkpoint (`load_pretrained(experts=...)`), quantised
or not. The model code is untouched: `ExpertParallel` replaces each MoE's `experts` module through the
seam `forward(x, idx, weight)`.

    torchrun --nproc-per-node 2 -m dsv4 generate --model ./DeepSeek-V4-Flash --prompt "..."

Library use (any initialised process group; gloo on CPU, NCCL on GPUs):

    dist.init_process_group("nccl")
    model = load_expert_parallel(path, device=f"cuda:{local_rank}", dtype=torch.bfloat16)
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from dsv4 import ops
from dsv4.model import Experts
from dsv4.quant import FP4Experts


def expert_range(n_experts: int, rank: int, world: int) -> range:
    """Rank `rank`'s experts: contiguous, the first E mod W ranks one more than the others."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a group of {world}")
    if n_experts < world:
        raise ValueError(f"{n_experts} routed experts cannot be split over {world} ranks; use at most {n_experts}")
    base, extra = divmod(n_experts, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


class ExpertParallel(nn.Module):
    """This rank's experts `local` (ids `experts` of the full set) + an all-reduce over `group`."""

    def __init__(self, local: nn.Module, experts: range, group=None):
        super().__init__()
        self.local, self.experts, self.group = local, experts, group

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [N, D], idx [N, K] global expert ids, weight [N, K] -> [N, D], the same on every rank."""
        mine = (idx >= self.experts.start) & (idx < self.experts.stop)            # [N, K]
        local_idx = torch.where(mine, idx - self.experts.start, -1)
        if isinstance(self.local, FP4Experts):          # skips ids outside its range by itself
            y = self.local(x, local_idx, weight)
        else:
            y = _plain_local(self.local, x, local_idx, weight)
        dist.all_reduce(y, group=self.group)
        return y

    def extra_repr(self) -> str:
        return f"experts={self.experts.start}..{self.experts.stop - 1}"


def _plain_local(experts: Experts, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`Experts` on the pairs with idx >= 0. Where the host may be read, only those pairs are computed;
    otherwise (graph capture) the others run through expert 0 with routing weight 0 (exact zeros)."""
    mine = idx >= 0
    if not ops._syncs_allowed(x):
        return experts(x, torch.where(mine, idx, 0), torch.where(mine, weight, 0))
    tok, k = mine.nonzero(as_tuple=True)                                            # [P] pairs here
    y = torch.zeros_like(x)
    if tok.numel():
        y.index_add_(0, tok, experts(x[tok], idx[tok, k, None], weight[tok, k, None]))
    return y


def _rank_world(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert parallelism needs an initialised process group: call "
                           "torch.distributed.init_process_group first (torchrun sets up its environment)")
    return dist.get_rank(group), dist.get_world_size(group)


def _wrap(model: nn.Module, experts: range, group) -> nn.Module:
    for name, m in list(model.named_modules()):
        if name.endswith("ffn.experts") and not isinstance(m, ExpertParallel):
            model.set_submodule(name, ExpertParallel(m, experts, group))
    return model


def load_expert_parallel(path, group=None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                         quantized: bool | None = None, strict: bool = True, progress: bool | None = None):
    """`load_pretrained` for this rank of `group`: its share of every MoE's routed experts (read from the
    files alone) and a replica of everything else; the returned model runs in lockstep with the other
    ranks' (every rank must make the same calls with the same inputs)."""
    from dsv4.checkpoint import load_pretrained, read_config

    rank, world = _rank_world(group)
    experts = expert_range(read_config(path).n_routed_experts, rank, world)
    model = load_pretrained(path, device=device, dtype=dtype, strict=strict, progress=progress,
                            quantized=quantized, experts=experts)
    return _wrap(model, experts, group)


@torch.no_grad()
def shard_experts(model: nn.Module, group=None) -> nn.Module:
    """Make a model already in memory expert-parallel: keep this rank's slice of every MoE's experts
    (the rest is released) and wrap them. Every rank must hold the same model."""
    rank, world = _rank_world(group)
    experts = expert_range(model.config.n_routed_experts, rank, world)
    for name, m in list(model.named_modules()):
        if not name.endswith("ffn.experts") or isinstance(m, ExpertParallel):
            continue
        for key, t in list(m._parameters.items()) + list(m._buffers.items()):
            part = t.data[experts.start:experts.stop].clone()
            if key in m._parameters:
                m._parameters[key] = nn.Parameter(part, requires_grad=False)
            else:
                m._buffers[key] = part
        if isinstance(m, FP4Experts):
            m.n_experts = len(experts)
    return _wrap(model, experts, group)


def shared_seed(group=None) -> int:
    """A random seed drawn on rank 0 and given to every rank: ranks that sample must draw the same tokens."""
    seed = torch.randint(0, 2 ** 31 - 1, (1,))
    if dist.get_backend(group) == "nccl":
        seed = seed.cuda()
    dist.broadcast(seed, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return int(seed)


def torchrun_env() -> dict | None:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK when this process was started by it with more than one
    process, else None. (The one place the inference path reads the launcher's environment.)"""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if "RANK" not in os.environ:
        raise RuntimeError(f"WORLD_SIZE={world} but RANK is not set: start the processes with torchrun")
    return {"rank": int(os.environ["RANK"]), "world": world, "local_rank": int(os.environ.get("LOCAL_RANK", 0))}


def init_torchrun(device: str | None = None) -> torch.device:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU) and return this rank's device
    (`cuda:LOCAL_RANK` unless `device` says otherwise)."""
    env = torchrun_env()
    if env is None:
        raise RuntimeError("not started by torchrun with more than one process (WORLD_SIZE <= 1)")
    if device is None:
        device = f"cuda:{env['local_rank']}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return dev


def load_model_parallel(spec: str, device: str | None, dtype: str | None, quantized: bool | None):
    """(model, tokenizer, notes) for one torchrun rank of `dsv4 generate`: join the group, load this
    rank's experts of the checkpoint folder `spec` (bf16 on CUDA, fp32 on CPU unless `dtype` says)."""
    from pathlib import Path

    from dsv4.engine import resolve_device, tokenizer_for
    from dsv4.quant import describe

    path = Path(spec)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"expert parallelism loads a checkpoint folder; {spec!r} is not one")
    dev = init_torchrun(device)
    _, dt = resolve_device(str(dev), dtype)
    model = load_expert_parallel(path, device=dev, dtype=dt, quantized=quantized)
    rank, world = _rank_world(None)
    experts = expert_range(model.config.n_routed_experts, rank, world)
    tokenizer, note = tokenizer_for(model.config.vocab_size, path)
    notes = [f"model: {path} (rank {rank} of {world}, {dev}, {str(dt).replace('torch.', '')}, routed experts "
             f"{experts.start}..{experts.stop - 1}); {describe(model)}", note]
    return model, tokenizer, notes
