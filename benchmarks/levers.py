"""Training-speed levers, one at a time: what each of llmkit's choices is worth on this CPU, beside the HF Trainer peer.

Causal LM (--section clm): SmolLM2-135M (the bundled GGUF, de-quantized to fp32) LoRA r=8 / alpha 16 on all linear
layers, Tiny Shakespeare, --steps optimizer steps of 8 x 256 tokens, lr 3e-4, no eval, in fp32 and in precision `auto`:
  peer          the plain HF Trainer script with --lora (fp32 only; its LoRA dropout is fixed at 0.05, llmkit's is 0)
  llmkit        llmkit's defaults (chunked LM-head loss, fused LoRA forward, fused AdamW)
  -chunked      --set train.chunked_loss=false (the model's own loss over tokens x vocabulary logits)
  -fused-lora   --set lora.fused=false (peft's LoRA forward as is; skipped with a note where the key does not exist)
  compile       --compile: prints the compile time (the first step's extra), the step time after it against the
                uncompiled default's, and the step at which compiling pays back: compile_s / (t_default - t_compiled)
Each row: tokens/s over the whole run (as the peer's, first step included), tokens/s per step after the first
(median), the ratio to the peer, and the training peak memory.

Seq-cls (--section cls): MiniLM-L6 on rt-polarity (the first --rows training rows, 1 epoch, batch 32, lr 5e-5, max length 128, as in
finetune_cls.py), one process each, in one run:
  peer          the plain HF Trainer script (random batches padded to their longest row)
  llmkit        llmkit's defaults (length-grouped batches, fused AdamW, precision `auto`)
  -grouping     llmkit with --set train.group_by_length=false (random batches, like the peer)
  bf16          llmkit with --mixed-precision bf16 (what `auto` picks on AMX CPUs only)
then, in this process, two per-step costs that no flag switches, on one fixed batch of 32 x 40 tokens:
  AdamW fused vs foreach (the peer's) optimizer step, and the share of a training step that dropout takes.
Prints samples/s and the ratio to the peer for each row, and the accuracy on validation.csv.

Usage: python benchmarks/levers.py [--section clm|cls|all] [--steps 6] [--rows 2000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import LLMKIT, SHARED, bundled_minilm, bundled_smollm2, fields, first_line, run, run_facts

CLM_BATCH, CLM_BLOCK = 8, 256


def step_costs(model_path: Path) -> None:
    """Median ms of an optimizer step (fused vs foreach AdamW) and of a training step with / without dropout."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()

    def median_ms(fn: object, n: int = 20) -> float:
        times = []
        for i in range(n + 3):
            t = time.perf_counter()
            fn()
            if i >= 3:  # warm-up
                times.append(time.perf_counter() - t)
        return 1000 * sorted(times)[len(times) // 2]

    torch.manual_seed(0)
    ids = torch.randint(1000, 20000, (32, 40))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (32,))}
    results = {}
    for label, overrides in (("with dropout", {}), ("without dropout", {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})):
        model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2, **overrides).train()
        opt = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=True)

        def train_step(model: object = model, opt: object = opt) -> None:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()

        results[label] = median_ms(train_step)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    for kind in ("fused", "foreach"):
        opt = torch.optim.AdamW(model.parameters(), lr=5e-5, **{kind: True})
        results[f"adamw {kind}"] = median_ms(opt.step)
    print(f"lever adamw_step fused={results['adamw fused']:.1f} ms foreach={results['adamw foreach']:.1f} ms "
          f"gain={results['adamw foreach'] / results['adamw fused']:.2f}x", flush=True)
    share = 1 - results["without dropout"] / results["with dropout"]
    print(f"lever dropout train_step with={results['with dropout']:.0f} ms without={results['without dropout']:.0f} ms "
          f"share_of_step={100 * share:.0f}% (kept: dropout is the model's regularisation, not a speed setting)", flush=True)


def step_seconds(out: Path) -> list[float]:
    """Each optimizer step's seconds, from metrics.jsonl written every step (every step holds 8 full 256-token blocks)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [CLM_BATCH * CLM_BLOCK / r["tokens_per_s"] for r in rows if "tokens_per_s" in r]


def llmkit_row(cmd: list[object], label: str) -> bool:
    """Run one llmkit row; False (with a note) when llmkit does not know a key the row sets (exit 2: not there yet)."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if proc.returncode == 2 and "unknown recipe key" in proc.stderr:
        said = proc.stderr.strip().splitlines()[-1].split(";")[0]  # without the list of known keys
        print(f"{label:11s} skipped: this llmkit does not have the key ({said})", flush=True)
        return False
    if proc.returncode != 0:
        sys.exit(f"{label} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return True


def clm_section(steps: int, work: Path) -> None:
    """SmolLM2-135M LoRA on Tiny Shakespeare: the peer, then llmkit's levers one at a time, in fp32 and `auto`."""
    gguf = bundled_smollm2()
    data = SHARED / "data" / "tinyshakespeare"
    tokens = steps * CLM_BATCH * CLM_BLOCK
    print(f"SmolLM2-135M LoRA causal-lm on Tiny Shakespeare: {steps} steps x {CLM_BATCH} x {CLM_BLOCK} tokens, lr 3e-4, "
          f"r=8 alpha=16, no eval", flush=True)
    text, _ = run([sys.executable, SHARED / "bench" / "peer_clm_trainer.py", gguf.parent, data / "train.txt", data / "validation.txt",
                   "--gguf", gguf.name, "--lora", "--max-steps", steps, "--block", CLM_BLOCK, "--bs", CLM_BATCH, "--lr", 3e-4], "peer")
    peer = fields(text, "peer_clm")["tokens_per_s"]
    print(f"peer        fp32 tokens_per_s={peer:6.1f} ratio=1.00 (HF Trainer + peft, LoRA dropout 0.05 fixed by the script)", flush=True)
    base = [*LLMKIT, "finetune", "--model", "smollm2-135m", "--method", "lora", "--data", data / "train.txt", "--max-steps", steps,
            "--batch-size", CLM_BATCH, "--block-size", CLM_BLOCK, "--lr", 3e-4, "--set", "train.log_every=1", "--quiet"]
    rows = (("llmkit", []), ("-chunked", ["--set", "train.chunked_loss=false"]), ("-fused-lora", ["--set", "lora.fused=false"]),
            ("compile", ["--compile"]))
    for precision in ("no", "auto"):
        step_s: dict[str, float] = {}
        for label, extra in rows:
            out = work / f"clm-{precision}-{label.strip('-')}"
            if not llmkit_row([*base, "--mixed-precision", precision, "--out", out, *extra], label):
                continue
            facts, seconds = run_facts(out), step_seconds(out)
            step_s[label] = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
            whole = facts["train_tokens_per_s"] or tokens / facts["train_seconds"]
            shown = "fp32" if precision == "no" else json.loads((out / "llmkit.json").read_text())["machine"].get("precision", precision)
            print(f"{label:11s} {shown} tokens_per_s={whole:6.1f} ratio={whole / peer:.2f} after_first_step={CLM_BATCH * CLM_BLOCK / step_s[label]:6.1f} "
                  f"tokens/s peak={facts['peak_memory_gb']:.2f} GB", flush=True)
            if label == "compile":
                compile_s = facts.get("compile_seconds") or 0.0
                saved = step_s["llmkit"] - step_s["compile"]
                pays = f"after {compile_s / saved:.0f} steps" if saved > 0 else "never (not faster per step here)"
                print(f"lever compile {shown} compile_s={compile_s:.1f} step_s compiled={step_s['compile']:.2f} "
                      f"uncompiled={step_s['llmkit']:.2f} pays_back={pays}", flush=True)


def cls_section(rows: int, work: Path) -> None:
    """MiniLM-L6 seq-cls on rt-polarity: the peer, llmkit's default, -grouping, bf16; then the per-step costs."""
    model = bundled_minilm()
    data = SHARED / "data" / "rt-polarity"
    train, test = work / "train.csv", data / "validation.csv"
    train.write_text("\n".join((data / "train.csv").read_text().splitlines()[: rows + 1]) + "\n")
    print(f"MiniLM-L6 seq-cls on rt-polarity: {rows} train rows, 1 epoch, batch 32, lr 5e-5, max_length 128", flush=True)
    text, _ = run([sys.executable, SHARED / "bench" / "peer_cls_trainer.py", model, train, test], "peer")
    peer = fields(text, "peer_trainer")
    print(f"peer       samples_per_s={peer['samples_per_s']:6.1f} ratio=1.00 test_acc={peer['test_acc']:.4f}", flush=True)
    base = [*LLMKIT, "finetune", "--model", "minilm-l6", "--task", "seq-cls", "--data", train, "--eval-data", test,
            "--epochs", 1, "--batch-size", 32, "--lr", 5e-5, "--max-length", 128, "--quiet"]
    for label, extra in (("llmkit", []), ("-grouping", ["--set", "train.group_by_length=false"]),
                         ("bf16", ["--mixed-precision", "bf16"])):
        out = work / label.strip("-")
        run([*base, "--out", out, *extra], label)
        facts = run_facts(out)
        speed = facts["train_samples_per_s"]
        print(f"{label:10s} samples_per_s={speed:6.1f} ratio={speed / peer['samples_per_s']:.2f} "
              f"test_acc={facts['metrics']['eval_accuracy']:.4f}", flush=True)
    step_costs(model)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--section", choices=("clm", "cls", "all"), default="all", help="causal-LM levers, seq-cls levers, or both")
    p.add_argument("--steps", type=int, default=6, help="clm: optimizer steps per row (the first one includes --compile's compiling)")
    p.add_argument("--rows", type=int, default=2000, help="cls: training rows (the first N of train.csv)")
    a = p.parse_args()
    print(first_line(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="llmkit-bench-levers-"))
    try:
        if a.section in ("clm", "all"):
            clm_section(a.steps, work)
        if a.section in ("cls", "all"):
            cls_section(a.rows, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
