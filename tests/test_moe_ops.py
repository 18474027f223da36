"""Routed experts (`ops.moe_experts`): the sync-free implementations ('grouped' on torch._grouped_mm,
'gather' on per-pair bmm) against the loop reference and a float64 re-computation, outputs and
gradients; the dispatch rule; and the absence of host synchronisation (CPU: a dispatch mode that
refuses the ops that read a tensor on the host, and a one-graph torch.compile trace; CUDA: sync debug
mode and CUDA-graph capture).

Tolerances are the largest error relative to the reference's largest magnitude (`rel`); measured
worst cases over 40 seeds of the shape grid in brackets:
  fp32  1e-5 against float64 and against the loop [≤ 7e-7]: both round the same ≤ 32-term products in
        fp32; on CPU the grouped path runs the same mm per expert as the loop and mostly equals it bit
        for bit. The routing-weight gradient gets 5e-5 [1.3e-5]: each entry is one D-term dot product
        (output gradient · expert output) that can cancel to well below its terms.
  bf16  The policy rounds to bf16 (relative step 2^-8) after W1/W3, before W2 and after W2, and sums a
        token's K outputs in bf16, so y is within a few bf16 steps of float64: 3e-2 [1.2e-2]. Gradients
        are not comparable to float64 element by element: an input rounded across the SwiGLU clamp
        switches that element's derivative on or off (the bf16 loop measures up to 0.8 against float64
        on dw3), so a fast path must be no further from float64 than the loop is, plus 2e-2. Against
        the bf16 loop only the order of the bf16 sums differs: 2e-2, about two bf16 steps [1.1e-2].
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsv4 import ops

FAST = {"grouped": ops.moe_experts_grouped, "gather": ops.moe_experts_gather}
TOL_LOOP = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# (N tokens, K per token, E experts): N·K < E, one expert, K = E, many tokens; random ids, so
# experts with no token and tokens listing an expert twice both occur
SHAPES = [(1, 2, 16), (3, 1, 1), (2, 4, 4), (5, 3, 4), (37, 6, 16), (64, 2, 8)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def make(N: int, K: int, E: int, dtype: torch.dtype, D: int = 32, I: int = 16, seed: int = 0):
    """x, idx, weight, w1, w2, w3 and an output gradient; w1/w3 scaled so SwiGLU's clamp (limit 4) is hit."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    idx = torch.randint(0, E, (N, K), generator=g)
    weight = torch.rand(N, K, generator=g) + 0.1
    w1 = torch.randn(E, I, D, generator=g) * 3 / D ** 0.5
    w2 = torch.randn(E, D, I, generator=g) / I ** 0.5
    w3 = torch.randn(E, I, D, generator=g) * 3 / D ** 0.5
    gy = torch.randn(N, D, generator=g)
    return [x.to(dtype), idx, weight, w1.to(dtype), w2.to(dtype), w3.to(dtype), gy.to(dtype)]


def run(fn, x, idx, weight, w1, w2, w3, gy, limit=4.0, grad=True):
    """[y, dx, dweight, dw1, dw2, dw3] of fn on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_(grad) for t in (x, weight, w1, w2, w3)]
    y = fn(leaves[0], idx, leaves[1], leaves[2], leaves[3], leaves[4], limit)
    if not grad:
        return [y]
    y.backward(gy)
    return [y.detach()] + [t.grad for t in leaves]


def f64(tensors):
    return [t.double() if t.is_floating_point() else t for t in tensors]


NAMES = ["y", "dx", "dweight", "dw1", "dw2", "dw3"]


def check(name: str, dtype: torch.dtype, got: torch.Tensor, loop: torch.Tensor, truth: torch.Tensor, where=""):
    """`got` against the float64 `truth` and the same-dtype `loop` (tolerances: module docstring)."""
    assert got.dtype == loop.dtype and got.shape == loop.shape, (where, name)
    err = rel(got, truth)
    if dtype == torch.float32:
        limit = 5e-5 if name == "dweight" else 1e-5
        assert err < limit and rel(got, loop) < limit, (where, name, err, rel(got, loop))
        return
    bound = 3e-2 if name == "y" else rel(loop, truth) + TOL_LOOP[dtype]
    assert err < bound, (where, name, err, bound)
    assert rel(got, loop) < TOL_LOOP[dtype], (where, name, rel(got, loop))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", sorted(FAST))
@pytest.mark.parametrize("limit", [4.0, 0.0], ids=["clamped", "unclamped"])
def test_fast_paths_match_loop_and_float64(impl, dtype, limit):
    for seed, (N, K, E) in enumerate(SHAPES):
        args = make(N, K, E, dtype, seed=seed)
        truth = run(ops.moe_experts_loop, *f64(args), limit=limit)
        loop = run(ops.moe_experts_loop, *args, limit=limit)
        got = run(FAST[impl], *args, limit=limit)
        for name, g, l, t in zip(NAMES, got, loop, truth):
            check(name, dtype, g, l, t, where=(N, K, E))


@pytest.mark.parametrize("impl", ["loop", "grouped", "gather"])
def test_token_listing_an_expert_twice_gets_both_contributions(impl):
    fn = {"loop": ops.moe_experts_loop, **FAST}[impl]
    x, _, _, w1, w2, w3, _ = make(3, 2, 4, torch.float32)
    twice = fn(x, torch.tensor([[2, 2], [1, 1], [0, 3]]), torch.tensor([[0.3, 0.5], [1.0, 1.0], [0.2, 0.7]]),
               w1, w2, w3, 4.0)
    once = fn(x, torch.tensor([[2], [1], [0]]), torch.tensor([[0.8], [2.0], [0.2]]), w1, w2, w3, 4.0)
    other = fn(x, torch.tensor([[3]] * 3), torch.tensor([[0.0], [0.0], [0.7]]), w1, w2, w3, 4.0)
    assert rel(twice, once + other) < 1e-6


def test_dispatch_rule():
    x, idx, _, w1, w2, w3, _ = make(8, 2, 4, torch.float32)
    assert ops.moe_path(x, idx, w1, w2, w3) == "grouped"                       # fp32, rows of 16 bytes
    xb, _, _, w1b, w2b, w3b, _ = make(8, 2, 4, torch.bfloat16)
    assert ops.moe_path(xb, idx, w1b, w2b, w3b) == "grouped"
    # float64 (grouped_mm has no float64): per-pair bmm while N·K ≤ E, else the loop (CPU: syncs are free)
    xd, w1d, w2d, w3d = (t.double() for t in (x, w1, w2, w3))
    assert ops.moe_path(xd, idx[:2], w1d, w2d, w3d) == "gather"
    assert ops.moe_path(xd, idx, w1d, w2d, w3d) == "loop"
    # a row stride that is not a multiple of 16 bytes: D = 6 in fp32, I = 12 in bf16
    xm, _, _, w1m, w2m, w3m, _ = make(8, 2, 4, torch.float32, D=6)
    assert not ops.grouped_mm_applies(xm, w1m, w2m, w3m)
    xm, _, _, w1m, w2m, w3m, _ = make(8, 2, 4, torch.bfloat16, I=12)
    assert not ops.grouped_mm_applies(xm, w1m, w2m, w3m)
    # the same weights stored transposed (column-major rows) are not taken either
    w1t = w1.transpose(1, 2).contiguous().transpose(1, 2)
    assert not ops.grouped_mm_applies(x, w1t, w2, w3)


@pytest.mark.parametrize("N", [2, 40])
def test_moe_experts_float64_matches_loop(N):
    x, idx, weight, w1, w2, w3, gy = f64(make(N, 2, 8, torch.float32))
    assert ops.moe_path(x, idx, w1, w2, w3) == ("gather" if N * 2 <= 8 else "loop")
    for g, l in zip(run(ops.moe_experts, x, idx, weight, w1, w2, w3, gy),
                    run(ops.moe_experts_loop, x, idx, weight, w1, w2, w3, gy)):
        assert rel(g, l) < 1e-12


def test_gradient_of_a_sum():
    """`y.sum().backward()` feeds an expanded (stride-0) gradient, which grouped_mm refuses as an operand."""
    args = make(9, 2, 4, torch.float32)
    grads = []
    for fn in (ops.moe_experts_grouped, ops.moe_experts_loop):
        leaves = [t.clone().requires_grad_() for t in (args[0], args[2], *args[3:6])]
        fn(leaves[0], args[1], *leaves[1:], 4.0).sum().backward()
        grads.append([t.grad for t in leaves])
    for name, g, l in zip(NAMES[1:], *grads):
        assert rel(g, l) < 1e-5, name


def test_no_tokens():
    x, idx, weight, w1, w2, w3, _ = make(4, 2, 4, torch.float32)
    y = ops.moe_experts(x[:0], idx[:0], weight[:0], w1, w2, w3, 4.0)
    assert y.shape == (0, 32) and y.dtype == x.dtype


def test_autocast_runs_the_matmuls_in_bf16_like_the_loop():
    """Under autocast (the CUDA training step) fp32 activations and weights meet in bf16 matmuls: autocast
    covers the loop's `@` but not `_grouped_mm`, so the grouped path casts by itself."""
    args = make(24, 2, 8, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.moe_path(args[0], args[1], *args[3:6]) == "grouped"
        got = run(ops.moe_experts_grouped, *args)
        loop = run(ops.moe_experts_loop, *args)
    truth = run(ops.moe_experts_loop, *f64(args))
    assert got[0].dtype == torch.float32
    for name, g, l, t in zip(NAMES, got, loop, truth):
        check(name, torch.bfloat16, g.float(), l.float(), t)
    assert rel(got[0], truth[0]) > 1e-4            # it did run in bf16


# ----------------------------------------------------------------------------- no host synchronisation
class RefuseHostReads(TorchDispatchMode):
    """Raises on every aten op that reads tensor values on the host or has a data-dependent shape."""
    REFUSED = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "_unique", "_unique2",
               "unique_dim", "unique_consecutive", "is_nonzero", "equal"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        bool_index = name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
        rep_tensor = name == "repeat_interleave" and isinstance(args[0], torch.Tensor) and \
            func._overloadname.startswith("Tensor") and (kwargs or {}).get("output_size") is None
        if name in self.REFUSED or bool_index or rep_tensor:
            raise AssertionError(f"host synchronisation: aten.{name}")
        return func(*args, **(kwargs or {}))


def refuse_python_reads(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("host synchronisation: Tensor.tolist/item")
    for name in ("tolist", "item", "__int__", "__float__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "f64"])
def test_fast_paths_do_not_read_tensors_on_the_host(dtype, monkeypatch):
    args = make(16, 2, 8, dtype)
    paths = ["gather"] if dtype == torch.float64 else ["grouped", "gather"]
    refuse_python_reads(monkeypatch)
    for impl in paths:
        with RefuseHostReads():
            run(FAST[impl], *args)                   # forward and backward
    with RefuseHostReads():
        run(ops.moe_experts, *make(4, 2, 8, dtype))  # N·K = E: whatever the path, no sync
    # the detector does catch the loop's sync
    with pytest.raises(AssertionError, match="host synchronisation"), RefuseHostReads():
        run(ops.moe_experts_loop, *args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_traces_into_one_graph(dtype):
    """`torch.compile(fullgraph=True)` (the compiled decode step) fails on any host read or graph break;
    under compile grouped_mm takes bf16 only, so fp32 goes to the per-pair path."""
    torch._dynamo.reset()
    args = make(6, 2, 8, dtype)
    compiled = torch.compile(ops.moe_experts, fullgraph=True, backend="eager")
    got = run(compiled, *args, grad=False)[0]
    want = run(ops.moe_experts_loop, *args, grad=False)[0]
    assert rel(got, want) < TOL_LOOP[dtype]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cuda_no_sync_and_graph_capture(dtype):
    dev = torch.device("cuda")
    x, idx, weight, w1, w2, w3, gy = [t.to(dev) for t in make(64, 6, 16, dtype, D=64, I=32)]
    path = ops.moe_path(x, idx, w1, w2, w3)
    small = idx[:2]                                   # N·K ≤ E: sync-free whatever the dtype
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        if path != "loop":
            run(ops.moe_experts, x, idx, weight, w1, w2, w3, gy)
        run(ops.moe_experts, x[:2], small, weight[:2], w1, w2, w3, gy[:2])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # record the forward in a CUDA graph, replay it on other routing
    static = [x.clone(), idx.clone(), weight.clone()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        ops.moe_experts(*static, w1, w2, w3, 4.0)     # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = ops.moe_experts(*static, w1, w2, w3, 4.0)
    g = torch.Generator(device=dev).manual_seed(5)
    static[1].copy_(torch.randint(0, 16, idx.shape, device=dev, generator=g))
    static[0].copy_(torch.randn(x.shape, device=dev, generator=g).to(dtype))
    graph.replay()
    with torch.no_grad():
        want = ops.moe_experts_loop(*static, w1, w2, w3, 4.0)
    assert rel(out, want) < TOL_LOOP[dtype]
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] == 9:
        assert path == "grouped"
