"""Preference tuning: llmkit --objective dpo vs TRL's DPOTrainer (the peer users would pick), same work, one run.

Sentiment preferences from rt-polarity (recipes/data/sentiment_pairs.py: prompt = the review + a question, chosen =
the right one-word answer, rejected = the wrong one; `--variant format`: rejected = the right sentiment in the
verbose sentence the base model answers with) on SmolLM2-135M-Instruct (the bundled GGUF, de-quantized to fp32),
LoRA r=16 / alpha 32 / dropout 0 on all linear layers, beta 0.1, the same rows in the same order (llmkit's seed-0
order, no length grouping), one epoch, batch 8, linear LR without warmup, max length 256, the same precision.
Dropout is off on both sides (both defaults).

  1. TRL DPOTrainer (benchmarks/peers/trl_dpo.py): the reference is the base with the adapter off, run every step
  2. llmkit finetune --objective dpo: the reference log-probs computed once before training (and cached)

Prints the first steps' losses of both (they start at ln 2 and should track each other), train samples/s (pairs),
wall time and peak RSS of each process, and for the base and both results, scored by the same scorer: held-out
preference accuracy (`llmkit evaluate` on pairs; reference = the base) and exact-match of greedy answers
(`llmkit evaluate --generate-answers` on the same reviews as chat). Targets: samples/s >= 1.5x TRL's, peak RSS
<= 0.7x TRL's, preference accuracy >= TRL's - 1 point.

Usage: python benchmarks/preference.py [--train-rows 256] [--eval-rows 200] [--lr 5e-5] [--variant label|format] [--skip-peer]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
from pathlib import Path

from _common import HERE, LLMKIT, SHARED, bundled_smollm2, fields, first_line, run_facts
from finetune_chat import Proc, measured, scores_of

sys.path.insert(0, str(HERE.parent / "recipes" / "data"))
from sentiment_chat import conversation
from sentiment_pairs import pair

STEPS_SHOWN = 6


def write_data(csv_path: Path, rows: int, variant: str, work: Path, name: str) -> int:
    with open(csv_path, encoding="utf-8", newline="") as f:
        reviews = list(csv.DictReader(f))[:rows]
    pairs = [pair(r["text"], r["label"], variant) for r in reviews]
    (work / f"{name}.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    # TRL's conversational preference rows: the same turns as messages
    (work / f"{name}-trl.jsonl").write_text("".join(json.dumps(
        {"prompt": [{"role": "user", "content": p["prompt"]}], "chosen": [{"role": "assistant", "content": p["chosen"]}],
         "rejected": [{"role": "assistant", "content": p["rejected"]}]}, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    (work / f"{name}-chat.jsonl").write_text("".join(json.dumps(conversation(r["text"], r["label"]), ensure_ascii=False) + "\n"
                                                     for r in reviews), encoding="utf-8")
    return len(pairs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-rows", type=int, default=256)
    p.add_argument("--eval-rows", type=int, default=200)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--variant", choices=("label", "format"), default="label")
    p.add_argument("--skip-peer", action="store_true", help="llmkit only (no TRL run)")
    a = p.parse_args()

    from llmkit.training import resolve_precision
    gguf = bundled_smollm2()
    if not a.skip_peer:
        try:
            import trl
        except ImportError:
            sys.exit("needs TRL for the peer run: pip install trl (or pass --skip-peer)")
    precision = resolve_precision("auto")
    src = SHARED / "data" / "rt-polarity"
    work = Path(tempfile.mkdtemp(prefix="llmkit-bench-dpo-"))
    logs = work / "logs"
    logs.mkdir()
    n_train = write_data(src / "train.csv", a.train_rows, a.variant, work, "train")
    n_eval = write_data(src / "validation.csv", a.eval_rows, a.variant, work, "eval")

    print(first_line(), flush=True)
    print(f"SmolLM2-135M-Instruct DPO LoRA (r=16, alpha 32, dropout 0, all-linear) on sentiment pairs ({a.variant}): {n_train} train / "
          f"{n_eval} eval pairs, 1 epoch, batch 8, lr {a.lr:g} linear, beta {a.beta:g}, max length 256, "
          f"precision {'bf16 autocast' if precision == 'bf16' else 'fp32'}{'' if a.skip_peer else f', TRL {trl.__version__}'}", flush=True)

    def score(model: Path | str, label: str) -> tuple[dict, dict, Proc]:
        prefs = measured([*LLMKIT, "evaluate", "--model", model, "--data", work / "eval.jsonl", "--reference", "smollm2-135m",
                          "--json", "--quiet"], f"prefs-{label}", logs)
        answers = measured([*LLMKIT, "evaluate", "--model", model, "--data", work / "eval-chat.jsonl", "--generate-answers", "-n", 4,
                            "--json", "--quiet"], f"answers-{label}", logs)
        return scores_of(prefs), scores_of(answers), answers

    results: dict[str, dict] = {}
    if not a.skip_peer:
        out = work / "trl"
        run = measured([sys.executable, HERE / "peers" / "trl_dpo.py", gguf.parent, work / "train-trl.jsonl", out, "--gguf", gguf.name,
                        "--bs", 8, "--lr", a.lr, "--beta", a.beta, "--max-length", 256, *(["--bf16"] if precision == "bf16" else [])],
                       "trl", logs)
        facts = fields(run.stdout, "peer_dpo ")
        losses = [fields(line, "peer_dpo_loss")["loss"] for line in run.stdout.splitlines() if line.startswith("peer_dpo_loss")]
        results["TRL DPOTrainer"] = {"folder": out, "run": run, "samples_per_s": facts["samples_per_s"], "train_s": facts["train_s"],
                                     "losses": losses}
    out = work / "llmkit"
    run = measured([*LLMKIT, "finetune", "--objective", "dpo", "--model", "smollm2-135m", "--method", "lora", "--data", work / "train.jsonl",
                    "--out", out, "--epochs", 1, "--batch-size", 8, "--lr", a.lr, "--beta", a.beta, "--block-size", 256, "--quiet",
                    "--set", "lora.r=16", "--set", "lora.alpha=32", "--set", "lora.target_modules=all-linear", "--set", "train.warmup_ratio=0",
                    "--set", "train.group_by_length=false", "--set", "train.log_every=1",
                    "--set", f"preference.cache_dir={work / 'reference'}"], "llmkit", logs)
    facts = run_facts(out)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    results["llmkit"] = {"folder": out, "run": run, "samples_per_s": facts["train_samples_per_s"], "train_s": facts["train_seconds"],
                         "losses": losses}

    zero_prefs, zero_answers, _ = score("smollm2-135m", "base")
    for name, r in results.items():
        r["prefs"], r["answers"], _ = score(r["folder"], name.split()[0])

    print(f"\nfirst {STEPS_SHOWN} steps' loss (ln 2 = 0.693147 at step 1):")
    for name, r in results.items():
        print(f"  {name:15s} " + " ".join(f"{x:.4f}" for x in r["losses"][:STEPS_SHOWN]) + f"   ... last {r['losses'][-1]:.4f}")
    print(f"\n{'run':15s} {'pref_acc':>8s} {'logp_acc':>8s} {'exact':>6s} {'samples/s':>9s} {'train_s':>8s} {'wall_s':>7s} {'rss_MB':>7s}")
    print(f"{'base':15s} {zero_prefs.get('preference_accuracy', 0):8.3f} {zero_prefs['logp_accuracy']:8.3f} "
          f"{zero_answers['exact_match']:6.3f}")
    for name, r in results.items():
        print(f"{name:15s} {r['prefs']['preference_accuracy']:8.3f} {r['prefs']['logp_accuracy']:8.3f} {r['answers']['exact_match']:6.3f} "
              f"{r['samples_per_s']:9.2f} {r['train_s']:8.1f} {r['run'].wall:7.1f} {r['run'].peak_rss_mb:7.0f}")
    if "TRL DPOTrainer" in results:
        t, o = results["TRL DPOTrainer"], results["llmkit"]
        print(f"\nratio samples_per_s llmkit/TRL = {o['samples_per_s'] / t['samples_per_s']:.2f} (target >= 1.5)  "
              f"wall TRL/llmkit = {t['run'].wall / o['run'].wall:.2f}  "
              f"peak RSS llmkit/TRL = {o['run'].peak_rss_mb / t['run'].peak_rss_mb:.2f} (target <= 0.7)")
        print(f"preference accuracy llmkit - TRL = {o['prefs']['preference_accuracy'] - t['prefs']['preference_accuracy']:+.3f} "
              f"(target >= -0.01)  exact-match llmkit - TRL = {o['answers']['exact_match'] - t['answers']['exact_match']:+.3f}")
        worst = max(abs(x - y) for x, y in zip(t["losses"][:STEPS_SHOWN], o["losses"][:STEPS_SHOWN], strict=False))
        print(f"per-step loss, first {STEPS_SHOWN} steps: largest difference {worst:.4f}", flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
