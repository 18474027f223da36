"""`dsv4 demo --out DIR` (what `make demo` runs): train the tiny recipe on the bundled Shakespeare works
on the CPU, print text sampled from the trained model, and write the run's plots.

Re-running continues from the run's newest checkpoint (a finished run only re-samples and re-plots).
The CPU thread count is chosen for the machine as it is (`dsv4.cli.cpu_threads`: fewer on a busy
machine) and printed; `threads=N` or OMP_NUM_THREADS chooses it.
"""
from __future__ import annotations

import argparse
import time

PROMPTS = ("ROMEO.\n", "To be, or not to be", "KING HENRY.\nNow, lords,", "O, what a noble")
TINY_STEPS = 250   # the tiny recipe's steps, for --help without importing torch (a test keeps them equal)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps (default: the tiny recipe's {TINY_STEPS})")
    p.add_argument("--max-tokens", type=int, default=60, help="tokens sampled per prompt (default 60)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="TrainConfig / model.* field overrides")


def sample_texts(model, tokenizer, prompts, max_tokens: int, temperature: float, seed: int = 0) -> list[str]:
    """Continuations of `prompts` with the generation engine (KV cache)."""
    from dsv4.engine import Engine, Request

    model.eval()
    longest = max(len(tokenizer.encode(p, add_bos=True)) for p in prompts)
    engine = Engine(model, tokenizer, max_batch=len(prompts), max_len=longest + max_tokens)
    requests = [Request(prompt=p, max_tokens=max_tokens, temperature=temperature, top_k=40 if temperature > 0 else 0,
                        seed=seed + i) for i, p in enumerate(prompts)]     # one random stream per prompt
    return [r.text for r in engine.generate(requests)]


def run(args: argparse.Namespace) -> int:
    from dsv4.plot import plot_run
    from dsv4.recipes import tiny
    from dsv4.runlog import read_metrics
    from dsv4.train import train

    from dsv4.cli import cpu_threads

    t0 = time.perf_counter()
    overrides = list(args.overrides) + ([f"steps={args.steps}"] if args.steps is not None else [])
    given = [o for o in overrides if o.startswith("threads=")]
    if given:
        print(f"using {given[-1].split('=', 1)[1]} CPU threads (threads=)")
    else:
        n, why = cpu_threads()
        overrides.append(f"threads={n}")
        print(f"using {why}")
    cfg = tiny().with_overrides(overrides)
    trainer = train(cfg, args.out, resume=True, progress=not args.no_progress)
    t_train = time.perf_counter() - t0
    ev = trainer.last_eval or trainer.evaluate()
    last = [r["loss"] for r in read_metrics(args.out)[-10:]]
    print(f"\ntrained {trainer.step} steps in {t_train / 60:.1f} min (setup included); train loss "
          f"{sum(last) / len(last):.3f} (mean of the last {len(last)} steps), validation loss {ev['val_loss']:.3f} "
          f"(perplexity {ev['val_ppl']:.1f})")
    for temperature in (0.0, 0.8):
        kind = "greedy" if temperature == 0 else f"temperature {temperature}, top-k 40"
        print(f"\n=== samples ({kind}) ===")
        for prompt, text in zip(PROMPTS, sample_texts(trainer.model, trainer.tokenizer, PROMPTS,
                                                       args.max_tokens, temperature)):
            print(f"--- {prompt!r}\n{prompt}{text}\n")
    paths = plot_run(args.out)
    print("plots:\n" + "\n".join(f"  {p}" for p in paths))
    print(f"exported model: {trainer.run_dir / 'model'}  (dsv4 generate / load_pretrained / transformers)")
    print(f"total time {(time.perf_counter() - t0) / 60:.1f} min")
    return 0
