"""The OpenAI-compatible server over real HTTP (uvicorn on 127.0.0.1, httpx): response schemas,
streaming == non-streaming, 50 concurrent requests equal to the greedy reference, 4xx errors with a
message, a disconnect that frees the cache row at once, and 429 on overload."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
import torch

from dsv4.engine import Engine
from dsv4.server import create_app
from dsv4.tokenizer import DEFAULT_TRAIN_SPECIAL_TOKENS, train_bpe

from conftest import random_model

MODEL = "tiny-test"
EOS = 1


class ServerThread:
    """uvicorn serving `app` from a thread, on a socket bound to a free port."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
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
    engine = Engine(model, tok, max_batch=8, max_len=1024, max_queue=64)
    with ServerThread(create_app(engine, MODEL)) as srv:
        srv.engine = engine
        yield srv


@torch.no_grad()
def greedy_text(model, tok, ids, n):
    """Reference: argmax chain of full forwards; the text without the EOS token."""
    ids, out = list(ids), []
    for _ in range(n):
        t = int(model(torch.tensor([ids]))[0, -1].argmax())
        if t == EOS:
            break
        out.append(t)
        ids.append(t)
    return tok.decode(out)


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
    assert set(u) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert all(isinstance(v, int) for v in u.values())
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    if completion_tokens is not None:
        assert u["completion_tokens"] == completion_tokens


def check_envelope(body: dict, obj: str, prefix: str):
    assert body["object"] == obj and body["model"] == MODEL
    assert isinstance(body["id"], str) and body["id"].startswith(prefix)
    assert isinstance(body["created"], int) and abs(body["created"] - time.time()) < 600
    assert isinstance(body["choices"], list)


# ----------------------------------------------------------------------------- schemas
def test_models_and_health(served):
    with httpx.Client(base_url=served.url) as c:
        models = c.get("/v1/models").json()
        assert models["object"] == "list" and models["data"][0]["id"] == MODEL
        assert models["data"][0]["object"] == "model"
        h = c.get("/health")
        assert h.status_code == 200 and h.json()["status"] == "ok"


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
    assert usage["choices"] == [] and usage["usage"] == body["usage"]


def test_chat_non_streaming_and_streaming(served, model, tok):
    from dsv4.tokenizer import encode_chat

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
    assert served.engine.num_running == 0 and served.engine.num_waiting == 0


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("path,body,status,match", [
    ("/v1/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/completions", {"prompt": "x", "frobnicate": 1}, 400, "frobnicate: unknown field"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n > 1"),
    ("/v1/completions", {"prompt": "x", "temperature": 7}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "logprobs": 9}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x" * 1100, "max_tokens": 1}, 400, "context of 1024"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 5000}, 400, "context of 1024"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "one prompt"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "does not exist"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, 400, "logprobs"),
    ("/v1/nothing", {}, 404, "Not Found"),
])
def test_malformed_requests_get_4xx_with_a_message(served, path, body, status, match):
    with httpx.Client(base_url=served.url, timeout=30) as c:
        if isinstance(body, bytes):
            r = c.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = c.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and match in err["message"], err
    if "context of" in match:
        assert err["code"] == "context_length_exceeded"


def test_disconnect_mid_stream_frees_the_row(served):
    engine = served.engine
    body = {"prompt": "Tell me a long story", "max_tokens": 1000, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=served.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert engine.num_running == 1 and any(line.startswith("data: {") for line in got)
        t0 = time.monotonic()
        while engine.num_running and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        assert engine.num_running == 0, "the request kept its row after the client left"
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
            end = time.monotonic() + 10
            while engine.num_waiting < 1 and time.monotonic() < end:
                time.sleep(0.01)
            r = c.post("/v1/completions", json={"prompt": "c", "max_tokens": 2})
            assert r.status_code == 429 and "queue is full" in r.json()["error"]["message"]
            assert r.headers.get("retry-after") == "1"
        t.join(30)                                                             # the stream closed: b runs
        assert queued["r"].status_code == 200
        assert c.get("/health").json()["status"] == "ok"
