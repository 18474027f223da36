"""Programmatic dependent launch (PDL) for every kernel of this package.

On sm90+ GPUs each kernel is launched with PDL: the GPU may start it while the previous kernel of the
stream is still running. Its first statement (`pdl_start`) waits until that kernel has finished and its
writes are visible (`griddepcontrol.wait`), then lets the next kernel be scheduled
(`griddepcontrol.launch_dependents`). No memory is touched before the wait (the exceptions, which read
only what older launches wrote, are listed with their reasons in `READS_BEFORE_WAIT`), so the stream order
holds as without PDL; what the overlap hides is the launch latency between kernels, which a decode step of ~40
small kernels a layer pays at every boundary. `bench/probe_pdl.py` measured a CUDA-graph chain of small
kernels on an H200 at 0.47 ms without and 0.39 ms with (wait and trigger).

`DSV4_PDL=0` turns it off. Off on GPUs before sm90 (the instructions do not exist there) and under the
interpreter.

Every launched kernel is also wrapped by `launchable` (`FastLaunch`): a launch whose arguments specialise
as an earlier one's did goes straight to the compiled kernel's launcher, skipping the JIT's per-call work
(argument binding, the cache key's string, option and hook look-ups: ~45 against ~12 µs of host time for
a 30-argument kernel on an H200's host, `bench/probe_launch.py`), which an eager step pays at each of its
~100-200 launches. `DSV4_FAST_LAUNCH=0` turns it off.
"""
from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

from . import INTERPRET

ENABLED = os.environ.get("DSV4_PDL", "1") not in ("", "0") and not INTERPRET
# The kernels that read memory before their wait, and why it is safe: each reads there only what a launch
# at least two back in the stream wrote. With PDL a kernel starts only once its predecessor has passed its
# own wait, so every launch before the predecessor has completed (without PDL, the predecessor itself has).
READS_BEFORE_WAIT = {
    "_hc_post_kernel": "with DEFER, the mix logits of hc_pre's finish, whose sublayer's launches lie between "
                       "(and scale and base, parameters); everything else after the wait",
}
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


# Host-side grid arithmetic as plain integer functions: `triton.cdiv` and `triton.next_power_of_2` are
# constexpr functions in Triton 3.6, and each host call goes through their argument unwrapping (a few
# microseconds a call, several calls a launch, which a host-bound eager step pays hundreds of times).
def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for integers."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# ----------------------------------------------------------------------------- launch cache
FAST = os.environ.get("DSV4_FAST_LAUNCH", "1") not in ("", "0") and not INTERPRET
_I32 = (-(1 << 31), (1 << 31) - 1)


def spec_key(a):
    """What Triton's JIT specialises a launch argument on, as a hashable value: a tensor's dtype and
    whether its address is a multiple of 16; an int's width (i32 / i64 / u64), whether it is a multiple of
    16, and the value 1 (a constant); floats, bools and None by type. Two arguments with equal keys
    compile to the same kernel (`tests/test_kernels.py` checks this against Triton's own specialisation).
    Other types -> `NotImplemented` (the launch then takes the JIT path)."""
    t = type(a)
    if t is torch.Tensor or isinstance(a, torch.Tensor):
        return a.dtype, not a.data_ptr() & 15
    if t is int:
        if a == 1:
            return 1
        return not a & 15, 0 if _I32[0] <= a <= _I32[1] else 1 if a < (1 << 63) else 2
    if t is float:
        return float
    if t is bool:
        return bool
    if a is None:
        return None
    return NotImplemented


_TENSOR = torch.Tensor


def spec_keys(args) -> tuple:
    """`spec_key` of each of args, as a tuple: the common types (plain tensors, ints, floats, None) in
    line, the rest through `spec_key`. A launch's key is built for every launch of an eager step: a
    30-argument kernel's took 7.2 µs of host time through 30 calls of `spec_key` and 4.2 µs this way
    (a 2-core CPU host, `python bench/probe_launch.py --keys`; `tests/test_kernels.py` checks the two
    forms agree)."""
    return tuple([
        (a.dtype, not a.data_ptr() & 15) if type(a) is _TENSOR else
        (1 if a == 1 else (not a & 15, 0 if _I32[0] <= a <= _I32[1] else 1 if a < 9223372036854775808 else 2))
        if type(a) is int else float if type(a) is float else None if a is None else spec_key(a)
        for a in args])


def _hooked() -> bool:
    """Whether a launch hook is installed (Triton 3.6 keeps an empty `HookChain` when none is)."""
    hook = triton.knobs.runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))


class FastLaunch:
    """A Triton kernel launched as `kernel[grid](*args, **kwargs)`, with the compiled kernel kept per
    (device, keyword arguments, `spec_key` of each positional argument): the first launch of a key goes
    through the JIT (which compiles if needed), the next ones call the compiled kernel's launcher with
    the constexpr and default arguments filled in from that first launch. Falls back to the JIT under the
    interpreter, with a launch hook set (profilers that use them), or for arguments `spec_key` does not
    know. Attribute access goes to the JIT function."""

    def __init__(self, fn):
        self.fn = fn
        self.cache: dict = {}
        self.jit_launches = 0          # launches that went through the JIT (first of a key, or fallbacks)
        params = getattr(fn, "params", [])
        self._names = [p.name for p in params]
        self._defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        self._runtime = frozenset(p.name for p in params if not p.is_constexpr)
        self._lead = next((i for i, p in enumerate(params) if p.is_constexpr), len(params))

    def __getattr__(self, name):
        if name == "fn":                       # (not set yet: an object being copied or unpickled)
            raise AttributeError(name)
        return getattr(self.fn, name)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args, kwargs):
        """One launch: from the cache when this key was launched before, else through the JIT. Runtime
        arguments passed by keyword take the JIT path (their values would enter the key)."""
        if not FAST or len(args) > self._lead or not self._runtime.isdisjoint(kwargs) or _hooked():
            self.jit_launches += 1
            return self.fn[grid](*args, **kwargs)
        dev = torch.cuda.current_device()
        keys = spec_keys(args)
        key = (dev, tuple(kwargs.items()), keys)
        try:
            hit = self.cache.get(key)
        except TypeError:                                  # an unhashable constexpr value
            hit = key = None
        if hit is None:
            self.jit_launches += 1
            compiled = self.fn[grid](*args, **kwargs)
            if key is None:
                return compiled
            if NotImplemented not in keys and compiled is not None and not hasattr(compiled, "result"):
                tail = tuple(kwargs.get(n, self._defaults.get(n)) for n in self._names[len(args):])
                self.cache[key] = (compiled, compiled.function, compiled.packed_metadata, tail)
            return compiled
        compiled, function, meta, tail = hit
        n = len(grid)
        compiled.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1,
                     torch._C._cuda_getCurrentRawStream(dev), function, meta, None, None, None, *args, *tail)
        return compiled


def launchable(fn):
    """Decorator for a launched kernel, above `@triton.jit`: `FastLaunch(fn)`, or fn itself under the
    interpreter."""
    return fn if INTERPRET else FastLaunch(fn)
