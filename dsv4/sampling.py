"""Token sampling for the engine: greedy, temperature, top-k, top-p, log-probs, and the acceptance rule
of speculative decoding with a deterministic (greedy) draft.

Each function works on one row's logits [V] (fp32) with that request's own `torch.Generator`, so the
random numbers a request consumes never depend on which other requests share its batch.
"""
from __future__ import annotations

import secrets

import torch


def is_greedy(temperature: float, top_k: int) -> bool:
    """Temperature 0 and top-k 1 both mean: always the most likely token."""
    return temperature <= 0.0 or top_k == 1


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A generator for one request; without a seed, a fresh random one."""
    g = torch.Generator(device=device)
    g.manual_seed(secrets.randbits(63) if seed is None else int(seed))
    return g


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


def verify_draft(logits: torch.Tensor, draft: int, temperature: float, top_k: int, top_p: float,
                 generator: torch.Generator | None) -> tuple[int, bool]:
    """Speculative decoding's accept/reject step for a one-token draft chosen deterministically.

    Greedy: accept iff the draft is the argmax. Sampling: the draft distribution is a point mass on
    `draft`, so the standard rule (accept with min(1, p/q), else draw from max(p − q, 0)) becomes:
    accept with probability p(draft), otherwise draw from p with the draft removed. The token
    returned is distributed exactly as `sample` would draw it. Returns (token, accepted).
    """
    if is_greedy(temperature, top_k):
        best = int(logits.argmax())
        return best, best == draft
    probs = probabilities(logits, temperature, top_k, top_p)
    u = torch.rand((), device=probs.device, generator=generator)
    if bool(u < probs[draft]):
        return draft, True
    rest = probs.clone()
    rest[draft] = 0.0
    if float(rest.sum()) <= 0.0:  # p(draft) = 1 up to rounding: nothing else can be drawn
        return draft, True
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
