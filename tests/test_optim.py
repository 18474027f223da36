"""Muon + AdamW optimizer, schedules and the Muon/AdamW parameter rule (report §2.4, Algorithm 1, §4.2.2).

Muon is checked against a float64 hand-written Algorithm 1; AdamW against torch.optim.AdamW; resuming from
a saved state_dict must continue bitwise. The step's batching (Newton–Schulz once per matrix shape, foreach
AdamW) is checked against the per-parameter loops it replaced.
"""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from dsv4 import optim
from dsv4.optim import NS_COEFFS, MuonAdamW, hybrid_newton_schulz, muon_update, muon_updates
from dsv4.param_groups import build_param_groups, describe_param_groups, group_of
from dsv4.schedule import batch_tokens_at, lr_at, mtp_weight_at

# the report's constants, written out again so that a typo in the module cannot pass
REPORT_COEFFS = [(3.4445, -4.7750, 2.0315)] * 8 + [(2.0, -1.5, 0.5)] * 2


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def ns_reference(g: torch.Tensor, coeffs=REPORT_COEFFS) -> torch.Tensor:
    """Algorithm 1's hybrid Newton–Schulz in float64, literally: X0 = G/‖G‖_F, X ← aX + b(XXᵀ)X + c(XXᵀ)²X
    (no transposition trick: for a tall X the two forms are equal in exact arithmetic)."""
    x = g.double()
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)     # + ε as the module: a zero gradient stays 0
    for a, b, c in coeffs:
        xxt = x @ x.mT
        x = a * x + b * xxt @ x + c * xxt @ xxt @ x
    return x


def muon_reference(w0, grads, *, lr, wd, mu=0.95, gamma=0.18):
    """Algorithm 1 for one 2-D matrix over several steps, in float64."""
    w, m = w0.double().clone(), torch.zeros_like(w0, dtype=torch.float64)
    n_rows, n_cols = w0.shape
    for g in grads:
        g = g.double()
        m = mu * m + g                                          # M_t = μ M_{t-1} + G_t
        o = ns_reference(mu * m + g) * math.sqrt(max(n_rows, n_cols)) * gamma
        w = w * (1 - lr * wd) - lr * o
    return w


def muon(params, **kw):
    return MuonAdamW([dict(params=params, kind="muon", **kw)], lr=0.02)


# ----------------------------------------------------------------------------- Newton–Schulz
def test_coefficients_are_the_reports():
    assert list(NS_COEFFS) == REPORT_COEFFS


@pytest.mark.parametrize("shape", [(48, 80), (80, 48), (64, 64), (3, 24, 40)])
def test_newton_schulz_matches_float64_reference(shape):
    g = randn(*shape, seed=1)
    ref = ns_reference(g)
    err = lambda dtype: float((hybrid_newton_schulz(g, dtype=dtype).double() - ref).norm() / ref.norm())
    assert err(torch.float64) < 1e-12
    assert err(torch.float32) < 1e-5        # measured ~9e-7: fp32 rounding over 10 iterations
    # bf16 keeps 8 significant bits (unit roundoff u = 2^-9 ≈ 2e-3); each of the 10 iterations rounds three
    # products and the early ones amplify by up to 3.4, while the last two contract the error back toward the
    # orthogonal factor. Measured ~1.7e-2 (≈ 9u); 4e-2 leaves room across shapes while still catching any
    # wrong coefficient or transposition (those give errors of order 1).
    assert err(torch.bfloat16) < 4e-2


@pytest.mark.parametrize("shape", [(64, 160), (160, 64), (96, 96)])
def test_newton_schulz_output_is_nearly_orthogonal(shape):
    g = randn(*shape, seed=2)

    def sv(dtype, coeffs=NS_COEFFS):
        return torch.linalg.svdvals(hybrid_newton_schulz(g, dtype=dtype, coeffs=coeffs).double())

    # the two (2, -1.5, 0.5) steps settle every singular value at 1: measured fp32 [1.0000, 1.0005],
    # bf16 [0.994, 1.007]
    s32, s16 = sv(torch.float32), sv(torch.bfloat16)
    assert 0.999 < s32.min() and s32.max() < 1.001
    assert 0.98 < s16.min() and s16.max() < 1.02
    # the 8 fast steps alone leave them spread over about [0.68, 1.14]: the last two are needed
    s8 = sv(torch.float32, NS_COEFFS[:8])
    assert 0.6 < s8.min() < 0.8 and 1.1 < s8.max() < 1.2


def test_newton_schulz_on_an_ill_conditioned_matrix():
    """Gradients are far from random: singular values spread over 3 decades still all map to ~1, because the
    slope 3.4445 near 0 multiplies small ones by 3.4445^8 ≈ 2e4 before the final steps."""
    u, _ = torch.linalg.qr(randn(64, 64, seed=3, dtype=torch.float64))
    v, _ = torch.linalg.qr(randn(160, 64, seed=4, dtype=torch.float64))
    g = (u @ torch.diag(torch.logspace(0, -3, 64, dtype=torch.float64)) @ v.T).float()
    s32 = torch.linalg.svdvals(hybrid_newton_schulz(g, dtype=torch.float32).double())
    s16 = torch.linalg.svdvals(hybrid_newton_schulz(g, dtype=torch.bfloat16).double())
    assert 0.999 < s32.min() and s32.max() < 1.002
    assert 0.98 < s16.min() and s16.max() < 1.02


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (128, 128)])
def test_update_rms_is_0_18(shape):
    u = muon_update(randn(*shape, seed=5))
    assert abs(float(u.pow(2).mean().sqrt()) / 0.18 - 1) < 0.02
    # through the optimizer: with lr 1 and no decay the first step moves W by exactly -O
    w = nn.Parameter(randn(*shape, seed=6))
    w0 = w.detach().clone()
    w.grad = randn(*shape, seed=7)
    MuonAdamW([dict(params=[w], kind="muon", weight_decay=0.0)], lr=1.0).step()
    assert abs(float((w.detach() - w0).pow(2).mean().sqrt()) / 0.18 - 1) < 0.02


def ns_unfused(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Newton–Schulz as the module wrote it before the factored form: a*X + (b*A + c*(A@A)) @ X in `dtype`."""
    x = (g / (torch.linalg.matrix_norm(g, keepdim=True) + 1e-7)).to(dtype)
    tall = x.size(-2) > x.size(-1)
    x = x.mT if tall else x
    for a, b, c in REPORT_COEFFS:
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.mT if tall else x


@pytest.mark.parametrize("shape", [(48, 80), (80, 48), (3, 24, 40), (128, 512)])
def test_factored_newton_schulz_rounds_no_worse_than_the_unfused_form(shape):
    """(aI + bA + cA²)X, with bA + cA² summed in one batched matmul, against aX + (bA + cA²)X with every
    product and sum rounded on its own: the factored form is the closer to float64. Measured over such
    shapes: 2.7× closer in bf16 (6e-3 vs 1.7e-2), 1.4-1.9× in fp32 (4e-7 vs 7.5e-7 at 48 × 80)."""
    g = randn(*shape, seed=9)
    ref = ns_reference(g)
    err = lambda x: float((x.double() - ref).norm() / ref.norm())
    assert err(hybrid_newton_schulz(g, dtype=torch.float32)) < 0.9 * err(ns_unfused(g, torch.float32))
    assert err(hybrid_newton_schulz(g, dtype=torch.bfloat16)) < 0.6 * err(ns_unfused(g, torch.bfloat16))


# ----------------------------------------------------------------------------- Muon steps
def test_nesterov_momentum_and_decay_match_algorithm_1():
    w0 = randn(24, 40, seed=8, dtype=torch.float64)
    grads = [randn(24, 40, seed=10 + t, dtype=torch.float64) for t in range(3)]
    w = nn.Parameter(w0.clone())
    opt = MuonAdamW([dict(params=[w], kind="muon")], lr=0.05, weight_decay=0.1, ns_dtype=torch.float64)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    ref = muon_reference(w0, grads, lr=0.05, wd=0.1)
    assert torch.allclose(w.detach(), ref, rtol=0, atol=1e-12)
    # the classic (non-Nesterov) form orthogonalises M_t instead: clearly different after 3 steps
    plain = w0.clone()
    m = torch.zeros_like(w0)
    for g in grads:
        m = 0.95 * m + g
        plain = plain * (1 - 0.05 * 0.1) - 0.05 * ns_reference(m) * math.sqrt(40) * 0.18
    assert (plain - ref).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["muon", "adamw"])
def test_weight_decay_is_decoupled(kind):
    """W ← W(1 − ηλ) − η·update: the decay does not enter the update, so with the same gradient the
    decayed and undecayed weights differ by exactly ηλW after one step."""
    w0, g, lr = randn(16, 24, seed=20), randn(16, 24, seed=21), 0.03
    after = {}
    for wd in (0.0, 0.1):
        w = nn.Parameter(w0.clone())
        w.grad = g.clone()
        MuonAdamW([dict(params=[w], kind=kind, weight_decay=wd)], lr=lr, ns_dtype=torch.float32).step()
        after[wd] = w.detach()
    assert torch.allclose(after[0.1] - after[0.0], -lr * 0.1 * w0, rtol=0, atol=1e-6)  # a few fp32 ulps at |w| ≈ 4


def test_experts_are_orthogonalised_one_by_one():
    E, n, m = 4, 16, 24
    w0, grads = randn(E, n, m, seed=30), [randn(E, n, m, seed=31 + t) for t in range(2)]
    stacked = nn.Parameter(w0.clone())
    separate = [nn.Parameter(w0[e].clone()) for e in range(E)]
    opt_s = MuonAdamW([dict(params=[stacked], kind="muon", batch_dims=1)], lr=0.05, ns_dtype=torch.float32)
    opt_e = MuonAdamW([dict(params=separate, kind="muon")], lr=0.05, ns_dtype=torch.float32)
    for g in grads:
        stacked.grad = g.clone()
        for e, p in enumerate(separate):
            p.grad = g[e].clone()
        opt_s.step()
        opt_e.step()
    assert torch.allclose(stacked.detach(), torch.stack([p.detach() for p in separate]), rtol=0, atol=1e-6)
    # the default batch_dims (all but the last two) gives the same for a 3-D tensor
    assert torch.equal(muon_update(grads[0], batch_dims=1), muon_update(grads[0]))
    # orthogonalising the concatenation (all experts as one (E·n, m) matrix) is a different update
    per_expert = muon_update(grads[0], dtype=torch.float32)
    joint = muon_update(grads[0].reshape(E * n, m), dtype=torch.float32).reshape(E, n, m)
    assert (per_expert - joint).norm() / per_expert.norm() > 0.3


def test_an_expert_without_tokens_only_decays():
    """A routed expert that received no token this step has an all-zero gradient slice: its update must be
    the momentum's alone (here: the first step, so none), never NaN from normalising a zero matrix."""
    w0, g = randn(3, 8, 12, seed=35), randn(3, 8, 12, seed=36)
    g[1] = 0
    w = nn.Parameter(w0.clone())
    w.grad = g
    MuonAdamW([dict(params=[w], kind="muon")], lr=0.1, weight_decay=0.1).step()
    assert torch.isfinite(w).all()
    assert torch.equal(w.detach()[1], w0[1] * (1 - 0.1 * 0.1))
    assert (w.detach()[0] - w0[0] * (1 - 0.1 * 0.1)).abs().max() > 1e-2


def test_batch_dims_zero_flattens_trailing_dims_into_columns():
    g = randn(6, 4, 5, seed=40)
    assert torch.equal(muon_update(g, batch_dims=0), muon_update(g.reshape(6, 20)).reshape(6, 4, 5))


def test_muon_rejects_vectors_and_bad_groups():
    with pytest.raises(ValueError, match=r"'layers.0.attn_norm.weight' of shape \(7,\).*AdamW group"):
        MuonAdamW([dict(params=[nn.Parameter(randn(7))], param_names=["layers.0.attn_norm.weight"], kind="muon")])
    with pytest.raises(ValueError, match=r"shape \(7,\).*AdamW group"):
        muon([nn.Parameter(randn(7))])
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([dict(params=[nn.Parameter(randn(3, 3))])])
    with pytest.raises(ValueError, match="batch_dims"):
        muon([nn.Parameter(randn(2, 3, 4))], batch_dims=2)
    with pytest.raises(ValueError, match="momentum"):
        muon([nn.Parameter(randn(3, 3))], momentum=1.0)


def test_bf16_params_and_ns_dtypes():
    """bf16 parameters (as on an accelerator) update in bf16; the update is close to the fp32 one."""
    w0, g = randn(32, 48, seed=50), randn(32, 48, seed=51)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        w = nn.Parameter(w0.to(dtype, copy=True))
        w.grad = g.to(dtype, copy=True)
        MuonAdamW([dict(params=[w], kind="muon"), ], lr=0.1).step()
        assert w.dtype == dtype and torch.isfinite(w).all()
        out[dtype] = w.detach().float()
    assert (out[torch.bfloat16] - out[torch.float32]).abs().max() < 0.02  # bf16 spacing at |w|≈3 is 0.016


# ----------------------------------------------------------------------------- AdamW
@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("eps", [1e-20, 1e-8])
def test_adamw_equals_torch_adamw(wd, eps):
    shapes = [(17,), (8, 12), (3, 5, 7)]
    init = [randn(*s, seed=60 + i) for i, s in enumerate(shapes)]
    ours, theirs = [nn.Parameter(t.clone()) for t in init], [nn.Parameter(t.clone()) for t in init]
    opt = MuonAdamW([dict(params=ours, kind="adamw")], lr=1e-2, weight_decay=wd, betas=(0.9, 0.95), eps=eps)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=wd, betas=(0.9, 0.95), eps=eps, foreach=False)
    for t in range(6):
        for i, (a, b) in enumerate(zip(ours, theirs)):
            a.grad = randn(*a.shape, seed=100 * t + i)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b, t in zip(ours, theirs, init):
        assert (a - b).abs().max() < 1e-6          # measured: bitwise equal (same operations in the same order)
        assert (a - t).abs().max() > 1e-2          # and the parameters did move


# ----------------------------------------------------------------------------- batched Muon, foreach AdamW
# matrices of (24, 40) and (40, 24) in 2-D tensors and in stacks of 2 to 4, and two shapes of their own
MIXED = [(24, 40), (4, 24, 40), (24, 40), (40, 24), (2, 40, 24), (16, 64), (64, 16), (3, 24, 40), (40, 24)]


def loop_muon_step(params, buffers, lr, wd, mu=0.95):
    """Muon as MuonAdamW ran it before batching: parameter by parameter, one `muon_update` each (fp32 NS)."""
    for p in params:
        buf = buffers.setdefault(p, torch.zeros_like(p))
        buf.mul_(mu).add_(p.grad)
        update = muon_update(p.grad.add(buf, alpha=mu), dtype=torch.float32)
        p.mul_(1 - lr * wd).add_(update, alpha=-lr)


def loop_adamw_step(p, grad, state, lr, wd, betas=(0.9, 0.95), eps=1e-20):
    """AdamW as MuonAdamW ran it before foreach: tensor by tensor, torch.optim.AdamW's single-tensor path."""
    if not state:
        state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
    state["step"] += 1
    step, (beta1, beta2) = state["step"], betas
    p.mul_(1 - lr * wd)
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (state["exp_avg_sq"].sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
    p.addcdiv_(state["exp_avg"], denom, value=-(lr / (1 - beta1 ** step)))


def test_muon_runs_one_newton_schulz_per_matrix_shape(monkeypatch):
    """A group's matrices of one shape are stacked into one Newton–Schulz call (4 calls for the 9 tensors of
    MIXED), and three steps give the per-parameter loop's weights. Measured: bitwise on the CPU (a batched
    matmul multiplies matrix by matrix); a GPU may round a batch differently, which fp32 Newton–Schulz keeps
    within ~1e-6 of the update (RMS 0.18 × lr 0.05 a step), far below the 1e-6 allowed here on weights of
    |w| < 5 (where one fp32 ulp is 5e-7)."""
    calls, real = [], optim.hybrid_newton_schulz
    monkeypatch.setattr(optim, "hybrid_newton_schulz", lambda g, **kw: calls.append(tuple(g.shape)) or real(g, **kw))
    init = [randn(*s, seed=300 + i) for i, s in enumerate(MIXED)]
    batched, looped = [nn.Parameter(t.clone()) for t in init], [t.clone() for t in init]
    opt = MuonAdamW([dict(params=batched, kind="muon")], lr=0.05, weight_decay=0.1, ns_dtype=torch.float32)
    buffers = {}
    for t in range(3):
        for i, (p, q) in enumerate(zip(batched, looped)):
            p.grad = randn(*p.shape, seed=400 + 10 * t + i)
            q.grad = p.grad.clone()
        calls.clear()
        opt.step()
        assert calls == [(9, 24, 40), (4, 40, 24), (1, 16, 64), (1, 64, 16)]
        loop_muon_step(looped, buffers, lr=0.05, wd=0.1)
    for p, q, t in zip(batched, looped, init):
        assert torch.allclose(p.detach(), q, rtol=0, atol=1e-6)
        assert (p.detach() - t).abs().max() > 1e-3


def test_batched_muon_update_is_as_close_to_float64_as_the_loop():
    """`muon_updates` (one stacked Newton–Schulz per shape) against `muon_update` tensor by tensor, both in
    fp32, and both against Algorithm 1 in float64: the stack changes no matrix's result beyond rounding
    (2e-6: each fp32 result lies within ~8e-7 of float64, measured), and is no further from float64.
    Measured: bitwise equal on the CPU. On an H200 (cuBLAS picks other kernels for a batch) they were up to
    3.5e-7 apart and 2.8e-7 vs 2.4e-7 from float64 on average: rounding either way, not a loss."""
    grads = [randn(*s, seed=500 + i) for i, s in enumerate(MIXED)]
    exact = [ns_reference(g) * math.sqrt(max(g.shape[-2:])) * 0.18 for g in grads]
    batched = muon_updates(grads, dtype=torch.float32)
    looped = [muon_update(g, dtype=torch.float32) for g in grads]
    for u, v, e in zip(batched, looped, exact):
        assert u.shape == v.shape and u.dtype == v.dtype == torch.float32 and u.is_contiguous()
        assert float((u - v).norm() / v.norm()) < 2e-6                        # measured: 0 on the CPU
        err_batched, err_loop = (float((x.double() - e).norm() / e.norm()) for x in (u, v))
        assert err_batched < 2e-6 and err_batched <= 1.05 * err_loop


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_foreach_adamw_equals_the_per_tensor_path_bitwise(dtype):
    """A group's AdamW tensors update with one foreach op per operation, in the single-tensor path's order:
    bitwise the same weights and moments over 6 steps with the lr changing every step, also for a tensor
    that has no gradient at steps 2 and 4 and so runs two steps behind (its own bias correction), with and
    without weight decay. bf16 checks that no scalar is rounded to the tensors' dtype on the way."""
    shapes = [(17,), (8, 12), (3, 5, 7), (1,), (64, 16)]
    init = [randn(*s, seed=600 + i, dtype=dtype) for i, s in enumerate(shapes)]
    ours, ref = [nn.Parameter(t.clone()) for t in init], [t.clone() for t in init]
    wd = [0.1, 0.1, 0.1, 0.0, 0.0]
    opt = MuonAdamW([dict(params=ours[:3], kind="adamw"), dict(params=ours[3:], kind="adamw", weight_decay=0.0)],
                    lr=1.0, weight_decay=0.1)
    states = [{} for _ in shapes]
    for t in range(6):
        lr = 1e-2 * (t + 1) / 6
        opt.set_lr(lr)
        for i, (p, q) in enumerate(zip(ours, ref)):
            p.grad = None if i == 1 and t in (1, 3) else randn(*p.shape, seed=700 + 10 * t + i, dtype=dtype)
            if p.grad is not None:
                loop_adamw_step(q, p.grad, states[i], lr=lr, wd=wd[i])
        opt.step()
    for p, q, st, t in zip(ours, ref, states, init):
        assert torch.equal(p.detach(), q) and (p.detach() - t).abs().max() > 1e-3
        assert torch.equal(opt.state[p]["exp_avg"], st["exp_avg"])
        assert torch.equal(opt.state[p]["exp_avg_sq"], st["exp_avg_sq"])
        assert type(opt.state[p]["step"]) is int and opt.state[p]["step"] == st["step"]
    assert [opt.state[p]["step"] for p in ours] == [6, 4, 6, 6, 6]


def test_device_scalars_step_equals_host_numbers():
    """`use_device_scalars` (the form a CUDA graph records): lr, decay and AdamW's bias corrections read
    from a device tensor that `fill_scalars` writes, one row per step count. Over 6 steps with the lr
    changing, a Muon group, two AdamW groups and an AdamW tensor two steps behind, each step from the
    same weights and gradients equals the host-number step to rounding (a tensor factor rounds once where
    `alpha=` may fuse), and the step counts advance alike."""
    shapes = [(17,), (8, 12), (3, 5, 7), (1,), (64, 16), (16, 24), (2, 16, 24)]
    init = [randn(*s, seed=800 + i) for i, s in enumerate(shapes)]

    def build():
        ps = [nn.Parameter(t.clone()) for t in init]
        return ps, MuonAdamW([dict(params=ps[:3], kind="adamw"), dict(params=ps[3:5], kind="adamw", weight_decay=0.0),
                              dict(params=ps[5:], kind="muon")], lr=1.0, weight_decay=0.1, ns_dtype=torch.float32)
    host_ps, host = build()
    dev_ps, dev = build()
    dev.use_device_scalars("cpu")
    for t in range(6):
        for opt in (host, dev):
            opt.set_lr(1e-2 * (t + 1) / 6)
        for i, (p, q) in enumerate(zip(host_ps, dev_ps)):
            q.data.copy_(p.data)                       # the same weights before each step
            g = None if i == 1 and t in (1, 3) else randn(*p.shape, seed=900 + 10 * t + i)
            p.grad, q.grad = g, (None if g is None else g.clone())
        for p, q in zip(host_ps, dev_ps):
            if p in host.state:
                for k, v in host.state[p].items():
                    if torch.is_tensor(v):
                        dev.state[q][k].copy_(v)
        before = [p.detach().clone() for p in host_ps]
        host.step()
        layout = dev.fill_scalars()
        dev.step()
        assert len(layout) == 2 and (t in (0, 1) or layout[0][1] != (0, 0, 0))
        for p, q, b in zip(host_ps, dev_ps, before):
            moved = (p.detach() - b).abs().max()
            scale = torch.maximum(p.detach().abs(), (p.detach() - b).abs())      # the weight or its update
            ulps = ((p.detach() - q.detach()).abs() / (torch.finfo(torch.float32).eps * scale)).max()
            assert (moved > 0) == (p.grad is not None) and ulps <= 2, (t, float(ulps))   # a factor rounded once more or less
    assert [host.state[p]["step"] for p in host_ps[:5]] == [dev.state[q]["step"] for q in dev_ps[:5]] == [6, 4, 6, 6, 6]


def test_state_dict_keeps_its_format_and_resumes_with_unequal_steps():
    """The state_dict holds per parameter what it held before batching (Muon: `momentum_buffer`; AdamW: a
    Python int `step`, `exp_avg`, `exp_avg_sq`), and resuming from it continues bitwise, also with AdamW
    tensors at different step counts (one had no gradient at a step)."""
    def params():
        return make_params() + [nn.Parameter(randn(12, seed=75)), nn.Parameter(randn(2, 12, 20, seed=76))]

    def opt_of(ps):  # Muon: a matrix, a stack of 3 and a stack of 2 of the matrix's shape; AdamW: two vectors
        return MuonAdamW([dict(params=[ps[0], ps[1], ps[4]], kind="muon"),
                          dict(params=[ps[2], ps[3]], kind="adamw", weight_decay=0.0)], lr=0.02)

    def run(opt, ps, steps):
        for t in steps:
            for i, p in enumerate(ps):
                p.grad = None if i == 3 and t == 1 else randn(*p.shape, seed=1000 * t + i)
            opt.step()

    straight = params()
    opt = opt_of(straight)
    run(opt, straight, range(3))
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in straight], "opt": opt.state_dict()}, buf)
    state = opt.state_dict()["state"]
    assert [sorted(state[i]) for i in range(5)] == [["momentum_buffer"]] * 3 + [["exp_avg", "exp_avg_sq", "step"]] * 2
    assert [type(state[i]["step"]) for i in (3, 4)] == [int, int] and [state[i]["step"] for i in (3, 4)] == [3, 2]
    run(opt, straight, range(3, 6))
    resumed, _ = resume(buf, opt_of, run, range(3, 6))
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- state, lr
def make_params(seed=70):
    return [nn.Parameter(randn(12, 20, seed=seed)), nn.Parameter(randn(3, 8, 10, seed=seed + 1)),
            nn.Parameter(randn(20, seed=seed + 2))]


def make_opt(params):
    return MuonAdamW([dict(params=params[:2], kind="muon"), dict(params=params[2:], kind="adamw", weight_decay=0.0)],
                     lr=0.02)


def run_steps(opt, params, steps):
    for t in steps:
        for i, p in enumerate(params):
            p.grad = randn(*p.shape, seed=1000 * t + i)
        opt.step()


def resume(buf, build, run, steps):
    """Parameters and optimizer rebuilt from a saved {"params", "opt"} buffer, then run for `steps`."""
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    params = [nn.Parameter(t) for t in saved["params"]]
    opt = build(params)
    opt.load_state_dict(saved["opt"])
    run(opt, params, steps)
    return params, opt


def test_state_dict_round_trip_resumes_bitwise():
    straight = make_params()
    opt = make_opt(straight)
    run_steps(opt, straight, range(3))
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in straight], "opt": opt.state_dict()}, buf)
    run_steps(opt, straight, range(3, 6))
    resumed, opt2 = resume(buf, make_opt, run_steps, range(3, 6))
    assert opt2.state[resumed[2]]["step"] == 6 and opt2.param_groups[0]["ns_dtype"] == torch.bfloat16
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_named_state_round_trip_and_eager_init_change_nothing():
    """`init_state` creates what a first step would (the run is unchanged); `named_state` exposes the live
    tensors by name, and filling them in place + `load_named_state` resumes bitwise (the checkpoint path)."""
    names = ["w", "experts", "norm"]

    def named_opt(params):
        return MuonAdamW([dict(params=params[:2], kind="muon", param_names=names[:2]),
                          dict(params=params[2:], kind="adamw", weight_decay=0.0, param_names=names[2:])], lr=0.02)
    lazy, eager = make_params(), make_params()
    opt_lazy, opt_eager = named_opt(lazy), named_opt(eager)
    opt_eager.init_state()
    assert opt_eager.named_state()["norm"]["step"] == 0 and not opt_eager.named_state()["w"]["momentum_buffer"].any()
    run_steps(opt_lazy, lazy, range(3))
    run_steps(opt_eager, eager, range(3))
    assert all(torch.equal(a, b) for a, b in zip(lazy, eager))
    saved = {n: {k: v.clone() for k, v in st.items()} for n, st in opt_eager.named_state().items()}
    assert saved["norm"]["step"] == 3 and set(saved) == set(names)
    resumed = [nn.Parameter(p.detach().clone()) for p in eager]
    opt2 = named_opt(resumed)
    opt2.init_state()
    target = opt2.named_state()
    for n, st in target.items():                      # what torch.distributed.checkpoint.load does
        for k, v in st.items():
            v.copy_(saved[n][k])
    opt2.load_named_state(target)
    run_steps(opt_eager, eager, range(3, 5))
    run_steps(opt2, resumed, range(3, 5))
    assert all(torch.equal(a, b) for a, b in zip(eager, resumed))
    with pytest.raises(ValueError, match="param_names"):
        make_opt(make_params()).named_state()


def test_set_lr_applies_lr_scale_and_skips_params_without_grad():
    a, b = nn.Parameter(randn(4, 6, seed=80)), nn.Parameter(randn(6, seed=81))
    opt = MuonAdamW([dict(params=[a], kind="muon"), dict(params=[b], kind="adamw", lr_scale=0.5)], lr=1.0)
    opt.set_lr(2e-3)
    assert [g["lr"] for g in opt.param_groups] == [2e-3, 1e-3]
    b0 = b.detach().clone()
    a.grad = randn(4, 6, seed=82)
    opt.step()                                   # b has no gradient: untouched, no state, no decay
    assert torch.equal(b, b0) and not opt.state[b]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    """The same three steps on CUDA and on CPU (Muon with experts, AdamW); they differ only by rounding."""
    cpu = [p.detach().to(dtype) for p in make_params()]
    runs = []
    for device in ("cpu", "cuda"):
        params = [nn.Parameter(t.to(device, copy=True)) for t in cpu]
        opt = make_opt(params)
        for t in range(3):
            for i, p in enumerate(params):
                p.grad = randn(*p.shape, seed=1000 * t + i).to(device, dtype)
            opt.step()
        runs.append([p.detach().cpu().float() for p in params])
        assert all(p.dtype == dtype for p in params)
    moved = max(float((a - b.float()).abs().max()) for a, b in zip(runs[0], cpu))
    for a, b in zip(*runs):
        if dtype == torch.float32:
            # bf16 Newton–Schulz rounds differently on each device: ~2% of an update apart
            assert (a - b).abs().max() < 0.05 * moved
        else:
            # bf16 weights: each step's result is rounded to the bf16 spacing (2^-7 |w|), which for most weights
            # is larger than the update, so the runs may land on neighbouring values: one spacing a step
            spacing = 2.0 ** torch.floor(torch.log2(torch.maximum(a.abs(), b.abs()))) * 2.0 ** -7
            assert ((a - b).abs() <= 3 * spacing + 0.05 * moved).all()


# ----------------------------------------------------------------------------- schedules
def test_lr_schedule_shape():
    kw = dict(warmup=100, total=1000, decay_start=800, peak=2.7e-4)
    lr = lambda s: lr_at(s, **kw)
    assert lr(0) == 0.0 and lr(50) == pytest.approx(1.35e-4) and lr(100) == pytest.approx(2.7e-4)
    assert lr(450) == lr(799) == lr(800) == pytest.approx(2.7e-4)
    assert lr(900) == pytest.approx((2.7e-4 + 2.7e-5) / 2)      # cosine midpoint
    assert lr(1000) == pytest.approx(2.7e-5) and lr(1500) == pytest.approx(2.7e-5)
    values = [lr(s) for s in range(0, 1001)]
    assert all(x <= y for x, y in zip(values[:100], values[1:101]))
    assert all(x >= y for x, y in zip(values[100:], values[101:]))
    assert lr_at(0, warmup=0, total=10, decay_start=5, peak=1.0) == 1.0


@pytest.mark.parametrize("kw, match", [
    (dict(warmup=200, total=100, decay_start=100), "warmup"),
    (dict(warmup=50, total=100, decay_start=40), "decay_start"),
    (dict(warmup=50, total=100, decay_start=120), "decay_start"),
    (dict(warmup=10, total=0, decay_start=0), "total"),
    (dict(warmup=10, total=100, decay_start=50, final_ratio=1.5), "final_ratio"),
])
def test_lr_schedule_rejects_inconsistent_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        lr_at(5, peak=1.0, **kw)
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, warmup=1, total=2, decay_start=1, peak=1.0)


def test_mtp_weight_and_batch_ramp():
    assert mtp_weight_at(0, 800) == 0.3 and mtp_weight_at(799, 800) == 0.3
    assert mtp_weight_at(800, 800) == 0.1 and mtp_weight_at(5000, 800) == 0.1
    assert [batch_tokens_at(s, 100, 1000, 5000) for s in (0, 50, 100, 400)] == [1000, 3000, 5000, 5000]
    assert batch_tokens_at(0, 0, 1000, 5000) == 5000
    with pytest.raises(ValueError, match="start_tokens"):
        batch_tokens_at(0, 10, 6000, 5000)
    with pytest.raises(ValueError, match="decay_start"):
        mtp_weight_at(0, -1)


# ----------------------------------------------------------------------------- Muon/AdamW rule
FAKE_PARAMS = [  # name, shape, expected group
    ("embed.weight", (64, 16), "adamw"),
    ("head.weight", (64, 16), "adamw"),
    ("norm.weight", (16,), "adamw_no_decay"),
    ("layers.0.attn_norm.weight", (16,), "adamw_no_decay"),
    ("layers.0.attn.q_norm.weight", (8,), "adamw_no_decay"),
    ("mtp.0.enorm.weight", (16,), "adamw_no_decay"),
    ("layers.1.attn.compressor.norm.weight", (8,), "adamw_no_decay"),
    ("hc_head_scale", (1,), "adamw_no_decay"),
    ("hc_head_base", (4,), "adamw_no_decay"),
    ("layers.0.hc_attn_scale", (3,), "adamw_no_decay"),
    ("layers.0.hc_ffn_base", (24,), "adamw_no_decay"),
    ("layers.0.attn.attn_sink", (4,), "adamw_no_decay"),
    ("layers.1.attn.compressor.ape", (4, 32), "adamw_no_decay"),
    ("layers.1.attn.indexer.compressor.ape", (4, 16), "adamw_no_decay"),
    ("some.bias", (16,), "adamw_no_decay"),
    ("hc_head_fn", (4, 64), "muon"),
    ("layers.0.hc_attn_fn", (24, 64), "muon"),
    ("layers.0.attn.wq_a.weight", (8, 16), "muon"),
    ("layers.0.ffn.gate.weight", (8, 16), "muon"),
    ("layers.0.ffn.shared_experts.w1.weight", (32, 16), "muon"),
    ("mtp.0.e_proj.weight", (16, 16), "muon"),
    ("layers.0.ffn.experts.w1", (8, 32, 16), "muon_experts"),
    ("layers.0.ffn.experts.w2", (8, 16, 32), "muon_experts"),
    ("mtp.0.ffn.experts.w3", (8, 32, 16), "muon_experts"),
]


def test_param_rule_on_names_and_shapes():
    for name, shape, expected in FAKE_PARAMS:
        assert group_of(name, shape) == expected, name
    params = [(n, nn.Parameter(torch.empty(s, device="meta"))) for n, s, _ in FAKE_PARAMS]
    params.append(("frozen.weight", nn.Parameter(torch.empty(4, 4, device="meta"), requires_grad=False)))
    groups = build_param_groups(params, lr=1e-3, weight_decay=0.1)
    by_name = {g["name"]: g for g in groups}
    assert list(by_name) == ["muon", "muon_experts", "adamw", "adamw_no_decay"]
    for gname, g in by_name.items():
        assert set(g["param_names"]) == {n for n, _, e in FAKE_PARAMS if e == gname}
        assert g["lr"] == 1e-3 and g["lr_scale"] == 1.0
    assert by_name["adamw_no_decay"]["weight_decay"] == 0.0
    assert all(by_name[k]["weight_decay"] == 0.1 for k in ("muon", "muon_experts", "adamw"))
    assert by_name["muon_experts"]["batch_dims"] == 1 and "batch_dims" not in by_name["muon"]
    summary = describe_param_groups(groups)
    assert "muon_experts" in summary and " 3 tensors" in summary and "wd 0" in summary
    MuonAdamW(groups)  # every Muon parameter is a matrix


def test_param_rule_on_the_tiny_model():
    from dsv4.config import preset
    from dsv4.model import Transformer

    model = Transformer(preset("tiny"))
    groups = build_param_groups(model.named_parameters(), lr=1e-3)
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    by_name = {g["name"]: set(g["param_names"]) for g in groups}
    assert {"embed.weight", "head.weight"} == by_name["adamw"]
    assert all(n.endswith(("experts.w1", "experts.w2", "experts.w3")) for n in by_name["muon_experts"])
    assert any(n.endswith("hc_attn_fn") for n in by_name["muon"])
    opt = MuonAdamW(groups)
    for i, p in enumerate(model.parameters()):
        p.grad = randn(*p.shape, seed=i)
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
