"""The streaming reply parser (dsv4.toolcalls) and the JSON constraint (dsv4.constraints), fuzzed.

References: the strict parser `dsv4.tokenizer.parse_assistant` (the official format's parse) on
replies rendered by the chat encoder, the one-piece parse for any split of a text into pieces, and
Python's `json` for the JSON automaton."""
from __future__ import annotations

import json
import random

import pytest
import torch

from dsv4.constraints import ForcedTokens, JsonObject, json_accepts
from dsv4.tokenizer import DEFAULT_TRAIN_SPECIAL_TOKENS, DSML, THINK_END, _render_tool_calls, parse_assistant, train_bpe
from dsv4.toolcalls import (BLOCK_CLOSE, BLOCK_OPEN, INVOKE_CLOSE, INVOKE_OPEN, PARAM_CLOSE, PARAM_OPEN, ReplyParser,
                            parse_reply)

PIECES = ["a", "b", " ", "\n", "<", ">", "/", '"', "\\", "｜", "é", "🙂", "</", "\n\n", "think", "<thin", "DS",
          "｜DS", "ML｜", "{", "}"]


def rand_text(r: random.Random, n: int) -> str:
    """Text with the characters markup is made of, but never a whole special token."""
    text = "".join(r.choice(PIECES) for _ in range(r.randrange(n)))
    while any(t in text for t in (DSML, "<think>", THINK_END)):
        text = text.replace(DSML, "DS").replace("<think>", "<thnk>").replace(THINK_END, "</thnk>")
    return text


def rand_value(r: random.Random):
    return r.choice([lambda: rand_text(r, 8), lambda: r.randrange(-100, 100), lambda: [r.random(), None, True],
                     lambda: {"x": rand_text(r, 4), "y": [1, {"z": "w"}]}, lambda: 1.5e10, lambda: False])()


def rand_reply(r: random.Random, thinking: bool) -> tuple[str, list[dict]]:
    calls = []
    for _ in range(r.randrange(4)):
        args = {f"k{j}_" + rand_text(r, 3).translate({ord(c): None for c in '"<>\n'}): rand_value(r)
                for j in range(r.randrange(4))}
        calls.append({"type": "function", "function": {"name": f"fn_{r.randrange(100)}",
                                                       "arguments": json.dumps(args, ensure_ascii=False)}})
    text = (rand_text(r, 20) + THINK_END if thinking else "") + rand_text(r, 30)
    return text + (_render_tool_calls(calls) if calls else ""), calls


def stream(text: str, r: random.Random, thinking: bool):
    """Feed `text` in random pieces; (reasoning, content, [(name, arguments)], parser) from the deltas."""
    parser, reasoning, content, names, args = ReplyParser(thinking), "", "", {}, {}
    i = 0
    pieces = []
    while i < len(text):
        j = i + r.randrange(1, 9)
        pieces.append(text[i:j])
        i = j
    for piece in pieces + [None]:
        d = parser.push(piece) if piece is not None else parser.finish()
        reasoning += d.reasoning
        content += d.content
        for c in d.tool_calls:
            if c.name is not None:
                assert c.index not in names
                names[c.index] = c.name
            args[c.index] = args.get(c.index, "") + c.arguments
    return reasoning, content, [(names[i], args[i]) for i in sorted(names)], parser


def test_replies_of_the_chat_format_parse_as_the_strict_parser_does_for_any_split():
    r = random.Random(0)
    n_calls = 0
    for _ in range(1500):
        thinking = r.random() < 0.5
        text, calls = rand_reply(r, thinking)
        want = parse_assistant(text, thinking=thinking)
        whole = parse_reply(text, thinking)
        assert (whole.reasoning, whole.content) == (want["reasoning_content"], want["content"]), text
        assert [(c.name, c.arguments) for c in whole.tool_calls] == \
            [(c["function"]["name"], c["function"]["arguments"]) for c in want["tool_calls"]], text
        assert [json.loads(c.arguments) for c in whole.tool_calls] == [json.loads(c["function"]["arguments"])
                                                                     for c in calls]
        assert all(c.complete for c in whole.tool_calls) and not whole.dropped
        reasoning, content, streamed, _ = stream(text, r, thinking)
        assert (reasoning, content) == (whole.reasoning, whole.content), text
        assert streamed == [(c.name, c.arguments) for c in whole.tool_calls], text
        n_calls += len(calls)
    assert n_calls > 1000


def test_truncated_replies_never_show_markup_and_stream_as_they_parse():
    r = random.Random(1)
    for _ in range(1500):
        thinking = r.random() < 0.5
        text, _ = rand_reply(r, thinking)
        cut = text[:r.randrange(len(text) + 1)]          # max_tokens can stop anywhere
        whole = parse_reply(cut, thinking)
        full = parse_assistant(text, thinking=thinking)
        assert DSML not in whole.content and DSML not in whole.reasoning
        # what was read is the start of the reply's fields (a cut "<｜DS…" tail is text, as it may be)
        if thinking:
            assert (full["reasoning_content"] + THINK_END).startswith(whole.reasoning)
        assert (full["content"] + "\n\n<" + DSML).startswith(whole.content)
        done = [c for c in whole.tool_calls if c.complete]
        assert [(c.name, c.arguments) for c in done] == \
            [(c["function"]["name"], c["function"]["arguments"]) for c in full["tool_calls"][:len(done)]]
        reasoning, content, streamed, _ = stream(cut, r, thinking)
        assert (reasoning, content) == (whole.reasoning, whole.content), cut
        assert streamed == [(c.name, c.arguments) for c in whole.tool_calls], cut


MARKUP = [BLOCK_OPEN, BLOCK_CLOSE, INVOKE_OPEN, INVOKE_CLOSE, PARAM_OPEN, PARAM_CLOSE, DSML, '">', '" string="true">',
          '" string="false">', "fn", "k", "1", "{", "[", "\n", "\n\n", " ", "x", "<", "</", THINK_END, '"', "｜"]


def test_random_markup_never_leaks_and_complete_calls_have_json_arguments():
    r = random.Random(2)
    for _ in range(4000):
        thinking = r.random() < 0.5
        text = "".join(r.choice(MARKUP) for _ in range(r.randrange(30)))
        whole = parse_reply(text, thinking)
        assert DSML not in whole.content and DSML not in whole.reasoning, text
        for c in whole.tool_calls:
            if c.complete:
                assert isinstance(json.loads(c.arguments), dict), c
        reasoning, content, streamed, _ = stream(text, r, thinking)
        assert (reasoning, content) == (whole.reasoning, whole.content), text
        assert streamed == [(c.name, c.arguments) for c in whole.tool_calls], text


def test_lenient_forms_and_what_is_dropped():
    # no wrapper, no newlines before it, markup inside the reasoning, a non-JSON value, text after the block
    text = ('I will call.<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="q" string="false">not json'
            '</｜DSML｜parameter>\n</｜DSML｜invoke>\nDone.')
    reply = parse_reply(text)
    assert reply.content == "I will call.Done." and reply.tool_calls[0].name == "f"
    assert json.loads(reply.tool_calls[0].arguments) == {"q": "not json"}
    reply = parse_reply("thinking...\n\n<｜DSML｜tool_calls>\n" + INVOKE_OPEN + 'g">\n' + INVOKE_CLOSE + "\n" +
                        BLOCK_CLOSE, thinking=True)
    assert (reply.reasoning, reply.content) == ("thinking...", "")
    assert [(c.name, c.arguments, c.complete) for c in reply.tool_calls] == [("g", "{}", True)]
    reply = parse_reply("Hi\n\n" + BLOCK_OPEN + "\ngarbage here" + BLOCK_CLOSE + " after")
    assert reply.content == "Hi after" and reply.tool_calls == [] and reply.dropped
    reply = parse_reply("Hi" + BLOCK_OPEN + "\n" + INVOKE_OPEN + 'h">\n' + PARAM_OPEN + 'a" string="true">Par')
    assert reply.content == "Hi" and reply.tool_calls[0].arguments == '{"a": "Par' and not reply.tool_calls[0].complete


# ----------------------------------------------------------------------------- JSON
def json_object(text: bytes) -> bool:
    """The reference: exactly one JSON object, by Python's json (no NaN/Infinity, no surrounding space)."""
    def reject(_):
        raise ValueError

    try:
        s = text.decode("utf-8")
        value = json.loads(s, parse_constant=reject)
    except ValueError:
        return False
    return isinstance(value, dict) and s == s.strip(" \t\n\r")


def test_json_automaton_agrees_with_python_json():
    r = random.Random(3)
    docs = [b'{}', b'{"a": [1, -2.5e+3, true, null, {"b": "x\\u00e9\\n\\t"}]}', b'{"k":{"k":[[],[{}]]}}',
            '{"é": "😀", "n": -0, "f": 0.5E-7}'.encode(), b'{"a" : 1 , "b" :[ 2 ,3 ] }']
    for doc in docs:
        assert json_accepts(doc) and json_object(doc)
    alphabet = list(b'{}[]",:.-+eE0123456789 \n\\utrfalsn') + [0xC3, 0xA9, 0x01, 0xE0, 0xED, 0xF4, 0x9F, 0xBF, 0x80]
    agree = 0
    for _ in range(20000):
        doc = bytearray(r.choice(docs))
        for _ in range(r.randrange(1, 4)):    # mutate: insert, delete or replace a byte
            i = r.randrange(len(doc) + 1)
            op = r.randrange(3)
            if op == 0:
                doc.insert(i, r.choice(alphabet))
            elif doc and i < len(doc):
                if op == 1:
                    del doc[i]
                else:
                    doc[i] = r.choice(alphabet)
        assert json_accepts(bytes(doc)) == json_object(bytes(doc)), bytes(doc)
        agree += json_object(bytes(doc))
    assert agree > 500     # both kinds were exercised


def test_json_constraint_only_lets_json_through():
    tok = train_bpe(["{\"key\": [1, 2.5, true], \"other\": null}"] * 50,
                    vocab_size=len(DEFAULT_TRAIN_SPECIAL_TOKENS) + 256 + 40)
    V = tok.vocab_size
    g = torch.Generator().manual_seed(0)
    bias = torch.zeros(V)
    for t in ('"', "}", "]", ":", ","):   # steer random logits towards closing things, so objects finish
        bias[tok.encode(t)[0]] = 2.0
    finished = 0
    for trial in range(40):
        p, gen = JsonObject(tok, V), []
        for _ in range(150):
            logits = p(gen, torch.randn(V, generator=g) + bias)
            t = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
            gen.append(t)
            if t == tok.eos_id:
                break
        text = tok.decode([t for t in gen if t != tok.eos_id]).encode()
        if gen[-1] == tok.eos_id:
            finished += 1
            assert json_object(text), text
        else:   # cut by the length limit: still a prefix the automaton follows
            assert not json_object(text) or text.endswith(b"}")
    assert finished >= 10


def test_forced_tokens_start_after_the_trigger():
    f = ForcedTokens([7, 8], after=3)
    logits = torch.zeros(10)
    assert torch.equal(f([1, 2], logits.clone()), logits)
    out = f([1, 2, 3], logits.clone())
    assert int(out.argmax()) == 7 and torch.isinf(out).sum() == 9
    assert int(f([1, 2, 3, 7], logits.clone()).argmax()) == 8
    assert torch.equal(f([1, 2, 3, 7, 8], logits.clone()), logits)
    assert torch.equal(f([1], logits.clone()), logits)                  # another request's ids: start over
    assert int(ForcedTokens([4])([], logits.clone()).argmax()) == 4     # no trigger: from the first token
    with pytest.raises(ValueError):
        ForcedTokens([])
