"""`dsv4 generate --model DIR|PRESET --prompt TEXT`: stream a continuation to stdout.

Greedy unless --temperature > 0. Timing (and, with --speculative, the MTP draft acceptance rate) goes
to stderr so that stdout holds only the generated text. Control tokens (placeholders, turn markers)
are left out of the text unless --keep-special-tokens.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments shared by generate, chat and serve."""
    p.add_argument("--model", required=True, metavar="DIR|PRESET",
                   help="checkpoint folder, or a preset name (tiny, mini, small, bench, ...) for random weights")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="weights and cache dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--quantized", action=argparse.BooleanOptionalAction, default=None,
                   help="keep FP8 weights and FP4 experts in their storage format in memory (Triton kernels on "
                        "CUDA); default: on for a quantised checkpoint on CUDA, --no-quantized dequantises on load")
    p.add_argument("--speculative", action="store_true",
                   help="MTP speculative decoding: the MTP block drafts a token that the model verifies")
    p.add_argument("--prefill-chunk", type=int, default=2048, metavar="N", help="prompt tokens per prefill step")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="launch every decode kernel from Python instead of replaying CUDA graphs")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (about a minute per batch size on first use; "
                        "~2.5x faster decode on an H200 at batch 1)")
    p.add_argument("--kv-cache", default="model", choices=["model", "fp8"],
                   help="storage of the compressed KV entries: the model dtype (default), or fp8 (the nope dims "
                        "e4m3 with a scale per 64, the rope dims in the model dtype; what the official inference "
                        "rounds them to; 592 instead of 1,024 bytes per entry in bf16)")


def engine_options(args) -> dict:
    """Engine keyword arguments from the shared model arguments."""
    if args.compile:
        print("compile: the decode step is compiled on its first use for each batch size (about a minute)",
              file=sys.stderr)
    return {"prefill_chunk": args.prefill_chunk, "speculative": args.speculative,
            "cuda_graphs": False if args.no_cuda_graphs else None, "compile": args.compile,
            "kv_fp8": args.kv_cache == "fp8"}


def add_sampling_arguments(p: argparse.ArgumentParser, max_new: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="divide the logits of tokens already in the text by R (> 1 discourages repeats; default 1)")
    p.add_argument("--keep-special-tokens", action="store_true",
                   help="show control tokens (placeholders, <｜User｜>, ...) in the output; hidden by default")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text to continue (BOS is prepended)")
    prompt.add_argument("--prompt-ids", metavar="ID,ID,...", help="token ids to continue, used as given")
    add_sampling_arguments(p, max_new=128)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going after the end-of-sentence token")
    p.add_argument("--print-ids", action="store_true", help="print the generated token ids instead of text")


def load(args, expert_parallel: bool = False):
    """(model, tokenizer) for --model, telling the user on stderr what was loaded. Started by torchrun
    with several processes (and `expert_parallel`), each rank loads its share of the routed experts."""
    from dsv4.engine import load_model, resolve_device
    from dsv4.parallel.inference import torchrun_env

    if torchrun_env() is not None:
        if not expert_parallel:
            from dsv4.cli import CLIError

            raise CLIError("under torchrun only `dsv4 generate` runs expert-parallel; start chat/serve as one process")
        from dsv4.parallel.inference import load_model_parallel

        model, tokenizer, notes = load_model_parallel(args.model, args.device, args.dtype, args.quantized)
        if torchrun_env()["rank"]:
            notes = []   # rank 0 speaks for all
    else:
        device, dtype = resolve_device(args.device, args.dtype)
        model, tokenizer, notes = load_model(args.model, device, dtype, quantized=args.quantized)
    for line in notes:
        print(line, file=sys.stderr)
    return model, tokenizer


def run(args) -> int:
    from dsv4.cli import CLIError
    from dsv4.engine import Engine, Request
    from dsv4.parallel.inference import shared_seed, torchrun_env

    if args.prompt_ids is not None:
        try:
            prompt = [int(x) for x in args.prompt_ids.split(",")]
        except ValueError:
            raise CLIError(f"--prompt-ids must be token ids separated by commas (0,17,42); got {args.prompt_ids!r}") \
                from None
    else:
        prompt = args.prompt
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be at least 1; got {args.max_new_tokens}")
    model, tokenizer = load(args, expert_parallel=True)
    if torchrun_env() is not None:   # expert parallel: every rank generates the same tokens, rank 0 prints
        if args.seed is None:
            args.seed = shared_seed()   # sampling must draw the same tokens on every rank
        if torchrun_env()["rank"]:
            sys.stdout = sys.stderr = open(os.devnull, "w")
    if prompt == "":
        print("the prompt is empty: generating from the begin-of-sentence token alone", file=sys.stderr)
    n_prompt = len(prompt) if args.prompt_ids is not None else len(tokenizer.encode(prompt, add_bos=True))
    engine = Engine(model, tokenizer, max_batch=1, max_len=n_prompt + args.max_new_tokens, **engine_options(args))
    req = Request(prompt=prompt, max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos,
                  repetition_penalty=args.repetition_penalty, skip_special_tokens=not args.keep_special_tokens)

    def show(out) -> None:
        if not args.print_ids:
            sys.stdout.write(out.text)
            sys.stdout.flush()

    t0 = time.perf_counter()
    try:
        engine.add(req, show)
    except ValueError as exc:   # RequestError: a bad value (seed, top_p, ...)
        raise CLIError(str(exc)) from None
    result = None
    while result is None:
        for out in engine.step():
            result = out.result or result
    seconds = time.perf_counter() - t0
    if args.print_ids:
        print(" ".join(map(str, result.token_ids)))
    else:
        print()
    n = len(result.token_ids)
    line = f"{n} tokens in {seconds:.2f} s ({n / max(seconds, 1e-9):.1f} tok/s incl. prefill of {n_prompt}), " \
           f"finish: {result.finish_reason}"
    if args.speculative and result.drafted:
        line += f", MTP drafts accepted {result.accepted}/{result.drafted} ({result.accepted / result.drafted:.0%})"
    print(line, file=sys.stderr)
    return 0 if result.finish_reason != "error" else 1
