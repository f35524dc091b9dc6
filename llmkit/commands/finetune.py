"""`llmkit finetune`: causal-LM or sequence-classification fine-tuning, full or LoRA, from flags or a recipe."""

from __future__ import annotations

from pathlib import Path

import typer

from llmkit.commands import options as o

FLAG_KEYS = {**o.TRAIN_KEYS, **o.model_keys("model"), "model": "model.name", "method": "method", "lora_r": "lora.r",
             "lora_alpha": "lora.alpha", "lora_targets": "lora.target_modules", "merge": "lora.merge", "fsdp": "train.fsdp",
             "streaming": "data.streaming", "objective": "objective", "beta": "preference.beta", "sft_weight": "preference.sft_weight",
             "reward": "rl.rewards", "reward_weights": "rl.reward_weights", "num_generations": "rl.num_generations",
             "max_new_tokens": "rl.max_new_tokens", "rollout_backend": "rl.rollout_backend"}


def finetune(
    model: str = typer.Option(None, "--model", "-m", help="Base model: alias, folder, .gguf file or Hub id [default: smollm2-135m].", show_default=False),
    task: str = o.TASK,
    method: str = typer.Option(None, "--method", help="full | lora | qlora (LoRA on a 4-bit base) [default: full].", show_default=False),
    data: str = o.DATA,
    objective: str = typer.Option(None, "--objective", help="sft (next-token loss) | dpo | ipo | simpo | orpo (on prompt/chosen/"
                                  "rejected pairs) | grpo (on prompts, learning from --reward) [default: sft].", show_default=False),
    reward: list[str] = typer.Option(None, "--reward", help="grpo: exact:COLUMN | contains:COLUMN | regex:PATTERN | json[:schema.json] | "
                                     "length:max=N | file.py:function (repeatable; summed).", show_default=False),
    reward_weights: str = typer.Option(None, "--reward-weights", help="grpo: one weight per --reward, comma-separated [default: 1 each].",
                                       show_default=False),
    num_generations: int = typer.Option(None, "--num-generations", help="grpo: completions sampled per prompt [default: 8].", show_default=False),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="grpo: longest completion [default: 64].", show_default=False),
    rollout_backend: str = typer.Option(None, "--rollout-backend", help="grpo: auto | llama.cpp | transformers [default: auto: "
                                        "llama.cpp on CPU where it runs the model].", show_default=False),
    beta: float = typer.Option(None, "--beta", help="Preference objectives: distance from the reference (DPO/IPO), reward "
                               "scale (SimPO), odds-ratio weight (ORPO) [default: 0.1; SimPO 2.0].", show_default=False),
    sft_weight: float = typer.Option(None, "--sft-weight", help="Preference objectives: add W x the chosen responses' NLL "
                                     "(RPO) [default: 0].", show_default=False),
    eval_data: str = typer.Option(None, "--eval-data", help="Held-out data, same format (or set data.eval_split).", show_default=False),
    out: str = typer.Option(None, "--out", "-o", help="Output folder (becomes a Hugging Face model folder).", show_default=False),
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
    text_pair_column: str = o.TEXT_PAIR_COLUMN,
    prompt_column: str = o.PROMPT_COLUMN,
    data_format: str = o.DATA_FORMAT,
    chat_template: str = o.CHAT_TEMPLATE,
    train_on_prompt: bool = o.TRAIN_ON_PROMPT,
    packing: bool = o.PACKING,
    label_column: str = o.LABEL_COLUMN,
    seed: int = o.SEED,
    mixed_precision: str = o.MIXED_PRECISION,
    eval_every: int = o.EVAL_EVERY,
    save_every: int = o.SAVE_EVERY,
    threads: int = o.THREADS,
    lora_r: int = typer.Option(None, "--lora-r", help="LoRA rank [default: 8].", show_default=False),
    lora_alpha: int = typer.Option(None, "--lora-alpha", help="LoRA alpha [default: 16].", show_default=False),
    lora_targets: str = typer.Option(None, "--lora-targets", help="Module names, comma-separated, or all-linear "
                                      "[default: all-linear for causal LMs, attention for classifiers].", show_default=False),
    merge: bool = typer.Option(None, "--merge", help="LoRA: save a merged full model instead of the adapter.", show_default=False),
    fsdp: bool = typer.Option(None, "--fsdp", help="Shard weights, gradients and optimizer state across processes (torchrun).",
                              show_default=False),
    gradient_checkpointing: bool = o.GRADIENT_CHECKPOINTING,
    compile_: bool = o.COMPILE,
    report_to: list[str] = o.REPORT_TO,
    estimate_memory: bool = typer.Option(False, "--estimate-memory", help="Print the memory this run needs per process, and "
                                         "what would make it fit, then exit."),
    resume: bool = o.RESUME,
    overwrite: bool = o.OVERWRITE,
    recipe: Path = o.RECIPE,
    set_: list[str] = o.SET,
    num_proc: int = o.NUM_PROC,
    rebuild_data: bool = o.REBUILD_DATA,
    streaming: bool = typer.Option(None, "--streaming", help="Tokenize and pack while training, never all the data at once "
                                   "(needs --max-steps; --resume continues the stream).", show_default=False),
    quiet: bool = o.QUIET,
    allow_pickle: bool = typer.Option(None, "--allow-pickle", help="Allow pickle (.bin/.pt) weights: they can run code.", show_default=False),
    trust_remote_code: bool = typer.Option(None, "--trust-remote-code", help="Run Python code shipped with the model.", show_default=False),
) -> None:
    """Fine-tune a model on your data; the output folder loads with transformers / peft.

    Examples (offline, bundled models):

      llmkit finetune --model minilm-l6 --task seq-cls --method lora --data train.csv --eval-data val.csv --out runs/sentiment

      llmkit finetune --recipe recipes/smollm2-135m-shakespeare-lora.yaml --set train.max_steps=30 --out runs/shakespeare

      llmkit finetune --model smollm2-135m --method lora --data chat.jsonl --packing --out runs/chat   # {"messages": [...]} rows

      llmkit finetune --objective dpo --model runs/chat --method lora --data pairs.jsonl --beta 0.1 --out runs/dpo   # prompt/chosen/rejected

      llmkit finetune --objective grpo --method lora --data prompts.jsonl --reward exact:answer --num-generations 8 --out runs/grpo

      torchrun --nproc_per_node 2 -m llmkit finetune --recipe recipes/minilm-l6-sentiment-full.yaml --out runs/ddp

      torchrun --nproc_per_node 2 -m llmkit finetune --model smollm2-135m --data train.txt --fsdp --out runs/fsdp

      llmkit finetune --model smollm2-135m --method qlora --batch-size 32 --estimate-memory
    """
    from llmkit.finetune import finetune as run

    flags = o.recipe_flags({**locals(), "reward": reward or None}, FLAG_KEYS)
    if lora_targets is not None:
        flags["lora.target_modules"] = [t.strip() for t in lora_targets.split(",") if t.strip()]
    cfg = o.load(recipe, set_, flags)
    if estimate_memory:
        from llmkit.training.memory import estimate_run

        typer.echo(estimate_run(cfg))
        return
    out_dir = run(cfg)
    if not cfg.quiet:
        typer.echo(f"saved to {out_dir}")
