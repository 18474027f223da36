"""Step profiling shared by the benchmarks (`profile_steps.py`, `bench_flash_shaped.py`, `bench_train.py`):

* `capture(fn)`: fn run once with CUDA's sync-debug mode on; (message, stack) of each operation that
  makes the host wait for the GPU (torch's notice about the mode itself left out);
* `profile_once(fn)`: one call under torch.profiler; the kernel table by device time, and the kernels'
  summed device time and count (the driver's launch-API records, `cuLaunchKernel*`, not counted);
  `details=True` adds every kernel by name (device ms, count) and the dtype copies by input shape and
  dtype (where the conversions come from);
* `timeline(fn, path)`: fn under torch.profiler, its Chrome trace written to path, and the kernels'
  timeline summarised (`summarize_trace`): the span from the first kernel's start to the last one's
  end, the time at least one kernel runs, how many run at once on average, and device time by kernel
  name. For CUDA-graph replays, where the table's per-launch view says nothing about overlap;
* `end_gaps(path)`: the kernels of one replay in a trace in start order, each with the time from the
  previous kernel's end to its own end (with PDL a kernel starts early and waits, so its duration
  overstates it; on a chain of dependent kernels the gap between ends is what it adds), and those gaps
  summed by kernel name. `python bench/step_profile.py TRACE.json[.gz] [--replay I] [--timeline]`.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import traceback
import warnings
from pathlib import Path

import torch


def profile_once(fn, rows: int = 30, details: bool = False):
    """(kernel table, ms of device time summed over kernels, number of kernels) of one call of fn; with
    `details`, a fourth item: the text of every kernel by name and of the dtype copies by shape."""
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts, record_shapes=details) as prof:
        fn()
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
           and not e.name.startswith(("cuLaunchKernel", "cudaLaunchKernel"))]
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)
    out = (table, sum(e.device_time for e in evs) / 1e3, len(evs))
    if not details:
        return out
    by_name: dict[str, list] = {}
    for e in evs:
        acc = by_name.setdefault(e.name, [0.0, 0])
        acc[0] += e.device_time / 1e3
        acc[1] += 1
    lines = [f"{'ms':>9} {'count':>6}  kernel"]
    lines += [f"{ms:9.3f} {n:6d}  {name[:150]}" for name, (ms, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])]
    copies = [a for a in prof.key_averages(group_by_input_shape=True) if a.key in ("aten::_to_copy", "aten::copy_")]
    copies.sort(key=lambda a: -a.device_time_total)
    lines += ["", f"{'ms':>9} {'count':>6}  dtype copy (input shapes)"]
    lines += [f"{a.device_time_total / 1e3:9.3f} {a.count:6d}  {a.key} {a.input_shapes}" for a in copies[:80]]
    return (*out, "\n".join(lines))


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


def timeline(fn, path, repeats: int = 1) -> dict:
    """fn called `repeats` times under torch.profiler; Chrome trace to path; `summarize_trace` of it
    (per call: the span and busy time divided by `repeats`)."""
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    return summarize_trace(path, repeats)


def summarize_trace(path, repeats: int = 1, top: int = 40) -> dict:
    """Kernels of a Chrome trace (events of category "kernel"): `span_us` first start to last end,
    `busy_us` the union of their intervals, `concurrency` summed kernel time over busy time, `streams`,
    `kernels` (count), and `by_name` {name: [µs, count]} of the `top` names by time; times per repeat."""
    events = _events(path)
    ks = sorted((float(e["ts"]), float(e["dur"]), e["name"], (e.get("args") or {}).get("stream"))
                for e in events if e.get("cat") == "kernel" and "dur" in e)
    if not ks:
        return {"kernels": 0}
    busy, cur_s, cur_e = 0.0, ks[0][0], ks[0][0] + ks[0][1]
    for ts, dur, _, _ in ks[1:]:
        if ts > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = ts, ts + dur
        else:
            cur_e = max(cur_e, ts + dur)
    busy += cur_e - cur_s
    span = max(ts + dur for ts, dur, _, _ in ks) - ks[0][0]
    total = sum(dur for _, dur, _, _ in ks)
    by_name: dict[str, list] = {}
    for _, dur, name, _ in ks:
        acc = by_name.setdefault(name[:80], [0.0, 0])
        acc[0] += dur / repeats
        acc[1] += 1
    ranked = dict(sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top])
    return {"kernels": len(ks) // repeats, "span_us": span / repeats, "busy_us": busy / repeats,
            "concurrency": total / busy if busy else 0.0, "streams": len({k[3] for k in ks}),
            "by_name": {k: [round(v[0], 2), v[1]] for k, v in ranked.items()}}


def _events(path) -> list:
    raw = Path(path).read_bytes()
    return json.loads(gzip.decompress(raw) if str(path).endswith(".gz") else raw).get("traceEvents", [])


def end_gaps(path, replays: int = 3, replay: int = 0) -> tuple[list, dict]:
    """([(start µs from the replay's first kernel, duration, end gap, stream, name, grid)], {name: [Σ end
    gap µs, count]}) for replay `replay` of `replays` equal replays recorded in the trace at path."""
    ks = sorted((float(e["ts"]), float(e["dur"]), e["name"], (e.get("args") or {}).get("stream"),
                 (e.get("args") or {}).get("grid")) for e in _events(path) if e.get("cat") == "kernel")
    n = len(ks) // replays
    rep = ks[replay * n:(replay + 1) * n]
    if not rep:
        return [], {}
    t0, prev, rows = rep[0][0], rep[0][0], []
    by_name: dict = collections.defaultdict(lambda: [0.0, 0])
    for ts, dur, name, stream, grid in rep:
        gap = max(0.0, ts + dur - prev)
        prev = max(prev, ts + dur)
        rows.append((ts - t0, dur, gap, stream, name, grid))
        by_name[name][0] += gap
        by_name[name][1] += 1
    return rows, dict(by_name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="End gaps of the kernels of a recorded step (see end_gaps).")
    ap.add_argument("trace", help="Chrome trace (.json or .json.gz) of `replays` replays of one graph")
    ap.add_argument("--replays", type=int, default=3)
    ap.add_argument("--replay", type=int, default=0)
    ap.add_argument("--timeline", action="store_true", help="every kernel in start order, not only the sums")
    a = ap.parse_args(argv)
    rows, by_name = end_gaps(a.trace, a.replays, a.replay)
    streams = sorted({r[3] for r in rows}, key=str)
    if a.timeline:
        for start, dur, gap, stream, name, grid in rows:
            print(f"{start:9.1f} {dur:7.2f} +{gap:6.2f} s{streams.index(stream)} {name[:40]:40s} {grid}")
    span = sum(v[0] for v in by_name.values())
    print(f"span {span:.1f} us, {len(rows)} kernels on {len(streams)} streams; end gaps by kernel:")
    for name, (us, count) in sorted(by_name.items(), key=lambda kv: -kv[1][0]):
        print(f"  {us:8.1f} us {count:4d}  {name[:70]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
