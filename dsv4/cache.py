"""Preallocated decode state for a batch of sequences (spec §12).

Per layer and per sequence row:
  * window ring `[W, Dh]`: the last W window keys (= values), slot `t mod W`;
  * compressed layers: the compressor state (previous complete window, when overlapping, and the
    current partial window: raw projections and gate scores in fp32, scores with `ape` added) and
    the compressed entries `[max_len / M, Dh]`;
  * CSA layers: the same again for the lightning indexer (keys `[max_len / 4, Di]`).
Each row has its own length; a call feeds S tokens to selected rows (`rows`), so sequences of
different lengths share one batch (continuous batching) and prompts can be prefilled in chunks.

Bytes per token per layer (model dtype bytes `b`, amortised, excluding the fixed window ring and
compressor state):  SWA 0;  HCA (M=128) `Dh·b/128`;  CSA (M=4) `(Dh + Di)·b/4`.
Fixed per sequence and layer: ring `W·Dh·b`, compressor state `(1+o)·M·(1+o)·c·4·2` bytes.
`cache_bytes(cfg, max_len)` adds it up (`dsv4 info` prints it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv4.config import ModelConfig


@dataclass
class CompressorState:
    kv: torch.Tensor        # [Bmax, (1+o)·M, w] fp32 raw projections
    score: torch.Tensor     # [Bmax, (1+o)·M, w] fp32 gate scores (+ ape), −inf = empty slot
    entries: torch.Tensor   # [Bmax, max_len // M, c] compressed entries (normalised, roped)

    def reset(self, rows: torch.Tensor) -> None:
        self.kv[rows] = 0
        self.score[rows] = float("-inf")


class LayerState:
    def __init__(self, cfg: ModelConfig, ratio: int, batch: int, max_len: int, device, dtype):
        Dh, W = cfg.head_dim, cfg.sliding_window
        self.window = W
        self.ring = torch.zeros(batch, W, Dh, device=device, dtype=dtype)
        self.comp = self.index = None
        if ratio:
            self.comp = _compressor_state(ratio, Dh, batch, max_len, device, dtype)
        if ratio == 4:
            self.index = _compressor_state(4, cfg.index_head_dim, batch, max_len, device, dtype)

    def ring_positions(self, start: torch.Tensor) -> torch.Tensor:
        """Token position held by each ring slot for rows starting at `start` [B] (−W.. = empty). [B, W]"""
        j = torch.arange(self.window, device=start.device)
        last = start.unsqueeze(1) - 1
        return last - torch.remainder(last - j, self.window)

    def states(self):
        return [s for s in (self.comp, self.index) if s is not None]


def _compressor_state(ratio, c, batch, max_len, device, dtype) -> CompressorState:
    o = int(ratio == 4)
    w = (1 + o) * c
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    kv = torch.zeros(batch, (1 + o) * ratio, w, device=device, dtype=acc)
    return CompressorState(kv, torch.full_like(kv, float("-inf")),
                           torch.zeros(batch, max_len // ratio, c, device=device, dtype=dtype))


class DecodeCache:
    """Decode state for `batch` rows of up to `max_len` tokens each (main layers + MTP blocks)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device="cpu", dtype=torch.float32):
        if batch <= 0 or max_len <= 0:
            raise ValueError(f"batch and max_len must be positive; got {batch}, {max_len}")
        self.config, self.batch, self.max_len = cfg, batch, max_len
        L = cfg.num_hidden_layers
        self.layers = [LayerState(cfg, cfg.layer_ratio(i), batch, max_len, device, dtype)
                       for i in range(L + cfg.num_nextn_predict_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.mtp_lengths = torch.zeros(batch, dtype=torch.long, device=device)

    @property
    def device(self):
        return self.lengths.device

    def check_rows(self, rows, B: int, S: int, mtp: bool = False) -> torch.Tensor:
        if rows is None:
            if B != self.batch:
                raise ValueError(f"the cache has {self.batch} rows but the input has batch {B}; pass rows=")
            rows = torch.arange(B, device=self.device)
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        if rows.shape != (B,):
            raise ValueError(f"rows must list one cache row per input row ({B}); got shape {tuple(rows.shape)}")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.batch):
            raise ValueError(f"rows must lie in [0, {self.batch})")
        if rows.unique().numel() != rows.numel():
            raise ValueError(f"rows must be distinct cache rows; got {rows.tolist()}")
        lengths = (self.mtp_lengths if mtp else self.lengths)[rows]
        if int(lengths.max()) + S > self.max_len:
            raise ValueError(f"sequence longer than the cache: a row at length {int(lengths.max())} + {S} new tokens "
                             f"exceeds max_len={self.max_len}; allocate a larger DecodeCache")
        return rows

    def advance(self, rows: torch.Tensor, n: int) -> None:
        self.lengths[rows] += n

    def advance_mtp(self, rows: torch.Tensor, n: int) -> None:
        self.mtp_lengths[rows] += n

    def reset(self, rows=None) -> None:
        """Empty rows (all by default) so that new sequences can use them."""
        rows = torch.arange(self.batch, device=self.device) if rows is None else \
            torch.as_tensor(rows, dtype=torch.long, device=self.device)
        self.lengths[rows] = 0
        self.mtp_lengths[rows] = 0
        for layer in self.layers:
            for s in layer.states():
                s.reset(rows)

    # -- speculative decoding: save the O(1)-per-row state, put it back on rejection
    def snapshot(self, rows: torch.Tensor) -> dict:
        """Copy of everything a call can overwrite except compressed entries, which are only ever
        written at indices ≥ the row's current count and so need no copy."""
        return {"rows": rows.clone(), "lengths": self.lengths[rows].clone(),
                "mtp_lengths": self.mtp_lengths[rows].clone(),
                "layers": [(l.ring[rows].clone(), [(s.kv[rows].clone(), s.score[rows].clone()) for s in l.states()])
                           for l in self.layers]}

    def restore(self, snap: dict) -> None:
        rows = snap["rows"]
        self.lengths[rows], self.mtp_lengths[rows] = snap["lengths"], snap["mtp_lengths"]
        for layer, (ring, states) in zip(self.layers, snap["layers"]):
            layer.ring[rows] = ring
            for s, (kv, score) in zip(layer.states(), states):
                s.kv[rows], s.score[rows] = kv, score

    def nbytes(self) -> int:
        total = 0
        for l in self.layers:
            total += l.ring.numel() * l.ring.element_size()
            for s in l.states():
                total += sum(t.numel() * t.element_size() for t in (s.kv, s.score, s.entries))
        return total


def cache_bytes(cfg: ModelConfig, max_len: int, dtype_bytes: int = 2, with_mtp: bool = True) -> dict:
    """Bytes one sequence of `max_len` tokens needs in a DecodeCache: per layer type and in total."""
    Dh, Di, W = cfg.head_dim, cfg.index_head_dim, cfg.sliding_window
    n_layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if with_mtp else 0)
    per_type = {"sliding_attention": 0, "compressed_sparse_attention": 0, "heavily_compressed_attention": 0}
    per_token = {k: 0.0 for k in per_type}
    total = 0
    for i in range(n_layers):
        r, kind = cfg.layer_ratio(i), cfg.layer_type(i)
        b = W * Dh * dtype_bytes
        tok = 0.0
        if r:
            o = int(r == 4)
            b += 2 * (1 + o) * r * (1 + o) * Dh * 4 + (max_len // r) * Dh * dtype_bytes
            tok += Dh * dtype_bytes / r
        if r == 4:
            b += 2 * 2 * 4 * 2 * Di * 4 + (max_len // 4) * Di * dtype_bytes
            tok += Di * dtype_bytes / 4
        per_type[kind] += b
        per_token[kind] += tok
        total += b
    return {"total": total, "per_layer_type": per_type, "per_token_per_type": per_token,
            "per_token": sum(per_token.values())}
