"""dsv4's forward pass and MTP head against the independent float64 derivation in reference_v4.py.

The model and the reference get identical random float64 weights (every tensor non-trivial, expert
w1/w3 scaled so the SwiGLU clamp fires) and must agree to max|diff| / max|ref| <= 1e-10.

dsv4 follows the official numeric policy with hard float32 casts (`.float()`, `.to(torch.float32)`
in mHC, RMSNorm, RoPE, router, SwiGLU, attention, LM head) and builds its RoPE frequency buffers in
float32, so a `model.double()` is not a float64 model: it agrees with the reference only to ~1e-6.
`float64_kept` makes those casts leave float64 tensors alone and refills the frequency buffers in
float64; under it every formula must match to 1e-10. `test_plain_double_model` measures the model as
it is and reports (xfail) while the float32 islands remain.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from dsv4.config import preset
from dsv4.model import Transformer

from reference_v4 import Variant, reference_forward, reference_mtp, rope_frequencies

TOL = 1e-10
FP32_TOL = 1e-4   # the model as it is (float32 islands): formula errors are far larger than this

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


@torch.no_grad()
def random_model(cfg, seed: int = 0, expert_gain: float = 3.0) -> Transformer:
    """A float64 model with fresh seeded values in every tensor: matrices N(0,1)/sqrt(fan_in)
    (expert w1/w3 × gain so the clamp is hit), norms 1 + 0.1·N, mHC scales 0.5 + 0.5·U,
    mHC bases / sinks / ape 0.5·N, router bias 0.1·N, distinct random hash experts per token."""
    model = Transformer(cfg).double().eval()
    g = torch.Generator().manual_seed(seed)
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
        p.copy_(v)
    for name, b in model.named_buffers():
        if name.endswith("gate.bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g, dtype=torch.float64))
        elif name.endswith("tid2eid"):
            V, K = b.shape
            b.copy_(torch.rand(V, cfg.n_routed_experts, generator=g).argsort(dim=-1)[:, :K])
    return model


def layer_ratio_of(cfg, buffer_name: str) -> int:
    kind, idx = buffer_name.split(".")[:2]
    return cfg.layer_ratio(int(idx) + (cfg.num_hidden_layers if kind == "mtp" else 0))


def freq_buffers(model) -> list[tuple[str, torch.Tensor]]:
    found = [(n, b) for n, b in model.named_buffers() if n.endswith("attn.freqs")]
    assert len(found) == model.config.num_hidden_layers + model.config.num_nextn_predict_layers
    return found


@contextlib.contextmanager
def float64_kept(model):
    """Run `model` as a true float64 model: `.float()` and `.to(torch.float32)` leave float64 tensors
    unchanged, and the RoPE frequency buffers hold float64 values (checked against the model's own
    buffers to float32 precision in test_rope_frequencies)."""
    to_float, to = torch.Tensor.float, torch.Tensor.to

    def keep_float(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else to_float(self, *args, **kwargs)

    def keep_to(self, *args, **kwargs):
        if self.dtype == torch.float64:
            args = tuple(torch.float64 if a is torch.float32 else a for a in args)
            if kwargs.get("dtype") is torch.float32:
                kwargs["dtype"] = torch.float64
        return to(self, *args, **kwargs)

    saved = {n: b.clone() for n, b in freq_buffers(model)}
    with torch.no_grad():
        for n, b in freq_buffers(model):
            b.copy_(rope_frequencies(model.config, layer_ratio_of(model.config, n)))
    torch.Tensor.float, torch.Tensor.to = keep_float, keep_to
    try:
        yield model
    finally:
        torch.Tensor.float, torch.Tensor.to = to_float, to
        with torch.no_grad():
            for n, b in freq_buffers(model):
                b.copy_(saved[n])


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
    with float64_kept(model):
        logits, hidden = model(ids[:, :-1], return_hidden=True)
    assert logits.shape == ref_logits.shape and hidden.shape == ref_hidden.shape
    assert rel(hidden, ref_hidden) <= TOL
    assert rel(logits, ref_logits) <= TOL
    # the weights really exercise the clamps (routed and shared, both sides)
    assert min(stats.get(k, 0) for k in ("routed_up", "routed_gate", "shared_up", "shared_gate")) > 0, stats


@torch.no_grad()
def test_mtp_matches_reference(case):
    cfg, model, ids, _, _, _ = case
    with float64_kept(model):
        _, hidden = model(ids[:, :-1], return_hidden=True)
        logits = model.mtp_logits(hidden, ids[:, 1:])
    ref = reference_mtp(model.state_dict(), cfg, hidden, ids[:, 1:])
    assert logits.shape == ref.shape
    assert rel(logits, ref) <= TOL


@torch.no_grad()
def test_plain_double_model(case):
    """`model.double()` as it is: must agree to float32 precision; the float64 bound is reported."""
    cfg, model, ids, ref_logits, _, _ = case
    logits = model(ids[:, :-1])
    err = rel(logits, ref_logits)
    assert err <= FP32_TOL
    if err > TOL:
        pytest.xfail(f"model.double() agrees only to {err:.1e} (> {TOL:g}): float32 casts and float32 RoPE "
                     f"frequencies inside dsv4")


def test_rope_frequencies():
    """The model's own frequency buffers (θ per layer type, YaRN ramp) equal the spec's to float32 precision."""
    for cfg, _, _ in CONFIGS.values():
        for name, b in freq_buffers(Transformer(cfg)):
            ref = rope_frequencies(cfg, layer_ratio_of(cfg, name))
            assert rel(b, ref) <= 1e-6, name
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
    with float64_kept(model):
        got = model(ids)
    stats: dict = {}
    spec = reference_forward(sd, cfg, ids, stats=stats)
    assert stats["shared_up"] > 0 and stats["shared_gate"] > 0
    assert rel(got, spec) <= TOL
    no_shared_clamp = reference_forward(sd, cfg, ids, variant=Variant(shared_clamp=False))
    assert rel(no_shared_clamp, spec) > 1e-3 and rel(got, no_shared_clamp) > 1e-3
    after_w2 = reference_forward(sd, cfg, ids, variant=Variant(weight_after_w2=True))
    assert rel(after_w2, spec) <= 1e-13
