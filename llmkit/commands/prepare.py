"""`llmkit prepare`: tokenize a data set once into llmkit's cache, ahead of `finetune` / `distill`."""

from __future__ import annotations

from pathlib import Path

import typer

from llmkit.commands import options as o

FLAG_KEYS = {**o.DATA_KEYS, **o.model_keys("model"), "model": "model.name"}


def prepare(
    model: str = typer.Option(None, "--model", "-m", help="The model whose tokenizer (and chat template) is used [default: smollm2-135m].",
                              show_default=False),
    task: str = o.TASK,
    data: str = o.DATA,
    eval_data: str = typer.Option(None, "--eval-data", help="Held-out data, same format.", show_default=False),
    max_length: int = o.MAX_LENGTH,
    block_size: int = o.BLOCK_SIZE,
    max_train_samples: int = o.MAX_TRAIN_SAMPLES,
    max_eval_samples: int = o.MAX_EVAL_SAMPLES,
    text_column: str = o.TEXT_COLUMN,
    text_pair_column: str = o.TEXT_PAIR_COLUMN,
    prompt_column: str = o.PROMPT_COLUMN,
    label_column: str = o.LABEL_COLUMN,
    data_format: str = o.DATA_FORMAT,
    chat_template: str = o.CHAT_TEMPLATE,
    train_on_prompt: bool = o.TRAIN_ON_PROMPT,
    packing: bool = o.PACKING,
    num_proc: int = o.NUM_PROC,
    rebuild_data: bool = o.REBUILD_DATA,
    recipe: Path = o.RECIPE,
    set_: list[str] = typer.Option(None, "--set", help="Override any recipe key, e.g. --set data.block_size=512 (repeatable).", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
    quiet: bool = o.QUIET,
    allow_pickle: bool = typer.Option(None, "--allow-pickle", help="Allow pickle (.bin/.pt) tokenizer/model files: they can run code.",
                                      show_default=False),
    trust_remote_code: bool = typer.Option(None, "--trust-remote-code", help="Run Python code shipped with the model.", show_default=False),
) -> None:
    """Tokenize (and pack) a data set into llmkit's prepared-data cache, and report rows, tokens, dropped rows and time.

    `llmkit finetune` with the same model and data flags then starts training within seconds; it prepares the data
    itself when this was not run. The cache is in $LLMKIT_CACHE/data (~/.cache/llmkit/data).

    Examples:

      llmkit prepare --model smollm2-135m --data corpus.txt --block-size 256

      llmkit prepare --model smollm2-135m --data chat.jsonl --packing --block-size 1024 --json

      llmkit prepare --recipe recipes/smollm2-135m-shakespeare-lora.yaml
    """
    import json

    from llmkit.data.prepare import describe, prepare_command

    cfg = o.load(recipe, set_, o.recipe_flags(dict(locals()), FLAG_KEYS))
    report = prepare_command(cfg)
    typer.echo(json.dumps(report) if as_json else describe(report, cfg))
