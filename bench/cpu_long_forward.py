"""Peak memory and time of one full-sequence forward of a preset on the CPU.

    python bench/cpu_long_forward.py --tokens 65536 [--preset tiny]

Prints the tokens, seconds and the process's peak RSS (GiB). docs/architecture.md quotes the 64K
figure of the `tiny` preset (1.9 GiB on a 2-core machine, about 8.5 minutes).
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from dsv4.config import preset
from dsv4.model import Transformer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--preset", default="tiny")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = Transformer(preset(args.preset)).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens))
    t = time.time()
    with torch.no_grad():
        out = model(ids, last_only=True)
    print(f"{args.tokens} tokens: {time.time() - t:.1f} s, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB, finite {bool(torch.isfinite(out).all())}")


if __name__ == "__main__":
    main()
