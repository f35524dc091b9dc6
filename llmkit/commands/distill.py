"""`llmkit distill`: a smaller student trained on a teacher's output distribution."""

from __future__ import annotations

from pathlib import Path

import typer

from llmkit.commands import options as o

FLAG_KEYS = {**o.TRAIN_KEYS, **o.model_keys("teacher"), "teacher": "teacher.name", "student_layers": "student.layers",
             "layer_selection": "student.layer_selection", "student_config": "student.config", "temperature": "distill.temperature",
             "alpha": "distill.alpha", "hidden_weight": "distill.hidden_weight", "cache_top_k": "distill.cache_top_k"}


def distill(
    teacher: str = typer.Option(None, "--teacher", help="Teacher: alias, folder (a finetune output, LoRA or merged), .gguf, Hub id.", show_default=False),
    task: str = o.TASK,
    data: str = o.DATA,
    eval_data: str = typer.Option(None, "--eval-data", help="Held-out data: teacher and student are both measured on it.", show_default=False),
    out: str = typer.Option(None, "--out", "-o", help="Output folder for the student (a Hugging Face model folder).", show_default=False),
    student_layers: int = typer.Option(None, "--student-layers", help="Keep N of the teacher's layers [default: half].", show_default=False),
    layer_selection: str = typer.Option(None, "--layer-selection", help="importance (drop the layer that changes the hidden states least, "
                                        "re-measure, repeat) | even (evenly spaced, first and last kept) | auto: importance for causal LMs, "
                                        "even for classifiers (importance drops an encoder's first layer, which the rest need) [default: auto].",
                                        show_default=False),
    student_config: str = typer.Option(None, "--student-config", help="Student from a config.json or model folder (same tokenizer).", show_default=False),
    temperature: float = typer.Option(None, "--temperature", help="Softmax temperature T [default: 2.0].", show_default=False),
    alpha: float = typer.Option(None, "--alpha", help="Weight of the KD term; 1 - alpha goes to the label loss [default: 0.5].", show_default=False),
    hidden_weight: float = typer.Option(None, "--hidden-weight", help="Weight of the hidden-state cosine loss [default: 0].", show_default=False),
    cache_top_k: int = typer.Option(None, "--cache-top-k", help="Cache top-k teacher logits on disk, reuse them [default: 0 = off].", show_default=False),
    epochs: float = o.EPOCHS,
    max_steps: int = o.MAX_STEPS,
    batch_size: int = o.BATCH_SIZE,
    grad_accum: int = o.GRAD_ACCUM,
    lr: float = o.LR,
    max_length: int = o.MAX_LENGTH,
    block_size: int = o.BLOCK_SIZE,
    max_train_samples: int = o.MAX_TRAIN_SAMPLES,
    max_eval_samples: int = o.MAX_EVAL_SAMPLES,
    text_column: str = o.TEXT_COLUMN,
    label_column: str = o.LABEL_COLUMN,
    seed: int = o.SEED,
    mixed_precision: str = o.MIXED_PRECISION,
    eval_every: int = o.EVAL_EVERY,
    save_every: int = o.SAVE_EVERY,
    threads: int = o.THREADS,
    gradient_checkpointing: bool = o.GRADIENT_CHECKPOINTING,
    compile_: bool = o.COMPILE,
    report_to: list[str] = o.REPORT_TO,
    resume: bool = o.RESUME,
    overwrite: bool = o.OVERWRITE,
    recipe: Path = o.RECIPE,
    set_: list[str] = o.SET,
    num_proc: int = o.NUM_PROC,
    rebuild_data: bool = o.REBUILD_DATA,
    quiet: bool = o.QUIET,
    allow_pickle: bool = typer.Option(None, "--allow-pickle", help="Allow a pickle (.bin/.pt) teacher: it can run code.", show_default=False),
    trust_remote_code: bool = typer.Option(None, "--trust-remote-code", help="Run Python code shipped with the teacher.", show_default=False),
) -> None:
    """Distill a teacher into a smaller, faster student; writes the student folder and distill_report.json.

    Examples (offline, bundled models):

      llmkit finetune --recipe recipes/minilm-l6-sentiment-full.yaml --out runs/minilm-sentiment

      llmkit distill --teacher runs/minilm-sentiment --task seq-cls --data train.csv --eval-data val.csv --student-layers 3 --out runs/minilm-3l

      llmkit distill --recipe recipes/distill-smollm2-135m-shakespeare.yaml --set train.max_steps=20 --out runs/smollm2-15l
    """
    from llmkit.config import DistillConfig
    from llmkit.distill import distill as run

    cfg = o.load(recipe, set_, o.recipe_flags(dict(locals()), FLAG_KEYS), cls=DistillConfig)
    out_dir = run(cfg)
    if not cfg.quiet:
        typer.echo(f"saved to {out_dir} (teacher vs student: {out_dir / 'distill_report.json'})")
