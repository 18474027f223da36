"""Model invariants: cached decode == full forward, chunked prefill, ragged batches, causality,
document masking, input validation, linear memory."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dsv4.cache import DecodeCache, cache_bytes
from dsv4.config import preset
from dsv4.model import Transformer, positions_from_segments

from conftest import random_model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", seed=3)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 512, (2, 300), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def full(model, ids):
    with torch.no_grad():
        return model(ids)


@torch.no_grad()
def test_token_by_token_decode_equals_full_forward(model, ids, full):
    # prefill 120 tokens, then decode one by one across the 128-token HCA boundary and many 4-token ones
    cache = DecodeCache(model.config, 2, 400)
    outs = [model(ids[:, :120], cache=cache)]
    for t in range(120, 300):
        outs.append(model(ids[:, t:t + 1], cache=cache))
    assert rel(torch.cat(outs, 1), full) < 1e-5
    assert cache.lengths.tolist() == [300, 300]


@torch.no_grad()
def test_uneven_chunked_prefill_equals_full_forward(model, ids, full):
    cache = DecodeCache(model.config, 2, 300)
    outs, p = [], 0
    for n in (1, 2, 5, 3, 118, 1, 7, 126, 37):  # boundaries 4k and 128 fall inside chunks and at edges
        outs.append(model(ids[:, p:p + n], cache=cache))
        p += n
    assert p == 300
    assert rel(torch.cat(outs, 1), full) < 1e-5


@torch.no_grad()
def test_ragged_batch_rows_at_different_lengths(model, ids, full):
    cache = DecodeCache(model.config, 3, 320)  # row 2 stays unused
    model(ids[0:1, :61], cache=cache, rows=torch.tensor([0]))
    model(ids[1:2, :126], cache=cache, rows=torch.tensor([1]))
    got0, got1 = [], []
    for i in range(0, 40, 2):  # two tokens per step for both rows, at different positions
        step = torch.stack([ids[0, 61 + i:63 + i], ids[1, 126 + i:128 + i]])
        out = model(step, cache=cache, rows=torch.tensor([0, 1]))
        got0.append(out[0])
        got1.append(out[1])
    assert rel(torch.cat(got0), full[0, 61:101]) < 1e-5
    assert rel(torch.cat(got1), full[1, 126:166]) < 1e-5
    assert cache.lengths.tolist() == [101, 166, 0]


@torch.no_grad()
def test_reset_row_reuses_cache(model, ids, full):
    cache = DecodeCache(model.config, 2, 300)
    model(ids[:, :200], cache=cache)
    cache.reset([0])
    out = model(ids[0:1, :131], cache=cache, rows=torch.tensor([0]))
    assert rel(out[0], full[0, :131]) < 1e-5


@torch.no_grad()
def test_snapshot_restore_rolls_back_partial_windows(model, ids, full):
    cache = DecodeCache(model.config, 2, 300)
    model(ids[:, :126], cache=cache)
    snap = cache.snapshot(torch.arange(2))
    wrong = torch.randint(0, 512, (2, 3))
    model(wrong, cache=cache)  # crosses the 128 boundary with wrong tokens
    cache.restore(snap)
    out = model(ids[:, 126:140], cache=cache)
    assert rel(out, full[:, 126:140]) < 1e-5


@torch.no_grad()
def test_causality(model, ids, full):
    changed = ids.clone()
    changed[:, 200:] = torch.randint(0, 512, (2, 100), generator=torch.Generator().manual_seed(9))
    out = model(changed)
    assert torch.equal(out[:, :200], full[:, :200])
    assert not torch.allclose(out[:, 200:], full[:, 200:])


@torch.no_grad()
def test_documents_do_not_interact(model):
    g = torch.Generator().manual_seed(11)
    a, b = torch.randint(0, 512, (1, 140), generator=g), torch.randint(0, 512, (1, 150), generator=g)
    packed = torch.cat([a, b], 1)
    seg = torch.cat([torch.zeros(1, 140), torch.ones(1, 150)], 1).long()
    out = model(packed, segment_ids=seg)
    assert rel(out[:, :140], model(a)) < 1e-5
    assert rel(out[:, 140:], model(b)) < 1e-5
    assert positions_from_segments(seg)[0, 140].item() == 0


def test_bad_inputs_raise_clear_errors(model):
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        model(torch.tensor([[1, 2, 512]]))
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="non-empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 3))
    cache = DecodeCache(model.config, 1, 16)
    with pytest.raises(ValueError, match="longer than the cache"):
        model(torch.ones(1, 17, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="rows"):
        model(torch.ones(2, 3, dtype=torch.long), cache=cache)
    two = DecodeCache(model.config, 2, 16)
    with pytest.raises(ValueError, match="distinct"):
        model(torch.ones(2, 3, dtype=torch.long), cache=two, rows=torch.tensor([1, 1]))
    for bad in ([0, 2], [-1, 0]):
        with pytest.raises(ValueError, match=r"lie in \[0, 2\)"):
            model(torch.ones(2, 3, dtype=torch.long), cache=two, rows=torch.tensor(bad))
    model(torch.ones(1, 10, dtype=torch.long), cache=two, rows=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"a row at length 10 \+ 7 new tokens exceeds max_len=16"):
        model(torch.ones(2, 7, dtype=torch.long), cache=two, rows=torch.tensor([0, 1]))
    assert two.lengths.tolist() == [0, 10]          # a refused call changes nothing
    for bad in ([2], -1, torch.tensor([0, 5])):
        with pytest.raises(ValueError, match=r"reset: rows must lie in \[0, 2\)"):
            two.reset(bad)
    two.reset(1)
    assert two.lengths.tolist() == [0, 0]
    with pytest.raises(ValueError, match="segment_ids"):
        model(torch.ones(2, 3, dtype=torch.long), cache=two, segment_ids=torch.zeros(2, 3, dtype=torch.long))
    # a cached call reads the ids' range with its rows (one transfer): out-of-vocabulary ids are refused
    # there, before anything is written, by the main model and by the MTP block
    for bad in ([[3, 512, 4]], [[3, -2, 4]]):
        with pytest.raises(ValueError, match=r"token ids must lie in \[0, 512\)"):
            model(torch.tensor(bad * 2), cache=two)
        with pytest.raises(ValueError, match=r"token ids must lie in \[0, 512\)"):
            model.mtp_logits(torch.randn(2, 3, model.config.hc_mult, model.config.hidden_size),
                             torch.tensor(bad * 2), cache=two)
    assert two.lengths.tolist() == two.mtp_lengths.tolist() == [0, 0]


@torch.no_grad()
def test_cached_call_reads_the_device_once(model, ids, monkeypatch):
    # the ids' range, the rows' checks and their first positions come back in one transfer
    cache = DecodeCache(model.config, 2, 300)
    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or real(self))
    model(ids[:, :37], cache=cache)
    model(ids[:1, 37:50], cache=cache, rows=torch.tensor([1]))
    assert len(reads) == 2


def test_bf16_model_keeps_fp32_parameters():
    m = random_model("tiny", seed=0).to_dtype(torch.bfloat16)
    dt = {n: p.dtype for n, p in m.named_parameters()}
    assert dt["layers.0.hc_attn_fn"] == torch.float32 and dt["layers.1.attn.compressor.ape"] == torch.float32
    assert dt["layers.0.attn.wq_a.weight"] == torch.bfloat16 and dt["embed.weight"] == torch.bfloat16
    with torch.no_grad():
        out = m(torch.randint(0, 512, (1, 40)))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_cache_bytes_match_allocation_and_spec():
    cfg = preset("tiny")
    cache = DecodeCache(cfg, 1, 1024, dtype=torch.bfloat16)
    assert cache_bytes(cfg, 1024)["total"] == cache.nbytes()
    # spec §12.3: Flash with bf16 entries grows by 6,880 bytes per token (compressed entries only)
    flash = cache_bytes(preset("deepseek-v4-flash"), 1 << 20, with_mtp=False)
    assert flash["per_token"] == 6880


_MEM_SCRIPT = """
import resource, sys, torch
from dsv4.config import preset
from dsv4.model import Transformer
m = Transformer(preset('tiny')).eval()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    m(torch.randint(0, 512, (1, int(sys.argv[1]))), last_only=True)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_forward_memory_grows_linearly():
    """Peak memory of a full forward: 4× the tokens must cost ≲ 4× the memory (quadratic would be 16×).

    Large blocks are forced to mmap so that the peak RSS measures live tensors, not heap fragmentation
    of glibc's arenas (which otherwise keeps freed per-chunk buffers mapped)."""
    import os

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    mib = []
    for n in (2048, 8192):
        res = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, str(n)], capture_output=True, text=True,
                             check=True, env=env)
        mib.append(float(res.stdout.strip().splitlines()[-1]))
    assert mib[1] < 6 * max(mib[0], 20), mib


@torch.no_grad()
def test_decode_step_ragged_rows_equals_full_forward(model, ids, full):
    # decode_step (the graph-capturable step): rows at different lengths, row order shuffled, one
    # row idle in the middle of the cache; crosses 4- and 128-token boundaries and the window
    cache = DecodeCache(model.config, 3, 320)
    model(ids[0:1, :97], cache=cache, rows=torch.tensor([2]))
    model(ids[1:2, :126], cache=cache, rows=torch.tensor([0]))
    got0, got1 = [], []
    for i in range(70):
        step = torch.stack([ids[1, 126 + i:127 + i], ids[0, 97 + i:98 + i]])  # [2, 1]
        out = model.decode_step(step, cache, torch.tensor([0, 2]))             # [2, V]
        got1.append(out[0])
        got0.append(out[1])
    assert rel(torch.stack(got0), full[0, 97:167]) < 1e-5
    assert rel(torch.stack(got1), full[1, 126:196]) < 1e-5
    assert cache.lengths.tolist() == [196, 0, 167]


@torch.no_grad()
def test_single_token_and_chunked_cached_paths_equal_the_full_forward(model, ids):
    # the one-token step (static shapes: index top-k and HCA lists over the whole entry buffer) and
    # two-token chunks (lists over the visible entries only) against the full forward, dense and
    # sparse CSA, across 4- and 128-token boundaries
    try:
        for mode in ("sparse", "dense"):
            for layer in model.layers:
                layer.attn.index_mode = mode
            full = model(ids[:, :200])
            one, two = DecodeCache(model.config, 2, 300), DecodeCache(model.config, 2, 300)
            model(ids[:, :40], cache=one)
            model(ids[:, :40], cache=two)
            steps = [model(ids[:, t:t + 1], cache=one) for t in range(40, 200)]
            pairs = [model(ids[:, t:t + 2], cache=two) for t in range(40, 200, 2)]
            assert rel(torch.cat(steps, 1), full[:, 40:200]) < 1e-5
            assert rel(torch.cat(pairs, 1), full[:, 40:200]) < 1e-5
    finally:
        for layer in model.layers:
            layer.attn.index_mode = "sparse"


@torch.no_grad()
def test_cached_update_plan_table_equals_the_direct_plan(model, ids, monkeypatch):
    # the compressors' index plan looked up by residue (the default) and computed for the call's rows
    # (what a CUDA-graph capture or a table over PLAN_TABLE_MAX runs) leave the same cache, bit for bit;
    # rows start at different residues mod 4 and 128 (different lengths fed first), then two rows at one
    # residue mod 4 and different ones mod 128 (the plan as views of the residue's row where it is shared)
    import dsv4.attention as att

    def run():
        cache = DecodeCache(model.config, 4, 300)
        for r, n in enumerate((1, 6, 131, 7)):
            model(ids[:1, :n], cache=cache, rows=torch.tensor([r]))
        out = [model(ids[:, s:s + 37].repeat(2, 1)[:3], cache=cache, rows=torch.tensor([2, 0, 1])) for s in (0, 37)]
        out.append(model(ids[:, 80:117], cache=cache, rows=torch.tensor([3, 0])))   # lengths 7 and 75
        return out, cache
    att._PLANS.clear()
    got, table_cache = run()
    assert att._PLANS                                   # the table path ran
    monkeypatch.setattr(att, "PLAN_TABLE_MAX", 0)
    att._PLANS.clear()
    want, direct_cache = run()
    assert not [k for k in att._PLANS if k[0] != "full"]      # (the new prompts' plans are not tables)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    for la, lb in zip(table_cache.layers, direct_cache.layers):
        for sa, sb in zip(la.states(), lb.states()):
            assert torch.equal(sa.kv, sb.kv) and torch.equal(sa.score, sb.score) and torch.equal(sa.entries, sb.entries)


@pytest.mark.parametrize("ratio,S", [(4, 4), (4, 7), (4, 26), (128, 128), (128, 300), (4, 3), (128, 90)])
@pytest.mark.parametrize("kv_fp8", [False, True])
@torch.no_grad()
def test_new_prompt_compressor_update_equals_the_general_path(ratio, S, kv_fp8, monkeypatch):
    # rows that start at position 0 with at least M tokens take `_update_fresh` (no state slot read);
    # the general update of the same call (starts unknown: the plan looked up per row) must leave the same
    # state slots, bit for bit (copies of the same projections), and the same entries up to the order of
    # the fp32 sums (the pooling runs over a different number of windows, and a CPU reduction's
    # vectorisation depends on the shape: equal here, not on every CPU); then the next call (general path
    # on both) the same again. Fewer than M tokens keep the general path.
    import dsv4.attention as att
    from dsv4.cache import _compressor_state
    torch.manual_seed(ratio * 1000 + S)
    dim, c, rope = 48, 80, 16
    comp = att.Compressor(dim, ratio, c, 1e-6)
    for p in comp.parameters():
        p.copy_(torch.randn_like(p) * 0.3)
    freqs = att.rope_freqs(rope, 10000.0, None)
    B, max_len = 3, 640
    states = [_compressor_state(ratio, c, B, max_len, "cpu", torch.float32, rope if kv_fp8 else 0) for _ in range(2)]
    e = states[0].entries
    stale = torch.randint_like(e, 0, 100) if kv_fp8 else torch.randn_like(e)
    for st in states:                                    # stale values in the rows' other places
        st.entries.copy_(stale)
    rows = torch.tensor([2, 0])
    x = torch.randn(2, S + 9, dim)
    pos = torch.arange(S + 9).expand(2, -1)
    fresh = []
    monkeypatch.setattr(att.Compressor, "_update_fresh",
                        lambda self, *a, _f=att.Compressor._update_fresh: fresh.append(1) or _f(self, *a))
    comp.update(x[:, :S], pos[:, :S], freqs, states[0], rows, starts=(0, 0))
    assert len(fresh) == (S >= ratio)
    comp.update(x[:, :S], pos[:, :S], freqs, states[1], rows, starts=None)
    assert len(fresh) == (S >= ratio)
    for step in range(2):
        a, b = states
        assert torch.equal(a.kv, b.kv) and torch.equal(a.score, b.score)
        n = (S + 9 * step) // ratio                      # entries the rows hold now
        written = torch.zeros(a.entries.shape[:2], dtype=torch.bool)
        written[rows, :n] = True
        for st in states:                                # written where they belong, nowhere else
            assert torch.equal(st.entries[~written], stale[~written])
            assert not n or not torch.equal(st.entries[written], stale[written])
        if kv_fp8:        # FP8 rows: a last-bit difference may move a code (or a block's scale) by one step
            da, db = (st.attention_keys(c).dequant().float()[written] for st in states)
            if n:
                assert (da == db).float().mean() > 0.9
                assert (da - db).abs().max() <= 0.125 * da.abs().max()
        else:
            torch.testing.assert_close(a.entries[written], b.entries[written], rtol=2e-6, atol=2e-6)
        for st in states:                                # then 9 more tokens on both
            comp.update(x[:, S:], pos[:, S:], freqs, st, rows, starts=(S, S))


@torch.no_grad()
def test_decode_step_has_no_host_synchronisation(model, ids, monkeypatch):
    # what would block CUDA-graph capture: reading a tensor's value on the host
    cache = DecodeCache(model.config, 2, 300)
    model(ids[:, :130], cache=cache)

    def refuse(*args, **kwargs):
        raise AssertionError("host synchronisation in the decode step")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "unique"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(torch, "nonzero", refuse)
    out = model.decode_step(ids[:, 130:131], cache, torch.arange(2))
    monkeypatch.undo()
    assert out.shape == (2, model.config.vocab_size)


@torch.no_grad()
def test_decode_graph_runner_on_cpu_is_the_eager_step(model, ids, full):
    from dsv4.graphs import DecodeGraphs

    cache = DecodeCache(model.config, 2, 300)
    model(ids[:, :50], cache=cache)
    runner = DecodeGraphs(model, cache)
    assert not runner.enabled
    outs = [runner(ids[:, t:t + 1], torch.arange(2)) for t in range(50, 60)]
    assert rel(torch.stack(outs, 1), full[:, 50:60]) < 1e-5
    with pytest.raises(ValueError, match="CUDA"):
        DecodeGraphs(model, cache, enabled=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the branches fork only in a CUDA graph (CPU: in line)")
@torch.no_grad()
def test_decode_graph_with_concurrent_branches_equals_the_eager_step_on_cuda(ids):
    # the recorded step runs the shared expert and the compressors on a second stream (dsv4.streams): the
    # same kernels on the same inputs, so every step's logits and the cache equal the eager step's, bit for bit
    from dsv4 import streams
    from dsv4.graphs import DecodeGraphs

    assert streams.ENABLED, "run without DSV4_STREAMS=0"
    m = random_model("tiny", seed=3).to(device="cuda", dtype=torch.bfloat16)
    dev_ids, rows = ids.cuda(), torch.arange(2, device="cuda")
    caches = [DecodeCache(m.config, 2, 300, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    for c in caches:
        m(dev_ids[:, :118], cache=c)
    runner = DecodeGraphs(m, caches[0])
    steps = range(118, 134)                  # across the 128-token HCA entry and four CSA windows
    got = [runner(dev_ids[:, t:t + 1], rows) for t in steps]
    assert runner.graphs.get(2) is not None and streams._SIDE      # recorded, and a branch was forked
    want = [m.decode_step(dev_ids[:, t:t + 1], caches[1], rows) for t in steps]
    for t, a, b in zip(steps, got, want):
        assert torch.equal(a, b), t
    for la, lb in zip(caches[0].layers, caches[1].layers):
        assert torch.equal(la.ring, lb.ring)
        for sa, sb in zip(la.states(), lb.states()):
            assert torch.equal(sa.entries, sb.entries) and torch.equal(sa.kv, sb.kv)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the branches fork only in a CUDA graph (CPU: in line)")
@torch.no_grad()
def test_a_recording_joins_only_what_it_forked_on_cuda():
    # a join with nothing pending (a caller that joins whether or not its branch forked) must not make
    # the recording wait for a stream it never forked (an invalid capture), and a fork is joined once
    from dsv4 import streams
    x = torch.randn(64, device="cuda")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = x * 2
        streams.join(y)                                   # nothing forked yet
        with streams.side(y):
            z = y + 1
        w = y * 3
        streams.join(y)
        streams.join(y)                                   # joined already
        out = z * w
    x.copy_(torch.randn(64, device="cuda"))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, (x * 2 + 1) * (x * 2 * 3))


@torch.no_grad()
def test_decode_to_the_end_of_a_short_cache(model, ids, full):
    # max_len below the HCA ratio and not a multiple of 4: the last partial windows have no entry slot
    cache = DecodeCache(model.config, 2, 50)
    outs = [model(ids[:, :10], cache=cache)]
    outs += [model(ids[:, t:t + 1], cache=cache) for t in range(10, 50)]
    assert rel(torch.cat(outs, 1), full[:, :50]) < 1e-5


@torch.no_grad()
def test_decode_step_compiles_as_one_graph(model, ids, full):
    # torch.compile(fullgraph=True) of the decode step (what DecodeGraphs(compile=True) records):
    # the trace has no break and the functionalised cache updates give the eager results
    from dsv4.graphs import DecodeGraphs

    cache = DecodeCache(model.config, 2, 300)
    model(ids[:, :120], cache=cache)
    runner = DecodeGraphs(model, cache, compile=True, compile_backend="aot_eager")
    outs = [runner(ids[:, t:t + 1], torch.arange(2)) for t in range(120, 132)]   # crosses 128
    assert rel(torch.stack(outs, 1), full[:, 120:132]) < 1e-5
    assert cache.lengths.tolist() == [132, 132]


@torch.no_grad()
def test_compressor_paths_leave_bit_identical_state(model, ids, monkeypatch):
    # the window-parallel path (rows at one position), the token loop (rows at different positions) and
    # decode_step leave the same compressor state, slot for slot: previous window (CSA), partial window
    # and, past it, the tail of the last completed window (what rollback reads back). The projections
    # are made a function of the position alone, so that the paths' different rounding upstream of the
    # compressor neither hides nor fakes a difference: the state must then match exactly.
    from dsv4.attention import Compressor

    tables = {}

    def project(self, x, pos, pre=None, with_ape=True):
        if self not in tables:
            g = torch.Generator().manual_seed(len(tables))
            w = self.wkv.weight.shape[0]
            tables[self] = [torch.randn(400, w, generator=g) for _ in range(2)]  # kv, gate (fp32)
        kv, gate = tables[self]
        return kv[pos], gate[pos] + self.ape.float()[pos % self.ratio] if with_ape else gate[pos]

    monkeypatch.setattr(Compressor, "project", project)
    cfg, rows = model.config, torch.arange(2)
    # chunks ending mid-window, completing one window with earlier tokens, several windows, the HCA one
    chunks = [(0, 3), (3, 6), (6, 131), (131, 135), (135, 263), (263, 270)]
    one = DecodeCache(cfg, 2, 300)
    for s0, s1 in chunks:
        model(ids[:, s0:s1], cache=one, rows=rows)
    ragged = DecodeCache(cfg, 3, 300)       # row 2 runs 5 positions ahead: every call takes the token loop
    model(ids[1:2, :5], cache=ragged, rows=[2])
    for s0, s1 in chunks:
        model(torch.cat([ids[:, s0:s1], ids[1:2, s0 + 5:s1 + 5]]), cache=ragged, rows=torch.arange(3))
    step = DecodeCache(cfg, 2, 300)
    for t in range(270):
        model.decode_step(ids[:, t:t + 1], step, rows)
    assert one.lengths.tolist() == ragged.lengths[:2].tolist() == step.lengths.tolist() == [270, 270]
    assert {len(c.layers) for c in (one, ragged, step)} == {len(cfg.compress_ratios)}
    compressed = 0
    for i, (la, lb, lc) in enumerate(zip(one.layers, ragged.layers, step.layers)):
        for sa, sb, sc in zip(la.states(), lb.states(), lc.states()):
            for name in ("kv", "score"):
                a, b, c = (getattr(s, name)[:2] for s in (sa, sb, sc))
                assert torch.equal(a, b), f"{name} of layer {i}: window-parallel vs token loop"
                assert torch.equal(a, c), f"{name} of layer {i}: window-parallel vs decode_step"
            n = 270 // la.ratio
            torch.testing.assert_close(sa.entries[:2, :n], sb.entries[:2, :n])
            torch.testing.assert_close(sa.entries[:2, :n], sc.entries[:2, :n])
            compressed += 1
    assert compressed == sum((r > 0) + (r == 4) for r in cfg.compress_ratios)  # CSA: compressor and indexer


def test_weights_back_to_back_by_chance_are_not_packed():
    # two weights in separate storages that happen to lie back to back (the CUDA caching allocator places
    # consecutive parameters so): no packed view. One would run past the end of the first storage, which
    # `set_` grows, moving that weight and leaving the second half of the view uninitialised — a wrong
    # first inference forward on a freshly loaded model, found on the GPU
    import numpy as np
    from torch import nn
    from dsv4.attention import linears, packed_weight
    buf = np.random.default_rng(0).standard_normal(2 * 48 * 32).astype(np.float32)
    layers = [nn.Linear(32, 48, bias=False), nn.Linear(32, 48, bias=False)]
    for i, layer in enumerate(layers):      # from_numpy: one storage per weight over one numpy buffer
        layer.weight.data = torch.from_numpy(buf[i * 48 * 32:(i + 1) * 48 * 32]).view(48, 32)
    w0, w1 = (layer.weight for layer in layers)
    assert w0.data_ptr() + w0.numel() * 4 == w1.data_ptr()                   # back to back
    assert w0.untyped_storage().data_ptr() != w1.untyped_storage().data_ptr()  # two storages
    assert packed_weight(layers) is None
    x = torch.randn(5, 32, dtype=torch.float64)
    with torch.no_grad():
        got = linears(x.float(), layers)
    for g, layer in zip(got, layers):
        assert torch.allclose(g.double(), x @ layer.weight.double().T, atol=1e-5)


def test_packed_projections_give_the_same_model(ids):
    # packing moves the weights of each projection group into one buffer (views): inference then runs
    # each group as one GEMM. Same state dict, same logits (full, cached prefill, decode), and training
    # still reaches every parameter on its own
    from dsv4.attention import linears, packed_weight
    a, b = random_model("tiny", seed=5), random_model("tiny", seed=5)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    n = b.pack_projections()
    assert n == 5 + 5 + 3 + 2   # shared experts and x groups (4 layers + MTP), compressors' groups, CSA query groups
    assert b.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in b.state_dict().items())
    att = b.layers[1].attn                                                    # a CSA layer: three groups
    for layers, _ in att.projection_groups():
        w = packed_weight(layers)
        assert w is not None and torch.equal(w, torch.cat([l.weight for l in layers]))
    x = ids[:, :150]
    with torch.no_grad():
        calls = {a: [], b: []}
        real = torch.nn.functional.linear
        try:
            for m in (a, b):
                torch.nn.functional.linear = lambda *a_, _m=m, **k: calls[_m].append(a_[1].shape) or real(*a_, **k)
                calls[m].append(m(x))
        finally:
            torch.nn.functional.linear = real
        want, got = calls[a].pop(), calls[b].pop()
        # per forward: SWA 2 -> 1, CSA 9 -> 3 (twice), HCA 4 -> 2, shared experts 2 -> 1 (4 layers)
        assert len(calls[a]) - len(calls[b]) == 1 + 6 + 2 + 6 + 4
        assert torch.Size([sum(l.weight.shape[0] for l in att.projection_groups()[1][0]), 64]) in calls[b]
        assert rel(got, want) < 1e-5
        ca, cb = DecodeCache(a.config, 2, 200), DecodeCache(b.config, 2, 200)
        outs = [(a(x[:, :100], cache=ca), b(x[:, :100], cache=cb))]
        for t in range(100, 110):
            outs.append((a(x[:, t:t + 1], cache=ca), b(x[:, t:t + 1], cache=cb)))
        assert all(rel(o_b, o_a) < 1e-5 for o_a, o_b in outs)
    b.train()
    loss = b(x[:, :64]).float().logsumexp(-1).mean()
    loss.backward()
    layers = att.projection_groups()[1][0]                                   # the main compressor's (the
    assert all(l.weight.grad is not None and l.weight.grad.abs().sum() > 0 for l in layers[:2])  # indexer's: no loss)
    # moving the weights unpacks: the groups then run layer by layer, with the same outputs
    y = torch.randn(3, 64, dtype=torch.float64)
    with torch.no_grad():
        packed = linears(y.float(), layers, fp32=True)
        b.to(torch.float64)
        assert packed_weight(layers) is None
        alone = linears(y, layers, fp32=True)
    assert all(torch.allclose(p.double(), q, atol=1e-5) for p, q in zip(packed, alone))


# ----------------------------------------------------------------------------- FP8 compressed entries
def kv8_config():
    # head_dim − rope dims must be a multiple of the 64-wide scale blocks: 128 − 64
    import dataclasses
    return dataclasses.replace(preset("tiny"), head_dim=128, qk_rope_head_dim=64, index_head_dim=64)


def _cached_logits(model, ids, cache, n_prefill):
    with torch.no_grad():
        outs = [model(ids[:, :n_prefill], cache=cache)]
        outs += [model(ids[:, t:t + 1], cache=cache) for t in range(n_prefill, ids.shape[1])]
    return torch.cat(outs, 1)


def test_kv8_rows_round_through_e4m3_with_power_of_two_scales():
    # against an independent float64 rounding: every finite e4m3 value enumerated, the nearest taken (a tie,
    # common with bf16 inputs, to the even code, as round-to-nearest-even)
    from dsv4 import ops
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(3, 4, 512, generator=g) * torch.logspace(-6, 3, 4).view(1, 4, 1)).to(dtype)
        x[0, 0, :64] = 0                                          # an all-zero block: the 1e-4 amax floor
        got = ops.kv8_dequant(ops.kv8_quant(x, 64), 512, 64, dtype)
        assert got.dtype == dtype and torch.equal(got[..., 448:], x[..., 448:])   # rope dims kept as they are
        codes = torch.arange(256)
        grid = codes.to(torch.uint8).view(torch.float8_e4m3fn).double()
        keep = torch.isfinite(grid) & (codes != 0x80)                       # finite, one zero
        grid, odd = grid[keep], (codes[keep] & 1).double()
        blocks = x[..., :448].double().unflatten(-1, (7, 64))
        scale = torch.exp2(torch.ceil(torch.log2(blocks.abs().amax(-1, keepdim=True).clamp_min(1e-4) / 448)))
        dist = ((blocks / scale).unsqueeze(-1) - grid).abs()
        near = grid[(dist + 1e-9 * odd * (dist == dist.amin(-1, keepdim=True))).argmin(-1)]
        want = (near * scale).flatten(-2)
        assert torch.equal(got[..., :448].double(), want)
        assert ops.kv8_quant(x, 64).shape[-1] == 448 + 16 + (64 * x.element_size() if dtype == torch.float32 else 128)


def test_kv_fp8_cache_is_the_official_kv_quantisation():
    # a cache whose compressed entries are FP8 rows gives, through prefill and decode, exactly the logits of
    # the plain cache with every attention read of the entries quantised-dequantised (the official QAT
    # simulation made storage); it holds the bytes `cache_bytes` says, fewer than the plain one's
    from dsv4 import ops
    cfg = kv8_config()
    model = random_model(cfg, seed=2)
    ids = torch.randint(0, cfg.vocab_size, (2, 150), generator=torch.Generator().manual_seed(0))
    plain = _cached_logits(model, ids, DecodeCache(cfg, 2, 160), 130)
    fp8_cache = DecodeCache(cfg, 2, 160, kv_fp8=True)
    got = _cached_logits(model, ids, fp8_cache, 130)
    assert fp8_cache.nbytes() == 2 * cache_bytes(cfg, 160, 4, kv_fp8=True)["total"]
    assert fp8_cache.nbytes() < DecodeCache(cfg, 2, 160).nbytes()
    real = ops.sparse_attention.impls["torch"]

    def simulated(q, kv, idx, sink, scale, kv2=None, rows2=None, return_lse=False, rows1=None):
        assert not isinstance(kv2, ops.KV8)
        if kv2 is not None:
            kv2 = ops.kv8_dequant(ops.kv8_quant(kv2, cfg.qk_rope_head_dim), kv2.shape[-1], cfg.qk_rope_head_dim,
                                  kv2.dtype)
        return real(q, kv, idx, sink, scale, kv2, rows2, return_lse, rows1)

    try:
        ops.set_backend("torch")
        ops.sparse_attention.impls["torch"], ops.sparse_attention._fns = simulated, {}
        want = _cached_logits(model, ids, DecodeCache(cfg, 2, 160), 130)
    finally:
        ops.sparse_attention.impls["torch"], ops.sparse_attention._fns = real, {}
        ops.set_backend(None)
    assert rel(got, want) < 1e-6
    # FP8 rounding (~2% rms per entry value) moves the logits a little (as a whole: a position where the
    # indexer's top-k flips moves more)
    assert 1e-4 < float((got - plain).norm() / plain.norm()) < 5e-2
    # the first compressed layer's entries (its input saw no FP8 entry yet) are those of the plain cache, rounded
    first = next(i for i in range(cfg.num_hidden_layers) if cfg.layer_ratio(i))
    c8 = fp8_cache.layers[first].comp
    ref = DecodeCache(cfg, 2, 160)
    _cached_logits(model, ids, ref, 130)
    e = ref.layers[first].comp.entries
    assert torch.equal(c8.attention_keys(cfg.head_dim).dequant(),
                       ops.kv8_dequant(ops.kv8_quant(e, cfg.qk_rope_head_dim), cfg.head_dim, cfg.qk_rope_head_dim,
                                       e.dtype))


def test_kv_fp8_cache_refuses_shapes_it_cannot_hold():
    with pytest.raises(ValueError, match="multiple of 64"):
        DecodeCache(preset("tiny"), 1, 64, kv_fp8=True)          # head_dim 64 − 16 rope dims = 48
    with pytest.raises(ValueError, match="float64"):
        DecodeCache(kv8_config(), 1, 64, dtype=torch.float64, kv_fp8=True)


@torch.no_grad()
def test_block_boundaries_fused_or_not_give_the_same_logits(monkeypatch):
    # model.FUSE_POST_PRE hands each block's last hc_post to the next block (`carry`, `hold`) and runs
    # every boundary as ops.hc_post_pre; with the twins that is the same ops in the same order: the logits
    # of a full forward, a cached prefill and decode steps equal the unfused model's bit for bit
    from dsv4 import model as model_module
    from dsv4 import ops
    calls = []
    fused = ops.hc_post_pre
    monkeypatch.setattr(ops, "hc_post_pre", lambda *a, **k: calls.append(1) or fused(*a, **k))
    model = random_model("tiny", seed=5)
    L = len(model.layers)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    runs = []
    for fuse in (False, True):
        monkeypatch.setattr(model_module, "FUSE_POST_PRE", fuse)
        cache = DecodeCache(model.config, 2, 32)
        steps = [model(ids[:, :20], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(20, 24)]
        runs.append((model(ids), torch.cat(steps, 1)))
        # every boundary but the last one of the model fused (2 a block, less 1), in each of the 6 calls
        assert len(calls) == (6 * (2 * L - 1) if fuse else 0)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    calls.clear()
    with torch.enable_grad():     # with autograd no block hands its last hc_post on: the blocks' own only
        assert torch.equal(model(ids), runs[0][0]) and len(calls) == L
