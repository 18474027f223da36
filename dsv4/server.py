"""OpenAI-compatible HTTP server, with the extra endpoints of vLLM's: `/v1/models[/{id}]`,
`/v1/completions`, `/v1/chat/completions`, `/tokenize`, `/detokenize`, `/health`, `/metrics`, `/version`.

One `EngineLoop` (a background thread stepping the continuous-batching `Engine`) serves every request.
A handler validates the body, renders and tokenizes the prompt on a worker thread (a long prompt never
blocks the event loop), submits one engine request per choice (`n`) and relays the Outputs as one JSON
body or as server-sent events (`data: {...}\\n\\n` ... `data: [DONE]\\n\\n`). Errors use OpenAI's body
`{"error": {"message", "type", "param", "code"}}`: 400 malformed or unsupported requests and prompts that
do not fit, 401 a missing or wrong API key, 404 unknown model or path, 413 a body over
`max_request_bytes`, 429 a full queue, 500 a failure while generating, 504 `request_timeout` passed.
A client that disconnects cancels its requests, which frees their cache rows at the engine's next step.

Chat prompts use the DeepSeek-V4 chat format (`dsv4.tokenizer.encode_chat`); replies are read by
`dsv4.toolcalls.ReplyParser` into `reasoning_content` (thinking mode: `"chat_template_kwargs":
{"thinking": true}`), `content` and `tool_calls`, streamed or not; tool markup never reaches content.
`tool_choice` "none" bans the DSML token, "required" and a named function force the opening of a call
(`dsv4.constraints.ForcedTokens`), and `response_format` json_object constrains the reply to a JSON
object (`dsv4.constraints.JsonObject`).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, HTTPException
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv4.engine import (CANCELLED, ERROR, LENGTH, Engine, EngineLoop, EngineOverloaded, PromptTooLong, Request,
                         RequestError, Result, TokenLogprob, final_result)
from dsv4.sampling import SEED_MAX, SEED_MIN
from dsv4.server_metrics import ServerMetrics

log = logging.getLogger("dsv4.server")

MAX_STOP = 16
MAX_N = 16
OPEN_PATHS = ("/health", "/metrics", "/version")     # answered without the API key
_SURROGATE = re.compile("[\ud800-\udfff]")


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
    repetition_penalty: float | None = None   # extension (vLLM)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool | None = None        # extension (vLLM)
    skip_special_tokens: bool | None = None   # extension (vLLM): default true


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(_Strict):
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


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


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


@dataclass
class ChatPlan:
    """What a chat request needs besides its engine requests: how to read the replies."""
    thinking: bool
    tool_choice: Any = None
    tools: list = field(default_factory=list)


# ----------------------------------------------------------------------------- request handling
class Server:
    """Request handling shared by the endpoints (kept off FastAPI so it reads top to bottom)."""

    def __init__(self, engine: Engine, model_name: str, *, api_key: str | None = None,
                 max_request_bytes: int = 16 << 20, request_timeout: float | None = None,
                 stall_seconds: float = 300.0, workers: int = 4):
        if max_request_bytes < 1 or (request_timeout is not None and request_timeout <= 0) or workers < 1:
            raise ValueError("max_request_bytes and workers must be >= 1 and request_timeout > 0 (or None)")
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.max_request_bytes, self.request_timeout = max_request_bytes, request_timeout
        self.metrics = ServerMetrics(model_name)
        self.loop = EngineLoop(engine, stall_seconds=stall_seconds, on_result=self.metrics.observe,
                               on_step=lambda e: self.metrics.sample(e.stats["generated_tokens"]))
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dsv4-prepare")
        self.created = int(time.time())

    async def run(self, fn, *args):
        """Run `fn(*args)` (tokenizing, rendering) on a worker thread, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # -- validation common to both endpoints
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def _check_common(self, body: _Sampling) -> None:
        self.check_model(body.model)
        _check_text(body.model_dump(exclude_none=True))
        if body.n is not None and not 1 <= body.n <= MAX_N:
            raise APIError(400, f"n must be in [1, {MAX_N}]; got {body.n}", param="n")
        for name, lo, hi in (("presence_penalty", -2, 2), ("frequency_penalty", -2, 2), ("temperature", 0, 2)):
            v = getattr(body, name)
            if v is not None and not lo <= v <= hi:
                raise APIError(400, f"{name} must be in [{lo}, {hi}]; got {v}", param=name)
        if body.repetition_penalty is not None and not 0 < body.repetition_penalty <= 10:
            raise APIError(400, f"repetition_penalty must be in (0, 10]; got {body.repetition_penalty}",
                           param="repetition_penalty")
        if body.seed is not None and not SEED_MIN <= body.seed <= SEED_MAX:
            raise APIError(400, f"seed must be an integer in [-2**63, 2**64 - 1]; got {body.seed}", param="seed")
        stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        if len(stops) > MAX_STOP:
            raise APIError(400, f"at most {MAX_STOP} stop strings are supported", param="stop")
        V = self.engine.config.vocab_size
        for k, v in (body.logit_bias or {}).items():
            if not (k.isdigit() and int(k) < V):
                raise APIError(400, f"logit_bias keys must be token ids in [0, {V}); got {k!r}", param="logit_bias")
            if not -100 <= v <= 100:
                raise APIError(400, f"logit_bias values must be in [-100, 100]; got {v} for {k}", param="logit_bias")

    def _requests(self, body: _Sampling, prompt_ids: list[int], max_tokens: int | None, logprobs: int | None,
                  id_prefix: str, processors=lambda: [], bias: dict[int, float] | None = None) -> list[Request]:
        """One engine request per choice (`n`); choice i samples with seed + i."""
        if max_tokens is None:  # the rest of the context (a prompt that fills it is refused as too long)
            max_tokens = max(self.engine.max_len - len(prompt_ids), 1)
        if max_tokens < 1:
            raise APIError(400, f"max_tokens must be >= 1; got {max_tokens}", param="max_tokens")
        stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        top_k = body.top_k if body.top_k is not None else 0
        logit_bias = {int(k): v for k, v in (body.logit_bias or {}).items()} | (bias or {})
        rid = f"{id_prefix}-{uuid.uuid4().hex[:24]}"
        reqs = []
        for i in range(body.n or 1):
            seed = None if body.seed is None else (body.seed if i == 0 else (body.seed + i) % 2 ** 64)
            reqs.append(Request(
                prompt=prompt_ids, max_tokens=max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, top_k=0 if top_k == -1 else top_k,
                seed=seed, stop=stops, ignore_eos=bool(body.ignore_eos), logprobs=logprobs,
                presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
                logit_bias=logit_bias or None, processors=processors(),
                skip_special_tokens=body.skip_special_tokens is not False, id=f"{rid}-{i}"))
        return reqs

    def encode(self, text: str, param: str, bos: bool = True) -> list[int]:
        """Token ids of a text prompt; a text too long for the context is refused before tokenizing
        it (more than max_len · max_token_bytes bytes cannot fit)."""
        tok = self.engine.tokenizer
        if tok is None:
            raise APIError(400, "this server has no tokenizer: send the prompt as token ids", param=param)
        limit = self.engine.max_len * tok.max_token_bytes
        if len(text) > limit or len(text.encode("utf-8")) > limit:
            raise APIError(400, f"the prompt ({len(text.encode('utf-8'))} bytes) is longer than the context of "
                                f"{self.engine.max_len} tokens this server was started with",
                           param=param, code="context_length_exceeded")
        if not bos:
            return tok.encode(text)
        return self.engine.encode(text)

    def open(self, reqs: list[Request]) -> list:
        """Submit every request (all or none), mapping engine refusals to HTTP errors."""
        streams = []
        try:
            for req in reqs:
                streams.append(self.loop.open(req))
        except PromptTooLong as exc:
            self.metrics.reject("too_long")
            raise APIError(400, str(exc), param="messages" if reqs[0].id.startswith("chatcmpl") else "prompt",
                           code="context_length_exceeded") from None
        except RequestError as exc:
            self.metrics.reject("invalid")
            raise APIError(400, str(exc)) from None
        except EngineOverloaded as exc:
            self.metrics.reject("queue_full")
            raise APIError(429, str(exc), type_="rate_limit_error", code="queue_full") from None
        finally:
            if len(streams) < len(reqs):
                for req in reqs[:len(streams)]:
                    self.loop.cancel(req.id)
        return streams

    # -- /v1/completions
    def completion_requests(self, body: CompletionRequest) -> list[list[Request]]:
        """Engine requests per prompt (a list of prompts is a batch: choice index = prompt · n + i)."""
        self._check_common(body)
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if body.best_of not in (None, 1):
            raise APIError(400, "best_of > 1 is not supported; use n", param="best_of")
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if body.logprobs is not None and not 0 <= body.logprobs <= 5:
            raise APIError(400, "logprobs must be in [0, 5]", param="logprobs")
        prompts = body.prompt
        if not (isinstance(prompts, list) and prompts and isinstance(prompts[0], (str, list))):
            prompts = [prompts]
        if len(prompts) * (body.n or 1) > MAX_N * 4:
            raise APIError(400, f"at most {MAX_N * 4} completions (prompts x n) per request", param="prompt")
        out = []
        for prompt in prompts:
            if not prompt:
                raise APIError(400, "the prompt is empty", param="prompt")
            ids = self.encode(prompt, "prompt") if isinstance(prompt, str) else list(prompt)
            out.append(self._requests(body, ids, 16 if body.max_tokens is None else body.max_tokens,
                                      body.logprobs, "cmpl"))
        return out

    # -- /v1/chat/completions
    def chat_requests(self, body: ChatRequest) -> tuple[list[Request], ChatPlan]:
        self._check_common(body)
        tok = self.engine.tokenizer
        if tok is None:
            raise APIError(400, "this server has no tokenizer, so it cannot render chat messages")
        if body.top_logprobs is not None and not (0 <= body.top_logprobs <= 20 and body.logprobs):
            raise APIError(400, "top_logprobs must be in [0, 20] and needs logprobs=true", param="top_logprobs")
        kw = body.chat_template_kwargs or ChatTemplateKwargs()
        plan = ChatPlan(kw.thinking, _tool_choice(body), body.tools or [])
        text = self.render(body.messages, kw, body.tools, add_generation_prompt=True)
        ids = self.encode(text, "messages")
        processors, bias = self.reply_constraints(body, plan)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return self._requests(body, ids, max_tokens, logprobs, "chatcmpl", processors, bias), plan

    def render(self, messages: list[ChatMessage], kw: ChatTemplateKwargs, tools, add_generation_prompt: bool) -> str:
        from dsv4.tokenizer import encode_chat

        msgs = [m.model_dump(exclude_none=True) for m in messages]
        for i, m in enumerate(msgs):  # OpenAI content parts: text only, joined
            if isinstance(m.get("content"), list):
                parts = m["content"]
                if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in parts):
                    raise APIError(400, f"messages[{i}]: only text content parts are supported", param="messages")
                m["content"] = "".join(p["text"] for p in parts)
        try:
            return encode_chat(msgs, thinking=kw.thinking, tools=tools or None, reasoning_effort=kw.reasoning_effort,
                               add_generation_prompt=add_generation_prompt)
        except ValueError as exc:
            raise APIError(400, f"messages: {exc}", param="messages") from None

    def reply_constraints(self, body: ChatRequest, plan: ChatPlan):
        """(factory of per-request logits processors, logit bias) for tool_choice and response_format."""
        from dsv4.constraints import ForcedTokens, JsonObject
        from dsv4.tokenizer import DSML, THINK_END
        from dsv4.toolcalls import TOOL_CALLS_PREFIX

        tok = self.engine.tokenizer
        after = None
        if plan.thinking:
            after = tok.token_to_id(THINK_END)
            if after is None:
                raise APIError(400, "this tokenizer has no single </think> token, so replies in thinking mode "
                                    "cannot be constrained", param="tool_choice")
        fmt = (body.response_format or {}).get("type", "text")
        if fmt not in ("text", "json_object") or set(body.response_format or {}) - {"type"}:
            raise APIError(400, "response_format must be {\"type\": \"text\"} or {\"type\": \"json_object\"} "
                                "(json_schema is not supported)", param="response_format")
        choice, bias = plan.tool_choice, {}
        if fmt == "json_object":
            if plan.tools and choice != "none":
                raise APIError(400, "response_format json_object cannot be combined with tool calls; "
                                    "set tool_choice to \"none\"", param="response_format")
            if body.ignore_eos:
                raise APIError(400, "response_format json_object ends the reply after the object; "
                                    "ignore_eos cannot be used with it", param="ignore_eos")
            V = self.engine.config.vocab_size
            try:
                JsonObject(tok, V)   # builds the vocabulary tables once, here on the worker thread
            except ValueError as exc:
                raise APIError(400, str(exc), param="response_format") from None
            return (lambda: [JsonObject(tok, V, after)]), bias
        dsml = tok.token_to_id(DSML)
        if choice == "none" and dsml is not None:
            bias[dsml] = float("-inf")
        if choice == "required" or isinstance(choice, dict):
            forced = TOOL_CALLS_PREFIX
            if isinstance(choice, dict):
                forced += choice["function"]["name"] + '">\n'
            ids = tok.encode(forced)
            return (lambda: [ForcedTokens(ids, after)]), bias
        return (lambda: []), bias

    # -- /tokenize, /detokenize
    def tokenize(self, body: TokenizeRequest) -> dict:
        self.check_model(body.model)
        _check_text(body.model_dump(exclude_none=True))
        tok = self.engine.tokenizer
        if tok is None:
            raise APIError(400, "this server has no tokenizer")
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if body.prompt is not None:
            ids = self.encode(body.prompt, "prompt", bos=body.add_special_tokens) if body.prompt else \
                ([tok.bos_id] if body.add_special_tokens else [])
        else:
            kw = body.chat_template_kwargs or ChatTemplateKwargs()
            ids = self.encode(self.render(body.messages, kw, body.tools, body.add_generation_prompt), "messages")
        out = {"count": len(ids), "max_model_len": self.engine.max_len, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = [tok.id_to_token(i) for i in ids]
        return out

    def detokenize(self, body: DetokenizeRequest) -> dict:
        self.check_model(body.model)
        tok = self.engine.tokenizer
        if tok is None:
            raise APIError(400, "this server has no tokenizer")
        bad = [i for i in body.tokens if not 0 <= i < tok.vocab_size]
        if bad:
            raise APIError(400, f"token ids must lie in [0, {tok.vocab_size}); got {bad[:5]}", param="tokens")
        return {"prompt": tok.decode(body.tokens)}

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
            return {"token": t, "logprob": v, "bytes": list(t.encode("utf-8", "surrogatepass"))}

        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
                            for lp in lps]}

    @staticmethod
    def usage(results: list[Result], prompts: list[list[int]]) -> dict:
        """Each distinct prompt counts once (as vLLM counts them for n > 1)."""
        p = sum(len(x) for x in prompts)
        c = sum(len(r.token_ids) for r in results)
        cached = sum(max((r.cached_tokens for r in results if r.prompt_ids == x), default=0) for x in prompts)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                "prompt_tokens_details": {"cached_tokens": cached}}

    @staticmethod
    def finish_reason(reason: str | None) -> str | None:
        return None if reason is None else ("length" if reason == LENGTH else "stop")


def _check_text(value, where: str = "") -> None:
    """JSON may carry lone UTF-16 surrogates ("\\ud800") that no UTF-8 text can hold: refuse them."""
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise APIError(400, f"{where or 'the request'}: a string holds a lone UTF-16 surrogate "
                                "(\\ud800-\\udfff), which is not valid Unicode text", param=where or None)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, where)
            _check_text(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_text(v, f"{where}[{i}]")


def _tool_choice(body: ChatRequest):
    """The validated tool_choice: None/"auto", "none", "required" or {"type": "function", "function": {"name"}}."""
    choice, names = body.tool_choice, [t.get("function", {}).get("name") for t in body.tools or []]
    if choice in (None, "auto", "none"):
        return choice
    if choice == "required" or isinstance(choice, dict):
        if not body.tools:
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        if isinstance(choice, dict):
            fn = choice.get("function")
            name = fn.get("name") if choice.get("type") == "function" and isinstance(fn, dict) else None
            if not isinstance(name, str) or set(choice) != {"type", "function"}:
                raise APIError(400, 'a named tool_choice is {"type": "function", "function": {"name": NAME}}',
                               param="tool_choice")
            if name not in names:
                raise APIError(400, f"tool_choice names {name!r}, which is not among the tools ({names})",
                               param="tool_choice")
        return choice
    raise APIError(400, f'tool_choice must be "none", "auto", "required" or a named function; got {choice!r}',
                   param="tool_choice")


def _result_error(result: Result) -> APIError:
    return APIError(500, f"generation failed: {result.error}", type_="server_error")


def _timeout_error(seconds: float) -> APIError:
    return APIError(504, f"the request did not finish within the server's request timeout ({seconds:g} s)",
                    type_="timeout_error", code="request_timeout")


# ----------------------------------------------------------------------------- gate: auth and body size
class _Gate:
    """ASGI middleware in front of the app: the API key (Bearer), and the body size limit, checked on
    Content-Length and again while the body is read (a chunked body cannot slip past it)."""

    def __init__(self, app, srv: Server):
        self.app, self.srv = app, srv

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        srv = self.srv
        if srv.api_key and scope["path"] not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), srv.api_key.encode()):
                response = _json_error(401, "missing or invalid API key: send the header "
                                            "'Authorization: Bearer <key>' with the server's --api-key",
                                       "authentication_error", code="invalid_api_key",
                                       headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        limit = srv.max_request_bytes
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _too_large(limit)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, _too_large_message(limit))
            return message

        return await self.app(scope, counted, send)


def _too_large_message(limit: int) -> str:
    return (f"the request body is larger than this server's limit of {limit} bytes (--max-request-bytes); "
            "send a shorter prompt")


def _too_large(limit: int) -> JSONResponse:
    return _json_error(413, _too_large_message(limit), code="request_too_large")


# ----------------------------------------------------------------------------- the app
def create_app(engine: Engine, model_name: str = "dsv4", *, api_key: str | None = None,
               max_request_bytes: int = 16 << 20, request_timeout: float | None = None,
               stall_seconds: float = 300.0) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the engine loop.

    api_key: required as `Authorization: Bearer KEY` on every path but /health, /metrics, /version;
    max_request_bytes: larger bodies get 413; request_timeout: seconds a request may take in all
    (queue, prefill, generation) before it is cancelled (504, or an error event when streaming);
    stall_seconds: an engine step running longer makes /health report the engine stalled."""
    from dsv4 import __version__

    srv = Server(engine, model_name, api_key=api_key, max_request_bytes=max_request_bytes,
                 request_timeout=request_timeout, stall_seconds=stall_seconds)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        log.info(startup_summary(engine, model_name))
        srv.loop.start()
        try:
            yield
        finally:
            srv.loop.stop()
            srv.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="dsv4", version=__version__, lifespan=lifespan)
    app.state.server = srv
    app.add_middleware(_Gate, srv=srv)
    _error_handlers(app)
    _info_routes(app, srv)
    _generation_routes(app, srv)
    return app


def _error_handlers(app: FastAPI) -> None:
    """Every error, expected or not, in OpenAI's error body."""

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
        code = "request_too_large" if exc.status_code == 413 else None
        return _json_error(exc.status_code, str(exc.detail), "invalid_request_error", code=code)

    @app.exception_handler(UnicodeError)
    async def _unicode_error(request: HTTPRequest, exc: UnicodeError):
        return _json_error(400, f"the request holds text that is not valid Unicode: {exc}")

    @app.exception_handler(Exception)
    async def _internal_error(request: HTTPRequest, exc: Exception):
        log.exception("unhandled error on %s", request.url.path, exc_info=exc)
        return _json_error(500, f"internal server error: {type(exc).__name__}: {exc}", "server_error")


def _info_routes(app: FastAPI, srv: Server) -> None:
    """/health, /metrics, /version, /v1/models, /tokenize, /detokenize."""
    from dsv4 import __version__

    engine, model_name = srv.engine, srv.model_name

    @app.get("/health")
    async def health():
        ok, status = srv.loop.health()
        body = {"status": status, "running": engine.num_running, "waiting": engine.num_waiting,
                "max_batch": engine.max_batch, "max_len": engine.max_len}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(srv.metrics.render(engine), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/version")
    async def version():
        return {"version": __version__}

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": srv.created, "owned_by": "dsv4",
                "max_model_len": engine.max_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        srv.check_model(model_id)
        return model_card()

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        return await srv.run(srv.tokenize, body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return await srv.run(srv.detokenize, body)


def _generation_routes(app: FastAPI, srv: Server) -> None:
    """/v1/completions and /v1/chat/completions."""
    model_name = srv.model_name

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        groups = await srv.run(srv.completion_requests, body)
        reqs = [r for g in groups for r in g]
        prompts = [g[0].prompt for g in groups]
        streams = srv.open(reqs)
        created = int(time.time())
        rid = reqs[0].id.rsplit("-", 1)[0]
        if body.stream:
            return _sse(_completion_chunks(srv, rid, streams, created, body, prompts))
        results = await _collect(srv, streams, http)
        if results is None:
            return JSONResponse(error_body("client disconnected"), status_code=499)
        choices = []
        for i, r in enumerate(results):
            choices.append({"index": i, "text": r.text, "finish_reason": srv.finish_reason(r.finish_reason),
                            "logprobs": srv.completion_logprobs(r.logprobs, 0)})
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                "choices": choices, "usage": srv.usage(results, prompts)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: HTTPRequest):
        reqs, plan = await srv.run(srv.chat_requests, body)
        streams = srv.open(reqs)
        created = int(time.time())
        rid = reqs[0].id.rsplit("-", 1)[0]
        if body.stream:
            return _sse(_chat_chunks(srv, rid, streams, created, body, plan, reqs[0].prompt))
        results = await _collect(srv, streams, http)
        if results is None:
            return JSONResponse(error_body("client disconnected"), status_code=499)
        choices = [_chat_choice(srv, i, r, plan) for i, r in enumerate(results)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": choices, "usage": srv.usage(results, [reqs[0].prompt])}


def _chat_choice(srv: Server, index: int, result: Result, plan: ChatPlan) -> dict:
    from dsv4.toolcalls import parse_reply

    reply = parse_reply(result.text, plan.thinking)
    if reply.dropped:
        log.warning("%s: dropped tool markup that could not be read: %r", result.id, reply.dropped)
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if plan.thinking:
        message["reasoning_content"] = reply.reasoning
    finish = srv.finish_reason(result.finish_reason)
    calls = [c for c in reply.tool_calls if c.complete] if plan.tool_choice != "none" else []
    if calls:
        message["tool_calls"] = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        if finish == "stop":
            finish = "tool_calls"
    return {"index": index, "message": message, "finish_reason": finish,
            "logprobs": srv.chat_logprobs(result.logprobs)}


# ----------------------------------------------------------------------------- relaying outputs
def _deadline(srv: Server) -> float | None:
    return None if srv.request_timeout is None else time.monotonic() + srv.request_timeout


async def _collect(srv: Server, streams: list, http: HTTPRequest) -> list[Result] | None:
    """Wait for every Result, cancelling the requests if the client disconnects first (then None) or
    the request timeout passes (504); a request that failed is a 500."""
    task = asyncio.ensure_future(asyncio.gather(*(final_result(s) for s in streams)))
    deadline = _deadline(srv)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                results = task.result()
                for r in results:
                    if r.finish_reason == ERROR:
                        raise _result_error(r)
                return results
            if await http.is_disconnected():
                return None
            if deadline is not None and time.monotonic() > deadline:
                srv.metrics.reject("timeout")
                raise _timeout_error(srv.request_timeout)
    finally:
        if not task.done():
            task.cancel()  # raises inside each stream's iteration, which cancels its request
            await asyncio.gather(task, return_exceptions=True)


async def _merged(streams: list, deadline: float | None):
    """(choice index, Output) from several Output streams as they come; raises TimeoutError at the
    deadline. Leaving early closes every stream (cancelling unfinished requests)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            i, out = await asyncio.wait_for(queue.get(), timeout)
            if out is None:
                left -= 1
            else:
                yield i, out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await s.aclose()


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


async def _relay(srv: Server, streams: list, on_output):
    """Events for the outputs of `streams` (`on_output(index, out)` yields the chunks of one Output),
    ending with an error event if a request failed or the request timeout passed."""
    merged = _merged(streams, _deadline(srv))
    try:
        async for i, out in merged:
            if out.finish_reason == ERROR:
                yield _event(error_body(f"generation failed: {out.result.error}", "server_error"))
                return
            for ev in on_output(i, out):
                yield ev
    except TimeoutError:
        srv.metrics.reject("timeout")
        err = _timeout_error(srv.request_timeout)
        yield _event(error_body(err.message, err.type, code=err.code))
    finally:
        await merged.aclose()   # cancels the requests still running


async def _completion_chunks(srv: Server, rid: str, streams: list, created: int, body: CompletionRequest,
                             prompts: list[list[int]]):
    base = {"id": rid, "object": "text_completion", "created": created, "model": srv.model_name}
    offsets = [0] * len(streams)
    results: list[Result] = []

    def on_output(i: int, out):
        if out.result is not None:
            results.append(out.result)
        if out.text or out.token_ids or out.finish_reason:
            lp = srv.completion_logprobs(out.logprobs, offsets[i])
            offsets[i] += len(out.text)
            yield _event({**base, "choices": [{"index": i, "text": out.text, "logprobs": lp,
                                               "finish_reason": srv.finish_reason(out.finish_reason)}]})

    async for ev in _relay(srv, streams, on_output):
        yield ev
    if len(results) == len(streams) and body.stream_options and body.stream_options.include_usage:
        yield _event({**base, "choices": [], "usage": srv.usage(results, prompts)})
    yield _event("[DONE]")


async def _chat_chunks(srv: Server, rid: str, streams: list, created: int, body: ChatRequest, plan: ChatPlan,
                       prompt: list[int]):
    from dsv4.toolcalls import ReplyParser

    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": srv.model_name}
    parsers = [ReplyParser(plan.thinking) for _ in streams]
    call_ids: list[dict[int, str]] = [{} for _ in streams]
    results: list[Result] = []

    def chunk(i: int, delta: dict, finish=None, logprobs=None) -> str:
        return _event({**base, "choices": [{"index": i, "delta": delta, "logprobs": logprobs,
                                            "finish_reason": finish}]})

    def on_output(i: int, out):
        d = parsers[i].push(out.text)
        if out.finish_reason is not None:
            end = parsers[i].finish()
            d.reasoning, d.content = d.reasoning + end.reasoning, d.content + end.content
            for c in end.tool_calls:
                d.add_call(c.index, c.name, c.arguments)
        delta: dict[str, Any] = {}
        if d.reasoning:
            delta["reasoning_content"] = d.reasoning
        if d.content:
            delta["content"] = d.content
        if d.tool_calls and plan.tool_choice != "none":
            delta["tool_calls"] = []
            for c in d.tool_calls:
                if c.name is not None:
                    call_ids[i][c.index] = f"call_{uuid.uuid4().hex[:24]}"
                    delta["tool_calls"].append({"index": c.index, "id": call_ids[i][c.index], "type": "function",
                                                "function": {"name": c.name, "arguments": c.arguments}})
                else:
                    delta["tool_calls"].append({"index": c.index, "function": {"arguments": c.arguments}})
        if delta or out.logprobs:
            yield chunk(i, delta, logprobs=srv.chat_logprobs(out.logprobs))
        if out.result is not None:
            results.append(out.result)
            reply = parsers[i].result()
            if reply.dropped:
                log.warning("%s: dropped tool markup that could not be read: %r", out.id, reply.dropped)
            if out.finish_reason != CANCELLED:
                finish = srv.finish_reason(out.finish_reason)
                if finish == "stop" and call_ids[i] and any(c.complete for c in reply.tool_calls):
                    finish = "tool_calls"
                yield chunk(i, {}, finish)

    for i in range(len(streams)):
        yield chunk(i, {"role": "assistant", "content": ""})
    async for ev in _relay(srv, streams, on_output):
        yield ev
    if len(results) == len(streams) and body.stream_options and body.stream_options.include_usage:
        yield _event({**base, "choices": [], "usage": srv.usage(results, [prompt])})
    yield _event("[DONE]")


# ----------------------------------------------------------------------------- startup
def startup_summary(engine: Engine, model_name: str) -> str:
    """Lines logged when the server starts: the model, the cache it holds, device and dtype."""
    from dsv4.cache import cache_bytes

    cfg = engine.config
    counts = cfg.param_counts()
    dbytes = torch_dtype_bytes(engine.dtype)
    per_seq = cache_bytes(cfg, engine.max_len, dtype_bytes=dbytes)["total"]
    layers = ", ".join(f"{cfg.layer_types.count(t)} {t}" for t in dict.fromkeys(cfg.layer_types))
    pc = engine.prefix_cache
    prefix = (f"prefix cache {pc.max_bytes / 2 ** 20:.0f} MiB (blocks of {pc.block} tokens)" if pc is not None
              else "prefix cache off")
    return "\n".join([
        f"serving {model_name!r}: {cfg.num_hidden_layers} layers ({layers}), hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} heads x {cfg.head_dim}, {cfg.n_routed_experts} experts (top "
        f"{cfg.num_experts_per_tok}), vocab {cfg.vocab_size}, MTP blocks {cfg.num_nextn_predict_layers}, "
        f"{counts['total'] / 1e6:.1f}M parameters",
        f"cache: {engine.max_batch} rows x {engine.max_len} tokens; {per_seq / 2 ** 20:.2f} MiB per sequence, "
        f"{engine.cache.nbytes() / 2 ** 20:.1f} MiB allocated; {prefix}",
        f"device {engine.device}, dtype {str(engine.dtype).replace('torch.', '')}, prefill chunk "
        f"{engine.prefill_chunk}, queue {engine.max_queue}, speculative decoding "
        f"{'on' if engine.speculative else 'off'}",
    ])


def torch_dtype_bytes(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()
