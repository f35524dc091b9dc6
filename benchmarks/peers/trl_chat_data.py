"""Peer baseline for chat data at scale: TRL's SFTTrainer on a `messages` JSONL, `dataset_num_proc=2`, a few LoRA steps.

    python benchmarks/peers/trl_chat_data.py MODEL_DIR --gguf FILE TRAIN.jsonl [--max-length 256] [--bs 2] [--max-steps 2]

What a TRL user writes: `load_dataset("json")`, SFTConfig(dataset_num_proc=2), SFTTrainer(...).train(). TRL renders
every conversation with the model's chat template and tokenizes it in `dataset_num_proc` processes before the first
step; `datasets`' Arrow cache ($HF_DATASETS_CACHE) lets a second run skip that. Prints `peer_first_step seconds=...`.
"""

from __future__ import annotations

import argparse
import time

START = time.perf_counter()

import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402


class FirstStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            print(f"peer_first_step seconds={time.perf_counter() - START:.1f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("train")
    p.add_argument("--gguf")
    p.add_argument("--bs", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=2)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--num-proc", type=int, default=2)
    a = p.parse_args()
    kw = {"gguf_file": a.gguf} if a.gguf else {}
    tok = AutoTokenizer.from_pretrained(a.model, **kw)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, **kw)
    if a.gguf:
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    train = load_dataset("json", data_files={"train": a.train})["train"]
    args = SFTConfig(output_dir="/tmp/peer_trl_chat_data", per_device_train_batch_size=a.bs, max_steps=a.max_steps, learning_rate=1e-4,
                     max_length=a.max_length, seed=0, logging_steps=1, save_strategy="no", report_to=[],
                     use_cpu=not torch.cuda.is_available(), dataset_num_proc=a.num_proc, disable_tqdm=True)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok, peft_config=lora, callbacks=[FirstStep()]).train()
    print(f"peer_done seconds={time.perf_counter() - START:.1f}", flush=True)


if __name__ == "__main__":
    main()
