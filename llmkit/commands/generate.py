"""`llmkit generate`: text from a causal LM, streamed to the terminal or as JSON lines for scripts."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import typer

from llmkit.errors import UsageError

DEFAULT_MODEL = "smollm2-135m"  # llmkit.models.refs.DEFAULT_CAUSAL_LM, repeated so --help imports nothing heavy


def read_prompts(prompts: list[str], prompts_file: Path | None) -> list[str]:
    """Prompts from arguments, a file (one per line; `-` is stdin), or piped stdin; none may be empty."""
    found = list(prompts)
    source = "arguments"
    if prompts_file is not None:
        source = str(prompts_file)
        try:
            text = sys.stdin.read() if str(prompts_file) == "-" else prompts_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"--prompts-file {prompts_file} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read --prompts-file {prompts_file}: {e}") from None
        found += [line for line in text.splitlines() if line.strip()]
        if not found:
            raise UsageError(f"--prompts-file {prompts_file} holds no prompts (one per line, blank lines skipped)")
    elif not found and not sys.stdin.isatty():
        source = "stdin"
        found = [line for line in sys.stdin.read().splitlines() if line.strip()]
    if not found:
        raise UsageError(f"no prompt given (from {source}): pass PROMPT, --prompts-file FILE, or pipe prompts on stdin")
    for i, prompt in enumerate(found, 1):
        if not prompt.strip():
            raise UsageError(f"prompt {i} is empty: give the model some text to continue")
    return found


def generate(
    prompts: list[str] = typer.Argument(None, help="Prompt(s) to continue. Also: --prompts-file, or stdin.", show_default=False),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Alias, model folder, .gguf file or Hub id (see `llmkit models`)."),
    prompts_file: Path = typer.Option(None, "--prompts-file", "-f", help="File with one prompt per line ('-' = stdin).", show_default=False),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="Tokens to generate per continuation."),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="0 = greedy; higher = more random."),
    top_k: int = typer.Option(50, "--top-k", help="Sample from the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling mass (1 = off)."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help=">1 discourages repeats (1 = off)."),
    num_return_sequences: int = typer.Option(1, "--num-return-sequences", help="Continuations per prompt."),
    stop: list[str] = typer.Option(None, "--stop", help="Stop at this string (repeatable); it is not printed.", show_default=False),
    seed: int = typer.Option(None, "--seed", help="Same seed, same output.", show_default=False),
    chat: bool = typer.Option(False, "--chat", help="Wrap each prompt in the model's chat template (instruct models)."),
    system: str = typer.Option(None, "--system", help="With --chat: a system message before each prompt.", show_default=False),
    stream: bool = typer.Option(None, "--stream/--no-stream", help="Print tokens as they come [default: on a terminal].", show_default=False),
    backend: str = typer.Option("auto", "--backend", help="auto | transformers | llama.cpp (auto: llama.cpp for .gguf)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per continuation, for scripts."),
    device: str = typer.Option(None, "--device", help="transformers backend: cpu, cuda, cuda:1, mps [default: best available].", show_default=False),
    dtype: str = typer.Option("auto", "--dtype", help="transformers backend: auto | float32 | bfloat16 | float16."),
    batch_size: int = typer.Option(8, "--batch-size", help="transformers backend: prompts per batch when not streaming."),
    threads: int = typer.Option(None, "--threads", help="CPU threads [default: the cores other processes leave idle].", show_default=False),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle weights (.bin/.pt): they can run code. Only for sources you trust."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow a model's own Python code (auto_map). Only for sources you trust."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or speed summary on stderr."),
    json_schema: Path = typer.Option(None, "--json-schema", help="Answer only JSON valid against this JSON Schema file.", show_default=False),
    grammar: Path = typer.Option(None, "--grammar", help="Answer only text this GBNF grammar file (root rule `root`) accepts.", show_default=False),
) -> None:
    """Continue text with a causal language model.

    Examples:

        llmkit generate "Once upon a time"

        llmkit generate "Once upon a time" --temperature 0 --max-new-tokens 64

        llmkit generate "What is the capital of France?" --chat --stop "\\n\\n"

        llmkit generate "Review: a gorgeous, moving film. Positive or negative?" --chat --system "Answer in one word."

        llmkit generate --prompts-file prompts.txt --json --seed 1 > out.jsonl

        llmkit generate "A person as JSON." --chat --json-schema person.schema.json -t 0

        llmkit generate "Hello" --model openai-community/gpt2   # wherever the Hub is reachable
    """
    from llmkit.inference.backends import open_backend
    from llmkit.inference.sampling import Generation, SamplingOptions
    from llmkit.models.refs import resolve

    opts = SamplingOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           repetition_penalty=repetition_penalty, num_return_sequences=num_return_sequences,
                           stop=tuple(stop or ()), seed=seed, chat=chat, system=system,
                           constraint=read_constraint(json_schema, grammar))
    opts.validate()
    if system is not None and not chat:
        raise UsageError("--system only applies to chat prompts: add --chat")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1 (got {threads}); leave it out to use the cores other processes leave idle")
    texts = read_prompts(prompts or [], prompts_file)
    ref = resolve(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    show_progress = not quiet
    if not sys.stderr.isatty() or quiet:  # read by huggingface_hub (Hub downloads) when it is imported
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    streaming = (sys.stdout.isatty() if stream is None else stream) and not as_json

    engine = open_backend(ref, texts, opts, backend, device=device, dtype=dtype, batch_size=batch_size, threads=threads,
                          progress=show_progress)
    queue = [p for p in texts for _ in range(opts.num_return_sequences)]  # the order outputs arrive in
    done: list[Generation] = []
    opened = False  # has the current continuation's header been printed?

    def open_text(prompt: str) -> None:
        nonlocal opened
        if done:
            sys.stdout.write("-" * 40 + "\n")
        # Completion-style output reads best as prompt + continuation; a chat answer stands on its own.
        sys.stdout.write("" if opts.chat else prompt)
        opened = True

    def on_text(index: int, text: str) -> None:
        if not opened:
            open_text(queue[len(done)])
        sys.stdout.write(text)
        sys.stdout.flush()

    from llmkit.progress import bar as progress_bar

    bar = progress_bar(len(queue), "generating", "text", enabled=show_progress and not streaming and len(queue) > 1)
    started = time.perf_counter()
    for gen in engine.generate(texts, opts, on_text if streaming else None):
        if as_json:
            print(json.dumps(gen.to_json(), ensure_ascii=False))
        else:
            if not opened:
                open_text(gen.prompt)
                if not streaming:
                    sys.stdout.write(gen.text)
            sys.stdout.write("\n")
            opened = False
        sys.stdout.flush()
        done.append(gen)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if not quiet:  # on stderr, so it never mixes into --json output
        tokens = sum(g.new_tokens for g in done)
        seconds = time.perf_counter() - started  # wall time: batched texts share their seconds
        print(f"[{tokens} tokens in {seconds:.2f} s, {tokens / seconds:.1f} tokens/s, {engine.name}, {ref.name}]",
              file=sys.stderr)


def read_constraint(json_schema: Path | None, grammar: Path | None) -> Any:
    """--json-schema / --grammar as a Constraint (None without either); a bad file is a one-line UsageError."""
    from llmkit.inference.constraints import check, gbnf
    from llmkit.inference.constraints import json_schema as schema_constraint

    if json_schema is not None and grammar is not None:
        raise UsageError("--json-schema and --grammar exclude each other: give one")
    path = json_schema or grammar
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    constraint = schema_constraint(text) if json_schema is not None else gbnf(text)
    try:
        check(constraint)
    except UsageError as e:
        raise UsageError(f"{'--json-schema' if json_schema is not None else '--grammar'} {path}: {e}") from None
    return constraint
