"""Programmatic dependent launch (PDL) for every kernel of this package.

On sm90+ GPUs each kernel is launched with PDL: the GPU may start it while the previous kernel of the
stream is still running. Its first statement (`pdl_start`) waits until that kernel has finished and its
writes are visible (`griddepcontrol.wait`), then lets the next kernel be scheduled
(`griddepcontrol.launch_dependents`). No memory is touched before the wait, so the stream order holds as
without PDL; what the overlap hides is the launch latency between kernels, which a decode step of ~40
small kernels a layer pays at every boundary. `bench/probe_pdl.py` measured a CUDA-graph chain of small
kernels on an H200 at 0.47 ms without and 0.39 ms with (wait and trigger).

`DSV4_PDL=0` turns it off. Off on GPUs before sm90 (the instructions do not exist there) and under the
interpreter.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import INTERPRET

ENABLED = os.environ.get("DSV4_PDL", "1") not in ("", "0") and not INTERPRET
_CAPABLE: dict[int, bool] = {}
_ON = {"PDL": True, "launch_pdl": True}
_OFF: dict = {}


def pdl(t: torch.Tensor) -> dict:
    """Launch options for a kernel whose tensors live where t does: {PDL, launch_pdl} on a CUDA device of
    compute capability 9.0 or more (when enabled), else none."""
    if not ENABLED or t.device.type != "cuda":
        return _OFF
    i = t.device.index if t.device.index is not None else torch.cuda.current_device()
    ok = _CAPABLE.get(i)
    if ok is None:
        ok = _CAPABLE[i] = torch.cuda.get_device_capability(i) >= (9, 0)
    return _ON if ok else _OFF


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """First statement of every kernel: with PDL, wait for the previous kernel, then let the next start."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
