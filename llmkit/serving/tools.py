"""Tools and JSON answers in `llmkit serve`: OpenAI's `tools` / `tool_choice` / `response_format`, as prompts,
constraints and parsed replies.

    >>> messages = render_messages(request.messages, text_of)     # tool calls and results as plain turns
    >>> constraint = call_constraint(tools, "required")           # a grammar: the reply can only be a call
    >>> content, calls = parse_reply(text, tools, forced=True)    # [{"id", "type": "function", "function": {...}}]

The format is llmkit.models.tools' (the one training data is rendered with): the tools are described in the
system turn, as JSON, and a call is a reply of

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

(one such element per call; several calls are several elements). An assistant message with `tool_calls` is
written back in that format, and a `tool` message becomes a user turn `<tool_response>{"tool_call_id", "content"}
</tool_response>`, so templates that only know system/user/assistant render the whole round trip; a template that
renders tools itself (Qwen 2.5 / 3, Hermes-style) gets them back as `tools=` and OpenAI-shaped messages when the
backend renders (llmkit.models.templates.knows_tools), and its `<tool_call>` replies parse the same way. With
`tool_choice` "required" or a named function the reply is constrained (llmkit.inference.constraints) to be exactly
one call object `{"name": ..., "arguments": ...}` whose arguments validate against the tool's schema, so even an
untuned model returns a well-formed call.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from llmkit.errors import UsageError
from llmkit.inference.constraints import check, json_object, json_schema
from llmkit.inference.sampling import Constraint
from llmkit.models.tools import arguments_value, call_text, parse_calls, result_turn


def tool_specs(tools: list[Any]) -> dict[str, dict[str, Any]]:
    """{name: {"name", "description", "parameters"}} of the request's function tools."""
    return {t.function.name: {"name": t.function.name, "description": t.function.description or "",
                              "parameters": t.function.parameters or {"type": "object", "properties": {}}} for t in tools}


def check_schemas(tools: list[Any]) -> None:
    for i, spec in enumerate(tool_specs(tools).values()):
        try:
            check(json_schema(spec["parameters"]))
        except UsageError as e:
            raise ToolError(f"tools.{i}.function.parameters: {e}", f"tools.{i}.function.parameters") from None


class ToolError(ValueError):
    """A request's tools, tool_choice, messages or response_format cannot be used; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def chosen_tools(tools: list[Any] | None, choice: Any) -> tuple[list[str], bool]:
    """(names the model may call, whether it must call one) for `tool_choice`; ToolError for an unknown name."""
    names = list(tool_specs(tools or []))
    if choice is None:
        return names, False
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise ToolError(f"tool_choice must be 'auto', 'none', 'required' or a named function (got {choice!r})", "tool_choice")
        if choice == "required" and not names:
            raise ToolError("tool_choice 'required' needs tools", "tool_choice")
        return ([] if choice == "none" else names), choice == "required"
    if choice.function.name not in names:
        raise ToolError(f"tool_choice names the function {choice.function.name!r}, which is not among the tools "
                        f"({', '.join(names) or 'none given'})", "tool_choice")
    return [choice.function.name], True


def call_constraint(tools: list[Any], names: list[str]) -> Constraint:
    """The reply must be one call object of one of `names`, arguments valid against that tool's schema."""
    specs = tool_specs(tools)
    options = [{"type": "object", "properties": {"name": {"const": n}, "arguments": specs[n]["parameters"]},
                "required": ["name", "arguments"], "additionalProperties": False} for n in names]
    return json_schema(options[0] if len(options) == 1 else {"anyOf": options})


def format_constraint(fmt: Any) -> Constraint | None:
    """OpenAI's `response_format` as a constraint: text (None), any JSON object, or a JSON schema."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return json_object()
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise ToolError("response_format of type json_schema needs json_schema.schema", "response_format")
    constraint = json_schema(fmt.json_schema.schema_)
    try:
        check(constraint)
    except UsageError as e:
        raise ToolError(f"response_format: {e}", "response_format") from None
    return constraint


def render_messages(messages: list[Any], text_of: Any) -> list[dict[str, str]]:
    """Messages with tool calls and tool results as plain turns in the fallback format; ToolError for a `tool`
    message that answers no earlier call."""
    calls: set[str] = set()
    out = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        text = text_of(m) if m.content is not None else ""
        if m.role == "assistant" and m.tool_calls:
            calls.update(c.id for c in m.tool_calls)
            text += "".join(call_text(c.function.name, arguments_value(c.function.arguments)) for c in m.tool_calls)
        if m.role == "tool":
            if m.tool_call_id not in calls:
                raise ToolError(f"messages.{i}: this tool message answers tool_call_id {m.tool_call_id!r}, which no earlier "
                                "assistant message called", f"messages.{i}.tool_call_id")
            out.append(result_turn(m.tool_call_id, text))
            continue
        out.append({"role": role, "content": text})
    return out


def parse_reply(text: str, names: list[str], forced: bool) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a reply: calls in the fallback format (or, when forced, the bare call object)
    become OpenAI tool_calls; text that is not a well-formed call of a known tool stays content."""
    content, calls = parse_calls(text, names, forced)
    return content, [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                      "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}} for c in calls]
