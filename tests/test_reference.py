"""dsv4's forward pass and MTP head against the independent float64 derivation in reference_v4.py.

The model and the reference get identical random float64 weights (every tensor non-trivial, expert
w1/w3 scaled so the SwiGLU clamp fires) and must agree to max|diff| / max|ref| <= 1e-10: dsv4 computes
its fp32 steps (mHC, norms, RoPE, router, SwiGLU, attention, head) "in at least fp32", so a
`model.double()` is a true float64 model and every formula is checked to float64 rounding.
"""
from __future__ import annotations

import math

import pytest
import torch

from dsv4.config import preset
from dsv4.model import Transformer

from conftest import randomize
from reference_v4 import Variant, reference_forward, reference_mtp, rope_frequencies

TOL = 1e-10

TINY = preset("tiny")                                       # (0, 4, 128, 4 | MTP 0), hash layer 0
CONFIGS = {
    "tiny": (TINY, 300, 2),
    # CSA first and hash-routed, HCA, SWA MTP; more groups, experts per token, shared experts
    "csa-hca": (TINY.with_(num_hidden_layers=2, compress_ratios=(4, 128, 0), num_hash_layers=1,
                           sliding_window=32, index_topk=8, o_groups=4, num_experts_per_tok=3,
                           n_shared_experts=2, routed_scaling_factor=2.5, swiglu_limit=6.0,
                           hc_sinkhorn_iters=7), 260, 2),
    # an MTP block of CSA type, compressed layers without YaRN
    "mtp-csa": (TINY.with_(num_hidden_layers=1, compress_ratios=(128, 4), num_hash_layers=0,
                           rope_scaling=None, sliding_window=8, index_topk=5), 200, 1),
}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: one intra-op thread is fastest and immune to a loaded machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).abs().max() / ref.abs().max())


def random_model(cfg, seed: int = 0) -> Transformer:
    """A float64 model with non-trivial seeded values in every tensor (conftest.randomize)."""
    return randomize(Transformer(cfg).double().eval(), seed)


def freqs_of(model) -> list[tuple[int, torch.Tensor]]:
    """(layer index incl. MTP blocks, the attention's RoPE frequencies) for every block."""
    blocks = list(model.layers) + list(model.mtp)
    return [(i, blk.attn.freqs) for i, blk in enumerate(blocks)]


def make_ids(cfg, S: int, B: int, seed: int = 11) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request):
    """(cfg, model, ids [B, S+1], reference logits, reference hidden, clamp stats)."""
    cfg, S, B = CONFIGS[request.param]
    model = random_model(cfg, seed=len(request.param))
    ids = make_ids(cfg, S, B)
    stats: dict = {}
    logits, hidden = reference_forward(model.state_dict(), cfg, ids[:, :S], return_hidden=True, stats=stats)
    return cfg, model, ids, logits, hidden, stats


@torch.no_grad()
def test_forward_matches_reference(case):
    cfg, model, ids, ref_logits, ref_hidden, stats = case
    logits, hidden = model(ids[:, :-1], return_hidden=True)
    assert logits.dtype == torch.float64
    assert logits.shape == ref_logits.shape and hidden.shape == ref_hidden.shape
    assert rel(hidden, ref_hidden) <= TOL
    assert rel(logits, ref_logits) <= TOL
    # the weights really exercise the clamps (routed and shared, both sides)
    assert min(stats.get(k, 0) for k in ("routed_up", "routed_gate", "shared_up", "shared_gate")) > 0, stats


@torch.no_grad()
def test_mtp_matches_reference(case):
    cfg, model, ids, _, _, _ = case
    _, hidden = model(ids[:, :-1], return_hidden=True)
    logits = model.mtp_logits(hidden, ids[:, 1:])
    ref = reference_mtp(model.state_dict(), cfg, hidden, ids[:, 1:])
    assert logits.shape == ref.shape
    assert rel(logits, ref) <= TOL


def test_rope_frequencies():
    """The model's RoPE frequencies (θ per layer type, YaRN ramp) equal the spec's."""
    for cfg, _, _ in CONFIGS.values():
        for i, f in freqs_of(Transformer(cfg)):
            assert rel(f, rope_frequencies(cfg, cfg.layer_ratio(i))) <= 1e-15, i
    # YaRN for the released compressed layers: pairs 0..15 unchanged, >= 25 divided by 16 (§5.2)
    flash = preset("deepseek-v4-flash")
    f, plain = rope_frequencies(flash, 4), rope_frequencies(flash.with_(rope_scaling=None), 4)
    assert torch.equal(f[:16], plain[:16]) and torch.allclose(f[25:], plain[25:] / 16, rtol=1e-15)
    assert not torch.allclose(f[16:25], plain[16:25]) and math.isclose(float(plain[1]), 160000 ** (-2 / 64))


@torch.no_grad()
def test_moe_choices_are_observable():
    """The spec's MoE choices against the alternatives: dropping the shared-expert clamp changes the
    logits far beyond the tolerance, so test_forward_matches_reference would catch it. Multiplying the
    routing weight after W2 (transformers) is the same linear map: in float64 it agrees to rounding,
    so only a bf16 parity test can observe that choice."""
    cfg, S = TINY, 64
    model = random_model(cfg, seed=5)
    ids = make_ids(cfg, S, 1)[:, :S]
    sd = model.state_dict()
    got = model(ids)
    stats: dict = {}
    spec = reference_forward(sd, cfg, ids, stats=stats)
    assert stats["shared_up"] > 0 and stats["shared_gate"] > 0
    assert rel(got, spec) <= TOL
    no_shared_clamp = reference_forward(sd, cfg, ids, variant=Variant(shared_clamp=False))
    assert rel(no_shared_clamp, spec) > 1e-3 and rel(got, no_shared_clamp) > 1e-3
    after_w2 = reference_forward(sd, cfg, ids, variant=Variant(weight_after_w2=True))
    assert rel(after_w2, spec) <= 1e-13
