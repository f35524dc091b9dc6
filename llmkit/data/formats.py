"""Which kind of data a file holds, and rows as conversations: format detection and checking.

    >>> from llmkit.data.formats import read_conversations
    >>> convs = read_conversations("chat.jsonl")   # [Conversation(messages=[...], where="chat.jsonl:line 1"), ...]

Formats, detected from the columns of a JSONL / JSON / CSV / parquet file or Hub dataset:

    messages           {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}  (OpenAI)
    sharegpt           {"conversations": [{"from": "system" | "human" | "gpt", "value": "..."}, ...]}
    prompt-completion  {"prompt": "...", "completion": "..."}  (one user turn, one assistant turn)

A row that is not of the detected format, or whose turns are malformed, is an error naming its file and line.
"""


from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from llmkit.config import DATA_FORMATS
from llmkit.errors import UsageError

FORMATS = DATA_FORMATS
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    where: str  # "chat.jsonl:line 7", for error messages
    first: int = 0  # assistant turns from this message on are learned (a preference pair: its response, not the prompt's)


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
    msgs = [_turn(t, fmt, where, k) for k, t in enumerate(turns, 1)]
    return _checked(msgs, where)


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


def _turn(turn: Any, fmt: str, where: str, k: int) -> dict[str, str]:
    role_key, text_key = ("role", "content") if fmt == "messages" else ("from", "value")
    if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
        raise UsageError(f"{where}: turn {k} must be an object with '{role_key}' and '{text_key}' ({fmt} format)")
    role = turn[role_key]
    if fmt == "sharegpt":
        if role not in SHAREGPT_ROLES:
            raise UsageError(f"{where}: turn {k} has unknown role 'from': {role!r}; use human, gpt or system")
        role = SHAREGPT_ROLES[role]
    elif role not in ROLES:
        raise UsageError(f"{where}: turn {k} has unknown role {role!r}; use {', '.join(ROLES)}")
    return {"role": role, "content": turn[text_key]}


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
