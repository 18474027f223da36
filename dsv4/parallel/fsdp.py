"""`parallelize(model, mesh)`: FSDP2 and expert parallelism applied to a finished single-device model.

Applied between building the model and building the optimizer; the model code does not change:

  * expert parallelism (ep > 1): each block's `Experts` becomes an `ExpertParallel` module holding
    its rank's experts (same parameter names), wrapped by `fully_shard` over the edp ranks;
  * `fully_shard` per block (the main blocks and the MTP blocks), then on the whole model (embedding,
    head, final norm and mHC head), over the dense mesh: FSDP, or HSDP with dp_replicate > 1;
  * `mtp_logits` gets FSDP's forward hooks like `forward`, so the MTP head call gathers the shared
    embedding and head;
  * gradients are summed over ranks, not averaged: each rank's loss is its share of the loss of the
    whole global batch (token counts are all-reduced before the division), so the sum is the
    gradient of the one-process run on the same batch.

Every rank builds the same full model (same seed) before sharding, so the model must fit in one
process's memory once; the shards then replace it.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from dsv4.parallel.expert import ExpertParallel
from dsv4.parallel.mesh import Mesh


def parallelize(model: nn.Module, mesh: Mesh, *, param_dtype: torch.dtype | None = None,
                reshard_after_forward: bool = True) -> nn.Module:
    """Shard `model` (a `dsv4.model.Transformer`) in place over `mesh` and return it.

    `param_dtype`: FSDP2 mixed precision, the dtype parameters are gathered and computed in (e.g.
    bf16; None keeps the stored fp32, to be cast by autocast as in a one-device run). Gradients are
    reduced in fp32 and the sharded master weights stay fp32. `reshard_after_forward=False` keeps each
    block's gathered parameters from forward to backward (more memory, one all-gather less).
    """
    if isinstance(model, FSDPModule):
        raise ValueError("the model is already parallelized; call parallelize once, before building the optimizer")
    mesh.dims.check_model(model.config.n_routed_experts)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = list(model.layers) + list(model.mtp)
    for block in blocks:
        if mesh.experts is not None:
            block.ffn.experts = ExpertParallel(block.ffn.experts, mesh.experts["ep"])
            fully_shard(block.ffn.experts, mesh=mesh.experts["edp"], mp_policy=mp,
                        reshard_after_forward=reshard_after_forward)
        fully_shard(block, mesh=mesh.dense, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh.dense, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    register_fsdp_forward_method(model, "mtp_logits")
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)   # a plain SUM (gloo has no pre-multiplied sum)
    return model
