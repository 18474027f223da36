"""Triton kernels against their PyTorch twins (`dsv4.ops`) and float64, and the backend table.

Without a GPU the kernels run under Triton's interpreter at tiny sizes (conftest sets
TRITON_INTERPRET=1), with fp32 dots (the interpreter's bf16 `tl.dot` is wrong); on a GPU the same tests
also run in bf16. Inputs are fresh random values; outputs are poisoned first where the kernel writes
into a given buffer.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from dsv4 import ops

triton = pytest.importorskip("triton")
from dsv4.kernels import compressor, indexer, key_lists as kl, mhc, sparse_attention as sa   # noqa: E402
from dsv4.kernels.fp8_gemm import fp32_to_e4m3   # noqa: E402
import triton.language as tl   # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if DEV == "cuda" else [])


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def tol(dtype):
    return 2e-5 if dtype == torch.float32 else 2e-2


def attention_case(B=2, S=5, H=4, D=64, T=50, B2=3, T2=30, K=45, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, H, D, generator=g)
    kv = torch.randn(B, T, D, generator=g)
    kv2 = torch.randn(B2, T2, D, generator=g)
    rows2 = torch.randperm(B2, generator=g)[:B]
    # distinct keys per query from both sources, then −1 padding at random places; one query has none
    idx = torch.stack([torch.randperm(T + T2, generator=g)[:K] for _ in range(B * S)]).view(B, S, K)
    idx = torch.where(torch.rand(B, S, K, generator=g) < 0.25, -1, idx)
    idx[0, 1] = -1
    sink = torch.randn(H, generator=g)
    cast = lambda t: t.to(DEV, dtype)
    return (cast(q), cast(kv), idx.to(DEV, torch.int32), sink.to(DEV), D ** -0.5, cast(kv2), rows2.to(DEV))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", [False, True])
def test_sparse_attention_forward_equals_twin_and_float64(dtype, split):
    q, kv, idx, sink, scale, kv2, rows2 = attention_case(dtype=dtype)
    run = sa.forward_split if split else sa.forward
    out, lse = run(q, kv, idx, sink, scale, kv2, rows2)
    want, want_lse = ops.sparse_attention_torch(q.double(), kv.double(), idx, sink.double(), scale, kv2.double(),
                                                rows2, return_lse=True)
    assert rel(out, want) < tol(dtype) and rel(lse, want_lse) < tol(dtype)
    assert out[0, 1].abs().max() == 0                       # a query with no key gives 0
    twin = ops.sparse_attention_torch(q, kv, idx, sink, scale, kv2, rows2)
    assert rel(out, twin) < tol(dtype)


@pytest.mark.parametrize("block_h,splits,block_n,merge", [(16, 5, 16, (2, 32)), (8, 3, 16, (4, 16)),
                                                            (16, 9, 16, (16, 64)), (16, 9, 16, (4, 64, 1))])
def test_split_attention_launch_shapes_equal_float64(block_h, splits, block_n, merge):
    # the split decode attention with several splits (some empty: a split past the list's end, or whose
    # keys are all −1) merged over head and column blocks, against float64; a query with no key gives 0
    q, kv, idx, sink, scale, kv2, rows2 = attention_case(H=12, K=70, T=60, T2=40, seed=11)
    idx[1, 2, 16:48] = -1
    out, lse = sa.forward_split(q, kv, idx, sink, scale, kv2, rows2, splits=splits, block_n=block_n,
                                block_h=block_h, merge=merge)
    want, want_lse = ops.sparse_attention_torch(q.double(), kv.double(), idx, sink.double(), scale, kv2.double(),
                                                rows2, return_lse=True)
    assert rel(out, want) < 2e-5 and rel(lse, want_lse) < 2e-5
    assert out[0, 1].abs().max() == 0
    with pytest.raises(ValueError, match="powers of two"):
        sa.forward_split(q, kv, idx, sink, scale, kv2, rows2, merge=(4, 48))


def test_sparse_attention_one_source_and_row_mapping():
    q, kv, idx, sink, scale, kv2, rows2 = attention_case(T=40, K=30, seed=1)
    idx = torch.where(idx >= 40, -1, idx)                     # only the first source
    out, _ = sa.forward(q, kv, idx, sink, scale)
    assert rel(out, ops.sparse_attention_torch(q.double(), kv.double(), idx, sink.double(), scale)) < 2e-5
    # the second source read in place at another row: equal to gathering that row first
    full, _ = sa.forward(q, kv, idx.clamp(max=-1) + 0 * idx, sink, scale, kv2, rows2)   # all −1: zeros
    assert full.abs().max() == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_attention_backward_equals_float64_autograd(dtype):
    q, kv, idx, sink, scale, kv2, rows2 = attention_case(S=4, K=40, seed=2, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    dout = torch.randn(q.shape, generator=g).to(DEV, dtype)
    dlse = torch.randn(q.shape[:3], generator=g).to(DEV)
    leaves = [t.double().requires_grad_() for t in (q, kv, sink, kv2)]
    o, l = ops.sparse_attention_torch(leaves[0], leaves[1], idx, leaves[2], scale, leaves[3], rows2, return_lse=True)
    want = torch.autograd.grad((o * dout.double()).sum() + (l * dlse.double()).sum(), leaves, retain_graph=True)
    out, lse = sa.forward(q, kv, idx, sink, scale, kv2, rows2)
    got = sa.backward(q, kv, idx, sink, scale, out, lse, dout, kv2, rows2, dlse)
    dq, dkv, dkv2, dsink = got
    for name, a, b in zip(("dq", "dkv", "dsink", "dkv2"), (dq, dkv, dsink, dkv2), want):
        assert rel(a, b) < (2e-5 if dtype == torch.float32 else 3e-2), name
    # without an lse gradient
    want = torch.autograd.grad((o * dout.double()).sum(), leaves)
    dq, dkv, dkv2, dsink = sa.backward(q, kv, idx, sink, scale, out, lse, dout, kv2, rows2)
    for name, a, b in zip(("dq", "dkv", "dsink", "dkv2"), (dq, dkv, dsink, dkv2), want):
        assert rel(a, b) < (2e-5 if dtype == torch.float32 else 3e-2), name


def test_sparse_attention_through_the_table_with_autograd():
    # the registered Triton entry point: autograd.Function, gradients equal the twin's
    q, kv, idx, sink, scale, kv2, rows2 = attention_case(S=3, K=20, seed=4)
    leaves = [t.clone().requires_grad_() for t in (q, kv, sink, kv2)]
    out, lse = ops.sparse_attention_triton(*leaves[:2], idx, leaves[2], scale, leaves[3], rows2, return_lse=True)
    (out.square().sum() + lse.sum()).backward()
    ref = [t.clone().requires_grad_() for t in (q, kv, sink, kv2)]
    o2, l2 = ops.sparse_attention_torch(*ref[:2], idx, ref[2], scale, ref[3], rows2, return_lse=True)
    (o2.square().sum() + l2.sum()).backward()
    for a, b in zip(leaves, ref):
        assert rel(a.grad, b.grad) < 2e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_index_topk_equals_twin(dtype):
    g = torch.Generator().manual_seed(5)
    B, S, Hi, Di, C, B2 = 2, 9, 3, 32, 70, 3
    q = torch.randn(B, S, Hi, Di, generator=g).to(DEV, dtype)
    k = torch.randn(B2, C, Di, generator=g).to(DEV, dtype)
    w = torch.randn(B, S, Hi, generator=g).to(DEV)
    rows = torch.tensor([2, 0], device=DEV)
    lo = torch.randint(0, 10, (B, S), generator=g).to(DEV)
    hi = (lo + torch.randint(0, 60, (B, S), generator=g).to(DEV)).clamp(max=C)
    want = ops.index_scores(q.double(), k.double(), w.double(), rows)
    s = torch.arange(C, device=DEV)
    vis = (s >= lo.unsqueeze(-1)) & (s < hi.unsqueeze(-1))
    for few in (False, True):       # blocks of queries with a dot per head; a query's heads as one dot
        got = indexer.scores(q, k, w, lo, hi, rows, few=few)
        assert torch.equal(torch.isinf(got), ~vis)
        assert got.dtype == (torch.float32 if dtype == torch.float32 else torch.bfloat16)
        assert rel(got[vis], want[vis]) < tol(dtype)
    for P in (16, 100):
        a = indexer.topk(q, k, w, lo, hi, P, rows)
        b = ops.index_topk_torch(q.double(), k.double(), w.double(), lo, hi, P, rows)
        assert a.shape == b.shape == (B, S, min(P, C))
        if dtype == torch.float32:    # bf16 rounding may reorder near-ties
            assert torch.equal(a.sort(-1).values, b.sort(-1).values)
        assert torch.equal((a >= 0).sum(-1), (hi - lo).clamp(max=P).to(torch.int64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_index_topk_decode_equals_float64(dtype):
    # a decode step's top-k: the visible range [0, min((p + 1) // 4, C)) and the head weights' factor
    # applied in the kernels (positions below, at and past the C entries' reach, rows out of order);
    # float64 scores from the spec's formula (Σ_h w_h·scale·ReLU(q_h · k)) and their own top-k
    g = torch.Generator().manual_seed(8)
    B, Hi, Di, C, B2, ratio, scale = 4, 3, 32, 50, 5, 4, 0.37
    q = torch.randn(B, 1, Hi, Di, generator=g).to(DEV, dtype)
    k = torch.randn(B2, C, Di, generator=g).to(DEV, dtype)
    w = torch.randn(B, 1, Hi, generator=g).to(DEV, dtype)
    rows = torch.tensor([3, 0, 4, 1], device=DEV)
    pos = torch.tensor([[2], [37], [150], [199]], device=DEV)          # 0, 9, 37 (38 > C) and 50 entries
    s64 = torch.einsum("bhd,bcd->bhc", q[:, 0].double(), k[rows].double()).clamp(min=0)
    s64 = (s64 * (w[:, 0].double() * scale).unsqueeze(-1)).sum(1)                          # [B, C]
    hi = ((pos[:, 0] + 1) // ratio).clamp(max=C)
    vis = torch.arange(C, device=DEV) < hi.unsqueeze(-1)
    sc = indexer.scores(q, k, w, pos, None, rows, few=True, w_scale=scale, ratio=ratio)[:, 0]   # (the scale
    assert torch.equal(torch.isinf(sc), ~vis) and rel(sc[vis], s64[vis]) < tol(dtype)          # leaves the order)
    for P in (8, 64):
        got = ops.index_topk_decode_triton(q, k, w, scale, pos, ratio, P, rows)[:, 0]
        twin = ops.index_topk_decode_torch(q, k, w, scale, pos, ratio, P, rows)[:, 0]
        assert got.shape == twin.shape == (B, min(P, C)) and got.dtype == torch.int32
        for b in range(B):
            n = int(min(P, hi[b]))
            best = s64[b, :int(hi[b])].topk(n)
            chosen = got[b][got[b] >= 0].long()
            assert len(chosen) == n and (twin[b] >= 0).sum() == n and (chosen < hi[b]).all(), (P, b)
            if dtype == torch.float32:
                assert set(chosen.tolist()) == set(best.indices.tolist()) == set(twin[b][twin[b] >= 0].tolist())
            else:                     # bf16 scores may order near-ties differently: the choice is near-optimal
                assert s64[b, chosen].sum() >= best.values.sum() - 1e-2 * best.values.abs().sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])   # no dots: bf16 runs in the interpreter
@pytest.mark.parametrize("ranged", [False, True])
def test_radix_select_equals_torch_topk(dtype, ranged):
    g = torch.Generator().manual_seed(11)
    R, C, P = 7, 600, 40
    sc = torch.randn(R, C, generator=g) * 3
    sc[1, 25:] = float("-inf")                      # fewer than P finite scores
    sc[2] = sc[2].round()                           # many ties at the threshold
    sc[3] = -sc[3].abs()                            # all negative
    sc[4, ::3] = 100.0                              # 200 equal maxima: P of them, the lowest indices
    sc = sc.to(dtype)
    lo = torch.randint(0, 200, (R,), generator=g) if ranged else torch.zeros(R, dtype=torch.int64)
    hi = (lo + torch.randint(0, 400, (R,), generator=g)).clamp(max=C) if ranged else torch.full((R,), C)
    lo[[0, 4]], hi[[0, 4]] = 0, C                   # full rows either way
    got = indexer.select(sc.to(DEV), P, lo.to(DEV), hi.to(DEV) if ranged else None) if ranged else \
        indexer.select(sc.to(DEV), P)
    got = got.cpu()
    assert got.shape == (R, P) and got.dtype == torch.int32
    s = torch.arange(C)
    for r in range(R):
        vis = (s >= lo[r]) & (s < hi[r])
        want = sc[r].float().masked_fill(~vis, float("-inf")).topk(P)
        want_vals = want.values[want.values > float("-inf")]
        n = len(want_vals)
        row = got[r]
        assert (row[n:] == -1).all() and (row[:n] >= 0).all()           # the entries first, then −1
        assert (row[:n].diff() > 0).all()                                  # distinct, in index order
        assert vis[row[:n].long()].all()
        assert torch.equal(sc[r, row[:n].long()].float().sort().values, want_vals.sort().values)
        if n:   # ties at the threshold: the lowest indices among them
            t = want_vals.min()
            tied = torch.nonzero(vis & (sc[r].float() == t)).flatten()
            taken = row[:n][sc[r, row[:n].long()].float() == t].long()
            assert torch.equal(taken, tied[:len(taken)])
    assert torch.equal(got[4], torch.arange(0, 3 * P, 3, dtype=torch.int32))


def test_index_topk_long_rows_go_to_torch_topk(monkeypatch):
    g = torch.Generator().manual_seed(12)
    q, k, w = torch.randn(1, 3, 2, 16, generator=g), torch.randn(1, 90, 16, generator=g), torch.randn(1, 3, 2, generator=g)
    lo, hi = torch.zeros(1, 3, dtype=torch.int64), torch.tensor([[90, 50, 7]])
    args = [t.to(DEV) for t in (q, k, w, lo, hi)]
    kernel = indexer.topk(*args, 20)
    monkeypatch.setattr(indexer, "SELECT_MAX_ENTRIES", 64)             # 90 entries: torch.topk
    assert not indexer.use_select(3, 90) and indexer.use_select(3, 64)
    fallback = indexer.topk(*args, 20)
    sc = indexer.scores(*args[:5])                 # ReLU zeros tie: compare the chosen scores
    chosen = lambda idx: torch.where(idx >= 0, sc.gather(-1, idx.clamp(min=0).long()), -1e30).sort(-1).values
    assert torch.equal(chosen(kernel), chosen(fallback))
    assert torch.equal((kernel >= 0).sum(-1).cpu(), torch.tensor([[20, 20, 7]]))


@pytest.mark.parametrize("overlap", [True, False])
def test_compressor_pooling_equals_twin(overlap):
    g = torch.Generator().manual_seed(6)
    B, L, c, m, n = 2, 23, 24, 4, 6
    w = 2 * c if overlap else c
    J = 2 * m if overlap else m
    kv = torch.randn(B, L, w, generator=g, dtype=torch.float64)
    score = torch.randn(B, L, w, generator=g, dtype=torch.float64)
    slots = torch.randint(0, L, (B, n, J), generator=g)
    slots = torch.where(torch.rand(B, n, J, generator=g) < 0.3, -1, slots)
    slots[1, 2] = -1                                            # an entry with no slot: 0
    got = compressor.pool(kv.float().to(DEV), score.float().to(DEV), slots.to(DEV), overlap)
    want = ops.compress_windows_torch(kv, score, slots, overlap)
    assert rel(got, want) < 2e-6 and got[1, 2].abs().max() == 0


@pytest.mark.parametrize("overlap", [True, False])
def test_compressor_pooling_gradient_equals_float64(overlap):
    # random slots (places shared between entries, empty slots, an empty entry) against float64 autograd
    # of the twin; then the full-sequence layout (every place used once): two runs give the same bits
    g = torch.Generator().manual_seed(16)
    B, L, c, m, n = 2, 23, 24, 4, 6
    w, J = (2 * c, 2 * m) if overlap else (c, m)
    kv = torch.randn(B, L, w, generator=g, dtype=torch.float64)
    score = torch.randn(B, L, w, generator=g, dtype=torch.float64)
    grad = torch.randn(B, n, c, generator=g, dtype=torch.float64)
    slots = torch.randint(0, L, (B, n, J), generator=g)
    slots = torch.where(torch.rand(B, n, J, generator=g) < 0.3, -1, slots)
    slots[1, 2] = -1
    a, b = kv.clone().requires_grad_(), score.clone().requires_grad_()
    ops.compress_windows_torch(a, b, slots, overlap).backward(grad)
    dkv, dsc = compressor.pool_backward(kv.float().to(DEV), score.float().to(DEV), slots.to(DEV),
                                        grad.float().to(DEV), overlap)
    assert rel(dkv, a.grad) < 2e-6 and rel(dsc, b.grad) < 2e-6
    own = torch.arange(1, L // m) * m                              # windows as `Compressor.entries` lists them
    k = torch.arange(m)
    full = torch.cat([own[:, None] - m + k, own[:, None] + k], 1) if overlap else own[:, None] + k
    full = full.expand(B, -1, -1)
    runs = [compressor.pool_backward(kv.float().to(DEV), score.float().to(DEV), full.to(DEV),
                                     grad[:, :len(own)].float().to(DEV), overlap) for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(*runs))
    a, b = kv.clone().requires_grad_(), score.clone().requires_grad_()
    ops.compress_windows_torch(a, b, full, overlap).backward(grad[:, :len(own)])
    assert rel(runs[0][0], a.grad) < 2e-6 and rel(runs[0][1], b.grad) < 2e-6


def test_sinkhorn_equals_twin():
    g = torch.Generator().manual_seed(7)
    n = 4
    mixes = torch.randn(37, (2 + n) * n, generator=g, dtype=torch.float64)
    scale = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    base = torch.randn((2 + n) * n, generator=g, dtype=torch.float64)
    got = mhc.split_sinkhorn(mixes.float().to(DEV), scale.float().to(DEV), base.float().to(DEV), n, 20, 1e-6)
    want = ops.hc_split_sinkhorn_torch(mixes, scale, base, n, 20, 1e-6)
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-6
    # gradients through the table's entry point (the backward kernel) against float64 autograd, with all
    # outputs used and with comb alone (the other output gradients None)
    w = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in want]
    for used in ((0, 1, 2), (2,)):
        leaves = [t.float().to(DEV).requires_grad_() for t in (mixes, scale, base)]
        outs = ops.hc_split_sinkhorn_triton(*leaves, n, 20, 1e-6)
        sum((outs[i] * w[i].float().to(DEV)).sum() for i in used).backward()
        ref = [t.clone().requires_grad_() for t in (mixes, scale, base)]
        outs = ops.hc_split_sinkhorn_torch(*ref, n, 20, 1e-6)
        sum((outs[i] * w[i]).sum() for i in used).backward()
        for a, b in zip(leaves, ref):
            assert rel(a.grad, b.grad) < 1e-5


def test_backend_table_override_and_description(monkeypatch):
    try:
        ops.set_backend("sparse_attention=torch,moe_experts=loop")
        assert ops.sparse_attention.choose("cuda", torch.bfloat16) == "torch"
        assert ops.moe_experts.choose("cpu", torch.float32) == "loop"
        ops.set_backend("triton")
        assert ops.index_topk.choose("cpu", torch.float32) == "triton"
        assert ops.index_topk.choose("cpu", torch.float64) == "torch"      # kernels take no float64
        with pytest.raises(ValueError, match="unknown primitive"):
            ops.set_backend("sparse_attn=torch")
        with pytest.raises(ValueError, match="no implementation"):
            ops.set_backend({"moe_experts": "cutlass"})
        ops.set_backend(None)
        # the compressor's state is fp32 in a bf16 model: the logs report what that state runs on
        assert ops.backend_choices("cuda")["compressor_step"] == "triton"
        assert ops.backend_choices("cpu", torch.float64)["compressor_step"] == "torch"
        monkeypatch.setenv("DSV4_OPS", "index_topk=torch")
        ops.set_backend(None)
        assert ops.index_topk.choose("cuda", torch.bfloat16) == "torch"
        text = ops.describe_backends()
        assert "sparse_attention" in text and "DSV4_OPS=index_topk=torch" in text
    finally:
        monkeypatch.delenv("DSV4_OPS", raising=False)
        ops.set_backend(None)


@torch.no_grad()
def test_model_with_the_kernels_equals_the_twins(monkeypatch):
    # the whole forward (full sequence, chunked cache prefill and decode steps) of a model with every
    # layer type, through the Triton entry points, against the twins; the decode steps also with mHC's
    # post and comb deferred to hc_post's kernel and the FFN site's mix in the attention site's hc_post
    from tests.conftest import random_model
    from dsv4 import model as model_module
    from dsv4.cache import DecodeCache

    model = random_model("tiny", seed=3).to(DEV)
    ids = torch.randint(0, model.config.vocab_size, (2, 140), generator=torch.Generator().manual_seed(0)).to(DEV)
    try:
        ops.set_backend("torch")
        want = model(ids)
        ops.set_backend("triton")
        got = model(ids)
        cache = DecodeCache(model.config, 2, 160, device=DEV)
        steps = [model(ids[:, :130], cache=cache)]
        snap = copy.deepcopy(cache)                       # the same prefilled state for the deferred steps
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(130, 140)]
        monkeypatch.setattr(ops, "HC_DEFER_TOKENS", 15)
        monkeypatch.setattr(model_module, "FUSE_POST_PRE", True)      # (and the attention → FFN boundary fused)
        with torch.no_grad():                             # (inference forms: with parameters needing grad,
            deferred = [model(ids[:, t:t + 1], cache=snap) for t in range(130, 133)]   # autograd ones)
    finally:
        ops.set_backend(None)
    assert rel(got, want) < 1e-5
    assert rel(torch.cat(steps, 1), want) < 1e-5
    assert rel(torch.cat(deferred, 1), want[:, 130:133]) < 1e-5


def test_training_step_with_the_kernels_equals_the_twins():
    # loss and every parameter's gradient of a model with every layer type (MTP and the index loss on),
    # through the Triton entry points with autograd, against the twins (and float64 where fp32 is not
    # enough to compare two implementations: below)
    from tests.conftest import random_model

    ids = None
    results = []
    try:
        for backend, dtype in (("torch", torch.float32), ("triton", torch.float32), ("torch", torch.float64)):
            model = random_model("tiny", seed=4).to(DEV, dtype)
            for m in model.modules():
                if hasattr(m, "index_loss"):
                    m.index_loss = True                   # the sparse phase: top-k attention + index KL
            if ids is None:
                ids = torch.randint(0, model.config.vocab_size, (2, 40)).to(DEV)
            ops.set_backend(backend)
            logits, h, aux = model(ids, return_hidden=True, return_aux=True)
            mtp_logits = model.mtp_logits(h[:, :-1], ids[:, 1:])
            kls = [a.index_kl[0] for a in aux if a.index_kl is not None]
            loss = (torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).to(dtype), ids[:, 1:].flatten())
                    + torch.nn.functional.cross_entropy(mtp_logits[:, :-1].flatten(0, 1).to(dtype),
                                                        ids[:, 2:].flatten())
                    + 0.1 * torch.stack(kls).sum())
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                            if p.grad is not None}))
    finally:
        ops.set_backend(None)
    (l0, g0), (l1, g1), (_, g64) = results
    assert len(g0) > 20
    assert rel(l1, l0) < 1e-6
    # the mHC scales' gradients (3 values a site) sum every token's contribution with cancellation: fp32
    # in any order is off by up to ~1e-4 there (the twin against float64: 1.2e-4 at some ids on a CPU,
    # the kernels 4.2e-5, bench/grad_precision.py; the kernels against the twin 5.3e-5 on an H200), so
    # those are held against float64 to a bound the fp32 twin itself meets, everything else against the twin
    ill = ("hc_attn_scale", "hc_ffn_scale", "hc_head_scale")
    for name in g0.keys() | g1.keys():   # a compressor with no entry yet: no gradient, or a zero one
        a, b = g1.get(name), g0.get(name)
        if a is None or b is None:
            assert (a if b is None else b).abs().max() == 0, name
        elif name.endswith(ill):
            assert rel(a, g64[name]) < 2e-4 and rel(b, g64[name]) < 2e-4, name
        else:
            assert rel(a, b) < 5e-5, name      # fp32, other summation orders


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_hc_pre_and_post_equal_twins(dtype):
    from dsv4.kernels import mhc as k
    g = torch.Generator().manual_seed(8)
    n, D, B, S = 4, 48, 2, 9                      # D not a multiple of the blocks
    h = torch.randn(B, S, n, D, generator=g, dtype=torch.float64)
    fn = torch.randn((2 + n) * n, n * D, generator=g, dtype=torch.float64) / (n * D) ** 0.5
    scale = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    base = torch.randn((2 + n) * n, generator=g, dtype=torch.float64)
    want = ops.hc_pre_torch(h, fn, scale, base, n, 20, 1e-6, 1e-6)
    # one slice of the mix per token block, many (decode-sized), two token blocks (T = 18), and the GEMV
    # form of a decode step's few tokens (T = 3)
    rows = h.reshape(1, B * S, n, D)
    for programs, block_t, t in ((1, None, B * S), (264, None, B * S), (1, 16, B * S), (264, None, 3), (1, None, 3)):
        got = k.hc_pre(rows[:, :t].to(DEV, dtype), fn.float().to(DEV), scale.float().to(DEV), base.float().to(DEV),
                       n, 20, 1e-6, 1e-6, programs=programs, block_t=block_t)
        for a, b in zip(got, ops.hc_pre_torch(rows[:, :t], fn, scale, base, n, 20, 1e-6, 1e-6)):
            assert rel(a, b) < tol(dtype)
    f = torch.randn(B, S, D, generator=g, dtype=torch.float64)
    _, post, comb = want
    want_h = ops.hc_post_torch(f, h, post, comb)
    got_h = k.hc_post(f.to(DEV, dtype), h.to(DEV, dtype), post.float().to(DEV), comb.float().to(DEV))
    assert got_h.dtype == dtype and rel(got_h, want_h) < tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hc_head_equals_twin_and_float64(dtype):
    # the head reduction (sigmoid weights from N logits, no Sinkhorn) in hc_pre's launches: many tokens
    # (token blocks, one slice of the mix each), a decode step's one and three tokens with the mix split
    # over programs and the weighted sum over column ranges; D not a multiple of the blocks
    from dsv4.kernels import mhc as k
    g = torch.Generator().manual_seed(17)
    n, D, B, S = 4, 300, 2, 19
    h = torch.randn(B, S, n, D, generator=g, dtype=torch.float64)
    fn = torch.randn(n, n * D, generator=g, dtype=torch.float64) / (n * D) ** 0.5
    scale = torch.rand(1, generator=g, dtype=torch.float64) + 0.5
    base = torch.randn(n, generator=g, dtype=torch.float64)
    # float64 by the formula of spec §4.3, written out here
    v = h.flatten(2)
    rho = torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)
    pre = torch.sigmoid((v @ fn.T) * rho * scale + base) + 1e-6
    want = (pre.unsqueeze(-1) * h).sum(2)
    assert rel(ops.hc_head_torch(h, fn, scale, base, 1e-6, 1e-6), want) < 1e-12
    cast = lambda t: t.float().to(DEV)                                   # noqa: E731
    for t, kw in ((S, {}), (S, dict(programs=264, block_t=16)), (1, dict(programs=264, finish_programs=264)),
                  (3, dict(programs=1, finish_programs=1)), (3, {})):
        got = k.hc_pre(h[:, :t].to(DEV, dtype), cast(fn), cast(scale), cast(base), n, 1, 1e-6, 1e-6, head=True, **kw)
        assert got.shape == (B, t, D) and got.dtype == dtype
        assert rel(got, want[:, :t]) < tol(dtype)
    got = ops.hc_head_triton(h.to(DEV, dtype), cast(fn), cast(scale), cast(base), 1e-6, 1e-6)
    assert rel(got, want) < tol(dtype)
    with pytest.raises(ValueError, match="inference only"):
        k.hc_pre(h.to(DEV, dtype), cast(fn), cast(scale), cast(base), n, 1, 1e-6, 1e-6, head=True, save=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deferred_hc_post_equals_float64_and_the_computed_form(dtype, monkeypatch):
    # hc_pre's deferred form (a decode step's 1-3 tokens): the finish stores the mix logits, hc_post's
    # kernel computes post and comb from them (before its wait); against float64 by the twins, against
    # hc_post given the computed post and comb, and the PyTorch hc_post resolving the same pending mix
    from dsv4.kernels import mhc as k
    g = torch.Generator().manual_seed(41)
    n, D = 4, 300
    h = torch.randn(1, 3, n, D, generator=g, dtype=torch.float64)
    f = torch.randn(1, 3, D, generator=g, dtype=torch.float64)
    fn = torch.randn((2 + n) * n, n * D, generator=g, dtype=torch.float64) / (n * D) ** 0.5
    scale = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    base = torch.randn((2 + n) * n, generator=g, dtype=torch.float64)
    for t in (1, 3):
        x64, post64, comb64 = ops.hc_pre_torch(h[:, :t], fn, scale, base, n, 20, 1e-6, 1e-6)
        want = ops.hc_post_torch(f[:, :t], h[:, :t], post64, comb64)
        args = (h[:, :t].to(DEV, dtype), fn.float().to(DEV), scale.float().to(DEV), base.float().to(DEV),
                n, 20, 1e-6, 1e-6)
        x, pending, none = k.hc_pre(*args, defer=True)
        assert none is None and isinstance(pending, k.PendingMix) and pending.mixes.shape == (t, (2 + n) * n)
        x_now, post, comb = k.hc_pre(*args)
        assert torch.equal(x, x_now) and rel(x, x64) < tol(dtype)
        fd, hd = f[:, :t].to(DEV, dtype), h[:, :t].to(DEV, dtype)
        got = k.hc_post(fd, hd, pending, None)
        assert got.dtype == dtype and rel(got, want) < tol(dtype)
        assert rel(got, k.hc_post(fd, hd, post, comb)) < (1e-6 if dtype == torch.float32 else 1e-2)
        p2, c2 = pending.resolve()                 # (against float64 of the streams as the kernels read them)
        _, post_in, comb_in = ops.hc_pre_torch(h[:, :t].to(dtype).double(), fn.float().double(),
                                               scale.float().double(), base.float().double(), n, 20, 1e-6, 1e-6)
        assert rel(p2, post_in) < 1e-5 and rel(c2, comb_in) < 1e-5
        assert rel(ops.hc_post_torch(fd, hd, pending, None), want) < tol(dtype)
        with pytest.raises(ValueError, match="deferred form"):
            ops.hc_post_torch(fd, hd, post, None)
        # through the backend functions: only a decode-sized call defers, and only when switched on
        monkeypatch.setattr(ops, "HC_DEFER_TOKENS", 0)
        assert ops.hc_pre_triton(*args, defer=True)[2] is not None
        monkeypatch.setattr(ops, "HC_DEFER_TOKENS", 15)
        out = ops.hc_pre_triton(*args, defer=True)
        assert out[2] is None and rel(ops.hc_post_triton(fd, hd, out[1], out[2]), want) < tol(dtype)
    many = ops.hc_pre_triton(h.repeat(1, 6, 1, 1).to(DEV, dtype), *args[1:], defer=True)
    assert many[2] is not None and many[1].shape == (1, 18, n)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hc_post_adds_the_shared_output_as_a_separate_add(dtype):
    # hc_post(f, .., add=a) (the MoE's routed and shared outputs summed in the kernel) equals hc_post of the
    # separately added f + a bit for bit, with post and comb given and deferred; against float64 too
    # (bf16 on a GPU only: the interpreter rounds fp32 to bf16 toward zero, torch and GPUs to nearest)
    from dsv4.kernels import mhc as k
    g = torch.Generator().manual_seed(43)
    n, D, T = 4, 300, 3
    h, f, a = (torch.randn(1, T, *shape, generator=g).to(DEV, dtype) for shape in ((n, D), (D,), (D,)))
    fn = torch.randn((2 + n) * n, n * D, generator=g) / (n * D) ** 0.5
    scale, base = torch.rand(3, generator=g) + 0.5, torch.randn((2 + n) * n, generator=g)
    x, post, comb = k.hc_pre(h, fn.to(DEV), scale.to(DEV), base.to(DEV), n, 20, 1e-6, 1e-6)
    _, pending, _ = k.hc_pre(h, fn.to(DEV), scale.to(DEV), base.to(DEV), n, 20, 1e-6, 1e-6, defer=True)
    want = ops.hc_post_torch((f.double() + a.double()).to(dtype).double(), h.double(), post.double(), comb.double())
    for p, c in ((post, comb), (pending, None)):
        got = k.hc_post(f, h, p, c, add=a)
        assert torch.equal(got, k.hc_post(f + a, h, p, c)) and rel(got, want) < tol(dtype)
    assert torch.equal(ops.hc_post_triton(f, h, post, comb, add=a), ops.hc_post_triton(f + a, h, post, comb))
    assert torch.equal(ops.hc_post_torch(f, h, post, comb, add=a), ops.hc_post_torch(f + a, h, post, comb))
    with pytest.raises(ValueError, match="must match"):
        k.hc_post(f, h, post, comb, add=a[..., :-1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_hc_post_pre_equals_the_separate_calls_and_float64(dtype):
    # hc_post with the next site's mix in its launch (a decode step's 1-2 tokens; given and deferred post
    # and comb, with and without the shared add, the next site deferred or not): h' bit for bit as hc_post
    # alone, the next site's x, post and comb as hc_pre of h' up to fp32 summation order; against float64
    from dsv4.kernels import mhc as k
    g = torch.Generator().manual_seed(47)
    n, D = 4, 300                                  # D not a multiple of the 32-column slices
    fn1, fn2 = (torch.randn((2 + n) * n, n * D, generator=g) / (n * D) ** 0.5 for _ in range(2))
    (s1, s2), (b1, b2) = ([torch.rand(3, generator=g) + 0.5 for _ in range(2)],
                          [torch.randn((2 + n) * n, generator=g) for _ in range(2)])
    for t in (1, 2):
        h, f, a = (torch.randn(1, t, *shape, generator=g, dtype=torch.float64) for shape in ((n, D), (D,), (D,)))
        x64, p64, c64 = ops.hc_pre_torch(h, fn1.double(), s1.double(), b1.double(), n, 20, 1e-6, 1e-6)
        h2_64 = ops.hc_post_torch((f + a).to(dtype).double(), h, p64, c64)
        want = ops.hc_pre_torch(h2_64, fn2.double(), s2.double(), b2.double(), n, 20, 1e-6, 1e-6)
        hd, fd, ad = (v.to(DEV, dtype) for v in (h, f, a))
        site2 = (fn2.to(DEV), s2.to(DEV), b2.to(DEV), n, 20, 1e-6, 1e-6)
        for defer_in, add, defer_out in ((False, None, False), (True, ad, False), (True, ad, True), (False, ad, True)):
            x1, post, comb = k.hc_pre(hd, fn1.to(DEV), s1.to(DEV), b1.to(DEV), n, 20, 1e-6, 1e-6, defer=defer_in)
            h2, nxt = k.hc_post_pre(fd, hd, post, comb, *site2, add=add, defer=defer_out)
            sep = k.hc_post(fd, hd, post, comb, add=add)
            # bit for bit under the interpreter; on a GPU the two kernels' products and sums may be contracted
            # into FMAs differently (as for the split attention's de-rotation): one rounding of the dtype
            assert torch.equal(h2, sep) if DEV == "cpu" else rel(h2, sep) <= torch.finfo(dtype).eps
            ref = k.hc_pre(sep, *site2)
            if defer_out:
                assert nxt[2] is None
                nxt = (nxt[0], *nxt[1].resolve())
            for got, same, w in zip(nxt, ref, want):
                assert rel(got, same) < (1e-6 if dtype == torch.float32 else 1e-2)
                if add is not None:
                    assert rel(got, w) < tol(dtype)
    # through the backends: the twin and the kernels' entry point agree
    got = ops.hc_post_pre_triton(fd, hd, post, comb, *site2, add=ad)
    twin = ops.hc_post_pre_torch(fd, hd, post, comb, *site2, add=ad)
    assert rel(got[0], twin[0]) < (1e-6 if dtype == torch.float32 else 1e-2)
    for a_, b_ in zip(got[1], twin[1]):
        assert rel(a_, b_) < tol(dtype)


def test_hc_pre_finish_split_over_columns():
    # the finish's weighted sum split into column ranges (decode: few tokens, D 300 in ranges of 256 and
    # of 128 at 1 and 3 tokens, a partial last range); only the first range's program stores post, comb
    # and the saved tensors: all equal the one-program finish and the float64 twin
    from dsv4.kernels import mhc as k
    g = torch.Generator().manual_seed(31)
    n, D = 4, 300
    h = torch.randn(1, 3, n, D, generator=g, dtype=torch.float64)
    fn = torch.randn((2 + n) * n, n * D, generator=g, dtype=torch.float64) / (n * D) ** 0.5
    scale = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    base = torch.randn((2 + n) * n, generator=g, dtype=torch.float64)
    for t in (1, 3):
        args = (h[:, :t].float().to(DEV), fn.float().to(DEV), scale.float().to(DEV), base.float().to(DEV),
                n, 20, 1e-6, 1e-6)
        *one, saved_one = k.hc_pre(*args, save=True, finish_programs=1)
        *split, saved_split = k.hc_pre(*args, save=True, finish_programs=264)
        for a, b, c in zip(split, one, ops.hc_pre_torch(h[:, :t], fn, scale, base, n, 20, 1e-6, 1e-6)):
            assert torch.equal(a, b) and rel(a, c) < 1e-5
        for a, b in zip(saved_split, saved_one):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["q", "kv", "derotate", "norm", "entries"])
def test_norm_rope_equals_twin(dtype, case):
    from dsv4.kernels import norm_rope as k
    g = torch.Generator().manual_seed(9)
    B, S, H, Dh, Dr = 2, 5, 3, 64, 16
    x = torch.randn((B, S, H, Dh) if case in ("q", "derotate") else (B, S, Dh), generator=g).to(dtype)
    w = 1 + 0.1 * torch.randn(Dh, generator=g)
    pos = torch.randint(0, 300_000, (B, S), generator=g)               # far positions: large angles
    freqs = 10000.0 ** -(torch.arange(Dr // 2) / (Dr // 2))
    rope = ops.Rope(pos, freqs, stride=4 if case == "entries" else 1)
    args = {"q": (None, 1e-6, rope), "kv": (w, 1e-6, rope), "derotate": (None, None, rope.inverse()),
            "norm": (w, 1e-6, None), "entries": (w, 1e-6, rope)}[case]
    want = ops.norm_rope_torch(x, *args)
    r = args[2]
    got = k.norm_rope(x.to(DEV), w.to(DEV) if args[0] is not None else None, args[1],
                      *((r.pos.to(DEV), r.freqs.to(DEV), r.stride, r.sign) if r is not None else (None, None)))
    assert got.dtype == dtype and rel(got, want) < (1e-6 if dtype == torch.float32 else 1e-2)
    if r is not None and dtype == torch.float32:   # cos/sin and the rotation in float64, of the fp32 angles
        a = ((r.pos * r.stride).float().unsqueeze(-1) * r.freqs.float()).double()    # (as the spec forms them)
        c, s_ = a.cos(), a.sin() * r.sign
        base = ops.norm_rope_torch(x.double(), *(t.double() if isinstance(t, torch.Tensor) else t
                                                 for t in args[:2]), None)
        assert rel(got, ops.apply_rope(base, c, s_)) < 1e-5
    if dtype == torch.bfloat16:   # same rounding points as the twin: bitwise up to an ulp
        assert (got.cpu().float() - want.float()).abs().max() <= 2 * want.float().abs().max() * 2 ** -8


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_rope_pair_is_two_norm_ropes_in_one_launch(dtype):
    """Two problems of different widths, weights and ropes in one launch (q_norm with kv's norm and rope;
    the per-head query norm and rope with the indexer's query rope): bitwise the two single launches,
    and each against float64."""
    from dsv4.kernels import norm_rope as k
    g = torch.Generator().manual_seed(11)
    B, S, Dr = 2, 3, 16
    pos = torch.randint(0, 5000, (B, S), generator=g)
    freqs = 10000.0 ** -(torch.arange(Dr // 2) / (Dr // 2))

    def x(*shape):
        return torch.randn(B, S, *shape, generator=g).to(dtype)

    def w(n):
        return 1 + 0.1 * torch.randn(n, generator=g)

    rope = ops.Rope(pos, freqs)
    for first, second in [((x(128), w(128), 1e-6, None), (x(64), w(64), 1e-6, rope)),
                          ((x(4, 64), None, 1e-6, rope), (x(2, 32), None, None, rope))]:
        def on_dev(p):   # (x, weight, eps, rope) -> the kernel's (x, weight, eps, pos, freqs, stride, sign)
            t, wt, eps, r = p
            return (t.to(DEV), None if wt is None else wt.to(DEV), eps,
                    *((r.pos.to(DEV), r.freqs.to(DEV), 1, 1.0) if r is not None else (None, None, 1, 1.0)))
        got = k.norm_rope_pair(on_dev(first), on_dev(second))
        for out, p in zip(got, (first, second)):
            assert torch.equal(out, k.norm_rope(*on_dev(p)))
            t, wt, eps, r = p
            want = ops.norm_rope_torch(t.double(), None if wt is None else wt.double(), eps, r)
            assert rel(out, want) < tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["q", "kv", "derotate", "norm", "entries"])
def test_norm_rope_gradients_equal_float64_autograd(dtype, case):
    g = torch.Generator().manual_seed(13)
    B, S, H, Dh, Dr = 2, 5, 3, 64, 16
    x = torch.randn((B, S, H, Dh) if case in ("q", "derotate") else (B, S, Dh), generator=g, dtype=torch.float64)
    w = (1 + 0.3 * torch.randn(Dh, generator=g, dtype=torch.float64))
    gy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    pos = torch.randint(0, 300_000, (B, S), generator=g)
    freqs = 10000.0 ** -(torch.arange(Dr // 2, dtype=torch.float64) / (Dr // 2))
    rope = ops.Rope(pos, freqs, stride=4 if case == "entries" else 1)
    weight, eps, r = {"q": (None, 1e-6, rope), "kv": (w, 1e-6, rope), "derotate": (None, None, rope.inverse()),
                      "norm": (w, 1e-6, None), "entries": (w, 1e-6, rope)}[case]

    def grads(xx, ww, rr, fn):
        xx = xx.detach().requires_grad_()
        ww = ww.detach().requires_grad_() if ww is not None else None
        y = fn(xx, ww, eps, rr)
        (y.double() * gy.to(y.device)).sum().backward()
        return y, xx.grad, (ww.grad if ww is not None else None)

    # float64 autograd of the twin, with the fp32 angles the kernel forms (cos/sin of them in float64)
    def reference(xx, ww, ee, rr):
        y = ops.norm_rope_torch(xx, ww, ee, None)
        if rr is None:
            return y
        a = ((rr.pos * rr.stride).float().unsqueeze(-1) * rr.freqs.float()).double()
        return ops.apply_rope(y, a.cos(), a.sin() * rr.sign)

    want = grads(x, weight, r, reference)
    dev_rope = None if r is None else ops.Rope(r.pos.to(DEV), r.freqs.float().to(DEV), r.stride, r.sign)
    got = grads(x.to(DEV, dtype), None if weight is None else weight.float().to(DEV), dev_rope, ops.norm_rope_triton)
    assert got[0].grad_fn is not None and "NormRope" in type(got[0].grad_fn).__name__   # the kernel's backward
    t = 1e-5 if dtype == torch.float32 else 2e-2
    assert got[1].dtype == dtype and rel(got[1], want[1]) < t
    if weight is not None:
        assert got[2].dtype == torch.float32 and rel(got[2], want[2]) < t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("limit,weighted", [(7.0, True), (0.0, False)])
def test_fused_swiglu_equals_twin_and_float64(dtype, limit, weighted):
    from dsv4.kernels import swiglu as k
    g = torch.Generator().manual_seed(10)
    shape = (13, 40)                                    # 520 values: not a multiple of the block
    gate, upv = (torch.randn(shape, generator=g, dtype=torch.float64) * 6 for _ in range(2))   # past the clamp
    w = torch.rand(shape[0], generator=g, dtype=torch.float64) if weighted else None
    want = ops.swiglu_act_torch(gate, upv, limit, w)                                 # float64
    if limit > 0:
        assert (gate > limit).any() and (upv.abs() > limit).any()
    twin = ops.swiglu_act_torch(gate.to(dtype), upv.to(dtype), limit, None if w is None else w.float(), dtype)
    got = k.swiglu(gate.to(DEV, dtype), upv.to(DEV, dtype), limit, None if w is None else w.float().to(DEV), dtype)
    assert got.dtype == dtype and got.shape == shape
    assert rel(got, want) < tol(dtype) and rel(got, twin) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("limit,weighted", [(7.0, True), (0.0, False), (7.0, False)])
def test_swiglu_gradients_equal_twin_and_float64(dtype, limit, weighted):
    # the backward kernel (dg, du, the routing weight's gradient) against autograd of the twin in float64
    # and in the same dtype; values past both clamps and exactly on their ends (torch.clamp passes the
    # gradient there); 37 rows x 300: neither a multiple of the blocks
    g = torch.Generator().manual_seed(11)
    shape = (37, 300)
    # values a bf16 holds exactly, so the float64 reference clamps the same values as the kernel (a value
    # just past the limit would round onto it in bf16, where the gradient passes)
    gate, upv = (torch.randn(shape, generator=g, dtype=torch.float64).mul(6).to(torch.bfloat16).double()
                 for _ in range(2))
    if limit > 0:
        gate[0, :5], upv[1, :5], upv[2, :5] = limit, limit, -limit
    w = torch.rand(shape[0], generator=g, dtype=torch.float64) if weighted else None
    dy = torch.randn(shape, generator=g, dtype=torch.float64)

    def grads(fn, a, b, wt, out_dtype):
        leaves = [t.detach().requires_grad_() for t in (a, b) + ((wt,) if wt is not None else ())]
        out = fn(leaves[0], leaves[1], limit, leaves[2] if wt is not None else None, out_dtype)
        return out, torch.autograd.grad(out, leaves, dy.to(out.dtype).to(out.device))

    want_out, want = grads(ops.swiglu_act_torch, gate, upv, w, None)
    cast = lambda t: None if t is None else t.to(DEV, dtype)                        # noqa: E731
    wt = None if w is None else w.float().to(DEV)
    out, got = grads(ops.swiglu_act_triton, cast(gate), cast(upv), wt, dtype)
    assert "Swiglu" in type(out.grad_fn).__name__
    _, twin = grads(ops.swiglu_act_torch, cast(gate), cast(upv), wt, dtype)
    assert got[0].dtype == got[1].dtype == dtype
    for name, a, b, c in zip(("dg", "du", "dw"), got, twin, want):
        assert rel(a, c) < tol(dtype), name
        assert rel(a, b) < (1e-6 if dtype == torch.float32 else 1e-2), name
    if limit > 0:   # on the clamp ends the gradient passes; past them it is zero
        assert (got[0][0, :5] != 0).all() and (got[1][1:3, :5] != 0).all()
        past_g, past_u = (gate > limit).to(DEV), (upv.abs() > limit).to(DEV)
        assert past_g.any() and (got[0][past_g] == 0).all() and (got[1][past_u] == 0).all()


@pytest.mark.parametrize("ratio,indexed", [(0, False), (4, True), (128, False), (4, False)])
def test_decode_key_lists_kernel_equals_twin_and_the_general_builder(ratio, indexed):
    # the one-launch key lists of a decode step against the twin and against what Attention._indices
    # builds for one cached query (rows at different positions, some before a full window)
    from dsv4.attention import Attention
    from dsv4.kernels import key_lists as k
    g = torch.Generator().manual_seed(ratio + indexed)
    W, B, C = 16, 5, 12
    pos = torch.tensor([0, 3, 15, 16, 47])
    cidx = None
    if indexed:
        cidx = torch.randint(-1, C, (B, 6), generator=g)
    want = ops.decode_key_lists_torch(pos, W, ratio, C, W + 1, cidx)
    got = k.decode_key_lists(pos.to(DEV), W, ratio, C, W + 1, None if cidx is None else cidx.to(DEV))
    assert got.dtype == torch.int32 and torch.equal(got.cpu(), want)
    att = Attention.__new__(Attention)
    att.window, att.ratio = W, ratio
    if indexed:   # the general builder with the indexer's choice given
        ops_topk = ops.index_topk
        try:
            ops.index_topk = lambda *a, **kw: cidx.unsqueeze(1)
            att.indexer = type("I", (), {"topk": 6})()
            general, _ = att._indices(0, 1, pos.unsqueeze(1), None, True, None, C, (None, None, None), None, W + 1)
        finally:
            ops.index_topk = ops_topk
    else:
        general, _ = att._indices(0, 1, pos.unsqueeze(1), None, True, None, C, None, None, W + 1)
    assert torch.equal(general, want)


@pytest.mark.parametrize("ratio,indexed", [(0, False), (4, True), (128, False)])
def test_decode_key_lists_in_ring_list_the_same_keys(ratio, indexed):
    """The decode step's lists with the ring given: the new key is written to ring slot p mod W of its
    cache row first and the lists index [ring | entries]. Kernel and twin write the same ring and build
    the same lists, and every listed key is the one the [ring | new key | entries] layout lists."""
    from dsv4.kernels import key_lists as k
    g = torch.Generator().manual_seed(7 + ratio)
    W, B, C, D, Bmax = 16, 5, 12, 8, 7
    pos = torch.tensor([0, 3, 15, 16, 47])
    rows = torch.tensor([6, 0, 2, 5, 3])
    cidx = torch.randint(-1, C, (B, 6), generator=g) if indexed else None
    ring0 = torch.randn(Bmax, W, D, generator=g)
    kv = torch.randn(B, D, generator=g)
    entries = torch.randn(Bmax, C, D, generator=g)
    old = ops.decode_key_lists_torch(pos, W, ratio, C, W + 1, cidx)                  # [ring | new | entries]
    ring_t = ring0.clone()
    want = ops.decode_key_lists_torch(pos, W, ratio, C, W, cidx, ring=ring_t, rows=rows, kv=kv)
    ring_k = ring0.clone().to(DEV)
    got = k.decode_key_lists(pos.to(DEV), W, ratio, C, W, None if cidx is None else cidx.to(DEV), ring=ring_k,
                             rows=rows.to(DEV), kv=kv.to(DEV))
    assert torch.equal(got.cpu(), want) and torch.equal(ring_k.cpu(), ring_t)
    assert torch.equal(ring_t[rows, pos % W], kv)                                       # the new keys, in place
    before = ops.gather_keys(torch.cat([ring0[rows], kv[:, None]], 1), old, entries if ratio else None,
                             rows if ratio else None)
    after = ops.gather_keys(ring_t, want, entries if ratio else None, rows if ratio else None, rows1=rows)
    assert torch.equal((old < 0), (want < 0))
    assert torch.equal(torch.where((old >= 0)[..., None], before, 0), torch.where((want >= 0)[..., None], after, 0))


def test_sparse_attention_reads_kv_at_rows1():
    """kv [Bmax, T, Dh] read in place at row rows1[b] (the decode step's ring) equals the attention over
    the gathered rows, kernel and twin, against float64."""
    q, kv, idx, sink, scale, kv2, rows2 = attention_case(B=2, T=20, K=30, seed=5)
    big = torch.randn(4, *kv.shape[1:], generator=torch.Generator().manual_seed(6)).to(kv)
    rows1 = torch.tensor([3, 1], device=kv.device)
    big[rows1] = kv
    want = ops.sparse_attention_torch(q.double(), kv.double(), idx, sink.double(), scale, kv2.double(), rows2)
    for run in (sa.forward, sa.forward_split):
        out, _ = run(q, big, idx, sink, scale, kv2, rows2, rows1=rows1)
        assert rel(out, want) < 2e-5
    twin = ops.sparse_attention_torch(q, big, idx, sink, scale, kv2, rows2, rows1=rows1)
    assert rel(twin, want) < 2e-5


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("ratio,indexed", [(0, False), (4, True), (4, False), (128, False)])
def test_call_key_lists_kernel_equals_twin(cached, ratio, indexed):
    # the key lists of a training/prefill call's queries (one launch a layer) against the PyTorch
    # builder: rows of several documents (seg, first entries), positions that restart per document,
    # a chunk [s0, s1) of the queries, a window longer than some documents; cached: rows whose first
    # position is past the window
    g = torch.Generator().manual_seed(30 + ratio + 2 * indexed + cached)
    B, S, W, C, s0, s1 = 3, 45, 16, 11, 5, 40
    if cached:
        start = torch.tensor([0, 7, 40])
        pos = start[:, None] + torch.arange(S)
        seg = first = None
    else:
        cuts = torch.rand(B, S, generator=g) < 0.1
        seg = torch.cumsum(cuts.long(), 1)
        starts = torch.cat([torch.ones(B, 1, dtype=torch.bool), seg[:, 1:] != seg[:, :-1]], 1)
        idx0 = torch.cummax(torch.where(starts, torch.arange(S), 0), 1).values
        pos = torch.arange(S) - idx0                                       # positions restart per document
        first = torch.cummax(torch.where(starts, torch.arange(S) // max(ratio, 1) // 2, 0), 1).values
    cidx = torch.randint(-1, C, (B, s1 - s0, 6), generator=g) if indexed else None
    for f, sg in ((first, seg), (None, None)):
        want = ops.key_lists_torch(pos, sg, f, s0, s1, W, ratio, C, W + 3, cidx, cached)
        to = lambda t: None if t is None else t.to(DEV)                    # noqa: E731
        got = kl.key_lists(pos.to(DEV), to(sg), to(f), s0, s1, W, ratio, C, W + 3, to(cidx), cached)
        assert got.dtype == torch.int32 and torch.equal(got.cpu(), want)
        assert (want >= 0).any() and (want < 0).any()


@pytest.mark.parametrize("ratio,overlap", [(4, True), (128, False), (4, False)])
def test_compressor_decode_step_kernel_equals_twin(ratio, overlap):
    # the in-place state update (exact: data movement) and the pooled entry of the one-token compressor
    # step, rows at every phase of a window (the one that completes it included) and out of order
    from dsv4.kernels import compressor as k
    g = torch.Generator().manual_seed(ratio + overlap)
    c, Bmax = 24, 6
    J, w = (2 if overlap else 1) * ratio, (2 if overlap else 1) * c
    skv = torch.randn(Bmax, J, w, generator=g)
    ssc = torch.randn(Bmax, J, w, generator=g)
    ssc[0, : J // 2] = float("-inf")                      # a row whose previous window is still empty
    rows = torch.tensor([4, 0, 2, 5])
    pos = torch.tensor([ratio - 1, 2 * ratio + 1, 3 * ratio - 1, 5])
    kv, sc = torch.randn(4, 1, w, generator=g), torch.randn(4, 1, w, generator=g)
    ape = torch.randn(ratio, w, generator=g)
    want_kv, want_sc = skv.clone(), ssc.clone()
    want = ops.compressor_step_torch(want_kv, want_sc, rows, kv, sc, ape, pos, ratio, overlap)
    got_kv, got_sc = skv.clone().to(DEV), ssc.clone().to(DEV)
    got = k.decode_step(got_kv, got_sc, rows.to(DEV), kv.to(DEV), sc.to(DEV), ape.to(DEV), pos.to(DEV), ratio,
                        overlap)
    assert torch.equal(got_kv.cpu(), want_kv) and torch.equal(got_sc.cpu(), want_sc)
    assert not torch.equal(want_kv, skv)                  # the step did change the state
    assert rel(got, want) < 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ratio,c,dr2", [(4, 64, 8), (128, 32, 4)])
def test_compressor_entry_kernel_equals_twin_and_float64(dtype, ratio, c, dr2):
    # the finished entry (cast, RMSNorm, rope at the entry's position) written only for rows whose position
    # completes a window, clamped to the buffer's end; other rows and entries keep their (random) values
    from dsv4.kernels import compressor as k
    from dsv4.attention import rope_freqs
    g = torch.Generator().manual_seed(ratio + c)
    Bmax, n_max = 6, 5
    entries = torch.randn(Bmax, n_max, c, generator=g).to(dtype)
    rows = torch.tensor([4, 0, 2, 5, 1])
    pos = torch.tensor([ratio - 1, 2 * ratio + 1, 3 * ratio - 1, 7 * ratio - 1, 0])   # done, not, done, past end, not
    pooled = torch.randn(5, 1, c, generator=g) * 3
    weight = torch.rand(c, generator=g) + 0.5
    freqs = rope_freqs(2 * dr2, 10000.0, None).float()
    want = entries.clone()
    ops.compressor_entry_torch(want, rows, pooled, pos, ratio, weight, 1e-6, freqs)
    got = entries.clone().to(DEV)
    k.write_entry(got, rows.to(DEV), pooled.to(DEV), pos.to(DEV), ratio, weight.to(DEV), 1e-6, freqs.to(DEV))
    got = got.cpu()
    written = torch.zeros(Bmax, n_max, dtype=torch.bool)
    written[4, 0] = written[2, 2] = written[5, n_max - 1] = True
    assert torch.equal(got[~written], entries[~written]) and torch.equal(want[~written], entries[~written])
    assert not torch.equal(want[written], entries[written])
    assert rel(got[written], want[written]) < tol(dtype)
    # float64 from the spec's formulas: x̂ = w ⊙ x / rms(x), pairs of the last 2·dr2 dims rotated by i·M·f
    x = pooled[[2, 0, 3], 0].double()                     # the written places in row-major order: (2,2), (4,0), (5,4)
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.double()
    ang = torch.tensor([2, 0, 6]).double().unsqueeze(1) * ratio * freqs.double()
    e, o = y[:, c - 2 * dr2::2], y[:, c - 2 * dr2 + 1::2]
    y[:, c - 2 * dr2::2], y[:, c - 2 * dr2 + 1::2] = e * ang.cos() - o * ang.sin(), e * ang.sin() + o * ang.cos()
    assert rel(got[written], y) < (2e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.skipif(DEV != "cuda", reason="the tensor-core form runs for bf16 operands on CUDA")
def test_linear_fp32_of_bf16_operands_forward_and_gradients():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 70, 256, generator=g).to(DEV, torch.bfloat16).requires_grad_()
    w = (torch.randn(1000, 256, generator=g) * 0.05).to(DEV, torch.bfloat16).requires_grad_()
    t = torch.randn(3, 70, 1000, generator=g).to(DEV)
    y = ops.linear_fp32(x, w)
    assert y.dtype == torch.float32
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = xd @ wd.t()
    assert rel(y, want) < 1e-6                        # bf16 products are exact in fp32
    (y * t).sum().backward()
    (want * t.double()).sum().backward()
    assert x.grad.dtype == w.grad.dtype == torch.bfloat16
    assert rel(x.grad, xd.grad) < 1e-2 and rel(w.grad, wd.grad) < 1e-2   # one bf16 rounding of g, fp32 sums


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("limit", [0.0, 1.5])
def test_expert_gemv_equals_loop_reference_and_float64(dtype, limit):
    from dsv4.kernels import moe_gemv
    g = torch.Generator().manual_seed(12)
    N, K, E, D, I = 3, 4, 9, 72, 40                     # D, I not multiples of the tiles
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w1, w3 = (torch.randn(E, I, D, generator=g, dtype=torch.float64) / D ** 0.5 for _ in range(2))
    w2 = torch.randn(E, D, I, generator=g, dtype=torch.float64) / I ** 0.5
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    idx[1, 2] = idx[1, 0]                               # a token listing an expert twice counts it twice
    weight = torch.rand(N, K, generator=g, dtype=torch.float64)
    want = ops.moe_experts_loop(x, idx, weight, w1, w2, w3, limit)                    # float64 reference
    if limit:
        assert (x @ w1[0].t()).abs().max() > limit      # the clamp is reached
    cast = lambda t: t.to(DEV, dtype)
    got = moe_gemv.experts_gemv(cast(x), idx.to(DEV), weight.float().to(DEV), cast(w1), cast(w2), cast(w3), limit)
    assert got.dtype == dtype and rel(got, want) < tol(dtype)
    twin = ops.moe_experts_loop(x.to(dtype), idx, weight.float(), w1.to(dtype), w2.to(dtype), w3.to(dtype), limit)
    assert rel(got, twin) < (1e-6 if dtype == torch.float32 else 1e-2)
    # ids outside [0, E) (another rank's experts) contribute nothing
    idx2 = idx.clone()
    idx2[0, 1] = -1
    idx2[2, 3] = E
    keep = (idx2 >= 0) & (idx2 < E)
    want2 = ops.moe_experts_loop(x, idx2.clamp(0, E - 1), weight * keep, w1, w2, w3, limit)
    got2 = moe_gemv.experts_gemv(cast(x), idx2.to(DEV), weight.float().to(DEV), cast(w1), cast(w2), cast(w3), limit)
    assert rel(got2, want2) < tol(dtype)


def hc_case(B=2, S=5, n=4, D=96, seed=14):
    """Random mHC inputs in float64 (D not a multiple of the column blocks, B·S of the token blocks) and
    random output gradients: hc_pre's (h, fn, scale, base) and (dx, dpost, dcomb), hc_post's (f, post,
    comb) and its output gradient."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    pre_in = (r(B, S, n, D), r((2 + n) * n, n * D) / (n * D) ** 0.5,
              torch.rand(3, generator=g, dtype=torch.float64) + 0.5, r((2 + n) * n))
    pre_grads = (r(B, S, D), r(B, S, n), r(B, S, n, n))
    post_in = (r(B, S, D), 2 * torch.rand(B, S, n, generator=g, dtype=torch.float64),
               torch.rand(B, S, n, n, generator=g, dtype=torch.float64))
    return pre_in, pre_grads, post_in, r(B, S, n, D)


def _outs_and_grads(fn, inputs, grads, static=()):
    leaves = [t.detach().requires_grad_() for t in inputs]
    outs = fn(*leaves, *static)
    outs = outs if isinstance(outs, tuple) else (outs,)
    got = torch.autograd.grad([o for o in outs], leaves, [w.to(o.dtype) for o, w in zip(outs, grads)])
    return outs, got


def test_hc_mix_bf16x3_is_the_fp32_dot():
    # bf16 streams: fn as three bf16 parts (tensor-core dots on a GPU; fp32 copies of the parts under the
    # interpreter). The mix logits must equal float64's as closely as an fp32 dot does; a single bf16 part
    # (fn rounded to bf16) is ~1e-3 off, so the bound shows the parts are all there. 37 tokens: 3 blocks
    # of 16, the last partial; D not a multiple of the blocks.
    g = torch.Generator().manual_seed(21)
    n, D, T = 4, 80, 37
    h = torch.randn(1, T, n, D, generator=g).to(torch.bfloat16)
    fn = torch.randn((2 + n) * n, n * D, generator=g) / (n * D) ** 0.5
    fn = fn * torch.exp(torch.randn(fn.shape, generator=g))              # magnitudes over a few octaves
    scale = torch.rand(3, generator=g) + 0.5
    base = torch.randn((2 + n) * n, generator=g)
    v = h.reshape(T, n * D).double()
    rho = torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)
    want = (v @ fn.double().T) * rho                                     # the saved mix logits, float64
    one_part = (v @ fn.to(torch.bfloat16).double().T) * rho
    assert rel(one_part, want) > 1e-4
    args = (h.to(DEV), fn.to(DEV), scale.to(DEV), base.to(DEV), n, 20, 1e-6, 1e-6)
    for block_t, programs in ((16, 1), (32, 264)):
        *outs, (mixes, _, _) = mhc.hc_pre(*args, save=True, mix_precision="bf16x3", block_t=block_t,
                                          programs=programs)
        assert rel(mixes, want) < 2e-6
        ref = mhc.hc_pre(*args, mix_precision="ieee", block_t=block_t, programs=programs)
        for a, b in zip(outs, ref):
            assert rel(a, b) < 1e-5
    with pytest.raises(ValueError, match="bf16 streams"):
        mhc.hc_pre(h.float().to(DEV), *args[1:], mix_precision="bf16x3")


@pytest.mark.parametrize("dtype", DTYPES)
def test_hc_post_gradients_equal_twin_and_float64(dtype):
    (h, *_), _, (f, post, comb), gout = hc_case()
    # f and h in the model dtype, post and comb fp32; the same rounded values for every reference
    inputs = [f.to(DEV, dtype), h.to(DEV, dtype), post.float().to(DEV), comb.float().to(DEV)]
    gout = gout.to(DEV, dtype)
    outs, got = _outs_and_grads(ops.hc_post_triton, inputs, [gout])
    assert type(outs[0].grad_fn).__name__ == "_HcPostFnBackward"
    t_outs, twin = _outs_and_grads(ops.hc_post_torch, inputs, [gout])
    d_outs, want = _outs_and_grads(ops.hc_post_torch, [t.double() for t in inputs], [gout.double()])
    assert outs[0].dtype == dtype and rel(outs[0], d_outs[0]) < tol(dtype) and rel(outs[0], t_outs[0]) < tol(dtype)
    t = 1e-5 if dtype == torch.float32 else tol(dtype)
    for name, a, b, c, x in zip(("df", "dh", "dpost", "dcomb"), got, twin, want, inputs):
        assert a.dtype == x.dtype and a.shape == x.shape, name
        assert rel(a, b) < t and rel(a, c) < t, name
    # the D reduction split over programs (partial sums per slice), small token blocks
    again = mhc.hc_post_backward(gout, *inputs, block_t=4, block_d=32, programs=264)
    for name, a, c in zip(("df", "dh", "dpost", "dcomb"), again, want):
        assert rel(a, c) < t, name


@pytest.mark.parametrize("dtype", DTYPES)
def test_hc_pre_gradients_equal_twin_and_float64(dtype):
    (h, fn, scale, base), grads, *_ = hc_case()
    static = (4, 20, 1e-6, 1e-6)
    inputs = [h.to(DEV, dtype), fn.float().to(DEV), scale.float().to(DEV), base.float().to(DEV)]
    grads = [gr.to(DEV, dtype if i == 0 else torch.float32) for i, gr in enumerate(grads)]
    outs, got = _outs_and_grads(ops.hc_pre_triton, inputs, grads, static)
    assert type(outs[0].grad_fn).__name__ == "_HcPreFnBackward"
    t_outs, twin = _outs_and_grads(ops.hc_pre_torch, inputs, grads, static)
    d_outs, want = _outs_and_grads(ops.hc_pre_torch, [t.double() for t in inputs], [gr.double() for gr in grads],
                                   static)
    assert outs[0].dtype == dtype and outs[1].dtype == outs[2].dtype == torch.float32
    for name, a, b, c in zip(("x", "post", "comb"), outs, t_outs, d_outs):
        assert rel(a, b) < tol(dtype) and rel(a, c) < tol(dtype), name
    t = 1e-5 if dtype == torch.float32 else tol(dtype)
    for name, a, b, c, x in zip(("dh", "dfn", "dscale", "dbase"), got, twin, want, inputs):
        assert a.dtype == x.dtype and a.shape == x.shape, name
        assert rel(a, b) < t and rel(a, c) < t, name


def test_hc_pre_backward_split_over_programs():
    # the dpre reduction split over slices of D, dfn's over slices of tokens (37 tokens, blocks of 16),
    # against float64 autograd of the twin
    (h, fn, scale, base), grads, *_ = hc_case(B=1, S=37, seed=15)
    n = 4
    inputs = [h.float().to(DEV), fn.float().to(DEV), scale.float().to(DEV), base.float().to(DEV)]
    _, want = _outs_and_grads(ops.hc_pre_torch, [t.double() for t in inputs], [gr.to(DEV) for gr in grads],
                              (n, 20, 1e-6, 1e-6))
    x, post, comb, saved = mhc.hc_pre(*inputs, n, 20, 1e-6, 1e-6, save=True)
    got = mhc.hc_pre_backward(*inputs, saved, n, 20, 1e-6, *[gr.float().to(DEV) for gr in grads], block_t=16,
                              block_d=32, programs=264)
    for name, a, b in zip(("dh", "dfn", "dscale", "dbase"), got, want):
        assert rel(a, b) < 1e-5, name


def test_hc_pre_backward_bf16x3_equals_float64():
    # bf16 streams: part 3's dots on split bf16 operands (fp32 copies of the parts under the interpreter),
    # against float64 autograd of the twin on the same bf16 values. dfn sums exact products of h with dz's
    # three parts: as close as the fp32 FMA form (~1.5e-7; without dz's third part 9e-6). dh is rounded
    # to bf16 and that rounding is most of its error; it must be no less accurate than the FMA form's
    # (without the dz2·f1 product it is 9% worse). 37 tokens in blocks of 16, D 96 in blocks of 32.
    (h, fn, scale, base), grads, *_ = hc_case(B=1, S=37, seed=22)
    n = 4
    inputs = [h.to(DEV, torch.bfloat16), fn.float().to(DEV), scale.float().to(DEV), base.float().to(DEV)]
    dx, dpost, dcomb = [gr.to(DEV, torch.bfloat16 if i == 0 else torch.float32) for i, gr in enumerate(grads)]
    _, want = _outs_and_grads(ops.hc_pre_torch, [t.double() for t in inputs],
                              [dx.double(), dpost.double(), dcomb.double()], (n, 20, 1e-6, 1e-6))
    got = {}
    for prec in ("bf16x3", "ieee"):
        x, post, comb, saved = mhc.hc_pre(*inputs, n, 20, 1e-6, 1e-6, save=True, mix_precision=prec)
        got[prec] = mhc.hc_pre_backward(*inputs, saved, n, 20, 1e-6, dx, dpost, dcomb, block_t=16, block_d=32,
                                        programs=264, prec=prec)
    a, b = got["bf16x3"], got["ieee"]
    assert a[0].dtype == torch.bfloat16 and rel(a[0], want[0]) < 1e-2
    assert rel(a[0], want[0]) < 1.03 * rel(b[0], want[0])
    # on a GPU the dots accumulate on the tensor cores, whose fp32 sums are not IEEE-rounded: dfn there
    # measures 4.4e-6 (bf16x3) and 1.7e-6 (tf32x3) against float64 at 4,096 tokens (`bench_kernels --only
    # hc1b`); the interpreter's fp32 dots are exact to 1.5e-7
    bound = 1e-6 if DEV == "cpu" else 1e-5
    for i, name in ((1, "dfn"), (2, "dscale"), (3, "dbase")):
        assert rel(a[i], want[i]) < bound, name
    with pytest.raises(ValueError, match="bf16 streams"):
        mhc.hc_pre_backward(h.float().to(DEV), *inputs[1:], saved, n, 20, 1e-6, dx.float(), dpost, dcomb,
                            prec="bf16x3")


def test_hc_entry_points_with_gradients_take_the_kernels():
    (h, fn, scale, base), grads, (f, post, comb), gout = hc_case(S=3, D=64, seed=16)
    pre_in = [t.float().to(DEV).requires_grad_() for t in (h, fn, scale, base)]
    post_in = [t.float().to(DEV).requires_grad_() for t in (f, h, post, comb)]
    x, p, c = ops.hc_pre_triton(*pre_in, 4, 20, 1e-6, 1e-6)
    out = ops.hc_post_triton(*post_in)
    assert all(type(o.grad_fn).__name__ == "_HcPreFnBackward" for o in (x, p, c))
    assert type(out.grad_fn).__name__ == "_HcPostFnBackward"
    # only some inputs needing gradients (here the mHC parameters alone) take the kernels too
    x2, _, _ = ops.hc_pre_triton(pre_in[0].detach(), *pre_in[1:], 4, 20, 1e-6, 1e-6)
    assert type(x2.grad_fn).__name__ == "_HcPreFnBackward"
    (dfn,) = torch.autograd.grad((x2 * grads[0].float().to(DEV)).sum(), [pre_in[1]])
    _, (want,) = _outs_and_grads(lambda a: ops.hc_pre_torch(pre_in[0].detach(), a, *pre_in[2:], 4, 20, 1e-6, 1e-6)[0],
                                 [pre_in[1]], [grads[0].float().to(DEV)])
    assert rel(dfn, want) < 1e-5
    # autocast does not change the math (fp32 regions, as the twins)
    with torch.autocast(DEV, dtype=torch.bfloat16):
        xa, _, _ = ops.hc_pre_triton(*pre_in, 4, 20, 1e-6, 1e-6)
        outa = ops.hc_post_triton(*post_in)
    assert torch.equal(xa, x) and torch.equal(outa, out)
    # without gradients: the forward kernels, no graph; streams not a power of two: the twins
    with torch.no_grad():
        assert ops.hc_pre_triton(*pre_in, 4, 20, 1e-6, 1e-6)[0].grad_fn is None
    h3 = pre_in[0][:, :, :3].detach().requires_grad_()
    x3, _, _ = ops.hc_pre_triton(h3, fn[:15, :3 * 64].float().to(DEV), pre_in[2], pre_in[3][:15], 3, 20, 1e-6, 1e-6)
    assert "HcPre" not in type(x3.grad_fn).__name__
    out3 = ops.hc_post_triton(post_in[0], h3, post_in[2][..., :3], post_in[3][..., :3, :3])
    assert "HcPost" not in type(out3.grad_fn).__name__


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K,fp32", [(1, 37, 200, False), (2, 64, 96, True), (1, 5, 1000, True),
                                        (2, 130, 64, False)])
def test_gemv_equals_twin_and_float64(dtype, M, N, K, fp32):
    # one or two rows of x against a weight whose N and K are not multiples of the tiles; x a strided
    # view (rows of a wider buffer), the weight rows of a larger matrix (a packed group's view)
    from dsv4.kernels import gemv as k
    g = torch.Generator().manual_seed(M * N + K)
    x = torch.randn(M, K + 24, generator=g)[:, 24:].to(DEV, dtype)
    big = (torch.randn(N + 10, K, generator=g) / K ** 0.5).to(DEV, dtype)
    w = big[3:3 + N]
    out_dtype = torch.float32 if fp32 else dtype
    got = k.gemv(x, w, out_dtype)
    assert got.dtype == out_dtype and got.shape == (M, N)
    want = x.double() @ w.double().t()
    assert rel(got, want) < (1e-6 if fp32 or dtype == torch.float32 else 1e-2)
    assert rel(got, ops.dense_torch(x, w, fp32)) < tol(dtype)
    # launch shapes other than the default: the same result
    for launch in (dict(BN=1, BK=64, num_warps=2), dict(BN=8, BK=16, num_warps=4)):
        assert rel(k.gemv(x, w, out_dtype, **launch), got) < 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,G,R,K", [(1, 4, 24, 40), (2, 2, 12, 100), (1, 8, 5, 64)])
def test_grouped_gemv_equals_twin_and_float64(dtype, M, G, R, K):
    # a grouped projection (block g of R weight rows reads x[..., g, :]) for one or two tokens; R not a
    # multiple of the default row tile (5: one row a program), the launch's tile shrunk to fit a group
    from dsv4.kernels import gemv as k
    g = torch.Generator().manual_seed(M * G + R + K)
    x = torch.randn(1, M, G, K, generator=g).to(DEV, dtype)
    w = (torch.randn(G * R, K, generator=g) / K ** 0.5).to(DEV, dtype)
    want = torch.einsum("bsgk,grk->bsgr", x.double(), w.double().view(G, R, K)).flatten(-2)
    got = k.gemv(x, w, groups=G)
    assert got.shape == (1, M, G * R) and got.dtype == dtype
    assert rel(got, want) < (1e-6 if dtype == torch.float32 else 1e-2)
    assert rel(got, ops.grouped_dense_torch(x, w, G)) < tol(dtype)
    assert rel(ops.grouped_dense_triton(x, w, G), want) < (1e-6 if dtype == torch.float32 else 1e-2)
    for launch in (dict(BN=16, BK=32, num_warps=2), dict(BN=1, BK=64, num_warps=4)):
        assert rel(k.gemv(x, w, groups=G, **launch), got) < 1e-6
    with pytest.raises(ValueError, match="groups need x"):
        k.gemv(x[..., :G - 1, :], w, groups=G)


def test_dense_takes_the_gemv_for_one_or_two_rows_only(monkeypatch):
    from dsv4.kernels import gemv as k
    calls = []
    real = k.gemv
    monkeypatch.setattr(k, "gemv", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 32, generator=g).to(DEV)
    for rows in (1, 2, 3):
        x = torch.randn(1, rows, 32, generator=g).to(DEV)
        assert rel(ops.dense_triton(x, w, True), x.double() @ w.double().t()) < 1e-6
    assert calls == [(1, 1, 32), (1, 2, 32)]
    xg = torch.randn(1, 1, 32, generator=g).to(DEV).requires_grad_()
    ops.dense_triton(xg, w).sum().backward()                # with gradients: the twin (autograd)
    assert len(calls) == 2 and rel(xg.grad[0, 0], w.double().sum(0)) < 1e-6


@pytest.mark.parametrize("func", ["sqrtsoftplus", "sigmoid", "softmax"])
@pytest.mark.parametrize("E,K,hashed,norm", [(16, 2, False, True), (20, 6, False, False), (256, 6, True, True),
                                             (64, 8, False, True)])
def test_router_kernel_equals_twin_and_float64(func, E, K, hashed, norm):
    # distinct random logits (some very negative, where softplus needs its log1p), a random bias that
    # changes the selection, or hash rows; weights, indices and affinities
    from dsv4.kernels import router as k
    g = torch.Generator().manual_seed(E + K + len(func))
    N = 7
    logits = torch.randn(N, E, generator=g) * 4
    logits[0, :3] = torch.tensor([-30.0, -18.0, -9.0])
    bias = torch.randn(E, generator=g) * 0.5
    ids = torch.randint(0, 50, (N,), generator=g)
    table = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(50)])
    want_w, want_i, want_s = ops.route_torch(logits, None if hashed else bias, ids if hashed else None,
                                             table if hashed else None, K, func, norm, 1.5)
    w, i, s = k.route(logits.to(DEV), None if hashed else bias.to(DEV), ids.to(DEV) if hashed else None,
                      table.to(DEV) if hashed else None, K, func, norm, 1.5)
    assert torch.equal(i.cpu(), want_i)
    assert rel(w, want_w) < 1e-6 and rel(s, want_s) < 1e-6
    x = logits.double()
    f64 = {"sqrtsoftplus": lambda: torch.nn.functional.softplus(x).sqrt(), "sigmoid": x.sigmoid,
           "softmax": lambda: x.softmax(-1)}[func]()
    assert ((s.cpu().double() - f64).abs() / f64.abs().clamp_min(1e-30)).max() < 1e-5   # elementwise, tiny ones too


def test_rows_at_values_and_gradient():
    g = torch.Generator().manual_seed(21)
    table = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 4, (2, 9), generator=g)
    grad = torch.randn(2, 9, 6, generator=g, dtype=torch.float64)
    got = ops.rows_at(table, index)
    assert torch.equal(got, table[index])
    (dt,) = torch.autograd.grad(got, table, grad)
    (want,) = torch.autograd.grad(table[index], table, grad)
    assert rel(dt, want) < 1e-12


def test_twin_topk_takes_the_kernels_choice_among_ties():
    # rows full of equal scores (the indexer's ReLU zeros), −inf (masked) entries, rows with fewer finite
    # entries than P: the twin's choice is the radix select's, index for index (lowest index among ties,
    # increasing index order, −1 at the end), and equals a brute-force reading of that rule
    g = torch.Generator().manual_seed(23)
    R, C, P = 40, 300, 24
    sc = torch.randint(0, 4, (R, C), generator=g).float() * torch.rand(R, 1, generator=g)   # few values: ties
    sc[torch.rand(R, C, generator=g) < 0.2] = float("-inf")
    sc[3, 10:] = float("-inf")                                                   # 10 candidates < P
    sc[5] = 0.0                                                                   # all equal
    sc[6, ::2] = -0.0                                                             # −0 and +0: equal values
    sc[6, 1::2] = 0.0
    got = ops.topk_lowest(sc, P)
    assert torch.equal(indexer.select(sc.to(DEV), P).cpu(), got)
    assert torch.equal(indexer.select(sc.to(DEV, torch.bfloat16), P).cpu(), ops.topk_lowest(sc.bfloat16(), P))
    for r in range(R):
        finite = [(-float(v), i) for i, v in enumerate(sc[r].tolist()) if v != float("-inf")]
        want = sorted(i for _, i in sorted(finite)[:P])
        assert got[r].tolist() == want + [-1] * (P - len(want))


@pytest.mark.parametrize("D", [128, 512])
@pytest.mark.parametrize("split", [False, True])
def test_sparse_attention_reads_fp8_entries(D, split):
    # kv2 as FP8 rows (a `kv_fp8` cache): the kernel decodes them as it loads them; against float64 on the
    # dequantised entries and against the twin on the same rows
    dtype = DTYPES[-1]
    q, kv, idx, sink, scale, kv2, rows2 = attention_case(D=D, K=30, dtype=dtype, seed=3)
    kv2 = kv2 * 4
    k8 = ops.KV8(ops.kv8_quant(kv2, 64), D, 64, dtype)
    run = sa.forward_split if split else sa.forward
    out, lse = run(q, kv, idx, sink, scale, k8, rows2)
    want, want_lse = ops.sparse_attention_torch(q.double(), kv.double(), idx, sink.double(), scale,
                                                k8.dequant().double(), rows2, return_lse=True)
    assert rel(out, want) < tol(dtype) and rel(lse, want_lse) < tol(dtype)
    assert rel(out, ops.sparse_attention_torch(q, kv, idx, sink, scale, k8, rows2)) < tol(dtype)
    assert rel(k8.dequant(), kv2) > 1e-3                      # the rows did go through FP8


@torch.no_grad()
def test_model_with_fp8_entries_and_the_kernels_equals_the_twins():
    # cached prefill and decode steps with FP8 compressed entries, through the Triton entry points
    import dataclasses
    from tests.conftest import random_model
    from dsv4.cache import DecodeCache
    from dsv4.config import preset

    cfg = dataclasses.replace(preset("tiny"), head_dim=128, qk_rope_head_dim=64, index_head_dim=64)
    model = random_model(cfg, seed=6).to(DEV)
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1)).to(DEV)
    outs = {}
    try:
        for backend in ("torch", "triton"):
            ops.set_backend(backend)
            cache = DecodeCache(cfg, 2, 32, device=DEV, kv_fp8=True)
            outs[backend] = torch.cat([model(ids[:, :13], cache=cache)]      # entries 0-2, then 3 at t = 15
                                      + [model(ids[:, t:t + 1], cache=cache) for t in range(13, 17)], 1)
    finally:
        ops.set_backend(None)
    assert rel(outs["triton"], outs["torch"]) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ratio,c", [(4, 128), (128, 512)])
def test_compressor_entry_kernel_writes_fp8_rows(dtype, ratio, c):
    # the decode step's entry written as an FP8 row (a `kv_fp8` cache): the same bytes as the twin (finish,
    # then `kv8_quant`) up to rare e4m3 rounding ties; only completing rows written, clamped to the end
    from dsv4.kernels import compressor as k
    from dsv4.attention import rope_freqs
    g = torch.Generator().manual_seed(ratio + c + 1)
    Bmax, n_max, dr2 = 6, 5, 32
    row_bytes = ops.kv8_layout(c, 2 * dr2, dtype)[2]
    entries = torch.randint(0, 256, (Bmax, n_max, row_bytes), generator=g, dtype=torch.uint8)
    rows = torch.tensor([4, 0, 2, 5, 1])
    pos = torch.tensor([ratio - 1, 2 * ratio + 1, 3 * ratio - 1, 7 * ratio - 1, 0])   # done, not, done, past end, not
    pooled = torch.randn(5, 1, c, generator=g) * torch.logspace(-2, 2, c // 64).repeat_interleave(64)
    weight = torch.rand(c, generator=g) + 0.5
    freqs = rope_freqs(2 * dr2, 10000.0, None).float()
    want = entries.clone()
    ops.compressor_entry_torch(want, rows, pooled, pos, ratio, weight, 1e-6, freqs, kv8_dtype=dtype)
    got = entries.clone().to(DEV)
    k.write_entry(got, rows.to(DEV), pooled.to(DEV), pos.to(DEV), ratio, weight.to(DEV), 1e-6, freqs.to(DEV),
                  kv8_dtype=dtype)
    got = got.cpu()
    written = torch.zeros(Bmax, n_max, dtype=torch.bool)
    written[4, 0] = written[2, 2] = written[5, n_max - 1] = True
    assert torch.equal(got[~written], entries[~written]) and torch.equal(want[~written], entries[~written])
    nope = c - 2 * dr2
    off_sc = ops.kv8_layout(c, 2 * dr2, dtype)[0]
    assert torch.equal(got[written][:, off_sc:off_sc + nope // 64], want[written][:, off_sc:off_sc + nope // 64])
    flips = (got[written][:, :nope] != want[written][:, :nope]).float().mean()     # e4m3 codes: RMS-norm rounding
    assert flips < 0.01 and (DEV == "cuda" or flips == 0)                        # may move a value across a tie
    deq = lambda e: ops.kv8_dequant(e[written], c, 2 * dr2, dtype)                       # noqa: E731
    assert rel(deq(got), deq(want)) < tol(dtype)


@triton.jit
def _encode_e4m3(X, Y, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(Y + i, fp32_to_e4m3(tl.load(X + i)))


def test_e4m3_encoder_rounds_as_torch_on_every_value_and_midpoint():
    # the kernels' integer e4m3 encoder against PyTorch's cast: every finite e4m3 value, every midpoint
    # between neighbours (ties to even), signed zeros, the ends, random values over the whole range
    vals = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    vals = vals[torch.isfinite(vals)].sort().values
    g = torch.Generator().manual_seed(0)
    rand = (torch.randn(4096, generator=g) * torch.exp2(torch.randint(-14, 9, (4096,), generator=g).float()))
    x = torch.cat([vals, (vals[1:] + vals[:-1]) / 2, torch.tensor([0.0, -0.0, 448.0, -448.0]), rand.clamp(-448, 448)])
    x = torch.cat([x, torch.zeros(8192 - x.numel())]).to(DEV)
    y = torch.empty(8192, dtype=torch.int32, device=DEV)
    _encode_e4m3[(1,)](x, y, N=8192)
    assert torch.equal(y.cpu(), x.cpu().to(torch.float8_e4m3fn).view(torch.uint8).int())


def test_launch_cache_key_separates_what_triton_specialises_on():
    """`launch.spec_key` decides when `FastLaunch` reuses a compiled kernel: two arguments with one key
    must get one specialisation from Triton's own binder (`native_specialize_impl`), over ints around
    every boundary (1, multiples of 16, the i32 / i64 / u64 ranges, negatives), tensors of several dtypes
    at aligned and unaligned addresses, floats, bools and None."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from dsv4.kernels import launch
    base = torch.randn(64)
    ints = [0, 1, 2, 15, 16, 17, 31, 32, 48, -1, -16, -17, 2 ** 31 - 16, 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 16,
            -2 ** 31, -2 ** 31 - 1, -2 ** 31 - 16, 2 ** 40, 2 ** 40 + 3, 2 ** 63 - 16, 2 ** 63, 2 ** 63 + 16, 2 ** 64 - 1]
    tensors = [base, base[1:], base[4:], base[8:], torch.randn(8, dtype=torch.bfloat16),
               torch.randn(16, dtype=torch.bfloat16)[1:], torch.zeros(4, dtype=torch.int32),
               torch.zeros(5, dtype=torch.int64)[1:], torch.zeros(3, dtype=torch.uint8)]
    args = ints + tensors + [0.5, -3.0, 1.0, True, False, None]
    groups: dict = {}
    for a in args:
        groups.setdefault(launch.spec_key(a), []).append(native_specialize_impl(BaseBackend, a, False, True, True))
    for k, specs in groups.items():
        assert all(s == specs[0] for s in specs), (k, specs)
    assert len(groups) >= 12                  # (not one key for everything)
    assert launch.spec_key(object()) is NotImplemented and launch.spec_key(torch.tensor(3).numpy()) is NotImplemented
    # the in-line form a launch uses: the same keys, subclasses (a Parameter) and unknown types included
    odd = [torch.nn.Parameter(torch.randn(3)), object(), "x", 2.5]
    assert launch.spec_keys(args + odd) == tuple(launch.spec_key(a) for a in args + odd)
    # with a launch hook installed (a profiler's), every launch takes the JIT path, which calls it
    assert not launch._hooked()
    hooks = triton.knobs.runtime.launch_enter_hook
    hook = lambda *a: None   # noqa: E731
    hooks.add(hook)
    try:
        assert launch._hooked()
    finally:
        hooks.remove(hook)
    assert not launch._hooked()


def test_every_launched_kernel_goes_through_the_launch_cache():
    """Each kernel that dsv4/kernels launches is decorated `@launchable` (above `@triton.jit`), so an eager
    step pays the JIT's per-call work only at a kernel's first launch of each specialisation."""
    import ast
    from pathlib import Path
    from dsv4.kernels import launch
    missing = []
    for f in sorted(Path(launch.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("kernel") and node.name.startswith("_"):
                names = [getattr(d, "id", None) for d in node.decorator_list]
                if names[:1] != ["launchable"]:
                    missing.append(f"{f.name}:{node.name}")
    assert not missing, missing


@pytest.mark.skipif(DEV != "cuda", reason="the launch cache serves compiled kernels (CUDA)")
def test_launch_cache_reuses_kernels_only_for_equal_specialisations():
    # swiglu's kernel through FastLaunch: a miss compiles and launches, a hit launches from the cache;
    # an unaligned view, another dtype and a length that is not a multiple of 16 are new keys, and every
    # launch equals the twin's formula
    from dsv4.kernels import launch, swiglu as sw
    kern = sw._swiglu_kernel
    assert isinstance(kern, launch.FastLaunch) == launch.FAST
    if not launch.FAST:
        pytest.skip("DSV4_FAST_LAUNCH=0")
    kern.cache.clear()
    torch.manual_seed(0)
    for n, off, dt in [(4096, 0, torch.float32), (4096, 0, torch.float32), (4096, 1, torch.float32),
                       (4100, 0, torch.float32), (4096, 0, torch.bfloat16), (2048, 0, torch.float32)]:
        g = torch.randn(off + n, device=DEV, dtype=dt)[off:].view(-1, 4)
        u = torch.randn(off + n, device=DEV, dtype=dt)[off:].view(-1, 4)
        want = torch.nn.functional.silu(g.double()) * u.double()
        got = sw.swiglu(g, u, 0.0)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # keys: aligned fp32 4096 (twice: one entry), unaligned, n=4100 (not a multiple of 16), bf16; 2048
    # shares 4096's key (same specialisation)
    assert len(kern.cache) == 4


def test_launch_cache_logic_with_a_stand_in_kernel(monkeypatch):
    # FastLaunch's own logic on any machine (the test above runs it on a GPU): a stand-in for a JIT
    # kernel records how each launch is served; the first launch of a key goes through the JIT, a launch
    # with the same specialisation goes to the compiled launcher with the constexpr and default arguments
    # appended, a new alignment, int class or keyword value is a new key, a runtime argument by keyword
    # and an unknown argument type take the JIT path
    import inspect
    from types import SimpleNamespace
    from dsv4.kernels import launch

    calls = []

    class Compiled:
        function, packed_metadata = "fn", "meta"

        def run(self, *a):
            calls.append(("cached", a))

    class StandIn:                     # what FastLaunch reads of a triton.JITFunction
        params = [SimpleNamespace(name=n, is_constexpr=c, default=d) for n, c, d in
                  [("X", False, inspect.Parameter.empty), ("N", False, inspect.Parameter.empty),
                   ("BLOCK", True, inspect.Parameter.empty), ("PDL", True, False)]]

        def __getitem__(self, grid):
            def jit(*args, **kwargs):
                calls.append(("jit", args, kwargs))
                return Compiled()
            return jit

    monkeypatch.setattr(launch, "FAST", True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda dev: 7, raising=False)
    k = launch.FastLaunch(StandIn())
    x = torch.zeros(64)
    k[(4,)](x, 4096, BLOCK=128)
    k[(2, 3)](x, 8192, BLOCK=128)                      # same key: the compiled launcher
    assert calls[0][0] == "jit" and calls[1] == ("cached", (2, 3, 1, 7, "fn", "meta", None, None, None, x, 8192,
                                                              128, False))
    for args, kw in [((x[1:], 4096), {"BLOCK": 128}),     # unaligned
                     ((x, 4097), {"BLOCK": 128}),         # not a multiple of 16
                     ((x, 2 ** 40), {"BLOCK": 128}),      # an i64
                     ((x, 4096), {"BLOCK": 64}),          # another constexpr
                     ((x, 1), {"BLOCK": 128})]:           # the value 1
        n = len(calls)
        k[(1,)](*args, **kw)
        assert calls[n][0] == "jit", (args, kw)
        k[(1,)](*args, **kw)
        assert calls[n + 1][0] == "cached", (args, kw)
    n, jit = len(calls), k.jit_launches
    k[(1,)](x, N=4096, BLOCK=128)                      # a runtime argument by keyword
    k[(1,)](x, "x", BLOCK=128)                         # an argument the key does not know
    k[(1,)](x, "x", BLOCK=128)
    assert [c[0] for c in calls[n:]] == ["jit", "jit", "jit"] and k.jit_launches == jit + 3


def test_host_grid_arithmetic_matches_the_definitions():
    """`launch.cdiv` / `next_pow2` (plain integer functions used for grids and tiles instead of Triton's
    constexpr functions) against their definitions, and no host code of dsv4/kernels calls Triton's."""
    from pathlib import Path
    from dsv4.kernels import launch
    for a in [0, 1, 2, 3, 15, 16, 17, 127, 128, 129, 4095, 4096, 4097, 10 ** 9 + 7]:
        assert launch.next_pow2(a) == (1 if a <= 1 else 2 ** math.ceil(math.log2(a)))
        for b in [1, 2, 3, 16, 64, 1000]:
            assert launch.cdiv(a, b) == math.ceil(a / b) == (a + b - 1) // b
    root = Path(launch.__file__).parent
    for f in root.glob("*.py"):
        src = f.read_text()
        assert "triton.cdiv(" not in src and "triton.next_power_of_2(" not in src, f.name


def test_every_kernel_waits_for_its_predecessor_under_pdl():
    """Programmatic dependent launch is safe only if a kernel touches no memory before `gdc_wait`: every
    kernel launched in dsv4/kernels must start with `pdl_start(PDL)` and every launch pass `**pdl(...)`
    (a kernel launched with PDL but without the wait could read its input before it is written). The
    exceptions (`launch.READS_BEFORE_WAIT`, each with its reason) must still wait on every path: index
    arithmetic only, then an `if` with pdl_start in its branch and first in its `else`."""
    import ast
    import re
    from pathlib import Path
    from dsv4.kernels import launch
    root = Path(launch.__file__).parent
    launched, starts, bare = set(), {}, []
    for f in sorted(root.glob("*.py")):
        src = f.read_text()
        tree = ast.parse(src)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) and \
                    isinstance(node.func.value, ast.Name) and node.func.value.id.endswith("kernel"):
                launched.add(node.func.value.id)
                if not any(k.arg is None and isinstance(k.value, ast.Call) and getattr(k.value.func, "id", "") == "pdl"
                           for k in node.keywords):
                    bare.append(f"{f.name}:{node.lineno}")
            if isinstance(node, ast.FunctionDef) and re.match(r"_\w*kernel$", node.name):
                body = [b for b in node.body if not (isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant))]
                first = body[0]
                is_start = lambda st: (isinstance(st, ast.Expr) and isinstance(st.value, ast.Call)   # noqa: E731
                                       and getattr(st.value.func, "id", "") == "pdl_start")
                has_pdl = any(a.arg == "PDL" for a in node.args.args)
                if node.name in launch.READS_BEFORE_WAIT:     # index arithmetic, then the `if`
                    k = next((j for j, st in enumerate(body) if isinstance(st, ast.If)), None)
                    pure = k is not None and not any(
                        isinstance(c, ast.Attribute) and c.attr in ("load", "store", "atomic_add")
                        for st in body[:k] for c in ast.walk(st))
                    branch = body[k] if k is not None else None
                    starts[node.name] = (has_pdl and pure and bool(branch.orelse) and is_start(branch.orelse[0])
                                         and any(is_start(st) for st in branch.body))
                else:
                    starts[node.name] = has_pdl and is_start(first)
    assert len(launched) >= 40 and not bare, bare
    assert all(starts.get(k) for k in launched), [k for k in launched if not starts.get(k)]
    # off under the interpreter and for CPU tensors
    assert launch.pdl(torch.zeros(1)) == {}
