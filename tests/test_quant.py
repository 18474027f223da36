"""FP8 e4m3 / FP4 e2m1 weight formats against an independent bit-level decoder written here in numpy; the
Triton FP8 GEMM and FP4 expert kernels against their PyTorch twins (`dsv4.ops`) and float64 dequantised math
(on CPU in the Triton interpreter, at tiny sizes)."""
from __future__ import annotations

import functools
import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

if not torch.cuda.is_available():   # kernels run in Triton's interpreter on CPU (read when they are imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsv4 import ops, quant

from conftest import GOLDEN_DIR

# Triton's interpreter converts its scalar program ids with a numpy call that numpy deprecates
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


# ----------------------------------------------------------------------------- independent reference (numpy)
def np_e4m3(bits: np.ndarray) -> np.ndarray:
    """e4m3fn bytes -> float64: 1 sign, 4 exponent (bias 7), 3 mantissa bits; S.1111.111 is NaN, no inf."""
    b = bits.astype(np.int64)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp, man = (b >> 3) & 0xF, b & 0x7
    val = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1 + man / 8.0) * 2.0 ** (exp - 7))
    val = np.where((exp == 15) & (man == 7), np.nan, val)
    return sign * val


def np_e8m0(bits: np.ndarray) -> np.ndarray:
    """e8m0 bytes -> float64: 2^(bits - 127), 0xFF is NaN."""
    b = bits.astype(np.int64)
    return np.where(b == 255, np.nan, np.exp2(b - 127.0))


def np_e2m1(code: np.ndarray) -> np.ndarray:
    """4-bit e2m1 codes -> float64: 1 sign, 2 exponent (bias 1), 1 mantissa bit."""
    c = code.astype(np.int64)
    sign = np.where(c & 0x8, -1.0, 1.0)
    exp, man = (c >> 1) & 0x3, c & 0x1
    return sign * np.where(exp == 0, man * 0.5, (1 + man / 2.0) * 2.0 ** (exp - 1))


def np_fp8_weight(wbytes: np.ndarray, sbytes: np.ndarray) -> np.ndarray:
    w, s = np_e4m3(wbytes), np_e8m0(sbytes)
    R, C = w.shape
    out = np.empty_like(w)
    for i in range(R):
        for j0 in range(0, C, 128):
            out[i, j0:j0 + 128] = w[i, j0:j0 + 128] * s[i // 128, j0 // 128]
    return out


def np_fp4_weight(packed: np.ndarray, sbytes: np.ndarray) -> np.ndarray:
    u = packed.view(np.uint8)
    R, half = u.shape
    codes = np.empty((R, 2 * half), dtype=np.uint8)
    codes[:, 0::2] = u & 0x0F        # low nibble = even element
    codes[:, 1::2] = u >> 4
    s = np_e8m0(sbytes)
    return np_e2m1(codes) * np.repeat(s, 32, axis=1)[:, :2 * half]


def raw_bytes(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.uint8).numpy()


# ----------------------------------------------------------------------------- decode
@pytest.mark.parametrize("shape", [(128, 256), (200, 300), (1, 129), (257, 5)])
def test_fp8_dequant_matches_bit_decoder(shape):
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    bits[bits & 0x7F == 0x7F] = 0                     # no NaN codes
    w = bits.view(torch.float8_e4m3fn)
    s_shape = (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    s = torch.randint(110, 140, s_shape, generator=g, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    ours = quant.dequant_fp8(w, s, dtype=torch.float64).numpy()
    ref = np_fp8_weight(raw_bytes(w), raw_bytes(s))
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("shape", [(4, 64), (3, 48), (65, 32)])
def test_fp4_dequant_matches_bit_decoder(shape):
    g = torch.Generator().manual_seed(1)
    packed = torch.randint(-128, 128, (shape[0], shape[1] // 2), generator=g, dtype=torch.int8)
    s = torch.randint(115, 135, (shape[0], math.ceil(shape[1] / 32)), generator=g,
                      dtype=torch.uint8).view(torch.float8_e8m0fnu)
    ours = quant.dequant_fp4(packed, s, dtype=torch.float64).numpy()
    np.testing.assert_array_equal(ours, np_fp4_weight(packed.numpy(), raw_bytes(s)))


def test_fp4_nibble_order_and_code_table():
    packed = torch.tensor([[0x71, -1]], dtype=torch.int8)
    one = torch.ones(1, 1).to(torch.float8_e8m0fnu)
    # 0x71: low nibble 1 (0.5) first, high nibble 7 (6.0) second; 0xFF: two codes 15 (-6)
    assert quant.dequant_fp4(packed, one).tolist() == [[0.5, 6.0, -6.0, -6.0]]
    codes = torch.arange(16, dtype=torch.uint8).view(1, 16)
    assert quant.fp4_codes_to_values(codes).tolist()[0] == [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5,
                                                            -2, -3, -4, -6]
    assert torch.equal(quant.unpack_fp4(quant.pack_fp4(codes)), codes)


# ----------------------------------------------------------------------------- quantise
def test_fp8_quantise_scale_rule_and_error_bound():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(300, 260, generator=g) * torch.logspace(-3, 2, 260).view(1, -1)
    w[:128, :128] = 0                                                  # an all-zero block
    q, s = quant.quant_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu and s.shape == (3, 3)
    wn = w.double().numpy()
    sn = np_e8m0(raw_bytes(s))
    for bi in range(3):
        for bj in range(3):
            blk = np.abs(wn[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128]).max()
            if blk > 0:
                assert sn[bi, bj] == 2.0 ** math.ceil(math.log2(blk / 448)), (bi, bj)
    back = np_fp8_weight(raw_bytes(q), raw_bytes(s))
    assert np.array_equal(back[:128, :128], np.zeros((128, 128)))
    # round to nearest: error ≤ half a step, i.e. 2^-4 relative for normals, 2^-10 · scale for subnormals
    scale_full = np.repeat(np.repeat(sn, 128, 0), 128, 1)[:300, :260]
    bound = np.maximum(np.abs(wn) * 2.0 ** -4, scale_full * 2.0 ** -10)
    assert (np.abs(back - wn) <= bound * (1 + 1e-12)).all()
    assert torch.equal(quant.fake_quant(w, "fp8"), torch.from_numpy(back).float())


def test_fp4_quantise_picks_the_nearest_code():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 96, generator=g) * torch.logspace(-2, 1, 64).view(-1, 1)
    packed, s = quant.quant_fp4(w)
    assert packed.shape == (64, 48) and s.shape == (64, 3)
    wn, sn = w.double().numpy(), np_e8m0(raw_bytes(s))
    for i in range(64):
        for b in range(3):
            assert sn[i, b] == 2.0 ** math.ceil(math.log2(np.abs(wn[i, 32 * b:32 * b + 32]).max() / 6))
    back = np_fp4_weight(packed.numpy(), raw_bytes(s))
    # brute force: every representable value of the element's block, nearest one
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -1, -1.5, -2, -3, -4, -6])
    scale_full = np.repeat(sn, 32, axis=1)
    cand = grid[None, None, :] * scale_full[..., None]
    best = np.abs(cand - wn[..., None]).min(-1)
    assert np.allclose(np.abs(back - wn), best, rtol=0, atol=1e-12)


def test_fp4_ties_round_to_even_codes():
    x = torch.tensor([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, 6.0, -0.1] + [0.0] * 22])
    packed, s = quant.quant_fp4(x)
    assert s.float().item() == 1.0
    assert quant.dequant_fp4(packed, s)[0, :10].tolist() == [0, 1, 1, 2, 2, 4, 4, -4, 6, 0]


# ----------------------------------------------------------------------------- the golden checkpoint
def test_golden_checkpoint_tensors_decode():
    weight_map = json.loads((GOLDEN_DIR / "model.safetensors.index.json").read_text())["weight_map"]

    def get(k):
        with safe_open(str(GOLDEN_DIR / weight_map[k]), "pt") as f:
            return f.get_tensor(k)

    for name in ("layers.1.attn.wq_b", "layers.2.attn.wo_a", "mtp.0.e_proj", "layers.3.attn.indexer.wq_b"):
        w, s = get(name + ".weight"), get(name + ".scale")
        assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu
        ours = quant.dequant_fp8(w, s, dtype=torch.float64).numpy()
        np.testing.assert_array_equal(ours, np_fp8_weight(raw_bytes(w), raw_bytes(s)))
        # the README's rule reproduces the stored codes and scales from the decoded values (for these tensors;
        # a block whose amax lies just above 224·2^k can round down to 224·2^k and requantise one scale lower)
        q2, s2 = quant.quant_fp8(torch.from_numpy(ours).float())
        assert torch.equal(raw_bytes_t(q2), raw_bytes_t(w)) and torch.equal(raw_bytes_t(s2), raw_bytes_t(s))
    for name in ("layers.0.ffn.experts.0.w1", "layers.3.ffn.experts.7.w2", "mtp.0.ffn.experts.5.w3"):
        w, s = get(name + ".weight"), get(name + ".scale")
        assert w.dtype == torch.int8 and s.dtype == torch.float8_e8m0fnu
        ours = quant.dequant_fp4(w, s, dtype=torch.float64).numpy()
        np.testing.assert_array_equal(ours, np_fp4_weight(w.numpy(), raw_bytes(s)))
        # each 1x32 block's largest code is in (3, 6]: the scale is the smallest power of two that fits
        # (a block whose amax rounded down to 3 shows a 3 — never less)
        peak = np.abs(ours).reshape(ours.shape[0], -1, 32).max(-1) / np_e8m0(raw_bytes(s))
        assert ((peak >= 3) & (peak <= 6)).all()


def raw_bytes_t(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


# ----------------------------------------------------------------------------- Triton kernels vs twins
KDEV = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}   # relative to max |reference|; bf16: output rounding
# the kernels' own bf16 outputs: Triton's interpreter casts fp32 -> bf16 by truncation (measured: every value
# equals the truncated one), which doubles the rounding error of a round-to-nearest GPU
KTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2 if INTERPRET else 1e-2}


def relerr(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double().cpu() - ref.double().cpu()).abs().max() / ref.double().abs().max()).item()


def rand_fp8(rows: int, cols: int, g, block=quant.FP8_BLOCK):
    """A random FP8 matrix whose blocks span several binades (so that every block scale differs)."""
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-2, 1, cols).view(1, -1)[:, torch.randperm(cols, generator=g)]
    return quant.quant_fp8(w, block)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 96, 256), (20, 130, 200), (33, 64, 128), (150, 70, 384)])
def test_fp8_kernel_matches_twin_and_float64(M, N, K, dtype):
    # the kernel itself at every M (the 'triton' entry of the table sends prefill-sized M on CUDA to
    # dequantise + cuBLAS, the twin)
    from dsv4.kernels.fp8_gemm import fp8_linear

    g = torch.Generator().manual_seed(M * N + K)
    w, s = rand_fp8(N, K, g)
    x = torch.randn(M, K, generator=g).to(dtype)
    ref = x.double() @ quant.dequant_fp8(w, s, dtype=torch.float64).t()       # float64 from the format decoder
    twin = ops.fp8_linear_torch(x, w, s)
    out = fp8_linear(x.to(KDEV), w.to(KDEV), s.to(KDEV))
    assert out.dtype == dtype and out.shape == (M, N)
    assert relerr(twin, ref) <= TOL[dtype] and relerr(out, ref) <= KTOL[dtype]
    assert relerr(out, twin) <= KTOL[dtype]


def test_fp8_kernel_paths(monkeypatch):
    """The sm89+ native e4m3 conversion, K split over programs (decode), fp32 scales, 64x64 blocks and
    leading batch dims give the float64 result too."""
    import dsv4.kernels.fp8_gemm as k

    g = torch.Generator().manual_seed(5)
    w, s = rand_fp8(70, 384, g)
    x = torch.randn(2, 3, 384, generator=g)
    ref = x.double() @ quant.dequant_fp8(w, s, dtype=torch.float64).t()
    dev = lambda *t: [a.to(KDEV) for a in t]                                            # noqa: E731
    assert relerr(k.fp8_linear(*dev(x, w, s.float())), ref) <= 1e-5                   # fp32 scales
    w64, s64 = rand_fp8(70, 384, g, block=(64, 64))
    ref64 = x.double() @ quant.dequant_fp8(w64, s64, (64, 64), dtype=torch.float64).t()
    assert relerr(k.fp8_linear(*dev(x, w64, s64), block=(64, 64)), ref64) <= 1e-5
    cfg, _ = k._tiles(6, 70, 384, 128, torch.device(KDEV))
    monkeypatch.setattr(k, "_tiles", lambda *a: (cfg, 3))                              # split K in 3
    assert relerr(k.fp8_linear(*dev(x, w, s)), ref) <= 1e-5
    if k.INTERPRET:
        monkeypatch.setattr(k, "_native_fp8", lambda device: True)
        assert relerr(k.fp8_linear(*dev(x, w, s)), ref) <= 1e-5


def f64_fp8_linear(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, block=quant.FP8_BLOCK) -> torch.Tensor:
    """x · (W ⊙ S)ᵀ in float64: the e4m3 bytes through the numpy decoder, e8m0 scales through theirs (fp32
    scales as they are), every block's scale spread over its rows and columns."""
    N, K = w.shape
    wd = torch.from_numpy(np_e4m3(raw_bytes(w)))
    sd = torch.from_numpy(np_e8m0(raw_bytes(s))) if s.dtype == torch.float8_e8m0fnu else s.double()
    sd = sd.repeat_interleave(block[0], 0)[:N].repeat_interleave(block[1], 1)[:, :K]
    return x.double().reshape(-1, K) @ (wd * sd).t()


def fp32_scales(s: torch.Tensor, g) -> torch.Tensor:
    """e8m0 scales times random factors in [0.5, 2): fp32 scales that are not powers of two."""
    return s.float() * (0.5 + 1.5 * torch.rand(s.shape, generator=g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K,scales", [(200, 384, "e8m0"), (130, 200, "fp32")])
@pytest.mark.parametrize("M", [1, 2, 3, 4])
def test_fp8_gemv_matches_twin_and_float64(M, N, K, scales, dtype):
    """The decode GEMV (one launch carries up to 4 rows of x) against the twin and float64, with N and K
    off the 128 blocks (masked rows, columns and scale blocks), e8m0 and fp32 scales."""
    from dsv4.kernels.fp8_gemm import fp8_gemv

    g = torch.Generator().manual_seed(100 * M + N + K)
    w, s = rand_fp8(N, K, g)
    if scales == "fp32":
        s = fp32_scales(s, g)
    x = torch.randn(M, K, generator=g).to(dtype)
    ref = f64_fp8_linear(x, w, s)
    twin = ops.fp8_linear_torch(x, w, s)
    out = fp8_gemv(x.to(KDEV), w.to(KDEV), s.to(KDEV))
    assert out.dtype == dtype and out.shape == (M, N)
    assert relerr(twin, ref) <= TOL[dtype]
    assert relerr(out, ref) <= KTOL[dtype] and relerr(out, twin) <= KTOL[dtype]


def test_fp8_gemv_launch_variants(monkeypatch):
    """Tile variants (a chunk of several scale blocks, chunks smaller than a scale block, one-row
    programs), non-contiguous x (row stride, column stride, leading dims), 64x64 blocks, more rows than
    one launch carries, the native e4m3 conversion: all give the float64 result."""
    import dsv4.kernels.fp8_gemm as k

    g = torch.Generator().manual_seed(7)
    N, K = 36, 200                                  # few programs even at one row each (interpreter time)
    w, s = rand_fp8(N, K, g)
    s32 = fp32_scales(s, g)
    dev = lambda *t: [a.to(KDEV) for a in t]                                            # noqa: E731
    base = torch.randn(3, K + 40, generator=g)
    x = base[:, 8:8 + K]                                                                # row stride K + 40
    assert not x.is_contiguous()
    ref = f64_fp8_linear(x, w, s)
    for tiles in (dict(BN=8, BK=256), dict(BN=2, BK=64), dict(BN=1, BK=512), dict(BN=128, BK=128),
                  dict(BN=16, BK=128, num_warps=2)):
        assert relerr(k.fp8_gemv(*dev(x, w, s), **tiles), ref) <= 1e-5, tiles
    assert relerr(k.fp8_gemv(*dev(x, w, s32), BN=8, BK=256), f64_fp8_linear(x, w, s32)) <= 1e-5
    xc = torch.randn(2, 2 * K, generator=g)[:, ::2]                                     # column stride 2
    assert relerr(k.fp8_gemv(*dev(xc, w, s)), f64_fp8_linear(xc, w, s)) <= 1e-5
    x3 = torch.randn(2, 1, K, generator=g).to(torch.bfloat16)                            # [2, 1, K]: M = 2
    out3 = k.fp8_gemv(*dev(x3, w, s))
    assert out3.shape == (2, 1, N) and relerr(out3.reshape(2, N), f64_fp8_linear(x3, w, s)) <= KTOL[torch.bfloat16]
    w64, s64 = rand_fp8(70, K, g, block=(64, 64))
    x2 = torch.randn(2, K, generator=g)
    assert relerr(k.fp8_gemv(*dev(x2, w64, s64), block=(64, 64)), f64_fp8_linear(x2, w64, s64, (64, 64))) <= 1e-5
    x6 = torch.randn(6, K, generator=g)                                                 # two launches (4 + 2 rows)
    assert relerr(k.fp8_gemv(*dev(x6, w, s)), f64_fp8_linear(x6, w, s)) <= 1e-5
    with pytest.raises(ValueError, match="BN must be a power of two"):
        k.fp8_gemv(*dev(x2, w64, s64), block=(64, 64), BN=128)                         # rows over two scale rows
    # weight sub-tiles sharing x (one row of x): the last program's sub-tiles partly or wholly past N = 36
    x1 = x[:1]
    for tiles in (dict(BN=8, BK=64, RSUB=2), dict(BN=16, BK=128, RSUB=4), dict(BN=32, BK=256, RSUB=4)):
        assert relerr(k.fp8_gemv(*dev(x1, w, s32), **tiles), f64_fp8_linear(x1, w, s32)) <= 1e-5, tiles
    assert relerr(k.fp8_gemv(*dev(x, w, s), BN=8, BK=64, RSUB=4), ref) <= 1e-5   # 3 rows: RSUB applies to 1 only
    with pytest.raises(ValueError, match="RSUB"):
        k.fp8_gemv(*dev(x1, w, s), BN=2, BK=64, RSUB=4)
    if k.INTERPRET:
        monkeypatch.setattr(k, "_native_fp8", lambda device: True)
        assert relerr(k.fp8_gemv(*dev(x, w, s)), ref) <= 1e-5


def f64_grouped(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, block=quant.FP8_BLOCK) -> torch.Tensor:
    """x [..., G, K] through the grouped projection (G blocks of rows of W, block g reading x[..., g]) in float64."""
    G, K = x.shape[-2:]
    wd = quant.dequant_fp8(w, s, block, dtype=torch.float64).view(G, -1, K)
    return torch.einsum("...gk,grk->...gr", x.double(), wd).flatten(-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_grouped_gemv_matches_twin_and_float64(dtype):
    """The grouped GEMV (the attention's `wo_a` on its FP8 weight): groups of 64 rows under 128-row scale
    blocks (a scale row spans two groups), K off the blocks, one and two rows of leading dims, fp32 scales,
    a tile that would straddle two groups (refused), and the attention's seam (`grouped_linear`)."""
    from dsv4.attention import grouped_linear
    from dsv4.kernels.fp8_gemm import fp8_grouped_gemv

    g = torch.Generator().manual_seed(21)
    G, R, K = 3, 64, 160
    w, s = rand_fp8(G * R, K, g)
    for lead in [(1,), (2, 1)]:
        x = torch.randn(*lead, G, K, generator=g).to(dtype)
        ref, twin = f64_grouped(x, w, s), ops.fp8_grouped_linear_torch(x, w, s)
        out = fp8_grouped_gemv(*(t.to(KDEV) for t in (x, w, s)))
        assert out.dtype == dtype and out.shape == (*lead, G * R)
        assert relerr(twin, ref) <= TOL[dtype] and relerr(out, ref) <= KTOL[dtype] and relerr(out, twin) <= KTOL[dtype]
    s32 = fp32_scales(s, g)
    x = torch.randn(1, G, K, generator=g)
    assert relerr(fp8_grouped_gemv(*(t.to(KDEV) for t in (x, w, s32)), BN=16, BK=64), f64_grouped(x, w, s32)) <= 1e-5
    assert relerr(fp8_grouped_gemv(*(t.to(KDEV) for t in (x, w, s32)), BN=16, BK=64, RSUB=4),
                  f64_grouped(x, w, s32)) <= 1e-5
    with pytest.raises(ValueError, match="BN must be a power of two"):
        fp8_grouped_gemv(*(t.to(KDEV) for t in (x, w, s)), BN=128)
    layer = quant.FP8Linear(K, G * R)
    layer.weight.copy_(w)
    layer.scale.copy_(s)
    assert relerr(grouped_linear(x, layer, G), f64_grouped(x, w, s)) <= 1e-5


class _LaunchSpy:
    """Stands in for a Triton kernel and counts its launches, which run the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_fp8_small_m_takes_the_gemv(monkeypatch):
    """Up to GEMV_MAX_ROWS rows of x, `fp8_linear` (through the 'triton' backend entry) is one GEMV launch
    and no tiled one; a row more goes to the tiled kernel. The forced tiled path at M = 1 (what the GEMV
    replaced) still agrees."""
    import dsv4.kernels.fp8_gemm as k

    g = torch.Generator().manual_seed(11)
    w, s = rand_fp8(130, 200, g)
    dev = lambda *t: [a.to(KDEV) for a in t]                                            # noqa: E731
    for M in (1, k.GEMV_MAX_ROWS, k.GEMV_MAX_ROWS + 1):
        gemv, tiled = _LaunchSpy(k._fp8_gemv_kernel), _LaunchSpy(k._fp8_gemm_kernel)
        monkeypatch.setattr(k, "_fp8_gemv_kernel", gemv)
        monkeypatch.setattr(k, "_fp8_gemm_kernel", tiled)
        x = torch.randn(M, 200, generator=g)
        out = ops.fp8_linear_triton(*dev(x, w, s))
        assert relerr(out, f64_fp8_linear(x, w, s)) <= 1e-5
        assert (gemv.launches, tiled.launches) == ((1, 0) if M <= k.GEMV_MAX_ROWS else (0, 1)), M
        monkeypatch.undo()
    x = torch.randn(1, 200, generator=g)
    assert relerr(k._fp8_gemm(*dev(x, w, s), 128, 128, path="tiled"), f64_fp8_linear(x, w, s)) <= 1e-5


def test_fp8_kernel_rejects_bad_inputs():
    from dsv4.kernels.fp8_gemm import fp8_linear

    w, s = quant.quant_fp8(torch.randn(64, 128))
    x = torch.randn(2, 128)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_linear(x, w.float(), s)
    with pytest.raises(ValueError, match="features"):
        fp8_linear(torch.randn(2, 96), w, s)
    with pytest.raises(ValueError, match="scale must be"):
        fp8_linear(x, w, s[:, :0])
    with pytest.raises(ValueError, match="activations"):
        fp8_linear(x.double(), w, s)


def rand_experts(E: int, D: int, I: int, g):
    """Packed FP4 experts (w1, s1, w2, s2, w3, s3) from random matrices."""
    def stack(rows, cols):
        parts = [quant.quant_fp4(torch.randn(rows, cols, generator=g) * 3 / cols ** 0.5) for _ in range(E)]
        return torch.stack([p for p, _ in parts]), torch.stack([s for _, s in parts])
    w1, s1 = stack(I, D)
    w2, s2 = stack(D, I)
    w3, s3 = stack(I, D)
    return w1, s1, w2, s2, w3, s3


def ref_experts(x, idx, weight, w1, s1, w2, s2, w3, s3, limit):
    """Spec §8.4 in float64, one (token, expert) pair at a time; ids outside [0, E) contribute nothing."""
    deq = lambda w, s, e: quant.dequant_fp4(w[e], s[e], dtype=torch.float64)           # noqa: E731
    x = x.double()
    y = torch.zeros_like(x)
    for t in range(idx.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            if not 0 <= e < w1.shape[0]:
                continue
            gate, upv = deq(w1, s1, e) @ x[t], deq(w3, s3, e) @ x[t]
            if limit > 0:
                upv, gate = upv.clamp(-limit, limit), gate.clamp(max=limit)
            y[t] += deq(w2, s2, e) @ (torch.nn.functional.silu(gate) * upv * float(weight[t, k]))
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K,E,path", [(n, k, e, path) for n, k, e in [(13, 2, 8), (40, 2, 3)]
                                        for path in ["bytes", "words", "words_pair", "dot", "dequant"]
                                        if (n, path[:5]) != (40, "words")])   # (interpreter time; decode-sized only)
def test_fp4_kernel_matches_twin_and_float64(N, K, E, dtype, path, monkeypatch):
    # every launch path on every shape: the per-pair GEMVs (decode: on bytes and on int32 words, the
    # words' down projection summing a token's pairs in the kernel or not), the tiled blocks of pairs,
    # and dequantise-then-grouped-GEMM (prefill on CUDA)
    from dsv4.kernels import fp4_moe
    from dsv4.kernels.fp4_moe import fp4_experts

    monkeypatch.setattr(fp4_moe, "DECODE_KERNEL", "bytes" if path == "bytes" else "words")
    monkeypatch.setattr(fp4_moe, "WORDS_DOWN", "pair" if path == "words_pair" else "token")
    monkeypatch.setattr(fp4_moe, "_path", lambda n_pairs, n_experts: "gemv" if path in ("bytes", "words_pair")
                        else path)
    if path == "dequant":               # two experts per chunk: several chunks, some without pairs
        fp4_experts = functools.partial(ops.fp4_experts_dequant, chunk=2)   # noqa: F811

    g = torch.Generator().manual_seed(N * E + K)
    D, I = 64, 32
    ws = rand_experts(E, D, I, g)
    x = torch.randn(N, D, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    idx[::5, 0] = -1                      # pairs held by another rank (expert parallelism)
    idx[1, -1] = E + 2
    weight = torch.rand(N, K, generator=g)
    ref = ref_experts(x, idx, weight, *ws, 10.0)
    twin = ops.fp4_experts_torch(x, idx, weight, *ws, 10.0)
    empty = torch.empty
    # fresh buffers full of NaN: every output row a kernel leaves unwritten (a pair of another rank's
    # expert, which must add zero) would show
    monkeypatch.setattr(fp4_moe.torch, "empty", lambda *a, **kw: empty(*a, **kw).fill_(float("nan"))
                        if kw.get("dtype", torch.float32).is_floating_point else empty(*a, **kw))
    out = fp4_experts(*(t.to(KDEV) for t in (x, idx, weight, *ws)), 10.0)
    monkeypatch.setattr(fp4_moe.torch, "empty", empty)
    assert out.dtype == dtype and out.shape == (N, D)
    assert relerr(twin, ref) <= TOL[dtype] and relerr(out, ref) <= KTOL[dtype]
    assert relerr(out, twin) <= KTOL[dtype]


@pytest.mark.parametrize("down", ["pair", "token"])
def test_fp4_words_half_arithmetic_scales_each_row(down, monkeypatch):
    """The word GEMVs' packed fp16 arithmetic (`half2`) scales each row of x (and of h) by a power of
    two before its fp16 products: rows far below fp16's smallest value (1e-12, h ~ 1e-24), far above its largest
    value (3e5) and a row of zeros give the float64 result to bf16 accuracy, like the fp32 arithmetic;
    without the scaling the first would flush to zero and the second overflow to inf."""
    from dsv4.kernels import fp4_moe

    monkeypatch.setattr(fp4_moe, "WORDS_DOWN", down)
    g = torch.Generator().manual_seed(11)
    E, D, I, N, K = 4, 64, 32, 4, 2
    ws = rand_experts(E, D, I, g)
    x = torch.randn(N, D, generator=g)
    x = (x * torch.tensor([1e-12, 1.0, 3e5, 0.0])[:, None]).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    weight = torch.rand(N, K, generator=g)
    ref = ref_experts(x, idx, weight, *ws, 0.0)                     # no clamp: h keeps x's magnitude
    outs = {}
    for math in ("half", "fp32"):
        monkeypatch.setattr(fp4_moe, "WORDS_MATH", math)
        outs[math] = fp4_moe._fp4_moe(*(t.to(KDEV) for t in (x, idx, weight, *ws)), 0.0, path="words").cpu()
    for math, out in outs.items():
        assert torch.isfinite(out).all(), math
        assert (out[3] == 0).all(), math
        for n in range(3):                                          # each row against its own scale
            assert relerr(out[n], ref[n]) <= KTOL[torch.bfloat16], (math, n)
    assert relerr(outs["half"][:3], outs["fp32"][:3]) <= KTOL[torch.bfloat16]


def test_fp4_words_pipelined_loop_is_the_same_arithmetic(monkeypatch):
    """The word GEMVs' K loop with the next step's words, scales and x loaded ahead (`WORDS_PIPE`) and
    the row max read in blocks of 32 (`WORDS_AMAX_BLOCK`) computes what the plain loop does, bit for
    bit, in both arithmetics and both down kernels; the rows span two K steps, the second partly past
    the row (D = I = 1.5 steps of 64), so a step that used the wrong step's tiles would show."""
    from dsv4.kernels import fp4_moe

    monkeypatch.setitem(fp4_moe.TILES, "words", dict(BN=16, BK=64, num_warps=4, num_stages=2))   # (as interpreted)
    g = torch.Generator().manual_seed(23)
    E, D, I, N, K = 4, 96, 96, 2, 2
    ws = rand_experts(E, D, I, g)
    x = torch.randn(N, D, generator=g).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    idx[1, 1] = -1                                                  # a pair of another rank's expert
    weight = torch.rand(N, K, generator=g)
    ref = ref_experts(x, idx, weight, *ws, 10.0)
    args = [t.to(KDEV) for t in (x, idx, weight, *ws)]
    for down, math in (("pair", "half"), ("pair", "fp32"), ("token", "half")):
        monkeypatch.setattr(fp4_moe, "WORDS_DOWN", down)
        monkeypatch.setattr(fp4_moe, "WORDS_MATH", math)
        outs = []
        for pipe, amax in ((False, None), (True, 32)):
            monkeypatch.setattr(fp4_moe, "WORDS_PIPE", pipe)
            monkeypatch.setattr(fp4_moe, "WORDS_AMAX_BLOCK", amax)
            outs.append(fp4_moe._fp4_moe(*args, 10.0, path="words").cpu())
        assert relerr(outs[0], ref) <= KTOL[torch.bfloat16], (down, math)
        assert torch.equal(outs[1], outs[0]), (down, math)


def test_fp4_repacked_words_give_the_released_codes(monkeypatch):
    """`repack_words`' layout: the two-operation decode of each pair (`REPACK_SHIFTS`) of a repacked word
    gives the bits the released layout's decode gives (every pair of random words, in int64 arithmetic
    here), and the word kernels on repacked experts give the released experts' outputs bit for bit (both
    arithmetics, both down kernels); other paths refuse repacked words."""
    from dsv4.kernels import fp4_moe

    g = torch.Generator().manual_seed(5)
    codes = torch.randint(-128, 128, (64, 64), generator=g, dtype=torch.int8)
    u = codes.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    r = fp4_moe.repack_words(codes).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    full = 0xFFFFFFFF
    for i, shifts in enumerate(fp4_moe.REPACK_SHIFTS):
        released = ((u << (9 - 4 * i) if i < 3 else u >> 3) & 0x0E000E00) | ((u << (12 - 4 * i)) & 0x80008000)
        mixed = torch.zeros_like(r)
        for s in shifts:
            mixed ^= ((r << s) & full) if s >= 0 else r >> -s
        assert torch.equal(mixed & 0x8E008E00, released & full), i
    assert not torch.equal(r, u)
    E, D, I, N, K = 4, 64, 64, 2, 2
    ws = list(rand_experts(E, D, I, g))
    x = torch.randn(N, D, generator=g).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    weight = torch.rand(N, K, generator=g)
    rep = [fp4_moe.repack_words(t) if k % 2 == 0 else t for k, t in enumerate(ws)]      # w1, w2, w3 repacked
    for down, math in (("pair", "half"), ("token", "fp32")):
        monkeypatch.setattr(fp4_moe, "WORDS_DOWN", down)
        monkeypatch.setattr(fp4_moe, "WORDS_MATH", math)
        plain = fp4_moe._fp4_moe(*(t.to(KDEV) for t in (x, idx, weight, *ws)), 10.0, path="words")
        mixed = fp4_moe._fp4_moe(*(t.to(KDEV) for t in (x, idx, weight, *rep)), 10.0, path="words", repacked=True)
        assert relerr(plain, ref_experts(x, idx, weight, *ws, 10.0)) <= KTOL[torch.bfloat16]
        assert torch.equal(mixed.cpu(), plain.cpu()), (down, math)
    with pytest.raises(ValueError, match="word kernels only"):
        fp4_moe._fp4_moe(x.to(KDEV), idx.to(KDEV), weight.to(KDEV), *(t.to(KDEV) for t in rep), 10.0, path="dot",
                         repacked=True)


def test_fp4_dequant_kernel_equals_the_format_decoder():
    from dsv4.kernels.fp4_moe import dequant_fp4

    g = torch.Generator().manual_seed(13)
    w, s = quant.quant_fp4(torch.randn(3 * 40, 96, generator=g) * 2)
    w, s = w.view(3, 40, 48), s.view(3, 40, 3)
    want = torch.stack([quant.dequant_fp4(w[e], s[e], dtype=torch.float64) for e in range(3)])
    for dtype in (torch.float32, torch.bfloat16):
        got = dequant_fp4(w.to(KDEV), s.to(KDEV), dtype)
        assert got.dtype == dtype and torch.equal(got.cpu().double(), want)      # exact in bf16


def test_fp4_twin_without_host_sync(monkeypatch):
    """The capture-safe twin (each pair's expert dequantised) equals the one that finds the used experts."""
    g = torch.Generator().manual_seed(11)
    ws = rand_experts(6, 64, 32, g)
    x, idx, weight = torch.randn(5, 64, generator=g), torch.randint(-1, 6, (5, 3), generator=g), torch.rand(5, 3)
    synced = ops.fp4_experts_torch(x, idx, weight, *ws, 10.0)
    monkeypatch.setattr(ops, "_syncs_allowed", lambda x: False)
    assert relerr(ops.fp4_experts_torch(x, idx, weight, *ws, 10.0), synced) <= 1e-6
    assert relerr(synced, ref_experts(x, idx, weight, *ws, 10.0)) <= 1e-5


def test_fp4_alignment_of_pairs_to_blocks():
    """Every used block holds pairs of one expert, in token order, padded with -1; each pair exactly once."""
    from dsv4.kernels.fp4_moe import _align

    g = torch.Generator().manual_seed(12)
    E, bm = 7, 4
    idx = torch.randint(-1, E + 1, (23, 3), generator=g)                                 # includes foreign ids
    row_map, block_expert, n_blocks = _align(idx, E, bm)
    flat = idx.reshape(-1)
    n = int(n_blocks)
    assert (block_expert[n:] == -1).all() and (row_map[n * bm:] == -1).all()
    seen = []
    for b in range(n):
        rows = [int(r) for r in row_map[b * bm:(b + 1) * bm] if r >= 0]
        assert rows and all(int(flat[r]) == int(block_expert[b]) for r in rows) and rows == sorted(rows)
        seen += rows
    mine = [i for i, e in enumerate(flat.tolist()) if 0 <= e < E]
    assert sorted(seen) == mine and len(seen) == len(set(seen))
    assert n == sum(-(-int((flat == e).sum()) // bm) for e in range(E))


def test_fp4_kernel_rejects_bad_inputs():
    from dsv4.kernels.fp4_moe import fp4_experts

    g = torch.Generator().manual_seed(13)
    w1, s1, w2, s2, w3, s3 = rand_experts(4, 64, 32, g)
    x, idx, wt = torch.randn(3, 64), torch.zeros(3, 2, dtype=torch.long), torch.rand(3, 2)
    with pytest.raises(ValueError, match="w2 must be int8"):
        fp4_experts(x, idx, wt, w1, s1, w2[:, :32], s2, w3, s3, 10.0)
    with pytest.raises(ValueError, match="s1 must be float8_e8m0fnu"):
        fp4_experts(x, idx, wt, w1, s1.float(), w2, s2, w3, s3, 10.0)
    with pytest.raises(ValueError, match=r"idx and weight \[N, K\]"):
        fp4_experts(x, idx, wt[:, :1], w1, s1, w2, s2, w3, s3, 10.0)
    from dsv4.kernels import fp4_moe
    for name, bad in (("DECODE_KERNEL", "word"), ("WORDS_DOWN", "tokens")):
        old = getattr(fp4_moe, name)
        try:   # a misspelt kernel choice is an error, not a silent fall-back to another kernel
            setattr(fp4_moe, name, bad)
            with pytest.raises(ValueError, match=f"got .*{bad!r}"):
                fp4_experts(x, idx, wt, w1, s1, w2, s2, w3, s3, 10.0)
        finally:
            setattr(fp4_moe, name, old)
    old = fp4_moe.WORDS_AMAX_BLOCK
    try:       # a row-max block the kernel cannot take is refused before any launch
        for bad in (100, 16, 512.0):
            fp4_moe.WORDS_AMAX_BLOCK = bad
            with pytest.raises(ValueError, match="WORDS_AMAX_BLOCK must be None or a power of two"):
                fp4_moe._fp4_moe(x, idx, wt, w1, s1, w2, s2, w3, s3, 10.0, path="words")
    finally:
        fp4_moe.WORDS_AMAX_BLOCK = old
    with pytest.raises(ValueError, match="last dim divisible by 4"):
        fp4_moe.repack_words(w1[..., :30])
    assert fp4_moe.repack_words(w1[:0]).shape == (0,) + w1.shape[1:]


def test_quant_primitives_in_the_backend_table():
    assert ops.fp8_linear.choose("cpu", torch.float32) == "torch"
    assert ops.fp4_experts.choose("cuda", torch.bfloat16) == ("triton" if ops.triton_available() else "torch")
    with pytest.raises(ValueError, match="no implementation"):
        ops.set_backend({"fp8_linear": "cuda"})
    try:
        ops.set_backend("fp8_linear=triton")
        assert ops.fp8_linear.choose("cpu", torch.float32) == "triton"
    finally:
        ops.set_backend(None)
