"""`llmkit models`: what `--model` can take on this machine right now."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def models(
    dirs: list[Path] = typer.Option(None, "--dir", help="Also look for model folders and .gguf files here (repeatable) [default: .].", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per model, for scripts."),
) -> None:
    """List bundled aliases, models in the Hugging Face cache, llmkit runs and model folders / .gguf files nearby.

    Examples:

        llmkit models

        llmkit models --dir runs --json
    """
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
