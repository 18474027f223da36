"""Where the time goes: torch.profiler over a cached prefill (batch 1) and a training step (forward +
next-token CE + backward, bf16 weights) of the `bench` preset on CUDA; prints the top kernels by CUDA
time and writes the tables to --out-dir.

  python bench/profile_steps.py --prefill 16384 --train 4096 --out-dir prof
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsv4 import ops  # noqa: E402
from dsv4.cache import DecodeCache  # noqa: E402
from dsv4.config import preset  # noqa: E402
from dsv4.model import Transformer  # noqa: E402


def table(prof, n=30) -> str:
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=n, max_name_column_width=60)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--prefill", type=int, default=16384)
    ap.add_argument("--train", type=int, default=4096)
    ap.add_argument("--out-dir", default="prof")
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    cfg = preset(args.preset)
    torch.manual_seed(0)
    model = Transformer(cfg).to(dev).to_dtype(torch.bfloat16).eval()
    print(ops.describe_backends())
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    if args.prefill:
        ids = torch.randint(0, cfg.vocab_size, (1, args.prefill), device=dev)
        with torch.no_grad():
            for _ in range(2):
                cache = DecodeCache(cfg, 1, args.prefill + 64, device=dev, dtype=torch.bfloat16)
                model(ids, cache=cache, last_only=True)
            torch.cuda.synchronize()
            cache = DecodeCache(cfg, 1, args.prefill + 64, device=dev, dtype=torch.bfloat16)
            with torch.profiler.profile(activities=acts) as prof:
                model(ids, cache=cache, last_only=True)
                torch.cuda.synchronize()
        t = table(prof)
        (out / "prefill.txt").write_text(t)
        print(f"== prefill {args.prefill}\n{t}")
    if args.train:
        model.train()
        ids = torch.randint(0, cfg.vocab_size, (1, args.train + 1), device=dev)

        def step():
            logits = model(ids[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            model.zero_grad(set_to_none=True)

        for _ in range(2):
            step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=acts) as prof:
            step()
            torch.cuda.synchronize()
        t = table(prof)
        (out / "train.txt").write_text(t)
        print(f"== train step {args.train}\n{t}")


if __name__ == "__main__":
    main()
