"""CUDA graphs of the decode step.

A decode step of a small model is a few hundred short kernels; launched one by one from Python the
GPU waits on the CPU (a 4-layer model spent ~30 ms per step that way). `DecodeGraphs` records
`Transformer.decode_step` once per batch size into a CUDA graph and replays it: one launch per step.

The decode step has static shapes and no host synchronisation (the one-token case of
`Attention._attend` and `Compressor.update`, a sync-free `ops.moe_experts`), and every tensor it writes lives in the
preallocated `DecodeCache`, so a replay with new ids and rows copied into the graph's input tensors
does exactly what an eager call would. The first call for a batch size runs eagerly (that call is
also the warm-up) and records the graph for the next calls. Where recording fails (an op that needs
the host, a device without graphs) the runner says why once and stays eager for that batch size.

`compile=True` first passes the step through `torch.compile` (one graph, no breaks), which fuses the
many small elementwise kernels (mHC's Sinkhorn iterations, norms, RoPE) before recording; the eager
step stays the reference it is tested against. On a CPU the runner is a plain call of the step
(compiled when asked).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor        # [B, 1] static input
    rows: torch.Tensor       # [B] static input
    logits: torch.Tensor     # [B, V] static output


class DecodeGraphs:
    """`runner(ids [B, 1], rows [B]) -> logits [B, V]`: `model.decode_step` on `cache`, replayed from
    a CUDA graph per batch size (up to `max_graphs` sizes; beyond that, eager). The caller guarantees
    the inputs `decode_step` does not check (distinct rows with room for one more token). The model's
    projection groups are packed for inference (`Transformer.pack_projections`: fewer launches per step)."""

    def __init__(self, model, cache, *, enabled: bool | None = None, compile: bool = False,
                 compile_backend: str = "inductor", max_graphs: int = 64):
        self.model, self.cache = model, cache
        if hasattr(model, "pack_projections"):
            model.pack_projections()
        device = cache.device
        self.enabled = (device.type == "cuda") if enabled is None else enabled
        if self.enabled and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the cache is on {device}")
        self._compiled = torch.compile(model.decode_step, fullgraph=True, backend=compile_backend) if compile else None
        self.max_graphs = max_graphs
        self.graphs: dict[int, _Graph | None] = {}   # None: recording failed, run eagerly
        self.pool = torch.cuda.graph_pool_handle() if self.enabled else None
        self.replays = 0

    def step(self, ids: torch.Tensor, cache, rows: torch.Tensor) -> torch.Tensor:
        """The (compiled) decode step, called directly."""
        return (self._compiled or self.model.decode_step)(ids, cache, rows)

    def __call__(self, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        B = ids.shape[0]
        if not self.enabled:
            return self.step(ids, self.cache, rows)
        if B not in self.graphs:
            logits = self.step(ids, self.cache, rows)     # the real step, and the warm-up
            self.graphs[B] = self._record(B) if len(self.graphs) < self.max_graphs else None
            return logits
        g = self.graphs[B]
        if g is None:
            return self.step(ids, self.cache, rows)
        g.ids.copy_(ids)
        g.rows.copy_(rows)
        g.graph.replay()
        self.replays += 1
        return g.logits.clone()   # the graph's output is overwritten by the next replay

    def _record(self, B: int) -> _Graph | None:
        """Record one decode step for batch size B. Recording launches nothing, so the cache is untouched."""
        dev = self.cache.device
        ids = torch.zeros(B, 1, dtype=torch.long, device=dev)
        rows = torch.arange(B, dtype=torch.long, device=dev)
        graph = torch.cuda.CUDAGraph()
        try:
            torch.cuda.synchronize(dev)
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self.step(ids, self.cache, rows)
        except Exception as exc:  # an op that synchronises or is not capturable: stay eager for this size
            warnings.warn(f"decode step for batch {B} could not be recorded as a CUDA graph, running it "
                          f"eagerly: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            torch.cuda.synchronize(dev)
            return None
        return _Graph(graph, ids, rows, logits)
