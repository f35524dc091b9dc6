"""`llmkit distill`: a smaller student trained on a teacher's output distribution."""

from __future__ import annotations

from pathlib import Path

import typer

# Every flag is a recipe key (and every recipe key can be set with --set key=value).
FLAG_KEYS = {
    "teacher": "teacher.name", "task": "task", "data": "data.train", "eval_data": "data.eval", "out": "out",
    "student_layers": "student.layers", "layer_selection": "student.layer_selection", "student_config": "student.config", "temperature": "distill.temperature",
    "alpha": "distill.alpha", "hidden_weight": "distill.hidden_weight", "cache_top_k": "distill.cache_top_k",
    "epochs": "train.epochs", "max_steps": "train.max_steps", "batch_size": "train.batch_size", "grad_accum": "train.grad_accum",
    "lr": "train.lr", "max_length": "data.max_length", "block_size": "data.block_size", "max_train_samples": "data.max_train_samples",
    "max_eval_samples": "data.max_eval_samples", "text_column": "data.text_column",
    "label_column": "data.label_column", "seed": "train.seed", "mixed_precision": "train.mixed_precision",
    "eval_every": "train.eval_every", "save_every": "train.save_every", "threads": "train.threads", "resume": "resume",
    "gradient_checkpointing": "train.gradient_checkpointing", "overwrite": "overwrite", "quiet": "quiet",
    "num_proc": "data.num_proc", "rebuild_data": "data.rebuild",
    "allow_pickle": "teacher.allow_pickle", "trust_remote_code": "teacher.trust_remote_code",
}


def distill(
    teacher: str = typer.Option(None, "--teacher", help="Teacher: alias, folder (a finetune output, LoRA or merged), .gguf, Hub id.", show_default=False),
    task: str = typer.Option(None, "--task", help="causal-lm | seq-cls [default: causal-lm].", show_default=False),
    data: str = typer.Option(None, "--data", "-d", help="Training data: .txt/.csv/.jsonl/.parquet, a folder, or a Hub dataset id.", show_default=False),
    eval_data: str = typer.Option(None, "--eval-data", help="Held-out data: teacher and student are both measured on it.", show_default=False),
    out: str = typer.Option(None, "--out", "-o", help="Output folder for the student (a Hugging Face model folder).", show_default=False),
    student_layers: int = typer.Option(None, "--student-layers", help="Keep N of the teacher's layers [default: half].", show_default=False),
    layer_selection: str = typer.Option(None, "--layer-selection", help="importance (drop the layer that changes the hidden states least, "
                                        "re-measure, repeat) | even (evenly spaced) [default: importance].", show_default=False),
    student_config: str = typer.Option(None, "--student-config", help="Student from a config.json or model folder (same tokenizer).", show_default=False),
    temperature: float = typer.Option(None, "--temperature", help="Softmax temperature T [default: 2.0].", show_default=False),
    alpha: float = typer.Option(None, "--alpha", help="Weight of the KD term; 1 - alpha goes to the label loss [default: 0.5].", show_default=False),
    hidden_weight: float = typer.Option(None, "--hidden-weight", help="Weight of the hidden-state cosine loss [default: 0].", show_default=False),
    cache_top_k: int = typer.Option(None, "--cache-top-k", help="Cache top-k teacher logits on disk, reuse them [default: 0 = off].", show_default=False),
    epochs: float = typer.Option(None, "--epochs", help="Passes over the data [default: 1].", show_default=False),
    max_steps: int = typer.Option(None, "--max-steps", help="Optimizer steps (overrides --epochs).", show_default=False),
    batch_size: int = typer.Option(None, "--batch-size", help="Examples per device per micro-batch [default: 8].", show_default=False),
    grad_accum: int = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step [default: 1].", show_default=False),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate [default: 5e-5].", show_default=False),
    max_length: int = typer.Option(None, "--max-length", help="seq-cls: truncate inputs to this many tokens [default: 128].", show_default=False),
    block_size: int = typer.Option(None, "--block-size", help="causal-lm: tokens per packed block [default: 256].", show_default=False),
    max_train_samples: int = typer.Option(None, "--max-train-samples", help="Only the first N training examples, for a quick "
                                         "trial [default: 0 = all].", show_default=False),
    max_eval_samples: int = typer.Option(None, "--max-eval-samples", help="Only the first N held-out examples [default: 0 = all].",
                                        show_default=False),
    text_column: str = typer.Option(None, "--text-column", help="Text column of CSV/JSONL data [default: text].", show_default=False),
    label_column: str = typer.Option(None, "--label-column", help="Label column for seq-cls [default: label].", show_default=False),
    seed: int = typer.Option(None, "--seed", help="Seed for init, dropout and data order [default: 0].", show_default=False),
    mixed_precision: str = typer.Option(None, "--mixed-precision", help="auto | no | bf16 | fp16 [default: auto].", show_default=False),
    eval_every: int = typer.Option(None, "--eval-every", help="Evaluate every N steps [default: each epoch].", show_default=False),
    save_every: int = typer.Option(None, "--save-every", help="Checkpoint every N steps [default: each epoch].", show_default=False),
    threads: int = typer.Option(None, "--threads", help="CPU threads [default: physical cores / processes].", show_default=False),
    gradient_checkpointing: bool = typer.Option(None, "--gradient-checkpointing", help="Recompute the student's activations in "
                                                "backward: far less memory, ~1/3 more compute.", show_default=False),
    resume: bool = typer.Option(None, "--resume", help="Continue the run in --out from its newest complete checkpoint.", show_default=False),
    overwrite: bool = typer.Option(None, "--overwrite", help="Replace an existing --out folder.", show_default=False),
    recipe: Path = typer.Option(None, "--recipe", "-r", help="YAML recipe (recipes/distill-*.yaml); flags and --set override it.", show_default=False),
    set_: list[str] = typer.Option(None, "--set", help="Override any recipe key: --set distill.temperature=4 (repeatable).", show_default=False),
    num_proc: int = typer.Option(None, "--num-proc", help="Processes that tokenize the data [default: 0 = the cores].", show_default=False),
    rebuild_data: bool = typer.Option(None, "--rebuild-data", help="Tokenize the data again instead of using llmkit's prepared-data cache.",
                                      show_default=False),
    quiet: bool = typer.Option(None, "--quiet", "-q", help="No progress bar or messages.", show_default=False),
    allow_pickle: bool = typer.Option(None, "--allow-pickle", help="Allow a pickle (.bin/.pt) teacher: it can run code.", show_default=False),
    trust_remote_code: bool = typer.Option(None, "--trust-remote-code", help="Run Python code shipped with the teacher.", show_default=False),
) -> None:
    """Distill a teacher into a smaller, faster student; writes the student folder and distill_report.json.

    Examples (offline, bundled models):

      llmkit finetune --recipe recipes/minilm-l6-sentiment-full.yaml --out runs/minilm-sentiment

      llmkit distill --teacher runs/minilm-sentiment --task seq-cls --data train.csv --eval-data val.csv --student-layers 3 --out runs/minilm-3l

      llmkit distill --recipe recipes/distill-smollm2-135m-shakespeare.yaml --set train.max_steps=20 --out runs/smollm2-15l
    """
    from llmkit.config import DistillConfig, load_recipe
    from llmkit.distill import distill as run

    given = dict(locals())
    flags = {FLAG_KEYS[k]: v for k, v in given.items() if k in FLAG_KEYS and v is not None}
    cfg = load_recipe(recipe, set_ or [], flags, cls=DistillConfig)
    out_dir = run(cfg)
    if not cfg.quiet:
        typer.echo(f"saved to {out_dir} (teacher vs student: {out_dir / 'distill_report.json'})")
