"""Plain-PyTorch reference ("twin") of every primitive that has a GPU kernel, and the backend table.

The model calls these primitives only through this module. Each one is a `Primitive`: a PyTorch twin
(the reference, and the implementation on CPU) plus other implementations with the same signature
(Triton kernels in `dsv4.kernels`, imported only when chosen). The implementation is chosen once per
(device type, dtype) the first time a primitive runs there: 'triton' on CUDA when Triton is installed,
else 'torch'. `DSV4_OPS` in the environment overrides the choice when the table is first used
(`DSV4_OPS=torch` or `DSV4_OPS=triton` for all, `DSV4_OPS=sparse_attention=torch,moe_experts=loop` per
primitive); `set_backend` does the same from code (the one documented global switch of the package);
`describe_backends()` prints the table (`dsv4 info --backends`). While `torch.compile` traces, the
twins run (the compiler fuses them).

Numeric policy of the official inference code (ARCHITECTURE.md §2, §11): fp32 for mHC, compressor
pooling, routing and SwiGLU; attention scores in fp32.

Shapes: B batch, S query tokens, T key positions, D model dim, H heads, Dh head dim, N streams,
E experts, K experts per token / keys per query, C compressed entries, Hi/Di indexer heads/head dim,
P index top-k, J slots per compressed entry.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


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


# ----------------------------------------------------------------------------- backend table
class Primitive:
    """One kernel-backed primitive: named implementations with one signature, 'torch' the reference.

    `impls` maps a name to a function or to "module:attr" (imported on first use). `kernel_dtypes`:
    the dtypes the non-torch implementations accept (None: any); other dtypes (float64 test models) use
    the twin. `operand_dtype`: the dtype of the tensor the choice is made on, as a function of the model's
    (default the same; fp32 for the compressor's state in a bf16 model), for the tables of the logs.
    """

    def __init__(self, name: str, impls: dict,
                 kernel_dtypes: tuple | None = (torch.bfloat16, torch.float16, torch.float32),
                 operand_dtype=None):
        self.name, self.impls, self.kernel_dtypes = name, dict(impls), kernel_dtypes
        self.operand_dtype = operand_dtype or (lambda model_dtype: model_dtype)
        self.chosen: dict[tuple[str, torch.dtype], str] = {}
        self._fns: dict[str, callable] = {}
        functools.update_wrapper(self, self.fn("torch"))

    def fn(self, impl: str):
        if impl not in self._fns:
            f = self.impls[impl]
            if isinstance(f, str):
                mod, attr = f.split(":")
                f = getattr(importlib.import_module(mod), attr)
            self._fns[impl] = f
        return self._fns[impl]

    def choose(self, device_type: str, dtype: torch.dtype) -> str:
        key = (device_type, dtype)
        if key not in self.chosen:
            want = _override().get(self.name)
            if want is None and _override().get("*") in self.impls:    # 'triton' for all: where it exists
                want = _override()["*"]
            names = [n for n in self.impls if n != "torch"]
            if want is not None and want not in self.impls:
                raise ValueError(f"{self.name}: no implementation {want!r} (available: {', '.join(self.impls)}); "
                                 "fix DSV4_OPS or the set_backend call")
            if want is None:
                want = "triton" if "triton" in names and device_type == "cuda" and triton_available() else "torch"
            if self.kernel_dtypes is not None and dtype not in self.kernel_dtypes:
                want = "torch"
            self.chosen[key] = want
        return self.chosen[key]

    def __call__(self, *args, **kwargs):
        t = next(a for a in args if isinstance(a, torch.Tensor))
        impl = "torch" if torch.compiler.is_compiling() else self.choose(t.device.type, t.dtype)
        return self.fn(impl)(*args, **kwargs)


PRIMITIVES: dict[str, Primitive] = {}
_OVERRIDE: dict | None = None


def _override() -> dict:
    global _OVERRIDE
    if _OVERRIDE is None:
        _OVERRIDE = _parse_override(os.environ.get("DSV4_OPS", ""))
    return _OVERRIDE


def _parse_override(spec: str) -> dict:
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, impl = part.rpartition("=")
        name = name.strip() or "*"
        if name != "*" and name not in PRIMITIVES:
            raise ValueError(f"DSV4_OPS names an unknown primitive {name!r}; known: {', '.join(PRIMITIVES)}")
        out[name] = impl.strip()
    return out


def set_backend(spec: str | dict | None) -> None:
    """Choose implementations: 'torch' or 'triton' for all primitives, {'sparse_attention': 'torch'}
    or 'sparse_attention=torch,...' per primitive, None to go back to the defaults (and `DSV4_OPS`)."""
    global _OVERRIDE
    if spec is None:
        _OVERRIDE = None
    else:
        _OVERRIDE = _parse_override(spec) if isinstance(spec, str) else dict(spec)
        for name, impl in _OVERRIDE.items():
            if name != "*" and impl not in PRIMITIVES[name].impls:
                raise ValueError(f"{name}: no implementation {impl!r} (available: {', '.join(PRIMITIVES[name].impls)})")
    for p in PRIMITIVES.values():
        p.chosen.clear()


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def describe_backends(devices=(("cpu", torch.float32), ("cuda", torch.bfloat16))) -> str:
    """The table: each primitive, its implementations and the one chosen per (device, dtype)."""
    head = ["primitive", "implementations"] + [f"{d}/{str(t).replace('torch.', '')}" for d, t in devices]
    rows = [[p.name, ", ".join(p.impls)] + [p.choose(d, p.operand_dtype(t)) for d, t in devices]
            for p in PRIMITIVES.values()]
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head)] + [fmt.format(*r) for r in rows]
    src = os.environ.get("DSV4_OPS")
    lines.append(f"(triton {'installed' if triton_available() else 'not installed'}"
                 f"{'; DSV4_OPS=' + src if src else ''})")
    return "\n".join(lines)


def backend_choices(device_type: str, dtype: torch.dtype | None = None) -> dict:
    """{primitive: implementation} on a device (for the run logs); dtype: bf16 on CUDA, else fp32."""
    dtype = dtype or (torch.bfloat16 if device_type == "cuda" else torch.float32)
    return {p.name: p.choose(device_type, p.operand_dtype(dtype)) for p in PRIMITIVES.values()}


def register(name: str, impls: dict, **kw) -> Primitive:
    PRIMITIVES[name] = p = Primitive(name, impls, **kw)
    return p


# ----------------------------------------------------------------------------- fp32 matmuls
@fp32_region
def linear_fp32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x · wᵀ in fp32, as the official code computes the compressor projections and the LM head.

    When both operands are bf16 on CUDA the products are exact in fp32, so a bf16 GEMM that accumulates
    and returns fp32 (`torch.mm(..., out_dtype=float32)`) computes the same function as upcasting both,
    on the tensor cores, without the fp32 copies; elsewhere both are upcast."""
    if x.is_cuda and x.dtype == w.dtype == torch.bfloat16 and _mm_out_dtype_works():
        if _needs_grad(x, w):
            return _LinearFp32Fn.apply(x, w)
        return torch.mm(x.reshape(-1, x.shape[-1]), w.t(), out_dtype=torch.float32).view(*x.shape[:-1], w.shape[0])
    return F.linear(up(x), up(w))


def rows_at(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for a small table [R, w] and many indices: the same values; with gradients, the
    table's gradient is one GEMM (one-hotᵀ · grad, deterministic) instead of the index gather's sorted
    scatter-add (~0.4 ms a call at 4K tokens × 2,048 on an H200). An fp32 GEMM, it follows the
    process's TF32 setting like any other (with TF32 on, the incoming gradient is rounded to TF32)."""
    if table.requires_grad and torch.is_grad_enabled():
        return _RowsAtFn.apply(table, index)
    return table[index]


class _RowsAtFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table, index):
        ctx.save_for_backward(index)
        ctx.rows = table.shape[0]
        return table[index]

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        hot = F.one_hot(index.reshape(-1), ctx.rows).to(grad.dtype)                   # [N, R]
        return hot.t() @ grad.reshape(hot.shape[0], -1), None


def dense_torch(x: torch.Tensor, w: torch.Tensor, fp32: bool = False) -> torch.Tensor:
    """x · wᵀ for a model projection: in x's dtype (w cast to it), or with fp32 output (`linear_fp32`).
    Twin of `dsv4.kernels.gemv.gemv`, which serves decode-sized x (at most two rows)."""
    return linear_fp32(x, w) if fp32 else F.linear(x, w.to(x.dtype))


def dense_triton(x: torch.Tensor, w: torch.Tensor, fp32: bool = False) -> torch.Tensor:
    from dsv4.kernels import gemv as kern
    if (x.numel() > kern.ROWS_MAX * x.shape[-1] or w.dtype != x.dtype or w.dim() != 2 or w.stride(-1) != 1
            or _needs_grad(x, w) or type(w.data) is not torch.Tensor):      # (a sharded DTensor: the twin)
        return dense_torch(x, w, fp32)
    return kern.gemv(x, w, torch.float32 if fp32 else x.dtype)


def grouped_dense_torch(x: torch.Tensor, w: torch.Tensor, groups: int) -> torch.Tensor:
    """x [..., G, K] through a grouped projection w [G·R, K] (block g of R rows reads x[..., g]) -> [..., G·R]
    in x's dtype. Twin of `dsv4.kernels.gemv.gemv(..., groups=G)`, which serves decode-sized x."""
    wg = w.to(x.dtype).view(groups, -1, x.shape[-1])                                 # [G, R, K]
    return torch.einsum("...gi,gri->...gr", x, wg).flatten(-2)


def grouped_dense_triton(x: torch.Tensor, w: torch.Tensor, groups: int) -> torch.Tensor:
    from dsv4.kernels import gemv as kern
    if (x.numel() > kern.ROWS_MAX * groups * x.shape[-1] or w.dtype != x.dtype or w.dim() != 2 or w.stride(-1) != 1
            or _needs_grad(x, w) or type(w.data) is not torch.Tensor):
        return grouped_dense_torch(x, w, groups)
    return kern.gemv(x, w, x.dtype, groups=groups)


class _LinearFp32Fn(torch.autograd.Function):
    """`linear_fp32` of bf16 operands with gradients, all three GEMMs on the tensor cores: the forward
    returns fp32 logits (exact products, fp32 accumulation); the backward rounds the incoming fp32
    gradient to bf16 once and accumulates in fp32 (cuBLAS), as any bf16 mixed-precision step does for
    its gradients (the upcast form ran these two GEMMs in fp32 SIMT, ~10x slower on an H200)."""
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return torch.mm(x.reshape(-1, x.shape[-1]), w.t(), out_dtype=torch.float32).view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1]).to(w.dtype)
        dx = (g2 @ w).view(x.shape) if ctx.needs_input_grad[0] else None
        dw = g2.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        return dx, dw


@functools.cache
def _mm_out_dtype_works() -> bool:
    a = torch.ones(16, 16, device="cuda", dtype=torch.bfloat16)
    try:
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        return False


# ----------------------------------------------------------------------------- mHC
@fp32_region
def hc_split_sinkhorn_torch(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, n: int,
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


@fp32_region
def hc_pre_torch(h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, n: int,
                 iters: int, eps: float, norm_eps: float, defer: bool = False):
    """Collapse N streams into one input and compute the mixes (spec §4.1). h [B, S, N, D].

    Returns x [B, S, D] (h's dtype), post [B, S, N], comb [B, S, N, N] (fp32). `defer` lets a backend
    hand post and comb to `hc_post` uncomputed (the kernels' decode form); this one computes them.
    """
    v = up(h.flatten(2))                                                   # [B, S, N·D]
    rho = torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + norm_eps)              # unweighted RMS over N·D
    mixes = F.linear(v, up(fn)) * rho                                      # [B, S, (2+N)·N]
    pre, post, comb = hc_split_sinkhorn(mixes, up(scale), up(base), n, iters, eps)
    x = (pre.unsqueeze(-1) * up(h)).sum(dim=2)                             # [B, S, D]
    return x.to(h.dtype), post, comb


@fp32_region
def hc_head_torch(h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, eps: float,
                  norm_eps: float) -> torch.Tensor:
    """Head-side reduction of the N streams (spec §4.3): sigmoid weights, no Sinkhorn. h [B, S, N, D]
    -> [B, S, D] in h's dtype."""
    v = up(h.flatten(2))
    rho = torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + norm_eps)
    pre = torch.sigmoid(F.linear(v, up(fn)) * rho * up(scale) + up(base)) + eps  # [B, S, N]
    return (pre.unsqueeze(-1) * up(h)).sum(dim=2).to(h.dtype)


def hc_head_triton(h, fn, scale, base, eps, norm_eps):
    """`hc_head` as hc_pre's two launches in their head form (inference; with gradients, the twin)."""
    n = h.shape[-2]
    if not _pow2(n) or _needs_grad(h, fn, scale, base):
        return hc_head_torch(h, fn, scale, base, eps, norm_eps)
    from dsv4.kernels import mhc
    return mhc.hc_pre(h, fn, scale, base, n, 1, eps, norm_eps, head=True)


@fp32_region
def hc_post_torch(f: torch.Tensor, residual: torch.Tensor, post, comb, add: torch.Tensor | None = None) -> torch.Tensor:
    """h'_k = post_k · f + Σ_j comb[j, k] · h_j in fp32 (spec §4.2). -> [B, S, N, D]. post may be hc_pre's
    deferred form (`dsv4.kernels.mhc.PendingMix`, comb None): computed here first. `add`: f + add in
    f's dtype takes f's place (the MoE's routed and shared outputs)."""
    if comb is None:
        if not hasattr(post, "resolve"):
            raise ValueError("hc_post: comb is None but post is not hc_pre's deferred form (a PendingMix); pass "
                             "both post and comb, or hc_pre(..., defer=True)'s (post, None)")
        post, comb = post.resolve()
    if add is not None:
        f = f + add
    mixed = torch.einsum("bsjk,bsjd->bskd", comb, up(residual))            # [B, S, N, D]
    return (post.unsqueeze(-1) * up(f).unsqueeze(2) + mixed).to(residual.dtype)


# ----------------------------------------------------------------------------- norms and RoPE
class Rope:
    """The rotation of a call's rows (spec §5.2): token positions pos [B, S] (int) times `stride`, angles
    (pos · stride) · freqs [Dr/2]. Kept as positions so that a kernel computes cos/sin where it applies
    them (a decode step builds no angle tensors); the PyTorch form computes them once per object and
    dtype (`cos_sin`), shared by the rotations that use this object. `inverse()` de-rotates."""
    __slots__ = ("pos", "freqs", "stride", "sign", "_memo")

    def __init__(self, pos: torch.Tensor, freqs: torch.Tensor, stride: int = 1, sign: float = 1.0,
                 memo: dict | None = None):
        self.pos, self.freqs, self.stride, self.sign = pos, freqs, stride, sign
        self._memo = {} if memo is None else memo

    @property
    def pairs(self) -> int:
        return self.freqs.shape[-1]

    def cos_sin(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, S, Dr/2] in acc_dtype(dtype) (sin negated for an inverse)."""
        dt = acc_dtype(dtype)
        if dt not in self._memo:
            pos = self.pos * self.stride if self.stride != 1 else self.pos
            angles = pos.to(dt).unsqueeze(-1) * self.freqs.to(device=pos.device, dtype=dt)   # [.., Dr/2]
            self._memo[dt] = (angles.cos(), angles.sin())
        c, s = self._memo[dt]
        return (c, s) if self.sign > 0 else (c, -s)

    def inverse(self) -> "Rope":
        return Rope(self.pos, self.freqs, self.stride, -self.sign, self._memo)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of the last Dr dims of x (spec §5.2); fp32 math.

    x [B, S, Dh] or [B, S, H, Dh]; cos/sin [B, S, Dr/2]. Pass −sin for the output de-rotation.
    """
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    rd = 2 * cos.shape[-1]
    nope, rope = x[..., :-rd], up(x[..., -rd:]).unflatten(-1, (-1, 2))
    a, b = rope[..., 0], rope[..., 1]
    rot = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    return torch.cat([nope, rot.to(x.dtype)], dim=-1)


@fp32_region
def norm_rope_torch(x: torch.Tensor, weight: torch.Tensor | None, eps: float | None,
                    rope: Rope | None) -> torch.Tensor:
    """RMSNorm of each row of x (spec §10; eps None: none; weight None: unweighted, as the per-head query
    norm), cast back to x's dtype, then RoPE on the last Dr dims (rope None: none). x [B, S, (H,) Dh]."""
    if eps is not None:
        xf = up(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        x = (y if weight is None else y * up(weight)).to(x.dtype)
    return x if rope is None else apply_rope(x, *rope.cos_sin(x.dtype))


# ----------------------------------------------------------------------------- compressor
@fp32_region
def compress_windows_torch(kv: torch.Tensor, score: torch.Tensor, slots: torch.Tensor,
                           overlap: bool) -> torch.Tensor:
    """Softmax-gated pooling of token projections into compressed entries (spec §6, eqs 9–12, 20–23).

    kv, score [B, L, w] fp32: raw projections and gate scores (with `ape`) of L source tokens.
    slots [B, n, J] int: the source token of each slot of each entry, −1 = empty (zero weight).
    Overlapping (J = 2M, w = 2c): slots [0, M) read features [0, c) (the previous window), slots
    [M, 2M) read [c, 2c) (the entry's own window). Otherwise J = M and c = w.
    The softmax over the J slots runs per channel. Returns [B, n, c] fp32; an entry with no slot is 0.
    """
    B, L, w = kv.shape
    n, J = slots.shape[1:]
    empty = (slots < 0).unsqueeze(-1)                                             # [B, n, J, 1]
    flat = slots.clamp(min=0).flatten(1).unsqueeze(-1)                            # [B, n·J, 1]
    if overlap:
        c, m = w // 2, J // 2
        def pick(t):                                                              # [B, n, J, c]
            prev = torch.gather(t[..., :c], 1, flat.expand(-1, -1, c)).view(B, n, J, c)[:, :, :m]
            own = torch.gather(t[..., c:], 1, flat.expand(-1, -1, c)).view(B, n, J, c)[:, :, m:]
            return torch.cat([prev, own], dim=2)
    else:
        def pick(t):
            return torch.gather(t, 1, flat.expand(-1, -1, w)).view(B, n, J, w)
    g_kv, g_sc = pick(up(kv)), pick(up(score))
    g_sc = g_sc.masked_fill(empty, NEG_INF)
    none = (slots < 0).all(-1)[..., None, None]                                   # [B, n, 1, 1]
    wts = torch.softmax(g_sc.masked_fill(none, 0.0), dim=2)                       # [B, n, J, c]
    return (wts * g_kv.masked_fill(empty, 0.0)).sum(dim=2)


# ----------------------------------------------------------------------------- indexer
def _rows_flat(t: torch.Tensor, rows: torch.Tensor | None, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` [B2, C, d] flattened to [B2·C, d] and each query row's base offset [B] (rows: t's row per
    query row; None = the same row)."""
    r = torch.arange(B, device=t.device) if rows is None else rows
    return t.reshape(-1, t.shape[-1]), r * t.shape[1]


@fp32_region
def index_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor,
                       k_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Lightning-indexer scores I[t, s] = Σ_h w[t, h] · ReLU(q[t, h] · k[s]) (spec §7, eq. 16).

    q [B, S, Hi, Di]; k [B2, C, Di] (row k_rows[b] for query row b; None: b); w [B, S, Hi] (already
    scaled). fp32. Returns [B, S, C].
    """
    if k_rows is not None:
        k = k.index_select(0, k_rows)
    dots = torch.einsum("bshd,bcd->bshc", up(q), up(k))                 # [B, S, Hi, C]
    return torch.einsum("bshc,bsh->bsc", F.relu(dots), up(w))               # [B, S, C]


def index_topk_torch(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                     topk: int, k_rows: torch.Tensor | None = None) -> torch.Tensor:
    """The indexer's choice (spec §7 step 5): for each query, the top-`topk` entries by index score
    among its visible entries s ∈ [lo, hi) of its row of k. Returns idx [B, S, P] int32, P = min(topk, C),
    −1 where fewer than P entries are visible. Shapes as `index_scores`; lo, hi [B, S]."""
    B, S, Hi, _ = q.shape
    C = k.shape[1]
    chunk = max(1, GATHER_BUDGET // max(1, B * Hi * C))      # bounds the [B, Sc, Hi, C] dot products
    s = torch.arange(C, device=q.device)
    out = []
    for s0 in range(0, S, chunk):
        sl = slice(s0, s0 + chunk)
        scores = index_scores(q[:, sl], k, w[:, sl], k_rows)                      # [B, Sc, C]
        visible = (s >= lo[:, sl].unsqueeze(-1)) & (s < hi[:, sl].unsqueeze(-1))  # [B, Sc, C]
        out.append(topk_lowest(scores.masked_fill(~visible, NEG_INF), topk))
    return torch.cat(out, dim=1)


def index_topk_decode_torch(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, w_scale: float, pos: torch.Tensor,
                            ratio: int, topk: int, k_rows: torch.Tensor | None = None) -> torch.Tensor:
    """`index_topk` of a decode step's queries at positions pos [B, S]: head weights w · w_scale in fp32
    (w as `weights_proj` gives it), entries [0, min((p + 1) // ratio, C)) visible. One launch less per
    derived tensor in the kernel form (`index_topk_decode_triton` computes the range and the weights'
    scaling where it reads them)."""
    hi = torch.clamp((pos + 1) // ratio, max=k.shape[1])
    return index_topk_torch(q, k, up(w) * w_scale, torch.zeros_like(pos), hi, topk, k_rows)


def topk_lowest(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """idx [..., P] int32, P = min(topk, C): the P largest of each row of scores [..., C] in increasing
    index order, ties at the P-th value taken by lowest index; −1 (at the end) for masked (NEG_INF)
    entries. The radix-select kernel's choice: `torch.topk` alone picks among equal values in no
    specified order, and with the indexer's ReLU equal (zero) scores at the threshold are common, so
    the twin and the kernel would otherwise choose different keys for the same scores."""
    C = scores.shape[-1]
    P = min(topk, C)
    if P == 0:
        return torch.empty(*scores.shape[:-1], 0, dtype=torch.int32, device=scores.device)
    thr = scores.topk(P, dim=-1).values[..., -1:]                                  # the P-th largest
    above, at = scores > thr, scores == thr
    chosen = (above | (at & (at.cumsum(-1) <= P - above.sum(-1, keepdim=True)))) & (scores > NEG_INF)
    key = torch.where(chosen, C - torch.arange(C, device=scores.device), 0)     # lower index: larger key
    top = key.topk(P, dim=-1).values
    return torch.where(top > 0, C - top, -1).to(torch.int32)


@fp32_region
def index_scores_at(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Index scores of listed entries only: [B, S, P] for idx [B, S, P] (−1 gives −inf). Differentiable
    (the index loss trains the indexer through it); k [B, C, Di]."""
    B, S, P = idx.shape
    kf, base = _rows_flat(k, None, B)
    keys = kf.index_select(0, (idx.clamp(min=0).long() + base.view(B, 1, 1)).flatten()).view(B, S, P, -1)
    dots = torch.einsum("bshd,bspd->bshp", up(q), up(keys))                       # [B, S, Hi, P]
    scores = torch.einsum("bshp,bsh->bsp", F.relu(dots), up(w))                    # [B, S, P]
    return scores.masked_fill(idx < 0, NEG_INF)


# ----------------------------------------------------------------------------- attention
GATHER_BUDGET = 1 << 22   # elements of the twin's largest gathered-keys tensor per query chunk


# ----------------------------------------------------------------------------- FP8 KV storage
# Compressed entries kept in FP8 (`DecodeCache(..., kv_fp8=True)`; spec §11.3, TR §2.3.4: "RoPE dims BF16,
# rest FP8"): the first c − r "nope" dims as e4m3 with one power-of-two scale per block of 64 (what the
# official inference quantises-dequantises them to: scale 2^⌈log2(amax/448)⌉, amax floored at 1e-4), the
# last r (rope) dims in the model dtype. One row of bytes per entry:
#   [nope e4m3 codes | one e8m0 scale byte per 64 dims | pad to 16 | rope dims (model dtype) | pad to 16]
# 592 bytes for Dh 512 (448 + 7 scales, 64 bf16 rope dims) against 1,024 in bf16.
KV8_BLOCK = 64


def _align16(n: int) -> int:
    return -(-n // 16) * 16


def kv8_layout(width: int, rope_dim: int, dtype: torch.dtype | int) -> tuple[int, int, int]:
    """(scale byte offset, rope byte offset, row bytes) of an FP8 entry row of `width` dims whose rope
    dims are in `dtype` (or that many bytes each)."""
    nope = width - rope_dim
    if nope <= 0 or nope % KV8_BLOCK:
        raise ValueError(f"FP8 KV storage needs head_dim - rope dims ({width} - {rope_dim} = {nope}) to be a "
                         f"positive multiple of {KV8_BLOCK}; keep the cache in the model dtype (`--kv-cache model`, kv_fp8=False)")
    off_rope = _align16(nope + nope // KV8_BLOCK)
    es = dtype if isinstance(dtype, int) else torch.empty((), dtype=dtype).element_size()
    return nope, off_rope, _align16(off_rope + rope_dim * es)


def _log2_ceil(v: torch.Tensor) -> torch.Tensor:
    """⌈log2 v⌉ of positive normal fp32 values, exactly, from the bits (the official kernels' way; a
    rounded log2 can land on the integer below)."""
    bits = v.float().view(torch.int32)
    return (((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).int()).float()


def kv8_quant(x: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """Entries x [..., c] (model dtype) -> their FP8 rows [..., row bytes] uint8 (layout above)."""
    c = x.shape[-1]
    off_sc, off_rope, row = kv8_layout(c, rope_dim, x.dtype)
    nope = c - rope_dim
    blocks = x[..., :nope].float().unflatten(-1, (nope // KV8_BLOCK, KV8_BLOCK))
    amax = blocks.abs().amax(-1, keepdim=True).clamp_min(1e-4)
    e = _log2_ceil(amax / 448.0)                                                  # power-of-two scale 2^e
    codes = (blocks * torch.exp2(-e)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)
    out = torch.zeros(*x.shape[:-1], row, dtype=torch.uint8, device=x.device)
    out[..., :nope] = codes.flatten(-2)
    out[..., off_sc:off_sc + nope // KV8_BLOCK] = (e.squeeze(-1) + 127).to(torch.uint8)
    rope = x[..., nope:].contiguous()
    out[..., off_rope:off_rope + rope.shape[-1] * rope.element_size()] = rope.view(torch.uint8)
    return out


def kv8_dequant(rows: torch.Tensor, width: int, rope_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """FP8 rows [..., row bytes] -> entries [..., width] in dtype (exact: e4m3 times a power of two fits
    bf16 and fp32)."""
    off_sc, off_rope, _ = kv8_layout(width, rope_dim, dtype)
    nope = width - rope_dim
    codes = rows[..., :nope].contiguous().view(torch.float8_e4m3fn).float()
    scale = torch.exp2(rows[..., off_sc:off_sc + nope // KV8_BLOCK].float() - 127.0)
    vals = (codes.unflatten(-1, (nope // KV8_BLOCK, KV8_BLOCK)) * scale.unsqueeze(-1)).flatten(-2)
    es = torch.empty((), dtype=dtype).element_size()
    rope = rows[..., off_rope:off_rope + rope_dim * es].contiguous().view(dtype)
    return torch.cat([vals.to(dtype), rope], dim=-1)


class KV8:
    """Compressed entries in FP8 rows, as the attention reads them: data [B2, T2, row bytes] uint8 (a
    cache buffer, read in place), `width` dims per entry of which the last `rope_dim` are stored in
    `dtype`. `shape` is that of the entries it holds, [B2, T2, width]."""
    __slots__ = ("data", "width", "rope_dim", "dtype")

    def __init__(self, data: torch.Tensor, width: int, rope_dim: int, dtype: torch.dtype):
        self.data, self.width, self.rope_dim, self.dtype = data, width, rope_dim, dtype

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.data.shape[:-1], self.width)

    def dequant(self) -> torch.Tensor:
        return kv8_dequant(self.data, self.width, self.rope_dim, self.dtype)


def gather_keys(kv: torch.Tensor, idx: torch.Tensor, kv2: torch.Tensor | None = None,
                rows2: torch.Tensor | None = None, rows1: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of the two key sources listed by idx [B, S, K] (j < T: kv[b, j], or kv[rows1[b], j] with rows1;
    j ≥ T: kv2[rows2[b], j − T]; −1 gives row 0, to be masked by the caller; kv2 may be a `KV8`).
    -> [B, S, K, Dh]."""
    B, (_, T, D) = idx.shape[0], kv.shape
    j = idx.long().clamp(min=0)
    flat_a, base_a = _rows_flat(kv, rows1, B)
    out = flat_a.index_select(0, (j.clamp(max=T - 1) + base_a.view(B, 1, 1)).flatten())
    if kv2 is not None and kv2.shape[1] > 0:
        src = kv2.data if isinstance(kv2, KV8) else kv2
        flat_b, base_b = _rows_flat(src, rows2, B)
        second = flat_b.index_select(0, ((j - T).clamp(0, kv2.shape[1] - 1) + base_b.view(B, 1, 1)).flatten())
        if isinstance(kv2, KV8):                       # FP8 rows: dequantised after the gather
            second = kv8_dequant(second, kv2.width, kv2.rope_dim, kv2.dtype)
        out = torch.where((j >= T).flatten().unsqueeze(-1), second.to(out.dtype), out)
    return out.view(*idx.shape, D)


@fp32_region
def sparse_attention_torch(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor,
                           scale: float, kv2: torch.Tensor | None = None, rows2: torch.Tensor | None = None,
                           return_lse: bool = False, rows1: torch.Tensor | None = None):
    """Attention of each query over its own key list, one shared K=V head, per-head sink (spec §5.1.5,
    §11.4: the official `sparse_attn`).

    q [B, S, H, Dh]; keys from two sources: kv [B, T, Dh] (the window part) and optionally kv2
    [B2, T2, Dh] with rows2 [B] (the compressed entries, read in place: a decode step must not copy the
    cache); idx [B, S, K] int lists key j of query (b, s): j < T reads kv[b, j], T ≤ j reads
    kv2[rows2[b], j − T], −1 is no key. sink [H] fp32, not scaled. Scores and softmax in fp32:
    o_h = Σ_j exp(z_hj) k_j / (Σ_j exp(z_hj) + exp(sink_h)), z_hj = scale · q_h · k_j. A query with no
    key gives 0. With return_lse, also lse [B, S, H] fp32 = log(Σ_j exp(z_hj) + exp(sink_h)). With
    rows1 [B], kv [Bmax, T, Dh] is read at row rows1[b] too (a decode step's window ring, in place).
    """
    B, S, H, D = q.shape
    K = idx.shape[-1]
    chunk = max(1, GATHER_BUDGET // max(1, B * K * max(D, H)))
    outs, lses = [], []
    sink_l = up(sink).view(1, 1, H, 1)
    for s0 in range(0, S, chunk):
        ix = idx[:, s0:s0 + chunk]                                                # [B, Sc, K]
        keys = up(gather_keys(kv, ix, kv2, rows2, rows1))                         # [B, Sc, K, Dh]
        z = torch.einsum("bshd,bskd->bshk", up(q[:, s0:s0 + chunk]), keys) * scale  # [B, Sc, H, K]
        z = z.masked_fill((ix < 0).unsqueeze(2), NEG_INF)
        lse = torch.logsumexp(torch.cat([z, sink_l.expand(*z.shape[:3], 1)], dim=-1), dim=-1)  # [B, Sc, H]
        p = torch.exp(z - lse.unsqueeze(-1))                                      # [B, Sc, H, K]
        outs.append(torch.einsum("bshk,bskd->bshd", p, keys))
        lses.append(lse)
    out = torch.cat(outs, dim=1).to(q.dtype)
    return (out, torch.cat(lses, dim=1)) if return_lse else out


# ----------------------------------------------------------------------------- MoE
@fp32_region
def swiglu(g: torch.Tensor, u: torch.Tensor, limit: float) -> torch.Tensor:
    """Clamped SwiGLU in fp32 (spec §8.4): up ∈ [−limit, limit], gate ≤ limit (no lower clamp)."""
    g, u = up(g), up(u)
    if limit > 0:
        u = u.clamp(-limit, limit)
        g = g.clamp(max=limit)
    return F.silu(g) * u


def compressor_step_torch(state_kv: torch.Tensor, state_sc: torch.Tensor, rows: torch.Tensor, kv: torch.Tensor,
                          gate: torch.Tensor, ape: torch.Tensor, pos: torch.Tensor, ratio: int,
                          overlap: bool) -> torch.Tensor:
    """One token per row into a compressor's state (the decode step), in place; returns the pooled entry
    [B, 1, c] of the window the token completes (where pos ≡ M − 1 (mod M); zeros in other rows).

    state_kv, state_sc [Bmax, J, w] (J = (1+o)·M: the previous window's slots when windows overlap, then
    the current window's slot t mod M holding the last token fed at such a t); rows [B]; kv, gate
    [B, 1, w] (projections; the token's score is gate + ape[pos mod M], ape [M, w]); pos [B]. The token
    goes to slot o·M + pos mod M; the window is pooled over the slots as they then stand; a completed
    window becomes the previous one when overlapping. Twin of `dsv4.kernels.compressor.decode_step`."""
    m, o = ratio, int(overlap)
    J = (1 + o) * m
    rem = pos % m                                                                 # [B]
    score = gate + up(ape)[rem].unsqueeze(1)                                      # [B, 1, w]
    j = torch.arange(J, device=pos.device)
    hit = (j == (o * m + rem).unsqueeze(1)).unsqueeze(-1)                          # [B, J, 1]
    src_kv = torch.where(hit, kv, state_kv[rows])                                  # [B, J, w]
    src_sc = torch.where(hit, score, state_sc[rows])
    pooled = compress_windows(src_kv, src_sc, j.expand(len(pos), 1, J), overlap)  # [B, 1, c]
    done = (rem == m - 1).view(-1, 1, 1)
    pooled = torch.where(done, pooled, 0.0)
    if o:
        src_kv = torch.cat([torch.where(done, src_kv[:, m:], src_kv[:, :m]), src_kv[:, m:]], dim=1)
        src_sc = torch.cat([torch.where(done, src_sc[:, m:], src_sc[:, :m]), src_sc[:, m:]], dim=1)
    state_kv[rows], state_sc[rows] = src_kv, src_sc
    return pooled


def compressor_step_triton(state_kv, state_sc, rows, kv, gate, ape, pos, ratio, overlap):
    J = state_kv.shape[1]
    if _needs_grad(kv, gate) or J & (J - 1) or state_kv.stride(-1) != 1 or state_sc.stride() != state_kv.stride():
        return compressor_step_torch(state_kv, state_sc, rows, kv, gate, ape, pos, ratio, overlap)
    from dsv4.kernels import compressor as kern
    return kern.decode_step(state_kv, state_sc, rows, kv, gate, ape, pos, ratio, overlap)


@fp32_region
def route_torch(logits: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor | None,
                hash_table: torch.Tensor | None, topk: int, score_func: str, norm_topk: bool,
                route_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The router after its logits [N, E] fp32 (spec §8): affinities s (sqrt-softplus, sigmoid or
    softmax), the experts: top-k of s + bias (the bias only selects), or hash_table[ids] [N, K] for hash
    layers; weights s at those experts, normalised over them when norm_topk, times route_scale.
    -> (weights [N, K] fp32, indices [N, K], affinities [N, E] fp32). Twin of `dsv4.kernels.router.route`."""
    if score_func == "sqrtsoftplus":
        scores = F.softplus(logits).sqrt()
    elif score_func == "sigmoid":
        scores = logits.sigmoid()
    else:
        scores = logits.softmax(dim=-1)
    if hash_table is not None:
        idx = hash_table[ids]                                                     # [N, K]
    else:
        idx = (scores.detach() + bias).topk(topk, dim=-1).indices
    w = scores.gather(1, idx)                                                     # [N, K]
    if norm_topk:
        w = w / w.sum(dim=-1, keepdim=True)
    return w * route_scale, idx, scores


def route_triton(logits, bias, ids, hash_table, topk, score_func, norm_topk, route_scale):
    if _needs_grad(logits) or logits.shape[-1] > 1024 or topk > 16:
        return route_torch(logits, bias, ids, hash_table, topk, score_func, norm_topk, route_scale)
    from dsv4.kernels import router as kern
    return kern.route(logits, bias, ids, hash_table, topk, score_func, norm_topk, route_scale)


def compressor_entry_torch(entries: torch.Tensor, rows: torch.Tensor, pooled: torch.Tensor, pos: torch.Tensor,
                           ratio: int, weight: torch.Tensor, eps: float, freqs: torch.Tensor,
                           kv8_dtype: torch.dtype | None = None) -> None:
    """The entry of the window that position pos [B] completes (pos ≡ ratio − 1), written in place to
    entries [Bmax, Cmax, c] at row rows [B], index pos // ratio (clamped to the buffer): the pooled
    value [B, 1, c] (fp32, `compressor_step`'s) cast to the entries' dtype, RMS-normalised with weight and
    roped at position (pos // ratio)·ratio, as `Compressor.finish`; rows whose window is not complete
    keep what they hold. With kv8_dtype the entries are FP8 rows [Bmax, Cmax, bytes] uint8 (a `kv_fp8`
    cache): the entry is finished in that dtype, then `kv8_quant` (rope dims 2·freqs' length). Twin of
    `dsv4.kernels.compressor.write_entry`."""
    n_max = entries.shape[1]
    if not n_max:
        return
    index = (pos // ratio).unsqueeze(1)                                           # [B, 1]
    ent = norm_rope_torch(pooled.to(kv8_dtype or entries.dtype), weight, eps, Rope(index, freqs, ratio))
    if kv8_dtype is not None:
        ent = kv8_quant(ent, 2 * freqs.shape[-1])
    done = (pos % ratio == ratio - 1).view(-1, 1, 1)                              # [B, 1, 1]
    r, at = rows.unsqueeze(1), index.clamp(max=n_max - 1)
    entries[r, at] = torch.where(done, ent, entries[r, at])


def compressor_entry_triton(entries, rows, pooled, pos, ratio, weight, eps, freqs, kv8_dtype=None):
    c, dr2 = pooled.shape[-1], freqs.shape[-1]
    if (_needs_grad(pooled) or not _pow2(c) or not _pow2(dr2) or 2 * dr2 > c or entries.stride(-1) != 1
            or (kv8_dtype is not None and c < 64)):
        return compressor_entry_torch(entries, rows, pooled, pos, ratio, weight, eps, freqs, kv8_dtype)
    from dsv4.kernels import compressor as kern
    kern.write_entry(entries, rows, pooled, pos, ratio, weight, eps, freqs, kv8_dtype=kv8_dtype)


def decode_key_lists_torch(pos: torch.Tensor, window: int, ratio: int, n_comp: int, t_window: int,
                           cidx: torch.Tensor | None, ring: torch.Tensor | None = None,
                           rows: torch.Tensor | None = None, kv: torch.Tensor | None = None) -> torch.Tensor:
    """Key lists of a one-token decode step: pos [B]; keys are [ring of `window` | the new key | entries]
    (entries from `t_window` on); cidx [B, K] the indexer's entries (−1 padded) or None for every visible
    entry s < min((pos + 1) // ratio, n_comp). -> idx [B, 1, W + K] int32, −1 = none: `key_lists_torch`
    for one cached query per row. With ring [Bmax, W, Dh], rows [B] and kv [B, Dh] (the new keys): kv[b]
    is first written to ring slot pos[b] mod W of row rows[b], so the window is all in the ring (keys
    [ring | entries], t_window = W) and the attention reads the ring in place. Twin of
    `dsv4.kernels.key_lists.decode_key_lists`."""
    B = pos.shape[0]
    if ring is None:
        return key_lists_torch(pos.view(B, 1), None, None, 0, 1, window, ratio, n_comp, t_window,
                               None if cidx is None else cidx.view(B, 1, -1), True)
    if rows is None or kv is None:
        raise ValueError("decode_key_lists: with the ring given, pass the cache rows and the new keys too")
    W = window
    ring[rows, torch.remainder(pos, W)] = kv.reshape(B, -1).to(ring.dtype)
    kpos = pos.view(B, 1) - (W - 1) + torch.arange(W, device=pos.device)                # [B, W]
    widx = torch.where(kpos >= 0, torch.remainder(kpos, W), -1)
    if not ratio:
        return widx.view(B, 1, W).to(torch.int32)
    if cidx is None:
        cidx = dense_entries(torch.zeros_like(pos.view(B, 1)), pos.view(B, 1), ratio, n_comp)
    ent = torch.where(cidx >= 0, cidx + t_window, -1).view(B, 1, -1)
    return torch.cat([widx.view(B, 1, W), ent], dim=-1).to(torch.int32)


def key_lists_torch(pos: torch.Tensor, seg: torch.Tensor | None, first: torch.Tensor | None, s0: int, s1: int,
                    window: int, ratio: int, n_comp: int, t_window: int, cidx: torch.Tensor | None,
                    cached: bool) -> torch.Tensor:
    """Key lists of queries s0..s1−1 of a call (a training or prefill forward): idx [B, Sc, W + Kc] int32
    into [window keys | entries] (entries offset by t_window), −1 = none. pos [B, S] positions, seg
    [B, S] documents or None, first [B, S] each token's first entry of its document (or None: 0).
    Window part: `cached`: keys are ring slot t mod W for positions before the call (pos[:, 0]), then
    the call's tokens (W + t − pos[:, 0]); else the call's tokens j within W positions and in the same
    document. Entry part (ratio > 0): the indexer's entries cidx [B, Sc, K] (−1 padded), or every entry
    lo ≤ s < min(lo + (p+1) // ratio, n_comp), lo = first. What `Attention._indices` needs; twin of
    `dsv4.kernels.key_lists.key_lists`."""
    W, m = window, ratio
    dev = pos.device
    qpos = pos[:, s0:s1]                                                          # [B, Sc]
    w = torch.arange(W, device=dev)
    if cached:
        kpos = qpos.unsqueeze(-1) - (W - 1) + w                                   # [B, Sc, W]
        p0 = pos[:, :1, None]
        j = torch.where(kpos < p0, torch.remainder(kpos, W), W + kpos - p0)
        widx = torch.where(kpos >= 0, j, -1)
    else:
        j = torch.arange(s0, s1, device=dev).unsqueeze(-1) - (W - 1) + w          # [Sc, W]
        jc = j.clamp(min=0).expand(pos.shape[0], -1, -1)                           # [B, Sc, W]
        d = qpos.unsqueeze(-1) - pos.gather(1, jc.flatten(1)).view_as(jc)
        ok = (j >= 0) & (d >= 0) & (d < W)
        if seg is not None:
            ok &= seg.gather(1, jc.flatten(1)).view_as(jc) == seg[:, s0:s1].unsqueeze(-1)
        widx = torch.where(ok, j, -1)
    if not m:
        return widx.to(torch.int32)
    if cidx is None:
        lo = first[:, s0:s1] if first is not None else torch.zeros_like(qpos)     # [B, Sc]
        cidx = dense_entries(lo, qpos, m, n_comp)
    return torch.cat([widx, torch.where(cidx >= 0, cidx + t_window, -1)], dim=-1).to(torch.int32)


def dense_entries(lo: torch.Tensor, qpos: torch.Tensor, ratio: int, n_comp: int) -> torch.Tensor:
    """Every visible entry of each query as a list [B, Sc, n_comp]: s where lo ≤ s < min(lo + (p+1) //
    ratio, n_comp), else −1 (HCA, and CSA's dense phase)."""
    hi = torch.clamp(lo + (qpos + 1) // ratio, max=n_comp)
    s = torch.arange(n_comp, device=qpos.device)
    return torch.where((s >= lo.unsqueeze(-1)) & (s < hi.unsqueeze(-1)), s, -1)


def key_lists_triton(pos, seg, first, s0, s1, window, ratio, n_comp, t_window, cidx, cached):
    from dsv4.kernels import key_lists as kern
    return kern.key_lists(pos, seg, first, s0, s1, window, ratio, n_comp, t_window, cidx, cached)


def decode_key_lists_triton(pos, window, ratio, n_comp, t_window, cidx, ring=None, rows=None, kv=None):
    from dsv4.kernels import key_lists as kern
    return kern.decode_key_lists(pos, window, ratio, n_comp, t_window, cidx, ring, rows, kv)


def swiglu_act_torch(g: torch.Tensor, u: torch.Tensor, limit: float, weight: torch.Tensor | None = None,
                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The expert activation as the callers use it: `swiglu` (fp32), times the per-row routing weight
    [rows] when given, cast to `out_dtype` when given. Twin of `dsv4.kernels.swiglu`."""
    h = swiglu(g, u, limit)
    if weight is not None:
        h = h * weight.reshape(-1, 1)
    return h if out_dtype is None else h.to(out_dtype)


def swiglu_act_triton(g, u, limit, weight=None, out_dtype=None):
    if g.shape != u.shape or g.dtype == torch.float64 or not g.numel() or g.dtype != u.dtype:
        return swiglu_act_torch(g, u, limit, weight, out_dtype)
    from dsv4.kernels import swiglu as kern
    if _needs_grad(g, u, weight):
        if weight is not None and weight.dtype != torch.float32:
            return swiglu_act_torch(g, u, limit, weight, out_dtype)
        return kern.SwigluFn.apply(g, u, weight, limit, out_dtype)
    return kern.swiglu(g, u, limit, weight, out_dtype)


def moe_experts_auto(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, w1: torch.Tensor,
                w2: torch.Tensor, w3: torch.Tensor, limit: float) -> torch.Tensor:
    """Routed experts: y_t = Σ_k W2[e_k] · (weight_tk · SwiGLU(W1[e_k] x_t, W3[e_k] x_t)) (spec §8.4–8.5).

    x [N, D]; idx [N, K] expert ids, all in [0, E) (not checked: a check would need the host);
    weight [N, K] fp32; w1, w3 [E, I, D]; w2 [E, D, I]. Numeric policy of the official code: matmuls
    in the model dtype (the autocast dtype inside `torch.autocast`), SwiGLU and the routing weight in
    fp32 (the weight multiplies the SwiGLU output before `w2`), each expert's output cast to the dtype
    of `x` and summed per token in it. A token listing the same expert twice gets both contributions.

    Three implementations compute this; the 'torch' entry of the table (this function) lets `moe_path`
    pick one from shapes, dtypes and the device, never from tensor values (`DSV4_OPS=moe_experts=loop`
    forces one):
      'grouped'  `moe_experts_grouped`: pairs sorted by expert, three `torch._grouped_mm`; no host sync,
                 a fixed number of kernels whatever E. Where grouped_mm has a sync-free kernel.
      'gather'   `moe_experts_gather`: a bmm per (token, expert) pair on gathered expert matrices; no
                 host sync, any dtype (float64 test models), but it copies N·K expert matrices, so it
                 runs when N·K ≤ E (decode) or when no sync is allowed (CUDA-graph capture, compile).
      'loop'     `moe_experts_loop`, the reference: one matmul per expert with tokens, one host sync.
    """
    if idx.numel() == 0:
        return torch.zeros_like(x)
    path = moe_path(x, idx, w1, w2, w3)
    impl = {"grouped": moe_experts_grouped, "gather": moe_experts_gather, "loop": moe_experts_loop}[path]
    return impl(x, idx, weight, w1, w2, w3, limit)


# a decode step's few (token, expert) pairs: two GEMV launches (`kernels/moe_gemv.py`) instead of the
# sort / grouped-GEMM bookkeeping (~14 launches); each pair reads its expert, so only up to this many
GEMV_MAX_PAIRS = 64


def moe_experts_triton(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, w1: torch.Tensor,
                       w2: torch.Tensor, w3: torch.Tensor, limit: float) -> torch.Tensor:
    """`moe_experts` through the expert GEMV kernels for a few pairs without gradients (model-dtype
    weights with a contiguous last dim), else `moe_experts_auto`."""
    if (x.dim() == 2 and 0 < idx.numel() <= min(GEMV_MAX_PAIRS, w1.shape[0])
            and not _needs_grad(x, weight, w1, w2, w3) and not torch.is_autocast_enabled(x.device.type)
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and w1.dtype == w2.dtype == w3.dtype == x.dtype
            and w1.stride(-1) == w2.stride(-1) == 1 and w1.stride() == w3.stride()):
        from dsv4.kernels import moe_gemv
        return moe_gemv.experts_gemv(x, idx, weight, w1, w2, w3, limit)
    return moe_experts_auto(x, idx, weight, w1, w2, w3, limit)


def moe_path(x: torch.Tensor, idx: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
             w3: torch.Tensor) -> str:
    """The implementation `moe_experts_auto` runs for these operands: 'grouped', 'gather' or 'loop'."""
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


class _TakeRows(torch.autograd.Function):
    """x.index_select(0, index) where `inverse` inverts the selection: index is a permutation of x's rows
    (k = 1), or each row of x is taken k times (index = order // k for a permutation `order` of the
    k·rows copies, inverse its inverse). The gradient is then a gather and a sum over the k copies, not
    index_select's scatter-add into zeros (atomics; ~100 µs a call at 4K tokens × 2,048 on an H200)."""
    @staticmethod
    def forward(ctx, x, index, inverse, k):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (inverse,) = ctx.saved_tensors
        g = g.index_select(0, inverse)
        if ctx.k > 1:
            g = g.view(-1, ctx.k, *g.shape[1:]).sum(1)
        return g, None, None, None


def take_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, k: int = 1) -> torch.Tensor:
    """`x.index_select(0, index)` with `_TakeRows`' gradient when x needs one (see there for `inverse`, k)."""
    if _needs_grad(x):
        return _TakeRows.apply(x, index, inverse, k)
    return x.index_select(0, index)


class _SumPairs(torch.autograd.Function):
    """y[t] = Σ_k out[back[t·K + k]]: the pair outputs (in expert order) back in token order and summed per
    token. The gradient of a pair is its token's: one gather (grad[token]), where autograd of index_select,
    view and sum would materialise the expanded [N, K, D] gradient and scatter it."""
    @staticmethod
    def forward(ctx, out, back, token, k):
        ctx.save_for_backward(token)
        return out.index_select(0, back).view(-1, k, out.shape[-1]).sum(dim=1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (token,) = ctx.saved_tensors
        return g.index_select(0, token), None, None, None


def sum_pairs(out: torch.Tensor, back: torch.Tensor, token: torch.Tensor, k: int) -> torch.Tensor:
    """`_SumPairs` (out [N·K, D] in expert order, back [N·K] its inverse order, token [N·K] the token of
    each row of out) -> [N, D]; without gradients the same index_select and sum."""
    if _needs_grad(out):
        return _SumPairs.apply(out, back, token, k)
    return out.index_select(0, back).view(-1, k, out.shape[-1]).sum(dim=1)


def moe_experts_grouped(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, w1: torch.Tensor,
                        w2: torch.Tensor, w3: torch.Tensor, limit: float) -> torch.Tensor:
    """`moe_experts` with `torch._grouped_mm` (caller checks `grouped_mm_applies`): no host sync.

    The N·K (token, expert) pairs are sorted by expert (stable: ties keep token order, as the loop);
    group ends come from a search in the sorted ids, so experts with no tokens are empty groups. The
    weights enter as transposed views ([E, D, I] column-major), never copied unless autocast casts them.
    The outputs go back to pair order by the inverse permutation (a gather) and are summed per token.
    Gradients to x, weight, w1, w2, w3 are those of grouped_mm, the row gathers (`take_rows`: gathers
    by the inverse permutation) and the casts.
    """
    N, K = idx.shape
    E = w1.shape[0]
    dt = _mm_dtype(x)
    sorted_e, order = torch.sort(idx.reshape(-1), stable=True)                   # [N·K] pairs by expert
    experts = torch.arange(E, device=idx.device, dtype=sorted_e.dtype)
    ends = torch.searchsorted(sorted_e, experts, right=True, out_int32=True)   # [E] cumulative ends
    token = order // K                                                           # [N·K]
    back = torch.empty_like(order).scatter_(0, order, torch.arange(N * K, device=order.device))  # [N·K]
    xs = take_rows(x.to(dt), token, back, K)                                     # [N·K, D]
    g = torch._grouped_mm(xs, w1.to(dt).transpose(-2, -1), offs=ends)           # [N·K, I]
    u = torch._grouped_mm(xs, w3.to(dt).transpose(-2, -1), offs=ends)           # [N·K, I]
    h = swiglu_act(g, u, limit, take_rows(weight.reshape(-1), order, back), dt)  # [N·K, I] fp32 math
    out = torch._grouped_mm(h, w2.to(dt).transpose(-2, -1), offs=ends)          # [N·K, D] by expert
    return sum_pairs(out.to(x.dtype), back, token, K)                           # [N, D] (no atomics)


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
    h = swiglu_act(g, u, limit, weight, dt)                                      # [N·K, I] fp32 math
    out = torch.bmm(w2.index_select(0, flat).to(dt), h.unsqueeze(-1))           # [N·K, D, 1]
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


# ----------------------------------------------------------------------------- Triton entry points
# Thin adapters from the twins' signatures to `dsv4.kernels` (imported on first use). Gradients: the
# sparse attention, Sinkhorn, the fused mHC pre/post mixing and norm/RoPE have their own backward kernels;
# the compressor pooling is differentiated by recomputing its twin in the backward pass.
def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts)


class _SinkhornFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mixes, scale, base, n, iters, eps):
        from dsv4.kernels import mhc
        ctx.save_for_backward(mixes, scale, base)
        ctx.static = (n, iters, eps)
        return mhc.split_sinkhorn(mixes, scale, base, n, iters, eps)

    @staticmethod
    def backward(ctx, dpre, dpost, dcomb):
        from dsv4.kernels import mhc
        mixes, scale, base = ctx.saved_tensors
        dmix, dscale, dbase = mhc.split_sinkhorn_backward(mixes, scale, base, *ctx.static, dpre, dpost, dcomb)
        return dmix.to(mixes.dtype), dscale.to(scale.dtype), dbase.to(base.dtype), None, None, None


def hc_split_sinkhorn_triton(mixes, scale, base, n, iters, eps):
    if not _pow2(n):     # the kernels hold the n×n matrices as power-of-two blocks
        return hc_split_sinkhorn_torch(mixes, scale, base, n, iters, eps)
    if _needs_grad(mixes, scale, base):
        return _SinkhornFn.apply(mixes, scale, base, n, iters, eps)
    from dsv4.kernels import mhc
    return mhc.split_sinkhorn(mixes, scale, base, n, iters, eps)


class _PoolFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kv, score, slots, overlap):
        from dsv4.kernels import compressor
        ctx.save_for_backward(kv, score, slots)
        ctx.overlap = overlap
        return compressor.pool(kv, score, slots, overlap)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        from dsv4.kernels import compressor
        kv, score, slots = ctx.saved_tensors
        g_kv, g_sc = compressor.pool_backward(kv, score, slots, grad, ctx.overlap)
        return g_kv.to(kv.dtype), g_sc.to(score.dtype), None, None


def compress_windows_triton(kv, score, slots, overlap):
    if _needs_grad(kv, score):
        return _PoolFn.apply(kv, score, slots, overlap)
    from dsv4.kernels import compressor
    return compressor.pool(kv, score, slots, overlap)


def index_topk_triton(q, k, w, lo, hi, topk, k_rows=None):
    from dsv4.kernels import indexer
    return indexer.topk(q.detach(), k.detach(), w.detach(), lo, hi, topk, k_rows, long_rows=topk_lowest)


def index_topk_decode_triton(q, k, w, w_scale, pos, ratio, topk, k_rows=None):
    from dsv4.kernels import indexer
    return indexer.topk(q.detach(), k.detach(), w.detach(), pos, None, topk, k_rows, long_rows=topk_lowest,
                        w_scale=w_scale, ratio=ratio)


class _SparseAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, idx, sink, scale, kv2, rows2):
        from dsv4.kernels import sparse_attention as kern
        out, lse = kern.forward(q, kv, idx, sink, scale, kv2, rows2)
        ctx.save_for_backward(q, kv, idx, sink, kv2, rows2, out, lse)
        ctx.scale = scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        from dsv4.kernels import sparse_attention as kern
        q, kv, idx, sink, kv2, rows2, out, lse = ctx.saved_tensors
        dq, dkv, dkv2, dsink = kern.backward(q, kv, idx, sink, ctx.scale, out, lse, dout, kv2, rows2, dlse)
        return dq, dkv, None, dsink, None, dkv2, None


# a decode step has few queries and long key lists: split each list over programs below this many
# (query, head-block) programs, when lists hold at least SPLIT_FROM_KEYS entries (two launches: the
# split programs, then one merge; bench decode after 4K, 640 keys: one program per list took 32 µs)
SPLIT_BELOW_PROGRAMS = 256
SPLIT_FROM_KEYS = 128


def sparse_attention_triton(q, kv, idx, sink, scale, kv2=None, rows2=None, return_lse=False, rows1=None):
    from dsv4.kernels import sparse_attention as kern
    if rows1 is not None and _needs_grad(q, kv, sink, kv2 if not isinstance(kv2, KV8) else None):
        # (a cache read in place: inference only; the kernels' backward takes kv by query row)
        return sparse_attention_torch(q, kv, idx, sink, scale, kv2, rows2, return_lse, rows1)
    kv = kv.to(q.dtype)
    if isinstance(kv2, KV8):
        if kv2.dtype != q.dtype or _needs_grad(q, kv, sink):     # (a cache: inference only)
            return sparse_attention_torch(q, kv, idx, sink, scale, kv2, rows2, return_lse, rows1)
    elif kv2 is not None:
        kv2 = kv2.to(q.dtype)
    if _needs_grad(q, kv, sink, kv2 if not isinstance(kv2, KV8) else None):
        out, lse = _SparseAttentionFn.apply(q, kv, idx, sink, scale, kv2, rows2)
    elif q.shape[0] * q.shape[1] * -(-q.shape[2] // 32) < SPLIT_BELOW_PROGRAMS \
            and idx.shape[-1] >= SPLIT_FROM_KEYS:
        out, lse = kern.forward_split(q, kv, idx, sink, scale, kv2, rows2, rows1=rows1)
    else:
        out, lse = kern.forward(q, kv, idx, sink, scale, kv2, rows2, rows1=rows1)
    return (out, lse) if return_lse else out


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class _HcPreFn(torch.autograd.Function):
    """`hc_pre` with gradients from kernels: the forward also keeps the [T, (2+N)·N] mix logits, rho and
    pre; the backward reads h twice (dpre, then dh and dfn together) around the Sinkhorn backward kernel
    (the twin's backward is a chain of fp32 elementwise passes over h)."""
    @staticmethod
    def forward(ctx, h, fn, scale, base, n, iters, eps, norm_eps):
        from dsv4.kernels import mhc
        x, post, comb, saved = mhc.hc_pre(h, fn, scale, base, n, iters, eps, norm_eps, save=True)
        ctx.save_for_backward(h, fn, scale, base, *saved)
        ctx.static = (n, iters, eps)
        return x, post, comb

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dx, dpost, dcomb):
        from dsv4.kernels import mhc
        h, fn, scale, base, *saved = ctx.saved_tensors
        dh, dfn, dscale, dbase = mhc.hc_pre_backward(h, fn, scale, base, saved, *ctx.static, dx, dpost, dcomb)
        need = ctx.needs_input_grad
        return (dh if need[0] else None, dfn.to(fn.dtype) if need[1] else None,
                dscale.to(scale.dtype) if need[2] else None, dbase.to(base.dtype) if need[3] else None,
                None, None, None, None)


# hc_pre's `defer` for calls of at most this many tokens (a decode step would take 15): post and comb are
# computed in hc_post's kernel, the Sinkhorn before its wait for the sublayer (`dsv4.kernels.mhc.hc_pre`).
# 0 (off): measured slower in the V4-Flash-shaped model on an H200 (15: 0.1608 against 0.1430 ms a layer at
# batch 1; `bench/gpu_round17.sh flash`, bench/results/README.md)
HC_DEFER_TOKENS = 0


def hc_pre_triton(h, fn, scale, base, n, iters, eps, norm_eps, defer=False):
    if not _pow2(n):
        return hc_pre_torch(h, fn, scale, base, n, iters, eps, norm_eps)
    if _needs_grad(h, fn, scale, base):
        return _HcPreFn.apply(h, fn, scale, base, n, iters, eps, norm_eps)
    from dsv4.kernels import mhc
    few = h.numel() <= HC_DEFER_TOKENS * h.shape[-1] * h.shape[-2]
    return mhc.hc_pre(h, fn, scale, base, n, iters, eps, norm_eps, defer=defer and few)


class _HcPostFn(torch.autograd.Function):
    """`hc_post` with gradients from one kernel pass over (grad, f, h) (the twin's backward: an einsum's
    bmm and fp32 elementwise passes)."""
    @staticmethod
    def forward(ctx, f, residual, post, comb):
        from dsv4.kernels import mhc
        ctx.save_for_backward(f, residual, post, comb)
        return mhc.hc_post(f, residual, post, comb)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        from dsv4.kernels import mhc
        f, residual, post, comb = ctx.saved_tensors
        df, dh, dpost, dcomb = mhc.hc_post_backward(grad, f, residual, post, comb)
        need = ctx.needs_input_grad
        return (df if need[0] else None, dh if need[1] else None, dpost.to(post.dtype) if need[2] else None,
                dcomb.to(comb.dtype) if need[3] else None)


def hc_post_triton(f, residual, post, comb, add=None):
    if not _pow2(residual.shape[-2]):
        return hc_post_torch(f, residual, post, comb, add)
    if add is not None and (add.dtype != f.dtype or add.shape != f.shape or _needs_grad(f, add)):
        f, add = f + add, None                          # (the kernel adds two tensors of one dtype, no grad)
    if comb is None and _needs_grad(f, residual):       # (deferred post and comb: an inference form)
        post, comb = post.resolve()
    if _needs_grad(f, residual, post, comb):
        return _HcPostFn.apply(f, residual, post, comb)
    from dsv4.kernels import mhc
    return mhc.hc_post(f, residual, post, comb, add=add)


@fp32_region
def hc_post_pre_torch(f, residual, post, comb, fn, scale, base, n, iters, eps, norm_eps, add=None, defer=False):
    """(h' = hc_post(f, residual, post, comb, add), hc_pre(h', fn, scale, base, ...)): one mHC site's
    output and the next site's input, as two calls (Block's attention → FFN boundary)."""
    h = hc_post_torch(f, residual, post, comb, add)
    return h, hc_pre_torch(h, fn, scale, base, n, iters, eps, norm_eps)


@fp32_region
def hc_post_pre_triton(f, residual, post, comb, fn, scale, base, n, iters, eps, norm_eps, add=None, defer=False):
    if not _pow2(residual.shape[-2]) or _needs_grad(f, residual, post, comb, fn, scale, base, add) \
            or (add is not None and (add.dtype != f.dtype or add.shape != f.shape)):
        h = hc_post_triton(f, residual, post, comb, add)
        return h, hc_pre_triton(h, fn, scale, base, n, iters, eps, norm_eps, defer)
    from dsv4.kernels import mhc
    few = residual.numel() <= HC_DEFER_TOKENS * residual.shape[-1] * residual.shape[-2]
    return mhc.hc_post_pre(f, residual, post, comb, fn, scale, base, n, iters, eps, norm_eps, add=add,
                           defer=defer and few)


class _NormRopeFn(torch.autograd.Function):
    """`norm_rope` with its gradient from one kernel pass (the twin's backward is ~10 fp32 elementwise
    passes over the rows); weight's gradient from per-block partial sums."""
    @staticmethod
    def forward(ctx, x, weight, eps, pos, freqs, stride, sign):
        from dsv4.kernels import norm_rope as kern
        ctx.save_for_backward(x, weight, pos, freqs)
        ctx.static = (eps, stride, sign)
        return kern.norm_rope(x, weight, eps, pos, freqs, stride, sign)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        from dsv4.kernels import norm_rope as kern
        x, weight, pos, freqs = ctx.saved_tensors
        eps, stride, sign = ctx.static
        dx, dw = kern.norm_rope_backward(grad, x, weight, eps, pos, freqs, stride, sign)
        dw = dw.to(weight.dtype) if dw is not None and ctx.needs_input_grad[1] else None
        return dx, dw, None, None, None, None, None


def norm_rope_pair_torch(x: torch.Tensor, weight: torch.Tensor | None, eps: float | None, rope: Rope | None,
                         x2: torch.Tensor, weight2: torch.Tensor | None, eps2: float | None,
                         rope2: Rope | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent `norm_rope` problems (inference: one launch for both in the kernel form)."""
    return norm_rope_torch(x, weight, eps, rope), norm_rope_torch(x2, weight2, eps2, rope2)


def norm_rope_pair_triton(x, weight, eps, rope, x2, weight2, eps2, rope2):
    def fits(t, r):
        return _pow2(t.shape[-1]) and (r is None or _pow2(r.pairs)) and t.dim() in (3, 4)
    if _needs_grad(x, weight, x2, weight2) or not (fits(x, rope) and fits(x2, rope2)):
        return norm_rope_triton(x, weight, eps, rope), norm_rope_triton(x2, weight2, eps2, rope2)
    from dsv4.kernels import norm_rope as kern

    def problem(t, w, e, r):
        return (t, w, e) + ((None, None, 1, 1.0) if r is None else (r.pos, r.freqs, r.stride, r.sign))
    return kern.norm_rope_pair(problem(x, weight, eps, rope), problem(x2, weight2, eps2, rope2))


def norm_rope_triton(x, weight, eps, rope):
    if not _pow2(x.shape[-1]) or (rope is not None and not _pow2(rope.pairs)) or x.dim() not in (3, 4):
        return norm_rope_torch(x, weight, eps, rope)
    from dsv4.kernels import norm_rope as kern
    pos, freqs, stride, sign = (None, None, 1, 1.0) if rope is None else (rope.pos, rope.freqs, rope.stride, rope.sign)
    if _needs_grad(x, weight):     # (kernels only: autocast changes nothing inside, as the twin's fp32 region)
        return _NormRopeFn.apply(x, weight, eps, pos, freqs, stride, sign)
    return kern.norm_rope(x, weight, eps, pos, freqs, stride, sign)


# ----------------------------------------------------------------------------- quantised linear and experts
# Weights kept in the release's storage formats (spec §11.1; modules in `dsv4.quant`): FP8 e4m3 matrices with
# one e8m0 (or fp32) scale per 128×128 block, FP4 e2m1 routed experts (two codes per int8, low nibble first)
# with one e8m0 scale per 1×32 block along the input dim. Activations stay in the model dtype (no FP8
# activation quantisation): every function computes what the dequantise-on-load model computes, up to
# summation order. Each twin below has a Triton kernel with the same signature in `dsv4/kernels/`;
# `fp8_linear` / `fp4_experts` are primitives of the backend table like the others ('triton' on CUDA,
# `DSV4_OPS=fp8_linear=torch` or `set_backend` to choose; 'triton' also runs on CPU tensors under
# TRITON_INTERPRET=1, as the tests do).
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


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


def fp8_grouped_linear_torch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                             block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """Twin of the grouped FP8 GEMV: x [..., G, K], weight [G·R, K] (group g owns rows g·R..) -> [..., G·R],
    the weight dequantised to the matmul dtype on the fly, then the attention's grouped einsum (`wo_a`)."""
    G, K = x.shape[-2], x.shape[-1]
    w = dequant_blocks(weight, scale, block, _mm_dtype(x)).view(G, -1, K)        # [G, R, K]
    return torch.einsum("...gk,grk->...gr", x.to(w.dtype), w).flatten(-2)       # [..., G·R]


FP8_DEQUANT_ABOVE_ROWS = 64   # fp8_linear on CUDA: more rows than this go to dequantise + cuBLAS
FP4_DEQUANT_CHUNK = 32        # experts dequantised at a time by the FP4 prefill path (Flash: 1.6 GB bf16)


def fp8_linear_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """The Triton FP8 GEMM for decode-sized inputs; on CUDA, prefill-sized ones (more than
    `FP8_DEQUANT_ABOVE_ROWS` rows, bf16/fp16) take a dequantised copy and cuBLAS, which beat the kernel
    there (H200, V4-Flash shapes at M = 8192: 1.0 ms against 2.3 ms for wo_b; at M = 32 the kernel wins,
    0.11 against 0.40 ms: `bench/bench_flash_shaped.py --only kernels`)."""
    if x.is_cuda and x.numel() // max(x.shape[-1], 1) > FP8_DEQUANT_ABOVE_ROWS and x.dtype != torch.float32:
        return fp8_linear_torch(x, weight, scale, block)
    from dsv4.kernels.fp8_gemm import fp8_linear
    return fp8_linear(x, weight, scale, block)


def fp8_grouped_linear_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                              block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """The grouped FP8 GEMV (`dsv4.kernels.fp8_gemm.fp8_grouped_gemv`) for decode-sized inputs (up to the
    GEMV's `GEMV_MAX_ROWS` rows of leading dims); more rows take the twin (dequantise + batched matmul)."""
    from dsv4.kernels.fp8_gemm import GEMV_MAX_ROWS, fp8_grouped_gemv
    if x.numel() // max(x.shape[-1] * x.shape[-2], 1) > GEMV_MAX_ROWS:
        return fp8_grouped_linear_torch(x, weight, scale, block)
    return fp8_grouped_gemv(x, weight, scale, block)


def fp4_prefill_applies(x: torch.Tensor, n_pairs: int, w1: torch.Tensor) -> bool:
    """Whether `fp4_experts_dequant` serves these pairs: many per expert, bf16 on a GPU whose grouped GEMM
    has a sync-free kernel (sm90, `grouped_mm_applies`), outside graph capture and compile (it reads the
    pair counts on the host). The dequantised chunks are fresh contiguous tensors, so only the widths
    (multiples of 8) and the expert count remain to check."""
    E, I, D = w1.shape[0], w1.shape[1], 2 * w1.shape[2]
    if not x.is_cuda or x.dtype != torch.bfloat16 or n_pairs < 4 * E or not hasattr(torch, "_grouped_mm"):
        return False
    if torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling():
        return False
    return _cuda_major(x.device.index) == 9 and D % 8 == 0 and I % 8 == 0 and E < 1024


def fp4_experts_dequant(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, w1: torch.Tensor,
                        s1: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor, w3: torch.Tensor, s3: torch.Tensor,
                        limit: float, chunk: int | None = None) -> torch.Tensor:
    """FP4 experts for prefill: pairs sorted by expert (one host read of the counts); `chunk` experts at a
    time (those with pairs) dequantised to x's dtype by the Triton dequantisation kernel and run as grouped
    GEMMs (`moe_experts_grouped`: the numerics of the dequantised model). Reads each used expert's FP4
    bytes once. Ids outside [0, E) contribute nothing."""
    from dsv4.kernels.fp4_moe import dequant_fp4
    chunk = chunk or FP4_DEQUANT_CHUNK
    N, K = idx.shape
    E = w1.shape[0]
    flat = idx.reshape(-1)
    key = torch.where((flat >= 0) & (flat < E), flat, E)
    order = torch.argsort(key, stable=True)                                    # [N·K] pairs by expert
    counts = torch.bincount(key, minlength=E + 1)[:E].tolist()                 # the one host read
    out = torch.zeros(N * K, x.shape[1], dtype=x.dtype, device=x.device)      # [N·K, D] per pair
    rw = weight.reshape(-1)
    start = 0
    for c0 in range(0, E, chunk):
        c1 = min(E, c0 + chunk)
        n = sum(counts[c0:c1])
        if n == 0:
            continue
        pairs = order[start:start + n]
        start += n
        used = [e for e in range(c0, c1) if counts[e]]
        lo, hi = used[0], used[-1] + 1                                          # experts with pairs
        W1, W3 = dequant_fp4(w1[lo:hi], s1[lo:hi], x.dtype), dequant_fp4(w3[lo:hi], s3[lo:hi], x.dtype)
        W2 = dequant_fp4(w2[lo:hi], s2[lo:hi], x.dtype)
        local = (flat.index_select(0, pairs) - lo)[:, None]                    # [n, 1] in [0, hi - lo)
        out[pairs] = moe_experts_grouped(x.index_select(0, pairs // K), local, rw.index_select(0, pairs)[:, None],
                                         W1, W2, W3, limit)
    return out.view(N, K, x.shape[1]).sum(1)


def fp4_experts_triton(x, idx, weight, w1, s1, w2, s2, w3, s3, limit):
    """The Triton FP4 expert kernels (decode GEMV, tiled), or `fp4_experts_dequant` for prefill on sm90
    (150 ms -> 18 ms at 8,192 V4-Flash tokens on the H200: `bench/probe_quant_kernels.py`)."""
    if x.dim() == 2 and idx.dim() == 2 and fp4_prefill_applies(x, idx.numel(), w1):
        return fp4_experts_dequant(x, idx, weight, w1, s1, w2, s2, w3, s3, limit)
    from dsv4.kernels.fp4_moe import fp4_experts
    return fp4_experts(x, idx, weight, w1, s1, w2, s2, w3, s3, limit)


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


# ----------------------------------------------------------------------------- the table
hc_split_sinkhorn = register("hc_split_sinkhorn", {"torch": hc_split_sinkhorn_torch,
                                                   "triton": hc_split_sinkhorn_triton})
hc_pre = register("hc_pre", {"torch": hc_pre_torch, "triton": hc_pre_triton})
hc_post = register("hc_post", {"torch": hc_post_torch, "triton": hc_post_triton})
hc_post_pre = register("hc_post_pre", {"torch": hc_post_pre_torch, "triton": hc_post_pre_triton})
hc_head = register("hc_head", {"torch": hc_head_torch, "triton": hc_head_triton})
norm_rope = register("norm_rope", {"torch": norm_rope_torch, "triton": norm_rope_triton})
norm_rope_pair = register("norm_rope_pair", {"torch": norm_rope_pair_torch, "triton": norm_rope_pair_triton})
dense = register("dense", {"torch": dense_torch, "triton": dense_triton})
grouped_dense = register("grouped_dense", {"torch": grouped_dense_torch, "triton": grouped_dense_triton})
route = register("route", {"torch": route_torch, "triton": route_triton}, kernel_dtypes=(torch.float32,),
                 operand_dtype=acc_dtype)
compress_windows = register("compress_windows", {"torch": compress_windows_torch, "triton": compress_windows_triton})
index_topk = register("index_topk", {"torch": index_topk_torch, "triton": index_topk_triton})
index_topk_decode = register("index_topk_decode", {"torch": index_topk_decode_torch,
                                                   "triton": index_topk_decode_triton})
sparse_attention = register("sparse_attention", {"torch": sparse_attention_torch,
                                                 "triton": sparse_attention_triton})
compressor_step = register("compressor_step", {"torch": compressor_step_torch, "triton": compressor_step_triton},
                           kernel_dtypes=(torch.float32,), operand_dtype=acc_dtype)
compressor_entry = register("compressor_entry", {"torch": compressor_entry_torch, "triton": compressor_entry_triton})
# the same into FP8 rows (`kv8_dtype`), chosen on their uint8 buffer: any dtype (a kv_fp8 cache is never float64)
compressor_entry_kv8 = register("compressor_entry_kv8", {"torch": compressor_entry_torch,
                                                         "triton": compressor_entry_triton}, kernel_dtypes=None)
decode_key_lists = register("decode_key_lists", {"torch": decode_key_lists_torch, "triton": decode_key_lists_triton},
                            kernel_dtypes=None)
key_lists = register("key_lists", {"torch": key_lists_torch, "triton": key_lists_triton}, kernel_dtypes=None)
swiglu_act = register("swiglu", {"torch": swiglu_act_torch, "triton": swiglu_act_triton})
fp8_linear = register("fp8_linear", {"torch": fp8_linear_torch, "triton": fp8_linear_triton})
fp8_grouped_linear = register("fp8_grouped_linear", {"torch": fp8_grouped_linear_torch,
                                                     "triton": fp8_grouped_linear_triton})
fp4_experts = register("fp4_experts", {"torch": fp4_experts_torch, "triton": fp4_experts_triton})
moe_experts = register("moe_experts", {"torch": moe_experts_auto, "triton": moe_experts_triton,
                                       "grouped": moe_experts_grouped, "gather": moe_experts_gather,
                                       "loop": moe_experts_loop}, kernel_dtypes=None)


MOE_IMPLS = {"grouped": moe_experts_grouped, "gather": moe_experts_gather, "loop": moe_experts_loop}
