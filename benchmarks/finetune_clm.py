"""Causal-LM LoRA fine-tuning: llmkit vs a plain HF Trainer script (run_clm style), same work, one run.

SmolLM2-135M (bundled GGUF, dequantized to fp32) on Tiny Shakespeare: 30 steps x 8 blocks x 256 tokens,
LoRA r=8 / alpha 16 / dropout 0.05 on all linear layers, lr 3e-4, no warmup; validation perplexity over all
256-token windows of validation.txt for both. Targets: >= 1.5x the peer's tokens/s, equal or lower perplexity.

Usage: python benchmarks/finetune_clm.py [--steps 30] [--mixed-precision no|bf16]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from _common import LLMKIT, SHARED, bundled_smollm2, fields, first_line, run, run_facts


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--mixed-precision", default="auto")
    p.add_argument("--skip-peer", action="store_true", help="llmkit only (quick check)")
    a = p.parse_args()
    print(first_line(), flush=True)
    gguf = bundled_smollm2()
    data = SHARED / "data" / "tinyshakespeare"
    work = Path(tempfile.mkdtemp(prefix="llmkit-bench-clm-"))
    print(f"SmolLM2-135M LoRA causal-lm on Tiny Shakespeare: {a.steps} steps x 8 x 256 tokens, lr 3e-4, "
          f"mixed precision {a.mixed_precision}", flush=True)
    out = work / "run"
    cmd = [*LLMKIT, "finetune", "--model", "smollm2-135m", "--method", "lora", "--data", data / "train.txt",
           "--eval-data", data / "validation.txt", "--out", out, "--max-steps", a.steps, "--batch-size", 8,
           "--block-size", 256, "--lr", 3e-4, "--mixed-precision", a.mixed_precision, "--quiet"]
    # everything else is llmkit's default: LoRA r=8, alpha 16, dropout 0.05 on all linear layers, no warmup, linear decay
    _, wall = run(cmd, "llmkit")
    facts = run_facts(out)
    ours = {"tokens_per_s": facts["train_tokens_per_s"], "train_s": facts["train_seconds"], "ppl": facts["metrics"]["eval_perplexity"]}
    print(f"llmkit train_s={ours['train_s']:.1f} tokens_per_s={ours['tokens_per_s']:.1f} eval_ppl={ours['ppl']:.3f} wall_s={wall:.1f}", flush=True)
    if not a.skip_peer:
        text, peer_wall = run([sys.executable, SHARED / "bench" / "peer_clm_trainer.py", gguf.parent, data / "train.txt",
                               data / "validation.txt", "--gguf", gguf.name, "--lora", "--max-steps", a.steps,
                               "--block", 256, "--bs", 8, "--lr", 3e-4], "peer")
        peer = fields(text, "peer_clm")
        print(f"peer   train_s={peer['train_s']:.1f} tokens_per_s={peer['tokens_per_s']:.1f} eval_ppl={peer['eval_ppl']:.3f} "
              f"wall_s={peer_wall:.1f}", flush=True)
        print(f"ratio tokens_per_s llmkit/peer = {ours['tokens_per_s'] / peer['tokens_per_s']:.2f} (target >= 1.5)  "
              f"eval_ppl llmkit-peer = {ours['ppl'] - peer['eval_ppl']:+.3f} (target <= 0)  wall peer/llmkit = {peer_wall / wall:.2f}",
              flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
