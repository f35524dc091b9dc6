"""Peer baseline: chat LoRA fine-tuning with TRL's SFTTrainer, written the way a TRL user would.

    python benchmarks/peers/trl_sft.py MODEL_DIR TRAIN.jsonl OUT [--gguf FILE] [--bs 8] [--lr 5e-4] [--max-length 256]

TRAIN.jsonl holds conversational prompt-completion rows,
`{"prompt": [{"role": "user", ...}], "completion": [{"role": "assistant", ...}]}`: TRL renders both with the
model's chat template and, for this format, learns only the completion (`completion_only_loss`, its default
for prompt-completion data), which for one user turn + one reply is assistant-only loss without needing
`{% generation %}` markers in the template. The adapter and tokenizer are saved to OUT.

Prints `peer_trl_mask ...` (what the first collated batch learns: proof that the prompt is masked) and one
result line `peer_trl train_s=... samples_per_s=... steps=... loss=...`.
"""

from __future__ import annotations

import argparse
import time

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", help="model folder (with --gguf: the folder holding the GGUF file)")
    p.add_argument("train", help="conversational prompt-completion JSONL")
    p.add_argument("out", help="where the adapter + tokenizer go")
    p.add_argument("--gguf", help="GGUF file name inside MODEL")
    p.add_argument("--bs", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (the caller decides: only pays on AMX CPUs)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="TRL's own default; off unless asked, so both sides do the same arithmetic (no recomputation)")
    a = p.parse_args()

    kw = {"gguf_file": a.gguf} if a.gguf else {}
    tok = AutoTokenizer.from_pretrained(a.model, **kw)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, **kw)
    if a.gguf:  # transformers 5.x refuses to train a GGUF-loaded model; dequantized, it is a plain fp32 model
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config

    train = load_dataset("json", data_files={"train": a.train})["train"]
    args = SFTConfig(
        output_dir=f"{a.out}-trainer", per_device_train_batch_size=a.bs, num_train_epochs=a.epochs, learning_rate=a.lr,
        lr_scheduler_type="linear", warmup_steps=0, max_length=a.max_length, seed=0, logging_steps=10,
        save_strategy="no", report_to=[], bf16=a.bf16, use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=a.gradient_checkpointing, completion_only_loss=True, disable_tqdm=True,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok, peft_config=lora)

    # What the model is really trained on: the labels of a collated batch, decoded. Only the reply and the
    # template's end-of-turn should be there, never the review or the system prompt.
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(min(2, len(trainer.train_dataset)))])
    learned = batch["labels"][0][batch["labels"][0] != -100]
    real = int((batch["input_ids"][0] != tok.pad_token_id).sum())
    print(f"peer_trl_mask completion_only_loss={trainer.completion_only_loss} labeled={len(learned)} of {real} "
          f"learned={tok.decode(learned)!r}", flush=True)

    t = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t
    trainer.save_model(a.out)  # the adapter (adapter_config.json + adapter_model.safetensors)
    tok.save_pretrained(a.out)
    print(f"peer_trl train_s={seconds:.1f} samples_per_s={len(train) * a.epochs / seconds:.2f} "
          f"steps={result.global_step} loss={result.training_loss:.4f}", flush=True)


if __name__ == "__main__":
    main()
