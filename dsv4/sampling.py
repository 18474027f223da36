"""Token sampling for the engine: greedy, temperature, top-k, top-p, log-probs, and the draft and
acceptance rules of speculative decoding.

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
