"""Training: the V4 recipe's pieces against hand-computed cases, document masking, the CSA phases, the
NaN guard, atomic checkpoints, bitwise resume and a golden 20-step loss trace.

Everything runs the `tiny` model preset on a synthetic corpus made here (a fixed random bigram
language over 40 words, BPE-tokenized with 512 ids), so a test takes seconds on two CPU cores.

Regenerate the golden trace (after an intended change of the numerics) with
    python tests/test_train.py --regen
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import pathlib
import random
import sys

import pytest
import torch

from dsv4 import data as D
from dsv4 import runlog
from dsv4.config import preset
from dsv4.model import Transformer
from dsv4.recipes import RECIPES, get_recipe
from dsv4.tokenizer import train_bpe
from dsv4.train_graphs import MicroStepGraphs, OptimizerGraph
from dsv4.train import (IGNORE, Trainer, TrainingDiverged, batch_losses, csa_attentions, moe_layers,
                        mtp_targets, sequence_balance_loss, set_phase, update_router_bias)

GOLDEN = pathlib.Path(__file__).parent / "data" / "golden_tiny_trace.json"
# Relative tolerance of the golden trace. BLAS kernels (AVX2 vs AVX-512, thread count) and the order
# in which autograd adds gradient pieces round in the last bits; Muon's Newton–Schulz in bf16 turns
# such a bit into a different bf16 rounding of the whole update, which 20 steps grow to ~1e-4 (seen:
# the same maths with one matmul transposed). The trace therefore runs Newton–Schulz in fp32
# (`muon_ns_dtype="fp32"`), where last-bit differences stay below 1e-6 over 20 steps.
GOLDEN_RTOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the tiny model's ops are too small to gain from more, a shared CPU makes
    spinning threads slow (10× seen), and the golden trace's reductions keep one fixed order."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- synthetic corpus
def synthetic_texts(n_docs: int = 60, seed: int = 0) -> list[str]:
    """Documents from a fixed random bigram language over 40 words (learnable, deterministic)."""
    rng = random.Random(seed)
    words = [f"w{chr(97 + i % 26)}{i}" for i in range(40)]
    nxt = {w: rng.sample(words, 4) for w in words}
    docs = []
    for _ in range(n_docs):
        w, out = rng.choice(words), []
        for _ in range(rng.randint(20, 160)):
            out.append(w)
            w = rng.choice(nxt[w])
        docs.append(" ".join(out) + ".")
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, pathlib.Path]:
    """A tokenizer folder and a prepared data folder for the tiny model (vocab 512)."""
    root = tmp_path_factory.mktemp("corpus")
    return make_corpus(root)


def make_corpus(root: pathlib.Path) -> dict[str, pathlib.Path]:
    texts = synthetic_texts()
    tok = train_bpe(texts, 512)
    tok.save(root / "tok")
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    D.prepare([src], root / "data", lambda t: tok.encode(t, add_bos=True), eos_id=tok.eos_id, vocab_size=512,
              val_docs=6, progress=False)
    return {"tok": root / "tok", "data": root / "data"}


def tiny_config(corpus, **changes):
    """The tiny recipe shrunk to the `tiny` model: 20 steps covering all three CSA phases."""
    base = get_recipe("tiny")
    cfg = dataclasses.replace(
        base, model=preset("tiny"), data=str(corpus["data"]), tokenizer=str(corpus["tok"]),
        seq_len=64, micro_batch=2, steps=20, lr=3e-3, warmup_steps=3, decay_start=0.7,
        dense_fraction=0.4, indexer_warmup_fraction=0.2, eval_every=10, eval_batches=2, ckpt_every=1000,
        tensorboard=False, threads=0)
    return dataclasses.replace(cfg, **changes)


def quiet(*_):
    pass


def make_trainer(corpus, run_dir, resume=False, **changes) -> Trainer:
    return Trainer(tiny_config(corpus, **changes), run_dir, resume=resume, progress=False, log=quiet)


# ----------------------------------------------------------------------------- balancing
def test_sequence_balance_loss_hand_computed():
    # E = 4 experts, K = 2 per token, 2 sequences of S = 2 tokens
    idx = torch.tensor([[0, 1], [0, 2],          # sequence 0
                        [3, 2], [3, 1]])         # sequence 1
    aff = torch.tensor([[1., 1., 1., 1.], [2., 1., 1., 0.],
                        [0., 0., 1., 3.], [1., 1., 1., 1.]], requires_grad=True)
    # seq 0: counts (2,1,1,0) -> f = E/(K·S)·count = (2,1,1,0); P = mean of (.25,.25,.25,.25), (.5,.25,.25,0)
    #        = (.375,.25,.25,.125); L0 = .75 + .25 + .25 + 0 = 1.25
    # seq 1: counts (0,1,1,2) -> f = (0,1,1,2); P = (.125,.125,.25,.5); L1 = .125 + .25 + 1 = 1.375
    loss = sequence_balance_loss(idx, aff, rows=2)
    assert loss.item() == pytest.approx((1.25 + 1.375) / 2, abs=1e-7)
    loss.backward()  # gradient reaches the affinities only through P (f counts are constants)
    assert aff.grad is not None and torch.isfinite(aff.grad).all()
    # perfectly balanced selection with uniform affinities gives exactly 1
    even = torch.tensor([[0, 1], [2, 3]])
    assert sequence_balance_loss(even, torch.ones(2, 4), rows=1).item() == pytest.approx(1.0)


def test_router_bias_sign_rule():
    bias = torch.zeros(4)
    update_router_bias(bias, torch.tensor([5, 1, 3, 3]), speed=0.001)   # mean 3: over, under, equal, equal
    assert bias.tolist() == pytest.approx([-0.001, 0.001, 0.0, 0.0])
    update_router_bias(bias, torch.tensor([5, 1, 3, 3]), speed=0.001)
    assert bias.tolist() == pytest.approx([-0.002, 0.002, 0.0, 0.0])


def test_train_step_updates_non_hash_biases_from_the_step_loads(corpus, tmp_path):
    tr = make_trainer(corpus, tmp_path, dense_fraction=1.0, indexer_warmup_fraction=0.0)
    rec = tr.train_step()
    for name, moe in moe_layers(tr.model):
        load = torch.tensor(rec["expert_load"][name])
        if moe.gate.hashed:
            assert not hasattr(moe.gate, "bias") or moe.gate.bias is None
            continue
        E = load.numel()
        expect = tr.cfg.bias_update_speed * torch.sign(1 / E - load)
        clear = (load - 1 / E).abs() > 1e-4              # the logged loads are rounded to 5 digits
        assert torch.allclose(moe.gate.bias[clear], expect[clear]), name
    assert rec["balance_loss"] > 0 and "mtp_loss" in rec and rec["index_loss"] is None


# ----------------------------------------------------------------------------- MTP and documents
def test_mtp_targets_align_to_t_plus_2_and_mask_boundaries():
    labels = torch.tensor([[10, 11, IGNORE, 13, 14, 15]])    # token 3 opens a new document
    assert mtp_targets(labels).tolist() == [[11, IGNORE, IGNORE, 14, 15]]


def test_mtp_targets_on_packed_rows(corpus):
    loader = D.PackedLoader(corpus["data"], "train", 4, 64, seed=1)
    masked = 0
    for _ in range(5):
        b = next(loader)
        t = mtp_targets(b["labels"])
        ids, doc = b["input_ids"], b["doc_ids"]
        keep = t != IGNORE
        masked += int((~keep).sum())
        # a kept target at t is token t+2 of the same document (t+2 may lie past the row: it is labels[S-1])
        ext = torch.cat([ids, b["labels"][:, -1:]], dim=1)                # tokens 0..S
        assert torch.equal(t[keep], ext[:, 2:][keep])
        same = torch.cat([doc[:, 2:] == doc[:, :-2], (b["labels"][:, -1:] != IGNORE) & (doc[:, -1:] == doc[:, -2:-1])],
                         dim=1)
        assert same[keep].all()
    assert masked > 0                                   # the rows do contain document boundaries


@torch.no_grad()
def test_document_masking_packed_equals_alone():
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).eval()
    a, b = torch.randint(0, 512, (1, 37)), torch.randint(0, 512, (1, 53))
    a2 = torch.randint(0, 512, (1, 37))
    alone, h_alone = model(b, return_hidden=True)
    mtp_alone = model.mtp_logits(h_alone[:, :-1], b[:, 1:])
    for first in (a, a2):                                  # the other document changes: b's outputs do not
        ids = torch.cat([first, b], dim=1)
        seg = torch.cat([torch.zeros(1, 37), torch.ones(1, 53)], dim=1).long()
        pos = torch.cat([torch.arange(37), torch.arange(53)]).unsqueeze(0)
        for mode in ("sparse", "dense"):
            for attn in csa_attentions(model):
                attn.index_mode = mode
            logits, h = model(ids, segment_ids=seg, positions=pos, return_hidden=True)
            assert (logits[:, 37:] - alone).abs().max() < 1e-5
            mtp = model.mtp_logits(h[:, :-1], ids[:, 1:], segment_ids=seg[:, :-1], positions=pos[:, :-1])
            assert (mtp[:, 37:] - mtp_alone).abs().max() < 1e-5


# ----------------------------------------------------------------------------- CSA phases
def test_indexer_warmup_freezes_main_model_and_lowers_the_kl(corpus, tmp_path):
    tr = make_trainer(corpus, tmp_path, dense_fraction=0.0, indexer_warmup_fraction=0.3, warmup_steps=0,
                      lr=1e-2)
    batch = next(tr.loader)
    tr.loader = itertools.repeat(batch)                    # one fixed batch
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    biases = {n: m.gate.bias.clone() for n, m in moe_layers(tr.model) if not m.gate.hashed}
    kl = [tr.train_step()["index_loss"] for _ in range(6)]
    assert all(r == "warmup" for r in [tr.cfg.phase_at(s) for s in range(6)])
    assert kl[-1] < 0.8 * kl[0], kl
    for n, p in tr.model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (".indexer." in n), n
        assert p.requires_grad == (".indexer." in n)
    for n, m in moe_layers(tr.model):
        if not m.gate.hashed:
            assert torch.equal(m.gate.bias, biases[n])     # no bias update while the router is frozen


def test_sparse_phase_index_loss_trains_only_the_indexers():
    model = Transformer(preset("tiny"))
    set_phase(model, "sparse")
    _, aux = model(torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0)), return_aux=True)
    kls = [a.index_kl for a in aux if a.index_kl is not None]
    assert len(kls) == len(csa_attentions(model)) and all(n > 0 for _, n in kls)
    torch.stack([kl / n for kl, n in kls]).sum().backward()
    reached = [n for n, p in model.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)]
    assert reached and all(".indexer." in n for n in reached), [n for n in reached if ".indexer." not in n][:5]


def test_phase_switches_attention_modes():
    model = Transformer(preset("tiny"))
    cfg = dataclasses.replace(get_recipe("tiny"), steps=20, dense_fraction=0.25, indexer_warmup_fraction=0.1)
    expect = {0: ("dense", False), 4: ("dense", False), 5: ("dense", True), 6: ("dense", True), 7: ("sparse", True)}
    for step, (mode, loss) in expect.items():
        set_phase(model, cfg.phase_at(step))
        for attn in csa_attentions(model):
            assert (attn.index_mode, attn.index_loss) == (mode, loss)
        assert all(p.requires_grad for n, p in model.named_parameters() if ".indexer." not in n) == \
            (cfg.phase_at(step) != "warmup")


def test_activation_checkpointing_gives_the_same_losses_and_gradients(corpus):
    batch = next(D.PackedLoader(corpus["data"], "train", 2, 64, seed=0))
    cfg = tiny_config(corpus)
    n_lm, n_mtp = int((batch["labels"] != IGNORE).sum()), int((mtp_targets(batch["labels"]) != IGNORE).sum())
    out = []
    for ckpt in (False, True):
        model = Transformer(preset("tiny"))
        model.init_weights(seed=0)
        model.gradient_checkpointing = ckpt
        set_phase(model, "sparse")          # every loss term: next-token, MTP, balance, index KL
        objective, terms = batch_losses(model.train(), batch, cfg, "sparse", 0.3, n_lm, n_mtp)
        objective.backward()
        out.append(({k: float(v.detach()) for k, v in terms.items()}, {n: p.grad for n, p in model.named_parameters()}))
    assert out[0][0] == out[1][0] and set(out[0][0]) == {"lm", "mtp", "balance", "index"}
    for n, g in out[0][1].items():
        h = out[1][1][n]
        assert (g is None) == (h is None) and (g is None or torch.allclose(g, h, rtol=1e-5, atol=1e-7)), n


# ----------------------------------------------------------------------------- robustness
def test_nan_gradient_skips_the_step_and_is_logged(corpus, tmp_path):
    tr = make_trainer(corpus, tmp_path, max_bad_steps=3)
    p = tr.model.layers[1].attn.wq_a.weight
    fired = []

    def poison(grad):
        if not fired:
            fired.append(1)
            return torch.full_like(grad, float("nan"))
        return grad

    handle = p.register_hook(poison)
    tr.fit(until=1)
    before = {n: q.detach().clone() for n, q in tr.model.named_parameters()}
    tr.fit(until=2)
    handle.remove()
    rows = runlog.read_metrics(tmp_path)
    assert rows[0]["skipped"] is True and rows[0]["bad_steps"] == 1 and math.isnan(rows[0]["grad_norm"])
    assert "skipped" not in rows[1] and tr.bad_steps == 0
    assert any(not torch.equal(q, before[n]) for n, q in tr.model.named_parameters())
    # a gradient that stays NaN stops the run after max_bad_steps
    handle = p.register_hook(lambda g: torch.full_like(g, float("nan")))
    with pytest.raises(TrainingDiverged):
        tr.fit(until=10)
    handle.remove()
    assert tr.bad_steps == 3


def test_checkpoint_crash_mid_write_keeps_the_previous_one(corpus, tmp_path, monkeypatch):
    tr = make_trainer(corpus, tmp_path)
    tr.fit(until=2)
    good = tr.save_checkpoint()
    tr.fit(until=3)
    real_save = torch.save

    def crash_after_the_tensors(obj, f, *a, **k):     # the sharded tensors are written, trainer.pt is not
        real_save(obj, f, *a, **k)
        if str(f).endswith("trainer.pt"):
            raise OSError("disk full (simulated crash)")

    monkeypatch.setattr(torch, "save", crash_after_the_tensors)
    with pytest.raises(OSError):
        tr.save_checkpoint()
    monkeypatch.setattr(torch, "save", real_save)
    assert runlog.latest_checkpoint(tmp_path / "checkpoints") == good
    half = list((tmp_path / "checkpoints").glob(".tmp-*"))            # the half-written folder
    assert half and (half[0] / "state" / ".metadata").exists()
    resumed = make_trainer(corpus, tmp_path, resume=True)             # loads and verifies step 2
    assert resumed.step == 2 and not list((tmp_path / "checkpoints").glob(".tmp-*"))
    # a corrupted file is refused with a message naming it
    f = good / "state" / "__0_0.distcp"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(runlog.CheckpointError, match="__0_0.distcp"):
        make_trainer(corpus, tmp_path, resume=True)


def test_resume_is_bitwise_identical(corpus, tmp_path):
    full = make_trainer(corpus, tmp_path / "full", ckpt_every=4, steps=10)
    full.fit()
    full.close()
    killed = make_trainer(corpus, tmp_path / "killed", ckpt_every=4, steps=10)
    killed.fit(until=6)                  # "killed" after step 6: the last checkpoint is step 4
    killed.close()
    resumed = make_trainer(corpus, tmp_path / "killed", resume=True, ckpt_every=4, steps=10)
    assert resumed.step == 4
    resumed.fit()
    resumed.close()
    a, b = runlog.read_metrics(tmp_path / "full"), runlog.read_metrics(tmp_path / "killed")
    assert [r["step"] for r in b] == list(range(1, 11))
    for key in ("loss", "objective", "grad_norm", "val_loss"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key
    for (n, p), q in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), n
    # the export loads back with the same logits
    from dsv4.checkpoint import load_pretrained
    loaded = load_pretrained(tmp_path / "full" / "model")
    ids = torch.randint(0, 512, (1, 40))
    with torch.no_grad():
        full.model.eval()
        assert torch.equal(loaded(ids), full.model(ids))
    # ... and transformers reads the same folder (weights and tokenizer) with the same logits
    from transformers import AutoTokenizer, DeepseekV4ForCausalLM
    hf = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "full" / "model", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(ids).logits - loaded(ids)).abs().max() < 1e-4
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "full" / "model")
    assert hf_tok("wa0 wb1").input_ids == full.tokenizer.encode("wa0 wb1")
    run = json.loads((tmp_path / "killed" / "run.json").read_text())
    assert run["resumes"][0]["step"] == 4 and run["git"]["commit"] and run["ops_backends"]["sparse_attention"] == "torch"
    from dsv4.plot import plot_run
    assert len(plot_run(tmp_path / "full")) == 5


# ----------------------------------------------------------------------------- CUDA-graph micro-steps
def test_static_micro_step_equals_the_eager_step(corpus, tmp_path):
    """The form the CUDA-graph runner records (`dsv4.train_graphs`: the step's numbers as device tensors,
    gradients by autograd.grad, later micro-batches added with one foreach add, outputs copied out) run
    eagerly on the CPU: bitwise the eager trainer's step, through all three CSA phases and with two
    micro-batches per step."""
    changes = dict(steps=10, batch_tokens=2 * 2 * 64, muon_ns_dtype="fp32")
    eager = make_trainer(corpus, tmp_path / "eager", **changes)
    static = make_trainer(corpus, tmp_path / "static", **changes)
    static.graphs = static._step_graphs(record=False)
    a = [eager.train_step() for _ in range(10)]
    b = [static.train_step() for _ in range(10)]
    assert [r["phase"] for r in a] == ["dense"] * 4 + ["warmup"] * 2 + ["sparse"] * 4
    assert {r["micro_batches"] for r in a} == {2}
    for key in ("loss", "objective", "mtp_loss", "balance_loss", "index_loss", "grad_norm", "expert_load"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    for (n, p), q in zip(eager.model.state_dict().items(), static.model.state_dict().values()):
        assert torch.equal(p, q), n
    runs = static.graphs.recordings
    assert len(runs) == 2 and all(r is not None for r in runs.values())   # the sparse phase's two kinds
    assert not static.graphs.failures


def test_optimizer_with_device_numbers_equals_host_numbers(corpus, tmp_path):
    """The optimizer step `OptimizerGraph` records reads lr and AdamW's bias corrections from a device
    tensor (one row per step count: after the warm-up phase the indexers' AdamW parameters are ahead of
    the others). Run eagerly on the CPU over all phases its losses follow the host-number optimizer's (an
    ulp per operation apart, which training amplifies: `test_optim` checks one step to rounding)."""
    changes = dict(steps=10, muon_ns_dtype="fp32")
    host = make_trainer(corpus, tmp_path / "host", **changes)
    dev = make_trainer(corpus, tmp_path / "dev", **changes)
    dev.optimizer_graph = OptimizerGraph(dev.optimizer, dev.device, record=False)
    a = [host.train_step() for _ in range(10)]
    b = [dev.train_step() for _ in range(10)]
    assert dev.optimizer._adamw_rows and len({s for _, s in dev.optimizer._adamw_rows}) == 2   # two step counts
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-5), key
    steps = {n: s["step"] for n, s in host.optimizer.named_state().items() if "step" in s}
    assert steps == {n: s["step"] for n, s in dev.optimizer.named_state().items() if "step" in s}
    assert len({int(v) for v in steps.values()}) >= 2


def test_graph_runner_checks_token_ids_before_recording():
    """Inside a recording the model skips its id check (a device read), so the runner checks the host
    batch first: an id outside the vocabulary is a clear error, before any forward runs."""
    model = Transformer(preset("tiny"))
    ran = []
    runner = MicroStepGraphs(model, lambda *a: ran.append(a), contextlib.nullcontext, {}, torch.device("cpu"),
                             record=False)
    bad = {"input_ids": torch.full((1, 8), 600), "labels": torch.zeros(1, 8, dtype=torch.long),
           "doc_ids": torch.zeros(1, 8, dtype=torch.long), "positions": torch.arange(8)[None]}
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 512\); got min 600"):
        runner.run(bad, "sparse", 0.3, 8, 7, 1, True, {}, lambda: ran.append("eager"))
    assert not ran and not runner.recordings


def test_cuda_graphs_setting_is_checked(corpus, tmp_path):
    with pytest.raises(ValueError, match="cuda_graphs must be"):
        tiny_config(corpus, cuda_graphs="yes")
    with pytest.raises(ValueError, match="cuda_graphs='on' cannot apply: the device is not CUDA"):
        make_trainer(corpus, tmp_path, cuda_graphs="on", device="cpu")
    assert make_trainer(corpus, tmp_path / "auto", device="cpu").graphs is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_training_equals_eager_on_cuda(corpus, tmp_path):
    """On a GPU the replayed micro-steps and optimizer steps train as the eager ones do, through all phases
    (same kernels; the attention's key gradients use atomics and the optimizer's factors come from the
    device, so equal to rounding, which ten steps of bf16 training amplify, rather than bitwise)."""
    changes = dict(steps=10, batch_tokens=2 * 2 * 64, muon_ns_dtype="fp32", device="cuda")   # bf16 autocast
    eager = make_trainer(corpus, tmp_path / "eager", cuda_graphs="off", **changes)
    graphed = make_trainer(corpus, tmp_path / "graphed", cuda_graphs="on", **changes)
    a = [eager.train_step() for _ in range(10)]
    b = [graphed.train_step() for _ in range(10)]
    assert not graphed.graphs.failures, graphed.graphs.failures
    assert graphed.graphs.replays == 20 and graphed.optimizer_graph.failed is None
    assert graphed.optimizer_graph.replays >= 4        # each phase: an eager first step, then replays
    # the same forward from the same weights, but the token-count division by a device number rounds
    # apart from CUDA's division by a host number (a multiply by its reciprocal): an ulp
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-6)
    for key in ("loss", "objective", "index_loss", "grad_norm"):
        for x, y in zip(a, b):
            if x[key] is None:
                assert y[key] is None
            else:
                assert y[key] == pytest.approx(x[key], rel=2e-3, abs=1e-5), (key, x["step"])


# ----------------------------------------------------------------------------- golden trace
def golden_trace(corpus, run_dir) -> dict[str, list]:
    tr = make_trainer(corpus, run_dir, muon_ns_dtype="fp32")
    rows = [tr.train_step() for _ in range(20)]
    return {"loss": [r["loss"] for r in rows], "index_loss": [r["index_loss"] for r in rows],
            "phase": [r["phase"] for r in rows]}


def test_golden_20_step_trace(corpus, tmp_path):
    want = json.loads(GOLDEN.read_text())
    got = golden_trace(corpus, tmp_path)
    assert got["phase"] == want["phase"]
    assert got["loss"][-1] < got["loss"][0] - 0.5                       # it learns
    for key in ("loss", "index_loss"):
        for step, (g, w) in enumerate(zip(got[key], want[key]), 1):
            if w is None:
                assert g is None
            else:
                assert g == pytest.approx(w, rel=GOLDEN_RTOL), f"{key} at step {step}: {g} vs golden {w}"


# ----------------------------------------------------------------------------- recipes and config
def test_recipes_construct_and_overrides_apply():
    for name in RECIPES:
        cfg = get_recipe(name)
        json.dumps(cfg.to_dict(), default=str)
    small = get_recipe("small").model.param_counts()["total"]
    assert 100e6 <= small <= 300e6
    flash = get_recipe("flash")
    assert flash.lr == 2.7e-4 and flash.warmup_steps == 2000 and flash.final_lr_ratio == 0.1
    assert get_recipe("pro").lr == 2.0e-4
    cfg = get_recipe("tiny").with_overrides(["lr=1e-3", "steps=7", "model.hidden_size=128",
                                             "gradient_checkpointing=true", "adam_betas=[0.8,0.9]"])
    assert (cfg.lr, cfg.steps, cfg.model.hidden_size, cfg.gradient_checkpointing, cfg.adam_betas) == \
        (1e-3, 7, 128, True, (0.8, 0.9))
    with pytest.raises(ValueError, match="unknown training field"):
        get_recipe("tiny").with_overrides(["nope=1"])


if __name__ == "__main__" and "--regen" in sys.argv:
    import tempfile
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        trace = golden_trace(make_corpus(pathlib.Path(d)), pathlib.Path(d) / "run")
    trace["note"] = ("20 steps of the tiny recipe on the tiny model and the synthetic corpus of "
                     f"tests/test_train.py; compared with rel. tolerance {GOLDEN_RTOL}")
    GOLDEN.write_text(json.dumps(trace, indent=1) + "\n")
    print(f"wrote {GOLDEN}")


def test_flops_per_token_by_hand_and_logged_throughput(corpus, tmp_path):
    from dsv4.flops import train_flops_per_token

    cfg = preset("tiny")
    H, Dh, L = cfg.num_attention_heads, cfg.head_dim, cfg.num_hidden_layers
    # one token: each layer attends one window key and no compressed entry, the indexer scores nothing
    assert train_flops_per_token(cfg, 1)["total"] == 6 * cfg.param_counts()["active"] + 3 * L * 4 * H * Dh
    # eight tokens on a window of 16 and CSA/HCA visibility: keys per position summed by hand
    S, W = 8, cfg.sliding_window
    keys = {0: sum(min(W, t + 1) for t in range(S)),
            4: sum(min(W, t + 1) + min(cfg.index_topk, (t + 1) // 4) for t in range(S)),
            128: sum(min(W, t + 1) for t in range(S))}
    attn = sum(4 * H * Dh * keys[cfg.layer_ratio(i)] / S for i in range(L))
    index = sum(2 * cfg.index_n_heads * cfg.index_head_dim * sum((t + 1) // 4 for t in range(S)) / S
                for i in range(L) if cfg.layer_ratio(i) == 4)
    got = train_flops_per_token(cfg, S)
    assert got["attention"] == pytest.approx(3 * attn) and got["indexer"] == pytest.approx(index)
    tr = make_trainer(corpus, tmp_path, steps=2, peak_tflops=100.0)
    rec = tr.train_step()
    F = train_flops_per_token(tr.cfg.model, tr.cfg.seq_len, mtp=True)["total"]
    assert rec["model_tflops"] == pytest.approx(rec["tokens_per_s"] * F / 1e12)
    assert rec["mfu"] == pytest.approx(rec["model_tflops"] / 100.0)
