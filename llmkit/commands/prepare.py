"""`llmkit prepare`: tokenize a data set once into llmkit's cache, ahead of `finetune` / `distill`."""

from __future__ import annotations

from pathlib import Path

import typer

FLAG_KEYS = {
    "model": "model.name", "task": "task", "data": "data.train", "eval_data": "data.eval", "max_length": "data.max_length",
    "block_size": "data.block_size", "max_train_samples": "data.max_train_samples", "max_eval_samples": "data.max_eval_samples",
    "text_column": "data.text_column", "text_pair_column": "data.text_pair_column", "prompt_column": "data.prompt_column",
    "label_column": "data.label_column", "data_format": "data.format", "chat_template": "data.chat_template",
    "train_on_prompt": "data.train_on_prompt", "packing": "data.packing", "num_proc": "data.num_proc", "rebuild_data": "data.rebuild",
    "quiet": "quiet", "allow_pickle": "model.allow_pickle", "trust_remote_code": "model.trust_remote_code",
}


def prepare(
    model: str = typer.Option(None, "--model", "-m", help="The model whose tokenizer (and chat template) is used [default: smollm2-135m].",
                              show_default=False),
    task: str = typer.Option(None, "--task", help="causal-lm | seq-cls [default: causal-lm].", show_default=False),
    data: str = typer.Option(None, "--data", "-d", help="Training data: .txt/.csv/.jsonl/.parquet, a folder, or a Hub dataset id.", show_default=False),
    eval_data: str = typer.Option(None, "--eval-data", help="Held-out data, same format.", show_default=False),
    max_length: int = typer.Option(None, "--max-length", help="seq-cls: truncate inputs to this many tokens [default: 128].", show_default=False),
    block_size: int = typer.Option(None, "--block-size", help="causal-lm: tokens per packed block [default: 256].", show_default=False),
    max_train_samples: int = typer.Option(None, "--max-train-samples", help="Only the first N training examples [default: 0 = all].",
                                         show_default=False),
    max_eval_samples: int = typer.Option(None, "--max-eval-samples", help="Only the first N held-out examples [default: 0 = all].",
                                        show_default=False),
    text_column: str = typer.Option(None, "--text-column", help="Text column of CSV/JSONL data [default: text].", show_default=False),
    text_pair_column: str = typer.Option(None, "--text-pair-column", help="Second text column for pair tasks (seq-cls).", show_default=False),
    prompt_column: str = typer.Option(None, "--prompt-column", help="causal-lm: prompt column; only the response is learned.", show_default=False),
    label_column: str = typer.Option(None, "--label-column", help="Label column for seq-cls [default: label].", show_default=False),
    data_format: str = typer.Option(None, "--format", help="auto | text | messages | sharegpt | prompt-completion [default: auto].",
                                    show_default=False),
    chat_template: str = typer.Option(None, "--chat-template", help="Chat data: chatml or a .jinja file [default: the model's own].", show_default=False),
    train_on_prompt: bool = typer.Option(None, "--train-on-prompt", help="Chat data: learn every token, not only the replies.", show_default=False),
    packing: bool = typer.Option(None, "--packing", help="Chat / prompt-response data: several conversations per --block-size row.",
                                 show_default=False),
    num_proc: int = typer.Option(None, "--num-proc", help="Processes that tokenize the data [default: 0 = the cores].", show_default=False),
    rebuild_data: bool = typer.Option(None, "--rebuild-data", help="Build again even when the cache has this data.", show_default=False),
    recipe: Path = typer.Option(None, "--recipe", "-r", help="YAML recipe: prepare the data it trains on.", show_default=False),
    set_: list[str] = typer.Option(None, "--set", help="Override any recipe key, e.g. --set data.block_size=512 (repeatable).", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
    quiet: bool = typer.Option(None, "--quiet", "-q", help="No progress bar or messages.", show_default=False),
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

    from llmkit.config import load_recipe
    from llmkit.prepare import describe, prepare_command

    given = dict(locals())
    flags = {FLAG_KEYS[k]: v for k, v in given.items() if k in FLAG_KEYS and v is not None}
    cfg = load_recipe(recipe, set_ or [], flags)
    report = prepare_command(cfg)
    typer.echo(json.dumps(report) if as_json else describe(report, cfg))
