"""Chat templates, one renderer for training, generation and serving: render, resolve (--chat-template), check.

    >>> from llmkit.models.templates import chat_messages, render_chat, CHATML
    >>> render_chat(CHATML, chat_messages("Hi", system="Be brief."))

Templates are a property of the model (saved with its tokenizer), so they live here, below both the data layer
(which trains on the rendering) and inference (which continues it).
"""


from __future__ import annotations

from pathlib import Path
from typing import Any

from llmkit.errors import UsageError

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
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                            add_generation_prompt=add_generation_prompt,
                                            bos_token=bos_token or "", eos_token=eos_token or "")
    except Exception as e:  # jinja2's TemplateError, or raise_exception() inside the template
        raise UsageError(f"the chat template refused this conversation: {str(e).splitlines()[0][:200]}") from None
    return rendered[0]


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
