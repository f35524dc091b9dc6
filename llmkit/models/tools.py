"""The tool-call format, one for training data, `llmkit serve` and `llmkit evaluate`: the tools block of the system
turn, calls as assistant text, tool results as turns, and replies parsed back into calls.

    >>> from llmkit.models.tools import call_text, parse_calls, tool_spec
    >>> call_text("get_weather", {"city": "Paris"})
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    >>> parse_calls(call_text("get_weather", {"city": "Paris"}), ["get_weather"])
    (None, [{'name': 'get_weather', 'arguments': {'city': 'Paris'}}])

The format (what every layer passes around; the bundled SmolLM2's and GPT-2-style templates know no tools and render
it as it is, while `structured` gives it back in OpenAI's shape for templates that render tools themselves): the
tools are described in the system turn, as JSON, one line each, and a call is assistant text

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

(one element per call). A tool's result is a *user* turn `<tool_response>{"tool_call_id", "content"}
</tool_response>`: templates that only know system/user/assistant (or refuse a `tool` role) render it, and a
model trained on the format sees the same text at serve time. It lives here, beside the chat templates, because
both the data layer (training renders rows with it) and serving (prompts and parsed replies) need it: what a
model learns to write is then exactly what the server parses.
"""

from __future__ import annotations

import json
import re
from typing import Any

CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def tool_spec(tool: dict[str, Any]) -> dict[str, Any]:
    """{"name", "description", "parameters"} of an OpenAI tool `{"type": "function", "function": {...}}` (or of
    the bare function object); KeyError/TypeError for one without a name, for the caller to word."""
    fn = tool["function"] if isinstance(tool, dict) and "function" in tool else tool
    name = fn["name"]
    if not isinstance(name, str) or not name:
        raise TypeError("a tool's name must be a non-empty string")
    return {"name": name, "description": fn.get("description") or "", "parameters": fn.get("parameters") or EMPTY_PARAMETERS}


TOOLS_HEADER = "You can call these tools (JSON Schema of each one's arguments):\n"
TOOLS_FOOTER = ('To call a tool, reply with only <tool_call>{"name": "TOOL NAME", "arguments": {...}}</tool_call>. '
                "Tool results come back in <tool_response></tool_response>; then answer the user.")
RESPONSE = re.compile(r"<tool_response>(.*)</tool_response>", re.S)


def describe_tools(specs: list[dict[str, Any]]) -> str:
    """The system turn's tools block (how the model learns which tools exist and how to call them)."""
    return TOOLS_HEADER + "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in specs) + TOOLS_FOOTER


def with_tools(messages: list[dict[str, str]], specs: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The messages with the tools block in the system turn, ahead of the conversation's own system prompt."""
    if not specs:
        return messages
    described = describe_tools(specs)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": described + "\n\n" + messages[0]["content"]}, *messages[1:]]
    return [{"role": "system", "content": described}, *messages]


def call_text(name: str, arguments: Any) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "</tool_call>"


def result_turn(tool_call_id: str | None, content: str) -> dict[str, str]:
    """A tool's result as the user turn every template renders (see the module's docstring)."""
    return {"role": "user", "content": "<tool_response>" + json.dumps({"tool_call_id": tool_call_id, "content": content},
                                                                     ensure_ascii=False) + "</tool_response>"}


def arguments_value(raw: Any) -> Any:
    """OpenAI's arguments (JSON text) as a value; text that is not JSON stays text (serve echoes what it was sent)."""
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def parse_calls(text: str, names: list[str], forced: bool = False) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, [{"name", "arguments"}]) of a reply: `<tool_call>` elements (or, when `forced`, the bare call object
    a constraint produced) that are well-formed calls of a known tool; anything else stays content."""
    found = [m.group(1) for m in CALL.finditer(text)] if "<tool_call>" in text else ([text] if forced else [])
    calls = []
    for raw in found:
        try:
            call = json.loads(raw)
        except ValueError:
            continue
        if isinstance(call, dict) and call.get("name") in names:
            calls.append({"name": call["name"], "arguments": call.get("arguments") or {}})
    if not calls:
        return text, []
    rest = CALL.sub("", text).strip() if "<tool_call>" in text else ""
    return rest or None, calls


_TYPES: dict[str, Any] = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
                          "integer": int, "number": (int, float)}


def schema_errors(value: Any, schema: Any, path: str = "arguments") -> list[str]:
    """Where `value` breaks a JSON Schema (the subset tool parameters use: type, enum, const, properties, required,
    additionalProperties, items, anyOf/oneOf, string/array lengths, numeric bounds); [] when it validates.

    Its own, small: llmkit does not depend on `jsonschema`, and scoring tool calls needs only this much.
    """
    if not isinstance(schema, dict):
        return []
    errors: list[str] = []
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        ok = any(isinstance(value, _TYPES.get(k, object)) and not (k in ("integer", "number") and isinstance(value, bool))
                 for k in kinds) or ("integer" in kinds and isinstance(value, float) and value.is_integer())
        if not ok:
            return [f"{path}: {json.dumps(value)[:40]} is not of type {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: not one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: not {schema['const']!r}")
    for key in ("anyOf", "oneOf"):
        if key in schema and all(schema_errors(value, s, path) for s in schema[key]):
            errors.append(f"{path}: matches none of {key}")
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        errors += [f"{path}.{k}: required" for k in schema.get("required") or [] if k not in value]
        for k, v in value.items():
            if k in props:
                errors += schema_errors(v, props[k], f"{path}.{k}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}.{k}: not an allowed property")
    if isinstance(value, str):
        if len(value) > schema.get("maxLength", len(value)) or len(value) < schema.get("minLength", 0):
            errors.append(f"{path}: length {len(value)} outside the schema's bounds")
    if isinstance(value, list):
        errors += [e for i, item in enumerate(value) for e in schema_errors(item, schema.get("items"), f"{path}.{i}")]
        if len(value) > schema.get("maxItems", len(value)) or len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: {len(value)} items, outside the schema's bounds")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if ("minimum" in schema and value < schema["minimum"]) or ("maximum" in schema and value > schema["maximum"]):
            errors.append(f"{path}: {value} outside the schema's bounds")
    return errors


def structured(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Messages in this module's format back in OpenAI's structured shape, and the tools (OpenAI's `{"type":
    "function", "function": {...}}` each): what a template that renders tools itself (Qwen 2.5/3, Hermes) takes as
    `messages` and `tools=`. The format is lossless, so this is exact: the tools block of the first system turn
    becomes `tools`, `<tool_call>` text of an assistant turn its `tool_calls` (arguments as objects, as templates
    expect), a `<tool_response>` user turn a `tool` message. Calls get positional ids (call_1, call_2, ...) and each
    result answers the oldest call not yet answered, so a conversation and its prefixes render alike."""
    specs: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    pending: list[str] = []
    calls = 0
    for k, m in enumerate(messages):
        role, text = m["role"], m.get("content") or ""
        if k == 0 and role == "system" and text.startswith(TOOLS_HEADER) and TOOLS_FOOTER in text:
            block, _, rest = text[len(TOOLS_HEADER):].partition(TOOLS_FOOTER)
            specs = [json.loads(line) for line in block.splitlines() if line.strip()]
            if rest.removeprefix("\n\n"):
                out.append({"role": "system", "content": rest.removeprefix("\n\n")})
            continue
        if role == "assistant" and "<tool_call>" in text:
            # without a tools block (tool_choice "none" on a conversation that called some) the calls name their tools
            names = [s["name"] for s in specs] or [_name(raw) for raw in CALL.findall(text)]
            content, found = parse_calls(text, names)
            if found:
                ids = [f"call_{calls + n + 1}" for n in range(len(found))]
                calls += len(found)
                pending += ids
                out.append({"role": "assistant", "content": content or "", "tool_calls": [
                    {"id": i, "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for i, c in zip(ids, found, strict=True)]})
                continue
        if role == "user" and (match := RESPONSE.fullmatch(text.strip())) and pending:
            try:
                result = json.loads(match.group(1))
            except ValueError:
                result = None
            if isinstance(result, dict) and "content" in result:
                out.append({"role": "tool", "tool_call_id": pending.pop(0), "content": result["content"]})
                continue
        out.append(m)
    return out, [{"type": "function", "function": s} for s in specs]



def _name(raw: str) -> str | None:
    try:
        call = json.loads(raw)
    except ValueError:
        return None
    return call.get("name") if isinstance(call, dict) else None
