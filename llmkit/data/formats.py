"""Which kind of data a file holds, and rows as conversations: format detection and checking.

    >>> from llmkit.data.formats import read_conversations
    >>> convs = read_conversations("chat.jsonl")   # [Conversation(messages=[...], where="chat.jsonl:line 1"), ...]

Formats, detected from the columns of a JSONL / JSON / CSV / parquet file or Hub dataset:

    messages           {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": "..."}, ...]}  (OpenAI)
    sharegpt           {"conversations": [{"from": "system" | "human" | "gpt" | "function_call" | "observation", "value": "..."}, ...]}
    prompt-completion  {"prompt": "...", "completion": "..."}  (one user turn, one assistant turn)

Tool calling: a messages or sharegpt row may have `tools` (OpenAI's list of `{"type": "function", "function": {"name",
"description", "parameters"}}`, or that list as JSON text), assistant messages with OpenAI's `tool_calls` (`id`,
`type`, `function.name`, `function.arguments` as JSON text or an object) and `tool` messages with their results
(sharegpt: `function_call` turns holding `{"name", "arguments"}` and `observation` turns). They are read into
llmkit.models.tools' format, the one `llmkit serve` parses: the tools block in the system turn, calls as
`<tool_call>` text of the assistant turn (so they are learned), results as user turns (context, never learned); a
template that renders tools itself gets them back in OpenAI's shape at rendering (llmkit.models.templates).
A call whose arguments are not a JSON object, of a tool not in the row's `tools`, or a result that answers no call
is an error naming the row.

A row that is not of the detected format, or whose turns are malformed, is an error naming its file and line.
"""


from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from llmkit.config import DATA_FORMATS
from llmkit.errors import UsageError
from llmkit.models.tools import call_text, result_turn, tool_spec, with_tools

FORMATS = DATA_FORMATS
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "function_call", "observation": "tool"}


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    where: str  # "chat.jsonl:line 7", for error messages
    first: int = 0  # assistant turns from this message on are learned (a preference pair: its response, not the prompt's)
    tools: list[dict[str, Any]] | None = None  # the row's tools ({"name", "description", "parameters"}), already in messages


CHAT_COLUMNS = {"messages": "messages", "sharegpt": "conversations", "prompt-completion": "prompt"}


def detect_format(first: dict[str, Any] | None, fmt: str, prompt_column: str | None) -> str:
    """The data's format: `fmt` unless it is "auto", else what the first row's fields say ("text" for plain text).

    Every later row must have the same format (`row_format`): one file, one format.
    """
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    if prompt_column or not isinstance(first, dict):  # --prompt-column alone: raw prompt + response text, no template
        return "text"
    return row_format(first) or "text"


def row_format(record: Any) -> str | None:
    """Which chat format a row is in (preference pairs first, then the first of messages, sharegpt, prompt-completion
    whose field it fills)."""
    if not isinstance(record, dict):
        return None
    if "chosen" in record or "rejected" in record:
        return "preference"
    for name, col in CHAT_COLUMNS.items():
        if record.get(col) is not None and (name != "prompt-completion" or "completion" in record):
            return name
    return None


def format_mismatch(here: str | None, first: str, first_where: str, where: str) -> str:
    what = f"a {here} row" if here else f"a row with none of the {', '.join(CHAT_COLUMNS.values())} fields"
    return f"{where}: {what} in a file of {first} rows ({first_where}); keep one chat format per file"


def conversation(record: dict[str, Any], fmt: str, where: str, prompt_column: str | None = None,
                 text_column: str = "text") -> Conversation:
    """One row as a validated conversation; a bad row is a one-line error naming file:line."""
    if fmt == "prompt-completion":
        prompt_col = prompt_column or "prompt"
        answer_col = text_column if prompt_column else "completion"
        msgs = [{"role": "user", "content": record.get(prompt_col)}, {"role": "assistant", "content": record.get(answer_col)}]
        return _checked(msgs, where)
    column = "messages" if fmt == "messages" else "conversations"
    turns = record.get(column)
    if isinstance(turns, str):  # a CSV cell, or JSON stored as a string
        import json

        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            raise UsageError(f"{where}: '{column}' is text, not a list of turns") from None
    if not isinstance(turns, list):
        raise UsageError(f"{where}: '{column}' must be a list of turns, got a {type(turns).__name__}")
    specs = _row_tools(record.get("tools"), where)
    calls = _Calls({s["name"]: s for s in specs}, where)
    conv = _checked([_turn(t, fmt, where, k, calls) for k, t in enumerate(turns, 1)], where)
    if specs:
        conv.messages, conv.tools = with_tools(conv.messages, specs), specs
    return conv


def read_conversations(spec: str, fmt: str = "auto", prompt_column: str | None = None, text_column: str = "text",
                       limit: int | None = None) -> list[Conversation]:
    """The first `limit` conversations of a data file (all of them when None), validated; for small files and samples
    (training data goes through llmkit.datasets, which never holds a file in memory)."""
    from llmkit.data.files import find_sources, iter_records

    _, sources = find_sources(spec, task="causal-lm")
    out: list[Conversation] = []
    first = first_where = None
    for source in sources:
        if source.kind == "text":
            raise UsageError(f"{source.name} holds no conversations (no 'messages', 'conversations' or 'prompt'/'completion' "
                             "columns); pass --format to say which columns hold them")
        for where, record in iter_records(source):
            if not isinstance(record, dict):
                raise UsageError(f"{where}: a JSON {type(record).__name__} where an object like {{\"messages\": ...}} is expected")
            if first is None:
                first, first_where = detect_format(record, fmt, prompt_column), where
                if first == "text":
                    raise UsageError(f"{source.name} holds no conversations (no 'messages', 'conversations' or 'prompt'/'completion' "
                                     "columns); pass --format to say which columns hold them")
            if fmt == "auto" and row_format(record) != first:
                raise UsageError(format_mismatch(row_format(record), first, first_where, where))
            out.append(conversation(record, first, where, prompt_column, text_column))
            if limit is not None and len(out) >= limit:
                return out
    return out


def _turn(turn: Any, fmt: str, where: str, k: int, calls: _Calls) -> dict[str, str]:
    role_key, text_key = ("role", "content") if fmt == "messages" else ("from", "value")
    called = fmt == "messages" and isinstance(turn, dict) and turn.get("role") == "assistant" and turn.get("tool_calls")
    if not isinstance(turn, dict) or role_key not in turn or (text_key not in turn and not called):
        raise UsageError(f"{where}: turn {k} must be an object with '{role_key}' and '{text_key}' ({fmt} format)")
    role = turn[role_key]
    if fmt == "sharegpt":
        if role not in SHAREGPT_ROLES:
            raise UsageError(f"{where}: turn {k} has unknown role 'from': {role!r}; use human, gpt, system, function_call or observation")
        role = SHAREGPT_ROLES[role]
    elif role not in ROLES:
        raise UsageError(f"{where}: turn {k} has unknown role {role!r}; use {', '.join(ROLES)}")
    content = turn.get(text_key)
    if role == "function_call":  # sharegpt: the value is the call object (or a list of them), as JSON text
        return {"role": "assistant", "content": "".join(calls.text(c, k) for c in _listed(_json(content, where, k, "value")))}
    if called:
        if not isinstance(turn["tool_calls"], list):
            raise UsageError(f"{where}: turn {k}: 'tool_calls' must be a list of calls")
        # the text the model wrote before its calls (often none), then the calls: all of it is the assistant's to learn
        return {"role": "assistant", "content": ("" if content is None else content) + "".join(calls.text(c, k) for c in turn["tool_calls"])}
    if role == "tool":
        if not isinstance(content, str) or not content.strip():
            raise UsageError(f"{where}: turn {k} (tool) must have the tool's result as non-empty text")
        return result_turn(calls.answer(turn.get("tool_call_id"), k), content)
    return {"role": role, "content": content}


class _Calls:
    """A row's tools and the calls made so far, so that calls and results are checked against them."""

    def __init__(self, specs: dict[str, dict[str, Any]], where: str) -> None:
        self.specs, self.where, self.pending, self.count = specs, where, [], 0

    def text(self, call: Any, k: int) -> str:
        """One call (OpenAI's `{"id", "type", "function": {...}}` or a bare `{"name", "arguments"}`) as its text."""
        fn = call.get("function", call) if isinstance(call, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise UsageError(f"{self.where}: turn {k}: a tool call must be an object with a function name")
        if name not in self.specs:
            known = ", ".join(self.specs) or "the row has no 'tools'"
            raise UsageError(f"{self.where}: turn {k} calls the tool {name!r}, which is not in the row's tools ({known})")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            args = _json(args, self.where, k, f"the arguments of {name!r}")
        if not isinstance(args, dict):
            raise UsageError(f"{self.where}: turn {k}: the arguments of {name!r} must be a JSON object, got {type(args).__name__}")
        self.count += 1
        self.pending.append(call.get("id") or f"call_{self.count}")
        return call_text(name, args)

    def answer(self, call_id: Any, k: int) -> str:
        """The id of the call a result answers: the one named, else the oldest one not answered yet."""
        if call_id is None and self.pending:
            return self.pending.pop(0)
        if call_id in self.pending:
            self.pending.remove(call_id)
            return call_id
        raise UsageError(f"{self.where}: turn {k} is a tool result that answers no earlier tool call"
                         + (f" (tool_call_id {call_id!r})" if call_id is not None else ""))


def _row_tools(value: Any, where: str) -> list[dict[str, Any]]:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return []
    tools = _json(value, where, 0, "'tools'") if isinstance(value, str) else value
    if not isinstance(tools, list):
        raise UsageError(f"{where}: 'tools' must be a list of tools, got a {type(tools).__name__}")
    specs = []
    for i, tool in enumerate(tools):
        try:
            spec = tool_spec(tool)
        except (KeyError, TypeError, AttributeError):
            raise UsageError(f"{where}: tools.{i} must be {{\"type\": \"function\", \"function\": {{\"name\": ..., \"parameters\": ...}}}}") from None
        if not isinstance(spec["parameters"], dict):
            raise UsageError(f"{where}: tools.{i} ({spec['name']}): 'parameters' must be a JSON Schema object")
        if any(s["name"] == spec["name"] for s in specs):
            raise UsageError(f"{where}: tools.{i}: the tool {spec['name']!r} is listed twice")
        specs.append(spec)
    return specs


def _json(value: Any, where: str, k: int, what: str) -> Any:
    if not isinstance(value, str):
        return value
    import json

    try:
        return json.loads(value)
    except ValueError as e:
        raise UsageError(f"{where}: {f'turn {k}: ' if k else ''}{what} is not valid JSON ({e})") from None


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _checked(msgs: list[dict[str, Any]], where: str) -> Conversation:
    for k, m in enumerate(msgs, 1):
        c = m["content"]
        if c is None or (isinstance(c, float) and math.isnan(c)) or (isinstance(c, str) and not c.strip()):
            raise UsageError(f"{where}: turn {k} ({m['role']}) has empty content; fill it in or drop the turn")
        if not isinstance(c, str):
            raise UsageError(f"{where}: turn {k} ({m['role']}) content is a {type(c).__name__}, not text")
    if not any(m["role"] == "assistant" for m in msgs):
        raise UsageError(f"{where}: the conversation has no assistant turn, so there is nothing to learn; "
                         "add the reply or drop the row")
    return Conversation(msgs, where)
