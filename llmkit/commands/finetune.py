"""`llmkit finetune`: causal-LM or sequence-classification fine-tuning, full or LoRA, from flags or a recipe."""

from __future__ import annotations

from pathlib import Path

import typer

# Every flag is a recipe key (and every recipe key can be set with --set key=value).
FLAG_KEYS = {
    "model": "model.name", "task": "task", "method": "method", "data": "data.train", "eval_data": "data.eval",
    "out": "out", "epochs": "train.epochs", "max_steps": "train.max_steps", "batch_size": "train.batch_size",
    "grad_accum": "train.grad_accum", "lr": "train.lr", "max_length": "data.max_length", "block_size": "data.block_size",
    "max_train_samples": "data.max_train_samples", "max_eval_samples": "data.max_eval_samples",
    "text_column": "data.text_column", "text_pair_column": "data.text_pair_column",
    "prompt_column": "data.prompt_column", "label_column": "data.label_column",
    "seed": "train.seed", "mixed_precision": "train.mixed_precision", "eval_every": "train.eval_every",
    "save_every": "train.save_every", "threads": "train.threads", "lora_r": "lora.r", "lora_alpha": "lora.alpha",
    "lora_targets": "lora.target_modules", "merge": "lora.merge", "resume": "resume", "overwrite": "overwrite",
    "quiet": "quiet", "allow_pickle": "model.allow_pickle", "trust_remote_code": "model.trust_remote_code",
    "data_format": "data.format", "chat_template": "data.chat_template", "train_on_prompt": "data.train_on_prompt",
    "packing": "data.packing", "fsdp": "train.fsdp", "gradient_checkpointing": "train.gradient_checkpointing",
    "num_proc": "data.num_proc", "rebuild_data": "data.rebuild", "streaming": "data.streaming",
}


def finetune(
    model: str = typer.Option(None, "--model", "-m", help="Base model: alias, folder, .gguf file or Hub id [default: smollm2-135m].", show_default=False),
    task: str = typer.Option(None, "--task", help="causal-lm | seq-cls [default: causal-lm].", show_default=False),
    method: str = typer.Option(None, "--method", help="full | lora | qlora (LoRA on a 4-bit base) [default: full].", show_default=False),
    data: str = typer.Option(None, "--data", "-d", help="Training data: .txt/.csv/.jsonl/.parquet, a folder, or a Hub dataset id.", show_default=False),
    eval_data: str = typer.Option(None, "--eval-data", help="Held-out data, same format (or set data.eval_split).", show_default=False),
    out: str = typer.Option(None, "--out", "-o", help="Output folder (becomes a Hugging Face model folder).", show_default=False),
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
    text_pair_column: str = typer.Option(None, "--text-pair-column", help="Second text column for pair tasks (seq-cls).", show_default=False),
    prompt_column: str = typer.Option(None, "--prompt-column", help="causal-lm: prompt column; only the response is learned.", show_default=False),
    data_format: str = typer.Option(None, "--format", help="auto | text | messages | sharegpt | prompt-completion [default: auto, from the columns].",
                                    show_default=False),
    chat_template: str = typer.Option(None, "--chat-template", help="Chat data: chatml or a .jinja file [default: the model's own].", show_default=False),
    train_on_prompt: bool = typer.Option(None, "--train-on-prompt", help="Chat data: learn every token, not only the replies.", show_default=False),
    packing: bool = typer.Option(None, "--packing", help="Chat / prompt-response data: several conversations per --block-size row.",
                                 show_default=False),
    label_column: str = typer.Option(None, "--label-column", help="Label column for seq-cls [default: label].", show_default=False),
    seed: int = typer.Option(None, "--seed", help="Seed for init, dropout and data order [default: 0].", show_default=False),
    mixed_precision: str = typer.Option(None, "--mixed-precision", help="auto | no | bf16 | fp16 [default: auto, bf16 if fast here].", show_default=False),
    eval_every: int = typer.Option(None, "--eval-every", help="Evaluate every N steps [default: each epoch].", show_default=False),
    save_every: int = typer.Option(None, "--save-every", help="Checkpoint every N steps [default: each epoch].", show_default=False),
    threads: int = typer.Option(None, "--threads", help="CPU threads [default: physical cores / processes].", show_default=False),
    lora_r: int = typer.Option(None, "--lora-r", help="LoRA rank [default: 8].", show_default=False),
    lora_alpha: int = typer.Option(None, "--lora-alpha", help="LoRA alpha [default: 16].", show_default=False),
    lora_targets: str = typer.Option(None, "--lora-targets", help="Module names, comma-separated, or all-linear "
                                      "[default: all-linear for causal LMs, attention for classifiers].", show_default=False),
    merge: bool = typer.Option(None, "--merge", help="LoRA: save a merged full model instead of the adapter.", show_default=False),
    fsdp: bool = typer.Option(None, "--fsdp", help="Shard weights, gradients and optimizer state across processes (torchrun).",
                              show_default=False),
    gradient_checkpointing: bool = typer.Option(None, "--gradient-checkpointing", help="Recompute activations in backward: "
                                                "far less memory, ~1/3 more compute.", show_default=False),
    estimate_memory: bool = typer.Option(False, "--estimate-memory", help="Print the memory this run needs per process, and "
                                         "what would make it fit, then exit."),
    resume: bool = typer.Option(None, "--resume", help="Continue the run in --out from its newest complete checkpoint.", show_default=False),
    overwrite: bool = typer.Option(None, "--overwrite", help="Replace an existing --out folder.", show_default=False),
    recipe: Path = typer.Option(None, "--recipe", "-r", help="YAML recipe (see recipes/); flags and --set override it.", show_default=False),
    set_: list[str] = typer.Option(None, "--set", help="Override any recipe key: --set train.warmup_ratio=0.1 (repeatable).", show_default=False),
    num_proc: int = typer.Option(None, "--num-proc", help="Processes that tokenize the data [default: 0 = the cores].", show_default=False),
    rebuild_data: bool = typer.Option(None, "--rebuild-data", help="Tokenize the data again instead of using llmkit's prepared-data cache.",
                                      show_default=False),
    streaming: bool = typer.Option(None, "--streaming", help="Tokenize and pack while training, never all the data at once "
                                   "(needs --max-steps; --resume continues the stream).", show_default=False),
    quiet: bool = typer.Option(None, "--quiet", "-q", help="No progress bar or messages.", show_default=False),
    allow_pickle: bool = typer.Option(None, "--allow-pickle", help="Allow pickle (.bin/.pt) weights: they can run code.", show_default=False),
    trust_remote_code: bool = typer.Option(None, "--trust-remote-code", help="Run Python code shipped with the model.", show_default=False),
) -> None:
    """Fine-tune a model on your data; the output folder loads with transformers / peft.

    Examples (offline, bundled models):

      llmkit finetune --model minilm-l6 --task seq-cls --method lora --data train.csv --eval-data val.csv --out runs/sentiment

      llmkit finetune --recipe recipes/smollm2-135m-shakespeare-lora.yaml --set train.max_steps=30 --out runs/shakespeare

      llmkit finetune --model smollm2-135m --method lora --data chat.jsonl --packing --out runs/chat   # {"messages": [...]} rows

      torchrun --nproc_per_node 2 -m llmkit finetune --recipe recipes/minilm-l6-sentiment-full.yaml --out runs/ddp

      torchrun --nproc_per_node 2 -m llmkit finetune --model smollm2-135m --data train.txt --fsdp --out runs/fsdp

      llmkit finetune --model smollm2-135m --method qlora --batch-size 32 --estimate-memory
    """
    from llmkit.config import load_recipe
    from llmkit.finetune import finetune as run

    given = dict(locals())
    flags = {FLAG_KEYS[k]: v for k, v in given.items() if k in FLAG_KEYS and v is not None}
    if lora_targets is not None:
        flags["lora.target_modules"] = [t.strip() for t in lora_targets.split(",") if t.strip()]
    cfg = load_recipe(recipe, set_ or [], flags)
    if estimate_memory:
        from llmkit.memory import estimate_run

        typer.echo(estimate_run(cfg))
        return
    out_dir = run(cfg)
    if not cfg.quiet:
        typer.echo(f"saved to {out_dir}")
