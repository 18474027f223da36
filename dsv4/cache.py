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
compressor state):  SWA 0;  HCA (M=128) `Dh·b/128`;  CSA (M=4) `(Dh + Di)·b/4`. With `kv_fp8` the main
compressed entries are FP8 rows instead (`dsv4.ops.kv8_quant`: the nope dims e4m3 with a power-of-two
scale per 64, the rope dims in the model dtype; 592 bytes for Dh 512 with bf16 rope dims, not 1,024): the
QAT simulation of the official inference made storage. The window ring and the indexer's keys stay in
the model dtype.
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
    entries: torch.Tensor   # [Bmax, max_len // M, c] compressed entries (normalised, roped), or with
                            # rope_dim > 0 their FP8 rows [Bmax, max_len // M, bytes] (`ops.kv8_quant`)
    dtype: torch.dtype = torch.float32   # the entries' values (the model dtype)
    rope_dim: int = 0                    # > 0: entries in FP8 rows, the last rope_dim dims in `dtype`

    def attention_keys(self, width: int):
        """The entries as the attention reads them: the buffer, or an `ops.KV8` view of its FP8 rows."""
        if not self.rope_dim:
            return self.entries
        from dsv4.ops import KV8
        return KV8(self.entries, width, self.rope_dim, self.dtype)

    def reset(self, rows: torch.Tensor) -> None:
        self.kv.index_fill_(0, rows, 0)                 # (a fill by index: no host copy of the value)
        self.score.index_fill_(0, rows, float("-inf"))


class LayerState:
    def __init__(self, cfg: ModelConfig, ratio: int, batch: int, max_len: int, device, dtype,
                 kv_fp8: bool = False):
        Dh, W = cfg.head_dim, cfg.sliding_window
        self.window, self.ratio = W, ratio
        self.ring = torch.zeros(batch, W, Dh, device=device, dtype=dtype)
        self.comp = self.index = None
        if ratio:
            self.comp = _compressor_state(ratio, Dh, batch, max_len, device, dtype,
                                          cfg.qk_rope_head_dim if kv_fp8 else 0)
        if ratio == 4:
            self.index = _compressor_state(4, cfg.index_head_dim, batch, max_len, device, dtype)

    def ring_positions(self, start: torch.Tensor) -> torch.Tensor:
        """Token position held by each ring slot for rows starting at `start` [B] (−W.. = empty). [B, W]"""
        j = torch.arange(self.window, device=start.device)
        last = start.unsqueeze(1) - 1
        return last - torch.remainder(last - j, self.window)

    def states(self):
        return [s for s in (self.comp, self.index) if s is not None]


def _compressor_state(ratio, c, batch, max_len, device, dtype, rope_dim: int = 0) -> CompressorState:
    o = int(ratio == 4)
    w = (1 + o) * c
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    kv = torch.zeros(batch, (1 + o) * ratio, w, device=device, dtype=acc)
    if rope_dim:
        from dsv4.ops import kv8_layout
        entries = torch.zeros(batch, max_len // ratio, kv8_layout(c, rope_dim, dtype)[2], device=device,
                              dtype=torch.uint8)
    else:
        entries = torch.zeros(batch, max_len // ratio, c, device=device, dtype=dtype)
    return CompressorState(kv, torch.full_like(kv, float("-inf")), entries, dtype, rope_dim)


class DecodeCache:
    """Decode state for `batch` rows of up to `max_len` tokens each (main layers + MTP blocks)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device="cpu", dtype=torch.float32,
                 kv_fp8: bool = False):
        if batch <= 0 or max_len <= 0:
            raise ValueError(f"batch and max_len must be positive; got {batch}, {max_len}")
        if kv_fp8:
            if dtype == torch.float64:
                raise ValueError("kv_fp8 stores the compressed entries in FP8: use a float32, bfloat16 or "
                                 "float16 cache (the float64 model is a numerical reference)")
            from dsv4.ops import kv8_layout
            kv8_layout(cfg.head_dim, cfg.qk_rope_head_dim, dtype)     # a clear error for shapes it cannot hold
        self.config, self.batch, self.max_len, self.kv_fp8 = cfg, batch, max_len, kv_fp8
        L = cfg.num_hidden_layers
        self.layers = [LayerState(cfg, cfg.layer_ratio(i), batch, max_len, device, dtype, kv_fp8)
                       for i in range(L + cfg.num_nextn_predict_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.mtp_lengths = torch.zeros(batch, dtype=torch.long, device=device)

    @property
    def device(self):
        return self.lengths.device

    def check_rows(self, rows, B: int, S: int, mtp: bool = False,
                   ids: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Validate the cache rows of a call of S new tokens on B input rows -> (rows [B] on the cache's
        device, the rows' first positions on the host). With `ids`, the call's token ids, their range is
        checked against the vocabulary as well. One read from the device for all checks."""
        if rows is None:
            if B != self.batch:
                raise ValueError(f"the cache has {self.batch} rows but the input has batch {B}; pass rows=")
            rows = torch.arange(B, device=self.device)
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        if rows.shape != (B,):
            raise ValueError(f"rows must list one cache row per input row ({B}); got shape {tuple(rows.shape)}")
        if not rows.numel():
            return rows, ()
        safe = rows.clamp(0, self.batch - 1)          # read the lengths before the rows are known valid
        dup = (rows.sort().values.diff() == 0).any() if B > 1 else rows.new_zeros(())
        head = [rows.min(), rows.max(), dup.long()]
        if ids is not None:
            head += [t.to(device=rows.device, dtype=torch.long) for t in torch.aminmax(ids)]
        lo, hi, repeated, *rest = torch.cat([torch.stack(head),
                                             (self.mtp_lengths if mtp else self.lengths)[safe]]).tolist()
        if ids is not None:
            id_lo, id_hi, *starts = rest
            self.config.check_id_range(id_lo, id_hi)
        else:
            starts = rest
        if lo < 0 or hi >= self.batch:
            raise ValueError(f"rows must lie in [0, {self.batch})")
        if repeated:
            raise ValueError(f"rows must be distinct cache rows; got {rows.tolist()}")
        if max(starts) + S > self.max_len:
            raise ValueError(f"sequence longer than the cache: a row at length {max(starts)} + {S} new tokens "
                             f"exceeds max_len={self.max_len}; allocate a larger DecodeCache")
        return rows, tuple(starts)

    def advance(self, rows: torch.Tensor, n: int) -> None:
        self.lengths[rows] += n

    def advance_mtp(self, rows: torch.Tensor, n: int) -> None:
        self.mtp_lengths[rows] += n

    def reset(self, rows=None) -> None:
        """Empty rows (all by default) so that new sequences can use them. Rows given on the host (ints, a
        list, a CPU tensor) are checked; a CUDA tensor is taken as valid (checking it would wait for the GPU)."""
        if rows is not None and not (isinstance(rows, torch.Tensor) and rows.is_cuda):
            listed = torch.as_tensor(rows, dtype=torch.long).reshape(-1).tolist()
            if any(r < 0 or r >= self.batch for r in listed):
                raise ValueError(f"reset: rows must lie in [0, {self.batch}); got {listed}")
        rows = torch.arange(self.batch, device=self.device) if rows is None else \
            torch.as_tensor(rows, dtype=torch.long, device=self.device).reshape(-1)
        self.lengths.index_fill_(0, rows, 0)
        self.mtp_lengths.index_fill_(0, rows, 0)
        for layer in self.layers:
            for s in layer.states():
                s.reset(rows)

    # -- speculative decoding: save the O(1)-per-row state; put it back (restore) or drop the rejected
    # positions (rollback)
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

    def rollback(self, snap: dict, keep, mtp: bool = False) -> torch.Tensor:
        """Drop all but the first `keep` [B] of the tokens fed to `snap["rows"]` since `snap` was taken:
        each row ends as if only those had been fed. Rolls back the main layers and `lengths`, or with
        `mtp=True` the MTP blocks and `mtp_lengths` (keep then counts positions fed to the MTP block).

        Returns a bool [B]: rows whose kept tokens could not be recovered and went back to the snapshot
        (keep 0) instead; the caller feeds them their first `keep` tokens again (see below).

        A row at length L that was fed S tokens keeps positions [L, a), a = L + keep, drops [a, L + S):
          * ring: the slot t mod W of each dropped t gets the snapshot's key back (S <= W, so no kept
            position shares a slot with a dropped one);
          * compressor state (`comp`, `index`): untouched unless a window completed at a dropped
            position; otherwise the previous window is unchanged and the dropped tokens' slots lie past
            the row's count, where no path reads them before rewriting. If one did complete, the
            previous and partial windows come back from the snapshot, and the kept tokens' raw
            projections from the window that completed: every path of the compressor leaves each slot
            holding the last token fed to it, so the previous-window slots (M = 4) hold that window
            whole, and the partial slots of a non-overlapping M hold it past the new partial window;
          * compressed entries: nothing. One written at a dropped position has index s >= a // M; entry
            s is visible only from position (s + 1)·M − 1 on, and the call that feeds that position
            writes the entry before attending.
        The kept tokens' data is gone, and the row goes back to the snapshot, where: S > W (a dropped key
        overwrote a kept one); M = 4 and windows completed at a kept and at a dropped position, or at
        two dropped ones (S > 4); a non-overlapping M and, after kept tokens of a window, a later window
        also completed at a dropped position, or the new partial window reached a kept token's slot
        (both need M < S <= W, so never where W <= M, as with W = M = 128).
        """
        rows = snap["rows"]
        B = rows.shape[0]
        keep = torch.as_tensor(keep, device=self.device)
        if keep.shape != (B,) or keep.is_floating_point() or keep.is_complex():
            raise ValueError(f"keep must be an integer tensor with one count per snapshot row ({B}); "
                             f"got dtype {keep.dtype}, shape {tuple(keep.shape)}")
        keep = keep.long()
        lengths = self.mtp_lengths if mtp else self.lengths
        start = snap["mtp_lengths" if mtp else "lengths"]                        # [B]
        end = lengths[rows]                                                       # [B]
        fed = end - start
        if bool((fed < 0).any()):
            raise ValueError("rows are shorter than when the snapshot was taken (reset or restored since); "
                             "rollback undoes only tokens fed after the snapshot")
        if bool(((keep < 0) | (keep > fed)).any()):
            raise ValueError(f"keep must lie in [0, tokens fed since the snapshot]; got keep {keep.tolist()} "
                             f"for {fed.tolist()} fed")
        L, W = self.config.num_hidden_layers, self.config.sliding_window
        pairs = list(zip(self.layers, snap["layers"]))
        pairs = pairs[L:] if mtp else pairs[:L]
        a = start + keep                                                          # [B] lengths after
        partial = (keep > 0) & (keep < fed)
        lost = partial & (fed > W)
        ratios = sorted({layer.ratio for layer, _ in pairs if layer.ratio})
        for m in ratios:
            done_dropped = end // m > a // m
            w = a // m * m                                                        # [B] start of a's window
            if m == 4:  # one completion, at a dropped position, in the snapshot's window
                ok = (a // m == start // m) & (end // m == a // m + 1)
            else:       # nothing kept in a's window, or it is the one window that completed and the new
                        # partial window did not overwrite the slots of its kept tokens
                ok = (a % m == 0) | ((end // m == a // m + 1) & (end % m <= torch.maximum(start, w) - w))
            lost |= partial & done_dropped & ~ok
        a = torch.where(lost, start, a)

        j = torch.arange(W, device=self.device)
        dropped = torch.remainder(j - a.unsqueeze(1), W) < (end - a).unsqueeze(1)      # [B, W] slot of a dropped t
        redo = {}
        for m in ratios:  # rows where a window completed at a dropped position
            sel = torch.nonzero(end // m > a // m).flatten()
            if sel.numel():
                w0 = a[sel] // m * m                                              # [b] start of a's window
                p = w0.unsqueeze(1) + torch.arange(m, device=self.device)         # [b, M] positions of its slots
                kept = (p >= start[sel].unsqueeze(1)) & (p < a[sel].unsqueeze(1))  # [b, M] fed and kept
                redo[m] = (sel, kept.unsqueeze(-1))
        for layer, (ring, states) in pairs:
            layer.ring[rows] = torch.where(dropped.unsqueeze(-1), ring, layer.ring[rows])
            if layer.ratio not in redo:
                continue
            m = layer.ratio
            sel, kept = redo[m]
            r = rows[sel]
            o = int(m == 4)
            for s, snapped in zip(layer.states(), states):
                for cur, old in zip((s.kv, s.score), snapped):
                    old = old[sel].clone()                                        # [b, (1+o)M, w]
                    # kept tokens of the completed window: slots [0, M) hold it after the call (the
                    # previous-window slots when overlapping, else the partial slots past the new window)
                    old[:, o * m:] = torch.where(kept, cur[r, :m], old[:, o * m:])
                    cur[r] = old
        lengths[rows] = a
        return lost

    def nbytes(self) -> int:
        total = 0
        for l in self.layers:
            total += l.ring.numel() * l.ring.element_size()
            for s in l.states():
                total += sum(t.numel() * t.element_size() for t in (s.kv, s.score, s.entries))
        return total

    # -- prefix caching: a row's whole state at its current length, copied out and into another row
    def copy_row(self, row: int) -> dict:
        """Everything row `row` holds at its current length (ring, compressor state, the compressed
        entries written so far, for the main layers and the MTP blocks) as new tensors. `load_row`
        puts it into any row, which then continues exactly as `row` would."""
        L = self.config.num_hidden_layers
        n, m = int(self.lengths[row]), int(self.mtp_lengths[row])
        layers = []
        for i, layer in enumerate(self.layers):
            count = (n if i < L else m) // layer.ratio if layer.ratio else 0
            layers.append((layer.ring[row].clone(), [(s.kv[row].clone(), s.score[row].clone(),
                                                      s.entries[row, :count].clone()) for s in layer.states()]))
        return {"length": n, "mtp_length": m, "layers": layers}

    def load_row(self, row: int, state: dict) -> None:
        """Make row `row` hold `state` (from `copy_row`); entries past the copied ones are invisible
        until rewritten (see `snapshot`). Every write is in place, so recorded CUDA graphs stay valid."""
        self.lengths[row], self.mtp_lengths[row] = state["length"], state["mtp_length"]
        for layer, (ring, states) in zip(self.layers, state["layers"]):
            layer.ring[row] = ring
            for s, (kv, score, entries) in zip(layer.states(), states):
                s.kv[row], s.score[row] = kv, score
                s.entries[row, :entries.shape[0]] = entries

    @staticmethod
    def row_state_bytes(state: dict) -> int:
        return sum(t.numel() * t.element_size() for ring, states in state["layers"]
                   for t in (ring, *(x for s in states for x in s)))


def cache_bytes(cfg: ModelConfig, max_len: int, dtype_bytes: int = 2, with_mtp: bool = True,
                kv_fp8: bool = False) -> dict:
    """Bytes one sequence of `max_len` tokens needs in a DecodeCache: per layer type and in total
    (kv_fp8: the main compressed entries as FP8 rows)."""
    Dh, Di, W = cfg.head_dim, cfg.index_head_dim, cfg.sliding_window
    entry = Dh * dtype_bytes
    if kv_fp8:
        from dsv4.ops import kv8_layout
        entry = kv8_layout(Dh, cfg.qk_rope_head_dim, dtype_bytes)[2]
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
            b += 2 * (1 + o) * r * (1 + o) * Dh * 4 + (max_len // r) * entry
            tok += entry / r
        if r == 4:
            b += 2 * 2 * 4 * 2 * Di * 4 + (max_len // 4) * Di * dtype_bytes
            tok += Di * dtype_bytes / 4
        per_type[kind] += b
        per_token[kind] += tok
        total += b
    return {"total": total, "per_layer_type": per_type, "per_token_per_type": per_token,
            "per_token": sum(per_token.values())}
