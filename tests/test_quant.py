"""FP8 e4m3 / FP4 e2m1 weight formats against an independent bit-level decoder written here in numpy."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dsv4 import quant

from conftest import GOLDEN_DIR


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
