"""Engine invariants: greedy == argmax chain of full forwards; continuous batching and chunked prefill
change nothing; speculative greedy == plain greedy across compression boundaries, and a rejected draft
costs no main-model call beyond the verify call; stop rules and UTF-8-safe streaming; seeded sampling
independent of the batch; refusals before any work; and `dsv4 generate` == transformers' greedy
`generate` on a checkpoint transformers wrote."""
from __future__ import annotations

import pytest
import torch

from dsv4.config import preset
from dsv4.engine import (Engine, EngineOverloaded, PromptTooLong, Request, RequestError, TextStream, ThinkSplit,
                         generate)
from dsv4.tokenizer import DEFAULT_TRAIN_SPECIAL_TOKENS, train_bpe

from conftest import Scripted, random_hf_model, random_model

EOS = 1


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", seed=1)


@pytest.fixture(scope="module")
def tok():
    """Byte-level tokenizer (one id per byte, 271 ids), small enough for the tiny model's 512."""
    return train_bpe([], vocab_size=len(DEFAULT_TRAIN_SPECIAL_TOKENS) + 256)


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 512, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def argmax_chain(model, ids, n):
    """Greedy continuation by full forwards (no cache), stopping after EOS."""
    ids, out = list(ids), []
    for _ in range(n):
        t = int(model(torch.tensor([ids]))[0, -1].argmax())
        out.append(t)
        ids.append(t)
        if t == EOS:
            break
    return out


# ----------------------------------------------------------------------------- greedy and batching
def test_greedy_equals_argmax_chain_of_full_forwards(model):
    ps = prompts([9, 131])
    got = Engine(model, max_batch=2, max_len=160).generate(ps, max_tokens=14)
    for p, r in zip(ps, got):
        assert r.token_ids == argmax_chain(model, p, 14)
        assert r.finish_reason in ("length", "stop") and r.prompt_ids == p


def test_continuous_batching_and_chunked_prefill_change_nothing(model):
    ps = prompts([3, 40, 127, 9, 70, 130], seed=1)
    alone = [Engine(model, max_batch=1, max_len=160, prefill_chunk=1024).generate([p], max_tokens=12, logprobs=0)[0]
             for p in ps]
    # 3 rows for 6 prompts: requests join and leave between steps; 13-token prefill budget per step
    eng = Engine(model, max_batch=3, max_len=160, prefill_chunk=13)
    both = eng.generate(ps, max_tokens=12, logprobs=0)
    for a, b in zip(alone, both):
        assert a.token_ids == b.token_ids
        assert [x.logprob for x in a.logprobs] == pytest.approx([x.logprob for x in b.logprobs], abs=1e-4)
    assert eng.num_running == 0 and eng.free_rows == [0, 1, 2]
    assert eng.stats["prefill_tokens"] == sum(map(len, ps))


def test_logprobs_are_the_models_log_softmax(model):
    p = prompts([20], seed=2)[0]
    r = Engine(model, max_batch=1, max_len=64).generate([p], max_tokens=5, logprobs=3)[0]
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([p + r.token_ids]))[0], -1)
    for k, (t, lp) in enumerate(zip(r.token_ids, r.logprobs)):
        ref = full[len(p) - 1 + k]
        assert lp.token_id == t and lp.logprob == pytest.approx(float(ref[t]), abs=1e-4)
        assert [i for i, _ in lp.top] == ref.topk(3).indices.tolist()


# ----------------------------------------------------------------------------- speculative decoding
def oracle_drafts(engine, refs, every=3):
    """Make the MTP block's draft the true greedy token for 2 of every 3 positions (the tiny random
    model's own MTP block almost never guesses right), so that both accepted and rejected drafts occur."""
    model = engine.model
    real = model.mtp_logits

    def mtp_logits(h, next_ids, **kw):
        out = real(h, next_ids, **kw)
        for j, row in enumerate(kw["rows"].tolist()):
            seq = engine.running[row]
            k = len(seq.ids) - seq.n_prompt        # index of the token the draft predicts
            ref = refs[tuple(seq.ids[:seq.n_prompt])]
            if 0 < k < len(ref) and (k + row) % every:
                out[j, -1] = -1e4
                out[j, -1, ref[k]] = 1e4
        return out

    model.mtp_logits = mtp_logits
    return lambda: delattr(model, "mtp_logits")


def test_speculative_greedy_equals_plain_greedy(model):
    # prompts end around the 128-token HCA boundary; 24 new tokens cross many 4-token CSA boundaries
    ps = prompts(range(125, 136), seed=3)
    plain = Engine(model, max_batch=4, max_len=170).generate(ps, max_tokens=24)
    assert plain[0].token_ids == argmax_chain(model, ps[0], 24)
    refs = {tuple(p): r.token_ids for p, r in zip(ps, plain)}

    own = Engine(model, max_batch=4, max_len=170, speculative=True)
    assert [r.token_ids for r in own.generate(ps, max_tokens=24)] == [r.token_ids for r in plain]
    assert 0.0 <= own.acceptance_rate <= 1.0

    eng = Engine(model, max_batch=4, max_len=170, prefill_chunk=50, speculative=True)
    undo = oracle_drafts(eng, refs)
    try:
        spec = eng.generate(ps, max_tokens=24)
    finally:
        undo()
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert 0.4 < eng.acceptance_rate < 0.9, eng.stats          # both paths were taken
    assert all(0 < r.accepted < r.drafted for r in spec)
    assert eng.stats["generated_tokens"] == sum(len(r.token_ids) for r in spec)
    assert int(eng.cache.mtp_lengths.max()) <= eng.max_len


def count_main_calls(model):
    """Record the number of positions of every main-model call; returns (list, undo)."""
    calls, real, real_step = [], model.forward, model.decode_step

    def forward(ids, **kw):
        calls.append(ids.shape[1])
        return real(ids, **kw)

    def decode_step(ids, cache, rows):   # plain decode steps (the graph-capturable one-token step)
        calls.append(ids.shape[1])
        return real_step(ids, cache, rows)

    model.forward, model.decode_step = forward, decode_step

    def undo():
        del model.forward, model.decode_step
    return calls, undo


def test_a_rejected_draft_costs_no_extra_main_model_call(model):
    # the prefill, then one verify call of [last, draft] per draft and nothing else (a rejection rolls
    # the cache back instead of feeding `last` again)
    p = prompts([20], seed=8)[0]
    plain = Engine(model, max_batch=1, max_len=64).generate([p], max_tokens=30, ignore_eos=True)[0]
    eng = Engine(model, max_batch=1, max_len=64, speculative=True)
    undo_drafts = oracle_drafts(eng, {tuple(p): plain.token_ids})
    calls, undo_count = count_main_calls(model)
    try:
        spec = eng.generate([p], max_tokens=30, ignore_eos=True)[0]
    finally:
        undo_count()
        undo_drafts()
    assert spec.token_ids == plain.token_ids
    assert 0 < spec.accepted < spec.drafted
    assert calls == [20] + [2] * spec.drafted and eng.stats["refeeds"] == 0

    # also where a rejected draft's position completes a 128-token HCA window after the kept token
    # (prompt 126: the first verify call feeds positions 126 and 127, one row at one position, so the
    # compressor's window-parallel path): the rollback keeps position 126, nothing is fed again
    p = prompts([126], seed=9)[0]
    plain = Engine(model, max_batch=1, max_len=160).generate([p], max_tokens=9, ignore_eos=True)[0]
    eng = Engine(model, max_batch=1, max_len=160, speculative=True)
    calls, undo_count = count_main_calls(model)
    try:
        spec = eng.generate([p], max_tokens=9, ignore_eos=True)[0]
    finally:
        undo_count()
    assert spec.token_ids == plain.token_ids and spec.accepted == 0          # the random MTP block misses
    assert spec.drafted == 7 and eng.stats["drafted"] == 7
    assert calls == [126] + [2] * 7 + [1] and eng.stats["refeeds"] == 0   # the last token: no room to draft


def test_speculative_sampling_is_seeded_and_needs_mtp(model):
    ps = prompts([30, 7], seed=4)
    a = Engine(model, max_batch=2, max_len=64, speculative=True).generate(ps, max_tokens=10, temperature=0.8, seed=3)
    b = Engine(model, max_batch=2, max_len=64, speculative=True).generate(ps, max_tokens=10, temperature=0.8, seed=3)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert all(r.drafted > 0 for r in a)
    no_mtp = random_model(preset("tiny").with_(num_nextn_predict_layers=0), seed=1)
    with pytest.raises(ValueError, match="MTP"):
        Engine(no_mtp, speculative=True)


# ----------------------------------------------------------------------------- sampling
def test_speculative_sampling_rule_draws_from_the_target_distribution():
    from dsv4.sampling import draft, probabilities, verify_draft

    g = torch.Generator().manual_seed(0)
    target, drafter = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5]), torch.tensor([0.0, 2.0, 1.0, -1.0, 0.0])
    p = probabilities(target, 0.9, 4, 0.95)
    for point_mass in (False, True):
        counts, n = torch.zeros(5), 6000
        for _ in range(n):
            tok, q = draft(drafter, 0.9, 4, 0.95, g)
            if point_mass:
                tok, q = int(drafter.argmax()), None
            counts[verify_draft(target, tok, q, 0.9, 4, 0.95, g)[0]] += 1
        assert (counts / n - p).abs().max() < 0.025, (counts / n, p)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(model):
    p = prompts([17], seed=5)[0]
    kw = dict(max_tokens=16, temperature=1.0, top_p=0.9, top_k=100)
    alone = Engine(model, max_batch=1, max_len=64).generate([Request(p, seed=7, **kw)])[0]
    eng = Engine(model, max_batch=3, max_len=64)
    others = [Request(q, seed=i, **kw) for i, q in enumerate(prompts([5, 30, 11, 3], seed=6))]
    mixed = eng.generate(others[:2] + [Request(p, seed=7, **kw)] + others[2:])
    assert mixed[2].token_ids == alone.token_ids
    other_seed = Engine(model, max_batch=1, max_len=64).generate([Request(p, seed=8, **kw)])[0]
    assert other_seed.token_ids != alone.token_ids
    greedy = Engine(model, max_batch=1, max_len=64).generate([p], max_tokens=16)[0]
    assert alone.token_ids != greedy.token_ids


def test_top_k_1_is_greedy(model):
    ps = prompts([12, 50], seed=7)
    greedy = generate(model, ps, max_tokens=10)
    topk1 = generate(model, ps, max_tokens=10, temperature=1.5, top_k=1, seed=1)
    assert [r.token_ids for r in topk1] == [r.token_ids for r in greedy]


# ----------------------------------------------------------------------------- refusals
def test_requests_that_cannot_fit_are_refused_before_any_work(model, tok):
    eng = Engine(model, tok, max_batch=1, max_len=64, max_queue=1)
    with pytest.raises(PromptTooLong, match=r"prompt \(60 tokens\) plus max_tokens \(10\).*context of 64"):
        eng.add(Request(prompts([60])[0], max_tokens=10))
    with pytest.raises(PromptTooLong):
        eng.generate([[5] * 10, [5] * 63], max_tokens=2)   # the whole batch is refused up front
    assert eng.stats["steps"] == 0 and not eng.has_work()
    for bad, match in [(dict(prompt=[]), "empty"), (dict(prompt=[3, 512]), r"\[0, 512\)"),
                       (dict(prompt=[3], top_p=0.0), "top_p"), (dict(prompt=[3], temperature=-1.0), "temperature"),
                       (dict(prompt=[3], max_tokens=0), "max_tokens"), (dict(prompt=[3], logprobs=99), "logprobs"),
                       (dict(prompt="hi", stop="x"), "list of strings")]:
        with pytest.raises(RequestError, match=match):
            eng.add(Request(**{"max_tokens": 2, **bad}))
    eng.add(Request([3, 4], max_tokens=2))
    with pytest.raises(EngineOverloaded, match="queue is full"):
        eng.add(Request([3, 4], max_tokens=2))


def test_cancel_frees_the_row(model):
    eng = Engine(model, max_batch=2, max_len=200)
    rid = eng.add(Request(prompts([10])[0], max_tokens=150, ignore_eos=True))
    for _ in range(3):
        eng.step()
    assert eng.num_running == 1
    eng.cancel(rid)
    outs = eng.step()
    assert outs[-1].finish_reason == "cancelled" and 0 < len(outs[-1].result.token_ids) < 150
    assert eng.num_running == 0 and eng.free_rows == [0, 1]


# ----------------------------------------------------------------------------- text: stops and streaming
def run_stream(engine, req):
    deltas = []
    engine.add(req, lambda out: deltas.append(out))
    while engine.has_work():
        engine.step()
    return [d.text for d in deltas], deltas[-1].result


def test_stop_strings_and_utf8_safe_streaming(tok):
    text = "Hé 🙂 wörld! STOP 漢字"
    prompt = tok.encode("Q:", add_bos=True)
    eng = Engine(Scripted(prompt + tok.encode(text)), tok, max_batch=2, max_len=128)

    deltas, res = run_stream(eng, Request(prompt, max_tokens=100, stop=["STOP", "never"]))
    assert res.text == "Hé 🙂 wörld! " and "".join(deltas) == res.text and res.finish_reason == "stop"
    assert not any("\ufffd" in d for d in deltas) and sum(map(bool, deltas)) > 5
    assert len(res.token_ids) == len(tok.encode("Hé 🙂 wörld! STOP"))       # stopped at the match

    deltas, res = run_stream(eng, Request(prompt, max_tokens=100))             # ends at EOS
    assert res.text == text and "".join(deltas) == text and res.finish_reason == "stop"
    assert res.token_ids[-1] == EOS and not any("\ufffd" in d for d in deltas)

    deltas, res = run_stream(eng, Request(prompt, max_tokens=100, stop=["STOP 漢X"]))  # a prefix that never completes
    assert res.text == text and "".join(deltas) == text

    deltas, res = run_stream(eng, Request(prompt, max_tokens=5))               # mid-emoji: the tail is U+FFFD
    assert res.finish_reason == "length" and res.text == tok.decode(tok.encode(text)[:5])
    assert "".join(deltas) == res.text and res.text.endswith("\ufffd")

    deltas, res = run_stream(eng, Request(prompt, max_tokens=100, stop_token_ids=[tok.encode("!")[0]]))
    assert res.text == "Hé 🙂 wörld" and res.finish_reason == "stop"


def test_a_failing_forward_ends_the_running_requests_and_the_engine_goes_on(tok):
    prompt = tok.encode("Q:", add_bos=True)
    model = Scripted(prompt + tok.encode("fine"))
    eng = Engine(model, tok, max_batch=2, max_len=64)
    model.fail = True
    res = eng.generate([prompt, prompt], max_tokens=4)
    assert [r.finish_reason for r in res] == ["error", "error"] and "boom" in res[0].error
    model.fail = False
    assert eng.generate([prompt], max_tokens=4)[0].text == "fine"


def test_text_stream_holds_back_stop_prefixes():
    class Chars:  # one id per character
        def decode(self, ids, skip_special=False):
            return "".join(map(chr, ids))

    s = TextStream(Chars(), stop=["abc", "bd"])
    got = [s.push(ord(c))[0] for c in "xab"]
    assert got == ["x", "", ""]                 # "ab" may start "abc", "b" may start "bd"
    assert s.push(ord("x")) == ("abx", False)
    assert s.push(ord("b")) == ("", False) and s.push(ord("d")) == ("", True) and s.text == "xabx"


def test_think_split_routes_reasoning_and_answer():
    split = ThinkSplit(thinking=True)
    pieces = [split.push(p) for p in ["I think", " so</th", "ink>Yes", "."]]
    assert pieces == [("I think", ""), (" so", ""), ("", "Yes"), ("", ".")]
    assert ThinkSplit(thinking=False).push("</think>a") == ("", "</think>a")


# ----------------------------------------------------------------------------- CLI vs transformers
def test_cli_generate_equals_transformers_greedy(tmp_path, tok, capsys):
    pytest.importorskip("dsv4.checkpoint")
    from dsv4.cli import main

    hf = random_hf_model(preset("tiny"), seed=4)
    hf.save_pretrained(tmp_path)
    tok.save(tmp_path)
    prompt = tok.encode("The quick brown fox jumps over the lazy dog. " * 3, add_bos=True)   # 136 tokens
    n = 24
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=EOS)
    want = out[0, len(prompt):].tolist()
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path), "--prompt-ids", ",".join(map(str, prompt)),
                 "--max-new-tokens", str(n), "--ignore-eos", "--print-ids", "--device", "cpu"]) == 0
    got = [int(x) for x in capsys.readouterr().out.split()]
    assert got == want


# ----------------------------------------------------------------------------- admission, processors
def test_admission_failures_end_only_their_request_and_return_the_row(model, monkeypatch):
    import dsv4.engine as E

    eng = Engine(model, max_batch=2, max_len=64)
    for seed in (2 ** 64, -2 ** 63 - 1, 1.5, True):
        with pytest.raises(RequestError, match="seed"):
            eng.add(Request([3, 4], max_tokens=2, temperature=1.0, seed=seed))
    real = E.make_generator
    monkeypatch.setattr(E, "make_generator", lambda seed, device: real(seed, device) if seed != 13 else 1 / 0)
    ps = prompts([5, 9, 7, 6], seed=10)
    reqs = [Request(ps[0], max_tokens=6, temperature=1.0, seed=1), Request(ps[1], max_tokens=6, temperature=1.0,
                                                                           seed=13),
            Request(ps[2], max_tokens=6, temperature=1.0, seed=13), Request(ps[3], max_tokens=6, temperature=1.0,
                                                                            seed=2)]
    res = eng.generate(reqs)                      # returns (the failed ones do not hang it)
    assert [r.finish_reason for r in res] == ["length", "error", "error", "length"]
    assert "ZeroDivisionError" in res[1].error and res[1].token_ids == []
    alone = Engine(model, max_batch=1, max_len=64).generate([reqs[3]])[0]
    assert res[3].token_ids == alone.token_ids
    assert eng.free_rows == [0, 1] and eng.num_running == 0 and eng.check() == []


@torch.no_grad()
def penalized_chain(model, prompt, n, presence=0.0, frequency=0.0, repetition=1.0, bias=None):
    """Reference: argmax of full-forward logits (float64) after the penalty formulas, no EOS stop."""
    ids, out = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1].double()
        for t, b in (bias or {}).items():
            logits[t] += b
        for t in set(ids):
            logits[t] = logits[t] / repetition if logits[t] > 0 else logits[t] * repetition
        for t in set(out):
            logits[t] -= presence + frequency * out.count(t)
        t = int(logits.argmax())
        out.append(t)
        ids.append(t)
    return out


def test_penalties_and_logit_bias_follow_their_formulas(model):
    p = prompts([11], seed=12)[0]        # its greedy chain repeats tokens of the prompt and of itself
    cases = [dict(repetition_penalty=1.8), dict(presence_penalty=1.5),
             dict(presence_penalty=-0.5, frequency_penalty=1.0, repetition_penalty=1.2, logit_bias={7: 3.0, 9: -50.0})]
    plain = penalized_chain(model, p, 10)
    eng = Engine(model, max_batch=1, max_len=64)
    for kw in cases:
        got = eng.generate([p], max_tokens=10, ignore_eos=True, **kw)[0]
        want = penalized_chain(model, p, 10, kw.get("presence_penalty", 0.0), kw.get("frequency_penalty", 0.0),
                               kw.get("repetition_penalty", 1.0), kw.get("logit_bias"))
        assert got.token_ids == want, kw
        assert want != plain, kw
    for bad, match in [(dict(repetition_penalty=0.0), "repetition_penalty"), (dict(presence_penalty=3.0), "presence"),
                       (dict(logit_bias={512: 1.0}), "logit_bias keys"),
                       (dict(logit_bias={3: float("nan")}), "logit_bias values")]:
        with pytest.raises(RequestError, match=match):
            eng.add(Request(p, max_tokens=2, **bad))


def test_forced_tokens_and_a_failing_processor(model):
    from dsv4.constraints import ForcedTokens

    p = prompts([9], seed=12)[0]
    plain = Engine(model, max_batch=1, max_len=64).generate([p], max_tokens=8, ignore_eos=True)[0].token_ids
    trigger = plain[2]
    req = Request(p, max_tokens=8, ignore_eos=True, processors=[ForcedTokens([5, 6, 7], after=trigger)])
    eng = Engine(model, max_batch=2, max_len=64, speculative=True)   # processors decode without speculation
    got = eng.generate([req])[0]
    assert got.token_ids[:6] == plain[:3] + [5, 6, 7] and got.drafted == 0

    def broken(generated, logits):
        return logits.fill_(float("-inf"))

    res = eng.generate([Request(p, max_tokens=4, processors=[broken]), Request(p, max_tokens=4)])
    assert res[0].finish_reason == "error" and "no token possible" in res[0].error
    assert res[1].token_ids == plain[:4] and eng.free_rows == [0, 1]


# ----------------------------------------------------------------------------- prefix caching
def test_prefix_cache_gives_the_outputs_of_an_uncached_run(model):
    from dsv4.prefix_cache import prefix_block

    assert prefix_block(model.config) == 128                  # lcm of the tiny preset's ratios (4, 128)
    g = torch.Generator().manual_seed(13)
    base = torch.randint(2, 512, (262,), generator=g).tolist()
    branch = base[:258] + torch.randint(2, 512, (9,), generator=g).tolist()
    for spec, order, cached in ((False, [base, branch, base, base[:100]], [0, 256, 256, 0]),
                                (True, [base, branch], [0, 256])):
        ref = Engine(model, max_batch=1, max_len=300, speculative=spec)
        want = [ref.generate([p], max_tokens=6, ignore_eos=True, logprobs=5)[0] for p in order]
        eng = Engine(model, max_batch=2, max_len=300, prefix_cache_bytes=64 << 20, speculative=spec, prefill_chunk=90)
        got = [eng.generate([p], max_tokens=6, ignore_eos=True, logprobs=5)[0] for p in order]
        assert [r.cached_tokens for r in got] == cached
        for a, b in zip(want, got):   # logits: the chosen tokens' log-probs and the top 5, ids and values
            assert a.token_ids == b.token_ids
            assert [x.logprob for x in a.logprobs] == pytest.approx([x.logprob for x in b.logprobs], abs=1e-5)
            for x, y in zip(a.logprobs, b.logprobs):
                assert [i for i, _ in x.top] == [i for i, _ in y.top]
                assert [v for _, v in x.top] == pytest.approx([v for _, v in y.top], abs=1e-5)
        assert eng.stats["prefill_tokens"] == sum(len(p) for p in order) - sum(cached)
    # a shared system prompt (140 tokens): the second request leaves a snapshot at the boundary the
    # first one shared with it (128), the third starts there
    tails = [torch.randint(2, 512, (130,), generator=g).tolist() for _ in range(3)]
    shared = [base[:140] + t for t in tails]
    ref = Engine(model, max_batch=1, max_len=300)
    eng = Engine(model, max_batch=1, max_len=300, prefix_cache_bytes=64 << 20)
    got = [eng.generate([p], max_tokens=3, logprobs=0)[0] for p in shared]
    assert [r.cached_tokens for r in got] == [0, 0, 128]
    for p, r in zip(shared, got):
        want = ref.generate([p], max_tokens=3, logprobs=0)[0]
        assert r.token_ids == want.token_ids
        assert [x.logprob for x in r.logprobs] == pytest.approx([x.logprob for x in want.logprobs], abs=1e-5)
    # the byte bound: room for one snapshot keeps only the most recent one
    size = eng.cache.row_state_bytes(next(iter(eng.prefix_cache.entries.values()))[0])
    small = Engine(model, max_batch=1, max_len=300, prefix_cache_bytes=size + 1)
    small.generate([base[:130], [7] * 130], max_tokens=1)
    assert len(small.prefix_cache) == 1 and small.prefix_cache.stats["evicted"] == 1
    assert small.prefix_cache.bytes <= size + 1


def test_control_tokens_are_hidden_unless_asked(tok):
    prompt = tok.encode("Q:", add_bos=True)
    user, pad = tok.token_to_id("<｜User｜>"), tok.token_to_id("<｜▁pad▁｜>")
    think = tok.token_to_id("</think>")
    reply = tok.encode("x") + [user, pad] + tok.encode("y") + [think] + tok.encode("z")
    eng = Engine(Scripted(prompt + reply), tok, max_batch=1, max_len=64)
    deltas, res = run_stream(eng, Request(prompt, max_tokens=20))
    assert res.text == "".join(deltas) == "xy</think>z" and res.token_ids[:-1] == reply
    deltas, res = run_stream(eng, Request(prompt, max_tokens=20, skip_special_tokens=False))
    assert res.text == "".join(deltas) == tok.decode(reply)


def test_fp8_entries_through_batching_chunks_speculation_and_the_prefix_cache():
    # an engine whose cache keeps the compressed entries as FP8 rows: continuous batching, 13-token
    # prefill chunks, MTP speculation and prefix-cache snapshots give what one request at a time gives
    from test_model import kv8_config

    m = random_model(kv8_config(), seed=1)
    g = torch.Generator().manual_seed(5)
    base = torch.randint(2, 512, (140,), generator=g).tolist()
    ps = [base, base[:131] + [9, 8, 7], torch.randint(2, 512, (40,), generator=g).tolist(), base]
    ref = Engine(m, max_batch=1, max_len=200, kv_fp8=True)
    want = [ref.generate([p], max_tokens=8, ignore_eos=True, logprobs=0)[0] for p in ps]
    eng = Engine(m, max_batch=2, max_len=200, kv_fp8=True, prefill_chunk=13, speculative=True,
                 prefix_cache_bytes=64 << 20)
    got = eng.generate(ps[:3], max_tokens=8, ignore_eos=True, logprobs=0)
    got += eng.generate(ps[3:], max_tokens=8, ignore_eos=True, logprobs=0)
    assert eng.cache.layers[1].comp.entries.dtype == torch.uint8
    assert got[3].cached_tokens == 128                        # the repeated prompt starts from a snapshot
    for a, b in zip(want, got):
        assert a.token_ids == b.token_ids
        assert [x.logprob for x in a.logprobs] == pytest.approx([x.logprob for x in b.logprobs], abs=1e-5)
