"""The server's `/metrics`: Prometheus text format (exposition format 0.0.4), written by hand.

Names follow vLLM's (`vllm:` becomes `dsv4:`), so dashboards built for one read the other:
gauges for the queue, the running requests, cache-row and token use and the prefix cache; counters
for prompt and generated tokens and finished requests by reason; histograms of time to first token,
time per output token and end-to-end latency; a generated-tokens-per-second gauge over the last 10 s.
Request timings come from each finished `Result` (engine thread); everything is guarded by one lock.
"""
from __future__ import annotations

import bisect
import threading
import time
from collections import deque

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
RATE_WINDOW = 10.0   # seconds over which tokens/s is measured


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)   # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, total = [], 0
        for le, c in zip([*map(_num, self.buckets), "+Inf"], self.counts):
            total += c
            out.append(f'{name}_bucket{{{labels},le="{le}"}} {total}')
        out += [f"{name}_sum{{{labels}}} {_num(self.sum)}", f"{name}_count{{{labels}}} {self.count}"]
        return out


def _num(v: float) -> str:
    return repr(float(v)) if v != int(v) or abs(v) >= 1e15 else str(int(v)) + ".0"


class ServerMetrics:
    def __init__(self, model_name: str):
        self.labels = f'model_name="{_escape(model_name)}"'
        self.lock = threading.Lock()
        self.ttft, self.tpot, self.e2e = Histogram(TTFT_BUCKETS), Histogram(TPOT_BUCKETS), Histogram(E2E_BUCKETS)
        self.finished: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.samples: deque = deque()   # (time, generated tokens so far)

    # -- engine thread
    def observe(self, result) -> None:
        t = result.times
        with self.lock:
            self.finished[result.finish_reason] = self.finished.get(result.finish_reason, 0) + 1
            if "first_token" in t:
                self.ttft.observe(t["first_token"] - t["arrival"])
                n = len(result.token_ids)
                if n > 1 and "finished" in t:
                    self.tpot.observe((t["finished"] - t["first_token"]) / (n - 1))
            if "finished" in t:
                self.e2e.observe(t["finished"] - t["arrival"])

    def sample(self, generated_tokens: int) -> None:
        now = time.monotonic()
        with self.lock:
            if self.samples and now - self.samples[-1][0] < 0.25:
                return
            self.samples.append((now, generated_tokens))
            while len(self.samples) > 2 and now - self.samples[1][0] > RATE_WINDOW:
                self.samples.popleft()

    # -- event loop
    def reject(self, reason: str) -> None:
        with self.lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def tokens_per_second(self, generated_tokens: int) -> float:
        now = time.monotonic()
        with self.lock:
            old = [(t, n) for t, n in self.samples if now - t <= RATE_WINDOW]
        if not old:
            return 0.0
        t0, n0 = old[0]
        return (generated_tokens - n0) / max(now - t0, 1e-3)

    def render(self, engine) -> str:
        """The whole exposition text."""
        L = self.labels
        stats = dict(engine.stats)
        rows_used = engine.num_running
        lengths = engine.cache.lengths
        tokens_used = int(lengths.sum()) if rows_used else 0
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, value=None, samples=None) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            if samples is not None:
                lines.extend(samples)
            else:
                lines.append(f"{name}{{{L}}} {_num(value)}")

        metric("dsv4:num_requests_running", "gauge", "Requests holding a cache row (prefilling or decoding).",
               rows_used)
        metric("dsv4:num_requests_waiting", "gauge", "Requests waiting for a free cache row.", engine.num_waiting)
        metric("dsv4:kv_cache_usage_perc", "gauge", "Fraction of the cache rows in use (1 = all).",
               rows_used / engine.max_batch)
        metric("dsv4:kv_cache_token_usage_perc", "gauge",
               "Fraction of the cache's token positions (rows x max_len) holding tokens.",
               tokens_used / (engine.max_batch * engine.max_len))
        metric("dsv4:prompt_tokens_total", "counter", "Prompt tokens prefilled (prefix-cache hits excluded).",
               stats["prefill_tokens"])
        metric("dsv4:generation_tokens_total", "counter", "Tokens generated.", stats["generated_tokens"])
        metric("dsv4:generation_tokens_per_second", "gauge",
               f"Tokens generated per second over the last {RATE_WINDOW:.0f} s.",
               self.tokens_per_second(stats["generated_tokens"]))
        pc = engine.prefix_cache
        pstats = pc.stats if pc is not None else {"queries": 0, "hits": 0, "hit_tokens": 0}
        metric("dsv4:prefix_cache_queries_total", "counter", "Requests that looked up the prefix cache.",
               pstats["queries"])
        metric("dsv4:prefix_cache_hits_total", "counter", "Requests that started from a cached prefix.",
               pstats["hits"])
        metric("dsv4:prefix_cache_hit_tokens_total", "counter", "Prompt tokens taken from the prefix cache.",
               pstats["hit_tokens"])
        metric("dsv4:prefix_cache_bytes", "gauge", "Bytes held by prefix-cache snapshots.",
               pc.bytes if pc is not None else 0)
        if engine.speculative:
            metric("dsv4:spec_decode_num_draft_tokens_total", "counter", "MTP draft tokens verified.",
                   stats["drafted"])
            metric("dsv4:spec_decode_num_accepted_tokens_total", "counter", "MTP draft tokens accepted.",
                   stats["accepted"])
        with self.lock:
            finished, rejected = dict(self.finished), dict(self.rejected)
            hists = [(h, list(h.counts), h.sum, h.count) for h in (self.ttft, self.tpot, self.e2e)]
        metric("dsv4:request_success_total", "counter", "Finished requests by finish reason.",
               samples=[f'dsv4:request_success_total{{{L},finished_reason="{r}"}} {n}'
                        for r, n in sorted(finished.items())] or [f'dsv4:request_success_total{{{L},finished_reason="stop"}} 0'])
        metric("dsv4:request_rejected_total", "counter", "Requests refused before generation, by reason.",
               samples=[f'dsv4:request_rejected_total{{{L},reason="{r}"}} {n}' for r, n in sorted(rejected.items())]
               or [f'dsv4:request_rejected_total{{{L},reason="queue_full"}} 0'])
        for (name, help_), (h, counts, s, c) in zip(
                (("dsv4:time_to_first_token_seconds", "Time from arrival to the first generated token."),
                 ("dsv4:time_per_output_token_seconds", "Mean time between generated tokens of a request."),
                 ("dsv4:e2e_request_latency_seconds", "Time from arrival to the end of a request.")), hists):
            snap = Histogram(h.buckets)
            snap.counts, snap.sum, snap.count = counts, s, c
            metric(name, "histogram", help_, samples=snap.lines(name, L))
        return "\n".join(lines) + "\n"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
