"""Compile the FP4 decode GEMV kernels for sm90 without a GPU and report what decides their speed.

The decode kernels of `dsv4/kernels/fp4_moe.py` are bound by integer work, not memory, so the number of
SASS instructions per weight byte is a good proxy for their speed. Triton compiles for a target it is
told (no driver needed; ptxas and nvdisasm ship with the wheel). Integer and pointer arguments get the
divisibility-by-16 attribute that the JIT gives them at run time for V4-Flash's shapes (without it the
byte loads would not vectorise and the counts would mislead).

    python3 bench/sass_fp4_gemv.py                   # the default launch configuration
    python3 bench/sass_fp4_gemv.py --bn 8 --bk 512 --warps 4
    python3 bench/sass_fp4_gemv.py --tiled           # registers and spills of the tiled gate/up kernel
    python3 bench/sass_fp4_gemv.py --words           # the word kernels: fp32 against packed fp16 arithmetic,
                                                     # the K loop plain and pipelined (fp4_moe.WORDS_PIPE),
                                                     # on released and repacked words (repack_words)
    python3 bench/sass_fp4_gemv.py --words --bn 32 --bk 256 --warps 4
    python3 bench/sass_fp4_gemv.py --words --ops     # and each K loop's instructions by opcode
"""
from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dsv4.kernels import fp4_moe  # noqa: E402
from ptxas_report import BIN, compile_sm90  # noqa: E402
UP = dict(x_ptr="*bf16", w1_ptr="*i8", s1_ptr="*u8", w3_ptr="*i8", s3_ptr="*u8", rw_ptr="*fp32", idx_ptr="*i64",
          h_ptr="*bf16", D="i32", I="i32", TOPK="i32", E="i32", limit="fp32", stride_xm="i32", stride_we="i32",
          stride_wn="i32", stride_se="i32", stride_sn="i32", stride_hm="i32", HAS_LIMIT="constexpr",
          BN="constexpr", BK="constexpr")
TILED_UP = dict(x_ptr="*bf16", w1_ptr="*i8", s1_ptr="*u8", w3_ptr="*i8", s3_ptr="*u8", rw_ptr="*fp32",
                row_map_ptr="*i32", block_expert_ptr="*i32", h_ptr="*bf16", D="i32", I="i32", TOPK="i32",
                n_blocks="*i32", limit="fp32", stride_xm="i32", stride_we="i32", stride_wn="i32", stride_se="i32",
                stride_sn="i32", stride_hm="i32", HAS_LIMIT="constexpr", DOT_FP32="constexpr", BM="constexpr",
                BN="constexpr", BK="constexpr")
WORDS_UP = dict(UP, w1_ptr="*i32", w3_ptr="*i32")
DOWN = dict(h_ptr="*bf16", w2_ptr="*i8", s2_ptr="*u8", idx_ptr="*i64", out_ptr="*bf16", D="i32", I="i32", E="i32",
            stride_hm="i32", stride_we="i32", stride_wn="i32", stride_se="i32", stride_sn="i32", stride_om="i32",
            BN="constexpr", BK="constexpr")
WORDS_DOWN = dict(DOWN, w2_ptr="*i32")


def report(fn, sig: dict, consts: dict, warps: int, stages: int, matrices: int) -> dict:
    names = fn.arg_names
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
             if t.startswith("*") or (t == "i32" and n not in ("TOPK", "E"))}
    c, regs, spills = compile_sm90(fn, sig, consts, warps, stages, attrs)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp, "k.cubin")
        cubin.write_bytes(c.asm["cubin"])
        sass = subprocess.run([f"{BIN}/nvdisasm", "-c", str(cubin)], capture_output=True, text=True).stdout
    labels, loops, ins = {}, [], []
    for line in sass.splitlines():
        m = re.match(r"\s*\.(L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ins)
        if re.search(r"/\*[0-9a-f]{4}\*/", line):
            n = len(ins)
            ins.append(line)
            b = re.search(r"BRA[^`]*`\(\.(L_x_\d+)\)", line)
            if b and labels.get(b.group(1), n + 1) <= n:
                loops.append((n - labels[b.group(1)] + 1, labels[b.group(1)]))
    loop, start = max(loops) if loops else (None, 0)
    # the opcodes of the longest loop (the K loop): where its instructions go
    ops = collections.Counter(re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", x).group(1)
                              for x in ins[start:start + (loop or 0)])
    bytes_per_thread = matrices * consts["BN"] * consts["BK"] // 2 / (32 * warps)
    return {"registers": regs, "spill_bytes": spills, "sass": len(ins), "k_loop": loop,
            "instructions_per_byte": loop / bytes_per_thread if loop else None, "k_loop_ops": dict(ops)}


def show_ops(r: dict, on: bool) -> None:
    """With --ops: the K loop's instructions by opcode, most frequent first (LDS/STS/BAR: layout changes
    through shared memory; IMAD.SHL/SHF/LOP3: code decoding; HFMA2: the products; FMUL/F2FP: x's scaling
    and packing)."""
    if on:
        print("    " + ", ".join(f"{k} {v}" for k, v in sorted(r["k_loop_ops"].items(), key=lambda kv: -kv[1])))


def resident(r: dict, tile: dict) -> str:
    """Programs of the tile an SM holds at once by its registers (sm90: 64K registers, 64 warps)."""
    per_sm = min(65536 // (r["registers"] * 32 * tile["num_warps"]), 64 // tile["num_warps"])
    return f"{per_sm} programs an SM"


def main(argv=None):
    cfg = fp4_moe.TILES["gemv"]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bn", type=int, default=cfg["BN"])
    ap.add_argument("--bk", type=int, default=cfg["BK"])
    ap.add_argument("--warps", type=int, default=cfg["num_warps"])
    ap.add_argument("--stages", type=int, default=cfg["num_stages"])
    ap.add_argument("--tiled", action="store_true", help="the tiled gate/up kernel at each launch size of _tiles, "
                                                         "and at K tiles of 128")
    ap.add_argument("--ops", action="store_true", help="also each K loop's instructions by opcode")
    ap.add_argument("--words", action="store_true", help="the int32-word gate/up kernel (fp4_moe.TILES['words']), "
                                                         "in fp32 and in packed fp16 arithmetic (WORDS_MATH)")
    a = ap.parse_args(argv)
    if a.words:
        w = dict(fp4_moe.TILES["words"])
        if a.bn != cfg["BN"] or a.bk != cfg["BK"] or a.warps != cfg["num_warps"]:
            w.update(BN=a.bn, BK=a.bk, num_warps=a.warps)
        for pipe, rep in ((False, False), (True, False), (False, True), (True, True)):
            how = ", pipelined" * pipe + ", repacked words" * rep
            for half in (False, True):
                consts = dict(HAS_LIMIT=True, BN=w["BN"], BK=w["BK"], HALF=half, ASM=True, PIPE=pipe,
                              AMAX_BLOCK=fp4_moe._amax_block(4096, w), REP=rep)
                r = report(fp4_moe._fp4_up_words_kernel, WORDS_UP, consts, w["num_warps"], w["num_stages"], 2)
                print(f"words up ({'half' if half else 'fp32'}{how}) BN {w['BN']} BK "
                      f"{w['BK']} warps {w['num_warps']}: {r['registers']} registers ({resident(r, w)}), "
                      f"{r['spill_bytes']} B spilled, K loop {r['k_loop']} SASS instructions = "
                      f"{r['instructions_per_byte']:.1f} per weight byte per thread")
                show_ops(r, a.ops)
            consts = dict(BN=w["BN"], BK=w["BK"], HALF=True, ASM=True, PIPE=pipe, AMAX_BLOCK=fp4_moe._amax_block(2048, w),
                          REP=rep)
            r = report(fp4_moe._fp4_down_words_kernel, WORDS_DOWN, consts, w["num_warps"], w["num_stages"], 1)
            print(f"words down (half{how}) BN {w['BN']} BK {w['BK']} warps "
                  f"{w['num_warps']}: {r['registers']} registers ({resident(r, w)}), {r['spill_bytes']} B spilled, "
                  f"K loop {r['k_loop']} SASS instructions = {r['instructions_per_byte']:.1f} per weight byte per thread")
            show_ops(r, a.ops)
        return
    if a.tiled:
        cases = [(fp4_moe._tiles(p), f"pairs/expert {p}") for p in (1, 32, 128)]
        cases += [((bm, dict(BN=64, BK=128, num_warps=4, num_stages=3)), "K tile 128") for bm in (16, 32)]
        for (bm, cfg), what in cases:
            consts = dict(HAS_LIMIT=True, DOT_FP32=False, BM=bm, BN=cfg["BN"], BK=cfg["BK"])
            r = report(fp4_moe._fp4_up_kernel, TILED_UP, consts, cfg["num_warps"], cfg["num_stages"], 2)
            print(f"tiled up ({what}) BM {bm} BN {cfg['BN']} BK {cfg['BK']} warps {cfg['num_warps']}: "
                  f"{r['registers']} registers, {r['spill_bytes']} B spilled")
        return
    for name, fn, sig, consts, mats in (
            ("up (w1, w3)", fp4_moe._fp4_up_gemv_kernel, UP, dict(HAS_LIMIT=True, BN=a.bn, BK=a.bk), 2),
            ("down (w2)", fp4_moe._fp4_down_gemv_kernel, DOWN, dict(BN=a.bn, BK=a.bk), 1)):
        r = report(fn, sig, consts, a.warps, a.stages, mats)
        print(f"{name:12s} BN {a.bn} BK {a.bk} warps {a.warps}: {r['registers']} registers, {r['spill_bytes']} B "
              f"spilled, K loop {r['k_loop']} SASS instructions = {r['instructions_per_byte']:.1f} per weight byte "
              f"per thread")


if __name__ == "__main__":
    main()
