"""Hybrid attention of DeepSeek-V4: sliding window, CSA (4:1 overlapping compression + lightning
indexer top-k) and HCA (128:1 compression, dense), one shared K=V head with attention sinks.

Spec: ARCHITECTURE.md §5 (attention), §6 (compressor), §7 (indexer), §12 (decode state).
Shapes: B batch, S query tokens, T key positions, D model dim, H heads, Dh head dim, Dr rope dim,
W window, M compression ratio, C compressed entries, Hi/Di indexer heads/head dim, G output groups.

Every query attends to one list of keys, indices into `[window keys | compressed entries]`
(`ops.sparse_attention`, the official `sparse_attn`). The three layer types differ only in that
list: SWA has no compressed part, HCA lists every visible entry, CSA the indexer's top-k among the
visible ones. Compressed entry `s` is visible to a query at position `t` iff `s < (t + 1) // M` (the
entry's window ends at or before `t`).

Two ways to run: a full-sequence pass (`state=None`; training and scoring; queries are processed in
chunks so memory grows linearly in S), and a cached pass that reads/writes a `LayerState` of
`dsv4.cache` (prefill in chunks from any position, then decode).
"""
from __future__ import annotations

import torch
from torch import nn

from dsv4 import ops, streams
from dsv4.ops import acc_dtype, up
from dsv4.config import ModelConfig, yarn_low_high

# Elements of the per-chunk index lists and index scores (queries × listed keys + queries × entries):
# bounds attention memory in long calls (the primitives bound their own intermediates).
ATTN_BUDGET = 1 << 26
# the compressors' cached-update index plans (`Compressor._plan_table`): at most 8 kept, each of at most
# PLAN_TABLE_MAX pooling slots (8 MiB of int64)
_PLANS: dict = {}
PLAN_TABLE_MAX = 1 << 20


def _keep_plan(key, plan):
    """Remember an index plan in `_PLANS` (the oldest dropped past 8) -> plan."""
    if len(_PLANS) >= 8:
        _PLANS.pop(next(iter(_PLANS)))
    _PLANS[key] = plan
    return plan


class RMSNorm(nn.Module):
    """y = w ⊙ x / sqrt(mean(x²) + eps), computed in fp32 and cast back (spec §10)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.norm_rope(x, self.weight, self.eps, None)


def linear(x: torch.Tensor, layer: nn.Linear, fp32: bool = False) -> torch.Tensor:
    if not isinstance(layer, nn.Linear):   # a quantised layer (dsv4.quant.FP8Linear) computes itself
        return layer(up(x) if fp32 else x)
    return ops.dense(x, layer.weight, fp32)


def grouped_linear(x: torch.Tensor, layer: nn.Linear, groups: int) -> torch.Tensor:
    """x [..., G, K] through the grouped projection `layer` (G blocks of rows, block g reads x[..., g])
    -> [..., G·R]; a quantised layer (dsv4.quant.FP8Linear) runs on its FP8 weight (`grouped`)."""
    if not isinstance(layer, nn.Linear):
        return layer.grouped(x)
    return ops.grouped_dense(x, layer.weight, groups)


def linears(x: torch.Tensor, layers: list, fp32: bool = False) -> list[torch.Tensor]:
    """`linear(x, layer, fp32)` for each of `layers` (projections of one input), as a list.

    Weights that `pack` put back to back in one buffer run as one GEMM over their rows when no gradient
    is wanted (inference): one launch instead of len(layers), the outputs slices of one output. A decode
    step is mostly such small launches. FP8 layers (`dsv4.quant.FP8Linear`) packed together run as one
    FP8 GEMM the same way, beside the group's other layers. Otherwise (training, unpacked layers) each
    layer runs on its own."""
    if len(layers) > 1 and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        w = packed_weight(layers)
        if w is not None:
            y = ops.dense(x, w, fp32)
            return list(y.split([layer.weight.shape[0] for layer in layers], dim=-1))
        fp8 = [layer for layer in layers if _is_fp8(layer)]
        packed = packed_fp8(fp8) if len(fp8) > 1 else None
        if packed is not None:
            y = ops.fp8_linear(up(x) if fp32 else x, *packed, fp8[0].block)
            parts = iter(y.split([layer.out_features for layer in fp8], dim=-1))
            return [next(parts) if _is_fp8(layer) else linear(x, layer, fp32) for layer in layers]
    return [linear(x, layer, fp32) for layer in layers]


def _is_fp8(layer) -> bool:
    """An FP8-resident projection (`dsv4.quant.FP8Linear`: e4m3 `weight`, block `scale`, `block`)."""
    return getattr(layer, "weight", None) is not None and layer.weight.dtype == torch.float8_e4m3fn \
        and hasattr(layer, "scale") and hasattr(layer, "block")


def _fp8_packable(layers: list) -> bool:
    """FP8 layers of one input whose weights and block scales can lie back to back: the same input width,
    block and scale dtype, and every layer but the last a whole number of scale blocks of rows."""
    if len(layers) < 2 or not all(_is_fp8(m) for m in layers):
        return False
    m0 = layers[0]
    same = all(m.in_features == m0.in_features and m.block == m0.block and m.scale.dtype == m0.scale.dtype
               and m.weight.device == m0.weight.device for m in layers)
    return same and all(m.out_features % m0.block[0] == 0 for m in layers[:-1])


def _stacked_view(ts: list) -> torch.Tensor | None:
    """The 2-D tensors `ts` (same columns) as one [Σrows, cols] view when they lie back to back in one
    storage; else None. One storage only: tensors of separate storages can lie back to back by chance
    (the CUDA caching allocator places consecutive allocations so), and a view past the end of the first
    one's storage would make `set_` grow it, moving that tensor and reading uninitialised memory."""
    t0, K = ts[0], ts[0].shape[1]
    if not all(t.is_contiguous() and t.untyped_storage().data_ptr() == t0.untyped_storage().data_ptr()
               for t in ts):
        return None
    at = t0.storage_offset()
    for t in ts:
        if t.storage_offset() != at:
            return None
        at += t.shape[0] * K
    if t0.untyped_storage().nbytes() < at * t0.element_size():
        return None
    return torch.empty(0, dtype=t0.dtype, device=t0.device).set_(
        t0.untyped_storage(), t0.storage_offset(), (sum(t.shape[0] for t in ts), K), (K, 1))


def packed_fp8(layers: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weight [ΣN, K], scale [ΣN/bn, K/bk]) of FP8 layers that `pack` put back to back, as views; else None."""
    if not _fp8_packable(layers):
        return None
    key = tuple((m.weight.data_ptr(), m.scale.data_ptr()) for m in layers)
    memo = getattr(layers[0], "_packed_fp8", None)
    if memo is not None and memo[0] == key:
        return memo[1]
    w, s = _stacked_view([m.weight for m in layers]), _stacked_view([m.scale for m in layers])
    if w is None or s is None:
        return None
    layers[0]._packed_fp8 = (key, (w, s))
    return w, s


def _plain_weights(layers: list) -> list | None:
    ws = [layer.weight for layer in layers if isinstance(layer, nn.Linear) and layer.bias is None]
    if not ws or len(ws) != len(layers) or any(type(w.data) is not torch.Tensor or w.dim() != 2 for w in ws):
        return None
    w0 = ws[0]
    if any(w.dtype != w0.dtype or w.device != w0.device or w.shape[1] != w0.shape[1] for w in ws):
        return None
    return ws


def packed_weight(layers: list) -> torch.Tensor | None:
    """[ΣN, K]: the weights of `layers` as one matrix (a view) when they lie back to back in one buffer,
    as `pack` leaves them; else None."""
    ws = _plain_weights(layers)
    if ws is None:
        return None
    key = tuple(w.data_ptr() for w in ws)
    memo = getattr(layers[0], "_packed", None)
    if memo is not None and memo[0] == key:
        return memo[1]
    view = _stacked_view(ws)
    if view is None:
        return None
    layers[0]._packed = (key, view)
    return view


def pack(layers: list) -> bool:
    """Move the weights of `layers` (plain `nn.Linear`s of one input) back to back into one new buffer,
    each weight a view of it: parameters, names and the state dict are unchanged, and `linears` then
    runs them as one GEMM in inference. For inference only (`Transformer.pack_projections`): a checkpoint
    writer may store each view with the whole buffer. The FP8 layers of a group (`dsv4.quant.FP8Linear`)
    are packed among themselves, weights and block scales each in one buffer. False where nothing could
    be packed."""
    fp8 = [layer for layer in layers if _is_fp8(layer)]
    if _fp8_packable(fp8):
        with torch.inference_mode(False), torch.no_grad():
            for name in ("weight", "scale"):
                buf = torch.cat([getattr(m, name) for m in fp8])
                at = 0
                for m in fp8:
                    n = getattr(m, name).shape[0]
                    setattr(m, name, buf[at:at + n])            # a registered buffer: replaced in place
                    at += n
        return True
    ws = _plain_weights(layers)
    if ws is None or len(ws) < 2:
        return False
    with torch.inference_mode(False), torch.no_grad():
        buf = torch.cat([w.data for w in ws])
        at = 0
        for layer in layers:
            n = layer.weight.shape[0]
            layer.weight.data = buf[at:at + n]
            at += n
    return True


# ----------------------------------------------------------------------------- RoPE
def rope_freqs(rope_dim: int, theta: float, yarn: dict | None) -> torch.Tensor:
    """Per-pair frequencies f_i = θ^(−2i/Dr), with the YaRN ramp when given (spec §5.2). [Dr/2] float64
    (angles are then formed in fp32, as the official code, or in float64 for a float64 model)."""
    # explicit CPU tensors: a model built under `torch.device("meta")` (checkpoint loading) keeps real values
    freqs = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float64, device="cpu") / rope_dim))
    if yarn is not None:
        low, high = yarn_low_high(rope_dim, theta, yarn)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(rope_dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
        freqs = freqs * ((1 - ramp) + ramp / yarn["factor"])
    return freqs


# ----------------------------------------------------------------------------- compressor
class Compressor(nn.Module):
    """Softmax-gated pooling of every M tokens into one entry (spec §6).

    Overlapping (M = 4, CSA): projections have 2c features; the half [c:2c) pools the entry's own
    window, the half [0:c) is borrowed by the *next* entry, so entry i summarises tokens
    (i−1)M … (i+1)M−1 over 2M slots (entry 0's borrowed slots have zero weight). Otherwise (HCA)
    entry i pools tokens iM … iM+M−1. Projections and pooling run in fp32; entries are cast to the
    model dtype, RMS-normalised and roped at position i·M.

    One pooling path serves every caller: the caller lists, for each entry, the source token of each
    of its J slots (`slots`, −1 = empty) and `ops.compress_windows` pools them. `entries` (full
    sequence, packed documents too) lists windows of the call's tokens; `update` (cache: chunked
    prefill, rows at different positions, the one-token decode step) lists windows of the row's
    compressor state followed by the new tokens.
    """

    def __init__(self, dim: int, ratio: int, head_dim: int, eps: float):
        super().__init__()
        self.ratio, self.head_dim = ratio, head_dim
        self.overlap = ratio == 4
        width = (2 if self.overlap else 1) * head_dim
        self.wkv = nn.Linear(dim, width, bias=False)
        self.wgate = nn.Linear(dim, width, bias=False)
        self.ape = nn.Parameter(torch.zeros(ratio, width))
        self.norm = RMSNorm(head_dim, eps)

    def project(self, x: torch.Tensor, pos: torch.Tensor, pre=None,
                with_ape: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """kv and gate scores [B, S, w] fp32, the scores with `ape` added at pos mod M unless with_ape is
        False (the decode step's kernel adds it). pre: the two projections of x, computed by the caller."""
        kv, gate = pre if pre is not None else (linear(x, self.wkv, fp32=True), linear(x, self.wgate, fp32=True))
        if not with_ape:
            return kv, gate
        return kv, gate + ops.rows_at(up(self.ape), pos % self.ratio)

    def finish(self, pooled: torch.Tensor, index: torch.Tensor, freqs: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
        """Cast, normalise and rope entries [B, n, c] whose entry indices are index [B, n]."""
        return ops.norm_rope(pooled.to(dtype), self.norm.weight, self.norm.eps, ops.Rope(index, freqs, self.ratio))

    def _slots(self, own: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Slot lists [B, n, J] from the first source token of each entry's own window and of the
        previous window (−1: none), windows being M consecutive source tokens."""
        k = torch.arange(self.ratio, device=own.device)
        own_s = torch.where(own.unsqueeze(-1) >= 0, own.unsqueeze(-1) + k, -1)       # [B, n, M]
        if not self.overlap:
            return own_s
        prev_s = torch.where(prev.unsqueeze(-1) >= 0, prev.unsqueeze(-1) + k, -1)
        return torch.cat([prev_s, own_s], dim=-1)                                  # [B, n, 2M]

    # -- full sequence (no cache); packed documents (seg) compress independently
    def entries(self, x: torch.Tensor, pos: torch.Tensor, seg: torch.Tensor | None,
                freqs: torch.Tensor, pre=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Entries [B, C, c] of the complete windows, and with seg the index of the first entry of each
        token's document [B, S] (entries of one document are consecutive; without seg, 0)."""
        B, S, _ = x.shape
        m = self.ratio
        kv, score = self.project(x, pos, pre)                                     # [B, S, w]
        if seg is None:         # windows at 0, M, 2M, ...: the same lists for every row and call of length S
            slots, index, _ = self._full_plan(S, x.device)
            pooled = ops.compress_windows(kv, score, slots.expand(B, -1, -1), self.overlap)
            return self.finish(pooled, index.expand(B, -1), freqs, x.dtype), None
        else:
            # a window starts at each token at a position ≡ 0 (mod M) whose document still holds
            # the window's last token (positions restart at 0 in each document)
            i = torch.arange(S, device=x.device)
            end = (i + m - 1).clamp(max=S - 1)
            starts = (pos % m == 0) & (i + m - 1 < S) & (seg[:, end] == seg) & (pos[:, end] == pos + m - 1)
            # at most S // M windows fit in a row (their tokens are disjoint); rows with fewer end in
            # entries marked −1, which no query's list reaches. A static count: no host read.
            n = S // m
            order = torch.where(starts, i, S).sort(dim=1).values[:, :n]           # [B, n] starts first
            own = torch.where(order < S, order, -1)
            index = torch.where(own >= 0, pos.gather(1, own.clamp(min=0)) // m, 0)
            before = torch.cumsum(starts.long(), 1) - starts.long()               # entries before token i
            new_doc = torch.ones_like(seg, dtype=torch.bool)
            new_doc[:, 1:] = seg[:, 1:] != seg[:, :-1]
            doc0 = torch.where(new_doc, i, 0).cummax(dim=1).values                # each token's document start
            first = before.gather(1, doc0)                                        # [B, S]
        prev = torch.where((own >= m) & (index > 0), own - m, -1)
        pooled = ops.compress_windows(kv, score, self._slots(own, prev), self.overlap)
        return self.finish(pooled, index, freqs, x.dtype), first

    def _full_plan(self, S: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Slot lists [1, n, J] and entry indices [1, n] of a sequence of S tokens from position 0, one
        document, and the token each compressor-state slot holds after them [(1+o)M] (S >= M: the last
        token ≡ j (mod M) for slot o·M + j of the current window, token (S // M − 1)·M + j for slot j of
        the previous one): kept per (M, overlap, S) with the cached-update plans (`_PLANS`), not while a
        CUDA graph is being captured or a graph compiled (their values would not exist yet)."""
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        keep = not (torch.compiler.is_compiling() or capturing)
        key = ("full", self.ratio, self.overlap, S, str(device))
        if keep and key in _PLANS:
            return _PLANS[key]
        n, m = S // self.ratio, self.ratio
        with torch.inference_mode(False), torch.no_grad():    # plain tensors, usable in any mode
            own = (torch.arange(n, device=device) * m).unsqueeze(0)                   # [1, n]
            index = own // m
            j = torch.arange(m, device=device)
            held = (S - 1) - torch.remainder(S - 1 - j, m)                            # current window
            if self.overlap:
                held = torch.cat([(n - 1) * m + j, held])                             # previous window
            plan = self._slots(own, torch.where(index > 0, own - m, -1)), index, held
        return _keep_plan(key, plan) if keep else plan

    # -- cached: state.kv/state.score [Bmax, (1+o)M, w] (slots 0..M-1 = previous complete window when
    # overlapping, then slot t mod M of the current window holding the last token fed at such a t),
    # state.entries [Bmax, Cmax, c]
    def update(self, x: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor, state, rows: torch.Tensor,
               pre=None, starts: tuple[int, ...] | None = None) -> None:
        """Feed S new tokens to each row (rows at any positions, pos[b] = p0_b + arange(S)): write the
        entries of the windows they complete to state.entries and advance the state.

        Source tokens: the row's (1+o)M state slots, then the S new tokens. Entry i of the call
        (global entry p0 // M + i) owns the virtual tokens [M(i+1), M(i+2)) of the sequence
        [previous window | window of p0 | ...]; a window is complete when its last token is fed.
        With S = 1 there is one window and no host synchronisation (`_update_one`, the decode step: the
        entry is written where its window completes, `torch.where` elsewhere); longer calls write the
        complete entries by a scatter whose other writes repeat a value already written (no host read
        either), from an index plan looked up by the start position mod M (`_plan_table`); rows that all
        start at 0 with at least M tokens (new prompts, `starts` known on the host) take `_update_fresh`,
        which reads no state slot. Every slot keeps the last token fed to it (what
        `DecodeCache.rollback` relies on)."""
        B, S, _ = x.shape
        m = self.ratio
        if S == 1:
            kv, gate = self.project(x, pos, pre, with_ape=False)                  # [B, 1, w]
            return self._update_one(kv, gate, pos[:, 0], freqs, state, rows)
        kv, score = self.project(x, pos, pre)                                     # [B, S, w]
        if starts and S >= m and not any(starts):
            return self._update_fresh(kv, score, freqs, state, rows)
        src_kv = torch.cat([state.kv[rows], kv], dim=1)                           # [B, (1+o)M + S, w]
        src_sc = torch.cat([state.score[rows], score], dim=1)
        table = None
        if not (torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing())):
            table = self._plan_table(S, x.device)           # the plan of each residue, once per call length
        # the rows' residue when the host knows it and it is shared (a batch of new prompts): the plan's
        # lookups are then views, and every row completes (residue + S) // M windows
        res = starts[0] % m if starts and len({p % m for p in starts}) == 1 else None
        if table is None:
            win, slots, tgt, n_done, sel = self._plan(S, (pos[:, :1] % m))
        elif res is not None:
            win = table[0]
            slots, tgt, n_done, sel = (t[res].expand(B, *t.shape[1:]) for t in table[1:])
        else:
            win = table[0]
            slots, tgt, n_done, sel = (t[pos[:, 0] % m] for t in table[1:])
        base = pos[:, :1] // m                                                    # [B, 1] first entry
        ent = self.finish(ops.compress_windows(src_kv, src_sc, slots, self.overlap), base + win, freqs,
                          state.dtype)                                            # [B, n_win, c]
        if state.rope_dim:                                                        # FP8 rows (`kv_fp8`)
            ent = ops.kv8_quant(ent, state.rope_dim)
        # write the complete windows with no host read: every other window's write is sent to a complete
        # one of its row with that window's entry (or, in a row that completes none, to the row's first
        # entry with the value it holds), so each written place gets one value
        if state.entries.shape[1]:            # (a cache shorter than one window holds no entries)
            at = (base + tgt).clamp(max=state.entries.shape[1] - 1)
            r = rows.unsqueeze(1).expand_as(at)
            val = ent.gather(1, tgt.unsqueeze(-1).expand_as(ent))
            if res is None or (res + S) // m == 0:
                val = torch.where((n_done > 0).unsqueeze(-1), val, state.entries[r, at])
            state.entries[r, at] = val
        sel = sel.unsqueeze(-1).expand(-1, -1, kv.shape[-1])                     # [B, (1+o)M, w]
        state.kv[rows], state.score[rows] = src_kv.gather(1, sel), src_sc.gather(1, sel)

    def _update_fresh(self, kv: torch.Tensor, score: torch.Tensor, freqs: torch.Tensor, state,
                      rows: torch.Tensor) -> None:
        """`update` for rows that start at position 0 with at least M tokens (new prompts): no state slot
        is read, since a first window has no previous one and every slot of the new state holds one of
        the new tokens. The entries are those of the full sequence (`entries`), written to the row's first
        S // M places, and the state slots take the tokens `_full_plan` lists: the same entries and state
        as the general path, with half its index operations."""
        B, S, _ = kv.shape
        slots, index, held = self._full_plan(S, kv.device)
        ent = self.finish(ops.compress_windows(kv, score, slots.expand(B, -1, -1), self.overlap),
                          index.expand(B, -1), freqs, state.dtype)               # [B, S // M, c]
        if state.rope_dim:                                                        # FP8 rows (`kv_fp8`)
            ent = ops.kv8_quant(ent, state.rope_dim)
        if ent.shape[1]:                      # (the row's length was checked against the cache's)
            state.entries[rows, :ent.shape[1]] = ent
        state.kv[rows], state.score[rows] = kv.index_select(1, held), score.index_select(1, held)

    def _plan(self, S: int, rem: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Index plan of feeding S tokens to rows whose first position is ≡ rem [R, 1] (mod M): win
        [n_win] (the call's windows), slots [R, n_win, J] (source token of each pooling slot, −1 none;
        sources are the row's (1+o)M state slots, then the S tokens), tgt [R, n_win] (the window whose
        entry each window's write carries), n_done [R, 1] (windows completed), sel [R, (1+o)M] (source
        of each slot of the new state)."""
        m, o = self.ratio, int(self.overlap)
        dev = rem.device
        R = rem.shape[0]
        n_win = (S + 2 * m - 2) // m
        v = torch.arange(m * (n_win + 1), device=dev)                             # virtual token index
        off = v - m                                                               # position − window start
        vsrc = torch.where(off < rem, o * m + off,                               # [R, Lv] source or −1
                           torch.where(off - rem < S, (1 + o) * m + off - rem, -1))
        vsrc = torch.where(v < m, v if o else -1, vsrc)
        win = torch.arange(n_win, device=dev)
        own = (m * (win + 1)).expand(R, n_win)                                   # virtual start of each window
        slots = vsrc.gather(1, self._slots(own, own - m).flatten(1)).view(R, n_win, -1)
        n_done = (rem + S) // m                                                   # [R, 1]
        tgt = torch.where(win < n_done, win, (n_done - 1).clamp(min=0))          # [R, n_win]
        # new state: slot j of the current window <- the last fed token at a position ≡ j (mod M);
        # the previous window <- the last window completed by this call
        j = torch.arange(m, device=dev)
        v_end = m + rem + S - 1                                                   # [R, 1]
        v_j = v_end - torch.remainder(v_end - m - j, m)                           # [R, M]
        keep = [torch.where(v_j >= m, vsrc.gather(1, v_j.clamp(min=0)), o * m + j)]
        if o:
            prev = vsrc.gather(1, (m * n_done + j).clamp(max=vsrc.shape[1] - 1))
            keep.insert(0, torch.where(n_done >= 1, prev, j))
        return win, slots, tgt, n_done, torch.cat(keep, dim=1)

    def _plan_table(self, S: int, device: torch.device) -> tuple[torch.Tensor, ...] | None:
        """`_plan` for every residue 0..M−1 (rows indexed by the residue), shared by the compressors of
        one (M, overlap) and kept per call length S: a cached prefill then costs four lookups instead
        of ~45 small index ops on the host. None where the table would exceed PLAN_TABLE_MAX entries
        (long calls, where the host's share is small anyway)."""
        key = (self.ratio, self.overlap, S, str(device))
        table = _PLANS.get(key)
        if table is None:
            n_win = (S + 2 * self.ratio - 2) // self.ratio
            if self.ratio * n_win * self.ratio * (1 + int(self.overlap)) > PLAN_TABLE_MAX:
                return None
            with torch.inference_mode(False), torch.no_grad():    # plain tensors, usable in any mode
                table = self._plan(S, torch.arange(self.ratio, device=device).unsqueeze(1))
            _keep_plan(key, table)
        return table

    def _update_one(self, kv: torch.Tensor, gate: torch.Tensor, p: torch.Tensor, freqs: torch.Tensor, state,
                    rows: torch.Tensor) -> None:
        """`update` for one token per row at positions p [B] (the decode step), with no host read and two
        launches; the same entries and state, bit for bit.

        `ops.compressor_step` adds `ape` to the gate scores, puts the token in state slot (o·M + p mod M),
        pools the window it would
        complete over the slots as they then stand (previous window, then the current one) and moves a
        completed window to the previous one when windows overlap; `ops.compressor_entry` finishes the
        pooled value (`finish`) and writes it where p ends a window (a window that is not complete yet is
        never written)."""
        pooled = ops.compressor_step(state.kv, state.score, rows, kv, gate, self.ape, p, self.ratio,
                                     self.overlap)                                # [B, 1, c]
        if state.rope_dim:                                                        # FP8 rows (`kv_fp8`)
            ops.compressor_entry_kv8(state.entries, rows, pooled, p, self.ratio, self.norm.weight, self.norm.eps,
                                     freqs, state.dtype)
        else:
            ops.compressor_entry(state.entries, rows, pooled, p, self.ratio, self.norm.weight, self.norm.eps, freqs)


class Indexer(nn.Module):
    """Lightning indexer (spec §7): picks the top-k compressed entries for each query of a CSA layer.

    I[t, s] = Σ_h w[t, h] · ReLU(q[t, h] · K[s]), q from the query latent c^Q, K from its own
    4:1 overlapping compressor, w = weights_proj(x) · Di^−½ · Hi^−½.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)
        self.compressor = Compressor(cfg.hidden_size, 4, self.head_dim, cfg.rms_norm_eps)

    @property
    def w_scale(self) -> float:
        """The head weights' constant factor Di^−½ · Hi^−½."""
        return self.head_dim ** -0.5 * self.n_heads ** -0.5

    def queries(self, x: torch.Tensor, qr: torch.Tensor, rope: ops.Rope,
                pre=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Roped queries [B, S, Hi, Di] and head weights [B, S, Hi] fp32 (pre: the roped queries
        [B, S, Hi, Di] and weights_proj(x), computed by the caller)."""
        B, S, _ = x.shape
        if pre is not None:
            q, w = pre
        else:
            q = ops.norm_rope(linear(qr, self.wq_b).view(B, S, self.n_heads, self.head_dim), None, None, rope)
            w = linear(x, self.weights_proj)
        return q, up(w) * self.w_scale                                                 # [B, S, Hi]


class Attention(nn.Module):
    """One attention block of type SWA / CSA / HCA (spec §5.1): low-rank q with per-head RMSNorm,
    one shared K=V head, partial interleaved RoPE, sinks, output de-rotation, grouped output projection.

    Every query attends to one list of keys (spec §5.1 step 4, the official `sparse_attn`): indices
    into `[window keys | compressed entries]`, −1 = none. Window keys: the call's own tokens (full
    sequence) or the row's ring followed by the call's tokens (cache); the compressed entries are read
    in place (`ops.sparse_attention`'s second key source). SWA lists only window keys, HCA adds every
    visible entry, CSA the indexer's top-k among the visible entries (`ops.index_topk`); entry s is
    visible from position t iff s < (t + 1) // M. `_indices` builds the lists, one call attends.
    """

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        D, H, Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        self.n_heads, self.head_dim, self.window, self.eps = H, Dh, cfg.sliding_window, cfg.rms_norm_eps
        self.ratio = cfg.layer_ratio(layer)
        self.groups, self.o_rank = cfg.o_groups, cfg.o_lora_rank
        self.wq_a = nn.Linear(D, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = nn.Linear(cfg.q_lora_rank, H * Dh, bias=False)
        self.wkv = nn.Linear(D, Dh, bias=False)
        self.kv_norm = RMSNorm(Dh, cfg.rms_norm_eps)
        self.wo_a = nn.Linear(H * Dh // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(cfg.o_groups * cfg.o_lora_rank, D, bias=False)
        self.attn_sink = nn.Parameter(torch.zeros(H))
        self.compressor = Compressor(D, self.ratio, Dh, cfg.rms_norm_eps) if self.ratio else None
        self.indexer = Indexer(cfg) if self.ratio == 4 else None
        # sliding-window layers: θ = rope_theta, no YaRN; compressed layers: compress_rope_theta + YaRN
        theta = cfg.compress_rope_theta if self.ratio else cfg.rope_theta
        # a plain attribute, not a buffer: `model.to(bf16)` must not round the frequencies
        self.freqs = rope_freqs(cfg.qk_rope_head_dim, theta, cfg.yarn if self.ratio else None)
        self._freqs_on: dict = {}
        # CSA training phases (spec §15): index_mode "sparse" (indexer top-k; inference) or "dense" (all
        # visible entries). index_loss=True also returns the KL divergence from the main attention over
        # compressed entries (summed over heads, L1-normalised) to the indexer's softmax, over all
        # visible entries in dense mode and over the selected ones in sparse mode, with the indexer's
        # inputs detached in sparse mode, as forward's second output `(Σ over queries, query count)`.
        self.index_mode = "sparse"
        self.index_loss = False

    def forward(self, x: torch.Tensor, pos: torch.Tensor, seg: torch.Tensor | None = None,
                state=None, rows: torch.Tensor | None = None,
                starts: tuple[int, ...] | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, int] | None]:
        """x [B, S, D] -> (output [B, S, D], index KL `(Σ over queries, queries)` or None when not computed).
        starts: the cache rows' first positions when the host knows them (saves reading them back)."""
        B, S, _ = x.shape
        H, Dh = self.n_heads, self.head_dim
        freqs = self._freqs_on.get(x.device)
        if freqs is None:
            freqs = self._freqs_on[x.device] = self.freqs.to(x.device)
        rope = ops.Rope(pos, freqs)                                                    # angles pos · freqs
        if torch.is_grad_enabled():    # (the indexer's inputs may be detached: each projection on its own)
            qa, kv, pre = linear(x, self.wq_a), linear(x, self.wkv), None
            qr = self.q_norm(qa)                                                      # [B, S, q_lora]
            q = linear(qr, self.wq_b)                                                 # [B, S, H·Dh]
        elif state is not None and self.ratio and S == 1 and self._decode_topk_ahead():
            # a CSA decode step: the compressors, then the indexer's queries and top-k, on a second stream
            # beside the query and key projections (concurrent in a CUDA graph, `dsv4.streams`)
            with streams.side(x):
                w_idx = self._update_compressors(x, pos, freqs, state, rows, starts)
            qr, kv = self._latent(x, rope)
            with streams.side(qr):       # (after the compressors: the side stream keeps its order)
                cidx = self._decode_topk(qr, w_idx, rope, pos, state, rows)
            q = ops.norm_rope(linear(qr, self.wq_b).view(B, S, H, Dh), None, self.eps, rope)
            streams.join(x)
            pre = {"updated": True, "cidx": cidx}
        elif state is not None and self.ratio:   # inference with a cache: the compressors' branch beside
            # the query and key projections (concurrent in a CUDA-graph decode step, `dsv4.streams`)
            w_idx, (qr, q, kv, pre) = streams.concurrently(
                lambda: self._update_compressors(x, pos, freqs, state, rows, starts),
                lambda: self._projections(x, rope, compressors=False), x)
            pre["updated"] = True
            if w_idx is not None:
                pre["index"] = (pre["index"][0], w_idx)
        else:                          # inference: the projections of one input as one GEMM (`linears`)
            qr, q, kv, pre = self._projections(x, rope)
        if pre is None:
            q = ops.norm_rope(q.view(B, S, H, Dh), None, self.eps, rope)               # per-head RMS, rope
            kv = ops.norm_rope(kv, self.kv_norm.weight, self.kv_norm.eps, rope)        # [B, S, Dh]
        o, index_kl = self._attend(x, qr, q, kv, pos, rope, freqs, seg, state, rows, pre, starts)   # [B, S, H, Dh]
        o = ops.norm_rope(o, None, None, rope.inverse())                               # de-rotate
        o = o.reshape(B, S, self.groups, H * Dh // self.groups)                       # [B, S, G, H·Dh/G]
        u = grouped_linear(o, self.wo_a, self.groups)                                  # [B, S, G·d_g]
        return linear(u, self.wo_b), index_kl                                          # [B, S, D]

    def projection_groups(self) -> list[tuple[list, bool]]:
        """The projections that share an input, as (layers, fp32 output): of the block input x in the
        model dtype, of x in fp32 (the compressors'), and of the query latent. `Transformer.pack_projections`
        packs each group; `_projections` runs each as one GEMM."""
        xs, x32, qs = [self.wq_a, self.wkv], [], [self.wq_b]
        if self.compressor is not None:
            x32 += [self.compressor.wkv, self.compressor.wgate]
        if self.indexer is not None:
            xs.append(self.indexer.weights_proj)
            x32 += [self.indexer.compressor.wkv, self.indexer.compressor.wgate]
            qs.append(self.indexer.wq_b)
        return [(xs, False), (x32, True), (qs, False)]

    def _decode_topk_ahead(self) -> bool:
        """Whether a decode step of this layer takes its indexer's top-k before `_attend`
        (`_decode_topk`): a CSA layer selecting by the indexer, without the index loss."""
        return self.indexer is not None and self.index_mode == "sparse" and not self.index_loss

    def _latent(self, x: torch.Tensor, rope: ops.Rope) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference: the query latent qr (q_norm applied) and the key kv (normalised, roped) of x, as one
        GEMM and one norm/rope launch."""
        qa, kv = linears(x, [self.wq_a, self.wkv])
        return ops.norm_rope_pair(qa, self.q_norm.weight, self.q_norm.eps, None,
                                  kv, self.kv_norm.weight, self.kv_norm.eps, rope)

    def _decode_topk(self, qr, w_idx, rope, pos, state, rows) -> torch.Tensor:
        """A decode step's indexer choice cidx [B, P] (−1 = none): its queries from qr, their scores
        against the entries of the cache rows, the top-k of the visible ones. The entries must be
        updated first (`_update_compressors`, which gives w_idx)."""
        ix = self.indexer
        B, S, _ = qr.shape
        iq = ops.norm_rope(linear(qr, ix.wq_b).view(B, S, ix.n_heads, ix.head_dim), None, None, rope)
        ikeys = state.index.entries[:, :state.comp.entries.shape[1]]
        return ops.index_topk_decode(iq, ikeys, w_idx, ix.w_scale, pos, self.ratio, ix.topk, rows)[:, 0]

    def _projections(self, x: torch.Tensor, rope: ops.Rope, compressors: bool = True):
        """Inference: the block's projections by group, normalised and roped two at a time (one launch
        each: q_norm with kv's norm and rope, the per-head query norm and rope with the indexer's query
        rope) -> (qr, q [B, S, H, Dh], kv [B, S, Dh], the compressors' and indexer's inputs for `_attend`).
        compressors=False: without the compressors' projections and the indexer's head weights
        (`_update_compressors` computes them; pre["index"] then holds None for the weights)."""
        B, S, _ = x.shape
        (xs, _), (x32, _), (qs, _) = self.projection_groups()
        if not compressors:
            xs = xs[:2]                                            # wq_a, wkv (not the indexer's weights_proj)
        a = linears(x, xs)
        c = linears(x, x32, fp32=True) if x32 and compressors else []
        qr, kv = ops.norm_rope_pair(a[0], self.q_norm.weight, self.q_norm.eps, None,
                                    a[1], self.kv_norm.weight, self.kv_norm.eps, rope)
        b = linears(qr, qs)
        q = b[0].view(B, S, self.n_heads, self.head_dim)
        pre = {"comp": tuple(c[:2]) if c else None}
        if self.indexer is not None:
            ix = self.indexer
            q, iq = ops.norm_rope_pair(q, None, self.eps, rope, b[1].view(B, S, ix.n_heads, ix.head_dim), None, None,
                                       rope)
            pre["index"], pre["icomp"] = (iq, a[2] if compressors else None), tuple(c[2:4]) if c else None
        else:
            q = ops.norm_rope(q, None, self.eps, rope)
        return qr, q, kv, pre

    def _update_compressors(self, x, pos, freqs, state, rows, starts) -> torch.Tensor | None:
        """Inference with a cache: feed x to the layer's compressor and the indexer's (their projections
        of x as one GEMM) -> the indexer's head weights weights_proj(x) (None without an indexer)."""
        c = linears(x, self.projection_groups()[1][0], fp32=True)
        self.compressor.update(x, pos, freqs, state.comp, rows, tuple(c[:2]), starts)
        if self.indexer is None:
            return None
        self.indexer.compressor.update(x, pos, freqs, state.index, rows, tuple(c[2:4]), starts)
        return linear(x, self.indexer.weights_proj)

    def _attend(self, x, qr, q, kv, pos, rope, freqs, seg, state, rows, pre=None, starts=None):
        """Keys, index lists and one attention call per query chunk (memory linear in S); pre: the
        compressors' and indexer's projections when `_projections` computed them.
        -> (o [B, S, H, Dh], (Σ KL, queries) when the index loss is on, else None)."""
        pre = pre or {}
        B, S, _ = x.shape
        m, W = self.ratio, self.window
        want_loss = self.indexer is not None and self.index_loss
        sparse = self.indexer is not None and self.index_mode == "sparse"
        # sparse phase with index loss: the indexer (queries and its own compressor) sees detached inputs,
        # so the KL trains the indexer only
        detach = want_loss and sparse
        x_idx, qr_idx = (x.detach(), qr.detach()) if detach else (x, qr)
        comp = ikeys = first = c_rows = None
        in_ring = False
        n_comp = 0
        if state is None:
            keys = kv                                                                 # [B, S, Dh]
            if m:
                comp, first = self.compressor.entries(x, pos, seg, freqs, pre.get("comp"))   # [B, C, Dh]
                n_comp = comp.shape[1]
                if self.indexer is not None:
                    ikeys = self.indexer.compressor.entries(x_idx, pos, seg, freqs, pre.get("icomp"))[0]  # [B, C, Di]
        else:
            # a one-token step reads the ring in place (its new key is written first, with its key list);
            # a longer call attends over [ring rows | its own keys]
            in_ring = S == 1 and not want_loss
            keys = state.ring if in_ring else torch.cat([state.ring[rows], kv.to(state.ring.dtype)], dim=1)
            if m:
                if not pre.get("updated"):
                    self.compressor.update(x, pos, freqs, state.comp, rows, pre.get("comp"), starts)
                comp, c_rows = state.comp.attention_keys(self.head_dim), rows         # [Bmax, Cmax, Dh]
                # the one-token step reads the whole buffer (static shapes, no host read)
                # (a longer call: the longest row's end, from the host when it knows it, else one read)
                n_comp = comp.shape[1]
                if S > 1:
                    end = max(starts) + S if starts else int((pos[:, -1] + 1).max())
                    n_comp = min(n_comp, end // m)
                if self.indexer is not None:
                    if not pre.get("updated"):
                        self.indexer.compressor.update(x_idx, pos, freqs, state.index, rows, pre.get("icomp"),
                                                       starts)
                    ikeys = state.index.entries[:, :n_comp]                          # [Bmax, C, Di]
        iq = iw = None
        # (an inference decode step's top-k was taken before `_attend`: `_decode_topk`)
        if self.indexer is not None and (sparse or want_loss) and "cidx" not in pre:
            iq, iw = self.indexer.queries(x_idx, qr_idx, rope, pre.get("index"))
        k_comp = min(self.indexer.topk, n_comp) if sparse else n_comp
        per_query = W + k_comp + (n_comp if sparse else 0)
        chunk = max(1, min(S, ATTN_BUDGET // max(per_query, 1)))
        outs, kl_sum, kl_count = [], (x.new_zeros((), dtype=acc_dtype(x.dtype)) if want_loss else None), None
        for s0 in range(0, S, chunk):
            s1 = min(S, s0 + chunk)
            if state is not None and in_ring:   # the decode step: one launch for the ring write and the lists
                idx, cidx = self._decode_indices(pos, n_comp, None if iq is None or not sparse else (iq, iw, ikeys),
                                                 c_rows, state.ring, rows, kv, pre.get("cidx")), None
            else:
                idx, cidx = self._indices(s0, s1, pos, seg, state is not None, first, n_comp,
                                          None if iq is None or not sparse else (iq[:, s0:s1], iw[:, s0:s1], ikeys),
                                          c_rows, keys.shape[1], want_cidx=want_loss)
            res = ops.sparse_attention(q[:, s0:s1], keys, idx, self.attn_sink, self.head_dim ** -0.5,
                                       comp, c_rows, return_lse=want_loss, rows1=rows if in_ring else None)
            if want_loss:
                res, lse = res
                if n_comp:
                    kl, n = self._index_kl(q[:, s0:s1], lse, comp, cidx, iq[:, s0:s1], iw[:, s0:s1], ikeys, c_rows)
                    kl_sum, kl_count = kl_sum + kl, (n if kl_count is None else kl_count + n)
            outs.append(res)
        if state is not None and not in_ring:  # the last W tokens of this call go to the ring at slot t mod W
            keep = min(S, W)
            state.ring[rows.unsqueeze(1), pos[:, S - keep:] % W] = kv[:, S - keep:].to(state.ring.dtype)
        o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)                    # [B, S, H, Dh]
        if want_loss and kl_count is None:
            kl_count = torch.zeros((), dtype=torch.long, device=x.device)
        return o, ((kl_sum, kl_count) if want_loss else None)

    def _decode_indices(self, pos, n_comp, indexer_in, c_rows, ring, rows, kv, cidx=None):
        """`_indices` of one cached query per row, through `ops.decode_key_lists`: one kernel instead of
        ~20 small ops, which also writes the new keys kv [B, 1, Dh] to the ring first, so that the lists
        index [ring | entries] and the attention reads the ring in place. cidx: the indexer's choice when
        taken before (`_decode_topk`)."""
        if self.ratio and indexer_in is not None:   # (iw already scaled: factor 1)
            iq, iw, ikeys = indexer_in
            cidx = ops.index_topk_decode(iq, ikeys, iw, 1.0, pos, self.ratio, self.indexer.topk, c_rows)[:, 0]
        return ops.decode_key_lists(pos[:, 0], self.window, self.ratio, n_comp, self.window, cidx, ring=ring,
                                    rows=rows, kv=kv[:, 0])

    def _indices(self, s0, s1, pos, seg, cached, first, n_comp, indexer_in, c_rows, t_window, want_cidx=False):
        """Key lists of queries s0..s1−1: idx [B, Sc, W + K] into [window keys | entries] (entries
        offset by t_window; `ops.key_lists`), and the entries' part alone cidx [B, Sc, K] (−1 = none):
        the indexer's choice, or with `want_cidx` every visible entry (else None)."""
        cidx = None
        if self.ratio and (indexer_in is not None or want_cidx):
            qpos = pos[:, s0:s1]
            lo = first[:, s0:s1] if first is not None else torch.zeros_like(qpos)        # [B, Sc]
            if indexer_in is not None:
                iq, iw, ikeys = indexer_in
                hi = torch.clamp(lo + (qpos + 1) // self.ratio, max=n_comp)
                cidx = ops.index_topk(iq, ikeys, iw, lo, hi, self.indexer.topk, c_rows)  # [B, Sc, P]
            else:
                cidx = ops.dense_entries(lo, qpos, self.ratio, n_comp)                 # [B, Sc, C]
        idx = ops.key_lists(pos, seg, first, s0, s1, self.window, self.ratio, n_comp, t_window, cidx, cached)
        return idx, cidx

    def _index_kl(self, q, lse, comp, cidx, iq, iw, ikeys, c_rows) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ over queries of KL(p ‖ softmax(I)) on the listed compressed entries cidx [B, Sc, P], where p
        is the main attention's probability of each entry summed over heads (from the attention's lse),
        and the number of queries with entries (a 0-d long tensor: no host read)."""
        if isinstance(comp, ops.KV8):
            comp = comp.dequant()
        if c_rows is not None:   # cache buffers: this call's rows
            comp, ikeys = comp.index_select(0, c_rows), ikeys.index_select(0, c_rows)
        with torch.no_grad():
            keys = up(ops.gather_keys(comp, cidx))                                    # [B, Sc, P, Dh]
            z = torch.einsum("bshd,bspd->bshp", up(q), keys) * self.head_dim ** -0.5   # [B, Sc, H, P]
            p = torch.exp(z - lse.unsqueeze(-1)).sum(dim=2).masked_fill(cidx < 0, 0)  # [B, Sc, P]
            p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
        logq = torch.log_softmax(ops.index_scores_at(iq, ikeys, iw, cidx), dim=-1)
        has = (cidx >= 0).any(-1)                                                     # [B, Sc]
        terms = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-30)) - logq), torch.zeros_like(p))
        return (terms.sum(-1) * has).sum(), has.sum()
