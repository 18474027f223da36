"""Where a call makes the host wait for the GPU: `capture(fn)` runs fn once with CUDA's sync-debug mode
on and returns (message, stack) for each synchronising operation (torch's notice about the mode itself
left out). Shared by `bench_train.py` and `profile_steps.py`."""
from __future__ import annotations

import traceback
import warnings

import torch


def capture(fn, frames: int = 9) -> list[tuple[str, list[traceback.FrameSummary]]]:
    found = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "prototype feature" not in str(message):
            found.append((str(message), traceback.extract_stack(limit=frames)[:-2]))

    old = warnings.showwarning
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = old
    return found
