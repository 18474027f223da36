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

AdamW (β 0.9/0.95, ε 1e-20, λ 0.1) follows `torch.optim.AdamW`'s single-tensor path operation for
operation, so the two agree to rounding (measured bitwise, on the CPU and on CUDA); it takes the embedding,
the head, norms, mHC scales/biases and other vectors.

Launches per step. A small model's step is host-bound on a GPU (Python and kernel launches), so a step
issues launches per group, not per parameter: Muon stacks the local matrices of one (n, m), dtype and
device into one [Σb, n, m] tensor and runs Newton–Schulz once on it (`muon_updates`; four calls an
iteration), and the momentum, the decay and all of AdamW run as `torch._foreach_*` ops over a group's
tensors of one device and dtype. For the `bench` model on an H200 that took a step from ~8,800 kernels
and 117-214 ms to ~980 kernels and 24-33 ms (`bench/bench_optim.py`).

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

    X ← X / ‖X‖_F, then X ← (aI + bA + cA²) X with A = XXᵀ, per (a, b, c) of `coeffs` (Algorithm 1's
    aX + bAX + cA²X, factored). The Frobenius norm (taken per matrix, in at least fp32) bounds every singular
    value by 1, inside the iteration's basin. Tall matrices are transposed so that A is the smaller
    (min(n,m))² Gram matrix. The report runs NS in BF16.

    The leading dims are flattened into one batch, so an iteration is four calls for any number of
    matrices: A = XXᵀ, P = bA + cA² (one `baddbmm`, summed in the matmul's accumulator), P += aI on the
    diagonal, X ← PX. Folding aX into the small k×k P spares the (k × max(n,m)) temporaries of aX and of the
    sum, and rounds less: against a float64 reference the result is ~2.7× closer than the unfused
    `a*x + (b*A + c*(A@A)) @ x` in bf16 (6e-3 vs 1.7e-2 relative) and ~1.7× closer in fp32 (e.g. 7e-7 vs
    1.3e-6 for 256 × 1024).
    """
    if g.ndim < 2:
        raise ValueError(f"Newton–Schulz needs a matrix (or a stack of matrices), got shape {tuple(g.shape)}")
    n, m = g.shape[-2:]
    x = g.reshape(math.prod(g.shape[:-2]), n, m)          # (B, n, m)
    x = x.to(torch.promote_types(torch.promote_types(g.dtype, dtype), torch.float32))
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    x = x.to(dtype)
    tall = n > m
    if tall:
        x = x.mT                                          # (B, m, n) with m < n
    for a, b, c in coeffs:
        gram = torch.bmm(x, x.mT)                                   # A = XXᵀ: (B, k, k), k = min(n, m)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)     # bA + cA²
        poly.diagonal(dim1=-2, dim2=-1).add_(a)                     # aI + bA + cA²
        x = torch.bmm(poly, x)                                      # (B, k, max(n, m))
    return (x.mT if tall else x).reshape(g.shape)


def muon_update(grad: Tensor, *, batch_dims: int | None = None, dtype: torch.dtype = torch.bfloat16,
                update_rms: float = MUON_UPDATE_RMS) -> Tensor:
    """Scaled orthogonalised update O = HybridNS(grad) · sqrt(max(n, m)) · γ for every matrix of `grad`.

    `grad` is viewed as (*B, n, m): its first `batch_dims` dims index independent matrices (default:
    all but the last two), the next dim is n and the rest are flattened into m. Returns `grad`'s shape
    and dtype. `muon_updates` does this for many tensors at once.
    """
    return muon_updates([grad], batch_dims=batch_dims, dtype=dtype, update_rms=update_rms)[0]


def muon_updates(grads: list[Tensor], *, batch_dims: int | None = None, dtype: torch.dtype = torch.bfloat16,
                 update_rms: float = MUON_UPDATE_RMS) -> list[Tensor]:
    """`muon_update` of each tensor of `grads`, with one Newton–Schulz call per matrix shape.

    The matrices of all tensors that share (n, m), dtype and device are stacked into one (Σb, n, m)
    tensor and orthogonalised together: a step then pays Newton–Schulz's ~45 ops once per distinct
    shape (11 in the `bench` model's 73 Muon matrices) instead of once per parameter; the price is one more
    copy of those gradients while the stack lives. Stacking changes no matrix's result beyond rounding,
    since the norm and every matmul are per matrix (on the CPU not even that: a batched matmul multiplies
    matrix by matrix). The updates come back contiguous, in `grads`' shapes and dtypes.
    """
    mats = [_matrices(g, batch_dims) for g in grads]               # each (b, n, m)
    same: dict[tuple, list[int]] = {}
    for i, x in enumerate(mats):
        same.setdefault((*x.shape[1:], x.dtype, x.device), []).append(i)
    out: list[Tensor | None] = [None] * len(grads)
    for (n, m, *_), members in same.items():
        stack = torch.cat([mats[i] for i in members]) if len(members) > 1 else mats[members[0]]  # (Σb, n, m)
        o = hybrid_newton_schulz(stack, dtype=dtype)
        # contiguous (a tall `o` is a transposed view), so that the weights' foreach update meets one layout
        u = torch.empty(o.shape, dtype=grads[members[0]].dtype, device=o.device).copy_(o)
        u.mul_(math.sqrt(max(n, m)) * update_rms)
        for i, piece in zip(members, u.split([mats[i].shape[0] for i in members])):
            out[i] = piece.view(grads[i].shape)
    return out


def _matrices(grad: Tensor, batch_dims: int | None) -> Tensor:
    """`grad` as (b, n, m): its first `batch_dims` dims (default: all but the last two) flattened into b,
    the next dim is n, the rest flattened into m."""
    bd = grad.ndim - 2 if batch_dims is None else batch_dims
    if not 0 <= bd <= grad.ndim - 2:
        raise ValueError(f"batch_dims={batch_dims} does not leave a matrix in a tensor of shape {tuple(grad.shape)}")
    return grad.reshape(math.prod(grad.shape[:bd]), grad.shape[bd], math.prod(grad.shape[bd + 1:]))


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

    # -------------------------------------------------------------- the step's numbers on the device
    def use_device_scalars(self, device: torch.device | str) -> Tensor:
        """From now on `step()` reads the per-step numbers (decay factor, −lr, AdamW's −step size and bias
        correction) from an fp32 tensor on `device`, which `fill_scalars()` writes before each step (and which
        also advances AdamW's step counts, as `step()` then no longer does): one row per group, and one per
        step count for AdamW parameters at different counts (after a phase that trained only some of them).
        The step then reads no host number that changes, so it can be recorded once in a CUDA graph and
        replayed (`dsv4.train_graphs.OptimizerGraph`). Tensor factors round like the host numbers to within
        an ulp per operation. Returns the tensor."""
        n_adamw = sum(len(g["params"]) for g in self.param_groups if g["kind"] == "adamw")
        self._scalars = torch.zeros(len(self.param_groups) + n_adamw, 4, dtype=torch.float32, device=device)
        self._adamw_rows: dict[tuple[int, int], int] = {}    # (group, step count) -> row, for this step
        return self._scalars

    def fill_scalars(self) -> tuple:
        """Advance the step counts of the AdamW parameters that have a gradient and write this step's numbers
        (`use_device_scalars`). Returns the step's row layout: which parameters read which row (a recording
        of the step holds for steps of the same layout)."""
        if getattr(self, "_scalars", None) is None:
            raise RuntimeError("fill_scalars() needs use_device_scalars(device) first")
        G = len(self.param_groups)
        rows = [[0.0, 0.0, 0.0, 1.0] for _ in range(self._scalars.shape[0])]
        self._adamw_rows, layout = {}, []
        for gi, group in enumerate(self.param_groups):
            lr = group["lr"]
            rows[gi][:2] = [1 - lr * group["weight_decay"], -lr]
            if group["kind"] != "adamw":
                continue
            counts = []
            for p in group["params"]:
                if p.grad is not None:
                    state = self._init_param_state(p, "adamw")
                    state["step"] += 1
                    counts.append(state["step"])
            (beta1, beta2) = group["betas"]
            for step in sorted(set(counts)):
                r = G + len(self._adamw_rows)
                self._adamw_rows[(gi, step)] = r
                rows[r] = [1 - lr * group["weight_decay"], -lr, -(lr / (1 - beta1 ** step)),
                           (1 - beta2 ** step) ** 0.5]
            low = min(counts, default=0)
            layout.append((gi, tuple(c - low for c in counts)))
        self._scalars.copy_(torch.tensor(rows, dtype=torch.float32), non_blocking=True)
        return tuple(layout)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scalars = getattr(self, "_scalars", None)
        for gi, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("MuonAdamW does not support sparse gradients")
            on_device = None if scalars is None else gi
            for same in _by_device_and_dtype(params):
                if group["kind"] == "muon":
                    self._muon_step(same, group, on_device)
                else:
                    self._adamw_step(same, group, on_device)
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

    def _muon_step(self, params: list[Tensor], group: dict[str, Any], gi: int | None = None) -> None:
        """Algorithm 1 on parameters of one device and dtype: momentum and weight update as foreach ops
        over all of them, Newton–Schulz batched by matrix shape (`_orthogonalise`). `gi`: the group's row of
        the device scalars (`use_device_scalars`); None: the host's lr."""
        mu, lr = group["momentum"], group["lr"]
        bufs = [local(self._init_param_state(p, "muon")["momentum_buffer"]) for p in params]
        grads = [local(p.grad) for p in params]
        _mul_(bufs, mu)
        torch._foreach_add_(bufs, grads)                               # M_t = μ M_{t-1} + G_t
        nesterov = torch._foreach_add(grads, bufs, alpha=mu)           # μ M_t + G_t
        updates = self._orthogonalise(params, nesterov, group)
        weights = [local(p) for p in params]
        if gi is not None:                                             # W ← W·(1 − ηλ) − η·O, factors on the device
            decay_lr = self._scalars[gi]
            _mul_(weights, decay_lr[0])
            torch._foreach_add_(weights, torch._foreach_mul(updates, decay_lr[1]))
            return
        decay = 1 - lr * group["weight_decay"]
        if decay != 1:                                                 # W · 1 = W: skipping it changes no bit
            _mul_(weights, decay)
        torch._foreach_add_(weights, updates, alpha=-lr)

    def _orthogonalise(self, params: list[Tensor], grads: list[Tensor], group: dict[str, Any]) -> list[Tensor]:
        """Muon's update for each parameter's local part. Whole local matrices (plain tensors, shards of whole
        experts) are batched by shape (`muon_updates`); row-sharded matrices go through their owner rank."""
        opts = dict(dtype=group["ns_dtype"], update_rms=group["update_rms"])
        bd = group["batch_dims"]
        whole, gathered = [], []
        for i, p in enumerate(params):
            by_rows = is_dtensor(p) and not _whole_matrices_local(p, p.ndim - 2 if bd is None else bd)
            (gathered if by_rows else whole).append(i)
        out: list[Tensor | None] = [None] * len(params)
        for i, u in zip(whole, muon_updates([grads[i] for i in whole], batch_dims=bd, **opts)):
            out[i] = u
        if gathered:  # sharded by rows: only possible when dim 0 is a matrix dim, i.e. batch_dims = 0
            from dsv4.parallel.muon import row_sharded, sharded_updates
            mats = [row_sharded(params[i], grads[i]) for i in gathered]
            for i, u in zip(gathered, sharded_updates(mats, lambda full: muon_update(full, batch_dims=0, **opts))):
                out[i] = u
        return out

    def _adamw_step(self, params: list[Tensor], group: dict[str, Any], gi: int | None = None) -> None:
        """AdamW on parameters of one device and dtype, as foreach ops over all of them.

        The operations and their order are those of torch.optim.AdamW's single-tensor path, so every element
        rounds as there: bitwise on the CPU, where a foreach op is that op tensor by tensor, and measured
        bitwise on CUDA too. The bias corrections depend on the step count, which differs between parameters
        when one had no gradient at some step: those ops run once per step count (once, as a rule), each with
        a plain number. (A per-tensor list of numbers would do in one op, but on CUDA a foreach division by a
        list divides exactly where `x / b` multiplies by 1/b: results 1 ulp apart.) With `gi` (device
        scalars, `use_device_scalars`: `fill_scalars` advanced the step counts) the same operations take
        their factors from the group's rows on the device, and the step size's product is a division then
        a multiply.
        """
        (beta1, beta2), lr = group["betas"], group["lr"]
        states = [self._init_param_state(p, "adamw") for p in params]
        if gi is None:
            for state in states:
                state["step"] += 1
        weights, grads = [local(p) for p in params], [local(p.grad) for p in params]
        exp_avgs = [local(state["exp_avg"]) for state in states]
        exp_avg_sqs = [local(state["exp_avg_sq"]) for state in states]
        decay = 1 - lr * group["weight_decay"] if gi is None else self._scalars[gi, 0]
        if gi is not None or decay != 1:                               # W · 1 = W: skipping it changes no bit
            _mul_(weights, decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)               # m ← β1 m + (1 − β1) g
        _mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)   # v ← β2 v + (1 − β2) g²
        by_step: dict[int, list[int]] = {}
        for i, state in enumerate(states):
            by_step.setdefault(state["step"], []).append(i)
        for step, members in by_step.items():
            w, m = [weights[i] for i in members], [exp_avgs[i] for i in members]
            denom = torch._foreach_sqrt([exp_avg_sqs[i] for i in members])
            if gi is None:
                torch._foreach_div_(denom, (1 - beta2 ** step) ** 0.5)
                torch._foreach_add_(denom, group["eps"])               # sqrt(v / (1 − β2^t)) + ε
                torch._foreach_addcdiv_(w, m, denom, value=-(lr / (1 - beta1 ** step)))  # W ← W − η/(1 − β1^t) · m / denom
            else:
                row = self._scalars[self._adamw_rows[(gi, step)]]      # [·, ·, −η/(1 − β1^t), sqrt(1 − β2^t)]
                torch._foreach_div_(denom, row[3])
                torch._foreach_add_(denom, group["eps"])
                update = torch._foreach_div(m, denom)
                torch._foreach_mul_(update, row[2])
                torch._foreach_add_(w, update)

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


def _by_device_and_dtype(params: list[Tensor]) -> list[list[Tensor]]:
    """`params` split into lists of one device and dtype, in order: a foreach op runs on such a list as one
    kernel per chunk of tensors (a mixed list falls back to a loop over its tensors)."""
    split: dict[tuple, list[Tensor]] = {}
    for p in params:
        split.setdefault((p.device, p.dtype), []).append(p)
    return list(split.values())


def _mul_(tensors: list[Tensor], factor: float | Tensor) -> None:
    """`t.mul_(factor)` for each tensor: one foreach launch on an accelerator, a loop on the CPU, where a
    foreach multiply in place first rounds `factor` to a bf16/fp16 list's dtype (torch 2.13: ×0.99 becomes
    ×0.98828125, a 17% error in a 0.01 weight decay) and there are no launches to save."""
    if tensors[0].device.type == "cpu":
        for t in tensors:
            t.mul_(factor)
    else:
        torch._foreach_mul_(tensors, factor)


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
