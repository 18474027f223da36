"""The FP4 word kernels' K-loop forms at V4-Flash's real shapes and GPU launch tiles, on the CPU: the
pipelined loop, the one-block row max and the repacked words (`fp4_moe.WORDS_PIPE`, `WORDS_AMAX_BLOCK`,
`repack_words`) against the plain loop, bit for bit, for one token's two pairs (D = 4096, I = 2048;
tiles 16 x 512: 8 K steps up, 4 down; and 32 x 256), under the Triton interpreter with the packed fp16
arithmetic emulated (the unit tests run interpreter-sized tiles only). About 3 minutes a form on 2 cores.

    python3 bench/check_fp4_loop_real_shapes.py
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from dsv4 import quant  # noqa: E402
from dsv4.kernels import fp4_moe as f  # noqa: E402
from dsv4.kernels.launch import cdiv  # noqa: E402

E, D, I, K, LIMIT = 2, 4096, 2048, 2, 10.0


def main() -> int:
    torch.manual_seed(0)

    def experts(rows, cols):
        w, s = quant.quant_fp4(torch.randn(E * rows, cols) * 3 / cols ** 0.5)
        return w.view(E, rows, cols // 2), s.view(E, rows, -1)
    (w1, s1), (w3, s3), (w2, s2) = experts(I, D), experts(I, D), experts(D, I)
    x = torch.randn(1, D).to(torch.bfloat16)
    idx = torch.tensor([0, 1])
    rw = torch.rand(K)
    s1u, s2u, s3u = (t.view(torch.uint8) for t in (s1, s2, s3))
    words = {False: (w1, w2, w3), True: tuple(f.repack_words(t) for t in (w1, w2, w3))}

    def run(pipe, amax, rep, BN=16, BK=512):
        a1, a2, a3 = (t.view(torch.int32) for t in words[rep])
        h = torch.empty(K, I, dtype=x.dtype)
        out = torch.empty(K, D, dtype=x.dtype)
        t = time.time()
        f._fp4_up_words_kernel[(K, cdiv(I, BN))](
            x, a1, s1u, a3, s3u, rw, idx, h, D, I, K, E, LIMIT, x.stride(0), a1.stride(0), a1.stride(1),
            s1u.stride(0), s1u.stride(1), h.stride(0), HAS_LIMIT=True, BN=BN, BK=BK, HALF=True, ASM=False,
            PIPE=pipe, AMAX_BLOCK=amax, REP=rep)
        f._fp4_down_words_kernel[(K, cdiv(D, BN))](
            h, a2, s2u, idx, out, D, I, E, h.stride(0), a2.stride(0), a2.stride(1), s2u.stride(0), s2u.stride(1),
            out.stride(0), BN=BN, BK=BK, HALF=True, ASM=False, PIPE=pipe, AMAX_BLOCK=min(amax, I), REP=rep)
        print(f"pipelined {pipe}, row max in {amax}, repacked {rep}, tile {BN} x {BK}: {time.time() - t:.0f} s",
              flush=True)
        return h, out

    h0, o0 = run(False, 512, False)
    deq = lambda w, s, e: quant.dequant_fp4(w[e], s[e], dtype=torch.float64)          # noqa: E731
    xt = x[0].double()
    ref = torch.stack([deq(w2, s2, e) @ (torch.nn.functional.silu((deq(w1, s1, e) @ xt).clamp(max=LIMIT))
                                         * (deq(w3, s3, e) @ xt).clamp(-LIMIT, LIMIT) * float(rw[k]))
                       for k, e in enumerate(idx.tolist())])
    print(f"plain loop against float64: {float((o0.double() - ref).abs().max() / ref.abs().max()):.1e}")
    bad = 0
    for pipe, amax, rep, bn, bk in ((True, 4096, False, 16, 512), (False, 4096, True, 16, 512),
                                    (True, 4096, True, 16, 512), (True, 4096, True, 32, 256)):
        h, o = run(pipe, amax, rep, bn, bk)
        same = torch.equal(h, h0) and torch.equal(o, o0)
        bad += not same
        print(f"  h and out equal to the plain loop's: {same}", flush=True)
    return int(bad > 0)


if __name__ == "__main__":
    raise SystemExit(main())
