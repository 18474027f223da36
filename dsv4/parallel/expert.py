"""Expert parallelism: the routed experts of a MoE block split over the ranks of an ep group.

`ExpertParallel` takes the place of a block's `Experts` module (same parameter names, same
`forward(x, idx, weight)`), so the model code does not change. Rank j of the group holds experts
[j·E/ep, (j+1)·E/ep) as the local part of DTensors sharded on dim 0 (checkpoints keep the global
`[E, I, D]` view and reshard to any other layout). One call:

  1. dispatch: the N·K (token, expert) pairs are sorted by expert, hence by owning rank; the pair
     counts per rank are exchanged, then the token vectors and routing weights by all-to-all;
  2. the owner runs its experts on the pairs it received through `ops.moe_experts`, each pair as a
     one-expert token (local expert ids), so the expert arithmetic is the single-process one;
  3. combine: the outputs return by the reverse all-to-all, go back to pair order and are summed per
     token in the order of the K choices, as `ops.moe_experts` sums them.

Gradients flow back through the same all-to-alls (autograd functional collectives). An expert's
gradient is complete on its owner: it sums the contributions of the tokens of every rank of the group.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from dsv4 import ops


class ExpertParallel(nn.Module):
    """Routed experts sharded over `mesh` (1-D, the ep group); built from a single-device `Experts`."""

    def __init__(self, experts: nn.Module, mesh: DeviceMesh):
        super().__init__()
        n, ep = experts.w1.shape[0], mesh.size()
        if n % ep:
            raise ValueError(f"{n} routed experts cannot be split over {ep} expert-parallel ranks; choose an ep "
                             "that divides n_routed_experts")
        self.limit, self.n_experts, self.mesh = experts.limit, n, mesh
        self.group = mesh.get_group()
        for name in ("w1", "w2", "w3"):
            full = getattr(experts, name)
            setattr(self, name, nn.Parameter(distribute_tensor(full.detach(), mesh, [Shard(0)]),
                                             requires_grad=full.requires_grad))

    def extra_repr(self) -> str:
        return f"{self.n_experts} experts over {self.mesh.size()} ranks"

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [N, D], idx [N, K] global expert ids, weight [N, K] fp32 -> [N, D]."""
        (N, K), D = idx.shape, x.shape[1]
        w1, w2, w3 = (w.to_local() if isinstance(w, DTensor) else w for w in (self.w1, self.w2, self.w3))
        per_rank = w1.shape[0]                                                       # E / ep
        flat = idx.reshape(-1)                                                       # [N·K]
        order = torch.argsort(flat, stable=True)                                     # pairs by expert
        expert = flat.index_select(0, order)                                         # [N·K] sorted
        send = torch.bincount(expert // per_rank, minlength=self.mesh.size())        # [ep] pairs per rank
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        send_splits, recv_splits = send.tolist(), recv.tolist()                      # host sync
        xs = x.index_select(0, order // K)                                           # [N·K, D]
        ws = weight.reshape(-1).index_select(0, order)                               # [N·K]
        x_in = all_to_all_single_autograd(xs, recv_splits, send_splits, self.group)  # [P, D]
        w_in = all_to_all_single_autograd(ws, recv_splits, send_splits, self.group)  # [P]
        e_in = expert.new_empty(sum(recv_splits))
        dist.all_to_all_single(e_in, expert % per_rank, recv_splits, send_splits, group=self.group)
        if e_in.numel():
            y = ops.moe_experts(x_in, e_in.unsqueeze(1), w_in.unsqueeze(1), w1, w2, w3, self.limit)  # [P, D]
        else:  # no pairs for this rank: keep the local experts in the graph so every rank has their gradient
            y = x_in + 0 * (w1.sum() + w2.sum() + w3.sum()).to(x_in.dtype)
        out = all_to_all_single_autograd(y, send_splits, recv_splits, self.group)     # [N·K, D] sorted
        back = torch.empty_like(order).scatter_(0, order, torch.arange(N * K, device=order.device))
        return out.index_select(0, back).view(N, K, D).sum(dim=1)                    # [N, D]
