"""Peer baseline for data at scale: what a user writes from transformers' run_clm.py for a big text corpus.

    python benchmarks/peers/clm_data.py MODEL_DIR --gguf FILE TRAIN.txt [--block 128] [--bs 2] [--max-steps 2] [--num-proc 2]

`load_dataset("text")` (one row per line, line breaks kept, as run_clm.py), a batched tokenizing `map` with
`num_proc` processes, run_clm's `group_texts` into blocks, then a Trainer with LoRA for a few steps. The datasets
Arrow cache ($HF_DATASETS_CACHE) makes a second run skip the maps. Prints `peer_first_step seconds=...` when the
first optimizer step ends (seconds since the script started) and `peer_data prepare_s=... blocks=... tokens=...`.
"""

from __future__ import annotations

import argparse
import time
from itertools import chain

START = time.perf_counter()

import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments, default_data_collator  # noqa: E402


class FirstStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            print(f"peer_first_step seconds={time.perf_counter() - START:.1f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("train")
    p.add_argument("--gguf")
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--bs", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=2)
    p.add_argument("--num-proc", type=int, default=2)
    a = p.parse_args()
    torch.manual_seed(0)
    kw = {"gguf_file": a.gguf} if a.gguf else {}
    tok = AutoTokenizer.from_pretrained(a.model, **kw)

    t = time.perf_counter()
    raw = load_dataset("text", data_files={"train": a.train}, keep_linebreaks=True)
    tokenized = raw.map(lambda b: tok(b["text"]), batched=True, num_proc=a.num_proc, remove_columns=["text"])

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples}  # run_clm.py's group_texts
        total = len(concatenated["input_ids"]) // a.block * a.block
        result = {k: [v[i:i + a.block] for i in range(0, total, a.block)] for k, v in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    blocks = tokenized.map(group_texts, batched=True, num_proc=a.num_proc)["train"]
    print(f"peer_data prepare_s={time.perf_counter() - t:.1f} blocks={len(blocks)} tokens={len(blocks) * a.block}", flush=True)

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, **kw)
    if a.gguf:  # transformers 5.x refuses to train a GGUF-loaded model; dequantized it is a plain fp32 model
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear"))
    args = TrainingArguments("/tmp/peer_clm_data_out", per_device_train_batch_size=a.bs, max_steps=a.max_steps, learning_rate=1e-4,
                             logging_steps=1, save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0,
                             use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=blocks, data_collator=default_data_collator, callbacks=[FirstStep()]).train()
    print(f"peer_done seconds={time.perf_counter() - START:.1f}", flush=True)


if __name__ == "__main__":
    main()
