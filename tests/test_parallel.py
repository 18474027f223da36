"""Distributed training (dsv4.parallel) against the one-process run: 2 and 4 gloo processes on the CPU.

The heart: five optimizer steps (all three CSA phases, two micro-batches per step, an evaluation) on the
same global batch give the one-process losses to 1e-5 (fp32, Newton–Schulz in fp32), with FSDP, with
expert parallelism, with both, with HSDP and with gradient checkpointing. Also: expert-parallel dispatch
and distributed Muon against their one-process twins at op level, the NaN guard deciding globally, bf16
FSDP mixed precision, a run killed on 4 processes and resumed on 2 (and on 1) continuing with the same
losses, the export of a sharded run, and the errors of bad layouts.

Processes come from a forkserver that imported torch and dsv4 once, so a spawn costs a fraction of a
second; each spawned test reuses one process group for all its checks.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import pathlib
import shutil
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from dsv4 import runlog
from dsv4.parallel import ParallelConfigError, ParallelDims
from dsv4.parallel.muon import assign_owners
from test_train import make_corpus, make_trainer

# the one-process reference and every layout train this: 5 steps (dense 0–1, indexer warm-up 2, sparse
# 3–4), 4 rows of 64 tokens per micro-batch over all processes, 2 micro-batches per step, eval at step 5
RUN = dict(steps=5, micro_batch=4, batch_tokens=2 * 4 * 64, muon_ns_dtype="fp32", dense_fraction=0.4,
           indexer_warmup_fraction=0.2, eval_every=5, warmup_steps=2)
KEYS = ("loss", "objective", "mtp_loss", "balance_loss", "index_loss", "grad_norm", "val_loss")
RTOL = 1e-5   # measured: ~2e-7 (gradient sums in another order, expert matmuls on other row counts)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- process launcher
def _entry(rank: int, world: int, init: str, out_dir: str, fn_name: str, args: tuple) -> None:
    torch.set_num_threads(1)
    if init.startswith("file://"):
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        # every rank has its connections before any may leave: a rank that finishes without a collective
        # and exits would otherwise close a pair another rank is still setting up
        dist.barrier()
    else:  # "env:PORT": torchrun's environment; the code under test starts the process group
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=init.removeprefix("env:"))
    try:
        result = globals()[fn_name](rank, world, *args)
        torch.save(result, pathlib.Path(out_dir) / f"rank{rank}.pt")
        if dist.is_initialized():
            dist.barrier()   # leave together (a failed rank is reported by the parent, which stops the others)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn_name: str, world: int, tmp: pathlib.Path, *args, torchrun_env: bool = False,
          timeout: float = 400.0) -> list:
    """Run `fn_name(rank, world, *args)` in `world` gloo processes; returns the per-rank results.
    `torchrun_env=True` sets torchrun's variables instead of starting the process group."""
    multiprocessing.set_forkserver_preload(["torch", "torch.distributed.fsdp", "torch.distributed.checkpoint",
                                            "dsv4.train", "dsv4.parallel.fsdp", "test_parallel"])
    out = tmp / f"spawn-{fn_name}-{world}-{time.monotonic_ns()}"
    out.mkdir(parents=True)
    init = f"env:{_free_port()}" if torchrun_env else f"file://{out / 'init'}"
    ctx = torch_mp.start_processes(_entry, args=(world, init, str(out), fn_name, args), nprocs=world,
                                 start_method="forkserver", join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{fn_name} on {world} processes did not finish in {timeout:.0f}s (deadlock?)")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def trace(records: list[dict]) -> list[dict]:
    return [{k: r.get(k) for k in KEYS + ("max_load",)} for r in records]


def train_records(trainer) -> list[dict]:
    """Train to the end as `fit` does (evaluating every `eval_every` steps), without checkpoints."""
    out = []
    while trainer.step < trainer.cfg.steps:
        rec = trainer.train_step()
        if trainer.step % trainer.cfg.eval_every == 0:
            rec.update(trainer.evaluate())
        out.append(rec)
    return trace(out)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The one-process run every layout must reproduce."""
    tr = make_trainer(corpus, tmp_path_factory.mktemp("ref"), **RUN)
    records = train_records(tr)
    assert {r["index_loss"] is None for r in records[:2]} == {True} and records[-1]["val_loss"] is not None
    return {"records": records, "model": tr.model}


def assert_same_trace(got: list[dict], want: list[dict], what: str) -> None:
    assert len(got) == len(want), what
    for step, (g, w) in enumerate(zip(got, want), 1):
        for k in KEYS:
            if w[k] is None:
                assert g[k] is None, f"{what}: {k} at step {step}"
            else:
                assert g[k] == pytest.approx(w[k], rel=RTOL), f"{what}: {k} at step {step}: {g[k]} vs {w[k]}"
        for layer, v in w["max_load"].items():        # expert loads are all-reduced integer counts
            assert g["max_load"][layer] == pytest.approx(v, rel=1e-6), f"{what}: max_load {layer} at step {step}"


# ----------------------------------------------------------------------------- workers (run in each process)
def _layouts(rank, world, corpus, root, layouts):
    """Train RUN under each layout; rank 0 returns the traces and what the layout did to the model."""
    from dsv4.parallel.expert import ExpertParallel

    out = []
    for i, layout in enumerate(layouts):
        t0 = time.perf_counter()
        tr = make_trainer(corpus, pathlib.Path(root) / f"run{i}", **RUN, **layout)
        t1 = time.perf_counter()
        experts = tr.model.layers[1].ffn.experts
        w1 = experts.w1.to_local()
        facts = {"ep_module": isinstance(experts, ExpertParallel), "local_experts": w1.shape[0],
                 "wq_rows": tr.model.layers[1].attn.wq_a.weight.to_local().shape[0],
                 "placements": str(tr.model.layers[1].attn.wq_a.weight.placements)}
        records = train_records(tr)
        facts["seconds"] = (round(t1 - t0, 2), round(time.perf_counter() - t1, 2))   # set-up, 5 steps
        out.append((layout, records, facts))
        tr.close()
    return out


def _checks(rank, world, corpus, root, layouts):
    """Everything one spawn checks: the training layouts, the op-level twins, bf16 FSDP (2 processes)."""
    out = {"layouts": _layouts(rank, world, corpus, root, layouts), "ops": _ops(rank, world)}
    if world == 2:
        out["bf16"] = _mixed_precision(rank, world, corpus, root)
        out["nan"] = _nan_guard(rank, world, corpus, root)
    return out


def _nan_guard(rank, world, corpus, root):
    """A NaN in one process's gradient shard only: every process skips the step (a global decision)."""
    from dsv4.parallel import reduce

    tr = make_trainer(corpus, pathlib.Path(root) / "nan", **RUN)
    real = reduce.grad_norm

    def poisoned(params):
        if rank == 1 and tr.step == 0:
            reduce.local(params[0].grad).view(-1)[0] = float("nan")
        return real(params)
    reduce.grad_norm = poisoned
    try:
        before = [reduce.local(p).clone() for p in tr.model.parameters()]
        first = tr.train_step()
        unchanged = all(torch.equal(reduce.local(p), b) for p, b in zip(tr.model.parameters(), before))
        second = tr.train_step()
        moved = any(not torch.equal(reduce.local(p), b) for p, b in zip(tr.model.parameters(), before))
    finally:
        reduce.grad_norm = real
    return {"skipped": first.get("skipped"), "unchanged": unchanged, "next": second.get("skipped"), "moved": moved}


def _mixed_precision(rank, world, corpus, root):
    """FSDP2 mixed precision: parameters gathered and used in bf16, master weights and their update fp32."""
    tr = make_trainer(corpus, pathlib.Path(root) / "bf16", **RUN, fsdp_param_dtype="bf16")
    rec = tr.train_step()
    dtypes = {p.to_local().dtype for p in tr.model.parameters()}
    return {"loss": rec["loss"], "grad_norm": rec["grad_norm"], "dtypes": sorted(str(d) for d in dtypes)}


def _ops(rank, world):
    """Expert-parallel dispatch and distributed Muon against the one-process modules, on random data."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from dsv4.model import Experts
    from dsv4.optim import MuonAdamW
    from dsv4.parallel.expert import ExpertParallel

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    g = torch.Generator().manual_seed(0)
    E, D, I, K, N = 8, 16, 12, 3, 10 * world
    ref = Experts(E, D, I, limit=10.0)
    for p in ref.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.5          # large enough to hit the SwiGLU clamp
    x = torch.randn(N, D, generator=g, requires_grad=True)
    idx = torch.rand(N, E, generator=g).argsort(-1)[:, :K]
    idx[0] = torch.tensor([0, 0, 1])                               # a token listing an expert twice
    w = torch.rand(N, K, generator=g, requires_grad=True)
    y_ref = ref(x, idx, w)
    (y_ref * torch.linspace(-1, 1, D)).sum().backward()
    ep = ExpertParallel(ref, mesh)
    rows = slice(rank * N // world, (rank + 1) * N // world)
    xr, wr = x.detach()[rows].clone().requires_grad_(), w.detach()[rows].clone().requires_grad_()
    y = ep(xr, idx[rows], wr)
    (y * torch.linspace(-1, 1, D)).sum().backward()
    mine = slice(rank * E // world, (rank + 1) * E // world)
    expert_err = {"y": (y - y_ref[rows]).abs().max().item(), "x": (xr.grad - x.grad[rows]).abs().max().item(),
                  "w": (wr.grad - w.grad[rows]).abs().max().item(),
                  **{n: (getattr(ep, n).grad.to_local() - getattr(ref, n).grad[mine]).abs().max().item()
                     for n in ("w1", "w2", "w3")}}
    # distributed Muon: matrices with rows not divisible by the world (one rank may hold none), a stacked
    # expert tensor, AdamW vectors; three steps on sharded copies equal three one-process steps exactly
    shapes = {"a": (7, 12), "b": (3, 5), "c": (16, 9), "experts": (4, 6, 8), "norm": (11,)}
    full = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    grads = [{n: torch.randn(s, generator=g) for n, s in shapes.items()} for _ in range(3)]

    def groups(params):
        return [dict(params=[params[n] for n in ("a", "b", "c")], kind="muon", param_names=["a", "b", "c"]),
                dict(params=[params["experts"]], kind="muon", batch_dims=1, param_names=["experts"]),
                dict(params=[params["norm"]], kind="adamw", param_names=["norm"])]
    plain = {n: torch.nn.Parameter(t.clone()) for n, t in full.items()}
    shard = {n: torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for n, t in full.items()}
    opts = dict(lr=0.05, weight_decay=0.1, ns_dtype=torch.float32)
    one, many = MuonAdamW(groups(plain), **opts), MuonAdamW(groups(shard), **opts)
    for step in grads:
        for n in shapes:
            plain[n].grad = step[n].clone()
            shard[n].grad = distribute_tensor(step[n].clone(), mesh, [Shard(0)])
        one.step()
        many.step()
    muon_equal = {n: torch.equal(shard[n].full_tensor(), plain[n].detach()) for n in shapes}
    moved = {n: not torch.equal(plain[n].detach(), full[n]) for n in shapes}
    return {"expert_err": expert_err, "muon_equal": muon_equal, "moved": moved,
            "local_rows": {n: shard[n].to_local().shape[0] for n in shapes}}


def _bad_setups(rank, world, corpus, root):
    """Layouts that cannot work must fail on every rank, before any collective, with a clear message."""
    errors = {}
    for name, changes in {"micro_batch": dict(micro_batch=3),
                          "ep_vs_experts": dict(ep=world, **{"model": _tiny_with_experts(6)}),
                          "dp_replicate": dict(dp_replicate=3)}.items():
        try:
            make_trainer(corpus, pathlib.Path(root) / name, **{**RUN, **changes})
        except ParallelConfigError as exc:
            errors[name] = str(exc)
    return errors


def _tiny_with_experts(n: int):
    from dsv4.config import preset
    return preset("tiny").with_(n_routed_experts=n)


def _cli(rank, world, argv):
    """`python -m dsv4 train ...` as torchrun starts it in each process."""
    from dsv4.cli import main
    return main(argv)


def _killed(rank, world, corpus, root, layout):
    """Train to step 3 with a checkpoint every 2 steps, then stop as a crash would (last checkpoint: 2)."""
    tr = make_trainer(corpus, pathlib.Path(root), ckpt_every=2, **RUN, **layout)
    tr.fit(until=3)
    tr.close()
    return tr.step


def _resumed(rank, world, corpus, root, layout):
    """Resume the killed run under another layout and finish it (final checkpoint and export)."""
    tr = make_trainer(corpus, pathlib.Path(root), resume=True, ckpt_every=2, **RUN, **layout)
    start = tr.step
    tr.fit()
    tr.close()
    return start


# ----------------------------------------------------------------------------- tests
def test_two_processes_equal_one_process(corpus, reference, tmp_path):
    layouts = [dict(),                              # FSDP over 2 (experts sharded with the dense layers)
               dict(ep=2, dp_replicate=2),          # expert parallel, dense layers replicated
               dict(ep=2)]                          # expert parallel and FSDP
    results = spawn("_checks", 2, tmp_path, corpus, str(tmp_path), layouts)
    out = results[0]
    for layout, records, facts in out["layouts"]:
        assert_same_trace(records, reference["records"], f"2 processes {layout}")
    facts = [f for _, _, f in out["layouts"]]
    assert [f["ep_module"] for f in facts] == [False, True, True]
    assert [f["local_experts"] for f in facts] == [4, 4, 4]          # 8 experts: FSDP rows or EP shards
    assert [f["wq_rows"] for f in facts] == [16, 32, 16]             # wq_a [32, 64]: sharded, replicated, sharded
    ops = out["ops"]
    assert max(ops["expert_err"].values()) < 1e-5, ops["expert_err"]
    assert all(ops["muon_equal"].values()) and all(ops["moved"].values()), ops
    assert ops["local_rows"]["b"] == 2 and ops["local_rows"]["experts"] == 2
    # bf16 parameters in forward/backward: the first loss is the fp32 one to bf16 accuracy (a few 1e-3
    # over 4 layers), the stored weights stay fp32
    want = reference["records"][0]
    assert out["bf16"]["loss"] == pytest.approx(want["loss"], rel=2e-2) and out["bf16"]["loss"] != want["loss"]
    assert out["bf16"]["grad_norm"] == pytest.approx(want["grad_norm"], rel=0.1)
    assert out["bf16"]["dtypes"] == ["torch.float32"]
    # rank 1's shard got a NaN: all ranks read the same global norm and skip, then all step again
    assert all(r["nan"] == {"skipped": True, "unchanged": True, "next": None, "moved": True} for r in results), \
        [r["nan"] for r in results]


def test_four_processes_equal_one_process(corpus, reference, tmp_path):
    layouts = [dict(),                                              # FSDP over 4
               dict(dp_replicate=4, ep=4),                          # EP over 4, dense layers replicated
               dict(dp_replicate=2, ep=2, gradient_checkpointing=True)]   # HSDP 2×2; EP 2 × expert FSDP 2
    out = spawn("_checks", 4, tmp_path, corpus, str(tmp_path), layouts)[0]
    for layout, records, facts in out["layouts"]:
        assert_same_trace(records, reference["records"], f"4 processes {layout}")
    facts = [f for _, _, f in out["layouts"]]
    assert [f["ep_module"] for f in facts] == [False, True, True]
    assert [f["local_experts"] for f in facts] == [2, 2, 2]
    assert [f["wq_rows"] for f in facts] == [8, 32, 16]
    assert "Replicate" in facts[2]["placements"] and "Shard" in facts[2]["placements"]
    ops = out["ops"]
    assert max(ops["expert_err"].values()) < 1e-5, ops["expert_err"]
    assert all(ops["muon_equal"].values()), ops
    assert ops["local_rows"]["b"] == 1      # rows 3 over 4 ranks: one rank holds none and still takes part
    errors = spawn("_bad_setups", 4, tmp_path, corpus, str(tmp_path))[0]
    assert "micro_batch=3" in errors["micro_batch"] and "multiple of 4" in errors["micro_batch"]
    assert "n_routed_experts=6" in errors["ep_vs_experts"] and "ep=4" in errors["ep_vs_experts"]
    assert "dp_replicate=3" in errors["dp_replicate"] and "1, 2, 4" in errors["dp_replicate"]


def test_kill_on_four_resume_on_two_and_on_one(corpus, reference, tmp_path):
    from dsv4.checkpoint import load_pretrained
    from dsv4.train import export_checkpoint

    run = tmp_path / "run"
    assert spawn("_killed", 4, tmp_path, corpus, str(run), dict(ep=2))[0] == 3
    ckpt = runlog.latest_checkpoint(run / "checkpoints")
    assert ckpt.name == "step_000002"
    assert len(list((ckpt / "state").glob("*.distcp"))) == 4             # one shard file per process
    solo = tmp_path / "solo"
    shutil.copytree(run, solo)
    # the same checkpoint continued by 2 processes (FSDP, no expert parallelism) ...
    assert spawn("_resumed", 2, tmp_path, corpus, str(run), dict())[0] == 2
    rows = runlog.read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert_same_trace(trace(rows[2:]), reference["records"][2:], "killed on 4, resumed on 2")
    # ... and by one process
    tr = make_trainer(corpus, solo, resume=True, ckpt_every=2, **RUN)
    assert tr.step == 2
    assert_same_trace(train_records(tr), reference["records"][2:], "killed on 4, resumed on 1")
    # a resume that would change the data order is refused
    with pytest.raises(runlog.CheckpointError, match="micro_batch=4"):
        make_trainer(corpus, solo, resume=True, **{**RUN, "micro_batch": 8})
    # the export of the sharded run: the final weights, gathered; equal to exporting its last checkpoint
    exported = load_pretrained(run / "model")
    again = load_pretrained(export_checkpoint(run / "checkpoints" / "step_000005", tmp_path / "again"))
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b, want = exported(ids), again(ids), reference["model"].eval()(ids)
    assert torch.equal(a, b)
    assert (a - want).abs().max() < 1e-4 * want.abs().max()


def test_torchrun_entry_point(corpus, tmp_path):
    """The command torchrun runs in each process: process group from the environment, training, sharded
    checkpoint, gathered export; then `--export` from that checkpoint in one process."""
    from dsv4.checkpoint import load_pretrained
    from dsv4.cli import main

    run = tmp_path / "run"
    argv = ["train", "--recipe", "tiny", "--out", str(run), "--steps", "2", "--no-progress", "model=tiny",
            f"data={corpus['data']}", f"tokenizer={corpus['tok']}", "seq_len=64", "micro_batch=4", "eval_every=2",
            "eval_batches=1", "threads=1", "tensorboard=false", "ep=2"]
    assert spawn("_cli", 2, tmp_path, argv, torchrun_env=True) == [0, 0]
    rows = runlog.read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["val_loss"] > 0
    assert json.loads((run / "run.json").read_text())["parallel"] == {"world": 2, "dp_replicate": 1, "ep": 2}
    assert len(list((run / "checkpoints" / "step_000002" / "state").glob("*.distcp"))) == 2
    trained = load_pretrained(run / "model")
    shutil.rmtree(run / "model")
    assert main(["train", "--recipe", "tiny", "--out", str(run), "--export", "model=tiny"]) == 0
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_pretrained(run / "model")(ids), trained(ids))


def test_layout_errors_in_one_process(corpus, tmp_path):
    with pytest.raises(ParallelConfigError, match="n_routed_experts=6"):
        ParallelDims(4, ep=4).check_model(6)
    with pytest.raises(ParallelConfigError, match="ep=3 must divide the world size 4"):
        ParallelDims(4, ep=3)
    with pytest.raises(ParallelConfigError, match="ep=2 must divide the world size 1"):
        make_trainer(corpus, tmp_path, ep=2)
    assert ParallelDims(8, dp_replicate=2, ep=4).dp_shard == 4 and ParallelDims(8, ep=4).edp == 2


def test_muon_owner_assignment_is_balanced():
    costs = [9.0, 1.0, 1.0, 1.0, 8.0, 2.0, 2.0, 4.0]
    owner = assign_owners(costs, 3)
    load = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(3)]
    assert sorted(load) == [9.0, 9.0, 10.0]                      # LPT: 9 | 8+1 | 4+2+2+1+1
    assert assign_owners(costs, 3) == owner                      # deterministic: every rank computes the same
