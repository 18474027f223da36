"""How the ranks of a training run are arranged (the layout of torchtitan's FSDP2 + expert parallelism).

Every rank is data-parallel: it runs its own rows of each global batch. The W ranks are arranged twice,
once for the dense parameters and once for the routed experts:

    dense parameters   (dp_replicate, dp_shard)   FSDP2 shards each block over dp_shard and replicates
                                                  over dp_replicate (HSDP; plain FSDP when dp_replicate = 1)
    routed experts     (edp, ep)                  expert parallelism: each rank of an ep group holds E/ep
                                                  experts and tokens travel to them by all-to-all; FSDP2
                                                  shards those experts further over edp = W/ep

Ranks are numbered row-major in both, so the ranks of one ep group and of one dp_shard group are
consecutive: on a multi-GPU host the all-to-all stays inside the host when ep divides its GPU count.
"""
from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


class ParallelConfigError(ValueError):
    """A parallel layout that cannot work; the message says which number to change and to what."""


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


@dataclass(frozen=True)
class ParallelDims:
    """World size `world` split as dp_replicate × dp_shard (dense) and edp × ep (experts)."""
    world: int
    dp_replicate: int = 1
    ep: int = 1

    def __post_init__(self):
        if self.world < 1:
            raise ParallelConfigError(f"world size must be >= 1, got {self.world}")
        for name in ("dp_replicate", "ep"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1 or self.world % v:
                hint = "; start several processes with torchrun --nproc_per_node=N" if self.world == 1 else ""
                raise ParallelConfigError(f"{name}={v} must divide the world size {self.world} (choose one of "
                                          f"{_divisors(self.world)}){hint}")

    @property
    def dp_shard(self) -> int:
        return self.world // self.dp_replicate

    @property
    def edp(self) -> int:
        return self.world // self.ep

    def check_model(self, n_experts: int) -> None:
        if n_experts % self.ep:
            raise ParallelConfigError(
                f"ep={self.ep} does not divide the model's n_routed_experts={n_experts}: every rank of an expert-"
                f"parallel group must hold the same number of experts; choose ep among {_divisors(n_experts)} "
                f"that also divides the world size {self.world}")

    def check_batch(self, rows: int) -> None:
        """`rows` global rows per micro-step must split evenly over the W data-parallel ranks."""
        if rows % self.world:
            raise ParallelConfigError(
                f"micro_batch={rows} rows per micro-step cannot be split evenly over {self.world} processes; "
                f"micro_batch counts the rows of all processes together: set it to a multiple of {self.world} "
                f"(memory per process grows with micro_batch / world size)")

    def describe(self) -> str:
        dense = (f"FSDP over {self.dp_shard}" if self.dp_replicate == 1
                 else f"HSDP {self.dp_replicate} replicas × FSDP over {self.dp_shard}")
        experts = "with the dense layers" if self.ep == 1 else f"expert parallel over {self.ep}, FSDP over {self.edp}"
        return f"{self.world} process{'es' if self.world > 1 else ''}: dense layers {dense}; routed experts {experts}"


@dataclass
class Mesh:
    """The device meshes of a run: `dense` ("dp_shard") or ("dp_replicate", "dp_shard"), and
    `experts` ("edp", "ep") when ep > 1."""
    dims: ParallelDims
    dense: "DeviceMesh"
    experts: "DeviceMesh | None"


def build_mesh(dims: ParallelDims, device_type: str) -> Mesh:
    """Meshes over the ranks of the initialised default process group (`device_type` "cuda" or "cpu")."""
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise RuntimeError("build_mesh needs an initialised process group (torchrun, or "
                           "torch.distributed.init_process_group)")
    if dist.get_world_size() != dims.world:
        raise ParallelConfigError(f"the layout is for {dims.world} processes but {dist.get_world_size()} are running")
    if dims.dp_replicate == 1:
        dense = init_device_mesh(device_type, (dims.dp_shard,), mesh_dim_names=("dp_shard",))
    else:
        dense = init_device_mesh(device_type, (dims.dp_replicate, dims.dp_shard),
                                 mesh_dim_names=("dp_replicate", "dp_shard"))
    experts = None
    if dims.ep > 1:
        experts = init_device_mesh(device_type, (dims.edp, dims.ep), mesh_dim_names=("edp", "ep"))
    return Mesh(dims, dense, experts)
