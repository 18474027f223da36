"""Constrained generation: logits processors (see `dsv4.sampling`) that force or restrict tokens.

* `ForcedTokens`: once a trigger token has been generated (or from the first token), the next
  tokens are fixed. The server uses it for `tool_choice: "required"` or a named function: after
  `</think>` the reply must open a DSML tool-call block (and, for a named function, name it).
* `JsonObject`: the reply (after the trigger) is one JSON object (RFC 8259) followed by EOS; used for
  `response_format: {"type": "json_object"}`. Every step masks the tokens whose bytes would make the
  text so far an invalid prefix of a JSON object. The tokens are byte strings (byte-level BPE), so the
  check runs on bytes: a byte-level automaton for JSON walks a trie of the vocabulary, and the
  resulting mask is cached per automaton state (a stretch inside one string reuses one mask).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

# ----------------------------------------------------------------------------- a trigger token
class _Trigger:
    """Where constrained generation starts: after the first `after` token (None: from the start)."""

    def __init__(self, after: int | None):
        self.after, self.start, self.scanned = after, (0 if after is None else None), 0

    def begin(self, generated: Sequence[int]) -> int | None:
        if len(generated) < self.scanned:    # another request's ids: start over
            self.start, self.scanned = (0 if self.after is None else None), 0
        if self.start is None:
            for i in range(self.scanned, len(generated)):
                if generated[i] == self.after:
                    self.start = i + 1
                    break
        self.scanned = len(generated)
        return self.start


class ForcedTokens:
    """Forces `tokens` one by one as soon as the trigger has been generated."""

    def __init__(self, tokens: Sequence[int], after: int | None = None):
        if not tokens:
            raise ValueError("ForcedTokens needs at least one token")
        self.tokens, self.trigger = [int(t) for t in tokens], _Trigger(after)

    def __call__(self, generated: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        start = self.trigger.begin(generated)
        if start is not None and len(generated) - start < len(self.tokens):
            t = self.tokens[len(generated) - start]
            logits.fill_(float("-inf"))
            logits[t] = 0.0
        return logits


# ----------------------------------------------------------------------------- JSON, byte by byte
_WS = frozenset(b" \t\n\r")
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrt')
_LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
MAX_DEPTH = 32   # nesting beyond this is refused, which keeps the automaton's states few
MAX_WS = 32      # whitespace bytes in a row between tokens (a model cannot pad forever)

# A state is (mode, aux, stack): stack is a tuple of "o"/"a" (open objects/arrays), aux depends on the
# mode (key/value string, bytes left in a literal or a \\u escape, whitespace bytes in a row between
# tokens, the rest of a UTF-8 character).
START, OBJ_FIRST, OBJ_KEY, COLON, VALUE, ARR_FIRST, AFTER, DONE = range(8)
STR, ESC, UHEX, LIT, UTF8 = range(8, 13)
NUM_MINUS, NUM_ZERO, NUM_INT, FRAC0, FRAC, EXP0, EXP_SIGN, EXP = range(13, 21)
# UTF-8 inside strings (RFC 3629): a lead byte, then continuation bytes 80-BF, except that the first
# one is narrower after E0 (no overlong forms), ED (no surrogates), F0 and F4 (nothing past U+10FFFF).
_UTF8_FIRST = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}


def _utf8_lead(b: int):
    """(continuation bytes that follow, range of the next one) for a lead byte, or None."""
    if 0xC2 <= b <= 0xDF:
        return 1, (0x80, 0xBF)
    if 0xE0 <= b <= 0xEF:
        return 2, _UTF8_FIRST.get(b, (0x80, 0xBF))
    if 0xF0 <= b <= 0xF4:
        return 3, _UTF8_FIRST.get(b, (0x80, 0xBF))
    return None

_NUMBER_END = {NUM_ZERO, NUM_INT, FRAC, EXP}     # a number may end in these modes


def _close(stack: tuple) -> tuple:
    stack = stack[:-1]
    return (AFTER, None, stack) if stack else (DONE, None, stack)


def _value(b: int, stack: tuple):
    """A byte that starts a value."""
    if b == 0x22:
        return STR, "v", stack
    if b in (0x7B, 0x5B):
        if len(stack) >= MAX_DEPTH:
            return None
        return (OBJ_FIRST, None, stack + ("o",)) if b == 0x7B else (ARR_FIRST, None, stack + ("a",))
    if b == 0x2D:
        return NUM_MINUS, None, stack
    if b == 0x30:
        return NUM_ZERO, None, stack
    if b in _DIGITS:
        return NUM_INT, None, stack
    if b in _LITERALS:
        return LIT, _LITERALS[b], stack
    return None


def json_step(state: tuple, b: int):
    """The automaton's next state after byte `b`, or None where `b` cannot follow."""
    mode, aux, stack = state
    if mode == STR:
        if b == 0x22:
            return (COLON, None, stack) if aux == "k" else (AFTER, None, stack)
        if b == 0x5C:
            return ESC, aux, stack
        if b >= 0x80:
            lead = _utf8_lead(b)
            return None if lead is None else (UTF8, (aux, *lead), stack)
        return None if b < 0x20 else state
    if mode == UTF8:
        kind, left, (lo, hi) = aux
        if not lo <= b <= hi:
            return None
        return (STR, kind, stack) if left == 1 else (UTF8, (kind, left - 1, (0x80, 0xBF)), stack)
    if mode == ESC:
        if b == ord("u"):
            return UHEX, (aux, 4), stack
        return (STR, aux, stack) if b in _ESCAPES else None
    if mode == UHEX:
        if b not in _HEX:
            return None
        kind, left = aux
        return (STR, kind, stack) if left == 1 else (UHEX, (kind, left - 1), stack)
    if mode == LIT:
        if b != aux[0]:
            return None
        return (AFTER, None, stack) if len(aux) == 1 else (LIT, aux[1:], stack)
    if mode >= NUM_MINUS:
        if mode in (NUM_MINUS,):
            return (NUM_ZERO if b == 0x30 else NUM_INT, None, stack) if b in _DIGITS else None
        if b in _DIGITS:
            if mode == NUM_ZERO:
                return None
            return ({NUM_INT: NUM_INT, FRAC0: FRAC, FRAC: FRAC, EXP0: EXP, EXP_SIGN: EXP, EXP: EXP}[mode], None, stack)
        if b == 0x2E and mode in (NUM_ZERO, NUM_INT):
            return FRAC0, None, stack
        if b in (0x65, 0x45) and mode in (NUM_ZERO, NUM_INT, FRAC):
            return EXP0, None, stack
        if b in (0x2B, 0x2D) and mode == EXP0:
            return EXP_SIGN, None, stack
        if mode not in _NUMBER_END:
            return None
        return json_step((AFTER, None, stack), b)   # the byte after a number belongs to what follows
    if b in _WS:
        if mode in (START, DONE) or (aux or 0) >= MAX_WS:   # the reply is the object, nothing around it
            return None
        return mode, (aux or 0) + 1, stack
    if mode == START:
        return (OBJ_FIRST, None, ("o",)) if b == 0x7B else None
    if mode in (OBJ_FIRST, OBJ_KEY):
        if b == 0x22:
            return STR, "k", stack
        return _close(stack) if b == 0x7D and mode == OBJ_FIRST else None
    if mode == COLON:
        return (VALUE, None, stack) if b == 0x3A else None
    if mode in (VALUE, ARR_FIRST):
        if b == 0x5D and mode == ARR_FIRST:
            return _close(stack)
        return _value(b, stack)
    if mode == AFTER:
        top = stack[-1]
        if b == 0x2C:
            return (OBJ_KEY, None, stack) if top == "o" else (VALUE, None, stack)
        if (b == 0x7D and top == "o") or (b == 0x5D and top == "a"):
            return _close(stack)
        return None
    return None   # DONE: only EOS


def json_accepts(text: bytes) -> bool:
    """Whether `text` is exactly one JSON object (what the automaton ends in DONE on)."""
    state = (START, None, ())
    for b in text:
        state = json_step(state, b)
        if state is None:
            return False
    return state[0] == DONE


class _Trie:
    __slots__ = ("children", "ends")

    def __init__(self):
        self.children: dict[int, _Trie] = {}
        self.ends: list[int] = []


def _byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): printable bytes stand for themselves, the others for
    the characters from U+0100 on."""
    keep = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def _plain(data: bytes) -> bool:
    """Whether these bytes, inside a string, leave it as they found it: no quote, backslash or control
    byte, and whole UTF-8 characters."""
    if any(b < 0x20 or b in (0x22, 0x5C) for b in data):
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class JsonVocab:
    """The byte strings of a tokenizer's tokens and the tries the JSON masks walk, built once per
    tokenizer (`JsonVocab.of(tokenizer)`). Added tokens (special, chat) have no bytes: never allowed,
    except EOS once the object is complete."""

    _cache: dict[int, "JsonVocab"] = {}

    def __init__(self, tokenizer, vocab_size: int):
        from tokenizers import decoders

        backend = tokenizer.backend
        if not isinstance(backend.decoder, decoders.ByteLevel):
            raise ValueError("JSON-constrained output needs a byte-level BPE tokenizer (such as DeepSeek-V4's)")
        table = _byte_decoder()
        added = set(tokenizer.special_tokens.values())
        self.vocab_size, self.eos_id = vocab_size, tokenizer.eos_id
        self.full, self.special = _Trie(), _Trie()
        self.token_bytes: dict[int, bytes] = {}
        plain = torch.zeros(vocab_size, dtype=torch.bool)
        for token, i in backend.get_vocab(with_added_tokens=False).items():
            if i in added or i >= vocab_size or any(c not in table for c in token):
                continue
            data = bytes(table[c] for c in token)
            self.token_bytes[i] = data
            self._insert(self.full, data, i)
            if _plain(data):
                plain[i] = True        # stays inside a string whatever the string's state
            else:
                self._insert(self.special, data, i)
        self.plain = plain
        self.masks: OrderedDict = OrderedDict()

    @staticmethod
    def _insert(root: _Trie, data: bytes, token: int) -> None:
        node = root
        for b in data:
            node = node.children.setdefault(b, _Trie())
        node.ends.append(token)

    @classmethod
    def of(cls, tokenizer, vocab_size: int) -> "JsonVocab":
        key = id(tokenizer.backend)
        if key not in cls._cache or cls._cache[key].vocab_size != vocab_size:
            cls._cache[key] = cls(tokenizer, vocab_size)
        return cls._cache[key]

    def mask(self, state: tuple, device) -> torch.Tensor:
        """Bool [V]: the tokens that may come next in `state` (cached, LRU of 512 states)."""
        entry = self.masks.get(state)
        if entry is None:
            entry = {"cpu": self._compute(state)}
            self.masks[state] = entry
            if len(self.masks) > 512:
                self.masks.popitem(last=False)
        self.masks.move_to_end(state)
        key = str(device)
        if key not in entry:
            entry[key] = entry["cpu"].to(device)
        return entry[key]

    def _compute(self, state: tuple) -> torch.Tensor:
        allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
        if state[0] == DONE:
            allowed[self.eos_id] = True
            return allowed
        ids: list[int] = []
        root = self.full
        if state[0] == STR:   # plain tokens keep the string going; walk only the others
            allowed |= self.plain
            root = self.special
        todo = [(root, state)]
        while todo:
            node, st = todo.pop()
            ids.extend(node.ends)
            for b, child in node.children.items():
                nxt = json_step(st, b)
                if nxt is not None:
                    todo.append((child, nxt))
        if ids:
            allowed[torch.tensor(ids, dtype=torch.long)] = True
        return allowed


class JsonObject:
    """Constrains the reply (after the trigger token, if any) to one JSON object and then EOS."""

    def __init__(self, tokenizer, vocab_size: int, after: int | None = None):
        self.vocab = JsonVocab.of(tokenizer, vocab_size)
        self.trigger = _Trigger(after)
        self.state, self.done = (START, None, ()), 0   # automaton state after generated[start:done]

    def __call__(self, generated: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        start = self.trigger.begin(generated)
        if start is None:
            return logits
        if self.done < start or self.done > len(generated):
            self.state, self.done = (START, None, ()), start
        for t in generated[self.done:]:
            self.state = self._advance(self.state, int(t))
        self.done = len(generated)
        allowed = self.vocab.mask(self.state, logits.device)
        if not bool(allowed.any()):
            raise RuntimeError("no token of the vocabulary continues the JSON object")
        return logits.masked_fill_(~allowed, float("-inf"))

    def _advance(self, state: tuple, token: int) -> tuple:
        data = self.vocab.token_bytes.get(token)
        if data is None:
            if token == self.vocab.eos_id and state[0] == DONE:
                return state
            raise RuntimeError(f"token {token} does not continue the JSON object")
        for b in data:
            state = json_step(state, b)
            if state is None:
                raise RuntimeError(f"token {token} does not continue the JSON object")
        return state
