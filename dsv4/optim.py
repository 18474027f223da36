"""Muon + AdamW in one optimizer, as DeepSeek-V4 trains (report §2.4, Algorithm 1; §4.2.2; ARCHITECTURE.md §15).

Every parameter group says which update it gets with `"kind": "muon"` or `"kind": "adamw"`; which tensor
belongs where is decided outside, in `dsv4.param_groups` (the optimizer knows nothing about the model).

Muon, per logically independent matrix W ∈ R^{n×m} (Algorithm 1):

    M_t = μ M_{t-1} + G_t                        momentum, μ = 0.95
    O'  = HybridNS(μ M_t + G_t)                  Nesterov look-ahead, then approximate orthogonalisation
    O   = O' · sqrt(max(n, m)) · γ               γ = 0.18: update RMS 0.18, so AdamW learning rates transfer
    W  ← W (1 − η λ) − η O                       decoupled weight decay, λ = 0.1

"Logically independent" matters for the routed experts, stored as one `[E, n, m]` tensor: each expert is its
own matrix and is orthogonalised on its own (Newton–Schulz batched over the leading dims, never across
experts). The group option `batch_dims` says how many leading dims index separate matrices (default: all
but the last two); any dims between the batch dims and the last one are flattened into the columns.

AdamW (β 0.9/0.95, ε 1e-20, λ 0.1) follows `torch.optim.AdamW` operation for operation, so the two agree to
rounding; it takes the embedding, the head, norms, mHC scales/biases and other vectors.

Learning rate: each group holds `lr` and `lr_scale` (default 1); a schedule sets `lr = base · lr_scale`
each step (`set_lr`). All state is plain tensors in `self.state`, so the standard `state_dict` /
`load_state_dict` round-trip resumes a run bitwise; `named_state()` gives the same tensors by parameter
name for `torch.distributed.checkpoint`.

One class for one and many processes: parameters may be DTensors (FSDP2 / expert parallelism,
`dsv4.parallel`). AdamW and Muon's momentum are elementwise and run on each rank's shard. Newton–Schulz
runs on whole matrices: a shard that holds whole matrices (experts sharded over the expert dim) is
updated where it is; a matrix sharded by rows is gathered to one owner rank, orthogonalised there and
scattered back (`dsv4.parallel.muon`), so the result equals the single-process update.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from dsv4.parallel.reduce import is_dtensor, local

# Hybrid Newton–Schulz (report §2.4): 8 iterations whose slope 3.4445 at 0 lifts small singular values fast
# but leaves them spread over about [0.68, 1.14], then 2 with (2, −1.5, 0.5), whose fixed point 1 has zero
# derivative, to settle them at 1 (measured [0.9999, 1.0005] in fp32, [0.993, 1.007] in bf16).
NS_COEFFS: tuple[tuple[float, float, float], ...] = ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2
MUON_UPDATE_RMS = 0.18


def hybrid_newton_schulz(g: Tensor, *, dtype: torch.dtype = torch.bfloat16,
                         coeffs: tuple[tuple[float, float, float], ...] = NS_COEFFS, eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalise each matrix of `g` (..., n, m); returns the result in `dtype`.

    X ← X / ‖X‖_F, then X ← aX + b(XXᵀ)X + c(XXᵀ)²X per (a, b, c) of `coeffs`. The Frobenius norm (taken
    per matrix, in at least fp32) bounds every singular value by 1, inside the iteration's basin. Tall
    matrices are transposed so that XXᵀ is the smaller (min(n,m))² Gram matrix. The report runs NS in BF16.
    """
    if g.ndim < 2:
        raise ValueError(f"Newton–Schulz needs a matrix (or a stack of matrices), got shape {tuple(g.shape)}")
    x = g.to(torch.promote_types(torch.promote_types(g.dtype, dtype), torch.float32))
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    x = x.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT                                          # (..., m, n) with m < n
    for a, b, c in coeffs:
        gram = x @ x.mT                                   # (..., k, k), k = min(n, m)
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.mT if tall else x


def muon_update(grad: Tensor, *, batch_dims: int | None = None, dtype: torch.dtype = torch.bfloat16,
                update_rms: float = MUON_UPDATE_RMS) -> Tensor:
    """Scaled orthogonalised update O = HybridNS(grad) · sqrt(max(n, m)) · γ for every matrix of `grad`.

    `grad` is viewed as (*B, n, m): its first `batch_dims` dims index independent matrices (default:
    all but the last two), the next dim is n and the rest are flattened into m. Returns `grad`'s shape
    and dtype.
    """
    bd = grad.ndim - 2 if batch_dims is None else batch_dims
    if not 0 <= bd <= grad.ndim - 2:
        raise ValueError(f"batch_dims={batch_dims} does not leave a matrix in a tensor of shape {tuple(grad.shape)}")
    mats = grad.reshape(*grad.shape[:bd], grad.shape[bd], -1)  # (*B, n, m)
    n, m = mats.shape[-2:]
    o = hybrid_newton_schulz(mats, dtype=dtype)
    return (o.to(grad.dtype) * (math.sqrt(max(n, m)) * update_rms)).reshape(grad.shape)


class MuonAdamW(torch.optim.Optimizer):
    """Muon groups and AdamW groups in one optimizer (DeepSeek-V4 report §2.4 and §4.2.2).

    Args:
        params: parameter groups, each a dict with `"params"` and `"kind"` ("muon" or "adamw"); any
            option below may be overridden per group (e.g. `weight_decay=0` for norms).
        lr: learning rate η (the schedule's base; a group's `lr_scale` multiplies it in `set_lr`).
        weight_decay: decoupled decay λ (both kinds).
        momentum: Muon's μ (Nesterov).
        betas, eps: AdamW's β1, β2 and ε.
        ns_dtype: dtype Muon's Newton–Schulz iteration runs in.
        update_rms: Muon's γ, the RMS of the update of a matrix with all singular values 1.
        batch_dims: Muon only; leading dims indexing separate matrices (None: all but the last two).
    """

    def __init__(self, params: Iterable[dict[str, Any]], *, lr: float = 2.7e-4, weight_decay: float = 0.1,
                 momentum: float = 0.95, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-20,
                 ns_dtype: torch.dtype = torch.bfloat16, update_rms: float = MUON_UPDATE_RMS,
                 batch_dims: int | None = None):
        defaults = dict(lr=lr, lr_scale=1.0, weight_decay=weight_decay, momentum=momentum, betas=tuple(betas),
                        eps=eps, ns_dtype=ns_dtype, update_rms=update_rms, batch_dims=batch_dims)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    def set_lr(self, base_lr: float) -> None:
        """Set every group's lr to `base_lr · lr_scale` (called by the schedule each step)."""
        for group in self.param_groups:
            group["lr"] = base_lr * group["lr_scale"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("MuonAdamW does not support sparse gradients")
            if group["kind"] == "muon":
                self._muon_step(params, group)
            else:
                for p in params:
                    self._adamw_step(p, group)
        return loss

    def _init_param_state(self, p: Tensor, kind: str) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            if kind == "muon":
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            else:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _muon_step(self, params: list[Tensor], group: dict[str, Any]) -> None:
        mu, lr = group["momentum"], group["lr"]
        nesterov = []
        for p in params:
            buf, g = local(self._init_param_state(p, "muon")["momentum_buffer"]), local(p.grad)
            buf.mul_(mu).add_(g)                           # M_t = μ M_{t-1} + G_t
            nesterov.append(g.add(buf, alpha=mu))          # μ M_t + G_t
        for p, update in zip(params, self._orthogonalise(params, nesterov, group)):
            w = local(p)
            w.mul_(1 - lr * group["weight_decay"])
            w.add_(update, alpha=-lr)

    def _orthogonalise(self, params: list[Tensor], grads: list[Tensor], group: dict[str, Any]) -> list[Tensor]:
        """Muon's update for each parameter's local part; row-sharded matrices go through their owner rank."""
        opts = dict(dtype=group["ns_dtype"], update_rms=group["update_rms"])
        out: list[Tensor | None] = [None] * len(params)
        gathered = []
        for i, (p, g) in enumerate(zip(params, grads)):
            bd = p.ndim - 2 if group["batch_dims"] is None else group["batch_dims"]
            if is_dtensor(p) and not _whole_matrices_local(p, bd):
                gathered.append(i)
            else:
                out[i] = muon_update(g, batch_dims=bd, **opts)
        if gathered:  # sharded by rows: only possible when dim 0 is a matrix dim, i.e. batch_dims = 0
            from dsv4.parallel.muon import row_sharded, sharded_updates
            mats = [row_sharded(params[i], grads[i]) for i in gathered]
            for i, u in zip(gathered, sharded_updates(mats, lambda full: muon_update(full, batch_dims=0, **opts))):
                out[i] = u
        return out

    def _adamw_step(self, p: Tensor, group: dict[str, Any]) -> None:
        # the operation order of torch.optim.AdamW's single-tensor path, so both round alike
        state = self._init_param_state(p, "adamw")
        state["step"] += 1
        step, grad = state["step"], local(p.grad)
        (beta1, beta2), lr = group["betas"], group["lr"]
        exp_avg, exp_avg_sq = local(state["exp_avg"]), local(state["exp_avg_sq"])
        p = local(p)
        p.mul_(1 - lr * group["weight_decay"])
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1 ** step)
        denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(group["eps"])
        p.addcdiv_(exp_avg, denom, value=-step_size)


    def init_state(self) -> None:
        """Create every parameter's state now (zeros and step 0, what its first step would create), so
        that a checkpoint holds the same entries whichever parameters have had a gradient so far."""
        for group in self.param_groups:
            for p in group["params"]:
                self._init_param_state(p, group["kind"])

    def named_state(self) -> dict[str, dict[str, Tensor]]:
        """{parameter name: {state name: tensor}} for `torch.distributed.checkpoint`: the live state
        tensors (DTensors for sharded parameters, which a checkpoint can reshard), and AdamW's step
        count as a new 0-d int64 tensor. Load into it, then call `load_named_state` with it."""
        out = {}
        for group in self.param_groups:
            names = group.get("param_names")
            if not names:
                raise ValueError("named_state needs parameter names: build the groups with "
                                 "dsv4.param_groups.build_param_groups (each group lists `param_names`)")
            for name, p in zip(names, group["params"]):
                state = self.state.get(p)
                if state:
                    out[name] = {k: torch.tensor(v, dtype=torch.int64) if k == "step" else v for k, v in state.items()}
        return out

    def load_named_state(self, named: dict[str, dict[str, Tensor]]) -> None:
        """Finish loading `named_state()` after its tensors were filled in place: copy the step counts back."""
        for group in self.param_groups:
            for name, p in zip(group["param_names"], group["params"]):
                if name in named and "step" in named[name]:
                    self.state[p]["step"] = int(named[name]["step"])


def _whole_matrices_local(p: Tensor, batch_dims: int) -> bool:
    from dsv4.parallel.muon import whole_matrices_local
    return whole_matrices_local(p, batch_dims)


def _check_group(group: dict[str, Any]) -> None:
    kind = group.get("kind")
    if kind not in ("muon", "adamw"):
        raise ValueError(f"every parameter group needs 'kind': 'muon' or 'adamw', got {kind!r}")
    for key in ("lr", "weight_decay", "eps", "lr_scale"):
        if group[key] < 0:
            raise ValueError(f"{key} must be >= 0, got {group[key]}")
    if not 0 <= group["momentum"] < 1:
        raise ValueError(f"momentum must be in [0, 1), got {group['momentum']}")
    if not all(0 <= b < 1 for b in group["betas"]):
        raise ValueError(f"betas must be in [0, 1), got {group['betas']}")
    if kind != "muon":
        return
    bd = group["batch_dims"]
    names = group.get("param_names") or [None] * len(group["params"])
    for name, p in zip(names, group["params"]):
        what = f"parameter {name!r} of shape {tuple(p.shape)}" if name else f"a parameter of shape {tuple(p.shape)}"
        if p.ndim < 2:
            raise ValueError(f"Muon needs matrices; {what} cannot be orthogonalised: put it in an AdamW group")
        if bd is not None and not 0 <= bd <= p.ndim - 2:
            raise ValueError(f"batch_dims={bd} does not leave a matrix in {what}")
