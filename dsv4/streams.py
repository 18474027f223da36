"""Independent branches of a CUDA-graph decode step, run concurrently on a second stream.

A decode step at batch 1 is a chain of short kernels, most of them too small to fill the GPU (a
V4-Flash layer: ~30 kernels, its GEMVs far from HBM bandwidth at one token). Some of the chain does not
depend on the rest: the shared expert beside the router and the routed experts; the compressors'
projections and state updates beside the query and key projections. `concurrently` records such a
branch on a second stream, forked from and joined back to the caller's, so that a CUDA graph replays
the two branches side by side (the graph keeps the fork and the join as dependencies).

It forks only while a CUDA graph of inference is being recorded (no autograd): an eager step is bound
by the host, to which a second stream adds work, and under `torch.compile` the branch is traced in
line. Elsewhere (CPU, eager, compile, training, `DSV4_STREAMS=0`) both branches run in line on the
caller's stream, side first.
Either way the same kernels see the same inputs, so the results are bitwise the same.

Memory: every tensor the side branch reads must stay referenced by the caller until the join (a
tensor freed by the caller while the side stream may still read it could be handed to a new tensor on
the caller's stream); `concurrently` holds its `keep` tensors until it has joined.
"""
from __future__ import annotations

import os
from typing import Callable, TypeVar

import torch

ENABLED = os.environ.get("DSV4_STREAMS", "1") not in ("", "0")
_SIDE: dict[int, torch.cuda.Stream] = {}

A = TypeVar("A")
B = TypeVar("B")


def active(t: torch.Tensor) -> bool:
    """Whether `concurrently` forks for work on t's device now: enabled, a CUDA graph being recorded,
    no autograd."""
    return (ENABLED and t.is_cuda and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and torch.cuda.is_current_stream_capturing())


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The second stream of a CUDA device (one per device, made on first use)."""
    i = device.index if device.index is not None else torch.cuda.current_device()
    s = _SIDE.get(i)
    if s is None:
        s = _SIDE[i] = torch.cuda.Stream(device=i)
    return s


def concurrently(side: Callable[[], A], main: Callable[[], B], like: torch.Tensor,
                 keep: tuple = ()) -> tuple[A, B]:
    """(side(), main()): side on the device's second stream and main on the caller's, when `active(like)`;
    else both in line, side first. The caller's stream waits for side before anything it enqueues after
    this returns. keep: tensors side reads that the caller might drop before then (held to the join)."""
    if not active(like):
        return side(), main()
    cur = torch.cuda.current_stream(like.device)
    s = side_stream(like.device)
    s.wait_stream(cur)                    # the fork: side sees everything enqueued before it
    with torch.cuda.stream(s):
        a = side()
    b = main()
    cur.wait_stream(s)                    # the join
    del keep
    return a, b
