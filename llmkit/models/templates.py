"""Chat templates, one renderer for training, generation and serving: render, resolve (--chat-template), check.

    >>> from llmkit.models.templates import chat_messages, render_chat, CHATML
    >>> render_chat(CHATML, chat_messages("Hi", system="Be brief."))

Templates are a property of the model (saved with its tokenizer), so they live here, below both the data layer
(which trains on the rendering) and inference (which continues it).

Tool calling: conversations reach the renderer in llmkit.models.tools' format (tools block in the system turn,
`<tool_call>` replies, `<tool_response>` turns), whichever layer made them. A template that renders tools itself in
a form that format's parser reads back (`knows_tools`: Qwen 2.5/3 and other Hermes-style templates) gets them as
OpenAI-shaped `messages` and `tools=`, so the model sees the tool prompt it was made with; every other template
(SmolLM2, GPT-2, Gemma 3, and tool-aware ones whose calls are not `<tool_call>` JSON, e.g. Llama 3.1) renders the
format as plain turns. The choice is a function of the template, which is saved in every run folder: training,
generation and serving of a model make the same one.
"""


from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from llmkit.errors import UsageError
from llmkit.models.tools import TOOLS_HEADER, parse_calls, structured

# ChatML (OpenAI's format, used by SmolLM2, Qwen, ...): what `--chat-template chatml` means.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
# A prompt: text to continue, or (chat) a conversation as a list of {"role": ..., "content": ...} messages.
Prompt = str | list[dict[str, str]]


def chat_messages(prompt: Prompt, system: str | None = None) -> list[dict[str, str]]:
    """A chat prompt as messages: a string is one user turn (after `system`, if given); a list is used as is."""
    if isinstance(prompt, list):
        return prompt
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def render_chat(template: str, messages: list[dict[str, str]], *, bos_token: str | None = None,
                eos_token: str | None = None, add_generation_prompt: bool = True) -> str:
    """Render messages with a Jinja chat template, exactly as `tokenizer.apply_chat_template` does.

    One renderer (transformers') for training, generation and serving, on both backends: the text a model
    is asked to continue is the text it was trained on. A template's own exception (e.g. "roles must
    alternate") becomes a one-line UsageError.
    """
    tools = None
    if _has_tool_turns(messages) and knows_tools(template):
        messages, tools = structured(messages)
    try:
        return _render(template, messages, tools, bos_token=bos_token or "", eos_token=eos_token or "",
                       add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja2's TemplateError, or raise_exception() inside the template
        raise UsageError(f"the chat template refused this conversation: {str(e).splitlines()[0][:200]}") from None


def _render(template: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, **kwargs: Any) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], tools=tools or None, chat_template=template, **kwargs)
    return rendered[0]


def _has_tool_turns(messages: list[dict[str, Any]]) -> bool:
    return any(isinstance(m.get("content"), str) and ("<tool_call>" in m["content"] or "<tool_response>" in m["content"]
                                                       or m["content"].startswith(TOOLS_HEADER)) for m in messages)


_PROBE = {"type": "function", "function": {"name": "llmkit_probe", "description": "A probe.",
                                           "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}
_PROBE_TURNS = [{"role": "user", "content": "Probe?"},
                {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
                                                                     "function": {"name": "llmkit_probe", "arguments": {"x": 7}}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "probe result 42"},
                {"role": "assistant", "content": "Done."}]


@functools.lru_cache(maxsize=32)
def knows_tools(template: str) -> bool:
    """Whether `template` renders tools itself, Hermes-style: given `tools=`, it describes them, and an assistant
    turn's `tool_calls` come out as `<tool_call>` JSON that llmkit.models.tools.parse_calls reads back as the same
    call (so what a model trained on the rendering writes is what serve parses), and a tool result is shown."""
    if "tools" not in template or "tool_call" not in template:
        return False
    try:
        text = _render(template, _PROBE_TURNS, [_PROBE], add_generation_prompt=False, bos_token="", eos_token="")
        bare = _render(template, _PROBE_TURNS, None, add_generation_prompt=False, bos_token="", eos_token="")
    except Exception:  # a template that refuses the shape: it does not take tools this way
        return False
    _, calls = parse_calls(text, ["llmkit_probe"])
    return (calls == [{"name": "llmkit_probe", "arguments": {"x": 7}}] and "probe result 42" in text
            and text.count("llmkit_probe") > bare.count("llmkit_probe"))


def tool_format(template: str) -> str:
    """Which tool-call format a model with `template` is trained on and answers in: "template" (its own, via
    `tools=`; Hermes-style `<tool_call>` JSON) or "llmkit" (llmkit.models.tools' fallback). Recorded in llmkit.json."""
    return "template" if knows_tools(template) else "llmkit"


def resolve_template(tokenizer: Any, option: str | None, model_name: str) -> str:
    """The chat template to train with: `--chat-template` (chatml or a Jinja file), else the model's own.

    Never guessed: a model without a template and no --chat-template is an error.
    """
    if option:
        if option.lower() == "chatml":
            return CHATML
        path = Path(option).expanduser()
        if not path.is_file():
            raise UsageError(f"--chat-template {option}: no such file; pass chatml or a Jinja template file")
        text = path.read_text(encoding="utf-8")
        check_template(text, str(path))
        return text
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is for chat
        template = template.get("default")
    if not template:
        raise UsageError(f"{model_name} has no chat template; pass --chat-template chatml or --chat-template FILE.jinja "
                         "(the template is saved with the model, so generation and serving use the same one)")
    return template


def check_template(text: str, name: str) -> None:
    import jinja2

    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise UsageError(f"--chat-template {name}:line {e.lineno}: not a valid Jinja template ({e.message})") from None


def add_template_tokens(tokenizer: Any, template: str) -> list[str]:
    """ChatML's markers as special tokens when the tokenizer lacks them; returns those added (embeddings must grow)."""
    if template != CHATML:
        return []
    vocab = tokenizer.get_vocab()
    missing = [t for t in CHATML_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    return missing
