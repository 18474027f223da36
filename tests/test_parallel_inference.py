"""Expert-parallel inference: 2 gloo processes, each holding half of every MoE's routed experts, give the
logits of 1 process on the official golden checkpoint (fp32; full forward, chunked prefill and decode steps),
quantised-resident and dequantised, loaded from the files or sharded from a model in memory."""
from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from dsv4 import quant
from dsv4.cache import DecodeCache
from dsv4.checkpoint import load_pretrained
from dsv4.parallel.inference import ExpertParallel, expert_range, load_expert_parallel, shard_experts

from conftest import GOLDEN_DIR, random_model

WORLD = 2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@torch.no_grad()
def outputs(model, ids: torch.Tensor) -> dict:
    """Logits of a full forward, a chunked cached prefill up to the first HCA entry and two decode steps."""
    cache = DecodeCache(model.config, ids.shape[0], 132)
    model(ids[:, :90], cache=cache, last_only=True)
    steps = [model(ids[:, 90:128], cache=cache, last_only=True)]
    steps += [model(ids[:, 128 + i:129 + i], cache=cache, last_only=True) for i in range(2)]
    return {"full": model(ids[:, :40]), "steps": torch.stack(steps, 1)}


def _worker(rank: int, init: str, out: str, ids: torch.Tensor) -> None:
    torch.set_num_threads(1)   # two processes on the test machine's two cores
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD)
    try:
        result = {}
        for quantized in (True, False):
            m = load_expert_parallel(GOLDEN_DIR, quantized=quantized)
            held = m.layers[2].ffn.experts
            assert isinstance(held, ExpertParallel) and held.experts == expert_range(8, rank, WORLD)
            result[f"bytes_{quantized}"] = quant.resident_bytes(m)["total"]
            result[f"q{quantized}"] = outputs(m, ids)
        sharded = shard_experts(random_model("tiny", seed=4))
        result["sharded"] = sharded(ids[:, :30])
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_logits_of_one(tmp_path):
    ids = load_file(str(GOLDEN_DIR / "golden.safetensors"))["input_ids"]
    # fork: the workers skip importing torch again (CPU only; they set their own thread count)
    ctx = mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path), ids), nprocs=WORLD,
                             start_method="fork", join=False)
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("the expert-parallel workers did not finish within 300 s")
    ref = outputs(load_pretrained(GOLDEN_DIR, quantized=False), ids)
    with torch.no_grad():
        ref_random = random_model("tiny", seed=4)(ids[:, :30])
    cfg = load_pretrained(GOLDEN_DIR).config
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for quantized in (True, False):
            assert rel(got[f"q{quantized}"]["full"], ref["full"]) <= 1e-5
            assert rel(got[f"q{quantized}"]["steps"], ref["steps"]) <= 1e-5
        # each rank holds its share of the experts only
        assert got["bytes_True"] == quant.analytic_resident_bytes(cfg, torch.float32, n_experts=4)["total"]
        assert got["bytes_False"] == quant.analytic_resident_bytes(cfg, torch.float32, fp8=False, fp4_experts=False,
                                                                   n_experts=4)["total"]
        assert rel(got["sharded"], ref_random) <= 1e-5


def test_expert_ranges_cover_every_expert_once():
    for E, W in ((8, 2), (256, 8), (10, 4), (3, 3)):
        ranges = [expert_range(E, r, W) for r in range(W)]
        assert [e for r in ranges for e in r] == list(range(E))
        assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    with pytest.raises(ValueError, match="cannot be split over 4 ranks"):
        expert_range(3, 0, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        load_expert_parallel(GOLDEN_DIR)
