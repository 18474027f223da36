"""Plain-PyTorch reference of every primitive that gets (or will get) a GPU kernel.

The model calls these functions only through this module, so a fast implementation can replace
one by assigning a function with the same signature (see `set_backend`). Each reference states the
numeric policy of the official inference code (ARCHITECTURE.md §2, §11): fp32 for mHC, compressor
pooling, routing and SwiGLU; attention scores in fp32.

Shapes: B batch, S query tokens, T key positions, D model dim, H heads, Dh head dim, N streams,
E experts, K experts per token, C compressed entries, Hi/Di indexer heads/head dim.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

BACKEND = "torch"


def fp32_region(fn):
    """Run `fn` with autocast off: the steps the official code computes in fp32 (mHC, routing, SwiGLU,
    pooling, attention scores, LM head) stay fp32 inside a bf16 `torch.autocast` training step."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dev = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        if torch.is_autocast_enabled(dev):
            with torch.autocast(dev, enabled=False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)
    return wrapper


def up(x: torch.Tensor) -> torch.Tensor:
    """`x` in at least fp32: the official code computes these steps in fp32; a float64 model (used by
    the tests against a float64 re-derivation of the spec) stays in float64."""
    return x if x.dtype == torch.float64 else x.float()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def set_backend(name: str) -> None:
    """Choose the implementation of the primitives ('torch' is the only one on CPU)."""
    global BACKEND
    if name != "torch":
        raise ValueError(f"unknown ops backend {name!r}; available: 'torch'")
    BACKEND = name


# ----------------------------------------------------------------------------- mHC
@fp32_region
def hc_split_sinkhorn(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, n: int,
                      iters: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn the (2+n)·n mix logits of each token into pre [.., n], post [.., n], comb [.., n, n].

    Exact order of the official kernel (spec §4.1 step 8): row softmax + eps, one column
    normalisation, then (iters − 1) × (row, column), eps in every denominator. All fp32.
    `comb[j, k]` routes input stream j to output stream k.
    """
    mixes = up(mixes)
    pre_l, post_l, comb_l = mixes.split([n, n, n * n], dim=-1)
    pre = torch.sigmoid(pre_l * scale[0] + base[:n]) + eps                     # [.., n]
    post = 2 * torch.sigmoid(post_l * scale[1] + base[n:2 * n])               # [.., n]
    comb = comb_l.unflatten(-1, (n, n)) * scale[2] + base[2 * n:].view(n, n)   # [.., n, n]
    comb = torch.softmax(comb, dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return pre, post, comb


# ----------------------------------------------------------------------------- compressor
@fp32_region
def compress_pool(kv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Softmax-gated pooling over the slot axis, independently per channel (spec §6, eqs 9–12, 20–23).

    kv, score: [.., slots, c] fp32 (score already includes the positional bias `ape`; −inf slots
    get zero weight). Returns [.., c] fp32.
    """
    return (kv * torch.softmax(score, dim=-2)).sum(dim=-2)


# ----------------------------------------------------------------------------- attention
@fp32_region
def sink_attention(q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor, sink: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Single shared K=V head attention with a per-head sink logit in the denominator (spec §5.1.5).

    q [B, S, H, Dh]; kv [B, T, Dh] (keys and values are the same vectors); bias [B, S, T] additive
    (0 = visible, −inf = not a candidate); sink [H] fp32, not scaled. Scores and softmax in fp32.
    o_h = Σ_j exp(z_hj) k_j / (Σ_j exp(z_hj) + exp(sink_h)). A query with no candidate gives 0.
    """
    scores = torch.einsum("bshd,btd->bsht", up(q), up(kv)) * scale      # [B, S, H, T]
    scores = scores + up(bias).unsqueeze(2)
    sink_l = up(sink).view(1, 1, -1, 1).expand(*scores.shape[:3], 1)        # [B, S, H, 1]
    logits = torch.cat([scores, sink_l], dim=-1)                                 # [B, S, H, T+1]
    probs = torch.softmax(logits, dim=-1)[..., :-1]                              # [B, S, H, T]
    out = torch.einsum("bsht,btd->bshd", probs, up(kv))                     # [B, S, H, Dh]
    return out.to(q.dtype)


@fp32_region
def index_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Lightning-indexer scores I[t, s] = Σ_h w[t, h] · ReLU(q[t, h] · k[s]) (spec §7, eq. 16).

    q [B, S, Hi, Di]; k [B, C, Di]; w [B, S, Hi] (already scaled). fp32. Returns [B, S, C].
    """
    dots = torch.einsum("bshd,bcd->bshc", up(q), up(k))                 # [B, S, Hi, C]
    return torch.einsum("bshc,bsh->bsc", F.relu(dots), up(w))               # [B, S, C]


# ----------------------------------------------------------------------------- MoE
@fp32_region
def swiglu(g: torch.Tensor, u: torch.Tensor, limit: float) -> torch.Tensor:
    """Clamped SwiGLU in fp32 (spec §8.4): up ∈ [−limit, limit], gate ≤ limit (no lower clamp)."""
    g, u = up(g), up(u)
    if limit > 0:
        u = u.clamp(-limit, limit)
        g = g.clamp(max=limit)
    return F.silu(g) * u


def moe_experts(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, w1: torch.Tensor,
                w2: torch.Tensor, w3: torch.Tensor, limit: float) -> torch.Tensor:
    """Routed experts: y_t = Σ_k W2[e_k] · (weight_tk · SwiGLU(W1[e_k] x_t, W3[e_k] x_t)) (spec §8.4–8.5).

    x [N, D]; idx [N, K] expert ids, all in [0, E) (not checked: a check would need the host);
    weight [N, K] fp32; w1, w3 [E, I, D]; w2 [E, D, I]. Numeric policy of the official code: matmuls
    in the model dtype (the autocast dtype inside `torch.autocast`), SwiGLU and the routing weight in
    fp32 (the weight multiplies the SwiGLU output before `w2`), each expert's output cast to the dtype
    of `x` and summed per token in it. A token listing the same expert twice gets both contributions.

    Three implementations compute this; `moe_path` picks one from shapes, dtypes and the device, never
    from tensor values:
      'grouped'  `moe_experts_grouped`: pairs sorted by expert, three `torch._grouped_mm`; no host sync,
                 a fixed number of kernels whatever E. Where grouped_mm has a sync-free kernel.
      'gather'   `moe_experts_gather`: a bmm per (token, expert) pair on gathered expert matrices; no
                 host sync, any dtype (float64 test models), but it copies N·K expert matrices, so it
                 runs when N·K ≤ E (decode) or when no sync is allowed (CUDA-graph capture, compile).
      'loop'     `moe_experts_loop`, the reference: one matmul per expert with tokens, one host sync.
    """
    if idx.numel() == 0:
        return torch.zeros_like(x)
    return MOE_IMPLS[moe_path(x, idx, w1, w2, w3)](x, idx, weight, w1, w2, w3, limit)


def moe_path(x: torch.Tensor, idx: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
             w3: torch.Tensor) -> str:
    """The implementation `moe_experts` runs for these operands: 'grouped', 'gather' or 'loop'."""
    if grouped_mm_applies(x, w1, w2, w3):
        return "grouped"
    if idx.numel() <= w1.shape[0] or not _syncs_allowed(x):
        return "gather"
    return "loop"


def grouped_mm_applies(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` runs these expert matmuls without a host sync. Its constraints (torch
    2.13 on CPU, measured; CUDA from ATen's GroupedBlas.cpp and GroupMM.cu):

    - CPU: bf16, fp16, fp32 (a C++ loop of mm over the groups). CUDA: bf16 on sm90 (a CUTLASS kernel);
      other dtypes and GPUs fall back to a loop that copies the offsets to the host. sm100 has the
      kernel too, but its weight gradient of an expert with no tokens is not zero (pytorch#172439),
      so there only without gradients;
    - under `torch.compile` bf16 only (the meta kernel rejects the rest);
    - every operand's row stride a multiple of 16 bytes (D and I multiples of 8 in bf16, of 4 in fp32),
      16-byte aligned data pointers on CUDA, fewer than 1024 experts on CUDA;
    - autograd: gradients to both operands are grouped_mm calls again (the weight gradient a 2-D × 2-D
      grouped_mm whose empty groups give zeros); an incoming gradient must be strided, not expanded.
    No autocast rule covers `_grouped_mm`, so `moe_experts_grouped` casts to the autocast dtype itself.
    """
    dtype = _mm_dtype(x)
    if not hasattr(torch, "_grouped_mm") or dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    compiling = torch.compiler.is_compiling()
    if compiling and dtype != torch.bfloat16:
        return False
    if x.device.type == "cuda":
        if dtype != torch.bfloat16 or w1.shape[0] >= 1024:
            return False
        major = _cuda_major(x.device.index)
        training = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w1, w2, w3))
        if not (major == 9 or (major == 10 and not training)):
            return False
        if not compiling and any(t.data_ptr() % 16 for t in (w1, w2, w3)):
            return False
    elif x.device.type != "cpu":
        return False
    align = 16 // dtype.itemsize
    return all(_row_major_aligned(t, align) for t in (w1, w2, w3)) and x.shape[-1] % align == 0 \
        and w1.shape[1] % align == 0


def _row_major_aligned(w: torch.Tensor, align: int) -> bool:
    """[E, R, C] stored row-major per expert with a row stride of `align` elements: its transpose is
    the column-major [E, C, R] operand grouped_mm accepts."""
    return w.stride(-1) == 1 and w.stride(-2) >= w.shape[-1] and w.stride(-2) % align == 0


@torch.compiler.assume_constant_result
def _cuda_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def _syncs_allowed(x: torch.Tensor) -> bool:
    """False while torch.compile traces (a sync breaks the graph) or a CUDA graph records."""
    if torch.compiler.is_compiling():
        return False
    return not (x.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _mm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the expert matmuls run in: the autocast dtype inside `torch.autocast`, else x's."""
    dev = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _combine(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """y [N, D]: each token's K expert outputs (out [N·K, D], token-major pair order) cast to x's dtype
    and summed, without atomics, so the result does not depend on scheduling."""
    N, D = x.shape
    return out.to(x.dtype).view(N, -1, D).sum(dim=1)


def moe_experts_grouped(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, w1: torch.Tensor,
                        w2: torch.Tensor, w3: torch.Tensor, limit: float) -> torch.Tensor:
    """`moe_experts` with `torch._grouped_mm` (caller checks `grouped_mm_applies`): no host sync.

    The N·K (token, expert) pairs are sorted by expert (stable: ties keep token order, as the loop);
    group ends come from a search in the sorted ids, so experts with no tokens are empty groups. The
    weights enter as transposed views ([E, D, I] column-major), never copied unless autocast casts them.
    The outputs go back to pair order by the inverse permutation (a gather) and are summed per token.
    Gradients to x, weight, w1, w2, w3 are those of grouped_mm, index_select and the casts.
    """
    N, K = idx.shape
    E = w1.shape[0]
    dt = _mm_dtype(x)
    sorted_e, order = torch.sort(idx.reshape(-1), stable=True)                   # [N·K] pairs by expert
    experts = torch.arange(E, device=idx.device, dtype=sorted_e.dtype)
    ends = torch.searchsorted(sorted_e, experts, right=True, out_int32=True)   # [E] cumulative ends
    token = order // K                                                           # [N·K]
    back = torch.empty_like(order).scatter_(0, order, torch.arange(N * K, device=order.device))  # [N·K]
    xs = x.to(dt).index_select(0, token)                                         # [N·K, D]
    g = torch._grouped_mm(xs, w1.to(dt).transpose(-2, -1), offs=ends)           # [N·K, I]
    u = torch._grouped_mm(xs, w3.to(dt).transpose(-2, -1), offs=ends)           # [N·K, I]
    h = swiglu(g, u, limit) * weight.reshape(-1).index_select(0, order)[:, None]  # [N·K, I] fp32
    out = torch._grouped_mm(h.to(dt), w2.to(dt).transpose(-2, -1), offs=ends)   # [N·K, D] by expert
    return _combine(x, out.index_select(0, back))


def moe_experts_gather(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, w1: torch.Tensor,
                       w2: torch.Tensor, w3: torch.Tensor, limit: float) -> torch.Tensor:
    """`moe_experts` as one bmm per (token, expert) pair on gathered expert matrices: no host sync, any
    dtype, static shapes; memory and weight traffic grow with N·K (three [N·K, I, D] gathers)."""
    (N, K), D = idx.shape, x.shape[1]
    dt = _mm_dtype(x)
    flat = idx.reshape(-1)                                                       # [N·K]
    xs = x.to(dt).unsqueeze(1).expand(N, K, D).reshape(N * K, D, 1)               # [N·K, D, 1]
    g = torch.bmm(w1.index_select(0, flat).to(dt), xs).squeeze(-1)              # [N·K, I]
    u = torch.bmm(w3.index_select(0, flat).to(dt), xs).squeeze(-1)              # [N·K, I]
    h = swiglu(g, u, limit) * weight.reshape(-1, 1)                              # [N·K, I] fp32
    out = torch.bmm(w2.index_select(0, flat).to(dt), h.to(dt).unsqueeze(-1))    # [N·K, D, 1]
    return _combine(x, out.squeeze(-1))


def moe_experts_loop(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, w1: torch.Tensor,
                     w2: torch.Tensor, w3: torch.Tensor, limit: float) -> torch.Tensor:
    """The reference of `moe_experts`: tokens grouped by expert, one matmul per expert that has tokens.
    `.tolist()` of the counts makes one host sync per call (no CUDA-graph capture)."""
    N, K = idx.shape
    flat = idx.reshape(-1)                                                       # [N·K]
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w1.shape[0]).tolist()
    token = order // K                                                           # [N·K]
    wts = weight.reshape(-1)[order]                                              # [N·K]
    y = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sel = token[start:start + n]
        xe = x[sel]                                                              # [n, D]
        h = swiglu(xe @ w1[e].t(), xe @ w3[e].t(), limit) * wts[start:start + n, None]
        y.index_add_(0, sel, (h.to(x.dtype) @ w2[e].t()).to(y.dtype))
        start += n
    return y


MOE_IMPLS = {"grouped": moe_experts_grouped, "gather": moe_experts_gather, "loop": moe_experts_loop}


# ----------------------------------------------------------------------------- quantised linear and experts
# Weights kept in the release's storage formats (spec §11.1; modules in `dsv4.quant`): FP8 e4m3 matrices with
# one e8m0 (or fp32) scale per 128×128 block, FP4 e2m1 routed experts (two codes per int8, low nibble first)
# with one e8m0 scale per 1×32 block along the input dim. Activations stay in the model dtype (no FP8
# activation quantisation): every function computes what the dequantise-on-load model computes, up to
# summation order. Each twin below has a Triton kernel with the same signature in `dsv4/kernels/`;
# `fp8_linear` / `fp4_experts` run the kernel or the twin by the quantised-op backend, chosen once:
# "auto" (default: the kernel for CUDA tensors when Triton imports, the twin otherwise), "torch" or
# "triton" (also on CPU tensors under TRITON_INTERPRET=1, as the tests do).
QUANT_BACKEND = "auto"
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def set_quant_backend(name: str) -> None:
    """Choose the implementation of `fp8_linear` / `fp4_experts`: 'auto', 'torch' or 'triton'."""
    global QUANT_BACKEND
    if name not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown quantised-op backend {name!r}; available: 'auto', 'torch', 'triton'")
    if name == "triton" and not triton_available():
        raise ValueError("the 'triton' backend needs the triton package (pip install triton)")
    QUANT_BACKEND = name


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def quant_backend(device: torch.device | str) -> str:
    """The implementation `fp8_linear` / `fp4_experts` run for tensors on `device`: 'triton' or 'torch'."""
    if QUANT_BACKEND != "auto":
        return QUANT_BACKEND
    return "triton" if torch.device(device).type == "cuda" and triton_available() else "torch"


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
               block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """x [..., K] · (weight [N, K] e4m3 ⊙ block scales)ᵀ -> [..., N] in x's dtype (kernel or twin)."""
    if quant_backend(x.device) == "triton":
        from dsv4.kernels.fp8_gemm import fp8_linear as kernel

        return kernel(x, weight, scale, block)
    return fp8_linear_torch(x, weight, scale, block)


def fp4_experts(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, w1: torch.Tensor, s1: torch.Tensor,
                w2: torch.Tensor, s2: torch.Tensor, w3: torch.Tensor, s3: torch.Tensor, limit: float) -> torch.Tensor:
    """Routed experts on FP4 weights (kernel or twin); see `fp4_experts_torch`."""
    if quant_backend(x.device) == "triton":
        from dsv4.kernels.fp4_moe import fp4_experts as kernel

        return kernel(x, idx, weight, w1, s1, w2, s2, w3, s3, limit)
    return fp4_experts_torch(x, idx, weight, w1, s1, w2, s2, w3, s3, limit)


def dequant_blocks(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                   dtype: torch.dtype) -> torch.Tensor:
    """FP8 weight [R, C] (e4m3) times one scale per block [⌈R/br⌉, ⌈C/bc⌉] -> [R, C] in dtype (exact in bf16)."""
    R, C = weight.shape
    s = scale.to(acc_dtype(dtype)).repeat_interleave(block[0], 0)[:R].repeat_interleave(block[1], 1)[:, :C]
    return (weight.to(s.dtype) * s).to(dtype)


def dequant_fp4_rows(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Packed e2m1 [..., R, C/2] with 1×32 scales [..., R, ⌈C/32⌉] -> [..., R, C] in dtype (exact in bf16)."""
    u = packed.view(torch.uint8)
    codes = torch.stack([u & 0x0F, u >> 4], dim=-1).flatten(-2)                 # [..., R, C] low nibble first
    acc = acc_dtype(dtype)
    values = torch.tensor(_E2M1, dtype=acc, device=packed.device)[codes.long()]
    s = scale.to(acc).repeat_interleave(32, dim=-1)[..., :codes.shape[-1]]
    return (values * s).to(dtype)


def fp8_linear_torch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                     block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """Twin of the FP8 GEMM kernel: the weight dequantised to the matmul dtype on the fly, then `F.linear`
    (the memory holds only the FP8 bytes; the dequantised copy lives for this call)."""
    return F.linear(x, dequant_blocks(weight, scale, block, _mm_dtype(x)))


def fp4_experts_torch(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, w1: torch.Tensor,
                      s1: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor, w3: torch.Tensor, s3: torch.Tensor,
                      limit: float) -> torch.Tensor:
    """Twin of the FP4 expert kernels: `moe_experts` on the experts this batch uses, dequantised on the fly.

    x [N, D]; idx [N, K], ids outside [0, E) contribute nothing (the experts of other ranks under expert
    parallelism); weight [N, K] fp32; w1, w3 int8 [E, I, D/2], w2 int8 [E, D, I/2] (two e2m1 codes per
    byte, low nibble first); s1, s3 [E, I, D/32], s2 [E, D, I/32] e8m0. Finding the used experts syncs
    with the host; where that is not allowed (CUDA-graph capture, compile) each pair's expert is
    dequantised instead (memory N·K·3·I·D: decode sizes only).
    """
    E = w1.shape[0]
    dt = _mm_dtype(x)
    valid = (idx >= 0) & (idx < E)
    if _syncs_allowed(x):
        if not bool(valid.all()):
            tok, k = valid.nonzero(as_tuple=True)                                  # pairs on this device
            y = torch.zeros_like(x)
            if tok.numel():
                part = fp4_experts_torch(x[tok], idx[tok, k, None], weight[tok, k, None], w1, s1, w2, s2, w3, s3,
                                         limit)                                    # [P, D]
                y.index_add_(0, tok, part)
            return y
        used = torch.unique(idx)                                                   # [U] sorted
        local = torch.full((E,), -1, dtype=idx.dtype, device=idx.device)
        local[used] = torch.arange(used.numel(), dtype=idx.dtype, device=idx.device)
        deq = [dequant_fp4_rows(w.index_select(0, used), s.index_select(0, used), dt)
               for w, s in ((w1, s1), (w2, s2), (w3, s3))]                         # [U, I, D], [U, D, I], [U, I, D]
        return moe_experts(x, local[idx], weight, *deq, limit)
    N, K = idx.shape
    flat = torch.where(valid, idx, 0).reshape(-1)                                  # [N·K]
    deq = [dequant_fp4_rows(w.index_select(0, flat), s.index_select(0, flat), dt)
           for w, s in ((w1, s1), (w2, s2), (w3, s3))]                             # one matrix per pair
    pairs = torch.arange(N * K, device=idx.device).view(N, K)
    return moe_experts_gather(x, pairs, torch.where(valid, weight, 0), *deq, limit)
