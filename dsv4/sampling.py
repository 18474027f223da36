"""Token sampling for the engine: greedy, temperature, top-k, top-p, log-probs, the draft and
acceptance rules of speculative decoding, and logits processors (penalties, logit bias).

Each function works on one row's logits [V] (fp32) with that request's own `torch.Generator`, so the
random numbers a request consumes never depend on which other requests share its batch.

A logits processor is a callable `(generated_ids, logits [V]) -> logits [V]` that a request applies
to its row before the token is chosen (greedy or sampled); `generated_ids` are the tokens the request
has generated so far. Processors may keep state, so each request needs its own instances. Log-probs
stay those of the model's raw distribution.
"""
from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence

import torch

SEED_MIN, SEED_MAX = -2 ** 63, 2 ** 64 - 1   # what torch.Generator.manual_seed accepts

LogitsProcessor = Callable[[Sequence[int], torch.Tensor], torch.Tensor]


def is_greedy(temperature: float, top_k: int) -> bool:
    """Temperature 0 and top-k 1 both mean: always the most likely token."""
    return temperature <= 0.0 or top_k == 1


def check_seed(seed) -> None:
    """Raise ValueError unless `seed` is None or an integer torch can seed a generator with."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer; got {seed!r}")
    if not SEED_MIN <= seed <= SEED_MAX:
        raise ValueError(f"seed must lie in [-2**63, 2**64 - 1]; got {seed}")


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A generator for one request; without a seed, a fresh random one."""
    check_seed(seed)
    g = torch.Generator(device=device)
    g.manual_seed(secrets.randbits(63) if seed is None else int(seed))
    return g


class Penalties:
    """OpenAI's presence and frequency penalties and the repetition penalty of transformers/vLLM.

    For each token t: logit -= presence · [t was generated] + frequency · (times t was generated);
    then, for t in the prompt or generated, logit /= r where it is positive and logit *= r where
    not (r > 1 discourages repeats). The counts grow with each call's new tokens (O(new) per step)."""

    def __init__(self, prompt_ids: Sequence[int], presence: float = 0.0, frequency: float = 0.0,
                 repetition: float = 1.0):
        self.presence, self.frequency, self.repetition = presence, frequency, repetition
        self.prompt = sorted(set(int(i) for i in prompt_ids))
        self.counts: dict[int, int] = {}
        self.seen = 0   # generated tokens already counted

    def __call__(self, generated: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        if len(generated) < self.seen:   # another request's ids: start over
            self.counts, self.seen = {}, 0
        for t in generated[self.seen:]:
            self.counts[int(t)] = self.counts.get(int(t), 0) + 1
        self.seen = len(generated)
        if self.repetition != 1.0:
            idx = torch.tensor(sorted(set(self.prompt) | set(self.counts)), dtype=torch.long, device=logits.device)
            if idx.numel():
                v = logits[idx]
                logits[idx] = torch.where(v > 0, v / self.repetition, v * self.repetition)
        if self.counts and (self.presence or self.frequency):
            idx = torch.tensor(list(self.counts), dtype=torch.long, device=logits.device)
            n = torch.tensor(list(self.counts.values()), dtype=logits.dtype, device=logits.device)
            logits[idx] -= self.presence + self.frequency * n
        return logits


class LogitBias:
    """Adds a fixed bias to some token ids (OpenAI's `logit_bias`; -inf bans a token)."""

    def __init__(self, bias: dict[int, float]):
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, generated: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        if self.ids.device != logits.device:
            self.ids, self.values = self.ids.to(logits.device), self.values.to(logits.device)
        logits[self.ids] += self.values.to(logits.dtype)
        return logits


def probabilities(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution a sampled token is drawn from: softmax(logits / T) restricted to the top-k
    tokens and then to the smallest set whose mass reaches top_p (always at least one token). [V] fp32."""
    logits = logits.float() / max(temperature, 1e-5)
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        before = sorted_p.cumsum(-1) - sorted_p                                # mass of strictly better tokens
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum()
    return probs


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None) -> int:
    """One token id from one row of logits [V]."""
    if is_greedy(temperature, top_k):
        return int(logits.argmax())
    return int(torch.multinomial(probabilities(logits, temperature, top_k, top_p), 1, generator=generator))


def draft(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
          generator: torch.Generator | None) -> tuple[int, torch.Tensor | None]:
    """A draft token from the drafter's logits [V] and the distribution q it was drawn from: the
    argmax for greedy requests (q = None, a point mass), else a sample from the request's own
    processed distribution (temperature, top-k, top-p), which is accepted more often."""
    if is_greedy(temperature, top_k):
        return int(logits.argmax()), None
    q = probabilities(logits, temperature, top_k, top_p)
    return int(torch.multinomial(q, 1, generator=generator)), q


def verify_draft(logits: torch.Tensor, token: int, q: torch.Tensor | None, temperature: float, top_k: int,
                 top_p: float, generator: torch.Generator | None) -> tuple[int, bool]:
    """Speculative decoding's accept/reject step for a one-token draft (Leviathan et al. 2023).

    Greedy: accept iff the draft is the argmax. Sampling with target distribution p: accept with
    probability min(1, p(token) / q(token)), otherwise draw from max(p − q, 0) renormalised; for a
    point-mass draft (q = None) that is: accept with probability p(token), else draw from p without
    it. Either way the returned token is distributed exactly as `sample` would draw it.
    Returns (token, accepted).
    """
    if is_greedy(temperature, top_k):
        best = int(logits.argmax())
        return best, best == token
    p = probabilities(logits, temperature, top_k, top_p)
    ratio = p[token] if q is None else p[token] / q[token]
    u = torch.rand((), device=p.device, generator=generator)
    if bool(u < ratio):
        return token, True
    if q is None:
        rest = p.clone()
        rest[token] = 0.0
    else:
        rest = (p - q).clamp_min(0.0)
    if float(rest.sum()) <= 0.0:  # p equals the draft distribution up to rounding
        rest = p
    return int(torch.multinomial(rest, 1, generator=generator)), False


def token_logprobs(logits: torch.Tensor, token: int, top_n: int = 0) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of `token` under the model's own distribution (softmax of the raw logits,
    before temperature and truncation), and the `top_n` most likely (id, log-prob) pairs."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top: list[tuple[int, float]] = []
    if top_n > 0:
        vals, idx = lp.topk(min(top_n, lp.shape[-1]))
        top = list(zip(idx.tolist(), vals.tolist()))
    return float(lp[token]), top
