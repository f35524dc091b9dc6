"""Training-speed levers, one at a time: what each of llmkit's choices is worth on this CPU, beside the HF Trainer peer.

MiniLM-L6 seq-cls on rt-polarity (the first --rows training rows, 1 epoch, batch 32, lr 5e-5, max length 128, as in
finetune_cls.py), one process each, in one run:
  peer          the plain HF Trainer script (random batches padded to their longest row)
  llmkit        llmkit's defaults (length-grouped batches, fused AdamW, precision `auto`)
  -grouping     llmkit with --set train.group_by_length=false (random batches, like the peer)
  bf16          llmkit with --mixed-precision bf16 (what `auto` picks on AMX CPUs only)
then, in this process, two per-step costs that no flag switches, on one fixed batch of 32 x 40 tokens:
  AdamW fused vs foreach (the peer's) optimizer step, and the share of a training step that dropout takes.
Prints samples/s and the ratio to the peer for each row, and the accuracy on validation.csv.

Usage: python benchmarks/levers.py [--rows 2000]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import LLMKIT, SHARED, bundled_minilm, fields, first_line, run, run_facts


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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=2000, help="training rows (the first N of train.csv)")
    a = p.parse_args()
    print(first_line(), flush=True)

    model = bundled_minilm()
    data = SHARED / "data" / "rt-polarity"
    work = Path(tempfile.mkdtemp(prefix="llmkit-bench-levers-"))
    train, test = work / "train.csv", data / "validation.csv"
    train.write_text("\n".join((data / "train.csv").read_text().splitlines()[: a.rows + 1]) + "\n")
    print(f"MiniLM-L6 seq-cls on rt-polarity: {a.rows} train rows, 1 epoch, batch 32, lr 5e-5, max_length 128", flush=True)
    try:
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
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
