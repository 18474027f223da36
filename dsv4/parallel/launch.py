"""Process-group setup from torchrun's environment: the one module of dsv4 that reads it.

torchrun starts N copies of `python -m dsv4 train ...` with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set; everything else in the library takes explicit arguments.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and "LOCAL_RANK" in os.environ


def init_from_torchrun(device: str = "auto") -> str | None:
    """Initialise the default process group when torchrun started this process: NCCL with one GPU per
    process (`cuda:LOCAL_RANK`) when `device` is auto/cuda and CUDA is available, gloo on CPU otherwise.
    Returns the device this process trains on, or None when not under torchrun (nothing is done)."""
    if not under_torchrun():
        return None
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"device={device} asked for under torchrun, but CUDA is not available; use device=cpu")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} has no GPU: this host has {torch.cuda.device_count()}; "
                             "start at most that many processes per node (--nproc_per_node)")
        torch.cuda.set_device(local_rank)
        dev = f"cuda:{local_rank}"
    else:
        dev = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=torch.device(dev) if use_cuda else None)
        # all ranks connected before any goes on: a rank that fails its set-up early and exits must not
        # close a connection another rank is still establishing (gloo reports that as a crash of the peer)
        dist.barrier()
    return dev


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
