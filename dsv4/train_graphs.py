"""CUDA graphs of the training step's forward and backward.

A small model's training step is a few thousand short kernels; launched one by one from Python the GPU
waits on the CPU (the `bench` model's eager step spends ~43 ms on the host for ~22 ms of kernels).
`MicroStepGraphs` records one micro-batch's forward, objective (`dsv4.train.batch_losses`) and backward
into a CUDA graph and replays it for every later micro-batch of the same kind, so the step costs the
GPU time of its kernels. `OptimizerGraph` does the same for the optimizer step (its per-step numbers
read from the device); the gradient norm, the clipping and the router-bias update stay eager (a few
foreach launches).

What makes a micro-step replayable:
* static inputs: the micro-batch (ids, labels, documents, positions) and the step's numbers (target
  token counts, MTP weight, micro-batch count) live in tensors the graph reads; each replay copies the
  new values in first. `batch_losses` takes the numbers as device tensors, so nothing inside reads
  the device (the model's token-id check runs first, on the host batch, before anything is recorded);
* gradients: the micro-step computes them with `torch.autograd.grad`. The first micro-batch of an
  optimizer step writes them into tensors the recording keeps; a later micro-batch's graph adds its
  own into those (a recorded `_foreach_add_`). After each replay every parameter's `.grad` is pointed
  at them, so the clipping and the optimizer read them as after an eager backward;
* outputs: each replay overwrites the graph's loss terms and expert counts, which are read or
  accumulated before the next replay;
* one recording per kind: (phase, MTP on or off, first or later micro-batch, micro-batch shape). A
  phase change (dense → warm-up → sparse, where the trainable set and the attention change) drops the
  recordings of the old phase.

Recording runs the micro-step twice on a side stream first (kernel compilation, autotuning, the
allocator's warm-up), the second time with CUDA's sync debugging set to raise, so that an operation
that would read the device inside the graph is found eagerly, where failing is harmless. If a
recording fails, the trainer is told why once and runs that kind eagerly from then on.

The replayed step computes what the eager step computes with the same kernels; the kernels whose
results depend on the order of floating-point atomics (the sparse attention's key gradients) round
differently from run to run in both. `tests/test_train.py` checks the static form (device-tensor
numbers, `autograd.grad`, the foreach accumulation) against the eager step on the CPU, and the
replayed training run against the eager one on CUDA.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

BATCH_KEYS = ("input_ids", "labels", "doc_ids", "positions")
SCALARS = ("n_lm", "n_mtp", "mtp_weight", "n_micro")


class NotReplayable(RuntimeError):
    """The micro-step cannot be recorded as a CUDA graph (the message says why)."""


@dataclass
class _Recording:
    graph: Any                                  # torch.cuda.CUDAGraph, or None for the static form run eagerly
    body: Callable[[bool], None]                # the micro-step on the static tensors (accumulate or not)
    inputs: dict[str, torch.Tensor]             # static micro-batch
    scalars: torch.Tensor                       # [4] float32: SCALARS
    names: list[str]                            # loss terms, in `terms`' order ("objective" last)
    terms: torch.Tensor | None = None           # [len(names)] float32, written by each run
    counts: dict[str, torch.Tensor] = field(default_factory=dict)   # MoE name -> [E] long, written by each run
    params: list[torch.nn.Parameter] = field(default_factory=list)
    grads: list[torch.Tensor | None] = field(default_factory=list)


class MicroStepGraphs:
    """`run(batch, ...)`: one micro-batch's forward, objective and backward (what the trainer's eager
    micro-step does), replayed from a CUDA graph per kind of micro-step.

    `losses(batch, phase, mtp_weight, n_lm, n_mtp, n_micro, counts, use_mtp)` is the objective
    (`batch_losses` bound to the model and config); `autocast()` the trainer's autocast context;
    `moe_sizes` {MoE name: experts} the count tensors to fill. With `record=False` the same static
    form runs eagerly (the CPU's form, and what the tests compare against the eager step)."""

    def __init__(self, model: torch.nn.Module, losses: Callable[..., tuple[torch.Tensor, dict]],
                 autocast: Callable[[], contextlib.AbstractContextManager], moe_sizes: dict[str, int],
                 device: torch.device, *, record: bool = True, log: Callable[[str], None] = print):
        if record and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {device}")
        self.model, self.losses, self.autocast = model, losses, autocast
        self.moe_sizes, self.device, self.record = moe_sizes, device, record
        self.log = log
        self.phase: str | None = None
        self.recordings: dict[tuple, _Recording | None] = {}   # None: recording failed, run eagerly
        self.failures: dict[tuple, str] = {}
        self.pool = torch.cuda.graph_pool_handle() if record else None
        self.replays = 0

    # ------------------------------------------------------------------ public
    def run(self, batch: dict[str, torch.Tensor], phase: str, mtp_weight: float, n_lm: int, n_mtp: int,
            n_micro: int, first: bool, counts: dict[str, torch.Tensor], eager: Callable[[], dict[str, float]]
            ) -> dict[str, float]:
        """The micro-step's loss terms as host numbers (adding its expert counts into `counts`), from the
        recording of its kind; `eager()` runs it the trainer's way where no recording can serve."""
        self.model.check_ids(batch["input_ids"])   # on the host copy, before any recording runs: inside, skipped
        use_mtp = phase != "warmup" and mtp_weight > 0 and len(getattr(self.model, "mtp", ())) > 0
        shapes = tuple(tuple(batch[k].shape) for k in BATCH_KEYS)
        key = (phase, use_mtp, first, shapes)
        if phase != self.phase:
            self.reset()
            self.phase = phase
        if key not in self.recordings:
            self.recordings[key] = self._build(key, batch)
        rec = self.recordings[key]
        if rec is None:
            return eager()
        if not first and not self._accumulates_into_current(rec):
            return eager()
        for k in BATCH_KEYS:
            rec.inputs[k].copy_(batch[k], non_blocking=True)
        rec.scalars.copy_(torch.tensor([n_lm, n_mtp, mtp_weight, n_micro], dtype=torch.float32))
        if rec.graph is not None:
            rec.graph.replay()
            self.replays += 1
        else:
            rec.body(not first)
        if first:
            for p, g in zip(rec.params, rec.grads):
                p.grad = g
        for name, c in rec.counts.items():
            counts[name] += c
        return dict(zip(rec.names, rec.terms.tolist()))

    def reset(self) -> None:
        """Drop every recording (their memory returns to the allocator)."""
        self.recordings.clear()
        self.failures.clear()
        if self.record:
            self.pool = torch.cuda.graph_pool_handle()

    # ------------------------------------------------------------------ recording
    def _first(self, key: tuple) -> _Recording | None:
        return self.recordings.get((key[0], key[1], True, key[3]))

    def _accumulates_into_current(self, rec: _Recording) -> bool:
        """A later micro-batch's recording adds into the gradients of the first one's: they must still be
        the parameters' gradients (an eager first micro-step would have made others)."""
        return all(p.grad is g for p, g in zip(rec.params, rec.grads) if g is not None)

    def _build(self, key: tuple, batch: dict[str, torch.Tensor]) -> _Recording | None:
        phase, use_mtp, first, _ = key
        try:
            if not first:
                head = self._first(key)
                if head is None:
                    raise NotReplayable("the first micro-batch of the step was not recorded")
            return self._record(key, batch)
        except Exception as exc:   # noqa: BLE001 - any failure means: run this kind eagerly
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            self.failures[key] = reason
            self.log(f"training micro-step ({phase} phase, {'first' if first else 'later'} micro-batch) could "
                     f"not be recorded as a CUDA graph, running it eagerly: {reason}")
            if self.record:
                torch.cuda.synchronize(self.device)
            return None

    def _record(self, key: tuple, batch: dict[str, torch.Tensor]) -> _Recording:
        phase, use_mtp, first, _ = key
        dev = self.device
        inputs = {k: batch[k].to(dev, copy=True) for k in BATCH_KEYS}
        scalars = torch.ones(len(SCALARS), dtype=torch.float32, device=dev)
        params = [p for p in self.model.parameters() if p.requires_grad]
        head = None if first else self._first(key)
        rec = _Recording(None, lambda accumulate: None, inputs, scalars, [],
                         counts={n: torch.zeros(e, dtype=torch.long, device=dev) for n, e in self.moe_sizes.items()},
                         params=params)

        def body(accumulate: bool) -> tuple[list[str], torch.Tensor, list[torch.Tensor | None]]:
            for c in rec.counts.values():
                c.zero_()
            n_lm, n_mtp, mtp_w, n_micro = scalars.unbind(0)
            with self.autocast(), _ids_prechecked(self.model):
                objective, terms = self.losses(inputs, phase, mtp_w, n_lm, n_mtp, n_micro, rec.counts, use_mtp)
            if not objective.requires_grad:
                raise NotReplayable("the objective has no gradient")
            grads = torch.autograd.grad(objective, params, allow_unused=True)
            if accumulate:
                pairs = [(h, g) for h, g in zip(head.grads, grads) if g is not None]
                if any(h is None for h, _ in pairs):
                    raise NotReplayable("a later micro-batch reached a parameter the first did not")
                if pairs:
                    torch._foreach_add_([h for h, _ in pairs], [g for _, g in pairs])
            names = list(terms) + ["objective"]
            vec = torch.stack([terms[k].detach().float().reshape(()) for k in terms] + [objective.detach().float()])
            return names, vec, list(grads)

        def run_static(accumulate: bool) -> None:
            rec.names, rec.terms, grads = body(accumulate)
            if not accumulate:
                rec.grads = grads

        rec.body = run_static
        if not self.record:
            return rec
        # warm-up off the capture stream: compilation, autotuning, the allocator; the second run with
        # host reads made errors, so that whatever would break the recording fails here, eagerly
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            body(False)
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                body(False)
            except RuntimeError as exc:
                raise NotReplayable(f"the micro-step reads the device at {_dsv4_line(exc)} ({exc})") from None
            finally:
                torch.cuda.set_sync_debug_mode(mode)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*capture.*")
            with torch.cuda.graph(graph, pool=self.pool):
                names, vec, grads = body(not first)
        rec.graph, rec.names, rec.terms = graph, names, vec
        rec.grads = grads if first else head.grads
        return rec


class OptimizerGraph:
    """`step()`: the optimizer's step (`dsv4.optim.MuonAdamW`) replayed from a CUDA graph.

    The optimizer reads its per-step numbers from the device (`use_device_scalars`; `fill_scalars` writes
    them before each step), so one recording serves every step whose parameters-with-gradients and
    gradient tensors are those it was recorded with: the micro-step graphs keep the gradients in the same
    tensors from step to step. The first step of a layout runs eagerly (it is also the warm-up), the
    second records, and any change of layout (a phase change, an eager micro-step's new gradients) runs
    eagerly and records again once the layout repeats. A failed recording is logged once; the optimizer
    then runs eagerly, with the same device numbers (as it always does with `record=False`, the CPU's
    form of this runner)."""

    def __init__(self, optimizer, device: torch.device, log: Callable[[str], None] = print, *, record: bool = True):
        if record and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {device}")
        self.opt, self.device, self.log = optimizer, device, log
        optimizer.use_device_scalars(device)
        self.graph = None
        self.layout: tuple | None = None        # the recorded graph's layout
        self.last: tuple | None = None          # the previous step's layout
        self.failed: str | None = None if record else "not recording"
        self.pool = torch.cuda.graph_pool_handle() if record else None
        self.replays = 0

    def _layout(self) -> tuple:
        return tuple((id(p), p.grad.data_ptr()) for g in self.opt.param_groups for p in g["params"]
                     if p.grad is not None)

    def step(self) -> None:
        layout = (self._layout(), self.opt.fill_scalars())
        if self.graph is not None and layout == self.layout:
            self.graph.replay()
            self.replays += 1
        elif layout == self.last and self.failed is None:
            self.graph, self.layout = None, None
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self.opt.step()
            except Exception as exc:   # noqa: BLE001 - a failed recording means: eager from now on
                self.failed = f"{type(exc).__name__}: {exc}".splitlines()[0]
                self.log(f"the optimizer step could not be recorded as a CUDA graph, running it eagerly: "
                         f"{self.failed}")
                torch.cuda.synchronize(self.device)
                self.opt.step()
            else:
                self.graph, self.layout = graph, layout
                graph.replay()                  # the recording ran nothing: this is the step
                self.replays += 1
        else:
            self.opt.step()
        self.last = layout


@contextlib.contextmanager
def _ids_prechecked(model: torch.nn.Module):
    """The model skips its token-id check (a device read): `run` checked the ids on the host."""
    before = getattr(model, "ids_prechecked", False)
    model.ids_prechecked = True
    try:
        yield
    finally:
        model.ids_prechecked = before


def _dsv4_line(exc: BaseException) -> str:
    """file:line of the innermost dsv4 frame of an exception's traceback (where the model read the device)."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/dsv4/" in f.filename and not f.filename.endswith("train_graphs.py")]
    return f"{frames[-1].filename.split('/dsv4/')[-1]}:{frames[-1].lineno}" if frames else "an unknown place"
