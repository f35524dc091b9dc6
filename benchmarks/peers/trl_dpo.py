"""Peer baseline: DPO with LoRA through TRL's DPOTrainer, written the way a TRL user would.

    python benchmarks/peers/trl_dpo.py MODEL_DIR PAIRS.jsonl OUT [--gguf FILE] [--bs 8] [--lr 5e-5] [--beta 0.1]

PAIRS.jsonl holds {"prompt": [messages], "chosen": [messages], "rejected": [messages]} rows (TRL's conversational
preference format). TRL's defaults otherwise: the reference is the base with the adapter switched off, run beside
the policy at every step; dropout off. The one change: the rows are taken in the order llmkit's sampler gives
(seed 0, epoch 0, no length grouping), so both sides see the same batches and their per-step losses compare.

Prints `peer_dpo_loss step=K loss=...` for every step and one result line
`peer_dpo train_s=... samples_per_s=... steps=... loss=...`.
"""

from __future__ import annotations

import argparse
import time

import torch
from datasets import load_dataset
from peft import LoraConfig
from torch.utils.data import SequentialSampler
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer


class InOrder(DPOTrainer):
    def _get_train_sampler(self, *args, **kwargs):  # the rows as given (already in llmkit's order)
        return SequentialSampler(self.train_dataset)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", help="model folder (with --gguf: the folder holding the GGUF file)")
    p.add_argument("train", help="conversational prompt/chosen/rejected JSONL")
    p.add_argument("out", help="where the adapter + tokenizer go")
    p.add_argument("--gguf", help="GGUF file name inside MODEL")
    p.add_argument("--bs", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (the caller decides: only pays on AMX CPUs)")
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
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()  # llmkit's EpochSampler(seed 0, epoch 0)
    train = train.select(order)
    args = DPOConfig(
        output_dir=f"{a.out}-trainer", per_device_train_batch_size=a.bs, num_train_epochs=1, learning_rate=a.lr, beta=a.beta,
        lr_scheduler_type="linear", warmup_steps=0, max_length=a.max_length, seed=0, logging_steps=1, save_strategy="no",
        report_to=[], bf16=a.bf16, use_cpu=not torch.cuda.is_available(), disable_tqdm=True, gradient_checkpointing=False,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = InOrder(model=model, args=args, train_dataset=train, processing_class=tok, peft_config=lora)
    t = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t
    for row in trainer.state.log_history:
        if "loss" in row:
            print(f"peer_dpo_loss step={row['step']} loss={row['loss']:.6f} margins={row.get('rewards/margins', float('nan')):.6f}")
    trainer.save_model(a.out)
    tok.save_pretrained(a.out)
    print(f"peer_dpo train_s={seconds:.1f} samples_per_s={len(train) / seconds:.2f} steps={result.global_step} "
          f"loss={result.training_loss:.4f}", flush=True)


if __name__ == "__main__":
    main()
