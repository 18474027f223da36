"""Step profiling shared by the benchmarks (`profile_steps.py`, `bench_flash_shaped.py`, `bench_train.py`):

* `capture(fn)`: fn run once with CUDA's sync-debug mode on; (message, stack) of each operation that
  makes the host wait for the GPU (torch's notice about the mode itself left out);
* `profile_once(fn)`: one call under torch.profiler; the kernel table by device time, and the kernels'
  summed device time and count (the driver's launch-API records, `cuLaunchKernel*`, not counted).
"""
from __future__ import annotations

import traceback
import warnings

import torch


def profile_once(fn, rows: int = 30) -> tuple[str, float, int]:
    """(kernel table, ms of device time summed over kernels, number of kernels) of one call of fn."""
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
           and not e.name.startswith(("cuLaunchKernel", "cudaLaunchKernel"))]
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)
    return table, sum(e.device_time for e in evs) / 1e3, len(evs)


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
