"""The OpenAI-compatible server over real HTTP (uvicorn on 127.0.0.1, httpx): response schemas,
streaming == non-streaming, 50 concurrent requests equal to the greedy reference, 4xx errors with a
message, a disconnect that frees the cache row at once, 429 on overload; the hardening (out-of-range
seeds, admission failures, lone surrogates, a blocked event loop, body limits, timeouts, draining,
a wedged engine on /health); and what vLLM's server offers (API key, /metrics, /tokenize,
/detokenize, /version, /v1/models/{id}, n > 1, penalties and logit_bias, tool_choice, streamed
tool calls, response_format json_object, prefix caching, skip_special_tokens)."""
from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time

import httpx
import pytest
import torch

from dsv4.engine import Engine
from dsv4.server import create_app
from dsv4.tokenizer import DEFAULT_TRAIN_SPECIAL_TOKENS, DSML, encode_chat, parse_assistant, train_bpe
from dsv4.toolcalls import TOOL_CALLS_PREFIX

from conftest import Scripted, random_model

MODEL = "tiny-test"
EOS = 1
KEY = "sk-test-123"


class ServerThread:
    """uvicorn serving `app` from a thread, on a socket bound to a free port."""

    def __init__(self, app, **config):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        end = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < end and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", seed=1)


@pytest.fixture(scope="module")
def tok():
    return train_bpe([], vocab_size=len(DEFAULT_TRAIN_SPECIAL_TOKENS) + 256)


@pytest.fixture(scope="module")
def served(model, tok):
    engine = Engine(model, tok, max_batch=8, max_len=1024, max_queue=64, prefix_cache_bytes=64 << 20)
    with ServerThread(create_app(engine, MODEL)) as srv:
        srv.engine = engine
        yield srv


@torch.no_grad()
def greedy_ids(model, ids, n, bias=None):
    """Reference: argmax chain of full forwards (optionally with a logit bias), stopping at EOS (not included)."""
    ids, out = list(ids), []
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1].double()
        if bias:
            for t, b in bias.items():
                logits[t] += b
        t = int(logits.argmax())
        if t == EOS:
            break
        out.append(t)
        ids.append(t)
    return out


def greedy_text(model, tok, ids, n, keep_special=False):
    """The reference text: control tokens (BOS/EOS/PAD, turn markers) left out unless kept."""
    out = greedy_ids(model, ids, n)
    return tok.decode(out if keep_special else [t for t in out if t not in tok.control_ids])


def sse(response) -> list:
    """The `data:` payloads of a server-sent-event stream: JSON objects, then "[DONE]"."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            body = line[len("data: "):]
            events.append(body if body == "[DONE]" else json.loads(body))
        else:
            assert line == "", line
    return events


def check_usage(u: dict, completion_tokens: int | None = None):
    assert set(u) == {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"}
    assert set(u["prompt_tokens_details"]) == {"cached_tokens"}
    assert all(isinstance(v, int) for k, v in u.items() if k != "prompt_tokens_details")
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    if completion_tokens is not None:
        assert u["completion_tokens"] == completion_tokens


def check_envelope(body: dict, obj: str, prefix: str):
    assert body["object"] == obj and body["model"] == MODEL
    assert isinstance(body["id"], str) and body["id"].startswith(prefix)
    assert isinstance(body["created"], int) and abs(body["created"] - time.time()) < 600
    assert isinstance(body["choices"], list)


def check_error(r, status: int, match: str, param=None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and match in err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


def wait_until(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


# ----------------------------------------------------------------------------- schemas
def test_models_health_version(served):
    with httpx.Client(base_url=served.url) as c:
        models = c.get("/v1/models").json()
        assert models["object"] == "list" and models["data"][0]["id"] == MODEL
        assert models["data"][0]["object"] == "model"
        assert c.get(f"/v1/models/{MODEL}").json() == models["data"][0]
        check_error(c.get("/v1/models/gpt-4"), 404, "does not exist")
        h = c.get("/health")
        assert h.status_code == 200 and h.json()["status"] == "ok"
        from dsv4 import __version__
        assert c.get("/version").json() == {"version": __version__}


def test_completion_non_streaming_and_streaming(served, model, tok):
    req = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "logprobs": 2}
    with httpx.Client(base_url=served.url, timeout=60) as c:
        r = c.post("/v1/completions", json=req)
        assert r.status_code == 200, r.text
        body = r.json()
        check_envelope(body, "text_completion", "cmpl")
        (choice,) = body["choices"]
        assert set(choice) == {"index", "text", "finish_reason", "logprobs"} and choice["index"] == 0
        assert choice["finish_reason"] in ("stop", "length")
        assert choice["text"] == greedy_text(model, tok, tok.encode(req["prompt"], add_bos=True), 12)
        check_usage(body["usage"])
        assert body["usage"]["prompt_tokens"] == len(tok.encode(req["prompt"], add_bos=True))
        lp = choice["logprobs"]
        n = body["usage"]["completion_tokens"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
        assert all(v <= 0 for v in lp["token_logprobs"]) and all(len(t) <= 2 for t in lp["top_logprobs"])

        with c.stream("POST", "/v1/completions",
                      json={**req, "stream": True, "stream_options": {"include_usage": True}}) as s:
            assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
            events = sse(s)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    for ch in chunks:
        check_envelope(ch, "text_completion", "cmpl")
        assert ch["id"] == chunks[0]["id"] and set(ch["choices"][0]) == {"index", "text", "finish_reason", "logprobs"}
    assert [ch["choices"][0]["finish_reason"] for ch in chunks][-1] == choice["finish_reason"]
    assert all(ch["choices"][0]["finish_reason"] is None for ch in chunks[:-1])
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == choice["text"]
    assert sum(len(ch["choices"][0]["logprobs"]["tokens"]) for ch in chunks) == n
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == body["usage"]["completion_tokens"]


def test_chat_non_streaming_and_streaming(served, model, tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]
    for thinking in (False, True):
        req = {"model": MODEL, "messages": messages, "max_tokens": 10, "temperature": 0.0,
               "logprobs": True, "top_logprobs": 2, "chat_template_kwargs": {"thinking": thinking}}
        with httpx.Client(base_url=served.url, timeout=60) as c:
            r = c.post("/v1/chat/completions", json=req)
            assert r.status_code == 200, r.text
            body = r.json()
            with c.stream("POST", "/v1/chat/completions", json={**req, "stream": True}) as s:
                events = sse(s)
        check_envelope(body, "chat.completion", "chatcmpl")
        (choice,) = body["choices"]
        assert set(choice) == {"index", "message", "finish_reason", "logprobs"}
        msg = choice["message"]
        assert msg["role"] == "assistant" and isinstance(msg["content"], str)
        prompt = tok.encode(encode_chat(messages, thinking=thinking))
        text = greedy_text(model, tok, prompt, 10)
        if thinking:
            assert "reasoning_content" in msg
            head, sep, tail = text.partition("</think>")
            assert (msg["reasoning_content"], msg["content"]) == (head, tail)
        else:
            assert "reasoning_content" not in msg and msg["content"] == text
        assert len(choice["logprobs"]["content"]) == body["usage"]["completion_tokens"]
        entry = choice["logprobs"]["content"][0]
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and len(entry["top_logprobs"]) == 2

        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        for ch in chunks:
            check_envelope(ch, "chat.completion.chunk", "chatcmpl")
            assert set(ch["choices"][0]) == {"index", "delta", "finish_reason", "logprobs"}
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
        deltas = [ch["choices"][0]["delta"] for ch in chunks[1:]]
        assert "".join(d.get("content", "") for d in deltas) == msg["content"]
        assert "".join(d.get("reasoning_content", "") for d in deltas) == msg.get("reasoning_content", "")


# ----------------------------------------------------------------------------- load
def test_fifty_concurrent_requests_equal_the_greedy_reference(served, model, tok):
    prompts = [f"Request number {i}:" for i in range(50)]
    want = [greedy_text(model, tok, tok.encode(p, add_bos=True), 6) for p in prompts]

    async def one(client, i):
        body = {"prompt": prompts[i], "max_tokens": 6, "temperature": 0}
        if i % 2:  # half of them streamed
            text = ""
            async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        text += json.loads(line[6:])["choices"][0]["text"]
            return text
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    async def main():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=served.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(50)))

    assert asyncio.run(main()) == want
    # (a row is freed just after its last output is sent, so the last answer may arrive a moment before)
    wait_until(lambda: served.engine.num_running == 0 and served.engine.num_waiting == 0)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("path,body,status,match", [
    ("/v1/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/completions", {"prompt": "x", "frobnicate": 1}, 400, "frobnicate: unknown field"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n must be in [1, 16]"),
    ("/v1/completions", {"prompt": "x", "temperature": 7}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "logprobs": 9}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x" * 1100, "max_tokens": 1}, 400, "context of 1024"),
    ("/v1/completions", {"prompt": "x" * 40000, "max_tokens": 1}, 400, "context of 1024"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 5000}, 400, "context of 1024"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "does not exist"),
    ("/v1/completions", {"prompt": "x", "seed": 2 ** 64, "temperature": 1}, 400, "seed must be an integer in"),
    ("/v1/completions", {"prompt": "x", "seed": -2 ** 63 - 1, "temperature": 1}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"600": 1}}, 400, "logit_bias keys"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias values"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": [1, 2, 600]}, 400, "token ids"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, 400,
     "tool_choice needs tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "sometimes"}, 400,
     "tool_choice must be"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_schema", "json_schema": {}}}, 400, "json_schema"),
    ("/v1/nothing", {}, 404, "Not Found"),
])
def test_malformed_requests_get_4xx_with_a_message(served, path, body, status, match):
    with httpx.Client(base_url=served.url, timeout=30) as c:
        if isinstance(body, bytes):
            r = c.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = c.post(path, json=body)
    err = check_error(r, status, match)
    if "context of" in match:
        assert err["code"] == "context_length_exceeded"


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "a\ud800b"}),
    ("/v1/completions", {"prompt": "ok", "stop": ["\udfff"]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}),
    ("/tokenize", {"prompt": "x\udc00"}),
])
def test_lone_surrogates_get_400_in_the_openai_error_body(served, path, body):
    with httpx.Client(base_url=served.url, timeout=30) as c:
        r = c.post(path, content=json.dumps(body), headers={"content-type": "application/json"})  # "\\ud800"
        check_error(r, 400, "lone UTF-16 surrogate")
        assert c.get("/health").status_code == 200


def test_seed_at_the_limits_is_accepted_and_reproducible(served):
    with httpx.Client(base_url=served.url, timeout=60) as c:
        texts = []
        for seed in (2 ** 64 - 1, -2 ** 63, 2 ** 64 - 1):
            r = c.post("/v1/completions", json={"prompt": "seed", "max_tokens": 5, "temperature": 1.0, "seed": seed})
            assert r.status_code == 200, r.text
            texts.append(r.json()["choices"][0]["text"])
    assert texts[0] == texts[2]


def test_disconnect_mid_stream_frees_the_row(served):
    engine = served.engine
    body = {"prompt": "Tell me a long story", "max_tokens": 1000, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=served.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert engine.num_running == 1 and any(line.startswith("data: {") for line in got)
        wait_until(lambda: engine.num_running == 0)
        assert engine.stats["generated_tokens"] > 0
        r = c.post("/v1/completions", json={"prompt": "again", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200


def test_overload_gives_429_and_the_server_keeps_serving(model, tok):
    engine = Engine(model, tok, max_batch=1, max_len=2048, max_queue=1)
    long = {"prompt": "a", "max_tokens": 2000, "temperature": 0, "ignore_eos": True, "stream": True}
    with ServerThread(create_app(engine, MODEL)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=long) as first:       # takes the only row
            lines = first.iter_lines()   # (kept: a dropped iterator would close the stream)
            next(lines)
            queued = {}

            def post_b():
                with httpx.Client(base_url=srv.url, timeout=60) as c2:
                    queued["r"] = c2.post("/v1/completions", json={"prompt": "b", "max_tokens": 2})

            t = threading.Thread(target=post_b)
            t.start()                                                          # fills the queue
            wait_until(lambda: engine.num_waiting >= 1)
            r = c.post("/v1/completions", json={"prompt": "c", "max_tokens": 2})
            check_error(r, 429, "queue is full")
            assert r.headers.get("retry-after") == "1"
            r = c.post("/v1/completions", json={"prompt": "c", "max_tokens": 2, "n": 3})   # all or none
            check_error(r, 429, "queue is full")
            assert engine.num_waiting == 1
        t.join(30)                                                             # the stream closed: b runs
        assert queued["r"].status_code == 200
        assert c.get("/health").json()["status"] == "ok"
        metrics = c.get("/metrics").text
        assert 'dsv4:request_rejected_total{model_name="tiny-test",reason="queue_full"} 2' in metrics


# ----------------------------------------------------------------------------- hardening
def test_admission_failures_end_only_their_request_and_health_reports_a_wedged_engine(model, tok, monkeypatch):
    import dsv4.engine as E

    engine = Engine(model, tok, max_batch=2, max_len=256)
    real = E.make_generator

    def make_generator(seed, device):
        if seed == 13:
            raise RuntimeError("cannot seed")
        return real(seed, device)

    monkeypatch.setattr(E, "make_generator", make_generator)
    with ServerThread(create_app(engine, MODEL)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        long = {"prompt": "a", "max_tokens": 60, "temperature": 0, "ignore_eos": True, "stream": True}
        with c.stream("POST", "/v1/completions", json=long) as running:
            lines = running.iter_lines()
            next(lines)
            for _ in range(3):   # more failures than rows: none may keep a row
                r = c.post("/v1/completions", json={"prompt": "b", "max_tokens": 4, "temperature": 1, "seed": 13})
                check_error(r, 500, "cannot seed")
            events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] == "length"           # the running stream went on
        r = c.post("/v1/completions", json={"prompt": "c", "max_tokens": 3, "temperature": 1, "seed": 14, "n": 2})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2
        wait_until(lambda: engine.num_running == 0)
        assert sorted(engine.free_rows) == [0, 1] and c.get("/health").json()["status"] == "ok"

        engine.free_rows.pop()                 # a lost row, as a bug would leave it
        r = c.post("/v1/completions", json={"prompt": "d", "max_tokens": 2})
        assert r.status_code == 200
        h = c.get("/health")
        assert h.status_code == 503 and "wedged" in h.json()["status"] and "rows" in h.json()["status"]


def test_tokenizing_runs_off_the_event_loop(model, tok):
    """A slow tokenization (a huge prompt) must not stall /health or other clients."""
    engine = Engine(model, tok, max_batch=2, max_len=256)
    slow_tok = type(tok).__new__(type(tok))
    slow_tok.__dict__.update(tok.__dict__)
    real_encode = tok.encode

    def encode(text, add_bos=False):
        if "SLOW" in text:
            time.sleep(1.5)
        return real_encode(text, add_bos=add_bos)

    slow_tok.encode = encode
    engine.tokenizer = slow_tok
    with ServerThread(create_app(engine, MODEL)) as srv:
        done = {}

        def slow_request():
            with httpx.Client(base_url=srv.url, timeout=60) as c2:
                done["r"] = c2.post("/v1/chat/completions",
                                    json={"messages": [{"role": "user", "content": "SLOW"}], "max_tokens": 2})

        t = threading.Thread(target=slow_request)
        t.start()
        time.sleep(0.3)
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            t0 = time.monotonic()
            assert c.get("/health").status_code == 200
            r = c.post("/v1/completions", json={"prompt": [3, 4, 5], "max_tokens": 2})
            took = time.monotonic() - t0
        assert r.status_code == 200 and took < 0.8, took
        t.join(30)
        assert done["r"].status_code == 200


def test_request_body_limit_gives_413(model, tok):
    engine = Engine(model, tok, max_batch=1, max_len=256)
    with ServerThread(create_app(engine, MODEL, max_request_bytes=2000)) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        err = check_error(c.post("/v1/completions", json={"prompt": "x" * 3000}), 413, "--max-request-bytes")
        assert err["code"] == "request_too_large"

        def chunks():   # no Content-Length: counted while it is read
            for _ in range(10):
                yield b" " * 500
            yield b'{"prompt": "x"}'

        r = c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        check_error(r, 413, "larger than this server's limit of 2000 bytes")
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_request_timeout_cancels_and_frees_the_row(model, tok):
    engine = Engine(model, tok, max_batch=1, max_len=4096)
    long = {"prompt": "a", "max_tokens": 4000, "temperature": 0, "ignore_eos": True}
    with ServerThread(create_app(engine, MODEL, request_timeout=0.5)) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        t0 = time.monotonic()
        err = check_error(c.post("/v1/completions", json=long), 504, "request timeout (0.5 s)")
        assert err["code"] == "request_timeout" and time.monotonic() - t0 < 5
        wait_until(lambda: engine.num_running == 0)
        with c.stream("POST", "/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3000, "temperature": 0,
                            "ignore_eos": True, "stream": True}) as s:
            events = sse(s)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "request_timeout"
        wait_until(lambda: engine.num_running == 0)
        assert engine.free_rows == [0]


def test_shutdown_drains_then_cancels_after_the_drain_timeout(model, tok):
    engine = Engine(model, tok, max_batch=2, max_len=4096)
    srv = ServerThread(create_app(engine, MODEL), timeout_graceful_shutdown=3)
    with srv:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            short = {}

            def post_short():
                short["r"] = c.post("/v1/completions", json={"prompt": "b", "max_tokens": 8, "ignore_eos": True,
                                                             "temperature": 0})

            with c.stream("POST", "/v1/completions", json={"prompt": "a", "max_tokens": 4000, "ignore_eos": True,
                                                           "temperature": 0, "stream": True}) as s:
                lines = s.iter_lines()
                next(lines)
                t = threading.Thread(target=post_short)
                t.start()
                wait_until(lambda: engine.num_running == 2)
                t0 = time.monotonic()
                srv.server.should_exit = True          # what SIGTERM does
                t.join(30)
                rest = []
                with pytest.raises(httpx.RemoteProtocolError):   # cut off when the drain time is over
                    for line in lines:
                        rest.append(line)
                took = time.monotonic() - t0
        srv.thread.join(30)
        assert not srv.thread.is_alive()
    assert short["r"].status_code == 200 and len(short["r"].json()["choices"][0]["text"]) > 0   # drained
    assert 2.5 < took < 15, took                                             # the long one was cut at ~3 s
    assert not any('"finish_reason": "length"' in x for x in rest)
    wait_until(lambda: engine.num_running == 0)


# ----------------------------------------------------------------------------- vLLM's extras
def test_api_key(model, tok):
    engine = Engine(model, tok, max_batch=1, max_len=256)
    with ServerThread(create_app(engine, MODEL, api_key=KEY)) as srv, httpx.Client(base_url=srv.url) as c:
        body = {"prompt": "x", "max_tokens": 1}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic " + KEY}):
            r = c.post("/v1/completions", json=body, headers=headers)
            err = check_error(r, 401, "API key")
            assert err["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"
        check_error(c.get("/v1/models"), 401, "API key")
        check_error(c.post("/tokenize", json={"prompt": "x"}), 401, "API key")
        ok = {"Authorization": f"Bearer {KEY}"}
        assert c.post("/v1/completions", json=body, headers=ok).status_code == 200
        assert c.get("/v1/models", headers=ok).status_code == 200
        for open_path in ("/health", "/metrics", "/version"):
            assert c.get(open_path).status_code == 200


def parse_metrics(text: str) -> dict:
    """{(name, labels): value} from the Prometheus text format, checking HELP/TYPE lines."""
    out, typed = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("#") or not line:
            continue
        m = re.fullmatch(r'([a-zA-Z_:][\w:]*)\{([^}]*)\} (\S+)', line)
        assert m, line
        name, labels, value = m.groups()
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in typed or base in typed, line
        out[(name, labels)] = float(value)
    return out


def test_metrics_count_what_was_served(model, tok):
    engine = Engine(model, tok, max_batch=2, max_len=256, prefix_cache_bytes=8 << 20)
    with ServerThread(create_app(engine, MODEL)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        results = [c.post("/v1/completions", json={"prompt": f"metrics {i}", "max_tokens": 5, "ignore_eos": True,
                                                    "temperature": 0}).json() for i in range(3)]
        r = c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        m = parse_metrics(r.text)
    L = 'model_name="tiny-test"'
    generated = sum(x["usage"]["completion_tokens"] for x in results)
    prompt = sum(x["usage"]["prompt_tokens"] for x in results)
    assert m[("dsv4:generation_tokens_total", L)] == generated == 15
    assert m[("dsv4:prompt_tokens_total", L)] == prompt
    assert m[("dsv4:num_requests_running", L)] == 0 and m[("dsv4:num_requests_waiting", L)] == 0
    assert m[("dsv4:kv_cache_usage_perc", L)] == 0
    assert m[("dsv4:request_success_total", L + ',finished_reason="length"')] == 3
    assert m[("dsv4:generation_tokens_per_second", L)] > 0
    for name in ("dsv4:time_to_first_token_seconds", "dsv4:time_per_output_token_seconds",
                 "dsv4:e2e_request_latency_seconds"):
        buckets = [v for (n, lab), v in m.items() if n == name + "_bucket"]
        assert buckets == sorted(buckets) and buckets[-1] == m[(name + "_count", L)] == 3
        assert m[(name + "_sum", L)] > 0
    assert m[("dsv4:prefix_cache_queries_total", L)] == 3


def test_tokenize_and_detokenize(served, tok):
    messages = [{"role": "user", "content": "Hi there"}]
    with httpx.Client(base_url=served.url, timeout=30) as c:
        r = c.post("/tokenize", json={"prompt": "Hello world"}).json()
        assert r == {"count": len(tok.encode("Hello world")) + 1, "max_model_len": 1024,
                     "tokens": tok.encode("Hello world", add_bos=True)}
        assert c.post("/tokenize", json={"prompt": "Hello", "add_special_tokens": False}).json()["tokens"] == \
            tok.encode("Hello")
        r = c.post("/tokenize", json={"messages": messages, "chat_template_kwargs": {"thinking": True},
                                      "return_token_strs": True}).json()
        assert r["tokens"] == tok.encode(encode_chat(messages, thinking=True))
        assert r["token_strs"] == [tok.id_to_token(i) for i in r["tokens"]]
        ids = tok.encode("Round trip: é 🙂")
        assert c.post("/detokenize", json={"tokens": ids}).json() == {"prompt": "Round trip: é 🙂"}
        check_error(c.post("/detokenize", json={"tokens": [1, 99999]}), 400, "token ids", param="tokens")
        check_error(c.post("/tokenize", json={}), 400, "exactly one of prompt and messages")


def test_n_choices_equal_single_requests_with_consecutive_seeds(served):
    body = {"prompt": "Choices", "max_tokens": 6, "temperature": 1.0, "seed": 41, "logprobs": 0}
    with httpx.Client(base_url=served.url, timeout=60) as c:
        r = c.post("/v1/completions", json={**body, "n": 3}).json()
        singles = [c.post("/v1/completions", json={**body, "seed": 41 + i}).json()["choices"][0]["text"]
                   for i in range(3)]
        with c.stream("POST", "/v1/completions", json={**body, "n": 3, "stream": True,
                                                       "stream_options": {"include_usage": True}}) as s:
            events = sse(s)
        batch = c.post("/v1/completions", json={**body, "prompt": ["Choices", "Other"], "n": 2}).json()
        chat = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "n": 2,
                                                    "max_tokens": 4, "temperature": 0}).json()
    assert [ch["index"] for ch in r["choices"]] == [0, 1, 2]
    assert [ch["text"] for ch in r["choices"]] == singles
    assert len(set(singles)) > 1
    assert r["usage"]["prompt_tokens"] == len(tokens_of("Choices")) and r["usage"]["completion_tokens"] == 18
    streamed = ["", "", ""]
    for ev in events[:-2]:
        (ch,) = ev["choices"]
        streamed[ch["index"]] += ch["text"]
    assert streamed == singles and events[-2]["usage"] == r["usage"]
    assert [ch["index"] for ch in batch["choices"]] == [0, 1, 2, 3] and batch["choices"][0]["text"] == singles[0]
    assert batch["choices"][1]["text"] == singles[1]
    assert chat["choices"][0]["message"] == chat["choices"][1]["message"]    # greedy: the same twice


def tokens_of(text):
    return train_bpe([], vocab_size=len(DEFAULT_TRAIN_SPECIAL_TOKENS) + 256).encode(text, add_bos=True)


def test_logit_bias_and_penalties_follow_their_formulas(served, model, tok):
    prompt = tok.encode("Bias", add_bos=True)
    repeats = tok.encode("Penalties", add_bos=True)     # its greedy chain repeats a token
    bias = {"65": 8.5, "66": -100, "97": 4.0}
    with httpx.Client(base_url=served.url, timeout=60) as c:
        r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0, "logit_bias": bias,
                                            "skip_special_tokens": False})
        got = r.json()["choices"][0]["text"]
        r2 = c.post("/v1/completions", json={"prompt": repeats, "max_tokens": 12, "temperature": 0,
                                             "presence_penalty": 2, "frequency_penalty": 2, "ignore_eos": True,
                                             "logprobs": 0, "skip_special_tokens": False})
    want = greedy_ids(model, prompt, 8, {int(k): v for k, v in bias.items()})
    assert got == tok.decode(want) and 66 not in want
    toks = r2.json()["choices"][0]["logprobs"]["tokens"]
    # the reference: an argmax chain with logit -= 2·[seen] + 2·count over the generated tokens
    ref, counts = list(repeats), {}
    with torch.no_grad():
        for _ in range(12):
            logits = model(torch.tensor([ref]))[0, -1].double()
            for t, n in counts.items():
                logits[t] -= 2 + 2 * n
            t = int(logits.argmax())
            counts[t] = counts.get(t, 0) + 1
            ref.append(t)
    assert toks == [tok.decode([t]) for t in ref[len(repeats):]]
    plain = list(repeats)
    with torch.no_grad():
        for _ in range(12):
            plain.append(int(model(torch.tensor([plain]))[0, -1].argmax()))
    assert plain != ref                        # the penalties changed the greedy chain


# ----------------------------------------------------------------------------- tool calls
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
CALLS = [{"type": "function", "function": {"name": "get_weather",
                                           "arguments": json.dumps({"city": "Paris \"<x>\"\n", "days": 3})}},
         {"type": "function", "function": {"name": "add", "arguments": json.dumps({"a": [1, 2.5], "b": None})}}]


def scripted_server(tok, reply: str, messages, thinking=False, **kw):
    """A server whose model writes `reply` after the chat prompt of `messages` (then EOS)."""
    prompt = tok.encode(encode_chat(messages, thinking=thinking, tools=TOOLS))
    model = Scripted(prompt + tok.encode(reply))
    engine = Engine(model, tok, max_batch=2, max_len=2048)
    return ServerThread(create_app(engine, MODEL, **kw))


def test_tool_calls_parsed_streamed_and_never_in_content(tok):
    from dsv4.tokenizer import _render_tool_calls

    messages = [{"role": "user", "content": "Weather in Paris, and 1+2.5?"}]
    for thinking in (False, True):
        reply = ("Let me look.</think>" if thinking else "") + "Checking <b>two</b> things." + \
            _render_tool_calls(CALLS)
        want = parse_assistant(reply, thinking=thinking)
        req = {"messages": messages, "tools": TOOLS, "max_tokens": 400, "temperature": 0,
               "chat_template_kwargs": {"thinking": thinking}}
        with scripted_server(tok, reply, messages, thinking) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
            body = c.post("/v1/chat/completions", json=req).json()
            with c.stream("POST", "/v1/chat/completions", json={**req, "stream": True}) as s:
                events = sse(s)
        (choice,) = body["choices"]
        msg = choice["message"]
        assert choice["finish_reason"] == "tool_calls"
        assert msg["content"] == want["content"] == "Checking <b>two</b> things."
        assert msg.get("reasoning_content", "") == want["reasoning_content"]
        assert [(t["type"], t["function"]) for t in msg["tool_calls"]] == \
            [(w["type"], w["function"]) for w in want["tool_calls"]]
        assert [json.loads(t["function"]["arguments"]) for t in msg["tool_calls"]] == \
            [json.loads(c["function"]["arguments"]) for c in CALLS]
        assert all(t["id"].startswith("call_") for t in msg["tool_calls"])
        # streamed: the same content, reasoning and calls; ids and names once per call
        deltas = [e["choices"][0]["delta"] for e in events[:-1]]
        assert "".join(d.get("content") or "" for d in deltas) == msg["content"]
        assert "".join(d.get("reasoning_content") or "" for d in deltas) == msg.get("reasoning_content", "")
        calls: dict[int, dict] = {}
        for d in deltas:
            for tc in d.get("tool_calls", []):
                if "id" in tc:
                    assert tc["index"] not in calls and tc["type"] == "function"
                    calls[tc["index"]] = {"name": tc["function"]["name"], "arguments": ""}
                calls[tc["index"]]["arguments"] += tc["function"]["arguments"]
        assert [calls[i] for i in sorted(calls)] == [t["function"] for t in msg["tool_calls"]]
        assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"
        assert not any(DSML in (d.get("content") or "") + (d.get("reasoning_content") or "") for d in deltas)


def test_tool_choice_none_bans_markup_and_required_forces_a_call(model, tok):
    messages = [{"role": "user", "content": "Call something"}]
    with scripted_server(tok, "Hi" + TOOL_CALLS_PREFIX + 'add">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>',
                         messages) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        free = c.post("/v1/chat/completions", json={"messages": messages, "tools": TOOLS, "max_tokens": 100}).json()
        none = c.post("/v1/chat/completions", json={"messages": messages, "tools": TOOLS, "max_tokens": 100,
                                                    "tool_choice": "none", "logprobs": True}).json()
    assert free["choices"][0]["message"]["tool_calls"][0]["function"] == {"name": "add", "arguments": "{}"}
    msg = none["choices"][0]["message"]
    assert "tool_calls" not in msg and none["choices"][0]["finish_reason"] != "tool_calls"
    assert all(e["token"] != DSML for e in none["choices"][0]["logprobs"]["content"])
    assert DSML not in msg["content"]

    engine = Engine(model, tok, max_batch=2, max_len=2048)
    with ServerThread(create_app(engine, MODEL)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        for choice, thinking in (("required", False), ({"type": "function", "function": {"name": "add"}}, False),
                                 ("required", True)):
            forced = TOOL_CALLS_PREFIX + ('add">\n' if isinstance(choice, dict) else "")
            req = {"messages": messages, "tools": TOOLS, "tool_choice": choice, "max_tokens": 40, "temperature": 0,
                   "logprobs": True, "skip_special_tokens": False, "chat_template_kwargs": {"thinking": thinking}}
            if thinking:   # the call is forced after the reasoning: make the model close it at once
                req["logit_bias"] = {str(tok.token_to_id("</think>")): 100}
            body = c.post("/v1/chat/completions", json=req).json()
            text = "".join(e["token"] for e in body["choices"][0]["logprobs"]["content"])
            start = text.index("</think>") + len("</think>") if thinking else 0
            assert text[start:].startswith(forced), (choice, text)
            assert DSML not in body["choices"][0]["message"]["content"]


def test_response_format_json_object(model, tok):
    engine = Engine(model, tok, max_batch=1, max_len=512)
    brace = tok.token_to_id("}") if tok.token_to_id("}") is not None else tok.encode("}")[0]
    with ServerThread(create_app(engine, MODEL)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        req = {"messages": [{"role": "user", "content": "JSON please"}], "max_tokens": 20, "temperature": 0,
               "response_format": {"type": "json_object"}, "logit_bias": {str(brace): 50}}
        body = c.post("/v1/chat/completions", json=req).json()
        assert body["choices"][0]["message"]["content"] == "{}" and body["choices"][0]["finish_reason"] == "stop"
        free = c.post("/v1/chat/completions", json={**req, "response_format": {"type": "text"}}).json()
        assert free["choices"][0]["message"]["content"] != "{}"
        r = c.post("/v1/chat/completions", json={**req, "tools": TOOLS})
        check_error(r, 400, "cannot be combined with tool calls")


# ----------------------------------------------------------------------------- prefix cache, special tokens
def test_prefix_cache_serves_a_repeated_conversation_with_the_same_output(model, tok):
    history = [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok " * 20},
               {"role": "user", "content": "and then?"}]
    req = {"messages": history, "max_tokens": 8, "temperature": 0, "logprobs": True}
    plain = Engine(model, tok, max_batch=1, max_len=1024)
    cached = Engine(model, tok, max_batch=1, max_len=1024, prefix_cache_bytes=32 << 20)
    bodies = []
    for engine in (plain, cached):
        with ServerThread(create_app(engine, MODEL)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
            bodies.append([c.post("/v1/chat/completions", json=req).json() for _ in range(2)])
    (a1, a2), (b1, b2) = bodies
    n_prompt = len(tok.encode(encode_chat(history)))
    assert n_prompt > 256
    assert [x["usage"]["prompt_tokens_details"]["cached_tokens"] for x in (a1, a2, b1)] == [0, 0, 0]
    assert b2["usage"]["prompt_tokens_details"]["cached_tokens"] == (n_prompt - 1) // 128 * 128
    for x in (a2, b1, b2):
        assert x["choices"][0]["message"] == a1["choices"][0]["message"]
        lp = [e["logprob"] for e in x["choices"][0]["logprobs"]["content"]]
        assert lp == pytest.approx([e["logprob"] for e in a1["choices"][0]["logprobs"]["content"]], abs=1e-5)


def test_skip_special_tokens(tok):
    user, placeholder = tok.token_to_id("<｜User｜>"), tok.token_to_id("<｜▁pad▁｜>")
    prompt = tok.encode("Q:", add_bos=True)
    reply = tok.encode("a") + [user] + tok.encode("b") + [placeholder] + tok.encode("c")
    engine = Engine(Scripted(prompt + reply), tok, max_batch=1, max_len=64)
    with ServerThread(create_app(engine, MODEL)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        body = {"prompt": prompt, "max_tokens": 20}
        assert c.post("/v1/completions", json=body).json()["choices"][0]["text"] == "abc"
        kept = c.post("/v1/completions", json={**body, "skip_special_tokens": False}).json()
        assert kept["choices"][0]["text"] == "a<｜User｜>b<｜▁pad▁｜>c"
