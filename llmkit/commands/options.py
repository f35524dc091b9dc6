"""The options `finetune`, `distill` and `prepare` share, declared once, and the recipe key each one sets.

Every such flag is a recipe key (and every recipe key can be set with --set key=value); `recipe_flags` turns a
command's given options into the overrides `load_recipe` applies over the recipe, so a flag wins over the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def _opt(*names: str, help: str) -> Any:
    # default None = "not given": the recipe's value (or the dataclass default) stays
    return typer.Option(None, *names, help=help, show_default=False)


# ---- data (finetune, distill, prepare)
TASK = _opt("--task", help="causal-lm | seq-cls [default: causal-lm].")
DATA = _opt("--data", "-d", help="Training data: .txt/.csv/.jsonl/.parquet, a folder, or a Hub dataset id.")
MAX_LENGTH = _opt("--max-length", help="seq-cls: truncate inputs to this many tokens [default: 128].")
BLOCK_SIZE = _opt("--block-size", help="causal-lm: tokens per packed block [default: 256].")
MAX_TRAIN_SAMPLES = _opt("--max-train-samples", help="Only the first N training examples, for a quick trial [default: 0 = all].")
MAX_EVAL_SAMPLES = _opt("--max-eval-samples", help="Only the first N held-out examples [default: 0 = all].")
TEXT_COLUMN = _opt("--text-column", help="Text column of CSV/JSONL data [default: text].")
TEXT_PAIR_COLUMN = _opt("--text-pair-column", help="Second text column for pair tasks (seq-cls).")
PROMPT_COLUMN = _opt("--prompt-column", help="causal-lm: prompt column; only the response is learned.")
LABEL_COLUMN = _opt("--label-column", help="Label column for seq-cls [default: label].")
DATA_FORMAT = _opt("--format", help="auto | text | messages | sharegpt | prompt-completion | preference [default: auto, from the columns].")
CHAT_TEMPLATE = _opt("--chat-template", help="Chat data: chatml or a .jinja file [default: the model's own].")
TRAIN_ON_PROMPT = _opt("--train-on-prompt", help="Chat data: learn every token, not only the replies.")
PACKING = _opt("--packing", help="Chat / prompt-response data: several conversations per --block-size row.")
NUM_PROC = _opt("--num-proc", help="Processes that tokenize the data [default: 0 = the cores].")
REBUILD_DATA = _opt("--rebuild-data", help="Tokenize the data again instead of using llmkit's prepared-data cache.")

# ---- training (finetune, distill)
EPOCHS = _opt("--epochs", help="Passes over the data [default: 1].")
MAX_STEPS = _opt("--max-steps", help="Optimizer steps (overrides --epochs).")
BATCH_SIZE = _opt("--batch-size", help="Examples per device per micro-batch [default: 8].")
GRAD_ACCUM = _opt("--grad-accum", help="Micro-batches per optimizer step [default: 1].")
LR = _opt("--lr", help="Peak learning rate [default: 5e-5; 3e-4 for --objective grpo with LoRA].")
SEED = _opt("--seed", help="Seed for init, dropout and data order [default: 0].")
MIXED_PRECISION = _opt("--mixed-precision", help="auto | no | bf16 | fp16 [default: auto, bf16 if fast here].")
EVAL_EVERY = _opt("--eval-every", help="Evaluate every N steps [default: each epoch].")
SAVE_EVERY = _opt("--save-every", help="Checkpoint every N steps [default: each epoch].")
THREADS = _opt("--threads", help="CPU threads [default: physical cores / processes].")
COMPILE = _opt("--compile", help="torch.compile each transformer block: the first step compiles, later steps may be faster.")
GRADIENT_CHECKPOINTING = _opt("--gradient-checkpointing", help="Recompute activations in backward: far less memory, ~1/3 more compute.")
REPORT_TO = _opt("--report-to", help="Also log to an experiment tracker: none | tensorboard | mlflow | wandb | trackio "
                 "(repeatable; pip install 'llmkit[track]'); logs under OUT/tracking/ [default: none].")
RESUME = _opt("--resume", help="Continue the run in --out from its newest complete checkpoint.")
OVERWRITE = _opt("--overwrite", help="Replace an existing --out folder.")

# ---- every recipe-driven command
RECIPE: Any = _opt("--recipe", "-r", help="YAML recipe (see recipes/); flags and --set override it.")
SET = _opt("--set", help="Override any recipe key: --set train.warmup_ratio=0.1 (repeatable).")
QUIET = _opt("--quiet", "-q", help="No progress bar or messages.")

DATA_KEYS = {
    "task": "task", "data": "data.train", "eval_data": "data.eval", "max_length": "data.max_length", "block_size": "data.block_size",
    "max_train_samples": "data.max_train_samples", "max_eval_samples": "data.max_eval_samples", "text_column": "data.text_column",
    "text_pair_column": "data.text_pair_column", "prompt_column": "data.prompt_column", "label_column": "data.label_column",
    "data_format": "data.format", "chat_template": "data.chat_template", "train_on_prompt": "data.train_on_prompt",
    "packing": "data.packing", "num_proc": "data.num_proc", "rebuild_data": "data.rebuild", "quiet": "quiet",
}
TRAIN_KEYS = {
    **DATA_KEYS, "out": "out", "epochs": "train.epochs", "max_steps": "train.max_steps", "batch_size": "train.batch_size",
    "grad_accum": "train.grad_accum", "lr": "train.lr", "seed": "train.seed", "mixed_precision": "train.mixed_precision",
    "eval_every": "train.eval_every", "save_every": "train.save_every", "threads": "train.threads",
    "gradient_checkpointing": "train.gradient_checkpointing", "compile_": "train.compile", "report_to": "train.report_to", "resume": "resume",
    "overwrite": "overwrite",
}


def model_keys(section: str) -> dict[str, str]:
    """The flags that name the starting model: `--model` in finetune / prepare, `--teacher` in distill."""
    return {"allow_pickle": f"{section}.allow_pickle", "trust_remote_code": f"{section}.trust_remote_code"}


def recipe_flags(given: dict[str, Any], keys: dict[str, str]) -> dict[str, Any]:
    """{recipe key: value} for every option the user gave (None = not given)."""
    return {keys[k]: v for k, v in given.items() if k in keys and v is not None}


def load(recipe: Path | None, sets: list[str] | None, flags: dict[str, Any], cls: Any = None) -> Any:
    """The run's config: the recipe (or the defaults), then the flags, then --set."""
    from llmkit.config import FinetuneConfig, load_recipe

    return load_recipe(recipe, sets or [], flags, cls=cls or FinetuneConfig)
