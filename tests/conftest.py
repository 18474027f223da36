"""Shared fixtures: strict fp32 numerics and random models with non-trivial weights."""
from __future__ import annotations

import os
import pathlib

import pytest
import torch
from torch import nn

# without a GPU the Triton kernels run under Triton's interpreter (read when a kernel module is imported)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsv4.config import ModelConfig, preset
from dsv4.model import Transformer

DATA = pathlib.Path(__file__).parent / "data"
GOLDEN_DIR = DATA / "tiny-official"

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def _threads() -> str:
    """CPU threads for this run, chosen for the machine as it is now (fewer on a busy machine)."""
    from dsv4.cli import cpu_threads

    n, why = cpu_threads()
    torch.set_num_threads(n)
    return why


_THREADS = _threads()


def pytest_report_header(config):
    return f"dsv4: torch uses {_THREADS}"


@torch.no_grad()
def randomize(model: Transformer, seed: int = 0, expert_gain: float = 3.0) -> Transformer:
    """Give every tensor a non-trivial random value (like the golden checkpoint's recipe): matrices
    N(0,1)/sqrt(fan_in) (expert w1/w3 × gain so the SwiGLU clamp is hit), norms 1 + 0.1·N, mHC scales
    0.5 + 0.5·U, mHC bases / sinks / ape 0.5·N, router bias 0.1·N, random distinct hash experts."""
    g = torch.Generator().manual_seed(seed)
    E = model.config.n_routed_experts
    for name, p in model.named_parameters():
        n = torch.randn(p.shape, generator=g, dtype=torch.float64)
        if name.endswith("norm.weight"):
            v = 1 + 0.1 * n
        elif name.endswith("_scale"):
            v = 0.5 + 0.5 * torch.rand(p.shape, generator=g, dtype=torch.float64)
        elif name.endswith(("_base", "attn_sink", "ape")):
            v = 0.5 * n
        else:
            v = n / p.shape[-1] ** 0.5
            if name.endswith(("experts.w1", "experts.w3", "shared_experts.w1.weight", "shared_experts.w3.weight")):
                v = v * expert_gain
        p.copy_(v.to(p.dtype))
    for name, b in model.named_buffers():
        if name.endswith("gate.bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))
        elif name.endswith("tid2eid"):
            V, K = b.shape
            b.copy_(torch.rand(V, E, generator=g).argsort(dim=-1)[:, :K])
    return model


def random_model(cfg: ModelConfig | str = "tiny", seed: int = 0, dtype=torch.float32) -> Transformer:
    cfg = preset(cfg) if isinstance(cfg, str) else cfg
    torch.manual_seed(seed)
    return randomize(Transformer(cfg), seed).to(dtype).eval()


@pytest.fixture
def tiny_model():
    return random_model("tiny", seed=1)


@torch.no_grad()
def random_hf_model(cfg, seed: int = 0):
    """transformers' DeepseekV4ForCausalLM in fp32 with non-trivial weights, named by its own modules:
    matrices N(0,1)/sqrt(fan_in) (expert gate/up ×3 to reach the SwiGLU clamp), norms 1 + 0.1·N,
    mHC scales 0.5 + 0.5·U, mHC bases / sinks / position bias 0.5·N, router bias 0.1·N."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    hf = DeepseekV4ForCausalLM(DeepseekV4Config(**cfg.to_hf_config())).float().eval()
    g = torch.Generator().manual_seed(seed)
    for name, p in hf.named_parameters():
        n = torch.randn(p.shape, generator=g, dtype=torch.float64)
        if name.endswith("norm.weight") or "layernorm" in name:
            v = 1 + 0.1 * n
        elif name.endswith(("hc.scale", "hc_scale")):
            v = 0.5 + 0.5 * torch.rand(p.shape, generator=g, dtype=torch.float64)
        elif name.endswith(("hc.base", "hc_base", "sinks", "position_bias")):
            v = 0.5 * n
        else:
            v = n / p.shape[-1] ** 0.5
            if name.endswith(("experts.gate_up_proj", "shared_experts.gate_proj.weight", "shared_experts.up_proj.weight")):
                v = v * 3
        p.copy_(v.to(p.dtype))
    for name, b in hf.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))
        elif name.endswith("tid2eid"):
            b.copy_(torch.rand(b.shape[0], cfg.n_routed_experts, generator=g).argsort(-1)[:, :b.shape[1]])
    return hf


class Scripted(nn.Module):
    """A stand-in model that always predicts the next token of a fixed script (by position)."""

    def __init__(self, script: list[int]):
        super().__init__()
        self.config = preset("tiny").with_(num_nextn_predict_layers=0)
        self.embed = nn.Embedding(1, 1)
        self.mtp = []
        self.script = torch.tensor(script + [1] * 64)   # then EOS (id 1)

    def forward(self, ids, *, cache, rows, last_only=False, return_hidden=False):
        if getattr(self, "fail", False):
            raise RuntimeError("boom")
        B, S = ids.shape
        pos = cache.lengths[rows].unsqueeze(1) + torch.arange(S)                       # [B, S]
        cache.advance(rows, S)
        logits = torch.full((B, S, self.config.vocab_size), -10.0)
        logits.scatter_(2, self.script[pos + 1].unsqueeze(-1), 10.0)
        if last_only:
            logits = logits[:, -1]
        return (logits, None) if return_hidden else logits

    def decode_step(self, ids, cache, rows):
        return self.forward(ids, cache=cache, rows=rows, last_only=True)
