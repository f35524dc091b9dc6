"""Preference pairs: prompt / chosen / rejected rows as conversations, rendered and masked exactly as chat SFT does.

    >>> p = pair({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, "pairs.jsonl:line 1")
    >>> p.prompt, p.chosen          # [{"role": "user", ...}], [{"role": "assistant", "content": "4"}]

Row shapes (JSONL / JSON / parquet / Hub, through llmkit's prepared-data cache like any other data):

    strings          {"prompt": "...", "chosen": "...", "rejected": "..."}           (the prompt is one user turn)
    conversational   {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
    implicit prompt  {"chosen": [whole conversation], "rejected": [whole conversation]}  (the prompt is their longest
                     common prefix of messages, as TRL's `extract_prompt`)

Each side is rendered once as prompt + response with the model's chat template (llmkit.data.chat.ChatEncoder): the
assistant header belongs to the prompt, the reply and its end-of-turn token are the response, found by token
offsets in that one rendering. Only the response's tokens are scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmkit.data.chat import ChatEncoder
from llmkit.data.formats import Conversation, conversation
from llmkit.errors import UsageError


@dataclass
class Pair:
    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]


def pair(record: dict[str, Any], where: str) -> Pair:
    """One row as a checked pair, or a one-line UsageError naming file:line."""
    for side in ("chosen", "rejected"):
        if record.get(side) is None:
            raise UsageError(f"{where}: no '{side}'; every preference row needs 'chosen' and 'rejected' (and a 'prompt', "
                             "unless both are whole conversations)")
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    if prompt is None:
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise UsageError(f"{where}: no 'prompt'; without one, 'chosen' and 'rejected' must be whole conversations "
                             "(lists of messages) sharing the prompt's messages")
        common = 0
        while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
            common += 1
        if common == 0:
            raise UsageError(f"{where}: 'chosen' and 'rejected' share no first message, so the prompt cannot be found; "
                             "add a 'prompt' field or start both with the same messages")
        prompt, chosen, rejected = chosen[:common], chosen[common:], rejected[common:]
    prompt_msgs = _messages(prompt, "user", where, "prompt")
    sides = []
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        msgs = _messages(value, "assistant", where, name)
        if not msgs or msgs[0]["role"] != "assistant":
            raise UsageError(f"{where}: '{name}' must start with the assistant's reply (after the prompt's messages)")
        conversation({"messages": prompt_msgs + msgs}, "messages", where)  # every turn checked as chat SFT checks it
        sides.append(msgs)
    return Pair(prompt_msgs, sides[0], sides[1])


def _messages(value: Any, role: str, where: str, name: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):  # one message
        value = [value]
    if not isinstance(value, list):
        raise UsageError(f"{where}: '{name}' must be text or a list of messages, got a {type(value).__name__}")
    out = []
    for k, m in enumerate(value, 1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UsageError(f"{where}: '{name}' message {k} must be an object with 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def encode_pairs(encoder: ChatEncoder, pairs: list[Pair], wheres: list[str], max_tokens: int
                 ) -> tuple[dict[str, list[Any]], list[int], list[int]]:
    """Columns `input_ids` / `labels` (chosen) and `rejected_ids` / `rejected_labels`, the kept row indices, and the
    indices of the pairs whose two responses are identical (dropped). A pair whose prompt fills `max_tokens`, so that a response has no token
    left, is dropped too (counted by the caller, as chat SFT's cut-off rows are)."""
    convs = []
    identical = []
    usable = []
    for k, (p, where) in enumerate(zip(pairs, wheres, strict=True)):
        if p.chosen == p.rejected:
            identical.append(k)
            continue
        usable.append(k)
        convs += [Conversation(p.prompt + p.chosen, where, len(p.prompt)), Conversation(p.prompt + p.rejected, where, len(p.prompt))]
    encoded = encoder.encode_batch(convs) if convs else []
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "rejected_ids": [], "rejected_labels": []}
    kept = []
    for j, k in enumerate(usable):
        (c_ids, c_lab), (r_ids, r_lab) = encoded[2 * j], encoded[2 * j + 1]
        c_ids, c_lab, r_ids, r_lab = c_ids[:max_tokens], c_lab[:max_tokens], r_ids[:max_tokens], r_lab[:max_tokens]
        if not (any(t != -100 for t in c_lab[1:]) and any(t != -100 for t in r_lab[1:])):
            continue
        out["input_ids"].append(c_ids)
        out["labels"].append(c_lab)
        out["rejected_ids"].append(r_ids)
        out["rejected_labels"].append(r_lab)
        kept.append(k)
    return out, kept, identical
