"""`DecodeCache.rollback`: feeding S tokens from a snapshot and keeping `keep` of them leaves the cache
as feeding only those `keep` tokens would (every tensor's visible part, then the next logits), across
the window size and the 4- and 128-token compression boundaries, for ragged rows (the compressor's
token loop) and rows at one length (its chunked path), in the main layers and the MTP block."""
from __future__ import annotations

import copy

import pytest
import torch

from dsv4.cache import DecodeCache
from dsv4.config import preset

from conftest import random_model

# tiny: W = 16, layers SWA, CSA (M=4), HCA (M=128), CSA; the MTP block here is HCA (it is SWA in the preset)
CFG = preset("tiny").with_(compress_ratios=(0, 4, 128, 4, 128))
MAX_LEN = 200


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, seed=2, dtype=torch.float64)


def tokens(rows: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(2, CFG.vocab_size, (rows, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def prefilled(model, starts: list[int], ids: torch.Tensor) -> DecodeCache:
    """Row r holds ids[r, :starts[r]] (main model), in chunks so that the rows take both paths."""
    cache = DecodeCache(model.config, len(starts), MAX_LEN, dtype=torch.float64)
    for r, n in enumerate(starts):
        for s0 in range(0, n, 50):
            model(ids[r:r + 1, s0:min(n, s0 + 50)], cache=cache, rows=[r])
    return cache


def feed(model, cache, ids: torch.Tensor, start: list[int], counts: list[int], mtp_h=None) -> list[torch.Tensor]:
    """Feed row r its tokens ids[r, start[r] : start[r] + counts[r]] (to the MTP block with streams mtp_h),
    rows with equal counts in one call; the logits of each call."""
    out = []
    for n in sorted(set(counts) - {0}):
        rows = [r for r, c in enumerate(counts) if c == n]
        chunk = torch.stack([ids[r, start[r]:start[r] + n] for r in rows])      # [b, n]
        if mtp_h is None:
            out.append(model(chunk, cache=cache, rows=rows))
        else:
            h = torch.stack([mtp_h[r, start[r]:start[r] + n] for r in rows])     # [b, n, N, D]
            out.append(model.mtp_logits(h, chunk, cache=cache, rows=rows))
    return out


def assert_same_state(a: DecodeCache, b: DecodeCache, mtp: bool) -> None:
    """Equal lengths and equal visible state: ring slots holding positions >= 0, the compressor's previous
    window and the filled slots of its partial window, entries below each row's count."""
    assert torch.equal(a.lengths, b.lengths) and torch.equal(a.mtp_lengths, b.mtp_lengths)
    n = a.mtp_lengths if mtp else a.lengths
    L = a.config.num_hidden_layers
    for i, (la, lb) in enumerate(zip(a.layers, b.layers)):
        if (i >= L) != mtp:
            continue
        held = la.ring_positions(n) >= 0                                          # [B, W]
        torch.testing.assert_close(la.ring[held], lb.ring[held], rtol=0, atol=1e-12, msg=f"ring of layer {i}")
        for sa, sb in zip(la.states(), lb.states()):
            m, o = la.ratio, int(la.ratio == 4)
            filled = torch.arange((1 + o) * m) < (o * m + n % m).unsqueeze(1)    # [B, (1+o)M]
            for name in ("kv", "score"):
                x, y = getattr(sa, name)[filled], getattr(sb, name)[filled]
                torch.testing.assert_close(x, y, rtol=0, atol=1e-12, msg=f"{name} of layer {i}")
            visible = torch.arange(sa.entries.shape[1]) < (n // m).unsqueeze(1)  # [B, C]
            torch.testing.assert_close(sa.entries[visible], sb.entries[visible], rtol=0, atol=1e-12,
                                       msg=f"entries of layer {i}")


@torch.no_grad()
def check(model, starts: list[int], S: int, keeps: list[int], seed: int, mtp: bool = False) -> torch.Tensor:
    """Snapshot, feed S tokens per row, roll back to `keeps`; compare with feeding only `keeps` tokens,
    then feed both caches the same 9 more tokens and compare logits. Returns the rows sent back."""
    B = len(starts)
    ids = tokens(B, max(starts) + S + 9, seed)
    h = torch.randn(B, ids.shape[1], model.config.hc_mult, model.config.hidden_size, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed)) if mtp else None
    base = prefilled(model, [0] * B if mtp else starts, ids)
    if mtp:  # the MTP block at `starts`; the main model stays empty
        feed(model, base, ids, [0] * B, starts, mtp_h=h)
    got, want = copy.deepcopy(base), copy.deepcopy(base)
    rows = torch.arange(B)
    snap = got.snapshot(rows)
    feed(model, got, ids, starts, [S] * B, mtp_h=h)
    back = got.rollback(snap, torch.tensor(keeps), mtp=mtp)
    assert back.dtype == torch.bool and back.shape == (B,)
    assert (got.mtp_lengths if mtp else got.lengths).tolist() == \
        [s + (0 if b else k) for s, k, b in zip(starts, keeps, back.tolist())]
    feed(model, got, ids, starts, [k if b else 0 for k, b in zip(keeps, back.tolist())], mtp_h=h)
    feed(model, want, ids, starts, keeps, mtp_h=h)
    assert_same_state(got, want, mtp)
    after = [s + k for s, k in zip(starts, keeps)]
    for n in (8, 1):  # then the same next tokens: one chunk, one decode step
        (x,), (y,) = (feed(model, c, ids, after, [n] * B, mtp_h=h) for c in (got, want))
        torch.testing.assert_close(x, y, rtol=0, atol=1e-10)
        after = [a + n for a in after]
    return back


RAGGED = [0, 2, 3, 13, 15, 62, 125, 126, 127, 129]  # rows at different lengths: the token-by-token path


def expected_back(starts: list[int], S: int, keeps: list[int], hca: int = 128, csa: bool = True) -> list[bool]:
    """The rows that cannot be rebuilt (W = 16): S > W; a CSA window (M = 4, if `csa`) completed at a
    dropped position and another one completed in the call too or it was not the snapshot's window; a window of
    the non-overlapping ratio `hca` completed at a dropped position after kept tokens of it, and a later
    one completed too or the new partial window reached a kept token's slot (S > hca, so never for 128)."""
    start, keep = torch.tensor(starts), torch.tensor(keeps)
    a, end = start + keep, start + S
    partial = (keep > 0) & (keep < S)
    if S > CFG.sliding_window:
        return partial.tolist()
    one_in_snapshot_window = (a // 4 == start // 4) & (end // 4 == a // 4 + 1)
    lost = (end // 4 > a // 4) & ~one_in_snapshot_window & csa
    m, w = hca, a // hca * hca
    kept_in_window = (a % m != 0) & (end // m > a // m)
    lost |= kept_in_window & ((end // m > a // m + 1) | (end % m > torch.maximum(start, w) - w))
    return (partial & lost).tolist()


@pytest.mark.parametrize("S", [1, 2, 3, 4, 5, 9, 16, 17])
def test_rollback_equals_feeding_only_the_kept_tokens(model, S):
    for shift in range(2):
        keeps = [(r + shift * 3) % (S + 1) for r in range(len(RAGGED))]
        back = check(model, RAGGED, S, keeps, seed=S * 10 + shift)
        assert back.tolist() == expected_back(RAGGED, S, keeps)
        if S <= 3:  # at most one CSA window completes: every row is rolled back, HCA ones included
            assert not bool(back.any())


@pytest.mark.parametrize("start", [3, 14, 120, 126, 127])
def test_rollback_of_rows_at_one_length(model, start):
    """All rows at one length: the compressor's window-parallel path, which leaves the slots past the new
    partial window holding the window that completed, as the token loop does; an HCA window completed
    at a dropped token after kept ones (start 126, S = 2, keep 1) is rolled back too."""
    for S in (2, 3, 5, 16):
        keeps = [k % (S + 1) for k in range(S + 1)]
        back = check(model, [start] * len(keeps), S, keeps, seed=start + S)
        assert back.tolist() == expected_back([start] * len(keeps), S, keeps)
        if S <= 3:
            assert not bool(back.any())


def test_rollback_with_a_short_non_overlapping_window():
    """Only HCA layers, of ratio 8 < W: up to 8 tokens, a window completed at a dropped position after
    kept tokens is rolled back; more tokens can overwrite a kept token's slot or complete another window,
    and then the row is sent back. Rows at one length and ragged rows."""
    small = random_model(CFG.with_(compress_ratios=(0, 8, 0, 8, 8)), seed=3, dtype=torch.float64)
    for S in (2, 5, 8, 9, 12):
        keeps = [k % (S + 1) for k in range(S + 1)]
        for starts in ([6] * len(keeps), [14] * len(keeps), [(5 * k + 1) % 19 for k in range(len(keeps))]):
            start, a = torch.tensor(starts), torch.tensor(starts) + torch.tensor(keeps)
            hca_kept = (a % 8 != 0) & ((start + S) // 8 > a // 8) & (a > start)  # completed after kept tokens
            assert bool(hca_kept.any())
            got = check(small, starts, S, keeps, seed=S + starts[1])
            assert got.tolist() == expected_back(starts, S, keeps, hca=8, csa=False)
            assert bool(got.any()) == (S > 8) and not bool((got & ~hca_kept).any())


@pytest.mark.parametrize("S", [1, 2, 3, 17])
def test_rollback_of_the_mtp_block(model, S):
    keeps = [r % (S + 1) for r in range(len(RAGGED))]
    check(model, RAGGED, S, keeps, seed=7 + S, mtp=True)
    check(model, [126] * 3, S, [k % (S + 1) for k in range(3)], seed=8 + S, mtp=True)


@torch.no_grad()
def test_rollback_refuses_bad_keep(model):
    cache = DecodeCache(CFG, 2, 32, dtype=torch.float64)
    model(tokens(2, 2, 0), cache=cache)
    snap = cache.snapshot(torch.tensor([0, 1]))
    model(tokens(2, 3, 1), cache=cache)
    with pytest.raises(ValueError, match=r"keep must lie in \[0, tokens fed"):
        cache.rollback(snap, torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="one count per snapshot row"):
        cache.rollback(snap, torch.tensor([1]))
    with pytest.raises(ValueError, match="integer"):
        cache.rollback(snap, torch.tensor([1.0, 1.0]))
    cache.reset([1])
    with pytest.raises(ValueError, match="shorter than when the snapshot was taken"):
        cache.rollback(snap, torch.tensor([1, 0]))
    assert cache.lengths.tolist() == [5, 0]                                       # nothing changed
