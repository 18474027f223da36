"""Independent branches of a CUDA-graph decode step, run concurrently on a second stream.

A decode step at batch 1 is a chain of short kernels, most of them too small to fill the GPU (a
V4-Flash layer: ~30 kernels, its GEMVs far from HBM bandwidth at one token). Some of the chain does not
depend on the rest: the shared expert beside the router and the routed experts; the compressors'
projections and state updates beside the query and key projections; a CSA layer's indexer (its
queries, scores and top-k) beside the attention's query projection. `side` records such a branch on a
second stream, forked from the caller's, and `join` joins it back (`concurrently`: both for one
branch), so that a CUDA graph replays the branches side by side (the graph keeps the forks and the
join as dependencies).

It forks only while a CUDA graph of inference is being recorded (no autograd): an eager step is bound
by the host, to which a second stream adds work, and under `torch.compile` the branch is traced in
line. Elsewhere (CPU, eager, compile, training, `DSV4_STREAMS=0`) both branches run in line on the
caller's stream, side first. Either way the same kernels see the same inputs, so the results are
bitwise the same.

Memory: every tensor a side branch reads must stay referenced by the caller until the join (a tensor
freed by the caller while the side stream may still read it could be handed to a new tensor on the
caller's stream).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, TypeVar

import torch

ENABLED = os.environ.get("DSV4_STREAMS", "1") not in ("", "0")
_SIDE: dict[int, torch.cuda.Stream] = {}
_FORKED: set[int] = set()        # devices whose side stream has work not joined yet

A = TypeVar("A")
B = TypeVar("B")


def active(t: torch.Tensor) -> bool:
    """Whether `side` forks for work on t's device now: enabled, a CUDA graph being recorded, no
    autograd."""
    return (ENABLED and t.is_cuda and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and torch.cuda.is_current_stream_capturing())


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The second stream of a CUDA device (one per device, made on first use)."""
    i = device.index if device.index is not None else torch.cuda.current_device()
    s = _SIDE.get(i)
    if s is None:
        s = _SIDE[i] = torch.cuda.Stream(device=i)
    return s


@contextlib.contextmanager
def side(like: torch.Tensor):
    """Work enqueued in the block runs on the device's second stream when `active(like)`, forked from
    the caller's stream here (it sees everything enqueued before) and after the side work enqueued so
    far; in line otherwise. The caller's stream waits for it at `join`."""
    if not active(like):
        yield
        return
    s = side_stream(like.device)
    s.wait_stream(torch.cuda.current_stream(like.device))
    _FORKED.add(s.device_index)
    with torch.cuda.stream(s):
        yield


def join(like: torch.Tensor) -> None:
    """The caller's stream waits for the side work enqueued so far (a recorded graph must join every
    stream it forked before the recording ends; every `side` is joined by its caller). Nothing when no
    side work is pending: a recording may not wait for a stream it has not forked."""
    if active(like):
        s = side_stream(like.device)
        if s.device_index in _FORKED:
            _FORKED.discard(s.device_index)
            torch.cuda.current_stream(like.device).wait_stream(s)


def concurrently(side_fn: Callable[[], A], main_fn: Callable[[], B], like: torch.Tensor) -> tuple[A, B]:
    """(side_fn(), main_fn()): side_fn in `side(like)` and main_fn on the caller's stream, then `join`:
    the caller's stream waits for side_fn before anything it enqueues after this returns. (The inputs
    side_fn reads must stay referenced until then: the caller holds them for the call.)"""
    with side(like):
        a = side_fn()
    b = main_fn()
    join(like)
    return a, b
