"""Distillation: teacher vs distilled student vs the same student trained without the teacher, one run.

seq-cls: teacher = MiniLM-L6 fine-tuned by llmkit on rt-polarity train (1 epoch); student = its layers 0, 2, 5,
distilled on the same data for 1 epoch (T=2, alpha=0.5); baseline = the same 3-layer student, same steps,
trained on the labels alone (--alpha 0). Accuracy on validation.csv; inference samples/s (fp32, batch 32).
Targets: student accuracy >= 97% of the teacher's at >= 1.8x its samples/s, and above the no-KD baseline.

causal-lm: teacher = SmolLM2-135M (30 layers); student = 15 layers (every other one), distilled on Tiny
Shakespeare for --clm-steps steps of 8 x 256 tokens; baseline = the same student, same steps, no teacher.
Perplexity on validation.txt; greedy generation tokens/s (transformers, fp32).
Targets: student perplexity <= 1.25x the teacher's at >= 1.6x its tokens/s, and below the no-KD baseline.

Usage: python benchmarks/distill.py [--tasks seq-cls,causal-lm] [--clm-steps 60] [--rows N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from _common import LLMKIT, SHARED, first_line, run, run_facts


def report(out: Path) -> dict:
    return json.loads((out / "distill_report.json").read_text())


def seq_cls(work: Path, rows: int) -> None:
    data = SHARED / "data" / "rt-polarity"
    train, test = data / "train.csv", data / "validation.csv"
    if rows:
        train = work / "train.csv"
        train.write_text("\n".join((data / "train.csv").read_text().splitlines()[: rows + 1]) + "\n")
    teacher = work / "teacher"
    _, wall = run([*LLMKIT, "finetune", "--model", "minilm-l6", "--task", "seq-cls", "--data", train, "--eval-data", test,
                   "--out", teacher, "--epochs", 1, "--batch-size", 32, "--lr", 5e-5, "--quiet"], "teacher fine-tune")
    print(f"seq-cls teacher: MiniLM-L6 fine-tuned 1 epoch, test_acc={run_facts(teacher)['metrics']['eval_accuracy']:.4f} "
          f"(wall {wall:.0f} s)", flush=True)
    results = {}
    for name, alpha in (("distilled", 0.5), ("no-KD", 0.0)):
        out = work / f"student-{name}"
        _, wall = run([*LLMKIT, "distill", "--recipe", Path(__file__).parent.parent / "recipes" / "distill-minilm-l6-sentiment.yaml",
                       "--teacher", teacher, "--data", train, "--eval-data", test, "--alpha", alpha, "--out", out, "--quiet",
                       "--set", f"distill.cache_dir={work / 'cache'}", "--set", f"distill.cache_top_k={2 if alpha else 0}"],
                      f"distill {name}")
        results[name] = r = report(out)
        t, s = r["teacher"], r["student"]
        print(f"seq-cls {name:9s} student layers={s['layers']} test_acc={s['metrics']['accuracy']:.4f} "
              f"samples_per_s={s['inference_samples_per_s']:.1f} train_samples_per_s={run_facts(out)['train_samples_per_s']:.1f} "
              f"wall_s={wall:.0f}", flush=True)
    t, s, base = results["distilled"]["teacher"], results["distilled"]["student"], results["no-KD"]["student"]
    acc_ratio = s["metrics"]["accuracy"] / t["metrics"]["accuracy"]
    speed = s["inference_samples_per_s"] / t["inference_samples_per_s"]
    print(f"seq-cls teacher   layers={t['layers']} test_acc={t['metrics']['accuracy']:.4f} samples_per_s={t['inference_samples_per_s']:.1f}")
    print(f"ratio seq-cls accuracy student/teacher = {acc_ratio:.3f} (target >= 0.97)  samples_per_s student/teacher = {speed:.2f} "
          f"(target >= 1.8)  distilled - no-KD = {100 * (s['metrics']['accuracy'] - base['metrics']['accuracy']):+.1f} points "
          f"(target > 0; no-KD/teacher = {base['metrics']['accuracy'] / t['metrics']['accuracy']:.3f})", flush=True)


def causal_lm(work: Path, steps: int, lr: float) -> None:
    data = SHARED / "data" / "tinyshakespeare"
    results = {}
    for name, alpha in (("distilled", 0.5), ("no-KD", 0.0)):
        out = work / f"lm-{name}"
        _, wall = run([*LLMKIT, "distill", "--recipe", Path(__file__).parent.parent / "recipes" / "distill-smollm2-135m-shakespeare.yaml",
                       "--data", data / "train.txt", "--eval-data", data / "validation.txt", "--alpha", alpha, "--out", out, "--quiet",
                       "--max-steps", steps, "--lr", lr, "--set", "train.eval_every=0", "--set", "train.save_every=0",
                       "--set", "distill.cache_top_k=0"], f"distill {name}")
        results[name] = r = report(out)
        s = r["student"]
        print(f"causal-lm {name:9s} student layers={s['layers']} steps={steps} ppl={s['metrics']['perplexity']:.2f} "
              f"gen_tok_per_s={s['generation_tokens_per_s']:.1f} train_tok_per_s={run_facts(out)['train_tokens_per_s']:.0f} "
              f"wall_s={wall:.0f}", flush=True)
    t, s, base = results["distilled"]["teacher"], results["distilled"]["student"], results["no-KD"]["student"]
    print(f"causal-lm teacher   layers={t['layers']} ppl={t['metrics']['perplexity']:.2f} gen_tok_per_s={t['generation_tokens_per_s']:.1f}")
    print(f"ratio causal-lm ppl student/teacher = {s['metrics']['perplexity'] / t['metrics']['perplexity']:.3f} (target <= 1.25)  "
          f"gen tok/s student/teacher = {s['generation_tokens_per_s'] / t['generation_tokens_per_s']:.2f} (target >= 1.6)  "
          f"ppl no-KD/distilled = {base['metrics']['perplexity'] / s['metrics']['perplexity']:.3f} (target > 1)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", default="seq-cls,causal-lm")
    p.add_argument("--clm-steps", type=int, default=60, help="optimizer steps of 8 x 256 tokens per causal-LM student")
    p.add_argument("--clm-lr", type=float, default=3e-4)
    p.add_argument("--rows", type=int, default=0, help="seq-cls: use only the first N training rows (quick check)")
    a = p.parse_args()
    print(first_line(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="llmkit-bench-distill-"))
    try:
        for task in a.tasks.split(","):
            if task == "seq-cls":
                seq_cls(work, a.rows)
            elif task == "causal-lm":
                causal_lm(work, a.clm_steps, a.clm_lr)
            else:
                sys.exit(f"unknown task {task}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
