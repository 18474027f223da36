"""Hybrid attention of DeepSeek-V4: sliding window, CSA (4:1 overlapping compression + lightning
indexer top-k) and HCA (128:1 compression, dense), one shared K=V head with attention sinks.

Spec: ARCHITECTURE.md §5 (attention), §6 (compressor), §7 (indexer), §12 (decode state).
Shapes: B batch, S query tokens, T key positions, D model dim, H heads, Dh head dim, Dr rope dim,
W window, M compression ratio, C compressed entries, Hi/Di indexer heads/head dim, G output groups.

Every query attends to one key list: `[window keys | compressed entries]` with an additive mask.
The three layer types differ only in that mask: SWA has no compressed part, HCA sees every visible
entry, CSA sees the indexer's top-k among the visible ones. Visibility of compressed entry `s` to a
query at position `t` is `s < (t + 1) // M` (the entry's window ends at or before `t`).

Two ways to run: a full-sequence pass (`state=None`; training and scoring; queries are processed in
chunks so memory grows linearly in S), and a cached pass that reads/writes a `LayerState` of
`dsv4.cache` (prefill in chunks from any position, then decode).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dsv4 import ops
from dsv4.ops import acc_dtype, fp32_region, up
from dsv4.config import ModelConfig, yarn_low_high

# Elements of the largest per-chunk score tensor (queries × heads × keys); bounds attention memory.
SCORE_BUDGET = 1 << 24


class RMSNorm(nn.Module):
    """y = w ⊙ x / sqrt(mean(x²) + eps), computed in fp32 and cast back (spec §10)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    @fp32_region
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = up(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * up(self.weight)).to(x.dtype)


def linear(x: torch.Tensor, layer: nn.Linear, fp32: bool = False) -> torch.Tensor:
    if not isinstance(layer, nn.Linear):   # a quantised layer (dsv4.quant.FP8Linear) computes itself
        return layer(up(x) if fp32 else x)
    if fp32:
        return _linear_fp32(x, layer.weight)
    return F.linear(x, layer.weight.to(x.dtype))


@fp32_region
def _linear_fp32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(up(x), up(w))


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


def rope_cos_sin(pos: torch.Tensor, freqs: torch.Tensor,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = acc_dtype(dtype)
    angles = pos.to(dtype).unsqueeze(-1) * freqs.to(device=pos.device, dtype=dtype)  # [.., Dr/2]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of the last Dr dims of x (spec §5.2); fp32 math.

    x [B, S, Dh] or [B, S, H, Dh]; cos/sin [B, S, Dr/2]. Pass −sin for the output de-rotation.
    """
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    rd = 2 * cos.shape[-1]
    nope, rope = x[..., :-rd], up(x[..., -rd:]).unflatten(-1, (-1, 2))
    a, b = rope[..., 0], rope[..., 1]
    rot = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    return torch.cat([nope, rot.to(x.dtype)], dim=-1)


# ----------------------------------------------------------------------------- compressor
class Compressor(nn.Module):
    """Softmax-gated pooling of every M tokens into one entry (spec §6).

    Overlapping (M = 4, CSA): projections have 2c features; the half [c:2c) pools the entry's own
    window, the half [0:c) is borrowed by the *next* entry, so entry i summarises tokens
    (i−1)M … (i+1)M−1 over 2M slots (entry 0's borrowed slots have zero weight). Otherwise (HCA)
    entry i pools tokens iM … iM+M−1. Projections and pooling run in fp32; entries are cast to the
    model dtype, RMS-normalised and roped at position i·M.
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

    def project(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv = linear(x, self.wkv, fp32=True)                                       # [B, S, w]
        score = linear(x, self.wgate, fp32=True) + up(self.ape)[pos % self.ratio]
        return kv, score

    def pool(self, kv: torch.Tensor, score: torch.Tensor, prev_kv: torch.Tensor | None,
             prev_score: torch.Tensor | None) -> torch.Tensor:
        """kv/score [B, n, M, w] complete windows; prev_* [B, M, w] the window before the first. -> [B, n, c]"""
        c = self.head_dim
        if not self.overlap or kv.shape[1] == 0:
            return ops.compress_pool(kv, score)[..., :c]
        prev_kv = torch.cat([prev_kv.unsqueeze(1), kv[:, :-1]], dim=1)[..., :c]     # [B, n, M, c]
        prev_sc = torch.cat([prev_score.unsqueeze(1), score[:, :-1]], dim=1)[..., :c]
        slots_kv = torch.cat([prev_kv, kv[..., c:]], dim=2)                          # [B, n, 2M, c]
        slots_sc = torch.cat([prev_sc, score[..., c:]], dim=2)
        return ops.compress_pool(slots_kv, slots_sc)

    def finish(self, pooled: torch.Tensor, index: torch.Tensor, freqs: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
        """Cast, normalise and rope entries [B, n, c] whose entry indices are index [B, n]."""
        e = self.norm(pooled.to(dtype))
        cos, sin = rope_cos_sin(index * self.ratio, freqs, dtype)
        return apply_rope(e, cos, sin)

    def empty_window(self, x: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.wkv.weight.shape[0]
        kv = x.new_zeros(batch, self.ratio, w, dtype=acc_dtype(x.dtype))
        return kv, torch.full_like(kv, float("-inf"))

    # -- full sequence (no cache); documents given by seg compress independently
    def forward_full(self, x: torch.Tensor, pos: torch.Tensor, seg: torch.Tensor | None,
                     freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns entries [B, C, c], their document ids [B, C] (−1 = padding) and indices [B, C]."""
        B, S, _ = x.shape
        m = self.ratio
        kv, score = self.project(x, pos)
        if seg is None:
            n = S // m
            pk, ps = self.empty_window(x, B)
            pooled = self.pool(kv[:, :n * m].unflatten(1, (n, m)), score[:, :n * m].unflatten(1, (n, m)), pk, ps)
            idx = torch.arange(n, device=x.device).expand(B, n)
            return self.finish(pooled, idx, freqs, x.dtype), torch.zeros_like(idx), idx
        rows = []
        for b in range(B):  # packed documents: each compresses on its own, a trailing partial window is dropped
            starts = torch.nonzero(torch.diff(seg[b], prepend=seg[b, :1] - 1)).flatten().tolist() + [S]
            parts = []
            for a, e in zip(starts[:-1], starts[1:]):
                n = (e - a) // m
                if n == 0:
                    continue
                pk, ps = self.empty_window(x, 1)
                pooled = self.pool(kv[b:b + 1, a:a + n * m].unflatten(1, (n, m)),
                                   score[b:b + 1, a:a + n * m].unflatten(1, (n, m)), pk, ps)
                idx = torch.arange(n, device=x.device).unsqueeze(0)
                parts.append((self.finish(pooled, idx, freqs, x.dtype)[0], seg[b, a].expand(n), idx[0]))
            rows.append(parts)
        C = max([sum(p[0].shape[0] for p in parts) for parts in rows] + [0])
        ent = x.new_zeros(B, C, self.head_dim)
        ent_seg = torch.full((B, C), -1, dtype=torch.long, device=x.device)
        ent_idx = torch.zeros(B, C, dtype=torch.long, device=x.device)
        for b, parts in enumerate(rows):
            if parts:
                ent[b, :sum(p[0].shape[0] for p in parts)] = torch.cat([p[0] for p in parts])
                n_b = sum(p[0].shape[0] for p in parts)
                ent_seg[b, :n_b] = torch.cat([p[1] for p in parts]).long()
                ent_idx[b, :n_b] = torch.cat([p[2] for p in parts])
        return ent, ent_seg, ent_idx

    # -- cached: state.kv/state.score [Bmax, (1+o)M, w] (slots 0..M-1 = previous complete window when
    # overlapping, then the current partial window), state.entries [Bmax, Cmax, c]
    def forward_cached(self, x: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor, state,
                       rows: torch.Tensor) -> torch.Tensor:
        """Feed S new tokens per row, write completed entries to state.entries; return entries [B, C, c]."""
        B, S, _ = x.shape
        m, o = self.ratio, int(self.overlap)
        kv, score = self.project(x, pos)
        st_kv, st_sc = state.kv[rows], state.score[rows]                              # [B, (1+o)M, w]
        starts = pos[:, 0]
        if bool((starts == starts[0]).all()):
            p = int(starts[0])
            rem, w0 = p % m, p - p % m
            cur_kv = torch.cat([st_kv[:, o * m:o * m + rem], kv], dim=1)              # positions [w0, p+S)
            cur_sc = torch.cat([st_sc[:, o * m:o * m + rem], score], dim=1)
            n = (rem + S) // m
            if n > 0:
                win_kv = cur_kv[:, :n * m].unflatten(1, (n, m))                       # [B, n, M, w]
                win_sc = cur_sc[:, :n * m].unflatten(1, (n, m))
                pk, ps = (st_kv[:, :m], st_sc[:, :m]) if o else (None, None)
                idx = (w0 // m + torch.arange(n, device=x.device)).expand(B, n)
                ent = self.finish(self.pool(win_kv, win_sc, pk, ps), idx, freqs, state.entries.dtype)
                state.entries[rows.unsqueeze(1), idx] = ent
                if o:
                    st_kv[:, :m], st_sc[:, :m] = win_kv[:, -1], win_sc[:, -1]
                # as the token loop leaves it: every slot holds the last token fed to it, so the slots
                # past the new partial window keep the tail of the last completed window
                st_kv[:, o * m:o * m + m], st_sc[:, o * m:o * m + m] = win_kv[:, -1], win_sc[:, -1]
            left = (rem + S) - n * m
            st_kv[:, o * m:o * m + left] = cur_kv[:, n * m:]
            st_sc[:, o * m:o * m + left] = cur_sc[:, n * m:]
        else:  # rows at different positions: token by token, as the official decode step
            c = self.head_dim
            for s in range(S):
                t = pos[:, s]
                slot = (o * m + t % m).view(B, 1, 1).expand(B, 1, kv.shape[-1])
                st_kv.scatter_(1, slot, kv[:, s:s + 1])
                st_sc.scatter_(1, slot, score[:, s:s + 1])
                done = (t % m) == m - 1
                if not bool(done.any()):
                    continue
                if o:
                    pk = torch.cat([st_kv[:, :m, :c], st_kv[:, m:, c:]], dim=1)      # [B, 2M, c]
                    ps = torch.cat([st_sc[:, :m, :c], st_sc[:, m:, c:]], dim=1)
                else:
                    pk, ps = st_kv, st_sc
                idx = (t // m).unsqueeze(1)                                            # [B, 1]
                ent = self.finish(ops.compress_pool(pk, ps).unsqueeze(1), idx, freqs, state.entries.dtype)
                state.entries[rows[done], idx[done, 0]] = ent[done, 0]
                if o:
                    st_kv[done, :m], st_sc[done, :m] = st_kv[done, m:], st_sc[done, m:]
        state.kv[rows], state.score[rows] = st_kv, st_sc
        n_total = int(((pos[:, -1] + 1) // m).max())
        return state.entries[rows, :n_total]

    def decode_step(self, x: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor, state,
                    rows: torch.Tensor) -> None:
        """Feed one token per row (x [B, 1, D], rows at any positions) without a host synchronisation:
        the entry of every row is pooled and written only where its window completes at this token
        (`torch.where`), so the step has static shapes and can be captured in a CUDA graph. Entry s is
        visible from position t iff s < (t + 1) // M, so a row's current (incomplete) entry slot is
        never read. Same arithmetic as the token loop of `forward_cached`."""
        B = x.shape[0]
        m, o, c = self.ratio, int(self.overlap), self.head_dim
        kv, score = self.project(x, pos)                                              # [B, 1, w]
        t = pos[:, 0]                                                                 # [B]
        slot = (o * m + t % m).view(B, 1, 1).expand(B, 1, kv.shape[-1])
        st_kv = state.kv[rows].scatter(1, slot, kv)                                   # [B, (1+o)M, w]
        st_sc = state.score[rows].scatter(1, slot, score)
        if o:
            pk = torch.cat([st_kv[:, :m, :c], st_kv[:, m:, c:]], dim=1)              # [B, 2M, c]
            ps = torch.cat([st_sc[:, :m, :c], st_sc[:, m:, c:]], dim=1)
        else:
            pk, ps = st_kv, st_sc
        done = ((t % m) == m - 1).view(B, 1, 1)                                       # [B, 1, 1]
        n_max = state.entries.shape[1]
        if n_max:  # (a window that completes always fits; a partial one past the last entry is clamped)
            idx = (t // m).clamp(max=n_max - 1).unsqueeze(1)                          # [B, 1]
            ent = self.finish(ops.compress_pool(pk, ps).unsqueeze(1), idx, freqs, state.entries.dtype)  # [B, 1, c]
            old = state.entries[rows.unsqueeze(1), idx]                               # [B, 1, c]
            state.entries[rows.unsqueeze(1), idx] = torch.where(done, ent, old)
        if o:  # a completed window becomes the previous window of the next entry
            st_kv = torch.cat([torch.where(done, st_kv[:, m:], st_kv[:, :m]), st_kv[:, m:]], dim=1)
            st_sc = torch.cat([torch.where(done, st_sc[:, m:], st_sc[:, :m]), st_sc[:, m:]], dim=1)
        state.kv[rows], state.score[rows] = st_kv, st_sc


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

    def queries(self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, _ = x.shape
        q = linear(qr, self.wq_b).view(B, S, self.n_heads, self.head_dim)             # [B, S, Hi, Di]
        q = apply_rope(q, cos, sin)
        w = up(linear(x, self.weights_proj)) * (self.head_dim ** -0.5 * self.n_heads ** -0.5)  # [B, S, Hi]
        return q, w

    def select(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Boolean [B, Sc, C]: visible entries among each query's top-k index scores."""
        scores = ops.index_scores(q, keys, w).masked_fill(~visible, float("-inf"))   # [B, Sc, C]
        k = min(self.topk, scores.shape[-1])
        top = scores.topk(k, dim=-1).indices                                           # [B, Sc, k]
        chosen = torch.zeros_like(visible).scatter_(-1, top, True)
        return chosen & visible


class Attention(nn.Module):
    """One attention block of type SWA / CSA / HCA (spec §5.1): low-rank q with per-head RMSNorm,
    one shared K=V head, partial interleaved RoPE, sinks, output de-rotation, grouped output projection."""

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
        # visible entries). index_loss=True also computes `last_index_loss`, the KL divergence from the
        # main attention over compressed entries (summed over heads, L1-normalised) to the indexer's
        # softmax, over all visible entries in dense mode and over the selected ones in sparse mode,
        # with the indexer's inputs detached in sparse mode.
        self.index_mode = "sparse"
        self.index_loss = False
        self.last_index_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, pos: torch.Tensor, seg: torch.Tensor | None = None,
                state=None, rows: torch.Tensor | None = None) -> torch.Tensor:
        B, S, _ = x.shape
        H, Dh = self.n_heads, self.head_dim
        freqs = self._freqs_on.get(x.device)
        if freqs is None:
            freqs = self._freqs_on[x.device] = self.freqs.to(x.device)
        cos, sin = rope_cos_sin(pos, freqs, x.dtype)                                 # [B, S, Dr/2]
        qr = self.q_norm(linear(x, self.wq_a))                                        # [B, S, q_lora]
        q = linear(qr, self.wq_b).view(B, S, H, Dh)                                   # [B, S, H, Dh]
        qf = up(q)
        q = apply_rope((qf * torch.rsqrt(qf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype), cos, sin)
        kv = apply_rope(self.kv_norm(linear(x, self.wkv)), cos, sin)                  # [B, S, Dh]
        if state is not None and S == 1 and not self.index_loss:
            o = self._attend_one(x, qr, q, kv, pos, cos, sin, freqs, state, rows)     # [B, 1, H, Dh]
        else:
            o = self._attend(x, qr, q, kv, pos, cos, sin, freqs, seg, state, rows)    # [B, S, H, Dh]
        o = apply_rope(o, cos, -sin)                                                   # de-rotate
        o = o.reshape(B, S, self.groups, H * Dh // self.groups)                       # [B, S, G, H·Dh/G]
        wo_a = self.wo_a.weight.to(o.dtype).view(self.groups, self.o_rank, -1)        # [G, d_g, H·Dh/G]
        u = torch.einsum("bsgi,gri->bsgr", o, wo_a).flatten(2)                         # [B, S, G·d_g]
        return linear(u, self.wo_b)                                                    # [B, S, D]

    def _attend_one(self, x, qr, q, kv, pos, cos, sin, freqs, state, rows) -> torch.Tensor:
        """Decode step: one new token per cached row, rows at any lengths, static shapes and no host
        synchronisation (the step `dsv4.graphs` captures). Keys: the window ring, the new token, and
        the compressed entries: for CSA the indexer's top-k over the row's whole entry buffer with
        invisible entries (s >= (t + 1) // M) scored −inf, for HCA (or CSA in dense mode) the whole
        buffer under the visibility mask. Equal to the general cached path up to summation order."""
        B, Dh, W = x.shape[0], self.head_dim, self.window
        t = pos[:, 0]                                                                 # [B]
        ring_pos = state.ring_positions(t)                                            # [B, W]
        keys = torch.cat([state.ring[rows], kv], dim=1)                               # [B, W+1, Dh]
        kpos = torch.cat([ring_pos, pos], dim=1)                                      # [B, W+1]
        visible = ((t.unsqueeze(1) - kpos) < W) & (kpos >= 0)                        # [B, W+1]
        if self.compressor is not None:
            self.compressor.decode_step(x, pos, freqs, state.comp, rows)
            entries = state.comp.entries                                              # [Bmax, Cmax, Dh]
            cvis = torch.arange(entries.shape[1], device=x.device) < ((t + 1) // self.ratio).unsqueeze(1)  # [B, Cmax]
            if self.indexer is not None and self.index_mode == "sparse":
                self.indexer.compressor.decode_step(x, pos, freqs, state.index, rows)
                iq, iw = self.indexer.queries(x, qr, cos, sin)
                scores = ops.index_scores(iq, state.index.entries[rows], iw)[:, 0]   # [B, Cmax]
                top = scores.masked_fill(~cvis, float("-inf")).topk(min(self.indexer.topk, scores.shape[1])).indices
                comp, cvis = entries[rows.unsqueeze(1), top], cvis.gather(1, top)     # [B, P, Dh], [B, P]
            else:
                comp = entries[rows]                                                  # [B, Cmax, Dh]
            keys = torch.cat([keys, comp], dim=1)
            visible = torch.cat([visible, cvis], dim=1)
        bias = torch.zeros(visible.shape, dtype=acc_dtype(x.dtype), device=x.device)
        bias = bias.masked_fill(~visible, float("-inf")).unsqueeze(1)                 # [B, 1, T]
        state.ring[rows, t % W] = kv[:, 0].to(state.ring.dtype)
        return ops.sink_attention(q, keys, bias, self.attn_sink, Dh ** -0.5)

    def _attend(self, x, qr, q, kv, pos, cos, sin, freqs, seg, state, rows) -> torch.Tensor:
        """Full-sequence or chunked cached attention; queries in chunks bounded by SCORE_BUDGET."""
        B, S, _ = x.shape
        H, Dh = self.n_heads, self.head_dim
        comp = comp_seg = comp_idx = ikeys = None
        # sparse phase with index loss: the indexer (queries and its own compressor) sees detached inputs,
        # so the KL trains the indexer only
        want_loss = self.indexer is not None and self.index_loss
        detach = want_loss and self.index_mode == "sparse"
        x_idx = x.detach() if detach else x
        if self.compressor is not None:
            if state is None:
                comp, comp_seg, comp_idx = self.compressor.forward_full(x, pos, seg, freqs)
                if self.indexer is not None:
                    ikeys = self.indexer.compressor.forward_full(x_idx, pos, seg, freqs)[0]
            else:
                comp = self.compressor.forward_cached(x, pos, freqs, state.comp, rows)
                if self.indexer is not None:
                    ikeys = self.indexer.compressor.forward_cached(x_idx, pos, freqs, state.index, rows)
                comp_idx = torch.arange(comp.shape[1], device=x.device).expand(B, -1)
                comp_seg = torch.zeros_like(comp_idx)
        iq = iw = None
        if self.indexer is not None and (self.index_mode == "sparse" or want_loss):
            iq, iw = self.indexer.queries(x.detach() if detach else x, qr.detach() if detach else qr, cos, sin)
        kl_sum, kl_count = x.new_zeros((), dtype=acc_dtype(x.dtype)), 0

        if state is not None:  # window keys: the ring (older tokens) then this call's tokens
            ring, ring_pos = state.ring[rows], state.ring_positions(pos[:, 0])        # [B, W, Dh], [B, W]
        if seg is None:
            seg = torch.zeros_like(pos)
        # query chunk: its window keys span chunk + W − 1 tokens, so cap the chunk as well as the keys
        C = 0 if comp is None else comp.shape[1]
        per_query = H * (2 * self.window + C) + (0 if iq is None else iq.shape[2] * C)
        chunk = max(1, min(S, max(self.window, 256), SCORE_BUDGET // per_query))
        outs = []
        for s0 in range(0, S, chunk):
            s1 = min(S, s0 + chunk)
            qpos, qseg = pos[:, s0:s1], seg[:, s0:s1]                                 # [B, Sc]
            lo = max(0, s0 - self.window + 1)
            keys, kpos, kseg = kv[:, lo:s1], pos[:, lo:s1], seg[:, lo:s1]             # [B, Tw, ..]
            if state is not None:
                keys = torch.cat([ring, keys], dim=1)
                kpos = torch.cat([ring_pos, kpos], dim=1)
                kseg = torch.cat([torch.zeros_like(ring_pos), kseg], dim=1)
            dist = qpos.unsqueeze(2) - kpos.unsqueeze(1)                              # [B, Sc, Tw]
            visible = (dist >= 0) & (dist < self.window) & (kpos.unsqueeze(1) >= 0)
            visible &= qseg.unsqueeze(2) == kseg.unsqueeze(1)
            if comp is not None:
                cvis = (comp_seg.unsqueeze(1) == qseg.unsqueeze(2)) & \
                       (comp_idx.unsqueeze(1) < (qpos.unsqueeze(2) + 1) // self.ratio)  # [B, Sc, C]
                if iq is not None and self.index_mode == "sparse":
                    cvis = self.indexer.select(iq[:, s0:s1], iw[:, s0:s1], ikeys, cvis)
                keys = torch.cat([keys, comp], dim=1)
                visible = torch.cat([visible, cvis], dim=2)
            bias = torch.zeros(visible.shape, dtype=acc_dtype(x.dtype), device=x.device)
            bias = bias.masked_fill(~visible, float("-inf"))                          # [B, Sc, T]
            outs.append(ops.sink_attention(q[:, s0:s1], keys, bias, self.attn_sink, Dh ** -0.5))
            if want_loss and C:
                kl, n = self._index_kl(q[:, s0:s1], keys, bias, iq[:, s0:s1], iw[:, s0:s1], ikeys, cvis)
                kl_sum, kl_count = kl_sum + kl, kl_count + n
        o = torch.cat(outs, dim=1)                                                     # [B, S, H, Dh]
        if want_loss:
            self.last_index_loss = kl_sum / max(kl_count, 1)

        if state is not None:  # the last W tokens of this call go to the ring at slot t mod W
            keep = min(S, self.window)
            slot = (pos[:, S - keep:] % self.window).unsqueeze(-1).expand(B, keep, Dh)
            state.ring[rows] = ring.scatter(1, slot, kv[:, S - keep:].to(ring.dtype))
        return o

    def _index_kl(self, q, keys, bias, iq, iw, ikeys, cvis) -> tuple[torch.Tensor, int]:
        """Σ over queries of KL(p ‖ softmax(I)) on the candidate compressed entries `cvis` [B, Sc, C]."""
        C = cvis.shape[-1]
        with torch.no_grad():  # target: the main attention's mass on each compressed entry
            z = torch.einsum("bshd,btd->bsht", up(q), up(keys)) * self.head_dim ** -0.5
            z = z + bias.unsqueeze(2)
            sink = up(self.attn_sink).view(1, 1, -1, 1).expand(*z.shape[:3], 1)
            p = torch.softmax(torch.cat([z, sink], dim=-1), dim=-1)[..., -C - 1:-1].sum(dim=2)  # [B, Sc, C]
            p = p.masked_fill(~cvis, 0)
            p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
        logq = torch.log_softmax(ops.index_scores(iq, ikeys, iw).masked_fill(~cvis, float("-inf")), dim=-1)
        has = cvis.any(-1)                                                            # [B, Sc]
        terms = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-30)) - logq), torch.zeros_like(p))
        return terms.sum(-1)[has].sum(), int(has.sum())
