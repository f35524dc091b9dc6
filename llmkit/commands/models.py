"""`llmkit models`: what `--model` can take on this machine right now."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def models(
    dirs: list[Path] = typer.Option(None, "--dir", help="Also look for model folders and .gguf files here (repeatable) [default: .].", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per model, for scripts."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="Write this model's HF tokenizer to --out (for lm-eval).", show_default=False),
    out: Path = typer.Option(None, "--out", help="With --tokenizer: the folder to write it to.", show_default=False),
) -> None:
    """List bundled aliases, models in the Hugging Face cache, llmkit runs and model folders / .gguf files nearby.

    Examples:

        llmkit models

        llmkit models --dir runs --json

        llmkit models --tokenizer smollm2-135m --out smollm2-tokenizer   # what lm-eval's tokenizer= takes
    """
    if tokenizer is not None or out is not None:
        write_tokenizer(tokenizer, out)
        return
    from llmkit.models.catalog import list_models

    rows = list_models(list(dirs) if dirs else None)
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        mark = "ok " if r["available"] else "-- "
        detail = r["note"] if r["source"] in ("alias", "run") or not r["available"] else r["path"]
        print(f"{mark}{r['name']:<{width}}  {r['source']:<9}  {r['task'] or '':<14} {detail}")
    typer.echo("\nUse any name above with --model; Hub ids (e.g. openai-community/gpt2) work wherever the Hub is reachable.", err=True)


def write_tokenizer(model: str | None, out: Path | None) -> None:
    """Save the tokenizer llmkit uses for `model` (a GGUF's included) as an HF tokenizer folder: clients that count
    tokens themselves (lm-evaluation-harness's local-completions) then count exactly what `llmkit serve` counts."""
    from llmkit.errors import UsageError
    from llmkit.models.load import load_tokenizer
    from llmkit.models.refs import resolve

    if model is None or out is None:
        raise UsageError("--tokenizer MODEL and --out FOLDER go together")
    load_tokenizer(resolve(model)).save_pretrained(out)
    typer.echo(f"wrote the tokenizer of {model} to {out}", err=True)
