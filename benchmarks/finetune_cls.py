"""Sequence-classification fine-tuning: llmkit vs a plain HF Trainer script, same work, one run.

MiniLM-L6 on rt-polarity (8000 train rows, validation.csv as the test set), 1 epoch, batch 32, lr 5e-5,
max length 128, full and LoRA (r=8, alpha 16, dropout 0.1 on query/value, like the peer's peft defaults).
Prints training samples/s, wall time and accuracy for both and the ratios.
Targets: llmkit >= 2x the peer's samples/s at accuracy within 0.5 points (or better).

Usage: python benchmarks/finetune_cls.py [--methods full,lora] [--epochs 1] [--rows N]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from _common import LLMKIT, SHARED, bundled_minilm, fields, first_line, run, run_facts


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", default="full,lora")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--rows", type=int, default=0, help="use only the first N training rows (quick check)")
    a = p.parse_args()
    print(first_line(), flush=True)

    model = bundled_minilm()
    data = SHARED / "data" / "rt-polarity"
    work = Path(tempfile.mkdtemp(prefix="llmkit-bench-cls-"))
    train, test = data / "train.csv", data / "validation.csv"
    if a.rows:
        lines = train.read_text().splitlines()[: a.rows + 1]
        train = work / "train.csv"
        train.write_text("\n".join(lines) + "\n")
    n_train = len(train.read_text().splitlines()) - 1
    print(f"MiniLM-L6 seq-cls on rt-polarity: {n_train} train rows, {len(test.read_text().splitlines()) - 1} test rows, "
          f"epochs={a.epochs} batch=32 lr=5e-5 max_length=128", flush=True)
    for method in a.methods.split(","):
        out = work / method
        cmd = [*LLMKIT, "finetune", "--model", "minilm-l6", "--task", "seq-cls", "--method", method, "--data", train,
               "--eval-data", test, "--out", out, "--epochs", a.epochs, "--batch-size", 32, "--lr", 5e-5,
               "--max-length", 128, "--quiet", "--set", "lora.dropout=0.1", "--set", "lora.target_modules=query,value"]
        _, wall = run(cmd, f"llmkit {method}")
        facts = run_facts(out)
        ours = {"samples_per_s": facts["train_samples_per_s"], "train_s": facts["train_seconds"],
                "acc": facts["metrics"]["eval_accuracy"]}
        print(f"llmkit {method:4s} train_s={ours['train_s']:.1f} samples_per_s={ours['samples_per_s']:.1f} "
              f"test_acc={ours['acc']:.4f} wall_s={wall:.1f}", flush=True)

        peer_cmd = [sys.executable, SHARED / "bench" / "peer_cls_trainer.py", model, train, test, "--epochs", a.epochs]
        text, peer_wall = run([*peer_cmd, "--lora"] if method == "lora" else peer_cmd, f"peer {method}")
        peer = fields(text, "peer_trainer")
        print(f"peer   {method:4s} train_s={peer['train_s']:.1f} samples_per_s={peer['samples_per_s']:.1f} "
              f"test_acc={peer['test_acc']:.4f} wall_s={peer_wall:.1f}", flush=True)
        speed = ours["samples_per_s"] / peer["samples_per_s"]
        delta = 100 * (ours["acc"] - peer["test_acc"])
        print(f"ratio {method:4s} samples_per_s llmkit/peer = {speed:.2f} (target >= 2)  "
              f"accuracy llmkit-peer = {delta:+.1f} points (target >= -0.5)  wall peer/llmkit = {peer_wall / wall:.2f}", flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
