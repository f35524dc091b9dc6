"""Data at scale: a 1 GB text corpus and a 1,000,000-row chat set, llmkit vs the peer a user would write, in one run.

    .venv/bin/pip install -e '.[bench]' && .venv/bin/python benchmarks/data_scale.py [--text-mb 1000] [--chat-rows 1000000]

Text: `llmkit finetune --method lora` (SmolLM2-135M, 2 steps, batch 2, 128-token blocks) vs benchmarks/peers/clm_data.py
(run_clm.py's `load_dataset("text")` + batched `map(num_proc=2)` + `group_texts` + Trainer). Chat: the same llmkit
command on a `messages` JSONL vs benchmarks/peers/trl_chat_data.py (TRL SFTTrainer, `dataset_num_proc=2`). Each runs
cold (empty caches) and warm (the same command again). Printed per run: peak resident memory of the whole process
tree (every worker included, sampled every 0.1 s), seconds to the end of the first optimizer step, and the cache on
disk; then the ratios against the issue's targets. The corpora are made from ../shared/data with seeded shuffles.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import HERE, LLMKIT, SHARED, bundled_smollm2, first_line


def make_text(path: Path, megabytes: int) -> None:
    """Tiny Shakespeare's paragraphs, shuffled with a new seed per pass, until the file has `megabytes` MB."""
    if path.exists() and path.stat().st_size >= megabytes * 1_000_000:
        return
    paragraphs = (SHARED / "data" / "tinyshakespeare" / "train.txt").read_text(encoding="utf-8").split("\n\n")
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        seed = 0
        while f.tell() < megabytes * 1_000_000:
            random.Random(seed).shuffle(paragraphs)
            f.write("\n\n".join(paragraphs) + "\n\n")
            seed += 1
    os.replace(tmp, path)


QUESTIONS = ["Is the sentiment of this movie review positive or negative?", "Positive or negative?",
             "How does the reviewer feel about the film: positive or negative?", "Classify the sentiment (positive/negative)."]


def make_chat(path: Path, rows: int) -> None:
    """rt-polarity reviews as `messages` conversations (user: review + a question, assistant: the label), seeded shuffles."""
    if path.exists() and sum(1 for _ in open(path, "rb")) >= rows:
        return
    import csv

    with open(SHARED / "data" / "rt-polarity" / "train.csv", encoding="utf-8") as f:
        reviews = [(r["text"], int(r["label"])) for r in csv.DictReader(f)]
    tmp = path.with_suffix(".tmp")
    rng = random.Random(0)
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(rows):
            text, label = reviews[rng.randrange(len(reviews))]
            q = QUESTIONS[i % len(QUESTIONS)]
            msgs = [{"role": "user", "content": f"Review: {text}\n{q} Answer with one word."},
                    {"role": "assistant", "content": "positive" if label else "negative"}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    os.replace(tmp, path)


def tree_rss(root: int) -> int:
    """Resident bytes of `root` and every process below it (from /proc: no psutil needed)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/status") as f:
                total += int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) * 1024
        except (OSError, StopIteration):
            pass
    return total


def measure(cmd: list[str], env: dict[str, str], first_step: str) -> dict[str, float]:
    """Run `cmd`; peak tree RSS, seconds until a line starting with `first_step` appears, wall seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, seen, lines = 0, None, []

    def sample() -> None:
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line)
        if seen is None and line.startswith(first_step):
            seen = time.perf_counter() - start
    proc.wait()
    sampler.join()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n{''.join(lines[-40:])}")
    return {"peak_gb": peak / 1e9, "first_step_s": seen if seen is not None else wall, "wall_s": wall, "log": "".join(lines)}


def print_prep(log: str) -> None:
    """llmkit's own summary of the preparation: the last progress line of each pass and the total."""
    last: dict[str, str] = {}
    for line in log.splitlines():
        for what in ("checking train data:", "tokenizing train data:", "prepared data:"):
            if line.startswith(what):
                last[what] = line.strip()
    for line in last.values():
        print(f"  llmkit: {line}")


def disk_gb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e9 if folder.exists() else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text-mb", type=int, default=1000)
    p.add_argument("--chat-rows", type=int, default=1_000_000)
    p.add_argument("--only", choices=["text", "chat"], help="run one half")
    p.add_argument("--warm-only", action="store_true", help="keep the caches of an earlier run and time only the warm runs")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "llmkit-data-scale"), help="where the corpora and caches go")
    a = p.parse_args()
    print(first_line(), flush=True)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    gguf = bundled_smollm2()
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "LLMKIT_PROGRESS_EVERY": "0"}
    common = ["--model", "smollm2-135m", "--method", "lora", "--max-steps", "2", "--batch-size", "2", "--block-size", "128",
              "--overwrite", "--save-every", "0", "--set", "train.log_every=1"]

    def llmkit(data: Path, out: str, cache: Path) -> dict[str, float]:
        env = {**base_env, "LLMKIT_CACHE": str(cache)}
        return measure([*LLMKIT, "finetune", *common, "--data", data, "--out", work / out], env, "training: 1/")

    def peer(script: str, data: Path, cache: Path, *extra: str) -> dict[str, float]:
        env = {**base_env, "HF_DATASETS_CACHE": str(cache)}
        return measure([sys.executable, HERE / "peers" / script, gguf.parent, "--gguf", gguf.name, data, *extra], env, "peer_first_step")

    def report(name: str, r: dict[str, float], cache: Path) -> None:
        data = cache / "data" if name.startswith("llmkit") else cache  # llmkit's cache also keeps the fp32 base (bases/)
        print(f"{name:<22} peak_gb={r['peak_gb']:.2f} first_step_s={r['first_step_s']:.1f} wall_s={r['wall_s']:.1f} "
              f"data_cache_gb={disk_gb(data):.2f}", flush=True)

    if a.only in (None, "text"):
        small = SHARED / "data" / "tinyshakespeare" / "train.txt"
        big = work / f"corpus-{a.text_mb}mb.txt"
        make_text(big, a.text_mb)
        print(f"text corpus {big} {big.stat().st_size / 1e9:.2f} GB", flush=True)
        runs = {}
        c_small, c_llmkit, c_peer = work / "cache-small", work / "cache-llmkit-text", work / "cache-peer-text"
        if a.warm_only:
            report("llmkit text warm", llmkit(big, "run-text", c_llmkit), c_llmkit)
            report("peer text warm", peer("clm_data.py", big, c_peer), c_peer)
            return
        for c in (c_small, c_llmkit, c_peer):
            shutil.rmtree(c, ignore_errors=True)
        runs["llmkit 1MB cold"] = (llmkit(small, "run-small", c_small), c_small)
        runs["llmkit text cold"] = (llmkit(big, "run-text", c_llmkit), c_llmkit)
        runs["llmkit text warm"] = (llmkit(big, "run-text", c_llmkit), c_llmkit)
        runs["peer text cold"] = (peer("clm_data.py", big, c_peer), c_peer)
        runs["peer text warm"] = (peer("clm_data.py", big, c_peer), c_peer)
        for name, (r, cache) in runs.items():
            report(name, r, cache)
        print_prep(runs["llmkit text cold"][0]["log"])
        for line in runs["peer text cold"][0]["log"].splitlines():
            if line.startswith("peer_data"):
                print(f"  peer: {line.strip()}")
        lc, lw, pc, pw, s = (runs[k][0] for k in ("llmkit text cold", "llmkit text warm", "peer text cold", "peer text warm", "llmkit 1MB cold"))
        print(f"ratio text peak llmkit_1GB/llmkit_1MB = {lc['peak_gb'] / s['peak_gb']:.2f} (target <= 1.2)")
        print(f"ratio text peak llmkit/peer = {lc['peak_gb'] / pc['peak_gb']:.2f} (target <= 1.0)")
        print(f"ratio text cold first_step llmkit/peer = {lc['first_step_s'] / pc['first_step_s']:.2f} (target <= 1.0)")
        print(f"ratio text warm/cold first_step llmkit = {lw['first_step_s'] / lc['first_step_s']:.2f} (target <= 0.10); "
              f"peer = {pw['first_step_s'] / pc['first_step_s']:.2f}", flush=True)

    if a.only in (None, "chat"):
        chat = work / f"chat-{a.chat_rows}.jsonl"
        make_chat(chat, a.chat_rows)
        print(f"chat set {chat} {a.chat_rows:,} rows {chat.stat().st_size / 1e9:.2f} GB", flush=True)
        c_llmkit, c_peer = work / "cache-llmkit-chat", work / "cache-peer-chat"
        if a.warm_only:
            for name, data, script, cache in (("llmkit chat warm", chat, None, c_llmkit), ("peer chat warm", chat, "trl_chat_data.py", c_peer)):
                report(name, llmkit(data, "run-chat", cache) if script is None else peer(script, data, cache, "--max-length", "128"), cache)
            return
        for c in (c_llmkit, c_peer):
            shutil.rmtree(c, ignore_errors=True)
        runs = {"llmkit chat cold": (llmkit(chat, "run-chat", c_llmkit), c_llmkit),
                "llmkit chat warm": (llmkit(chat, "run-chat", c_llmkit), c_llmkit),
                "peer chat cold": (peer("trl_chat_data.py", chat, c_peer, "--max-length", "128"), c_peer),
                "peer chat warm": (peer("trl_chat_data.py", chat, c_peer, "--max-length", "128"), c_peer)}
        for name, (r, cache) in runs.items():
            report(name, r, cache)
        print_prep(runs["llmkit chat cold"][0]["log"])
        lc, lw, pc, pw = (runs[k][0] for k in ("llmkit chat cold", "llmkit chat warm", "peer chat cold", "peer chat warm"))
        print(f"ratio chat peak llmkit/peer = {lc['peak_gb'] / pc['peak_gb']:.2f} (target <= 1.0)")
        print(f"ratio chat cold first_step llmkit/peer = {lc['first_step_s'] / pc['first_step_s']:.2f} (target <= 1.0)")
        print(f"ratio chat warm/cold first_step llmkit = {lw['first_step_s'] / lc['first_step_s']:.2f} (target <= 0.10); "
              f"peer = {pw['first_step_s'] / pc['first_step_s']:.2f}", flush=True)


if __name__ == "__main__":
    main()
