"""Serving speed: `llmkit serve` vs llama-cpp-python's own OpenAI server, same GGUF, same requests, loopback.

Both servers run the bundled SmolLM2-135M GGUF with the same threads and a 4096-token context. At each
concurrency (1, 4, 16) the same chat requests (distinct questions, max_tokens 32, temperature 0, repeat
penalty off) are sent through the real `openai` client by that many threads at once; the levels alternate
between the two servers so drift in machine load hits both alike. Printed per server and level: aggregate
completion tokens/s, p50 / p95 request latency, and whether both servers gave the same texts; then the
ratios against the targets (llmkit >= 1.0x the peer at concurrency 1, >= 1.5x at 16).

`--parallel N` (N > 1) runs llmkit with continuous batching on llama.cpp (`llmkit serve --parallel N`): up to N
sequences decoded together in one context, the cached prompt prefix shared; 1 is serve's default path.
Without `--threads`, llmkit runs at its default (the cores other processes leave idle) and the peer on every core.

`--busy`: the machine is kept busy by a `llmkit finetune` LoRA run on the bundled SmolLM2 (both cores), and the
two servers compared are `llmkit serve` at its default threads and `llmkit serve --threads N` (every core: the
default before issue 30); defaults become 8 requests per level, concurrency 1 and 4, max_tokens 16.

Usage: python benchmarks/serve.py [--requests 32] [--max-tokens 32] [--concurrency 1 4 16] [--threads N] [--parallel N] [--busy] [--budget 900]
Needs: pip install -e '.[bench]'  (llama-cpp-python[server], the peer) and openai.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import first_line

QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "How many legs does a spider have?",
    "What is photosynthesis?", "Give me a synonym for happy.", "Why is the sky blue?", "What is 12 times 12?",
    "Who wrote Romeo and Juliet?", "What does a compiler do?", "Describe a cat in one sentence.",
    "What is the boiling point of water?", "Suggest a name for a goldfish.", "What is gravity?",
    "How do bees make honey?", "What is the largest ocean?", "Write a haiku about rain.",
]
# llama.cpp's AMX kernels crash in batched prompt evaluation on AMX CPUs (see llmkit/inference/llama_cpp.py); the peer
# gets the same one-line work-around llmkit applies, or it could not run there at all.
PEER = """
import sys, llama_cpp
if " amx_int8" in open("/proc/cpuinfo").read():
    default = llama_cpp.llama_cpp.llama_model_default_params
    def params():
        p = default(); p.use_extra_bufts = False; return p
    llama_cpp.llama_cpp.llama_model_default_params = params
from llama_cpp.server.__main__ import main
sys.argv = ["llama_cpp.server", *sys.argv[1:]]
main()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, cmd: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.url, self.log = name, f"http://127.0.0.1:{port}", log
        with open(log, "w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
        try:
            self._wait_ready()
        except BaseException:  # including the --budget alarm: never leave a server behind
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        while True:  # both answer /v1/models once the model is loaded
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"{self.name} did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:  # still draining a request nobody waits for any more
                self.proc.kill()
                self.proc.wait()


def start_competitor(logs: Path) -> subprocess.Popen:
    """A `llmkit finetune` LoRA run on the bundled SmolLM2 that keeps every core busy, returned once it trains."""
    root = Path(__file__).resolve().parents[1]
    log = logs / "finetune.log"
    with open(log, "w") as f:
        trainer = subprocess.Popen([sys.executable, "-m", "llmkit", "finetune", "--recipe", str(root / "recipes" / "smollm2-135m-shakespeare-lora.yaml"),
                                    "--max-steps", "100000", "--out", str(logs / "run")], stdout=f, stderr=subprocess.STDOUT, cwd=root,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 300
    while "fine-tuning " not in log.read_text():  # its start line: the model is loaded, training begins
        if trainer.poll() is not None or time.monotonic() > deadline:
            trainer.kill()
            sys.exit(f"the competing fine-tuning run did not start:\n{log.read_text()[-2000:]}")
        time.sleep(1)
    time.sleep(5)
    return trainer


def run_level(server: Server, model: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)

    def one(i: int) -> tuple[float, int, str]:
        start = time.perf_counter()
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                           max_tokens=max_tokens, temperature=0, extra_body={"repeat_penalty": 1.0})
        return time.perf_counter() - start, r.usage.completion_tokens, r.choices[0].message.content

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        rows = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in rows)
    tokens = sum(r[1] for r in rows)
    return {"tok_s": tokens / wall, "p50": statistics.median(latencies), "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
            "tokens": tokens, "wall": wall, "texts": [r[2] for r in rows]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=None, help="per level [default: 32; 8 with --busy]")
    ap.add_argument("--max-tokens", type=int, default=None, help="[default: 32; 16 with --busy]")
    ap.add_argument("--concurrency", type=int, nargs="+", default=None, help="[default: 1 4 16; 1 4 with --busy]")
    ap.add_argument("--threads", type=int, default=None,
                    help="llama.cpp threads, the same for both [default: llmkit's own default; every core for the peer]")
    ap.add_argument("--busy", action="store_true", help="compete with a llmkit finetune run; compare llmkit's default threads with every core")
    ap.add_argument("--parallel", type=int, default=1, help="llmkit: sequences decoded together on llama.cpp (1 = one request at a time)")
    ap.add_argument("--budget", type=int, default=900, help="seconds before the whole run gives up (servers are stopped)")
    args = ap.parse_args()
    args.requests = args.requests or (8 if args.busy else 32)
    args.max_tokens = args.max_tokens or (16 if args.busy else 32)
    args.concurrency = args.concurrency or ([1, 4] if args.busy else [1, 4, 16])
    print(first_line(), flush=True)

    def give_up(signum: int, frame: object) -> None:  # SystemExit unwinds through `finally`, which stops both servers
        raise SystemExit(f"benchmark stopped: {'--budget of ' + str(args.budget) + ' s exceeded' if signum == signal.SIGALRM else 'terminated'}"
                         " (on a busy machine llama.cpp with every core stalls: try --threads 1)")

    signal.signal(signal.SIGTERM, give_up)
    signal.signal(signal.SIGALRM, give_up)
    signal.alarm(args.budget)

    from llmkit.models import resolve
    gguf = str(resolve("smollm2-135m").path)
    cores = str(len(os.sched_getaffinity(0)))
    threads = str(args.threads) if args.threads else cores  # the peer's
    ours = ["--threads", str(args.threads)] if args.threads else []
    logs = Path(tempfile.mkdtemp(prefix="llmkit-bench-serve-"))
    servers: dict[str, Server] = {}
    trainer = None
    try:
        if args.busy:
            trainer = start_competitor(logs)
        llmkit = [sys.executable, "-m", "llmkit", "serve", "--model", gguf, "--max-concurrency", "256", "--parallel", str(args.parallel), "--quiet"]
        port = free_port()
        servers["llmkit"] = Server("llmkit serve", [*llmkit, "--port", str(port), *ours], port, logs / "llmkit.log")
        port = free_port()
        if args.busy:  # the peer here is llmkit as it was: every core
            servers["peer"] = Server(f"llmkit --threads {cores}", [*llmkit, "--port", str(port), "--threads", cores], port, logs / "peer.log")
        else:
            servers["peer"] = Server("llama_cpp.server", [sys.executable, "-c", PEER, "--model", gguf, "--port", str(port), "--n_ctx", "4096",
                                                          "--n_threads", threads, "--n_threads_batch", threads, "--verbose", "False",
                                                          "--interrupt_requests", "False"], port, logs / "peer.log")
        models = {"llmkit": gguf, "peer": gguf}
        for key, srv in servers.items():  # warm-up: first-request costs are not what is measured
            run_level(srv, models[key], 1, 2, 8)
        results: dict[tuple[str, int], dict] = {}
        for c in args.concurrency:
            for key, srv in servers.items():
                results[key, c] = run_level(srv, models[key], c, args.requests, args.max_tokens)
                r = results[key, c]
                print(f"{srv.name:<17} concurrency {c:>2}: {r['tok_s']:7.1f} completion tok/s  p50 {r['p50']:6.2f} s  "
                      f"p95 {r['p95']:6.2f} s  ({r['tokens']} tokens in {r['wall']:.1f} s)", flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
        if trainer is not None:
            alive = trainer.poll() is None
            trainer.kill()
            trainer.wait()
            print(f"(busy: the competing llmkit finetune run {'trained throughout' if alive else 'ENDED early'})")

    print(f"\n{args.requests} chat requests per level, max_tokens {args.max_tokens}, temperature 0, "
          f"threads: llmkit {args.threads or 'default'}{'' if args.busy else ', the peer ' + threads}, "
          f"llmkit --parallel {args.parallel}{', machine busy with llmkit finetune' if args.busy else ''}, same GGUF: {gguf}")
    targets = {1: 1.0, 16: 1.5} if not args.busy else {}
    for c in args.concurrency:
        ours, peer = results["llmkit", c], results["peer", c]
        same = sum(a == b for a, b in zip(ours["texts"], peer["texts"], strict=True))
        # same requests, same texts: the throughput ratio is the ratio of wall times (the servers count a
        # final end-of-turn token differently, so their own token counts differ by a few)
        ratio = peer["wall"] / ours["wall"]
        target = f" (target >= {targets[c]:.1f}x: {'met' if ratio >= targets[c] else 'NOT met'})" if c in targets else ""
        print(f"concurrency {c:>2}: llmkit/peer throughput {ratio:.2f}x{target}; "
              f"p50 latency {ours['p50'] / peer['p50']:.2f}x of the peer's; same text {same}/{len(ours['texts'])}")


if __name__ == "__main__":
    main()
