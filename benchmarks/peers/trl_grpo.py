"""Peer baseline: GRPO with LoRA through TRL's GRPOTrainer on CPU, written the way a TRL user would.

    python benchmarks/peers/trl_grpo.py MODEL_DIR PROMPTS.jsonl OUT [--gguf FILE] [--steps 4] [--prompts-per-step 8]
        [--num-generations 8] [--max-new-tokens 8] [--lr 1e-5] [--beta 0] [--temperature 1.0]

PROMPTS.jsonl holds {"prompt": [messages], "answer": "positive" | "negative"} rows (TRL's conversational format).
The reward is the exact label: the completion, lower-cased and stripped of whitespace and trailing punctuation,
equals `answer`. TRL generates with transformers `generate` (vLLM needs CUDA). Rows are taken in file order (shuffle_dataset=False), one
optimizer step per generation batch (TRL's default steps_per_generation = 1), LoRA r=16 / alpha 32 / dropout 0 on
all linear layers.

Timing: `_generate_single_turn` (TRL's rollout: transformers generate for every prompt x G) is wrapped with a clock;
a callback clocks each whole step; train = step - rollout (the reward and the log-prob passes count as training).
Prints `peer_grpo_step step=K reward=... rollout_s=... train_s=...` per step and one result line
`peer_grpo steps=... step_s=... rollout_s=... train_s=... reward_first=... reward_last=... rollout_tokens_per_s=...`.
"""

from __future__ import annotations

import argparse
import time

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer


def normalise(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".!?,;:")


def exact_answer(prompts: list, completions: list, answer: list[str], **_: object) -> list[float]:
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if normalise(t) == normalise(a) else 0.0 for t, a in zip(texts, answer, strict=True)]


class Clock(TrainerCallback):
    """Each step's wall seconds; prints the step's line as soon as TRL logs it (a long run cut short keeps its lines)."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.rollout: list[float] = []
        self._t = 0.0

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.steps.append(time.perf_counter() - self._t)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "reward" in logs and self.steps:
            k = len(self.steps)
            roll = self.rollout[k - 1] if len(self.rollout) >= k else float("nan")
            print(f"peer_grpo_step step={k} reward={logs['reward']:.4f} rollout_s={roll:.2f} "
                  f"train_s={self.steps[-1] - roll:.2f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", help="model folder (with --gguf: the folder holding the GGUF file)")
    p.add_argument("prompts")
    p.add_argument("out")
    p.add_argument("--gguf")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--temperature", type=float, default=1.0)
    a = p.parse_args()

    kw = {"gguf_file": a.gguf} if a.gguf else {}
    tok = AutoTokenizer.from_pretrained(a.model, **kw)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, **kw)
    if a.gguf:  # transformers 5.x refuses to train a GGUF-loaded model; dequantized, it is a plain fp32 model
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    train = load_dataset("json", data_files={"train": a.prompts})["train"]
    args = GRPOConfig(
        output_dir=f"{a.out}-trainer", per_device_train_batch_size=a.prompts_per_step * a.num_generations,
        num_generations=a.num_generations, max_completion_length=a.max_new_tokens, learning_rate=a.lr, beta=a.beta,
        temperature=a.temperature, max_steps=a.steps, lr_scheduler_type="constant", warmup_steps=0, seed=0,
        logging_steps=1, save_strategy="no", shuffle_dataset=False, report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    clock = Clock()
    trainer = GRPOTrainer(model=model, reward_funcs=exact_answer, args=args, train_dataset=train, processing_class=tok,
                      peft_config=lora, callbacks=[clock])
    rollout = clock.rollout
    tokens: list[int] = []
    generate = trainer._generate_single_turn

    def timed(*args, **kwargs):
        t = time.perf_counter()
        out = generate(*args, **kwargs)
        rollout.append(time.perf_counter() - t)
        tokens.append(sum(len(c) for c in out[0]))  # (completion_ids, logprobs)
        return out

    trainer._generate_single_turn = timed
    trainer.train()
    rewards = [row["reward"] for row in trainer.state.log_history if "reward" in row]
    # the first step also pays one-off costs (threads, allocator): steps 2.. are the steady state when there are any
    s = slice(1, None) if len(clock.steps) > 1 else slice(None)
    n = len(clock.steps[s])
    step_s, roll_s = sum(clock.steps[s]) / n, sum(rollout[s]) / n
    print(f"peer_grpo steps={len(clock.steps)} step_s={step_s:.2f} rollout_s={roll_s:.2f} train_s={step_s - roll_s:.2f} "
          f"reward_first={rewards[0]:.4f} reward_last={rewards[-1]:.4f} "
          f"rollout_tokens_per_s={sum(tokens[s]) / sum(rollout[s]):.1f}", flush=True)


if __name__ == "__main__":
    main()
