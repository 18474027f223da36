"""Which parameters Muon trains and which AdamW trains (DeepSeek-V4 report §2.4 and §4.2.2; ARCHITECTURE.md §15).

The rule reads a parameter's name and shape only (no model import), so it applies to `named_parameters()`
of the model, of a wrapped model, or to a list of fakes in a test. In order, first match wins:

| parameters                                          | group            | update | weight decay |
|-----------------------------------------------------|------------------|--------|--------------|
| `embed.weight`, `head.weight` (also `*.embed/head`) | `adamw`          | AdamW  | λ (0.1)      |
| names ending `norm.weight` (every RMSNorm)          | `adamw_no_decay` | AdamW  | 0            |
| mHC `hc_*_scale`, `hc_*_base` (incl. `hc_head_*`)   | `adamw_no_decay` | AdamW  | 0            |
| attention sinks `attn_sink`                         | `adamw_no_decay` | AdamW  | 0            |
| compressor positional biases `ape`                  | `adamw_no_decay` | AdamW  | 0            |
| any other tensor with ndim < 2                      | `adamw_no_decay` | AdamW  | 0            |
| routed experts `ffn.experts.w1/w2/w3` `[E, n, m]`   | `muon_experts`   | Muon¹  | λ            |
| every other matrix, incl. mHC `hc_*_fn`, the router | `muon`           | Muon   | λ            |

¹ one matrix per expert: the group sets `batch_dims=1`.

Why:
* Embedding and head: the report names them for AdamW. An embedding row is a lookup table, not a linear map,
  and only rows of seen tokens get gradient, so orthogonalising the whole matrix is meaningless; the head's
  rows are per-token classifiers with very different gradient scales. Both keep decay, as in the report.
* RMSNorm weights, mHC scales (gating factors) and bases (static biases): the report names them for AdamW.
  They are gains and offsets, not maps between spaces; decaying them would pull gains toward 0 (not toward
  their neutral value 1) and biases toward an arbitrary point, so they get no decay (common practice;
  the report does not say).
* `attn_sink` (one logit per head) and `ape` (a learned additive bias on each compression window's gate
  scores) are biases in the same sense: AdamW, no decay. The report does not assign them; `ape` is 2-D
  but its rows are positions, not a linear map, so Muon's orthogonalisation has no meaning for it.
* Muon needs matrices; everything 2-D that maps one space to another (projections, shared experts, the
  router `gate.weight`, the mHC `fn` matrices) follows the report's "everything else → Muon".
* Routed experts are stored stacked; each expert is a logically independent matrix (Algorithm 1), so
  Newton–Schulz runs per expert, never over the concatenation.

Parameters with `requires_grad=False` are skipped (build the optimizer before freezing for a phase).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch

_EXPERTS = re.compile(r"(^|\.)experts\.w[123]$")
_HC_SCALE_BASE = re.compile(r"(^|\.)hc_\w+_(scale|base)$")
_EMBED_HEAD = ("embed.weight", "head.weight")
_BIAS_LEAVES = ("attn_sink", "ape")

# group name -> (kind, decayed, Muon batch dims); the order is the order of the returned groups
GROUPS: dict[str, tuple[str, bool, int | None]] = {
    "muon": ("muon", True, None),
    "muon_experts": ("muon", True, 1),
    "adamw": ("adamw", True, None),
    "adamw_no_decay": ("adamw", False, None),
}


def group_of(name: str, shape: tuple[int, ...] | torch.Size) -> str:
    """The group (a key of GROUPS) the rule in the module docstring gives a parameter."""
    leaf = name.rsplit(".", 1)[-1]
    if name in _EMBED_HEAD or name.endswith(tuple("." + s for s in _EMBED_HEAD)):
        return "adamw"
    if (name.endswith("norm.weight") or _HC_SCALE_BASE.search(name) or leaf in _BIAS_LEAVES
            or len(shape) < 2):
        return "adamw_no_decay"
    if _EXPERTS.search(name) and len(shape) == 3:
        return "muon_experts"
    return "muon"


def build_param_groups(named_params: Iterable[tuple[str, torch.Tensor]], lr: float,
                       weight_decay: float = 0.1) -> list[dict[str, Any]]:
    """Parameter groups for `MuonAdamW`: one dict per non-empty group of GROUPS.

    Each group holds `name`, `kind`, `params`, `param_names`, `lr`, `lr_scale` (1.0), `weight_decay`
    (`weight_decay` or 0) and, for `muon_experts`, `batch_dims=1`. Log `describe_param_groups(groups)`.
    """
    members: dict[str, list[tuple[str, torch.Tensor]]] = {g: [] for g in GROUPS}
    for name, p in named_params:
        if p.requires_grad:
            members[group_of(name, p.shape)].append((name, p))
    groups = []
    for gname, (kind, decayed, batch_dims) in GROUPS.items():
        if not members[gname]:
            continue
        group = dict(name=gname, kind=kind, params=[p for _, p in members[gname]],
                     param_names=[n for n, _ in members[gname]], lr=lr, lr_scale=1.0,
                     weight_decay=weight_decay if decayed else 0.0)
        if batch_dims is not None:
            group["batch_dims"] = batch_dims
        groups.append(group)
    return groups


def describe_param_groups(groups: list[dict[str, Any]]) -> str:
    """One line per group: tensor and element counts, update kind, decay (for the run log)."""
    lines = []
    for g in groups:
        numel = sum(p.numel() for p in g["params"])
        extra = f", {g['batch_dims']} batch dim(s)" if g.get("batch_dims") is not None else ""
        lines.append(f"{g.get('name', g['kind']):<15} {g['kind']:<5} {len(g['params']):>5} tensors "
                     f"{numel / 1e6:>10.3f}M params  wd {g['weight_decay']:g}{extra}")
    return "\n".join(lines)
