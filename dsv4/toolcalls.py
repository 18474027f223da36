"""Reading a DeepSeek-V4 assistant reply as it streams: reasoning, content and DSML tool calls.

The reply format (`dsv4.tokenizer`, the release's `encoding/` folder):

    {reasoning}</think>{content}\\n\\n<｜DSML｜tool_calls>
    <｜DSML｜invoke name="NAME">
    <｜DSML｜parameter name="KEY" string="true|false">VALUE</｜DSML｜parameter>
    ...
    </｜DSML｜invoke>
    </｜DSML｜tool_calls>

(`{reasoning}</think>` in thinking mode only). `ReplyParser.push(text)` takes the reply in pieces of
any size and returns a `Delta`: new reasoning, new content, and tool-call pieces in OpenAI's streaming
form (a call's name and the start of its JSON `arguments`, then more of the arguments). The rules:

* Tool markup never reaches `content` or `reasoning`. "｜DSML｜" is a special token that plain text never
  holds, so markup starts at its first occurrence (with the "<" or "</" before it, and up to two
  newlines before those, which the format puts there). Text that could still turn out to be the start
  of markup ("\\n\\n<" at the end of a piece) is held back until the next piece decides it.
* Arguments are built as the official parser builds them: `{"KEY": VALUE, ...}` with string="true"
  values JSON-quoted (streamed as they arrive, escaped) and the others inserted as they are (held until
  the parameter closes; a value that is not valid JSON is quoted instead, so arguments always parse).
* Lenient where the model slips: markup inside the reasoning ends the reasoning; an invoke without the
  tool_calls wrapper is read as a call; whitespace between elements may vary. Markup that cannot be
  read is dropped up to the end of its block (kept in `dropped`, never shown); a call cut off by the
  end of the text (max_tokens) stays `complete=False`.

The concatenated deltas of any split of a text equal the one-piece parse (`parse_reply`): decisions
never depend on where a piece ends.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from dsv4.tokenizer import DSML, THINK_END

BLOCK_OPEN, BLOCK_CLOSE = f"<{DSML}tool_calls>", f"</{DSML}tool_calls>"
INVOKE_OPEN, INVOKE_CLOSE = f'<{DSML}invoke name="', f"</{DSML}invoke>"
PARAM_OPEN, PARAM_CLOSE = f'<{DSML}parameter name="', f"</{DSML}parameter>"
TOOL_CALLS_PREFIX = "\n\n" + BLOCK_OPEN + "\n" + INVOKE_OPEN   # what a reply with a tool call starts with
MAX_NAME = 256
_PARAM_HEAD = re.compile(r'([^"<>\n]{1,256})" string="(true|false)">')
# where markup may begin: DSML, with "<" or "</" and up to two newlines before it
_STARTS = [nl + lt + DSML for nl in ("", "\n", "\n\n") for lt in ("", "<", "</")]


@dataclass
class CallDelta:
    index: int
    name: str | None = None      # set in the first delta of a call
    arguments: str = ""


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[CallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)

    def add_call(self, index: int, name: str | None = None, arguments: str = "") -> None:
        if self.tool_calls and self.tool_calls[-1].index == index and name is None:
            self.tool_calls[-1].arguments += arguments
        else:
            self.tool_calls.append(CallDelta(index, name, arguments))


@dataclass
class ToolCall:
    name: str
    arguments: str = ""
    complete: bool = False       # the invoke closed (its arguments are a whole JSON object)


@dataclass
class Reply:
    reasoning: str
    content: str
    tool_calls: list[ToolCall]
    dropped: list[str]           # markup that could not be read


def _held(text: str, patterns) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `patterns`."""
    best = 0
    for p in patterns:
        for k in range(min(len(p) - 1, len(text)), best, -1):
            if text.endswith(p[:k]):
                best = k
                break
    return best


class ReplyParser:
    """Incremental parser of one assistant reply; `push` pieces, then `finish`."""

    def __init__(self, thinking: bool = False):
        self.mode = "reasoning" if thinking else "content"
        self.buf = ""
        self.sub = ""                # position inside markup
        self.in_block = False        # inside <｜DSML｜tool_calls> (else a bare invoke)
        self.value_kind = ""         # "true" (string) / "false" while reading a parameter value
        self.value = ""              # a non-string value, held until it closes
        self.params = 0              # parameters of the current call so far
        self.reasoning, self.content = [], []
        self.calls: list[ToolCall] = []
        self.dropped: list[str] = []

    # -- public
    def push(self, text: str) -> Delta:
        self.buf += text
        return self._run(final=False)

    def finish(self) -> Delta:
        return self._run(final=True)

    def result(self) -> Reply:
        return Reply("".join(self.reasoning), "".join(self.content), self.calls, self.dropped)

    # -- the loop: each handler consumes from buf and returns False when it needs more text
    def _run(self, final: bool) -> Delta:
        out = Delta()
        while True:
            if self.mode in ("reasoning", "content"):
                progressed = self._text(out, final)
            elif self.mode == "markup":
                progressed = self._markup(out, final)
            else:
                progressed = self._skip(final)
            if not progressed and final and self.buf:     # the text ends inside markup
                progressed = self._fail(final)
            if not progressed:
                break
        self.reasoning.append(out.reasoning)
        self.content.append(out.content)
        return out

    def _emit(self, out: Delta, text: str) -> None:
        if self.mode == "reasoning":
            out.reasoning += text
        else:
            out.content += text

    def _text(self, out: Delta, final: bool) -> bool:
        buf = self.buf
        d = buf.find(DSML)
        m = -1
        if d >= 0:                                        # back up over "<" / "</" and newlines
            m = d - 2 if buf.startswith("</", max(d - 2, 0)) and d >= 2 else d - 1 if d >= 1 and buf[d - 1] == "<" else d
        t = buf.find(THINK_END) if self.mode == "reasoning" else -1
        if t >= 0 and (m < 0 or t < m):
            self._emit(out, buf[:t])
            self.buf, self.mode = buf[t + len(THINK_END):], "content"
            return True
        if m >= 0:
            head = buf[:m]
            for nl in ("\n\n", "\n"):
                if head.endswith(nl):
                    head = head[:-len(nl)]
                    break
            self._emit(out, head)
            self.buf, self.mode, self.sub = buf[m:], "markup", "open"
            return True
        if final:
            self._emit(out, buf)
            self.buf = ""
            return False
        keep = _held(buf, _STARTS + ([THINK_END] if self.mode == "reasoning" else []))
        self._emit(out, buf[:len(buf) - keep])
        self.buf = buf[len(buf) - keep:]
        return False

    # -- markup
    def _expect(self, *tokens: str):
        """(token matched at the start of buf, or None; whether buf may still become one)."""
        for tok in tokens:
            if self.buf.startswith(tok):
                return tok, True
        return None, any(tok.startswith(self.buf) for tok in tokens)

    def _markup(self, out: Delta, final: bool) -> bool:
        sub = self.sub
        if sub in ("invoke_or_close", "param_or_end"):
            stripped = self.buf.lstrip()
            if not stripped:
                self.buf = ""
                return False
            self.buf = stripped
        if sub == "open":
            tok, maybe = self._expect(BLOCK_OPEN, INVOKE_OPEN)
            if tok is None:
                return self._fail(final) if not maybe else False
            self.buf = self.buf[len(tok):]
            self.in_block = tok == BLOCK_OPEN
            self.sub = "invoke_or_close" if self.in_block else "name"
            return True
        if sub == "invoke_or_close":
            tok, maybe = self._expect(INVOKE_OPEN, BLOCK_CLOSE)
            if tok is None:
                if maybe:
                    return False
                if self.in_block:
                    return self._fail(final)
                self.mode = "content"                    # text after bare invokes
                return True
            self.buf = self.buf[len(tok):]
            if tok == BLOCK_CLOSE:
                self.mode = "content"
            else:
                self.sub = "name"
            return True
        if sub == "name":
            end = self.buf.find('">')
            name = self.buf[:end] if end >= 0 else self.buf.removesuffix('"')
            if any(c in name for c in '"<>\n') or DSML in name or len(name) > MAX_NAME or (end >= 0 and not name):
                return self._fail(final)
            if end < 0:
                return False
            self.buf = self.buf[end + 2:]
            self.calls.append(ToolCall(name, "{"))
            self.params = 0
            out.add_call(len(self.calls) - 1, name, "{")
            self.sub = "param_or_end"
            return True
        if sub == "param_or_end":
            tok, maybe = self._expect(PARAM_OPEN, INVOKE_CLOSE)
            if tok is None:
                return False if maybe else self._fail(final)
            self.buf = self.buf[len(tok):]
            if tok == INVOKE_CLOSE:
                self._args(out, "}")
                self.calls[-1].complete = True
                self.sub = "invoke_or_close"
            else:
                self.sub = "key"
            return True
        if sub == "key":
            match = _PARAM_HEAD.match(self.buf)
            if match is None:
                if ">" in self.buf or "<" in self.buf or "\n" in self.buf or len(self.buf) > MAX_NAME + 20:
                    return self._fail(final)
                return False
            key, self.value_kind = match.group(1), match.group(2)
            if DSML in key:
                return self._fail(final)
            self.buf = self.buf[match.end():]
            head = ", " if self.params else ""
            self.params += 1
            self._args(out, head + json.dumps(key, ensure_ascii=False) + ": " + ('"' if self.value_kind == "true" else ""))
            self.value, self.sub = "", "value"
            return True
        return self._value(out, final)

    def _value(self, out: Delta, final: bool) -> bool:
        end = self.buf.find(PARAM_CLOSE)
        d = self.buf.find(DSML)
        if d >= 0:   # only the closing tag may hold DSML; other markup means the value never closed
            at = d - 2
            closing = at >= 0 and (self.buf.startswith(PARAM_CLOSE, at)
                                   or (end < 0 and PARAM_CLOSE.startswith(self.buf[at:])))
            if not closing or (end >= 0 and at != end):
                return self._fail(final)
        if end < 0:
            safe = len(self.buf) - _held(self.buf, [PARAM_CLOSE, DSML])
            piece, self.buf = self.buf[:safe], self.buf[safe:]
            if self.value_kind == "true":
                self._args(out, json.dumps(piece, ensure_ascii=False)[1:-1])
            else:
                self.value += piece
            return False
        piece, self.buf = self.buf[:end], self.buf[end + len(PARAM_CLOSE):]
        if self.value_kind == "true":
            self._args(out, json.dumps(piece, ensure_ascii=False)[1:-1] + '"')
        else:
            raw = self.value + piece
            try:
                json.loads(raw)
            except ValueError:
                raw = json.dumps(raw, ensure_ascii=False)
            self._args(out, raw)
        self.sub = "param_or_end"
        return True

    def _args(self, out: Delta, text: str) -> None:
        if text:
            self.calls[-1].arguments += text
            out.add_call(len(self.calls) - 1, None, text)

    # -- markup that cannot be read
    def _fail(self, final: bool) -> bool:
        """Drop unreadable markup: to the end of its block (or bare invoke), or to the end of the text."""
        self.mode = "skip"
        return self._skip(final)

    def _skip(self, final: bool) -> bool:
        close = BLOCK_CLOSE if self.in_block else INVOKE_CLOSE
        end = self.buf.find(close)
        if end >= 0:
            self.dropped.append(self.buf[:end + len(close)])
            self.buf, self.mode = self.buf[end + len(close):], "content"
            return True
        if final:
            if self.buf:
                self.dropped.append(self.buf)
            self.buf = ""
            return False
        keep = _held(self.buf, [close])
        if len(self.buf) > keep:
            self.dropped.append(self.buf[:len(self.buf) - keep])
            self.buf = self.buf[len(self.buf) - keep:]
        return False


def parse_reply(text: str, thinking: bool = False) -> Reply:
    """The whole reply at once (what the concatenated deltas of `ReplyParser` also give)."""
    parser = ReplyParser(thinking)
    parser.push(text)
    parser.finish()
    return parser.result()
