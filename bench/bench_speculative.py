"""Plain against MTP-speculative greedy decoding through the Engine, on random-weight presets (CPU or GPU).

    python bench/bench_speculative.py --preset mini --batch 1,8 --prompt 64 --new 120

Drafts come from the model's own (random) MTP block, which almost never agrees with the main model,
and from "forced" drafts: the true greedy token for two positions in three (what a trained MTP block
might reach), which shows what a step costs when drafts are accepted. Every speculative run checks
that its tokens equal plain greedy decoding. Each configuration is timed twice, the faster kept.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import random_model  # noqa: E402
from dsv4.engine import Engine  # noqa: E402


def force_drafts(engine: Engine, refs: dict, every: int = 3):
    """Make the MTP block's draft the reference greedy token except at every `every`-th position."""
    real = engine.model.mtp_logits

    def mtp_logits(h, next_ids, **kw):
        out = real(h, next_ids, **kw)
        for j, row in enumerate(kw["rows"].tolist()):
            seq = engine.running[row]
            k = len(seq.ids) - seq.n_prompt
            ref = refs[tuple(seq.ids[:seq.n_prompt])]
            if 0 < k < len(ref) and (k + row) % every:
                out[j, -1] = -1e4
                out[j, -1, ref[k]] = 1e4
        return out

    engine.model.mtp_logits = mtp_logits
    return lambda: delattr(engine.model, "mtp_logits")


def run(model, prompts, new: int, speculative: bool, refs=None):
    best = None
    for _ in range(2):
        eng = Engine(model, max_batch=len(prompts), max_len=len(prompts[0]) + new + 2, speculative=speculative)
        undo = force_drafts(eng, refs) if refs else (lambda: None)
        t = time.perf_counter()
        res = eng.generate(prompts, max_tokens=new, ignore_eos=True)
        dt = time.perf_counter() - t
        undo()
        best = dt if best is None else min(best, dt)
    return res, sum(len(r.token_ids) for r in res) / best, eng


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=120)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = random_model(args.preset, seed=1)
    V = model.config.vocab_size
    print(f"# {args.preset}, torch {torch.__version__}, {args.threads} threads, prompt {args.prompt}, {args.new} new tokens")
    for B in [int(b) for b in args.batch.split(",")]:
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(2, V, (args.prompt,), generator=g).tolist() for _ in range(B)]
        plain, tps, _ = run(model, prompts, args.new, False)
        refs = {tuple(p): r.token_ids for p, r in zip(prompts, plain)}
        print(f"batch {B}: plain {tps:.1f} tok/s")
        for label, r in (("own MTP drafts", None), ("forced drafts", refs)):
            res, t, eng = run(model, prompts, args.new, True, r)
            assert [x.token_ids for x in res] == [x.token_ids for x in plain], "speculative != plain greedy"
            print(f"  speculative, {label:15s}: {t:.1f} tok/s ({t / tps:.2f}x), acceptance "
                  f"{eng.acceptance_rate:.2f}, engine steps {eng.stats['steps']}, re-feeds {eng.stats['refeeds']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
