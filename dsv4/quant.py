"""FP8 e4m3 and FP4 e2m1 weight formats of the DeepSeek-V4 checkpoints, and modules that compute in them.

Spec: ARCHITECTURE.md §11.1.
  * FP8: `float8_e4m3fn` weight [out, in] with one power-of-two scale (`float8_e8m0fnu`, "ue8m0") per
    128×128 block, `W[i, j] = Wq[i, j] · scale[i // 128, j // 128]`; edge blocks are partial.
  * FP4: int8 [out, in / 2], each byte holds two e2m1 codes, the LOW nibble the even (first) element;
    one e8m0 scale per 1×32 block along the input dim, scale [out, in / 32].
Quantisation picks the smallest power of two that maps the block's amax into range:
`scale = 2^ceil(log2(amax / max_code))` (max_code 448 for e4m3, 6 for e2m1), then rounds to the nearest
representable value (ties to even). Scales are computed with `frexp`, not `log2`, so an amax that is
exactly a power of two times the max code keeps that power.

Quantised-resident models (`load_pretrained(..., quantized=True)`): `FP8Linear` and `FP4Experts` hold a
checkpoint's FP8 matrices and FP4 experts in these storage formats and compute through `dsv4.ops`
(`fp8_linear`, `fp4_experts`: Triton kernels on CUDA, dequantise-on-the-fly twins elsewhere). They are
swapped into a model built on the meta device from outside (`replace_modules`); the model code only
knows the seams (`attention.linear` calls a non-`nn.Linear` layer, `MoE` calls `experts(x, idx, weight)`).
`wo_a`, which the official inference code dequantises on load, stays FP8 as well: the attention runs it
as a grouped projection (`FP8Linear.grouped`). `resident_bytes` counts a model's bytes; `analytic_resident_bytes` computes them from the config.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from dsv4 import ops

FP8_MAX = 448.0
FP4_MAX = 6.0
FP8_BLOCK = (128, 128)
FP4_BLOCK = 32
# e2m1 magnitudes of codes 0..7; codes 8..15 are the same with the sign bit set
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# midpoints between consecutive magnitudes; at a midpoint the even code wins (round half to even)
_FP4_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E8M0_MIN_EXP, _E8M0_MAX_EXP = -127, 127


def _expand_blocks(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Scale per block [⌈R/br⌉, ⌈C/bc⌉] -> one scale per element [R, C] (fp32)."""
    R, C = shape
    s = scale.float()
    return s.repeat_interleave(block[0], dim=0)[:R].repeat_interleave(block[1], dim=1)[:, :C]


def pow2_scale(amax: torch.Tensor, max_code: float) -> torch.Tensor:
    """2^ceil(log2(amax / max_code)) in fp32, clamped to the e8m0 range (an all-zero block gets 2^-127)."""
    mant, exp = torch.frexp(amax.float() / max_code)          # x = mant · 2^exp, mant in [0.5, 1)
    e = torch.where(mant == 0.5, exp - 1, exp)                 # exact powers of two keep their exponent
    e = torch.where(mant == 0, torch.full_like(e, _E8M0_MIN_EXP), e)
    return torch.exp2(e.clamp(_E8M0_MIN_EXP, _E8M0_MAX_EXP).float())


def check_scale_shape(weight_shape, scale: torch.Tensor, block: tuple[int, int]) -> None:
    R, C = weight_shape
    want = (-(-R // block[0]), -(-C // block[1]))
    if tuple(scale.shape) != want:
        raise ValueError(f"scale has shape {tuple(scale.shape)}, expected {want} for a weight {tuple(weight_shape)} "
                         f"with {block[0]}x{block[1]} blocks")


# ----------------------------------------------------------------------------- FP8 e4m3
def dequant_fp8(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = FP8_BLOCK,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """e4m3 weight [R, C] · e8m0 (or fp32) scale per block -> [R, C] in `dtype` (computed in fp32)."""
    if weight.dim() != 2:
        raise ValueError(f"FP8 weight must be 2-D, got shape {tuple(weight.shape)}")
    check_scale_shape(weight.shape, scale, block)
    return (weight.float() * _expand_blocks(scale, tuple(weight.shape), block)).to(dtype)


def quant_fp8(w: torch.Tensor, block: tuple[int, int] = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, C] -> (e4m3 weight [R, C], e8m0 scale [⌈R/br⌉, ⌈C/bc⌉]); edge blocks use their partial amax."""
    if w.dim() != 2:
        raise ValueError(f"FP8 quantisation takes a 2-D weight, got shape {tuple(w.shape)}")
    R, C = w.shape
    br, bc = block
    nr, nc = -(-R // br), -(-C // bc)
    wf = w.float()
    padded = wf.new_zeros(nr * br, nc * bc)
    padded[:R, :C] = wf.abs()
    amax = padded.view(nr, br, nc, bc).amax(dim=(1, 3))                      # [nr, nc]
    scale = pow2_scale(amax, FP8_MAX)
    q = (wf / _expand_blocks(scale, (R, C), block)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale.to(torch.float8_e8m0fnu)


# ----------------------------------------------------------------------------- FP4 e2m1
def fp4_codes_to_values(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (any integer dtype, values 0..15) -> fp32 values."""
    table = torch.tensor(FP4_VALUES + tuple(-v for v in FP4_VALUES), dtype=torch.float32, device=codes.device)
    return table[codes.long()]


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """int8/uint8 [R, C/2] -> codes uint8 [R, C]: the low nibble is the even element."""
    u = packed.view(torch.uint8) if packed.dtype == torch.int8 else packed
    return torch.stack([u & 0x0F, u >> 4], dim=-1).flatten(-2)                # [R, C]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """codes [R, C] (C even, values 0..15) -> int8 [R, C/2], even element in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"FP4 packing needs an even number of columns, got {codes.shape[-1]}")
    c = codes.to(torch.uint8).unflatten(-1, (-1, 2))
    return (c[..., 0] | (c[..., 1] << 4)).view(torch.int8)


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor, block: int = FP4_BLOCK,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed e2m1 [R, C/2] · scale [R, ⌈C/block⌉] -> [R, C] in `dtype`."""
    if packed.dim() != 2:
        raise ValueError(f"FP4 weight must be 2-D, got shape {tuple(packed.shape)}")
    R, half = packed.shape
    check_scale_shape((R, 2 * half), scale, (1, block))
    values = fp4_codes_to_values(unpack_fp4(packed))                         # [R, C]
    return (values * _expand_blocks(scale, (R, 2 * half), (1, block))).to(dtype)


def fp4_round(x: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 of the nearest e2m1 values of x (|x| ≤ 6 expected; larger saturates to ±6)."""
    a = x.abs()
    code = torch.zeros_like(a, dtype=torch.uint8)
    for k, t in enumerate(_FP4_MIDPOINTS):
        # a tie goes to the even code: up when code k+1 is even (k odd), down otherwise
        code += (a >= t if k % 2 else a > t).to(torch.uint8)
    return code | ((x < 0) & (code > 0)).to(torch.uint8) << 3


def quant_fp4(w: torch.Tensor, block: int = FP4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, C] (C even) -> (packed int8 [R, C/2], e8m0 scale [R, ⌈C/block⌉])."""
    if w.dim() != 2:
        raise ValueError(f"FP4 quantisation takes a 2-D weight, got shape {tuple(w.shape)}")
    R, C = w.shape
    nb = -(-C // block)
    wf = w.float()
    padded = wf.new_zeros(R, nb * block)
    padded[:, :C] = wf.abs()
    scale = pow2_scale(padded.view(R, nb, block).amax(dim=-1), FP4_MAX)     # [R, nb]
    codes = fp4_round(wf / _expand_blocks(scale, (R, C), (1, block)))
    return pack_fp4(codes), scale.to(torch.float8_e8m0fnu)


def fake_quant(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """w rounded through a format and back ('fp8' or 'fp4'), in w's dtype: what a save/load keeps."""
    if fmt == "fp8":
        return dequant_fp8(*quant_fp8(w), dtype=w.dtype)
    if fmt == "fp4":
        return dequant_fp4(*quant_fp4(w), dtype=w.dtype)
    raise ValueError(f"unknown weight format {fmt!r}; expected 'fp8' or 'fp4'")


# ----------------------------------------------------------------------------- quantised-resident modules
_STORAGE_DTYPES = (torch.float8_e4m3fn, torch.float8_e8m0fnu)


def _keep_storage_dtype(module: nn.Module, fn, recurse: bool):
    """`Module._apply` that keeps float8 buffers in their format: `model.to(torch.bfloat16)` moves them
    but must not widen them (the round trip through a wider float is exact, so the values are kept)."""
    return nn.Module._apply(module, lambda t: fn(t).to(t.dtype) if t.dtype in _STORAGE_DTYPES else fn(t), recurse)


class FP8Linear(nn.Module):
    """A bias-free linear layer whose weight stays FP8: `weight` [out, in] float8_e4m3fn and `scale`
    [⌈out/128⌉, ⌈in/128⌉] e8m0 (or fp32), the checkpoint's own tensors under its own names (buffers:
    nothing here trains). forward = `ops.fp8_linear` (Triton kernel or dequantise-on-the-fly twin)."""

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int] = FP8_BLOCK,
                 scale_dtype: torch.dtype = torch.float8_e8m0fnu, device=None):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, tuple(block)
        shape = (-(-out_features // block[0]), -(-in_features // block[1]))
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn,
                                                   device=device))
        self.register_buffer("scale", torch.empty(shape, dtype=scale_dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.fp8_linear(x, self.weight, self.scale, self.block)

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """As a grouped projection: x [..., G, in / G] -> [..., out], block g of out / G rows reading
        x[..., g] (`attention.grouped_linear`, the `wo_a` of a model that keeps it FP8)."""
        return ops.fp8_grouped_linear(x, self.weight, self.scale, self.block)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequant_fp8(self.weight, self.scale, self.block, dtype=dtype)

    def _apply(self, fn, recurse=True):
        return _keep_storage_dtype(self, fn, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3, block={self.block}"


class FP4Experts(nn.Module):
    """Routed experts whose weights stay FP4 e2m1: `w1`, `w3` int8 [E, I, D/2], `w2` int8 [E, D, I/2]
    (two codes per byte, low nibble first) and e8m0 scales `w1_scale`, `w3_scale` [E, I, D/32],
    `w2_scale` [E, D, I/32]. Same seam as `model.Experts`: forward(x, idx, weight), where expert ids
    outside [0, E) contribute nothing (expert parallelism passes the other ranks' experts that way)."""

    def __init__(self, n: int, dim: int, inter: int, limit: float, device=None):
        super().__init__()
        if dim % FP4_BLOCK or inter % FP4_BLOCK:
            raise ValueError(f"FP4 experts need dims that are multiples of {FP4_BLOCK}; got {dim}, {inter}")
        self.n_experts, self.dim, self.inter, self.limit = n, dim, inter, limit
        for name, (rows, cols) in (("w1", (inter, dim)), ("w2", (dim, inter)), ("w3", (inter, dim))):
            self.register_buffer(name, torch.empty(n, rows, cols // 2, dtype=torch.int8, device=device))
            self.register_buffer(f"{name}_scale", torch.empty(n, rows, cols // FP4_BLOCK, dtype=torch.float8_e8m0fnu,
                                                              device=device))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [N, D], idx [N, K] expert ids, weight [N, K] fp32 routing weights -> [N, D]."""
        return ops.fp4_experts(x, idx, weight, self.w1, self.w1_scale, self.w2, self.w2_scale, self.w3,
                               self.w3_scale, self.limit)

    def _apply(self, fn, recurse=True):
        return _keep_storage_dtype(self, fn, recurse)

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, dim={self.dim}, inter={self.inter}, fp4 e2m1"


def replace_modules(model: nn.Module, fp8: dict[str, torch.dtype] | None = None, fp4: list[str] | None = None,
                    n_experts: int | None = None) -> None:
    """Swap quantised modules into `model` (normally built on the meta device, before loading).

    fp8: {name of an nn.Linear: dtype of its block scales} -> `FP8Linear` with the model's FP8 block
    (its config's `quantization_config.weight_block_size`, else 128×128). fp4: names of `Experts`
    modules -> `FP4Experts`. n_experts: the number of routed experts each MoE holds here (expert
    parallelism); the other `Experts` modules are rebuilt with that many experts too."""
    from dsv4.model import Experts

    cfg = model.config
    block = tuple((cfg.quantization_config or {}).get("weight_block_size") or FP8_BLOCK)
    for name, scale_dtype in (fp8 or {}).items():
        old = model.get_submodule(name)
        if not isinstance(old, nn.Linear):
            raise TypeError(f"{name} is a {type(old).__name__}, not an nn.Linear")
        model.set_submodule(name, FP8Linear(old.in_features, old.out_features, block, scale_dtype,
                                            device=old.weight.device))
    fp4 = set(fp4 or ())
    for name, old in list(model.named_modules()):
        if not isinstance(old, Experts) or (name not in fp4 and n_experts is None):
            continue
        E = n_experts if n_experts is not None else old.w1.shape[0]
        _, inter, dim = old.w1.shape
        new = (FP4Experts(E, dim, inter, old.limit, device=old.w1.device) if name in fp4
               else Experts(E, dim, inter, old.limit).to(old.w1.device))
        model.set_submodule(name, new)


# ----------------------------------------------------------------------------- resident bytes
def resident_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's state by storage kind: 'fp8' (e4m3 weights), 'fp4' (packed experts), 'scales'
    (their e8m0/fp32 block scales), 'other' (everything else), 'total'."""
    out = {"fp8": 0, "fp4": 0, "scales": 0, "other": 0}
    quantised = {}
    for name, m in model.named_modules():
        if isinstance(m, (FP8Linear, FP4Experts)):
            for k, t in m.named_buffers(recurse=False):
                quantised[f"{name}.{k}"] = "scales" if k.endswith("scale") else "fp8" if k == "weight" else "fp4"
    for name, t in model.state_dict().items():
        out[quantised.get(name, "other")] += t.numel() * t.element_size()
    out["total"] = sum(out.values())
    return out


def analytic_resident_bytes(cfg, dtype: torch.dtype = torch.bfloat16, *, fp8: bool | None = None,
                            fp4_experts: bool | None = None, n_experts: int | None = None) -> dict[str, int]:
    """What `resident_bytes` of a quantised-resident model of `cfg` gives, from the spec's tensor table
    (§13.1) alone: FP8 matrices at 1 byte + one scale byte per block, FP4 experts at half a byte + one
    scale byte per 32, bf16 tensors in `dtype`, the release's F32 tensors in fp32, `tid2eid`
    int64. fp8 / fp4_experts default to the config's `quantization_config` / `expert_dtype`;
    n_experts = routed experts held per MoE (expert parallelism: E / ranks)."""
    fp8 = cfg.quantization_config is not None if fp8 is None else fp8
    fp4_experts = cfg.expert_dtype == "fp4" if fp4_experts is None else fp4_experts
    br, bc = tuple((cfg.quantization_config or {}).get("weight_block_size") or FP8_BLOCK)
    b = torch.empty((), dtype=dtype).element_size()
    f32 = 8 if dtype == torch.float64 else 4
    D, H, Dh, N = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.hc_mult
    E, I, Iq = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.q_lora_rank
    E_here = E if n_experts is None else n_experts
    out = {"fp8": 0, "fp4": 0, "scales": 0, "other": 0}

    def plain(*shape, size=b):
        out["other"] += math.prod(shape) * size

    def fp8_matrix(rows, cols):
        if not fp8:
            return plain(rows, cols)
        out["fp8"] += rows * cols
        out["scales"] += -(-rows // br) * -(-cols // bc)

    def expert_matrix(rows, cols):
        if not fp4_experts:
            return plain(E_here, rows, cols)
        out["fp4"] += E_here * rows * cols // 2
        out["scales"] += E_here * rows * -(-cols // FP4_BLOCK)

    def block(layer: int, hashed: bool):
        mix = (2 + N) * N
        plain(2 * mix * N * D + 2 * mix + 2 * 3, size=f32)                      # hc_{attn,ffn}_{fn,base,scale}
        plain(2 * D)                                                             # attn_norm, ffn_norm
        plain(H, size=f32)                                                       # attn_sink
        plain(Iq + Dh)                                                           # q_norm, kv_norm
        fp8_matrix(Iq, D)                                                        # wq_a
        fp8_matrix(H * Dh, Iq)                                                   # wq_b
        fp8_matrix(Dh, D)                                                        # wkv
        fp8_matrix(cfg.o_groups * cfg.o_lora_rank, H * Dh // cfg.o_groups)       # wo_a (grouped)
        fp8_matrix(D, cfg.o_groups * cfg.o_lora_rank)                            # wo_b
        ratio = cfg.layer_ratio(layer)
        if ratio:
            w = (2 if ratio == 4 else 1) * Dh
            plain(2 * w * D + Dh)                                                # compressor wkv, wgate, norm
            plain(ratio * w, size=f32)                                           # compressor ape
        if ratio == 4:
            Hi, Di = cfg.index_n_heads, cfg.index_head_dim
            fp8_matrix(Hi * Di, Iq)                                              # indexer wq_b
            plain(Hi * D + 2 * 2 * Di * D + Di)                                  # weights_proj, compressor wkv/wgate/norm
            plain(4 * 2 * Di, size=f32)                                          # indexer compressor ape
        plain(E * D)                                                             # gate.weight
        if hashed:
            plain(cfg.vocab_size * cfg.num_experts_per_tok, size=8)              # tid2eid (int64)
        else:
            plain(E, size=f32)                                                   # gate.bias (fp32 buffer)
        Is = I * cfg.n_shared_experts
        for rows, cols in ((Is, D), (D, Is), (Is, D)) if Is else ():
            fp8_matrix(rows, cols)                                               # shared w1, w2, w3
        for rows, cols in ((I, D), (D, I), (I, D)):
            expert_matrix(rows, cols)                                            # routed w1, w2, w3

    plain(2 * cfg.vocab_size * D + D)                                            # embed, head, norm
    plain(N * N * D + N + 1, size=f32)                                           # hc_head_*
    for i in range(cfg.num_hidden_layers):
        block(i, i < cfg.num_hash_layers)
    for k in range(cfg.num_nextn_predict_layers):
        block(cfg.num_hidden_layers + k, False)
        fp8_matrix(D, D)                                                         # e_proj
        fp8_matrix(D, D)                                                         # h_proj
        plain(3 * D)                                                             # enorm, hnorm, norm
        plain(N * N * D + N + 1, size=f32)                                       # its hc_head_*
    out["total"] = sum(out.values())
    return out


def describe(model: nn.Module) -> str:
    """One line: which modules are quantised-resident and which implementation computes them."""
    fp8 = [m for m in model.modules() if isinstance(m, FP8Linear)]
    fp4 = [m for m in model.modules() if isinstance(m, FP4Experts)]
    if not fp8 and not fp4:
        return "weights: dequantised on load (no FP8/FP4 module)"
    dev = next(t for m in fp8 + fp4 for t in m.buffers()).device
    gib = resident_bytes(model)["total"] / 2 ** 30
    return (f"weights: quantised-resident, {len(fp8)} FP8 linears, {len(fp4)} FP4 expert groups, {gib:.2f} GiB; "
            f"kernels: fp8_linear={ops.fp8_linear.choose(dev.type, torch.bfloat16)}, "
            f"fp4_experts={ops.fp4_experts.choose(dev.type, torch.bfloat16)}")
