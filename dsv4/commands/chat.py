"""`dsv4 chat --model DIR [--thinking]`: interactive chat in the DeepSeek-V4 chat format.

Commands: /think on|off (thinking mode), /reset (forget the conversation), /exit. Replies stream as
they are generated; in thinking mode the reasoning is shown dim (or after "thinking:" when the output
is not a terminal) and kept out of the history, as the chat format drops it for earlier turns.
"""
from __future__ import annotations

import argparse
import sys

from dsv4.commands.generate import add_model_arguments, add_sampling_arguments, engine_options, load

HELP = "commands: /think on|off, /reset, /exit"
DIM, RESET = "\x1b[2m", "\x1b[0m"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_sampling_arguments(p, max_new=1024)
    p.add_argument("--thinking", action="store_true", help="start in thinking mode")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-len", type=int, default=8192, metavar="N", help="context length (conversation + reply)")
    p.add_argument("--prefix-cache-mb", type=int, default=1024, metavar="MB",
                   help="memory for reusing the conversation's cached prefix between turns (0: off; default 1024)")


class _Printer:
    """Writes reasoning and answer pieces, marking where the reasoning starts and ends."""

    def __init__(self, out, tty: bool):
        self.out, self.tty, self.state = out, tty, None

    def write(self, reasoning: str, content: str) -> None:
        if reasoning:
            if self.state is None:
                self.out.write(DIM if self.tty else "thinking: ")
                self.state = "reasoning"
            self.out.write(reasoning)
        if content:
            if self.state == "reasoning":
                self.out.write(RESET + "\n" if self.tty else "\nanswer: ")
            self.state = "content"
            self.out.write(content)
        self.out.flush()

    def end(self) -> None:
        if self.state == "reasoning" and self.tty:
            self.out.write(RESET)
        self.out.write("\n")
        self.out.flush()


def reply(engine, messages: list[dict], thinking: bool, args, seed: int | None = None,
          out=sys.stdout) -> dict | None:
    """Generate and stream one assistant turn; the message to append to the history (None if refused)."""
    from dsv4.engine import Request, RequestError, ThinkSplit
    from dsv4.tokenizer import encode_chat

    ids = engine.encode(encode_chat(messages, thinking=thinking))
    room = engine.max_len - len(ids)
    if room < 1:
        print(f"the conversation ({len(ids)} tokens) fills the context of {engine.max_len}; /reset to start over",
              file=sys.stderr)
        return None
    req = Request(prompt=ids, max_tokens=min(args.max_new_tokens, room), temperature=args.temperature,
                  top_p=args.top_p, top_k=args.top_k, seed=seed, repetition_penalty=args.repetition_penalty,
                  skip_special_tokens=not args.keep_special_tokens)
    split, printer = ThinkSplit(thinking), _Printer(out, out.isatty())
    parts = {"reasoning": [], "content": []}

    def show(o) -> None:
        r, c = split.push(o.text)
        if o.finish_reason is not None:
            r += split.flush()[0]
        parts["reasoning"].append(r)
        parts["content"].append(c)
        printer.write(r, c)

    try:
        engine.add(req, show)
    except RequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    try:
        while engine.has_work():
            engine.step()
    except KeyboardInterrupt:  # stop this reply, keep the session
        engine.cancel(req.id)
        while engine.has_work():
            engine.step()
    printer.end()
    message = {"role": "assistant", "content": "".join(parts["content"])}
    if thinking:
        message["reasoning_content"] = "".join(parts["reasoning"])
    return message


def run(args) -> int:
    from dsv4.engine import Engine

    model, tokenizer = load(args)
    engine = Engine(model, tokenizer, max_batch=1, max_len=args.max_len, prefix_cache_bytes=args.prefix_cache_mb << 20,
                    **engine_options(args))
    thinking = args.thinking
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    print(f"{HELP}; thinking mode is {'on' if thinking else 'off'}", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd = text.split()
            if cmd[0] == "/exit":
                return 0
            if cmd[0] == "/reset":
                messages = list(system)
                print("(conversation cleared)", file=sys.stderr)
            elif cmd[0] == "/think" and len(cmd) == 2 and cmd[1] in ("on", "off"):
                thinking = cmd[1] == "on"
                print(f"(thinking mode {cmd[1]})", file=sys.stderr)
            else:
                print(HELP, file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        turn = sum(m["role"] == "user" for m in messages)  # a new seed per turn, reproducible per session
        answer = reply(engine, messages, thinking, args, None if args.seed is None else args.seed + turn)
        if answer is None:
            messages.pop()
        else:
            messages.append(answer)
