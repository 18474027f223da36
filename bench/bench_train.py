"""Training-step throughput, MFU and peak memory: dsv4 against transformers' DeepseekV4ForCausalLM.

    python bench/bench_train.py                      # CUDA, bf16, the `bench` preset of TARGETS.md, seq 4096
    python bench/bench_train.py --peer               # + transformers 5.17 on the same config
    python bench/bench_train.py --smoke              # CPU smoke check: `tiny` preset, seq 256, fp32
    python bench/bench_train.py --out results.json   # also write the rows as JSON

Rows (each: tokens/s, step time, MFU, peak memory):
  dsv4 bf16          bf16 weights (fp32 mHC/sink/ape/router bias), forward + next-token CE + backward
  dsv4 bf16 ckpt     the same with activation checkpointing (`--ckpt`)
  dsv4 bf16 graph    the same step captured in a CUDA graph and replayed (`--graph`): no Python/launch cost
  dsv4 recipe        what `dsv4 train` runs per step: fp32 master weights under bf16 autocast, next-token +
                     MTP + balance losses, backward, clipping, Muon+AdamW step, router biases (`--recipe`)
  dsv4 recipe graph  the same with each micro-batch's forward + backward and the optimizer step replayed
                     from CUDA graphs, as `dsv4 train` does on one GPU (`cuda_graphs=auto`; with `--recipe`)
  transformers bf16  DeepseekV4ForCausalLM(config).to(bf16), forward with labels + backward (`--peer`)
The first and last do the same work and compare directly (transformers has no MTP block in training).

FLOPs per token (multiply-add = 2), training = forward + backward (backward = 2× forward):
  F = 6·N_active + 3·Σ_layers A_layer + Σ_CSA I_layer   [+ the MTP block's 6·N + 3·A with --recipe]
  N_active   parameters a token multiplies (ModelConfig.param_counts()["active"]: attention, router,
             top-K + shared experts, mHC mixing matrices, LM head; not the embedding lookup)
  A_layer    attention score + value FLOPs of a query averaged over positions t = 0..S-1 of the row:
             4·H·Dh·n_keys(t) (QKᵀ and PV over one shared K=V head of width Dh), with
             n_keys = min(W, t+1) + {0 (SWA); min(topk, ⌊(t+1)/4⌋) (CSA); ⌊(t+1)/m⌋ (HCA, m = 128)}
  I_layer    lightning-indexer scores of a query: 2·Hi·Di·⌊(t+1)/4⌋, forward only (top-k selection is not
             differentiated; the index loss is off in this benchmark)
Compressor pooling, norms, Sinkhorn, softmax and the masked (unselected) keys the reference computes
are not counted: MFU is useful work over peak. Peak: 790 TFLOP/s, the bf16 dense matmul measured on
this H200 (TARGETS.md); `mfu_datasheet` uses 989.5 TFLOP/s.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsv4.config import ModelConfig, preset  # noqa: E402
from dsv4.flops import train_flops_per_token  # noqa: E402
from dsv4.model import Transformer  # noqa: E402

PEAK_MEASURED = 790e12
PEAK_DATASHEET = 989.5e12


# ----------------------------------------------------------------------------- steps
def dsv4_step_fn(cfg: ModelConfig, dev: torch.device, B: int, S: int, dtype: torch.dtype, ckpt: bool):
    torch.manual_seed(0)
    model = Transformer(cfg)
    model = model.to_dtype(dtype) if dtype != torch.float32 else model
    model = model.to(dev).train()
    model.gradient_checkpointing = ckpt
    ids = torch.randint(0, cfg.vocab_size, (B, S + 1), device=dev)

    def step():
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        for p in model.parameters():
            p.grad = None
        return float(loss.detach())
    return step


def report_host_syncs(fn, model) -> None:
    """Run `fn` once with CUDA's sync debugging on and print where the host waits for the GPU (each place
    once, a few frames of its stack): what a CUDA-graph capture of the step would trip over. The token-id
    check at the model's entry is expected (it is skipped inside a capture)."""
    import traceback

    from step_profile import capture
    seen = set()
    try:
        for message, stack in capture(fn):
            text = "".join(traceback.format_list(stack))
            if "check_ids" not in text and text not in seen:
                seen.add(text)
                print(f"# host sync: {message}\n{text}", file=sys.stderr)
    finally:
        for p in model.parameters():
            p.grad = None
    print(f"# host syncs in the step besides the id check: {len(seen)}", file=sys.stderr)


def dsv4_graph_step_fn(cfg: ModelConfig, dev: torch.device, B: int, S: int, dtype: torch.dtype):
    """The `dsv4 bf16` step (forward, CE, backward) captured once in a CUDA graph and replayed: what the
    step costs on the GPU alone, without Python and launch overhead (static shapes, no host syncs)."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    model = (model.to_dtype(dtype) if dtype != torch.float32 else model).to(dev).train()
    ids = torch.randint(0, cfg.vocab_size, (B, S + 1), device=dev)

    def fwd_bwd():
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        return loss

    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):            # warm-up (kernel compilation, allocator) off the capture stream
        for _ in range(2):
            fwd_bwd()
            for p in model.parameters():
                p.grad = None
    torch.cuda.current_stream(dev).wait_stream(side)
    report_host_syncs(fwd_bwd, model)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):            # gradients are None here: each replay writes them afresh
        loss = fwd_bwd()

    def step():
        graph.replay()
        return float(loss.detach())
    return step


def recipe_step_fn(cfg: ModelConfig, dev: torch.device, B: int, S: int, graphs: bool = False):
    """One optimizer step as `dsv4.train.Trainer.train_step` runs it, on random tokens: fp32 master weights
    under bf16 autocast, next-token + MTP + balance losses and backward (with `graphs` replayed from a
    CUDA graph by `dsv4.train_graphs.MicroStepGraphs`, as the trainer does on one GPU), the global
    gradient norm and clipping, Muon+AdamW, the router-bias update from the step's expert loads."""
    from dsv4.parallel import reduce
    from dsv4.train import (TrainConfig, batch_losses, build_model, build_optimizer, expert_counts, moe_layers,
                            set_phase, update_router_bias)
    from dsv4.train_graphs import MicroStepGraphs, OptimizerGraph

    tcfg = TrainConfig(model=cfg, seq_len=S, micro_batch=B, device=str(dev), steps=10, warmup_steps=1)
    model = build_model(tcfg, dev)
    opt = build_optimizer(model, tcfg)
    set_phase(model, "sparse")
    for layer in model.layers:       # the plain sparse step: no index loss, as in the other rows
        layer.attn.index_loss = False
    ids = torch.randint(0, cfg.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "doc_ids": torch.zeros(B, S, dtype=torch.long),
             "positions": torch.arange(S).expand(B, S).contiguous()}
    n_lm, n_mtp = B * S, B * (S - 1)
    moes = moe_layers(model)
    counts = {n: torch.zeros(m.gate.n_experts, dtype=torch.long, device=dev) for n, m in moes}

    def amp(cache: bool = True):
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda", cache_enabled=cache)

    def losses(b, phase, mtp_w, n_lm_, n_mtp_, n_micro, counts_, use_mtp):
        return batch_losses(model, b, tcfg, phase, mtp_w, n_lm_, n_mtp_, n_micro, counts_, use_mtp=use_mtp)

    def eager():
        b = {k: v.to(dev) for k, v in batch.items()}
        with amp():
            objective, terms = batch_losses(model, b, tcfg, "sparse", 0.3, n_lm, n_mtp, 1, counts)
        objective.backward()
        return {"objective": float(objective.detach())}

    runner = opt_runner = None
    if graphs:
        runner = MicroStepGraphs(model, losses, lambda: amp(cache=False), {n: m.gate.n_experts for n, m in moes},
                                 dev)
        opt_runner = OptimizerGraph(opt, dev)

    def step():
        for c in counts.values():
            c.zero_()
        parts = runner.run(batch, "sparse", 0.3, n_lm, n_mtp, 1, True, counts, eager) if runner else eager()
        params = [p for p in model.parameters() if p.grad is not None]
        norm = reduce.grad_norm(params)
        reduce.clip_grads_(params, tcfg.grad_clip, norm)
        if not math.isfinite(float(norm)):
            raise RuntimeError("non-finite gradient norm")
        (opt_runner or opt).step()
        for name, moe in moes:
            if not moe.gate.hashed:
                update_router_bias(moe.gate.bias, counts[name], tcfg.bias_update_speed)
        opt.zero_grad(set_to_none=True)
        if runner is not None and (runner.failures or opt_runner.failed):
            raise RuntimeError(f"not recorded: {next(iter(runner.failures.values()), opt_runner.failed)}")
        return parts["objective"]
    return step


def peer_step_fn(cfg: ModelConfig, dev: torch.device, B: int, S: int, dtype: torch.dtype):
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    torch.manual_seed(0)
    hf = DeepseekV4ForCausalLM(DeepseekV4Config(**cfg.to_hf_config())).to(dtype).to(dev).train()
    ids = torch.randint(0, cfg.vocab_size, (B, S), device=dev)

    def step():
        out = hf(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        for p in hf.parameters():
            p.grad = None
        return float(out.loss.detach())
    return step


def measure(name: str, make, dev: torch.device, tokens: int, flops: float, warmup: int, iters: int) -> dict:
    row = {"name": name}
    try:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        step = make()
        for _ in range(warmup):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(iters):
            loss = step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        sec = (time.perf_counter() - t0) / iters
        row.update(ok=True, loss=loss, step_s=sec, tokens_per_s=tokens / sec, flops_per_token=flops,
                   tflops=tokens * flops / sec / 1e12)
        if dev.type == "cuda":
            row.update(mfu=row["tflops"] * 1e12 / PEAK_MEASURED, mfu_datasheet=row["tflops"] * 1e12 / PEAK_DATASHEET,
                       peak_gib=torch.cuda.max_memory_allocated(dev) / 2**30)
    except torch.OutOfMemoryError:
        row.update(ok=False, error="out of memory")
    except Exception as exc:  # a failing row is reported, the others still run
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
    finally:
        step = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default=None, help="model preset (default: bench; tiny with --smoke)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (default 4096; 256 with --smoke)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default=None, help="default cuda (cpu with --smoke)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--peer", action="store_true", help="also time transformers' DeepseekV4ForCausalLM")
    ap.add_argument("--ckpt", action="store_true", help="also time dsv4 with activation checkpointing")
    ap.add_argument("--recipe", action="store_true", help="also time the full training-loop step")
    ap.add_argument("--graph", action="store_true", help="also time the dsv4 step replayed from a CUDA graph")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny preset, fp32: checks that everything runs")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    smoke = args.smoke
    cfg = preset(args.preset or ("tiny" if smoke else "bench"))
    S = args.seq or (256 if smoke else 4096)
    B = args.batch
    dev = torch.device(args.device or ("cpu" if smoke else "cuda"))
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    tokens = B * S
    fl, fl_mtp = train_flops_per_token(cfg, S), train_flops_per_token(cfg, S, mtp=True)
    tag = "bf16" if dtype == torch.bfloat16 else "fp32"
    jobs = [(f"dsv4 {tag}", lambda: dsv4_step_fn(cfg, dev, B, S, dtype, False), fl["total"])]
    if args.ckpt:
        jobs.append((f"dsv4 {tag} ckpt", lambda: dsv4_step_fn(cfg, dev, B, S, dtype, True), fl["total"]))
    if args.recipe:
        jobs.append(("dsv4 recipe", lambda: recipe_step_fn(cfg, dev, B, S), fl_mtp["total"]))
        if dev.type == "cuda":
            jobs.append(("dsv4 recipe graph", lambda: recipe_step_fn(cfg, dev, B, S, graphs=True), fl_mtp["total"]))
    if args.peer:
        jobs.append((f"transformers {tag}", lambda: peer_step_fn(cfg, dev, B, S, dtype), fl["total"]))
    if args.graph and dev.type == "cuda":   # last: a capture that fails leaves the CUDA RNG unusable
        jobs.append((f"dsv4 {tag} graph", lambda: dsv4_graph_step_fn(cfg, dev, B, S, dtype), fl["total"]))
    rows = [measure(name, make, dev, tokens, flops, args.warmup, args.iters) for name, make, flops in jobs]

    from dsv4.runlog import describe_environment
    env = describe_environment(dev)
    counts = cfg.param_counts()
    print(f"# {time.strftime('%Y-%m-%d')}  {env['device']['name']}  torch {env['versions']['torch']}  "
          f"triton {env['versions']['triton']}  ops {env['ops_backends']}  commit {(env['git']['commit'] or '?')[:10]}")
    print(f"# model {args.preset or ('tiny' if smoke else 'bench')}: {counts['total'] / 1e6:.0f}M params "
          f"({counts['active'] / 1e6:.0f}M active), batch {B} × seq {S}; FLOPs/token {fl['total'] / 1e9:.3f} G "
          f"(matmul {fl['matmul'] / 1e9:.3f}, attention {fl['attention'] / 1e9:.3f}, indexer {fl['indexer'] / 1e9:.3f})")
    print(f"# command: python {' '.join(sys.argv)}")
    print(f"{'row':<22}{'tokens/s':>12}{'step ms':>10}{'TFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}  loss")
    for r in rows:
        if not r["ok"]:
            print(f"{r['name']:<22}  {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a"
        mem = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "n/a"
        print(f"{r['name']:<22}{r['tokens_per_s']:>12.0f}{1e3 * r['step_s']:>10.1f}{r['tflops']:>10.2f}{mfu:>8}"
              f"{mem:>10}  {r['loss']:.3f}")
    ok = {r["name"]: r for r in rows if r["ok"]}
    peer = next((r for n, r in ok.items() if n.startswith("transformers")), None)
    if peer is not None and f"dsv4 {tag}" in ok:
        print(f"# dsv4 / transformers tokens/s: {ok[f'dsv4 {tag}']['tokens_per_s'] / peer['tokens_per_s']:.2f}×")
    if args.out:
        result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": sys.argv, "environment": env,
                  "model": cfg.to_hf_config(), "batch": B, "seq": S, "flops_per_token": fl,
                  "flops_per_token_with_mtp": fl_mtp, "peak_flops": PEAK_MEASURED, "rows": rows}
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"# wrote {args.out}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
