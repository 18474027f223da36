"""Distributed training on torch.distributed, applied from outside the single-device model.

    mesh.py     ParallelDims (world = dp_replicate × dp_shard = edp × ep) and the device meshes
    fsdp.py     parallelize(model, mesh): FSDP2 per block, expert parallelism, summed gradients
    expert.py   ExpertParallel: the `Experts.forward(x, idx, weight)` seam with all-to-all dispatch
    muon.py     Newton–Schulz on whole matrices of row-sharded parameters (owner rank per matrix)
    reduce.py   all-reduced statistics: sums, global gradient norm and clipping
    launch.py   the one module that reads torchrun's environment
    inference.py  expert-parallel inference (routed experts sharded over ranks, one all-reduce per MoE)

See docs/training.md ("Several processes") for the recipes and what is checked.
"""
import importlib

# names re-exported lazily: FSDP2 and DTensor take seconds to import, and a one-process run needs neither
_EXPORTS = {"parallelize": "fsdp", "Mesh": "mesh", "ParallelConfigError": "mesh", "ParallelDims": "mesh",
            "build_mesh": "mesh"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"dsv4.parallel.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'dsv4.parallel' has no attribute {name!r}")
