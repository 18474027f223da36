"""Registers, spills and shared memory of the Triton kernels' launch shapes on sm90, compiled without a
GPU (Triton compiles for the target it is told; ptxas ships with the wheel), with the launcher's
specialisation of pointers and strides (`runtime_attrs`; without it the loads are neither vectorised nor
pipelined and the numbers are not the launched kernel's). Reproduces the launch-shape choices written
next to the kernels:

* norm/RoPE: 16 rows of 4,096 spill 1.7 KB (rows per program are sized to the width instead);
* mHC: the mix at 16/32 tokens, the finish at 8 tokens × 128 columns and at 1 token × 1,024 (no spills),
  the finish at 16 × 128 (spills);
* sparse attention, 32 heads × 512: 4 warps spill, 8 do not (yet 8 measured slower on the H200); the
  64-head launch (64 keys, 8 warps), the FP8-entry reads (native e4m3 conversion and the integer decode
  of GPUs before sm89; their pipeline stages, which shared memory bounds) and the backward's;
* the expert GEMV kernels;
* the decode step's GEMV, router, compressor entry and step kernels, the pooling gradient, the radix
  select and the index scores (a decode query's range computed in the kernels), the split attention's
  merge (none spills; compiling them here also catches what the interpreter accepts and the compiler
  refuses).

    python3 bench/ptxas_report.py [NAME-PART ...]      # only the cases whose names contain one of them
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


SMEM_LIMIT = 232448      # shared memory a block may take on the H100/H200 (227 KB)


def runtime_attrs(fn, sig: dict) -> dict:
    """The specialisation the launcher gives our tensors: pointers and strides (arguments named s_* or
    stride*) divisible by 16. Without it Triton neither vectorises nor pipelines the loads, and the
    registers, spills and shared memory reported are not the ones of the launched kernel."""
    names = fn.arg_names
    return {(names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
            if t.startswith("*") or (t == "i32" and (n.startswith("s_") or n.startswith("stride")))}


def compile_sm90(fn, sig: dict, consts: dict, warps: int, stages: int = 2, attrs: dict | None = None):
    """-> (compiled kernel, registers, spill bytes) of fn for sm90; sig maps every non-constexpr
    argument to its Triton type; attrs default to `runtime_attrs`."""
    attrs = runtime_attrs(fn, sig) if attrs is None else attrs
    # constexpr parameters left out take their defaults, as at a launch (not None)
    consts = {**{q.name: q.default for q in fn.params if q.is_constexpr and q.name not in sig and q.name != "PDL"
                 and q.default is not inspect.Parameter.empty}, **consts}
    sig = dict(sig, **{k: "constexpr" for k in consts})
    c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs or {}),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp, "k.ptx")
        ptx.write_text(c.asm["ptx"])
        info = subprocess.run([f"{BIN}/ptxas", "-arch=sm_90a", "-v", str(ptx), "-o", os.devnull],
                              capture_output=True, text=True).stderr
    return c, int(re.findall(r"Used (\d+) registers", info)[-1]), int(re.findall(r"(\d+) bytes spill stores", info)[-1])


def main() -> int:
    from dsv4.kernels import compressor, gemv, indexer, mhc, moe_gemv, norm_rope, router, sparse_attention as sa
    nr = dict(X="*bf16", W="*bf16", POS="*i64", FREQ="*fp32", OUT="*bf16", R="i32", HEADS="i32", eps="fp32",
              STRIDE="i32", SIGN="fp32")
    mix = dict(H="*bf16", FN="*fp32", SS="*fp32", MIX="*fp32", N_TOK="i32", D="i32", K_PER="i32")
    pbw = dict(DX="*bf16", H="*bf16", FN="*fp32", DZ="*fp32", C="*fp32", PRE="*fp32", DH="*bf16", DFN="*fp32",
               N_TOK="i32", D="i32", T_PER="i32")
    fin = dict(H="*bf16", SS="*fp32", MIX="*fp32", SCALE="*fp32", BASE="*fp32", X="*bf16", POST="*fp32",
               COMB="*fp32", N_TOK="i32", D="i32", NSPLIT="i32", D_PER="i32", SEP="i32", eps="fp32",
               norm_eps="fp32", MIXES="constexpr", RHO="constexpr", PRE="constexpr")
    att = {n: "i32" for n in sa._fwd_kernel.arg_names}
    att.update(Q="*bf16", KV="*bf16", KV2="*bf16", OUT="*bf16", ROWS2="*i32", IDX="*i32", SINK="*fp32",
               LSE="*fp32", ML="*fp32", ROWS1="*i32", scale_log2="fp32")
    for k in ("D", "BLOCK_H", "BLOCK_N", "HAS_KV2", "SPLIT", "F32_DOT", "KV2_FP8", "NOPE", "OFF_SC", "OFF_ROPE",
              "NATIVE_FP8", "HAS_ROWS1", "PDL"):
        att.pop(k)
    attb = {n: "i32" for n in sa._bwd_kernel.arg_names}
    attb.update(Q="*bf16", KV="*bf16", KV2="*bf16", ROWS2="*i32", IDX="*i32", DO="*bf16", LSE="*fp32",
                DELTA="*fp32", DQ="*bf16", DKV="*fp32", DKV2="*fp32", scale="fp32")
    for k in ("D", "BLOCK_H", "BLOCK_N", "HAS_KV2", "F32_DOT", "PDL"):
        attb.pop(k, None)
    up = dict(x_ptr="*bf16", w1_ptr="*bf16", w3_ptr="*bf16", rw_ptr="*fp32", idx_ptr="*i64", h_ptr="*bf16",
              D="i32", I="i32", TOPK="i32", E="i32", limit="fp32", s_xm="i32", s_we="i32", s_wn="i32", s_hm="i32")
    down = dict(h_ptr="*bf16", w2_ptr="*bf16", idx_ptr="*i64", out_ptr="*bf16", D="i32", I="i32", TOPK="i32",
                E="i32", s_hm="i32", s_we="i32", s_wn="i32", s_om="i32")
    gv = dict(x_ptr="*bf16", w_ptr="*bf16", y_ptr="*fp32", N="i32", K="i32", stride_xm="i32", stride_wn="i32",
              stride_ym="i32", RG="i32", stride_xg="i32")
    rt = dict(LOGITS="*fp32", BIAS="*fp32", IDS="*i64", HASH="*i64", W_OUT="*fp32", IDX_OUT="*i64", S_OUT="*fp32",
              E="i32", s_l="i32", s_h="i32", route_scale="fp32")
    en = dict(POOLED="*fp32", W="*bf16", POS="*i64", ROWS="*i64", FREQ="*fp32", ENT="*bf16", s_pb="i32", s_eb="i32",
              s_en="i32", n_max="i32", eps="fp32")
    st = dict(SKV="*fp32", SSC="*fp32", ROWS="*i64", KV="*fp32", SC="*fp32", APE="*fp32", POS="*i64", OUT="*fp32",
              s_sb="i32", s_sl="i32", s_nb="i32", s_ob="i32", s_ape="i32", C="i32")
    pb = dict(KV="*fp32", SC="*fp32", SLOTS="*i32", G="*fp32", DKV="*fp32", DSC="*fp32", s_b="i32", s_l="i32",
              s_sb="i32", s_sn="i32", s_gb="i32", s_gn="i32", N="i32", C="i32")
    sel = dict(SC="*i16", LO="*i32", HI="*i32", OUT="*i32", s_sr="i32", s_or="i32", C="i32", P="i32")
    cmb = dict(PART="*fp32", ML="*fp32", SINK="*fp32", OUT="*bf16", LSE="*fp32", SPLITS="i32", H="i32")
    post = dict(F="*bf16", H="*bf16", POST="*fp32", COMB="*fp32", OUT="*bf16", N_TOK="i32", D="i32", MIX="*fp32",
                SCALE="*fp32", BASE="*fp32", eps="fp32", F2="*bf16", FN="*fp32", SS_OUT="*fp32", MIX_OUT="*fp32")
    few = {n: "i32" for n in indexer._scores_few_kernel.arg_names if n not in ("DI", "HP", "BLOCK_C", "F32_DOT",
                                                                                  "RATIO", "PDL")}
    few.update(Q="*bf16", K="*bf16", W="*bf16", ROWS="*i64", LO="*i64", HI="*i64", OUT="*bf16", w_scale="fp32")
    fp8 = dict(D=512, BLOCK_H=16, BLOCK_N=32, HAS_KV2=True, SPLIT=False, F32_DOT=False, KV2_FP8=True, NOPE=448,
               OFF_SC=448, OFF_ROPE=464, NATIVE_FP8=True)
    cases = [
        ("norm/RoPE 16 rows x 4096", norm_rope._norm_rope_kernel, nr,
         dict(DH=4096, DR2=32, NORM=True, WEIGHT=True, ROPE=False, BLOCK_R=16), 4),
        ("norm/RoPE 2 rows x 4096", norm_rope._norm_rope_kernel, nr,
         dict(DH=4096, DR2=32, NORM=True, WEIGHT=True, ROPE=False, BLOCK_R=2), 4),
        ("norm/RoPE 16 rows x 512, rope", norm_rope._norm_rope_kernel, nr,
         dict(DH=512, DR2=32, NORM=True, WEIGHT=True, ROPE=True, BLOCK_R=16), 4),
        ("mHC mix 16 tokens", mhc._hc_mix_kernel, mix, dict(NS=4, NP=32, BLOCK_T=16, BLOCK_K=64, PREC="ieee"), 4),
        ("mHC mix 32 tokens", mhc._hc_mix_kernel, mix, dict(NS=4, NP=32, BLOCK_T=32, BLOCK_K=64, PREC="ieee"), 4),
        ("mHC mix 32 tokens, bf16x3", mhc._hc_mix_kernel, mix,
         dict(NS=4, NP=32, BLOCK_T=32, BLOCK_K=64, PREC="ieee", SPLIT3=True), 4),
        ("mHC mix 64 tokens, bf16x3", mhc._hc_mix_kernel, mix,
         dict(NS=4, NP=32, BLOCK_T=64, BLOCK_K=64, PREC="ieee", SPLIT3=True), 4),
        ("mHC mix 128 tokens, bf16x3 (default)", mhc._hc_mix_kernel, mix,
         dict(NS=4, NP=32, BLOCK_T=128, BLOCK_K=64, PREC="ieee", SPLIT3=True), 4),
        ("mHC pre bwd 64 x 64, tf32x3", mhc._hc_pre_bwd_kernel, pbw,
         dict(NS=4, NP=32, WIDTH=24, BLOCK_T=64, BLOCK_D=64, PREC="tf32x3"), 4),
        ("mHC pre bwd 64 x 64, bf16x3", mhc._hc_pre_bwd_kernel, pbw,
         dict(NS=4, NP=32, WIDTH=24, BLOCK_T=64, BLOCK_D=64, PREC="ieee", SPLIT3=True), 4),
        ("mHC pre bwd 64 x 128, bf16x3", mhc._hc_pre_bwd_kernel, pbw,
         dict(NS=4, NP=32, WIDTH=24, BLOCK_T=64, BLOCK_D=128, PREC="ieee", SPLIT3=True), 4),
        ("mHC finish 8 x 128", mhc._hc_finish_kernel, fin,
         dict(ITERS=20, NS=4, NP=32, BLOCK_T=8, BLOCK_D=128, SPLIT_BLOCK=8, MIXES=None, RHO=None, PRE=None), 4),
        ("mHC finish 16 x 128", mhc._hc_finish_kernel, fin,
         dict(ITERS=20, NS=4, NP=32, BLOCK_T=16, BLOCK_D=128, SPLIT_BLOCK=4, MIXES=None, RHO=None, PRE=None), 4),
        ("mHC finish 1 x 1024", mhc._hc_finish_kernel, fin,
         dict(ITERS=20, NS=4, NP=32, BLOCK_T=1, BLOCK_D=1024, SPLIT_BLOCK=64, MIXES=None, RHO=None, PRE=None), 4),
        ("attention 32 heads x 512, 4 warps", sa._fwd_kernel, att,
         dict(D=512, BLOCK_H=32, BLOCK_N=32, HAS_KV2=True, SPLIT=False, F32_DOT=False), 4),
        ("attention 32 heads x 512, 8 warps", sa._fwd_kernel, att,
         dict(D=512, BLOCK_H=32, BLOCK_N=32, HAS_KV2=True, SPLIT=False, F32_DOT=False), 8),
        ("attention 16 heads x 512, 4 warps", sa._fwd_kernel, att,
         dict(D=512, BLOCK_H=16, BLOCK_N=32, HAS_KV2=True, SPLIT=False, F32_DOT=False), 4),
        ("attention 64 heads x 512, 64 keys, 8 w", sa._fwd_kernel, att,
         dict(D=512, BLOCK_H=64, BLOCK_N=64, HAS_KV2=True, SPLIT=False, F32_DOT=False), 8),
        ("attention 16 heads, FP8 entries", sa._fwd_kernel, dict(att, KV2="*u8"), dict(fp8, BLOCK_H=16), 4),
        ("attention 16 heads, FP8, 3 stages", sa._fwd_kernel, dict(att, KV2="*u8"), dict(fp8, BLOCK_H=16), 4, 3),
        ("attention 32 heads, FP8 entries", sa._fwd_kernel, dict(att, KV2="*u8"), dict(fp8, BLOCK_H=32), 4),
        ("attention 16 heads, FP8 entries, split", sa._fwd_kernel, dict(att, KV2="*u8"),
         dict(fp8, BLOCK_H=16, SPLIT=True), 4),
        ("attention 64 heads, FP8, 1 stage", sa._fwd_kernel, dict(att, KV2="*u8"),
         dict(fp8, BLOCK_H=64, BLOCK_N=64), 8, 1),
        ("attention 64 heads, FP8, 2 stages", sa._fwd_kernel, dict(att, KV2="*u8"),
         dict(fp8, BLOCK_H=64, BLOCK_N=64), 8, 2),
        ("attention 16 heads, FP8 entries, A100", sa._fwd_kernel, dict(att, KV2="*u8"),
         dict(fp8, BLOCK_H=16, NATIVE_FP8=False), 4),
        ("attention fp32, FP8 entries, 1 stage", sa._fwd_kernel,
         dict(att, KV2="*u8", Q="*fp32", KV="*fp32", OUT="*fp32"), dict(fp8, BLOCK_H=16, F32_DOT=True), 4, 1),
        ("attention bwd 16 heads, 16 keys", sa._bwd_kernel, attb,
         dict(D=512, BLOCK_H=16, BLOCK_N=16, HAS_KV2=True, F32_DOT=False), 4),
        ("attention bwd 16 heads, 32 keys", sa._bwd_kernel, attb,
         dict(D=512, BLOCK_H=16, BLOCK_N=32, HAS_KV2=True, F32_DOT=False), 4),
        ("expert GEMV up", moe_gemv._up_kernel, up, dict(HAS_LIMIT=True, BN=8, BK=256), 4),
        ("expert GEMV down", moe_gemv._down_kernel, down, dict(BN=8, BK=256), 4),
        ("GEMV 1 row x 1024", gemv._gemv_kernel, gv, dict(ROWS=1, BN=1, BK=1024), 4),
        ("GEMV 2 rows, 16 x 256", gemv._gemv_kernel, gv, dict(ROWS=2, BN=16, BK=256), 4),
        ("router 256 experts, top-6", router._route_kernel, rt,
         dict(K=6, BLOCK_E=256, BLOCK_K=8, FUNC=0, NORM=True, HASHED=False, PRECISE=True), 1),
        ("compressor entry 512", compressor._entry_kernel, en, dict(M=4, C=512, DR2=32), 4),
        ("compressor entry 512, FP8 row", compressor._entry_kernel, dict(en, ENT="*u8"),
         dict(M=4, C=512, DR2=32, KV8=True, VAL_DTYPE=tl.bfloat16, OFF_SC=448, OFF_ROPE=464, PRECISE=True), 4),
        ("compressor step 8 slots x 64", compressor._decode_step_kernel, st,
         dict(M=4, J=8, OVERLAP=True, BLOCK_C=64), 4),
        ("pooling gradient 8 slots x 128", compressor._pool_bwd_kernel, pb, dict(J=8, M=4, OVERLAP=True, BLOCK_C=128), 4),
        ("radix select bf16, 1024", indexer._select_kernel, sel,
         dict(NBITS=16, NEG_KEY=0x7F, BLOCK=1024, HAS_RANGE=True, RATIO=0), 4),
        ("radix select bf16, 2048, decode range", indexer._select_kernel, dict(sel, LO="*i64", HI="*i64"),
         dict(NBITS=16, NEG_KEY=0x7F, BLOCK=2048, HAS_RANGE=True, RATIO=4), 8),
        ("index scores, a decode query, 64 heads", indexer._scores_few_kernel, few,
         dict(DI=128, HP=64, BLOCK_C=32, F32_DOT=False, RATIO=4), 4),
        ("attention merge 4 x 512, 8 splits a load", sa._combine_kernel, cmb,
         dict(D=512, BLOCK_H=4, BLOCK_D=512, BLOCK_S=8), 4),
        ("attention merge 2 x 256, 8 splits a load", sa._combine_kernel, cmb,
         dict(D=512, BLOCK_H=2, BLOCK_D=256, BLOCK_S=8), 4),
        ("attention merge 8 x 128, 8 splits a load", sa._combine_kernel, cmb,
         dict(D=512, BLOCK_H=8, BLOCK_D=128, BLOCK_S=8), 4),
        ("attention merge 16 x 512, 8 splits a load", sa._combine_kernel, cmb,
         dict(D=512, BLOCK_H=16, BLOCK_D=512, BLOCK_S=8), 4),
        ("attention merge 16 x 512, 1 split a load", sa._combine_kernel, cmb,
         dict(D=512, BLOCK_H=16, BLOCK_D=512, BLOCK_S=1), 4),
        ("mHC post 4 tokens x 128", mhc._hc_post_kernel, post, dict(NS=4, BLOCK_T=4, BLOCK_D=128), 4),
        ("mHC post deferred, 1 token x 128, 1 w", mhc._hc_post_kernel, post,
         dict(NS=4, BLOCK_T=1, BLOCK_D=128, ITERS=20, DEFER=True), 1),
        ("mHC post deferred, shared add, 1 w", mhc._hc_post_kernel, post,
         dict(NS=4, BLOCK_T=1, BLOCK_D=128, ITERS=20, DEFER=True, ADD=True), 1),
        ("mHC post 4 tokens x 128, shared add", mhc._hc_post_kernel, post, dict(NS=4, BLOCK_T=4, BLOCK_D=128, ADD=True), 4),
        ("mHC post + next mix, 1 token x 32", mhc._hc_post_kernel, post,
         dict(NS=4, BLOCK_T=1, BLOCK_D=32, ITERS=20, DEFER=True, ADD=True, NP=32), 4),
        ("mHC post + next mix, 2 tokens x 32", mhc._hc_post_kernel, post,
         dict(NS=4, BLOCK_T=2, BLOCK_D=32, ITERS=20, DEFER=True, ADD=True, NP=32), 4),
        ("mHC finish 1 x 1024, deferred", mhc._hc_finish_kernel, dict(fin, MIXES="*fp32"),
         dict(ITERS=20, NS=4, NP=32, BLOCK_T=1, BLOCK_D=1024, SPLIT_BLOCK=64, RHO=None, PRE=None, DEFER=True), 1),
    ]
    only = sys.argv[1:]
    for name, fn, sig, consts, warps, *stages in cases:
        if only and not any(o in name for o in only):
            continue
        c, regs, spills = compile_sm90(fn, sig, consts, warps, *stages)
        smem = c.metadata.shared
        print(f"{name:40s} {regs:4d} registers, {spills:6d} B spilled, {smem / 1024:6.1f} KB shared"
              + ("  (over the 227 KB a block may take)" if smem > SMEM_LIMIT else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
