"""Training schedules of DeepSeek-V4 (report §4.2.2; ARCHITECTURE.md §15): learning rate, MTP loss weight,
batch-size ramp. Pure functions of the step, so a resumed run recomputes them exactly.

    lr  peak |     .-----------------------.
             |    /                         `.
             |   /                            `-.__  final_ratio·peak   (Flash: 2.7e-4 -> 2.7e-5)
           0 +--/-----+-----------------------+----+--> step
             0      warmup               decay_start total
"""
from __future__ import annotations

import math


def lr_at(step: int, *, warmup: int, total: int, decay_start: int, peak: float, final_ratio: float = 0.1) -> float:
    """Learning rate of the 0-based `step`.

    Linear from 0 at step 0 to `peak` at `warmup`, constant until `decay_start`, then half a cosine down
    to `final_ratio · peak` at `total`; steps past `total` keep the final value (a run extended after
    its schedule ended).
    """
    if total < 1:
        raise ValueError(f"total must be >= 1, got {total}")
    if not 0 <= warmup <= total:
        raise ValueError(f"warmup must be in [0, total={total}], got {warmup}")
    if not warmup <= decay_start <= total:
        raise ValueError(f"decay_start must be in [warmup={warmup}, total={total}], got {decay_start}")
    if peak < 0:
        raise ValueError(f"peak must be >= 0, got {peak}")
    if not 0 <= final_ratio <= 1:
        raise ValueError(f"final_ratio must be in [0, 1], got {final_ratio}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    final = final_ratio * peak
    if step < warmup:
        return peak * step / warmup
    if step < decay_start:
        return peak
    if step >= total:
        return final
    progress = (step - decay_start) / (total - decay_start)
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * progress))


def mtp_weight_at(step: int, decay_start: int, before: float = 0.3, after: float = 0.1) -> float:
    """Weight of the multi-token-prediction loss: `before` until the learning-rate decay starts, then
    `after` (report §4.2.2: 0.3 → 0.1)."""
    if decay_start < 0:
        raise ValueError(f"decay_start must be >= 0, got {decay_start}")
    if before < 0 or after < 0:
        raise ValueError(f"MTP weights must be >= 0, got before={before}, after={after}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return before if step < decay_start else after


def batch_tokens_at(step: int, ramp_steps: int, start_tokens: int, final_tokens: int) -> int:
    """Tokens per optimizer step: linear from `start_tokens` at 0 to `final_tokens` at `ramp_steps`, then
    constant (the report ramps the batch up to 75.5 M tokens for Flash; the shape of the ramp is not given,
    DeepSeek-V3's was linear). `step` and `ramp_steps` may count steps or tokens seen, in the same unit."""
    if ramp_steps < 0:
        raise ValueError(f"ramp_steps must be >= 0, got {ramp_steps}")
    if not 0 < start_tokens <= final_tokens:
        raise ValueError(f"need 0 < start_tokens <= final_tokens, got {start_tokens} and {final_tokens}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step >= ramp_steps:
        return final_tokens
    return round(start_tokens + (final_tokens - start_tokens) * step / ramp_steps)
