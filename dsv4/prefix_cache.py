"""Prefix caching: reuse the decode state of a prompt prefix that an earlier request already prefilled.

The state of a row after `P` tokens is the window ring (the last W keys), each compressor's partial
window and the compressed entries written so far (dsv4/cache.py). At a position `P` that is a
multiple of every compression ratio (the block, lcm of the config's ratios: 128 for the released
models), no HCA window is partly filled and the compressed entries are final, so the state is the
whole of what the prefix contributes. The engine copies a row's state (`DecodeCache.copy_row`) when its
prefill reaches such a boundary (its prefill chunks end there) and keys it by a hash of the tokens
before it; a later request whose prompt starts with the same tokens gets the longest such state copied
into its row (`load_row`) and prefills only the rest. Snapshots are taken at the last boundary before a
prompt's end (what the next turn of a conversation shares) and, since a prompt's block keys are
remembered (`seen`, 16 bytes per block), at the deepest boundary a prompt shares with an earlier one:
the second request with a common system prompt leaves a snapshot that the third one starts from. The sliding-window part is kept the way the
report calls periodic checkpointing: the ring is part of each block-boundary snapshot, so nothing
has to be recomputed.

A request decoded with MTP speculation also needs the MTP block's state, which at position `P` has
seen token `P` (it drafts from (h_t, token t+1)); its snapshots are keyed by the prefix and that
token, apart from plain ones. Snapshots are evicted least-recently-used beyond `max_bytes`.
Outputs are those of an uncached run (the tests compare logits).
"""
from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict
from collections.abc import Sequence


def prefix_block(cfg) -> int:
    """The snapshot granularity: lcm of the compression ratios (the sliding window if none)."""
    ratios = [cfg.layer_ratio(i) for i in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers)]
    ratios = [r for r in ratios if r]
    return math.lcm(*ratios) if ratios else cfg.sliding_window


def block_keys(ids: Sequence[int], block: int, limit: int) -> list[bytes]:
    """Keys of ids[:block], ids[:2·block], ... up to `limit` tokens: each key hashes the previous
    key and the next block of ids, so all of them cost one pass over the prompt."""
    keys, h = [], b""
    for end in range(block, limit + 1, block):
        h = hashlib.blake2b(h + array("q", ids[end - block:end]).tobytes(), digest_size=16).digest()
        keys.append(h)
    return keys


def mtp_key(key: bytes, next_token: int) -> bytes:
    return hashlib.blake2b(key + b"mtp" + array("q", [next_token]).tobytes(), digest_size=16).digest()


class PrefixCache:
    """LRU map from prefix keys to row states (`DecodeCache.copy_row`), bounded in bytes."""

    def __init__(self, block: int, max_bytes: int):
        if block < 1 or max_bytes < 0:
            raise ValueError(f"block must be >= 1 and max_bytes >= 0; got {block}, {max_bytes}")
        self.block, self.max_bytes = block, max_bytes
        self.entries: OrderedDict[bytes, tuple[dict, int]] = OrderedDict()
        self.seen: OrderedDict[bytes, None] = OrderedDict()   # block keys of prompts prefilled so far
        self.max_seen = 1 << 16
        self.bytes = 0
        self.stats = {"queries": 0, "hits": 0, "hit_tokens": 0, "stored": 0, "evicted": 0}

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self.entries

    def lookup(self, keys: list[bytes], ids: Sequence[int], n_max: int, mtp: bool) -> tuple[int, dict | None]:
        """The longest cached prefix of at most `n_max` tokens: (its length, its state) or (0, None)."""
        self.stats["queries"] += 1
        for k in range(min(len(keys), n_max // self.block), 0, -1):
            P = k * self.block
            key = mtp_key(keys[k - 1], ids[P]) if mtp else keys[k - 1]
            if key in self.entries:
                self.entries.move_to_end(key)
                self.stats["hits"] += 1
                self.stats["hit_tokens"] += P
                return P, self.entries[key][0]
        return 0, None

    def shared(self, keys: list[bytes], n_max: int) -> int:
        """The longest prefix (a multiple of the block, at most `n_max` tokens) that an earlier prompt
        had too; then remember these keys."""
        best = 0
        for k in range(min(len(keys), n_max // self.block), 0, -1):
            if keys[k - 1] in self.seen:
                best = k * self.block
                break
        for key in keys:
            self.seen[key] = None
            self.seen.move_to_end(key)
        while len(self.seen) > self.max_seen:
            self.seen.popitem(last=False)
        return best

    def store(self, key: bytes, state: dict, nbytes: int) -> bool:
        if key in self.entries:
            self.entries.move_to_end(key)
            return False
        if nbytes > self.max_bytes:
            return False
        while self.bytes + nbytes > self.max_bytes:
            _, (_, b) = self.entries.popitem(last=False)
            self.bytes -= b
            self.stats["evicted"] += 1
        self.entries[key] = (state, nbytes)
        self.bytes += nbytes
        self.stats["stored"] += 1
        return True

    def clear(self) -> None:
        self.entries.clear()
        self.seen.clear()
        self.bytes = 0
