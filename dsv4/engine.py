"""Generation engine: chunked prefill, continuous batching over one preallocated `DecodeCache`,
sampling, stop conditions, UTF-8-safe streaming and MTP speculative decoding.

Life of a request: `add()` validates it (refusing, before any work, one that cannot fit in a cache
row) and queues it. Each `step()` then
  1. admits waiting requests into free cache rows (a row is reset when it is handed out);
  2. prefills admitted prompts, `prefill_chunk` tokens per step in total, so that a long prompt does
     not stall the rows already decoding; rows at the same position share one forward;
  3. decodes every row whose prompt is done in one forward (rows at different lengths), samples
     each row with its own `torch.Generator`, applies the stop rules and streams text deltas.
A request leaves at EOS, a stop token or string, `max_tokens`, or `cancel()`; its row is free for
the next step. `EngineLoop` runs the steps on a background thread for the HTTP server.

Speculative decoding (spec ARCHITECTURE.md §9): the MTP block drafts the token after next from the
main model's streams h_t and token t+1. With `speculative=True` the MTP block is fed every position
in order, so each decode step verifies [last token, draft] in one main-model call (S = 2):
  * accepted: both positions' logits are used, two tokens per call;
  * rejected: the draft's position is dropped from the main cache (`snapshot` before the call, then
    `rollback` keeping the first position), one token per call and no further main-model call. (A
    row the rollback cannot rebuild goes back to the snapshot and its last token is fed again; for a
    two-token verify call that does not happen, see `DecodeCache.rollback`.)
Greedy output is identical to plain greedy decoding. Sampling requests draw the draft from their own
processed MTP distribution q and accept it with probability min(1, p/q), else draw from max(p − q, 0):
each token is distributed exactly as without speculation. Requests with logits processors (penalties,
logit bias, constraints) decode without speculation.

Prefix caching (`prefix_cache_bytes > 0`, dsv4/prefix_cache.py): prefill chunks end at multiples of
the compression ratios' lcm, the row's state there is kept, and a request whose prompt starts with a
kept prefix starts from a copy of it.
Shapes: b rows in a call, S tokens per row, V vocab, N streams, D model dim.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import torch

from dsv4.cache import DecodeCache
from dsv4.graphs import DecodeGraphs
from dsv4.prefix_cache import PrefixCache, block_keys, mtp_key, prefix_block
from dsv4.sampling import (LogitBias, LogitsProcessor, Penalties, check_seed, draft, is_greedy, make_generator,
                           sample, token_logprobs, verify_draft)

log = logging.getLogger("dsv4.engine")

STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"
MAX_LOGPROBS = 20
MTP_CHUNK = 128  # positions per MTP call while feeding a prompt (bounds its [S, V] logits)


class RequestError(ValueError):
    """A request that can never run (too long for a cache row, bad parameters). Nothing was computed."""


class PromptTooLong(RequestError):
    """Prompt + max_tokens does not fit in a cache row (the engine's context)."""


class EngineOverloaded(RuntimeError):
    """The queue of waiting requests is full; try again later."""


@dataclass
class Request:
    """One generation request. `prompt` is text (needs a tokenizer; BOS is prepended unless the text
    starts with it, as chat prompts do) or a list of token ids (used as given).

    temperature 0 (or top_k 1) is greedy decoding. `stop` strings end the text before the match and
    are never emitted; `stop_token_ids` (and EOS unless `ignore_eos`) end it after the token, whose
    text is not emitted. `logprobs`: None for none, 0 for the chosen tokens' log-probabilities,
    k > 0 to add the k most likely alternatives. Penalties (presence/frequency as OpenAI's,
    repetition as transformers'), `logit_bias` ({token id: added logit}, -inf bans) and `processors`
    (`dsv4.sampling`: one instance per request) change the distribution the token is chosen from.
    `skip_special_tokens` hides the tokenizer's control tokens from the text (`Tokenizer.control_ids`:
    placeholders, BOS/EOS, turn markers; `<think>`, `</think>` and DSML stay).
    """
    prompt: str | Sequence[int]
    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    processors: Sequence[LogitsProcessor] = ()
    skip_special_tokens: bool = True
    id: str = field(default_factory=lambda: "req-" + uuid.uuid4().hex[:24])


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (id, log-prob), most likely first


@dataclass
class Result:
    """A finished request. `text` excludes stop strings and the text of stop tokens (EOS);
    `token_ids` lists every generated token, a final stop token included."""
    id: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str                 # "stop" | "length" | "cancelled" | "error"
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None
    drafted: int = 0                   # speculative decoding: drafts verified / accepted
    accepted: int = 0
    cached_tokens: int = 0             # prompt tokens taken from the prefix cache
    times: dict[str, float] = field(default_factory=dict)   # time.monotonic() of "arrival", "first_token", "finished"


@dataclass
class Output:
    """What one step produced for one request: new tokens and new text (a delta that never splits a
    character nor shows the start of a possible stop string). The last one has `finish_reason` and
    `result`; the concatenation of every `text` equals `result.text`."""
    id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    result: Result | None = None


# ----------------------------------------------------------------------------- text of one request
class TextStream:
    """Turns one request's token ids into text deltas: characters are never split (the tokenizer's
    StreamDecoder), a tail that could begin a stop string is held back, and the text is cut at the
    first stop string."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), skip_special: bool = False):
        from dsv4.tokenizer import StreamDecoder

        hide = tokenizer.control_ids if tokenizer is not None and skip_special else ()
        self.decoder = StreamDecoder(tokenizer, hide=hide) if tokenizer is not None else None
        self.stop = [s for s in stop if s]
        self.text = ""   # decoded so far (cut at a stop string once one is found)
        self.sent = 0    # characters already released

    def push(self, token_id: int) -> tuple[str, bool]:
        """Returns (delta, hit a stop string)."""
        if self.decoder is None:
            return "", False
        self.text += self.decoder.push(token_id)
        return self._release(final=False)

    def finish(self) -> tuple[str, bool]:
        """The rest of the text at the end of the stream (an incomplete character becomes U+FFFD)."""
        if self.decoder is not None:
            self.text += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> tuple[str, bool]:
        # A match can only start at or after `sent`: text before it never was a possible stop prefix.
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            cut = min(hits)
            delta, self.text, self.sent = self.text[self.sent:cut], self.text[:cut], cut
            return delta, True
        end = len(self.text)
        if not final:
            for s in self.stop:  # hold back the longest tail that is a proper prefix of a stop string
                for k in range(min(len(s) - 1, len(self.text) - self.sent), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        delta, self.sent = self.text[self.sent:end], end
        return delta, False


_THINK_END = "</think>"


class ThinkSplit:
    """Chat replies in thinking mode are `{reasoning}</think>{answer}`: this routes generated text to
    reasoning until `</think>`, then to content. A tail that may be the start of `</think>` is held
    back, so streamed pieces concatenate to the non-streamed fields."""

    def __init__(self, thinking: bool):
        self.reasoning_mode, self.buf = thinking, ""

    def push(self, text: str) -> tuple[str, str]:
        if not self.reasoning_mode:
            return "", text
        self.buf += text
        i = self.buf.find(_THINK_END)
        if i >= 0:
            r, c = self.buf[:i], self.buf[i + len(_THINK_END):]
            self.reasoning_mode, self.buf = False, ""
            return r, c
        keep = next((k for k in range(min(len(_THINK_END) - 1, len(self.buf)), 0, -1)
                     if self.buf.endswith(_THINK_END[:k])), 0)
        r, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return r, ""

    def flush(self) -> tuple[str, str]:
        r, self.buf = self.buf, ""
        return r, ""


# ----------------------------------------------------------------------------- one running request
class _Seq:
    def __init__(self, req: Request, prompt_ids: list[int], tokenizer, sink, stop_ids: set[int],
                 processors: list[LogitsProcessor]):
        self.req, self.sink, self.stop_ids, self.processors = req, sink, stop_ids, processors
        self.times = {"arrival": time.monotonic()}
        self.cached = 0                      # prompt tokens loaded from the prefix cache
        self.prefix_keys: list[bytes] | None = None
        self.snapshot_at = 0                 # a boundary shared with an earlier prompt: end a chunk there
        self.ids = list(prompt_ids)          # prompt + generated; ids[:fed] are in the cache
        self.n_prompt = len(prompt_ids)
        self.row: int | None = None
        self.fed = 0
        self.greedy = is_greedy(req.temperature, req.top_k)
        self.generator: torch.Generator | None = None
        self.spec = False                    # fed to the MTP block, drafting
        self.draft: int | None = None
        self.draft_q: torch.Tensor | None = None   # distribution the draft was sampled from (None: argmax)
        self.drafted = self.accepted = 0
        self.stream = TextStream(tokenizer, req.stop, req.skip_special_tokens)
        self.logprobs: list[TokenLogprob] | None = [] if req.logprobs is not None else None
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.new_tokens: list[int] = []
        self.new_text: list[str] = []
        self.new_logprobs: list[TokenLogprob] = []

    @property
    def n_generated(self) -> int:
        return len(self.ids) - self.n_prompt

    @property
    def remaining(self) -> int:
        return self.req.max_tokens - self.n_generated

    def append(self, token: int, lp: TokenLogprob | None) -> bool:
        """Add a generated token and apply the stop rules; True when the request is finished."""
        self.times.setdefault("first_token", time.monotonic())
        self.ids.append(token)
        self.new_tokens.append(token)
        if lp is not None:
            self.logprobs.append(lp)
            self.new_logprobs.append(lp)
        if token in self.stop_ids:
            self.finish(STOP)
            return True
        delta, hit = self.stream.push(token)
        self.new_text.append(delta)
        if hit:
            self.finish_reason = STOP  # text already cut at the stop string
            self.times["finished"] = time.monotonic()
            return True
        if self.remaining <= 0:
            self.finish(LENGTH)
        return self.finish_reason is not None

    def finish(self, reason: str, error: str | None = None) -> None:
        if self.finish_reason is not None:
            return
        delta, hit = self.stream.finish()
        self.new_text.append(delta)
        self.finish_reason, self.error = (STOP if hit else reason), error
        self.times["finished"] = time.monotonic()

    def output(self) -> Output | None:
        if not (self.new_tokens or any(self.new_text) or self.finish_reason):
            return None
        out = Output(self.req.id, "".join(self.new_text), self.new_tokens,
                     self.new_logprobs if self.logprobs is not None else None, self.finish_reason)
        if self.finish_reason is not None:
            out.result = Result(self.req.id, self.ids[:self.n_prompt], self.ids[self.n_prompt:], self.stream.text,
                                self.finish_reason, self.logprobs, self.error, self.drafted, self.accepted,
                                self.cached, dict(self.times))
        self.new_tokens, self.new_text, self.new_logprobs = [], [], []
        return out


def _take(snap, idx: torch.Tensor):
    """The part of a `DecodeCache.snapshot` that belongs to some of its rows (every tensor in a
    snapshot is indexed by row along dim 0)."""
    if isinstance(snap, torch.Tensor):
        return snap[idx]
    if isinstance(snap, dict):
        return {k: _take(v, idx) for k, v in snap.items()}
    if isinstance(snap, (list, tuple)):
        return type(snap)(_take(v, idx) for v in snap)
    return snap


# ----------------------------------------------------------------------------- the engine
class Engine:
    """Continuous-batching generation over one model and one preallocated `DecodeCache`.

    model: a `dsv4.model.Transformer` (eval mode); tokenizer: a `dsv4.tokenizer.Tokenizer`, or None
        for token-id prompts only (no text, no stop strings).
    max_batch: cache rows = requests decoded together; max_len: tokens per row (prompt + output),
        capped by the model's max_position_embeddings; prefill_chunk: prompt tokens prefilled per
        step (over all rows); max_queue: waiting requests before `add` raises EngineOverloaded
        (None: unbounded); speculative: MTP speculative decoding (the model needs an MTP block);
        cuda_graphs: replay plain decode steps from CUDA graphs (`dsv4.graphs`; default: on CUDA),
        compile: also pass the decode step through `torch.compile` first; prefix_cache_bytes: memory
        for prefix-cache snapshots on the model's device (0: no prefix caching); kv_fp8: keep the
        compressed entries as FP8 rows (`DecodeCache`).

    `add`/`cancel` may be called from any thread; `step` from one thread only.
    """

    def __init__(self, model, tokenizer=None, *, max_batch: int = 8, max_len: int = 4096,
                 prefill_chunk: int = 2048, max_queue: int | None = None, speculative: bool = False,
                 eos_token_id: int | None = None, cuda_graphs: bool | None = None, compile: bool = False,
                 prefix_cache_bytes: int = 0, kv_fp8: bool = False):
        cfg = model.config
        if speculative and not getattr(model, "mtp", None):
            raise ValueError("speculative decoding drafts with the MTP block, but this model has none "
                             "(num_nextn_predict_layers = 0); run without speculative decoding")
        if max_batch < 1 or max_len < 2 or prefill_chunk < 1:
            raise ValueError(f"max_batch, prefill_chunk must be >= 1 and max_len >= 2; got {max_batch}, "
                             f"{prefill_chunk}, {max_len}")
        self.model, self.tokenizer, self.config = model, tokenizer, cfg
        self.max_batch, self.prefill_chunk, self.max_queue = max_batch, prefill_chunk, max_queue
        self.max_len = min(max_len, cfg.max_position_embeddings)
        self.speculative = speculative
        if eos_token_id is None:
            eos_token_id = tokenizer.eos_id if tokenizer is not None else cfg.eos_token_id
        self.eos_token_id = eos_token_id
        p = model.embed.weight
        self.device, self.dtype = p.device, p.dtype
        self.cache = DecodeCache(cfg, max_batch, self.max_len, device=self.device, dtype=self.dtype, kv_fp8=kv_fp8)
        # plain decode steps: rows are distinct and admitted with room for their tokens, ids come from sampling
        self.decode_step = DecodeGraphs(model, self.cache, enabled=cuda_graphs, compile=compile)
        self.free_rows = list(range(max_batch))
        self.waiting: deque[_Seq] = deque()
        self.running: dict[int, _Seq] = {}   # row -> sequence (prefilling or decoding)
        self._lock = threading.Lock()
        self._cancel: set[str] = set()
        self._ids: set[str] = set()          # ids of queued or running requests
        self._ended: list[Output] = []       # last Outputs of requests that ended without a row
        self.prefix_cache = PrefixCache(prefix_block(cfg), prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.stats = {"prefill_tokens": 0, "generated_tokens": 0, "steps": 0, "drafted": 0, "accepted": 0,
                      "refeeds": 0, "cached_tokens": 0}

    # ------------------------------------------------------------------ public API
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / verified MTP drafts so far (None before the first draft)."""
        d = self.stats["drafted"]
        return self.stats["accepted"] / d if d else None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._cancel)

    def add(self, request: Request, sink: Callable[[Output], None] | None = None) -> str:
        """Validate and queue a request; `sink(output)` is called (on the stepping thread) with each
        Output. Raises RequestError (never fits / bad parameters) or EngineOverloaded (queue full)."""
        seq = self._prepare(request, sink)
        with self._lock:
            if request.id in self._ids:
                raise RequestError(f"a request with id {request.id!r} is already queued or running")
            if self.max_queue is not None and len(self.waiting) >= self.max_queue:
                raise EngineOverloaded(f"the queue is full ({self.max_queue} requests waiting for one of "
                                       f"{self.max_batch} batch rows); retry later")
            self._ids.add(request.id)
            self.waiting.append(seq)
        return request.id

    def cancel(self, request_id: str) -> None:
        """Stop a queued or running request; its cache row is freed at the next step."""
        with self._lock:
            if request_id in self._ids:
                self._cancel.add(request_id)

    def step(self) -> list[Output]:
        """Admit, prefill, decode once; returns the Outputs of this step (also sent to the sinks)."""
        self._apply_cancels()
        self._admit()
        try:
            with torch.no_grad():
                self._prefill()
                self._decode()
        except Exception as exc:  # a failing forward ends the running requests, never the loop
            log.exception("engine step failed")
            for seq in self.running.values():
                seq.finish(ERROR, f"{type(exc).__name__}: {exc}")
        self.stats["steps"] += 1
        return self._emit()

    def fail_all(self, message: str) -> list[Output]:
        """End every queued and running request with finish_reason "error" (the loop hit a bug)."""
        with self._lock:
            waiting, self.waiting = list(self.waiting), deque()
        for seq in waiting:
            seq.finish(ERROR, message)
            self._ended.append(self._deliver(seq))
        for seq in self.running.values():
            seq.finish(ERROR, message)
        return self._emit()

    def generate(self, prompts: Sequence[str | Sequence[int] | Request], **params) -> list[Result]:
        """Run prompts (texts, id lists or Requests; `params` are Request fields) to completion with
        continuous batching; results in the order of the prompts. Not for use while an EngineLoop runs."""
        reqs = [p if isinstance(p, Request) else Request(prompt=p, **params) for p in prompts]
        for r in reqs:
            self._prepare(r, None)  # refuse the whole batch before starting any of it
        results: dict[str, Result] = {}
        pending = deque(reqs)
        while pending or self.has_work():
            while pending and (self.max_queue is None or len(self.waiting) < self.max_queue):
                self.add(pending.popleft())
            for out in self.step():
                if out.result is not None:
                    results[out.id] = out.result
        return [results[r.id] for r in reqs]

    # ------------------------------------------------------------------ validation
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt: text gets BOS unless it starts with it (chat prompts do)."""
        if not isinstance(prompt, str):
            return [int(i) for i in prompt]
        if self.tokenizer is None:
            raise RequestError("this engine has no tokenizer: pass the prompt as a list of token ids")
        return self.tokenizer.encode(prompt, add_bos=not prompt.startswith(self.tokenizer.bos_token))

    def _prepare(self, req: Request, sink) -> _Seq:
        def bad(msg: str):
            raise RequestError(msg)

        ids = self.encode(req.prompt)
        V = self.config.vocab_size
        if not ids:
            bad("the prompt is empty")
        if min(ids) < 0 or max(ids) >= V:
            bad(f"prompt token ids must lie in [0, {V}) (the model's vocabulary); got min {min(ids)}, "
                f"max {max(ids)}")
        if not isinstance(req.max_tokens, int) or req.max_tokens < 1:
            bad(f"max_tokens must be a positive integer; got {req.max_tokens!r}")
        if len(ids) + req.max_tokens > self.max_len:
            raise PromptTooLong(f"the prompt ({len(ids)} tokens) plus max_tokens ({req.max_tokens}) is "
                                f"{len(ids) + req.max_tokens} tokens, more than the context of {self.max_len} "
                                "tokens this engine was started with; shorten the prompt or lower max_tokens")
        if not (req.temperature >= 0.0 and req.temperature < float("inf")):
            bad(f"temperature must be >= 0; got {req.temperature!r}")
        if not (0.0 < req.top_p <= 1.0):
            bad(f"top_p must be in (0, 1]; got {req.top_p!r}")
        if not isinstance(req.top_k, int) or req.top_k < 0:
            bad(f"top_k must be an integer >= 0 (0 = off); got {req.top_k!r}")
        if req.logprobs is not None and not (isinstance(req.logprobs, int) and 0 <= req.logprobs <= MAX_LOGPROBS):
            bad(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}]; got {req.logprobs!r}")
        if isinstance(req.stop, str) or any(not isinstance(s, str) for s in req.stop):
            bad("stop must be a list of strings")
        if req.stop and self.tokenizer is None:
            bad("stop strings need a tokenizer; use stop_token_ids")
        stop_ids = {int(i) for i in req.stop_token_ids}
        if not req.ignore_eos:
            stop_ids.add(self.eos_token_id)
        try:
            check_seed(req.seed)
        except ValueError as exc:
            bad(str(exc))
        for name, lo, hi in (("presence_penalty", -2.0, 2.0), ("frequency_penalty", -2.0, 2.0),
                             ("repetition_penalty", 1e-6, float("inf"))):
            v = getattr(req, name)
            if not (isinstance(v, (int, float)) and lo <= v <= hi and math.isfinite(v)):
                bad(f"{name} must be a number in [{lo:g}, {hi:g}]; got {v!r}")
        bias = {}
        for k, v in (req.logit_bias or {}).items():
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < V:
                bad(f"logit_bias keys must be token ids in [0, {V}); got {k!r}")
            if not isinstance(v, (int, float)) or math.isnan(v) or v == float("inf"):
                bad(f"logit_bias values must be numbers (-inf bans a token); got {v!r} for token {k}")
            bias[k] = float(v)
        processors = []
        if bias:
            processors.append(LogitBias(bias))
        if req.presence_penalty or req.frequency_penalty or req.repetition_penalty != 1.0:
            processors.append(Penalties(ids, req.presence_penalty, req.frequency_penalty, req.repetition_penalty))
        processors += list(req.processors)
        return _Seq(req, ids, self.tokenizer, sink, stop_ids, processors)

    # ------------------------------------------------------------------ scheduling
    def _apply_cancels(self) -> None:
        with self._lock:
            cancel, self._cancel = self._cancel, set()
            if not cancel:
                return
            dropped = [s for s in self.waiting if s.req.id in cancel]
            self.waiting = deque(s for s in self.waiting if s.req.id not in cancel)
        for seq in dropped:
            seq.finish(CANCELLED)
            self._ended.append(self._deliver(seq))
        for seq in self.running.values():
            if seq.req.id in cancel:
                seq.finish(CANCELLED)

    def _admit(self) -> None:
        """Give waiting requests free rows. A request that fails here ends with an error alone; its
        row goes back at once."""
        while self.free_rows:
            with self._lock:
                if not self.waiting:
                    return
                seq = self.waiting.popleft()
            row = self.free_rows.pop(0)
            try:
                self.cache.reset([row])
                seq.row, seq.fed = row, 0
                if not seq.greedy:
                    seq.generator = make_generator(seq.req.seed, self.device)
                seq.spec = self.speculative and seq.req.max_tokens >= 2 and not seq.processors
                self._load_prefix(seq)
            except Exception as exc:
                log.exception("admitting %s failed", seq.req.id)
                seq.finish(ERROR, f"{type(exc).__name__}: {exc}")
                self._ended.append(self._deliver(seq))
                self.free_rows.append(row)
                self.free_rows.sort()
                continue
            self.running[row] = seq

    def _load_prefix(self, seq: _Seq) -> None:
        """Start the row from the longest cached prefix of the prompt (leaving >= 1 token to prefill)."""
        pc = self.prefix_cache
        if pc is None:
            return
        seq.prefix_keys = block_keys(seq.ids, pc.block, seq.n_prompt - 1)
        n, state = pc.lookup(seq.prefix_keys, seq.ids, seq.n_prompt - 1, mtp=seq.spec)
        seq.snapshot_at = pc.shared(seq.prefix_keys, seq.n_prompt - 1)
        if state is not None:
            with torch.no_grad():
                self.cache.load_row(seq.row, state)
            seq.fed = seq.cached = n
            self.stats["cached_tokens"] += n

    def _store_prefix(self, seq: _Seq) -> None:
        """Keep the row's state if its prefill stopped at a block boundary inside the prompt."""
        pc = self.prefix_cache
        if pc is None or seq.fed % pc.block or seq.fed >= seq.n_prompt or seq.finish_reason is not None:
            return
        k = seq.fed // pc.block
        key = seq.prefix_keys[k - 1]
        if seq.spec:
            key = mtp_key(key, seq.ids[seq.fed])
        if key not in pc:
            state = self.cache.copy_row(seq.row)
            pc.store(key, state, self.cache.row_state_bytes(state))

    def check(self) -> list[str]:
        """Inconsistencies that would stop the engine from serving (for health checks; call it
        between steps, from the stepping thread)."""
        problems = []
        rows = sorted(self.free_rows + list(self.running))
        if rows != list(range(self.max_batch)):
            problems.append(f"cache rows are lost or doubled: free {sorted(self.free_rows)}, running "
                            f"{sorted(self.running)} of {self.max_batch}")
        return problems

    def _emit(self) -> list[Output]:
        outs, self._ended = [o for o in self._ended if o is not None], []
        for row, seq in list(self.running.items()):
            out = self._deliver(seq)
            if out is not None:
                outs.append(out)
            if seq.finish_reason is not None:
                del self.running[row]
                self.free_rows.append(row)
        self.free_rows.sort()
        return outs

    def _deliver(self, seq: _Seq) -> Output | None:
        out = seq.output()
        if out is None:
            return None
        if out.finish_reason is not None:
            with self._lock:
                self._ids.discard(seq.req.id)
        if seq.sink is not None:
            try:
                seq.sink(out)
            except Exception:  # a consumer that went away must not stop the engine
                log.exception("output sink of %s failed", seq.req.id)
        return out

    # ------------------------------------------------------------------ forward passes
    def _rows(self, seqs: list[_Seq]) -> torch.Tensor:
        return torch.tensor([s.row for s in seqs], dtype=torch.long, device=self.device)

    def _ids_tensor(self, rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _prefill(self) -> None:
        """Feed up to `prefill_chunk` prompt tokens (over all rows); rows at the same position with the
        same chunk length share one forward. A finished prompt samples its first token."""
        budget, groups = self.prefill_chunk, defaultdict(list)
        for seq in self.running.values():
            if budget <= 0:
                break
            if seq.fed < seq.n_prompt and seq.finish_reason is None:
                n = min(seq.n_prompt - seq.fed, budget)
                if self.prefix_cache is not None:  # end at a shared boundary, else at the last one before the end
                    b = self.prefix_cache.block
                    boundary = min(seq.fed + n, seq.n_prompt - 1) // b * b
                    if seq.fed < seq.snapshot_at < seq.fed + n:
                        boundary = seq.snapshot_at
                    if boundary > seq.fed:
                        n = boundary - seq.fed
                groups[(seq.fed, n)].append(seq)
                budget -= n
        for (start, n), seqs in groups.items():
            rows = self._rows(seqs)
            ids = self._ids_tensor([s.ids[start:start + n] for s in seqs])            # [b, n]
            spec = [i for i, s in enumerate(seqs) if s.spec]
            logits, h = self.model(ids, cache=self.cache, rows=rows, last_only=True, return_hidden=True)
            self.stats["prefill_tokens"] += ids.numel()
            done = []
            for i, s in enumerate(seqs):
                s.fed += n
                if s.fed == s.n_prompt:
                    done.append(i)
            if done:
                self._choose([seqs[i] for i in done], logits[done])
            spec = [i for i in spec if seqs[i].finish_reason is None]
            if spec:  # MTP position t takes (h_t, token t+1); the first generated token is now known
                next_ids = self._ids_tensor([seqs[i].ids[start + 1:start + n + 1] for i in spec])
                last = self._mtp(h[spec], next_ids, rows[spec])
                for j, i in enumerate(spec):
                    if i in done:
                        self._draft(seqs[i], last[j])
            for s in seqs:
                self._store_prefix(s)

    def _draft(self, s: _Seq, logits: torch.Tensor) -> None:
        r = s.req
        s.draft, s.draft_q = draft(logits, r.temperature, r.top_k, r.top_p, s.generator)

    def _mtp(self, h: torch.Tensor, next_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Feed positions to the MTP block in order (in pieces of MTP_CHUNK); logits of the last one [b, V]."""
        for s0 in range(0, next_ids.shape[1], MTP_CHUNK):
            out = self.model.mtp_logits(h[:, s0:s0 + MTP_CHUNK], next_ids[:, s0:s0 + MTP_CHUNK],
                                        cache=self.cache, rows=rows)
        return out[:, -1]

    def _decode(self) -> None:
        ready = [s for s in self.running.values() if s.fed >= s.n_prompt and s.finish_reason is None]
        for s in ready:
            if s.spec and s.remaining < 2:  # no room for two tokens: plain decoding until the end
                s.spec = False
        spec = [s for s in ready if s.spec]
        plain = [s for s in ready if not s.spec]
        if plain:
            logits = self.decode_step(self._ids_tensor([[s.ids[-1]] for s in plain]), self._rows(plain))  # [b, V]
            for s in plain:
                s.fed += 1
            self._choose(plain, logits)
        if spec:
            self._decode_speculative(spec)

    def _choose(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """Pick each row's next token from logits [b, V] (after its processors) and append it."""
        raw = logits
        if any(s.processors for s in seqs):
            logits = logits.clone()       # the raw logits still give the log-probs
            for i, s in enumerate(seqs):
                if s.processors:
                    self._process(s, logits[i])
        greedy = [i for i, s in enumerate(seqs) if s.greedy]
        best = dict(zip(greedy, logits[greedy].argmax(-1).tolist())) if greedy else {}
        for i, s in enumerate(seqs):
            if s.finish_reason is not None:   # a processor failed
                continue
            t = best[i] if s.greedy else sample(logits[i], s.req.temperature, s.req.top_k, s.req.top_p, s.generator)
            s.append(t, self._logprob(s, raw[i], t))
            self.stats["generated_tokens"] += 1

    def _process(self, s: _Seq, row: torch.Tensor) -> None:
        """Apply a request's logits processors to its row [V] in place; a failing processor, or one that
        leaves no token possible, ends that request alone."""
        try:
            out = row
            for p in s.processors:
                out = p(s.ids[s.n_prompt:], out)
            if not bool(torch.isfinite(out).any()):
                raise RuntimeError("the logits processors left no token possible")
            if out is not row:
                row.copy_(out)
        except Exception as exc:
            log.exception("logits processor of %s failed", s.req.id)
            s.finish(ERROR, f"{type(exc).__name__}: {exc}")

    def _logprob(self, s: _Seq, logits: torch.Tensor, token: int) -> TokenLogprob | None:
        if s.req.logprobs is None:
            return None
        lp, top = token_logprobs(logits, token, s.req.logprobs)
        return TokenLogprob(token, lp, top)

    def _decode_speculative(self, seqs: list[_Seq]) -> None:
        """Verify [last, draft] for every row in one call; roll back the rows that reject."""
        rows = self._rows(seqs)
        snap = self.cache.snapshot(rows)
        ids = self._ids_tensor([[s.ids[-1], s.draft] for s in seqs])                     # [b, 2]
        logits, h = self.model(ids, cache=self.cache, rows=rows, return_hidden=True)     # [b, 2, V], [b, 2, N, D]
        greedy = [i for i, s in enumerate(seqs) if s.greedy]
        best = dict(zip(greedy, logits[greedy, 0].argmax(-1).tolist())) if greedy else {}
        accepted, rejected = [], []
        for i, s in enumerate(seqs):
            r = s.req
            if s.greedy:
                tok, ok = best[i], best[i] == s.draft
            else:
                tok, ok = verify_draft(logits[i, 0], s.draft, s.draft_q, r.temperature, r.top_k, r.top_p,
                                       s.generator)
            s.drafted += 1
            s.accepted += ok
            self.stats["drafted"] += 1
            self.stats["accepted"] += ok
            self.stats["generated_tokens"] += 1
            s.fed += 2
            if s.append(tok, self._logprob(s, logits[i, 0], tok)):
                continue
            if ok:
                accepted.append(i)
            else:
                rejected.append(i)
        if accepted:  # the second position's logits give one more token
            self._choose([seqs[i] for i in accepted], logits[accepted, 1])
        if rejected:  # drop the draft's position, keep `last`'s
            idx = torch.tensor(rejected, device=self.device)
            refeed = idx[self.cache.rollback(_take(snap, idx), torch.ones_like(idx))]
            if refeed.numel():  # rows sent back to the snapshot: feed `last` alone
                self.model(ids[refeed, :1], cache=self.cache, rows=rows[refeed], last_only=True)
                self.stats["refeeds"] += refeed.numel()
            for i in rejected:
                seqs[i].fed -= 1
        # feed the MTP block the newly confirmed positions and take the next drafts
        acc = [i for i in accepted if seqs[i].finish_reason is None]
        rej = [i for i in rejected if seqs[i].finish_reason is None]
        for group, width in ((acc, 2), (rej, 1)):
            if group:
                nxt = self._ids_tensor([seqs[i].ids[-width:] for i in group])
                last = self._mtp(h[group, :width], nxt, rows[group])
                for j, i in enumerate(group):
                    self._draft(seqs[i], last[j])


def generate(model, prompts: Sequence[str | Sequence[int]], tokenizer=None, *, max_len: int | None = None,
             max_batch: int | None = None, speculative: bool = False, **params) -> list[Result]:
    """One-call generation: an Engine sized for these prompts, run to completion.

    params are Request fields (max_tokens, temperature, top_k, top_p, seed, stop, ...).
    """
    if not prompts:
        return []
    max_tokens = params.get("max_tokens", Request.max_tokens)
    if max_len is None:
        longest = max(len(tokenizer.encode(p, add_bos=True)) if isinstance(p, str) else len(p) for p in prompts)
        max_len = longest + max_tokens
    engine = Engine(model, tokenizer, max_batch=max_batch or min(len(prompts), 32), max_len=max_len,
                    speculative=speculative)
    return engine.generate(prompts, **params)


# ----------------------------------------------------------------------------- background loop
class EngineLoop:
    """Runs `engine.step()` on a background thread while there is work; thread-safe `submit` and
    `cancel`, and `open()` for asyncio code (the HTTP server). `health()` says whether it serves:
    the thread is alive, no step has run longer than `stall_seconds`, and the engine's own checks
    (`Engine.check`, run after every step) pass. `on_result(result)` and `on_step(engine)` are called
    on the loop's thread after each finished request and each step (metrics)."""

    def __init__(self, engine: Engine, stall_seconds: float = 300.0,
                 on_result: Callable[[Result], None] | None = None, on_step: Callable[[Engine], None] | None = None):
        self.engine, self.stall_seconds = engine, stall_seconds
        self.on_result, self.on_step = on_result, on_step
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.step_started: float | None = None   # time.monotonic() of the step in progress
        self.problems: list[str] = []

    def start(self) -> "EngineLoop":
        self._thread = threading.Thread(target=self._run, name="dsv4-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop stepping; whatever is still queued or running ends with an error (rows freed)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive() and self.engine.has_work():
                self.engine.fail_all("the engine loop stopped (server shutting down)")

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def health(self) -> tuple[bool, str]:
        """(serving, "ok" or what is wrong)."""
        if not self.alive:
            return False, "engine stopped"
        started = self.step_started
        if started is not None and time.monotonic() - started > self.stall_seconds:
            return False, f"engine stalled: one step has run {time.monotonic() - started:.0f} s"
        if self.problems:
            return False, "engine wedged: " + "; ".join(self.problems)
        return True, "ok"

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.engine.has_work():
                self.step_started = time.monotonic()
                try:
                    self.engine.step()
                except Exception as exc:  # keep serving: fail what is in flight, not the thread
                    log.exception("engine loop error")
                    self.engine.fail_all(f"{type(exc).__name__}: {exc}")
                finally:
                    self.step_started = None
                self.problems = self.engine.check()
                if self.on_step is not None:
                    self.on_step(self.engine)
            else:
                self._wake.wait(0.1)
                self._wake.clear()

    def submit(self, request: Request, sink: Callable[[Output], None]) -> None:
        if self.on_result is not None:
            inner, observe = sink, self.on_result

            def sink(out: Output) -> None:
                if out.result is not None:
                    try:
                        observe(out.result)
                    except Exception:
                        log.exception("on_result failed")
                inner(out)
        self.engine.add(request, sink)
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        self.engine.cancel(request_id)
        self._wake.set()

    def open(self, request: Request) -> AsyncIterator[Output]:
        """Submit now (raising RequestError / EngineOverloaded at once) and return an async iterator
        over the request's Outputs, to be consumed on the calling event loop. Closing the iterator
        before the last Output (a client that went away) cancels the request and frees its row."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Output] = asyncio.Queue()

        def sink(out: Output) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, out)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

        self.submit(request, sink)
        return self._follow(request.id, queue)

    async def _follow(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[Output]:
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finish_reason is not None
                yield out
        finally:
            if not finished:
                self.cancel(request_id)

    async def run(self, request: Request) -> Result:
        """Submit and wait for the Result (cancelling the request if this coroutine is cancelled)."""
        return await final_result(self.open(request))


async def final_result(outputs) -> Result:
    """Drain an `EngineLoop.open` stream to its Result; closing the stream (also on cancellation)
    cancels the request."""
    try:
        async for out in outputs:
            if out.result is not None:
                return out.result
    finally:
        await outputs.aclose()
    raise RuntimeError("the engine stopped before the request finished")


# ----------------------------------------------------------------------------- loading for the commands
def resolve_device(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """Defaults: CUDA in bf16 when available, else CPU in fp32."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype is None:
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; choose bf16, fp16 or fp32")
    return dev, names[dtype]


def load_model(spec: str, device: torch.device, dtype: torch.dtype, seed: int = 0, quantized: bool | None = None):
    """(model, tokenizer, notes) for a checkpoint folder or a preset name (random weights).

    The tokenizer is the folder's tokenizer.json, else the bundled DeepSeek-V4 one when the model's
    vocabulary holds it, else a byte-level tokenizer (random-weight presets with a small vocabulary).
    `notes` are lines worth telling the user (what was loaded, which tokenizer).
    """
    from pathlib import Path

    from dsv4.config import PRESETS, preset
    from dsv4.model import Transformer

    notes = []
    path = Path(spec)
    if spec in PRESETS and not (path / "config.json").is_file():
        path = None  # a preset name, even where a folder of that name exists (bench/)
    if path is not None and path.is_dir():
        from dsv4.checkpoint import load_pretrained
        from dsv4.quant import describe

        model = load_pretrained(path, device=device, dtype=dtype, quantized=quantized)
        notes.append(f"model: {path} ({device}, {str(dtype).replace('torch.', '')}); {describe(model)}")
    elif spec in PRESETS:
        torch.manual_seed(seed)
        model = Transformer(preset(spec)).to(device).to_dtype(dtype).eval()
        notes.append(f"model: preset {spec!r} with RANDOM weights (seed {seed}); its output is noise")
    else:
        raise FileNotFoundError(f"{spec!r} is neither a model folder nor a preset name "
                                f"(presets: {', '.join(PRESETS)})")
    tokenizer, note = tokenizer_for(model.config.vocab_size, path)
    notes.append(note)
    return model, tokenizer, notes


def tokenizer_for(vocab_size: int, folder=None):
    """(tokenizer, description) that fits a model with `vocab_size` ids."""
    from dsv4.tokenizer import BUNDLED_VOCAB_SIZE, DEFAULT_TRAIN_SPECIAL_TOKENS, load_tokenizer, train_bpe

    if folder is not None and (folder / "tokenizer.json").is_file():
        tok = load_tokenizer(folder)
        return tok, f"tokenizer: {folder / 'tokenizer.json'} ({tok.vocab_size} ids)"
    if vocab_size >= BUNDLED_VOCAB_SIZE:   # (loading the bundled one takes seconds: only when it fits)
        try:
            tok = load_tokenizer()
            if tok.vocab_size <= vocab_size:
                return tok, f"tokenizer: bundled DeepSeek-V4 ({tok.vocab_size} ids)"
        except FileNotFoundError:
            pass
    n = len(DEFAULT_TRAIN_SPECIAL_TOKENS) + 256
    if n > vocab_size:
        raise ValueError(f"no tokenizer fits a vocabulary of {vocab_size} ids: put a tokenizer.json in the "
                         "model folder")
    return train_bpe([], vocab_size=n), (f"tokenizer: byte-level ({n} ids; the DeepSeek-V4 tokenizer needs "
                                         f"more than the model's {vocab_size})")
