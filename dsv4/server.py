"""OpenAI-compatible HTTP server: `/v1/models`, `/v1/completions`, `/v1/chat/completions`, `/health`.

One `EngineLoop` (a background thread stepping the continuous-batching `Engine`) serves every request;
handlers only tokenize, submit and relay the engine's Outputs, as one JSON body or as server-sent
events (`data: {...}\\n\\n` ... `data: [DONE]\\n\\n`). Errors use OpenAI's body
`{"error": {"message", "type", "param", "code"}}`: 400 for malformed or unsupported requests and
prompts that do not fit, 404 for an unknown model, 429 when the waiting queue is full, 500 when the
engine failed on a request. A client that disconnects cancels its request, which frees its cache row
at the engine's next step.

Chat prompts use the DeepSeek-V4 chat format (`dsv4.tokenizer.encode_chat`). Thinking mode is asked
for with `"chat_template_kwargs": {"thinking": true}`; the reasoning then comes back as
`reasoning_content` (message or delta) and the answer as `content`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv4.engine import (CANCELLED, ERROR, LENGTH, Engine, EngineLoop, EngineOverloaded, PromptTooLong, Request,
                         RequestError, Result, ThinkSplit, TokenLogprob, final_result)

log = logging.getLogger("dsv4.server")

MAX_STOP = 16


# ----------------------------------------------------------------------------- request schemas
class _Strict(BaseModel):
    # unknown fields and wrong JSON types are errors (400), not silently ignored or coerced
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None              # extension (vLLM): 0 or -1 = off
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool | None = None        # extension (vLLM)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatTemplateKwargs(_Strict):
    thinking: bool = False
    reasoning_effort: Literal["high", "max"] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _json_error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


# ----------------------------------------------------------------------------- the app
class Server:
    """Request handling shared by the endpoints (kept off FastAPI so it reads top to bottom)."""

    def __init__(self, engine: Engine, model_name: str):
        self.engine, self.model_name = engine, model_name
        self.loop = EngineLoop(engine)
        self.created = int(time.time())

    # -- validation common to both endpoints
    def _check_common(self, body: _Sampling) -> None:
        if body.model is not None and body.model != self.model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        if body.n not in (None, 1):
            raise APIError(400, "n > 1 is not supported; send one request per completion", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name) not in (None, 0, 0.0):
                raise APIError(400, f"{name} is not supported (only 0)", param=name)
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        if len(stops) > MAX_STOP:
            raise APIError(400, f"at most {MAX_STOP} stop strings are supported", param="stop")
        if body.temperature is not None and not 0 <= body.temperature <= 2:
            raise APIError(400, f"temperature must be in [0, 2]; got {body.temperature}", param="temperature")

    def _request(self, body: _Sampling, prompt_ids: list[int], max_tokens: int | None, logprobs: int | None,
                 id_prefix: str) -> Request:
        if max_tokens is None:  # the rest of the context (a prompt that fills it is refused as too long)
            max_tokens = max(self.engine.max_len - len(prompt_ids), 1)
        stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        top_k = body.top_k if body.top_k is not None else 0
        return Request(prompt=prompt_ids, max_tokens=max_tokens,
                       temperature=1.0 if body.temperature is None else body.temperature,
                       top_p=1.0 if body.top_p is None else body.top_p, top_k=0 if top_k == -1 else top_k,
                       seed=body.seed, stop=stops, ignore_eos=bool(body.ignore_eos), logprobs=logprobs,
                       id=f"{id_prefix}-{uuid.uuid4().hex[:24]}")

    def _open(self, req: Request):
        """Submit, mapping engine refusals to HTTP errors."""
        try:
            return self.loop.open(req)
        except PromptTooLong as exc:
            raise APIError(400, str(exc), param="messages" if req.id.startswith("chatcmpl") else "prompt",
                           code="context_length_exceeded") from None
        except RequestError as exc:
            raise APIError(400, str(exc)) from None
        except EngineOverloaded as exc:
            raise APIError(429, str(exc), type_="rate_limit_error", code="queue_full") from None

    # -- /v1/completions
    def completion_request(self, body: CompletionRequest) -> Request:
        self._check_common(body)
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if body.best_of not in (None, 1):
            raise APIError(400, "best_of > 1 is not supported", param="best_of")
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request: batches of prompts are not supported", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        if body.logprobs is not None and not 0 <= body.logprobs <= 5:
            raise APIError(400, "logprobs must be in [0, 5]", param="logprobs")
        try:
            ids = self.engine.encode(prompt)
        except RequestError as exc:
            raise APIError(400, str(exc), param="prompt") from None
        return self._request(body, ids, 16 if body.max_tokens is None else body.max_tokens, body.logprobs, "cmpl")

    # -- /v1/chat/completions
    def chat_request(self, body: ChatRequest) -> tuple[Request, bool]:
        from dsv4.tokenizer import encode_chat

        self._check_common(body)
        if self.engine.tokenizer is None:
            raise APIError(400, "this server has no tokenizer, so it cannot render chat messages")
        if body.tools and body.stream:
            raise APIError(400, "streaming with tools is not supported; set stream=false", param="stream")
        if body.response_format and body.response_format.get("type") not in (None, "text"):
            raise APIError(400, "only response_format {\"type\": \"text\"} is supported", param="response_format")
        if body.top_logprobs is not None and not (0 <= body.top_logprobs <= 20 and body.logprobs):
            raise APIError(400, "top_logprobs must be in [0, 20] and needs logprobs=true", param="top_logprobs")
        kw = body.chat_template_kwargs or ChatTemplateKwargs()
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        for i, m in enumerate(messages):  # OpenAI content parts: text only, joined
            if isinstance(m.get("content"), list):
                parts = m["content"]
                if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in parts):
                    raise APIError(400, f"messages[{i}]: only text content parts are supported", param="messages")
                m["content"] = "".join(p["text"] for p in parts)
        try:
            text = encode_chat(messages, thinking=kw.thinking, tools=body.tools or None,
                               reasoning_effort=kw.reasoning_effort)
        except ValueError as exc:
            raise APIError(400, f"messages: {exc}", param="messages") from None
        ids = self.engine.encode(text)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return self._request(body, ids, max_tokens, logprobs, "chatcmpl"), kw.thinking

    # -- response pieces
    def token_text(self, token_id: int) -> str:
        tok = self.engine.tokenizer
        return tok.decode([token_id]) if tok is not None else ""

    def completion_logprobs(self, lps: list[TokenLogprob] | None, offset: int) -> dict | None:
        if lps is None:
            return None
        tokens = [self.token_text(lp.token_id) for lp in lps]
        offsets, pos = [], offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{self.token_text(i): v for i, v in lp.top} for lp in lps],
                "text_offset": offsets}

    def chat_logprobs(self, lps: list[TokenLogprob] | None) -> dict | None:
        if lps is None:
            return None

        def entry(i: int, v: float) -> dict:
            t = self.token_text(i)
            return {"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))}

        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
                            for lp in lps]}

    @staticmethod
    def usage(result: Result) -> dict:
        p, c = len(result.prompt_ids), len(result.token_ids)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    @staticmethod
    def finish_reason(reason: str | None) -> str | None:
        return None if reason is None else ("length" if reason == LENGTH else "stop")


def _result_error(result: Result) -> APIError:
    return APIError(500, f"generation failed: {result.error}", type_="server_error")


def create_app(engine: Engine, model_name: str = "dsv4") -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the engine loop."""
    srv = Server(engine, model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        log.info(startup_summary(engine, model_name))
        srv.loop.start()
        try:
            yield
        finally:
            srv.loop.stop()

    app = FastAPI(title="dsv4", lifespan=lifespan)
    app.state.server = srv

    @app.exception_handler(APIError)
    async def _api_error(request: HTTPRequest, exc: APIError):
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return _json_error(exc.status, exc.message, exc.type, exc.param, exc.code, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: HTTPRequest, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return _json_error(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip())
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        if param is None:
            msg = f"the request body must be a JSON object ({msg})"
        if first.get("type") == "extra_forbidden":
            msg = "unknown field"
        return _json_error(400, f"{param}: {msg}" if param else msg, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: HTTPRequest, exc: StarletteHTTPException):
        return _json_error(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.get("/health")
    async def health():
        ok = srv.loop.alive
        body = {"status": "ok" if ok else "engine stopped", "running": engine.num_running,
                "waiting": engine.num_waiting, "max_batch": engine.max_batch, "max_len": engine.max_len}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": srv.created,
                                            "owned_by": "dsv4", "max_model_len": engine.max_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        req = srv.completion_request(body)
        outputs = srv._open(req)
        created = int(time.time())
        if body.stream:
            return _sse(_completion_chunks(srv, req, outputs, created, body))
        result = await _collect(outputs, http)
        if result is None:
            return JSONResponse(error_body("client disconnected"), status_code=499)
        if result.finish_reason == ERROR:
            raise _result_error(result)
        return {"id": req.id, "object": "text_completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "text": result.text, "finish_reason": srv.finish_reason(result.finish_reason),
                             "logprobs": srv.completion_logprobs(result.logprobs, 0)}],
                "usage": srv.usage(result)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: HTTPRequest):
        req, thinking = srv.chat_request(body)
        outputs = srv._open(req)
        created = int(time.time())
        if body.stream:
            return _sse(_chat_chunks(srv, req, outputs, created, body, thinking))
        result = await _collect(outputs, http)
        if result is None:
            return JSONResponse(error_body("client disconnected"), status_code=499)
        if result.finish_reason == ERROR:
            raise _result_error(result)
        message: dict[str, Any] = {"role": "assistant"}
        finish = srv.finish_reason(result.finish_reason)
        parsed = None
        if body.tools:
            from dsv4.tokenizer import parse_assistant

            try:
                parsed = parse_assistant(result.text, thinking=thinking)
            except ValueError:
                parsed = None
        if parsed is not None:
            message["content"] = parsed["content"]
            if thinking:
                message["reasoning_content"] = parsed["reasoning_content"]
            if parsed["tool_calls"]:
                message["tool_calls"] = [{"id": f"call_{uuid.uuid4().hex[:24]}", **c} for c in parsed["tool_calls"]]
                finish = "tool_calls"
        else:
            split = ThinkSplit(thinking)
            r1, c1 = split.push(result.text)
            r2, _ = split.flush()
            message["content"] = c1
            if thinking:
                message["reasoning_content"] = r1 + r2
        return {"id": req.id, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": message, "finish_reason": finish,
                             "logprobs": srv.chat_logprobs(result.logprobs)}],
                "usage": srv.usage(result)}

    return app


# ----------------------------------------------------------------------------- relaying outputs
async def _collect(outputs, http: HTTPRequest) -> Result | None:
    """Wait for the Result, cancelling the request if the client disconnects first (then None)."""
    task = asyncio.ensure_future(final_result(outputs))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await http.is_disconnected():
                return None
    finally:
        if not task.done():
            task.cancel()  # raises inside the iteration, which cancels the request


class _EventStream(StreamingResponse):
    """SSE response that closes its generator however the stream ends (a client that went away
    cancels its request at once instead of when the generator is garbage-collected)."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


def _sse(gen) -> StreamingResponse:
    return _EventStream(gen, media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _event(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _completion_chunks(srv: Server, req: Request, outputs, created: int, body: CompletionRequest):
    base = {"id": req.id, "object": "text_completion", "created": created, "model": srv.model_name}
    offset = 0
    try:
        async for out in outputs:
            if out.finish_reason == ERROR:
                yield _event(error_body(f"generation failed: {out.result.error}", "server_error"))
                break
            if out.text or out.token_ids or out.finish_reason:
                lp = srv.completion_logprobs(out.logprobs, offset)
                offset += len(out.text)
                yield _event({**base, "choices": [{"index": 0, "text": out.text, "logprobs": lp,
                                                   "finish_reason": srv.finish_reason(out.finish_reason)}]})
            if out.result is not None and body.stream_options and body.stream_options.include_usage:
                yield _event({**base, "choices": [], "usage": srv.usage(out.result)})
        yield _event("[DONE]")
    finally:
        await outputs.aclose()


async def _chat_chunks(srv: Server, req: Request, outputs, created: int, body: ChatRequest, thinking: bool):
    base = {"id": req.id, "object": "chat.completion.chunk", "created": created, "model": srv.model_name}

    def chunk(delta: dict, finish=None, logprobs=None) -> str:
        return _event({**base, "choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                                            "finish_reason": finish}]})

    split = ThinkSplit(thinking)
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for out in outputs:
            if out.finish_reason == ERROR:
                yield _event(error_body(f"generation failed: {out.result.error}", "server_error"))
                break
            r, c = split.push(out.text)
            if out.finish_reason is not None:
                r2, _ = split.flush()
                r += r2
            delta = {}
            if r:
                delta["reasoning_content"] = r
            if c:
                delta["content"] = c
            if delta or out.logprobs:
                yield chunk(delta, logprobs=srv.chat_logprobs(out.logprobs))
            if out.finish_reason is not None and out.finish_reason != CANCELLED:
                yield chunk({}, srv.finish_reason(out.finish_reason))
            if out.result is not None and body.stream_options and body.stream_options.include_usage:
                yield _event({**base, "choices": [], "usage": srv.usage(out.result)})
        yield _event("[DONE]")
    finally:
        await outputs.aclose()


# ----------------------------------------------------------------------------- startup
def startup_summary(engine: Engine, model_name: str) -> str:
    """Lines logged when the server starts: the model, the cache it holds, device and dtype."""
    from dsv4.cache import cache_bytes

    cfg = engine.config
    counts = cfg.param_counts()
    dbytes = torch_dtype_bytes(engine.dtype)
    per_seq = cache_bytes(cfg, engine.max_len, dtype_bytes=dbytes)["total"]
    layers = ", ".join(f"{cfg.layer_types.count(t)} {t}" for t in dict.fromkeys(cfg.layer_types))
    return "\n".join([
        f"serving {model_name!r}: {cfg.num_hidden_layers} layers ({layers}), hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} heads x {cfg.head_dim}, {cfg.n_routed_experts} experts (top "
        f"{cfg.num_experts_per_tok}), vocab {cfg.vocab_size}, MTP blocks {cfg.num_nextn_predict_layers}, "
        f"{counts['total'] / 1e6:.1f}M parameters",
        f"cache: {engine.max_batch} rows x {engine.max_len} tokens; {per_seq / 2 ** 20:.2f} MiB per sequence, "
        f"{engine.cache.nbytes() / 2 ** 20:.1f} MiB allocated",
        f"device {engine.device}, dtype {str(engine.dtype).replace('torch.', '')}, prefill chunk "
        f"{engine.prefill_chunk}, queue {engine.max_queue}, speculative decoding "
        f"{'on' if engine.speculative else 'off'}",
    ])


def torch_dtype_bytes(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()
