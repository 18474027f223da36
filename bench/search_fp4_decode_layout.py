"""Search the layouts of an FP4 word for the word kernels' fp16-pair decode (`fp4_moe.repack_words`).

A word of 8 e2m1 codes must give 4 int32 registers, pair I holding codes I and I+4 as the halves of an
fp16 pair (magnitude bits at 9-11, sign at 15 of each half). Of the form searched here each pair is one
shifted copy of the word, or the XOR of two, masked (one LOP3 a pair; a shifted copy costs one shift,
shared between pairs); a layout exists when the 32 target bits are an invertible linear map (over
GF(2)) of the word's 32 bits. The cost is 4 LOP3 plus the distinct non-zero shifts. Prints the number of
layouts with 3 distinct shifts (shifts in [-31, 31]: none) and with 4 (shifts in [-12, 16]), and checks
that `fp4_moe.REPACK_SHIFTS` is one of the latter. ~40 s.

    python3 bench/search_fp4_decode_layout.py
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGET = [9, 10, 11, 15, 25, 26, 27, 31]


def rows(shifts) -> list[int]:
    """Each target bit of a pair made of the word shifted by `shifts` (<0: logical right), XORed: the
    mask of word bits it is the XOR of."""
    return [sum(1 << (p - s) for s in shifts if 0 <= p - s < 32) for p in TARGET]


def add(basis: list[int], vs: list[int]) -> list[int] | None:
    """The GF(2) basis extended by vs, or None when they are dependent on it."""
    basis = list(basis)
    for v in vs:
        for b in basis:
            v = min(v, v ^ b)
        if not v:
            return None
        basis.append(v)
    return basis


def layouts(n_shifts: int, lo: int, hi: int) -> list[tuple]:
    """Every choice of 4 pair forms (one or two of 0 and n_shifts distinct non-zero shifts in [lo, hi],
    all of them used) that is invertible."""
    found = []
    for base in itertools.combinations([s for s in range(lo, hi + 1) if s], n_shifts):
        avail = (0,) + base
        forms = [(a,) for a in avail] + list(itertools.combinations(avail, 2))
        r = {f: rows(f) for f in forms}

        def extend(start, basis, chosen):
            if len(chosen) == 4:
                if {s for f in chosen for s in f if s} == set(base):
                    found.append(tuple(chosen))
                return
            for i in range(start, len(forms)):
                nb = add(basis, r[forms[i]])
                if nb is not None:
                    extend(i + 1, nb, chosen + [forms[i]])
        extend(0, [], [])
    return found


def main() -> int:
    from dsv4.kernels.fp4_moe import REPACK_SHIFTS
    three = layouts(3, -31, 31)
    print(f"layouts with 3 distinct shifts in [-31, 31] (7 operations a word): {len(three)}")
    four = layouts(4, -12, 16)
    print(f"layouts with 4 distinct shifts in [-12, 16] (8 operations a word): {len(four)}")
    mine = tuple(sorted(tuple(sorted(f)) for f in REPACK_SHIFTS))
    ok = any(tuple(sorted(tuple(sorted(f)) for f in c)) == mine for c in four)
    print(f"fp4_moe.REPACK_SHIFTS {REPACK_SHIFTS} among them: {ok}")
    return 0 if ok and not three else 1


if __name__ == "__main__":
    raise SystemExit(main())
