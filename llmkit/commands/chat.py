"""`llmkit chat`: a multi-turn chat in the terminal with any chat model `llmkit generate` takes."""

from __future__ import annotations

import inspect
import os
import sys
from typing import Any

import typer

from llmkit.commands.generate import generate
from llmkit.errors import UsageError

_GENERATE = inspect.signature(generate).parameters


def _same(name: str) -> Any:
    """`llmkit generate`'s declaration of this option: one declaration, the same flag, default and help in both."""
    return _GENERATE[name].default


def chat(
    model: str = _same("model"),
    system: str = typer.Option(None, "--system", "-s", help="System prompt (change it in the session with /system TEXT).", show_default=False),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n", help="Most tokens per answer; each turn keeps room for them."),
    context: int = typer.Option(4096, "--context", help="Most tokens one turn takes (conversation + answer), never more than the "
                                "model's own context; beyond it the oldest turns are dropped."),
    temperature: float = _same("temperature"),
    top_k: int = _same("top_k"),
    top_p: float = _same("top_p"),
    repetition_penalty: float = _same("repetition_penalty"),
    stop: list[str] = _same("stop"),
    seed: int = _same("seed"),
    backend: str = _same("backend"),
    device: str = _same("device"),
    dtype: str = _same("dtype"),
    threads: int = _same("threads"),
    allow_pickle: bool = _same("allow_pickle"),
    trust_remote_code: bool = _same("trust_remote_code"),
    tools: str = typer.Option(None, "--tools", help="JSON file with OpenAI `tools` (a list, or an object with a \"tools\" list): "
                              "the model may call them; you type each call's result.", show_default=False),
    show_prompt: bool = typer.Option(False, "--show-prompt", help="Print each turn's prompt, as the chat template renders it, on stderr."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No loading messages or banner on stderr."),
) -> None:
    """Chat with a model in the terminal: answers stream as they come, and the conversation is kept.

    In the session: /system TEXT sets the system prompt, /reset forgets the conversation, /exit (or Ctrl-D)
    leaves. Ctrl-C stops the answer being written; Ctrl-C at the prompt leaves. When the conversation outgrows
    --context, its oldest turns are dropped, and the session says so.

    Examples:

        llmkit chat

        llmkit chat --model runs/chat-lora --system "Answer in one sentence."

        llmkit chat --model smollm2-135m --temperature 0 -n 128 --threads 1

        llmkit chat --model runs/smollm2-q8_0.gguf --context 8192

        printf "Hi!\\nName three colors.\\n" | llmkit chat -t 0 -n 32 --quiet

        llmkit chat --model runs/tools-lora --tools tools.json -t 0    # a tool call is shown; type its result
    """
    from llmkit.inference.backends import open_backend
    from llmkit.inference.sampling import SamplingOptions
    from llmkit.inference.terminal_chat import ChatSession, run
    from llmkit.models.refs import resolve

    if sys.stdin.isatty():
        # Ctrl-C is this session's key from the start, even when llmkit was started with SIGINT ignored (a shell's
        # background job, some CI runners): Python then installs no KeyboardInterrupt handler and Ctrl-C does nothing
        import signal

        signal.signal(signal.SIGINT, signal.default_int_handler)
    opts = SamplingOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           repetition_penalty=repetition_penalty, stop=tuple(stop or ()), seed=seed, chat=True)
    opts.validate()
    if context < 2:
        raise UsageError(f"--context must be at least 2 tokens (got {context})")
    if max_new_tokens >= context:
        raise UsageError(f"--max-new-tokens {max_new_tokens} leaves no room for the conversation in --context {context}: "
                         "lower -n or raise --context")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1 (got {threads}); leave it out to use the cores other processes leave idle")
    if system is not None and not system.strip():
        raise UsageError("--system is empty: give the system prompt some text, or leave the flag out")
    specs = _read_tools(tools) if tools else []
    ref = resolve(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if not sys.stderr.isatty() or quiet:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # llama.cpp sizes its KV cache to the prompts it is opened for: a stand-in as long as --context (in bytes,
    # at least one token each) sizes it for the whole conversation, once; transformers ignores it
    sizing = SamplingOptions(max_new_tokens=max_new_tokens)
    engine = open_backend(ref, ["x" * max(1, context - max_new_tokens - 16)], sizing, backend, device=device, dtype=dtype,
                          threads=threads, progress=not quiet)
    limit = min(context, engine.window or context)
    session = ChatSession(engine, opts, limit=limit, system=system, tools=specs)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # not on every platform
            pass
    if not quiet:
        print(f"chatting with {ref.name} ({engine.name}, {limit}-token context)" + (": /help for commands, Ctrl-C stops an answer, "
              "Ctrl-D leaves" if interactive else ""), file=sys.stderr, flush=True)
    run(session, show_prompt=show_prompt)


def _read_tools(path: str) -> list[dict[str, Any]]:
    """--tools FILE: OpenAI's `tools` list (or a data row holding one), as the specs the session offers."""
    import json
    from pathlib import Path

    from llmkit.models.tools import tool_spec

    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"--tools {path}: cannot read it ({e.strerror})") from None
    except ValueError as e:
        raise UsageError(f"--tools {path}: not JSON ({e})") from None
    listed = value.get("tools") if isinstance(value, dict) else value
    if not isinstance(listed, list) or not listed:
        raise UsageError(f"--tools {path}: expected a non-empty list of tools, or an object with a \"tools\" list")
    try:
        return [tool_spec(t) for t in listed]
    except (KeyError, TypeError) as e:
        shape = '{"type": "function", "function": {"name": ..., "parameters": {...}}}'
        raise UsageError(f"--tools {path}: a tool without a usable name ({e}); each is {shape}") from None
