"""DeepSeek-V4 forward pass: mHC residual streams, MoE, blocks, MTP and the Transformer.

Spec: ARCHITECTURE.md §3 (overall forward), §4 (mHC), §8 (MoE), §9 (MTP), §10.
Module attribute names equal the official checkpoint names (`embed`, `layers.{i}.attn.wq_a`,
`layers.{i}.ffn.gate.bias`, `mtp.0.e_proj`, ...), except that routed experts are stored stacked
(`ffn.experts.w1 [E, I, D]`) and split per expert only in the checkpoint files.

Shape legend: B batch, S query tokens, T key positions, D model dim, H heads, Dh head dim,
Dr rope dim, N hyper-connection streams, E experts, K experts per token, W window, M compression
rate, C compressed entries, P index top-k, G output groups, V vocab.

Numeric policy (as the official code): mHC, routing, SwiGLU and the LM head in fp32; the residual
streams and linear layers in the model dtype (fp32 on CPU, bf16 on GPU).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dsv4 import ops, streams
from dsv4.ops import fp32_region, up
from dsv4.attention import Attention, RMSNorm, linear, linears, pack
from dsv4.config import ModelConfig

# parameters kept in fp32 whatever the model dtype (spec §13.1: F32 tensors of the checkpoint)
FP32_SUFFIXES = ("hc_attn_fn", "hc_attn_base", "hc_attn_scale", "hc_ffn_fn", "hc_ffn_base", "hc_ffn_scale",
                 "hc_head_fn", "hc_head_base", "hc_head_scale", "attn_sink", "ape", "gate.bias")


def keeps_fp32(name: str) -> bool:
    return name.endswith(FP32_SUFFIXES)


# ----------------------------------------------------------------------------- mHC
@fp32_region
def hc_pre(h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, n: int, iters: int,
           eps: float, norm_eps: float, mode: str = "mhc", defer: bool = False):
    """`ops.hc_pre` (the release's mHC: x [B, S, D], post [B, S, N], comb [B, S, N, N]), or one of the
    ablation variants of `ModelConfig.hc_mode` with the same outputs. `defer`: post and comb may come
    back uncomputed, for `ops.hc_post` only (a decode step's kernels: `ops.hc_pre_triton`)."""
    if mode == "mhc":
        return ops.hc_pre(h, fn, scale, base, n, iters, eps, norm_eps, defer=defer)
    return hc_pre_variant(h, fn, scale, base, n, iters, eps, norm_eps, mode)


hc_post = ops.hc_post   # the same mixing for every hc_mode (the residual variant: post = 1, comb = I)
# Block adds the MoE's routed and shared outputs inside hc_post (`ops.hc_post(..., add=)`: the kernels read
# both, no separate add launch; the sum rounded as the separate add rounds it, so the result is the same)
FUSE_SHARED_ADD = True
# Every mHC boundary (attention → FFN in a block; without autograd also FFN → the next block's attention)
# as one `ops.hc_post_pre` call (the kernels: a decode step's hc_post computes the next site's mix in its
# launch, two launches fewer a layer; with autograd, the two separate calls; `dsv4.kernels.mhc.hc_post_pre`).
# Off: measured slower in the V4-Flash-shaped model on an H200 (0.1484 against 0.1430 ms a layer at batch 1,
# 1.501 against 1.486 at 32; `bench/gpu_round17.sh flash`, bench/results/README.md)
FUSE_POST_PRE = False


@fp32_region
def hc_pre_variant(h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, n: int,
                   iters: int, eps: float, norm_eps: float, mode: str):
    """The ablation variants of `ops.hc_pre` (`ModelConfig.hc_mode`; the release is "mhc"): "hc"
    unconstrained hyper-connections, "residual" a plain residual stream. Same outputs as `ops.hc_pre`."""
    if mode == "residual":  # h' = f + h_k: the streams stay equal copies of one plain residual stream
        B, S = h.shape[:2]
        hf = up(h)
        post = hf.new_ones(B, S, n)
        comb = torch.eye(n, dtype=hf.dtype, device=h.device).expand(B, S, n, n)
        return hf.mean(dim=2).to(h.dtype), post, comb
    v = up(h.flatten(2))                                                   # [B, S, N·D]
    rho = torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + norm_eps)              # unweighted RMS over N·D
    mixes = F.linear(v, up(fn)) * rho                                      # [B, S, (2+N)·N]
    # unconstrained: static base + gated tanh of the dynamic part, no projection
    m, s, b = torch.tanh(mixes), up(scale), up(base)
    pre, post, comb = (b[:n] + s[0] * m[..., :n], b[n:2 * n] + s[1] * m[..., n:2 * n],
                       (b[2 * n:] + s[2] * m[..., 2 * n:]).unflatten(-1, (n, n)))
    x = (pre.unsqueeze(-1) * up(h)).sum(dim=2)                             # [B, S, D]
    return x.to(h.dtype), post, comb


hc_head = ops.hc_head      # the head-side reduction of the streams (spec §4.3), a primitive of `dsv4.ops`


# ----------------------------------------------------------------------------- MoE
class Gate(nn.Module):
    """Router (spec §8): sqrt(softplus) affinities in fp32; selection by top-k of affinity + bias
    (aux-loss-free balancing; the bias only selects), or by the token id for hash layers."""

    def __init__(self, cfg: ModelConfig, hashed: bool):
        super().__init__()
        self.topk, self.n_experts = cfg.num_experts_per_tok, cfg.n_routed_experts
        self.score_func, self.norm_topk = cfg.scoring_func, cfg.norm_topk_prob
        self.route_scale, self.hashed = cfg.routed_scaling_factor, hashed
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, cfg.num_experts_per_tok, dtype=torch.long))
        else:
            self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    @fp32_region
    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D], ids [N] -> weights [N, K] fp32, indices [N, K], affinities [N, E] fp32."""
        logits = ops.dense(x, self.weight, fp32=True)                  # [N, E] fp32 (bf16 products exact)
        return ops.route(logits, None if self.hashed else self.bias, ids, self.tid2eid if self.hashed else None,
                         self.topk, self.score_func, self.norm_topk, self.route_scale)


class Experts(nn.Module):
    """Routed experts stored stacked: w1, w3 [E, I, D] (gate, up), w2 [E, D, I] (down).

    `forward(x, idx, weight)` is the one seam for expert dispatch: expert parallelism and quantised
    experts replace this module (or its forward) from outside, with the same signature."""

    def __init__(self, n: int, dim: int, inter: int, limit: float):
        super().__init__()
        self.limit = limit
        self.w1 = nn.Parameter(torch.empty(n, inter, dim))
        self.w2 = nn.Parameter(torch.empty(n, dim, inter))
        self.w3 = nn.Parameter(torch.empty(n, inter, dim))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [N, D], idx [N, K] expert ids, weight [N, K] fp32 routing weights -> [N, D]."""
        return ops.moe_experts(x, idx, weight, self.w1, self.w2, self.w3, self.limit)


class Expert(nn.Module):
    """Shared expert: the same clamped SwiGLU as the routed ones (spec §8.5)."""

    def __init__(self, dim: int, inter: int, limit: float):
        super().__init__()
        self.limit = limit
        self.w1 = nn.Linear(dim, inter, bias=False)
        self.w2 = nn.Linear(inter, dim, bias=False)
        self.w3 = nn.Linear(dim, inter, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = linears(x, [self.w1, self.w3])          # one GEMM in inference once packed
        return linear(ops.swiglu_act(g, u, self.limit, None, x.dtype), self.w2)


class MoE(nn.Module):
    """DeepSeekMoE block (spec §8): routed experts (weight applied before w2, fp32) + shared expert.

    Returns the output and the routing `(indices [B·S, K], affinities [B·S, E])`: the trainer needs
    them for the balance loss, the router-bias update and the load statistics (spec §8.3)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.gate = Gate(cfg, hashed=layer < cfg.num_hash_layers)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.swiglu_limit)
        self.shared_experts = (Expert(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts,
                                      cfg.swiglu_limit) if cfg.n_shared_experts else None)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        y, shared, routing = self.forward_parts(x, ids)
        return (y if shared is None else y + shared), routing

    def forward_parts(self, x: torch.Tensor, ids: torch.Tensor):
        """(routed output [B, S, D], shared expert's output [B, S, D] or None, routing): `forward` before
        the sum of its two outputs (Block adds them in hc_post's kernel)."""
        B, S, D = x.shape
        flat = x.reshape(-1, D)                                                # [B·S, D]

        def routed():
            w, idx, scores = self.gate(flat, ids.reshape(-1))
            return self.experts(flat, idx, w), idx, scores                     # [B·S, D]
        if self.shared_experts is None:
            y, idx, scores = routed()
            return y.view(B, S, D), None, (idx, scores)
        # the shared expert beside the router and the routed experts (a CUDA-graph decode step)
        shared, (y, idx, scores) = streams.concurrently(lambda: self.shared_experts(flat), routed, flat)
        return y.view(B, S, D), shared.view(B, S, D), (idx, scores)


# ----------------------------------------------------------------------------- blocks
class BlockAux(NamedTuple):
    """Training-only outputs of one block, returned by forward rather than kept on the modules (so that
    recomputation under gradient checkpointing and sharded wrappers see plain outputs):
    the router's `indices` [B·S, K] and `affinities` [B·S, E] (fp32), and for a CSA layer computing the
    index loss (spec §15) `index_kl = (Σ over queries of the KL, number of queries)` (two 0-d tensors: the
    count stays on the device), else None."""
    indices: torch.Tensor
    affinities: torch.Tensor
    index_kl: tuple[torch.Tensor, torch.Tensor] | None


class Block(nn.Module):
    """Attention and MoE, each wrapped by an mHC site (spec §3.1). No plain residual add: the
    residual travels through the doubly stochastic `comb` mix."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        D, N = cfg.hidden_size, cfg.hc_mult
        mix = (2 + N) * N
        self.hc = (N, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps)
        self.hc_mode = cfg.hc_mode
        self.attn_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.ffn = MoE(cfg, layer)
        for site in ("attn", "ffn"):
            setattr(self, f"hc_{site}_fn", nn.Parameter(torch.empty(mix, N * D)))
            setattr(self, f"hc_{site}_base", nn.Parameter(torch.empty(mix)))
            setattr(self, f"hc_{site}_scale", nn.Parameter(torch.empty(3)))

    def forward(self, h: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor, seg=None, state=None,
                rows=None, starts=None, carry=None, hold: bool = False) -> tuple[torch.Tensor, BlockAux]:
        """h [B, S, N, D] -> (h' [B, S, N, D], BlockAux).

        `hold` (inference, `model.FUSE_POST_PRE`): the last hc_post is not run; its arguments (f, residual,
        post, comb, add) come back in h's place, for the next block to take as `carry` (h then unused): its
        first mHC site runs that hc_post with its own mix in one launch (`ops.hc_post_pre`)."""
        if carry is not None:
            f, res, p, c, a = carry
            h, (x, post, comb) = ops.hc_post_pre(f, res, p, c, self.hc_attn_fn, self.hc_attn_scale,
                                                 self.hc_attn_base, *self.hc, add=a, defer=True)
        else:
            x, post, comb = hc_pre(h, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base, *self.hc,
                                   self.hc_mode, defer=True)
        x, index_kl = self.attn(self.attn_norm(x), pos, seg, state, rows, starts)
        if FUSE_POST_PRE and self.hc_mode == "mhc":
            h, (x, post, comb) = ops.hc_post_pre(x, h, post, comb, self.hc_ffn_fn, self.hc_ffn_scale,
                                                 self.hc_ffn_base, *self.hc, defer=True)
        else:
            h = ops.hc_post(x, h, post, comb)
            x, post, comb = hc_pre(h, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base, *self.hc, self.hc_mode,
                                   defer=True)
        x, shared, (idx, scores) = self.ffn.forward_parts(self.ffn_norm(x), ids)
        if shared is not None and not FUSE_SHARED_ADD:
            x, shared = x + shared, None
        if hold:
            return (x, h, post, comb, shared), BlockAux(idx, scores, index_kl)
        return ops.hc_post(x, h, post, comb, add=shared), BlockAux(idx, scores, index_kl)


class MTPBlock(Block):
    """Multi-token prediction block (spec §9): at position t it takes the main model's streams h_t
    and the embedding of token t+1 and predicts token t+2. Shares `embed` and `head`."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg, layer)
        D, N = cfg.hidden_size, cfg.hc_mult
        self.e_proj = nn.Linear(D, D, bias=False)
        self.h_proj = nn.Linear(D, D, bias=False)
        self.enorm = RMSNorm(D, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps)
        self.norm = RMSNorm(D, cfg.rms_norm_eps)
        self.hc_head_fn = nn.Parameter(torch.empty(N, N * D))
        self.hc_head_base = nn.Parameter(torch.empty(N))
        self.hc_head_scale = nn.Parameter(torch.empty(1))

    def forward(self, h: torch.Tensor, next_ids: torch.Tensor, embed: nn.Embedding, pos: torch.Tensor,
                seg=None, state=None, rows=None, starts=None) -> tuple[torch.Tensor, BlockAux]:
        """h [B, S, N, D] main streams, next_ids [B, S] (token t+1) -> (final MTP hidden [B, S, D], BlockAux)."""
        e = self.enorm(embed(next_ids))                                        # [B, S, D]
        z = linear(e, self.e_proj).unsqueeze(2) + linear(self.hnorm(h), self.h_proj)  # [B, S, N, D]
        z, aux = super().forward(z, next_ids, pos, seg, state, rows, starts)
        N, _, eps, norm_eps = self.hc
        return self.norm(hc_head(z, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, eps, norm_eps)), aux


class Transformer(nn.Module):
    """The DeepSeek-V4 language model.

    `model(input_ids [B, S])` returns logits [B, S, V] (fp32). With `cache=` (a `dsv4.cache.DecodeCache`)
    the call continues each selected cache row from its current length (prefill in chunks, then
    decode). `segment_ids` [B, S] marks packed documents: attention and compression never cross a
    document boundary and positions restart at each document. `return_aux=True` also returns the
    training-only outputs: a list of `BlockAux`, one per block in order.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        D, N = cfg.hidden_size, cfg.hc_mult
        self.embed = nn.Embedding(cfg.vocab_size, D)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(D, cfg.rms_norm_eps)
        self.head = nn.Linear(D, cfg.vocab_size, bias=False)
        self.hc_head_fn = nn.Parameter(torch.empty(N, N * D))
        self.hc_head_base = nn.Parameter(torch.empty(N))
        self.hc_head_scale = nn.Parameter(torch.empty(1))
        self.mtp = nn.ModuleList(MTPBlock(cfg, cfg.num_hidden_layers + k)
                                 for k in range(cfg.num_nextn_predict_layers))
        self.gradient_checkpointing = False  # recompute each block in backward (training memory)
        self.ids_prechecked = False          # the caller checked the token ids on the host (CUDA-graph training)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None) -> None:
        """Training-from-scratch init: N(0, std) matrices (output projections / sqrt(2L)), unit norms,
        mHC near identity (pre = 1/N, post = 1, comb ≈ I, small gating scales), zero sinks/ape/bias,
        random distinct experts per token id for hash layers."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        cfg, N = self.config, self.config.hc_mult
        out_std = std / math.sqrt(2 * max(cfg.num_hidden_layers, 1))
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("_scale",)):
                p.fill_(0.01)
            elif name.endswith(("hc_attn_base", "hc_ffn_base")) and cfg.hc_mode == "hc":
                p.copy_(torch.cat([torch.full((N,), 1 / N), torch.ones(N), torch.eye(N).flatten()]))  # same start
            elif name.endswith(("hc_attn_base", "hc_ffn_base")):
                comb = torch.full((N, N), -4.0)
                comb.fill_diagonal_(0.0)
                p.copy_(torch.cat([torch.full((N,), math.log(1 / (N - 1))) if N > 1 else torch.zeros(N),
                                   torch.zeros(N), comb.flatten()]))
            elif name.endswith("hc_head_base"):
                p.fill_(math.log(1 / (N - 1)) if N > 1 else 0.0)
            elif name.endswith(("attn_sink", "ape")):
                p.zero_()
            else:
                s = out_std if name.endswith(("wo_b.weight", "w2", "w2.weight")) else std
                p.copy_(torch.randn(p.shape, generator=gen) * s)
        for name, b in self.named_buffers():
            if name.endswith("tid2eid"):
                V, K = b.shape
                b.copy_(torch.rand(V, cfg.n_routed_experts, generator=gen).argsort(dim=-1)[:, :K])
            elif name.endswith("gate.bias"):
                b.zero_()

    def to_dtype(self, dtype: torch.dtype) -> "Transformer":
        """Cast floating-point parameters to `dtype`, keeping the official fp32 ones (mHC, sinks, ape,
        router bias) in fp32."""
        for name, p in self.named_parameters():
            if p.is_floating_point():
                p.data = p.data.to(torch.float32 if keeps_fp32(name) and dtype != torch.float64 else dtype)
        for name, b in self.named_buffers():
            if b.is_floating_point() and dtype == torch.float64:
                b.data = b.data.to(dtype)
        return self

    def pack_projections(self) -> int:
        """For inference: put the weights of projections that share an input back to back in one buffer
        per group (`Attention.projection_groups`, the shared expert's w1 and w3), so that a no-gradient
        forward runs each group as one GEMM (`attention.linears`): 16 fewer launches per decode step of
        the bench model. Parameters, names and the state dict are unchanged; moving the model (`.to`)
        unpacks it (the GEMMs then run one by one). FP8-resident layers of a group are packed among
        themselves (one FP8 GEMM: wq_a with wkv, wq_b with the indexer's, the shared expert's w1 with
        w3); sharded layers are left as they are. Returns the number of groups packed."""
        n = 0
        for m in self.modules():
            if isinstance(m, Attention):
                n += sum(pack(layers) for layers, _ in m.projection_groups())
            elif isinstance(m, Expert):
                n += pack([m.w1, m.w3])
        return n

    # ------------------------------------------------------------------ forward
    def check_ids(self, input_ids: torch.Tensor, read: bool = True) -> bool:
        """Type and shape of input_ids, then (with `read`) their range, read from the device. -> whether
        the range is still to be checked: False once checked here, or where reading is not done (the
        caller checked on the host, `ids_prechecked`; inside a CUDA-graph capture or a compiled graph).
        A cached call passes read=False and has `DecodeCache.check_rows` read the range with the rows."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError("input_ids must be an integer tensor [B, S] (torch.long)")
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ValueError(f"input_ids must be a non-empty [B, S] tensor; got shape {tuple(input_ids.shape)}")
        if self.ids_prechecked or (input_ids.is_cuda and (torch.cuda.is_current_stream_capturing()
                                                         or torch.compiler.is_compiling())):
            return False   # reading the values needs the host: not inside a capture or a compiled graph
        if not read:
            return True
        lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()     # one read from the device, not two
        self.config.check_id_range(lo, hi)
        return False

    def hidden(self, input_ids: torch.Tensor, *, cache=None, rows: torch.Tensor | None = None,
               positions: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
               aux: list[BlockAux] | None = None):
        """Run the blocks; returns (streams [B, S, N, D] after the last block, positions, rows).
        With a list `aux`, each block's `BlockAux` is appended to it."""
        unread = self.check_ids(input_ids, read=cache is None)
        B, S = input_ids.shape
        dev = input_ids.device
        starts = None                     # the cache rows' first positions, read on the host by check_rows
        if cache is not None:
            if positions is not None or segment_ids is not None:
                raise ValueError("positions/segment_ids cannot be combined with a cache: cached calls continue "
                                 "each row from cache.lengths; pack documents only in full-sequence calls")
            rows, starts = cache.check_rows(rows, B, S, ids=input_ids if unread else None)
            positions = cache.lengths[rows].unsqueeze(1) + torch.arange(S, device=dev)   # [B, S]
        elif segment_ids is not None:
            if segment_ids.shape != input_ids.shape:
                raise ValueError(f"segment_ids must have the shape of input_ids {tuple(input_ids.shape)}")
            if positions is None:
                positions = positions_from_segments(segment_ids)
        elif positions is None:
            positions = torch.arange(S, device=dev).expand(B, S)
        return self.blocks(input_ids, positions, segment_ids, cache, rows, aux, starts), positions, rows

    def blocks(self, input_ids: torch.Tensor, positions: torch.Tensor, segment_ids=None, cache=None,
               rows=None, aux: list[BlockAux] | None = None, starts: tuple[int, ...] | None = None) -> torch.Tensor:
        """Embedding and blocks on already validated inputs. -> streams [B, S, N, D]; each block's
        `BlockAux` is appended to `aux` when a list is given (and dropped otherwise). starts: the cache
        rows' first positions when the host knows them (`DecodeCache.check_rows`), else None."""
        h = self.embed(input_ids)                                              # [B, S, D]
        h = h.unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1).contiguous()  # [B, S, N, D]
        # inference with FUSE_POST_PRE: each block's last hc_post runs in the next block's first launch
        hold = FUSE_POST_PRE and not torch.is_grad_enabled() and self.config.hc_mode == "mhc"
        carry = None
        for i, layer in enumerate(self.layers):
            state = cache.layers[i] if cache is not None else None
            if self.gradient_checkpointing and self.training and cache is None:
                h, block_aux = checkpoint(layer, h, input_ids, positions, segment_ids, use_reentrant=False)
            elif hold:
                carry, block_aux = layer(h, input_ids, positions, segment_ids, state, rows, starts, carry=carry,
                                         hold=True)
            else:
                h, block_aux = layer(h, input_ids, positions, segment_ids, state, rows, starts)
            if aux is not None:
                aux.append(block_aux)
        if carry is not None:
            f, res, p, c, a = carry
            h = ops.hc_post(f, res, p, c, add=a)
        return h

    @torch.no_grad()
    def decode_step(self, input_ids: torch.Tensor, cache, rows: torch.Tensor) -> torch.Tensor:
        """One token per row (input_ids [B, 1]) continuing cache rows `rows` [B] -> logits [B, V].

        The decode step without input validation and without any host synchronisation, so that
        `dsv4.graphs.DecodeGraphs` can capture it in a CUDA graph. The caller guarantees what
        `forward(..., cache=)` checks: distinct rows inside the cache, room for one more token in
        each, ids inside the vocabulary."""
        positions = cache.lengths[rows].unsqueeze(1)                           # [B, 1]
        h = self.blocks(input_ids, positions, None, cache, rows)
        cache.advance(rows, 1)
        return self.logits(self.final_hidden(h))[:, 0]

    @fp32_region
    def logits(self, y: torch.Tensor) -> torch.Tensor:
        """LM head in fp32 on the final normalised hidden state."""
        return ops.linear_fp32(y, self.head.weight)

    def final_hidden(self, h: torch.Tensor) -> torch.Tensor:
        eps, norm_eps = self.config.hc_eps, self.config.rms_norm_eps
        return self.norm(hc_head(h, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, eps, norm_eps))

    def forward(self, input_ids: torch.Tensor, *, cache=None, rows: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                last_only: bool = False, return_hidden: bool = False, return_aux: bool = False):
        """-> logits, or the tuple (logits, streams [B, S, N, D] if return_hidden, [BlockAux] if return_aux)."""
        aux: list[BlockAux] | None = [] if return_aux else None
        h, positions, rows = self.hidden(input_ids, cache=cache, rows=rows, positions=positions,
                                         segment_ids=segment_ids, aux=aux)
        if cache is not None:
            cache.advance(rows, input_ids.shape[1])
        y = self.final_hidden(h[:, -1:] if last_only else h)
        out = self.logits(y)
        if last_only:
            out = out[:, 0]
        if not (return_hidden or return_aux):
            return out
        return (out,) + ((h,) if return_hidden else ()) + ((aux,) if return_aux else ())

    def mtp_logits(self, h: torch.Tensor, next_ids: torch.Tensor, *, k: int = 0, cache=None,
                   rows: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                   segment_ids: torch.Tensor | None = None, return_aux: bool = False):
        """MTP block k on main streams h [B, S, N, D] and the ids of the *next* tokens [B, S].

        Position t's logits predict token t+2. With a cache, uses the block's own window state.
        `return_aux=True` returns (logits, [BlockAux] of the block).
        """
        if not len(self.mtp):
            raise ValueError("this model has no MTP block (num_nextn_predict_layers = 0)")
        unread = self.check_ids(next_ids, read=cache is None)
        B, S = next_ids.shape
        if cache is not None:
            rows, starts = cache.check_rows(rows, B, S, mtp=True, ids=next_ids if unread else None)
            positions = cache.mtp_lengths[rows].unsqueeze(1) + torch.arange(S, device=next_ids.device)
            state = cache.layers[self.config.num_hidden_layers + k]
        else:
            state = starts = None
            if positions is None:
                positions = (positions_from_segments(segment_ids) if segment_ids is not None
                             else torch.arange(S, device=next_ids.device).expand(B, S))
        y, block_aux = self.mtp[k](h, next_ids, self.embed, positions, segment_ids, state, rows, starts)
        if cache is not None:
            cache.advance_mtp(rows, S)
        return (self.logits(y), [block_aux]) if return_aux else self.logits(y)


def positions_from_segments(seg: torch.Tensor) -> torch.Tensor:
    """Position of each token within its document (restarting at 0 at each new segment id)."""
    B, S = seg.shape
    idx = torch.arange(S, device=seg.device).expand(B, S)
    start = torch.ones_like(seg, dtype=torch.bool)
    start[:, 1:] = seg[:, 1:] != seg[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first
