"""Training memory against the vocabulary: the chunked LM-head loss (`train.chunked_loss`, the default) vs the
model's own loss (`--set train.chunked_loss=false`, what llmkit did before), and the plain HF Trainer as the peer.

Same work for every row: STEPS optimizer steps x 8 blocks x 256 tokens of Tiny Shakespeare, fp32, one process.
Rows: SmolLM2-135M (49k vocabulary) LoRA (the defaults: chunked loss, fused LoRA forward, dropout 0; then each
switched back: `lora.fused=false`, `train.chunked_loss=false`, dropout 0.05 as the peer's) and full, and a
262k-vocabulary model (Gemma 3's vocabulary size on a narrow Llama, 256 wide x 4 layers, SmolLM2's tokenizer) LoRA,
QLoRA and full with gradient checkpointing. Each prints llmkit.json's training peak (RSS from the first step),
`--estimate-memory`'s prediction of it, the whole run's peak from the OS (loading included; the peer's too) and tokens/s.
Distill rows: the 262k model as the teacher of a 2-layer student (layers 0 and 3, trained whole) against its cached
top-32 logits (`distill.cache_top_k=32`, each run caching its own), chunked CE + KD (the default) vs the plain path;
STEPS steps x 4 x 256 tokens (half the batch: the plain path holds ~5 tokens x vocabulary tensors), lr 1e-4.

Targets (issue 28): SmolLM2 LoRA peak <= full fine-tuning's and <= 0.8x the peer's; the 262k model's peak <= 0.5x
the unchunked one; estimates within 15% of the measured peaks.

Usage: python benchmarks/vocab_memory.py [--steps 4] [--skip-peer] [--only distill]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import LLMKIT, SHARED, bundled_smollm2, estimate_gb, fields, first_line, run_facts
from memory import peak_rss

DATA = SHARED / "data" / "tinyshakespeare"


def wide_vocab_model(work: Path) -> Path:
    """A 262,144-token vocabulary on a narrow Llama, with SmolLM2's tokenizer (ids beyond it are never fed)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmkit.models import load_tokenizer, resolve
    out = work / "vocab262k"
    tok = load_tokenizer(resolve("smollm2-135m"))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=262_144, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--only", choices=["all", "distill"], default="all", help="distill: the distill rows alone")
    a = p.parse_args()
    print(first_line(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="llmkit-bench-vocab-"))
    wide = wide_vocab_model(work)
    print(f"{a.steps} steps x 8 x 256 tokens, fp32, one process", flush=True)
    peaks: dict[str, float] = {}

    def llmkit(name: str, model: object, method: str, chunked: bool, *extra: str) -> None:
        out = work / name
        cmd = [*LLMKIT, "finetune", "--model", model, "--method", method, "--data", DATA / "train.txt", "--out", out,
               "--max-steps", a.steps, "--block-size", 256, "--batch-size", 8, "--lr", 1e-4, "--mixed-precision", "no", "--quiet",
               "--set", f"train.chunked_loss={'true' if chunked else 'false'}", *extra]
        _, whole = peak_rss(cmd, name)
        facts = run_facts(out)
        peaks[name] = facts["peak_memory_gb"]
        est = estimate_gb(cmd[len(LLMKIT) + 1:])
        print(f"{name:<28} train_peak_gb={facts['peak_memory_gb']:.2f} estimate_gb={est:.2f} ({est / facts['peak_memory_gb']:.2f}x) "
              f"whole_run_peak_gb={whole:.2f} tokens_per_s={facts.get('train_tokens_per_s') or float('nan'):.0f}", flush=True)

    def distill(name: str, chunked: bool) -> None:
        out = work / name
        cmd = [*LLMKIT, "distill", "--teacher", wide, "--student-layers", 2, "--layer-selection", "even", "--data", DATA / "train.txt",
               "--out", out, "--max-train-samples", 4 * a.steps, "--max-steps", a.steps, "--block-size", 256, "--batch-size", 4,
               "--lr", 1e-4, "--temperature", 2, "--alpha", 0.5, "--mixed-precision", "no", "--quiet",
               "--set", "distill.cache_top_k=32", "--set", f"distill.cache_dir={work / ('cache ' + name)}", "--set", "train.eval_batch_size=4",
               "--set", f"train.chunked_loss={'true' if chunked else 'false'}"]
        _, whole = peak_rss(cmd, name)
        facts = run_facts(out)
        peaks[name] = facts["peak_memory_gb"]
        print(f"{name:<28} train_peak_gb={facts['peak_memory_gb']:.2f} whole_run_peak_gb={whole:.2f} "
              f"tokens_per_s={facts.get('train_tokens_per_s') or float('nan'):.0f}", flush=True)

    print(f"distill: the 262k model -> a 2-layer student (full), top-32 cache, {a.steps} steps x 4 x 256 tokens, fp32", flush=True)
    distill("vocab262k distill chunked", True)
    distill("vocab262k distill unchunked", False)
    print(f"ratio vocab262k distill chunked/unchunked train peak = "
          f"{peaks['vocab262k distill chunked'] / peaks['vocab262k distill unchunked']:.2f}", flush=True)
    if a.only == "distill":
        return
    llmkit("smollm2 lora chunked", "smollm2-135m", "lora", True)  # the defaults: chunked loss, fused LoRA, dropout 0
    llmkit("smollm2 lora unfused", "smollm2-135m", "lora", True, "--set", "lora.fused=false")
    llmkit("smollm2 lora unchunked", "smollm2-135m", "lora", False)
    llmkit("smollm2 lora dropout=0.05", "smollm2-135m", "lora", True, "--set", "lora.dropout=0.05")  # the peer's peft config
    llmkit("smollm2 full chunked", "smollm2-135m", "full", True)
    llmkit("smollm2 full unchunked", "smollm2-135m", "full", False)
    llmkit("vocab262k lora chunked", wide, "lora", True)
    llmkit("vocab262k lora unchunked", wide, "lora", False)
    llmkit("vocab262k qlora chunked", wide, "qlora", True)
    llmkit("vocab262k full+ckpt chunked", wide, "full", True, "--gradient-checkpointing")
    if not a.skip_peer:
        from _common import HERE

        peer = HERE.parent.parent / "shared" / "bench" / "peer_clm_trainer.py"
        gguf = bundled_smollm2()
        import sys

        text, whole = peak_rss([sys.executable, peer, gguf.parent, DATA / "train.txt", DATA / "validation.txt", "--gguf", gguf.name,
                                "--lora", "--max-steps", a.steps, "--bs", 8, "--lr", 1e-4], "peer")
        f = fields(text, "peer_clm")
        peaks["peer"] = whole
        print(f"{'peer lora (HF Trainer)':<28} whole_run_peak_gb={whole:.2f} tokens_per_s={f.get('tokens_per_s', float('nan')):.0f}")
    print(f"ratio smollm2 lora/full train peak = {peaks['smollm2 lora chunked'] / peaks['smollm2 full chunked']:.2f} (target <= 1)")
    if "peer" in peaks:
        print(f"ratio smollm2 lora train peak / peer whole-run peak = {peaks['smollm2 lora chunked'] / peaks['peer']:.2f} (target <= 0.8); "
              f"dropout 0.05 as the peer: {peaks['smollm2 lora dropout=0.05'] / peaks['peer']:.2f}")
    print(f"ratio smollm2 lora chunked/unchunked train peak = {peaks['smollm2 lora chunked'] / peaks['smollm2 lora unchunked']:.2f}")
    print(f"ratio vocab262k lora chunked/unchunked train peak = {peaks['vocab262k lora chunked'] / peaks['vocab262k lora unchunked']:.2f} "
          "(target <= 0.5)")


if __name__ == "__main__":
    main()
