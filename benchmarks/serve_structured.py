"""Constrained decoding and log-probs: what they cost (issue 41).

    python benchmarks/serve_structured.py [--model smollm2-135m] [--tokens 48] [--threads 1] [--tools-run runs/tools-lora]
                                          [--parts generate,serve,tools] [--rounds 3]

1. Generation tokens/s on the same chat prompts, greedy, without and with a JSON-schema constraint: llama.cpp
   (its grammar sampler) and transformers (xgrammar), on the same model.
2. `llmkit serve` (llama.cpp) completion tokens/s with and without `logprobs` (top 5), one request at a time.
3. Tool-call accuracy (`llmkit evaluate` on tool data: right functions, arguments that validate and equal the
   reference) on the tool-use recipe's held-out questions (unseen cities and numbers, recipes/data/tool_use.py), of
   the recipe's LoRA fine-tune and, beside it, of the base model zero-shot (target: the fine-tune >= 0.9). The
   fine-tune is `--tools-run` when given, else the recipe is trained here first (about an hour on 2 cores).
Prints one line per measurement after the CPU line.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
import urllib.request

from llmkit.machine import cpu_line

PROMPTS = ["Describe a person.", "Invent a city.", "A book you like.", "Describe a pet."]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


def generation(model: str, backend: str, tokens: int, threads: int, rounds: int) -> None:
    from llmkit.inference.backends import open_backend
    from llmkit.inference.constraints import json_schema
    from llmkit.inference.sampling import SamplingOptions
    from llmkit.models.refs import resolve

    plain = SamplingOptions(max_new_tokens=tokens, temperature=0, chat=True)
    engine = open_backend(resolve(model), PROMPTS, plain, backend, threads=threads, progress=False)
    list(engine.generate(PROMPTS[:1], SamplingOptions(max_new_tokens=4, temperature=0, chat=True)))  # warm-up
    configs = [("unconstrained", plain), ("json_schema", SamplingOptions(max_new_tokens=tokens, temperature=0, chat=True,
                                                                          constraint=json_schema(SCHEMA)))]
    speeds: dict[str, list[float]] = {name: [] for name, _ in configs}
    counts: dict[str, tuple[int, int]] = {}  # name -> (tokens, answers that parse as JSON) of a pass: greedy, all alike
    for _ in range(rounds):  # the two alternate, so a busy moment of the machine hits both
        for name, opts in configs:
            start, new, valid = time.perf_counter(), 0, 0
            for prompt in PROMPTS:  # one at a time: transformers would batch, llama.cpp cannot
                gen = next(iter(engine.generate([prompt], opts)))
                new += gen.new_tokens
                try:
                    valid += isinstance(json.loads(gen.text), dict)
                except ValueError:
                    pass
            speeds[name].append(new / (time.perf_counter() - start))
            counts[name] = (new, valid)
    for name, runs in speeds.items():
        print(f"generate {engine.name:<12} {name:<13} {statistics.median(runs):6.1f} tok/s, median of {rounds} passes "
              f"({min(runs):.1f}-{max(runs):.1f}; {counts[name][0]} tokens, {len(PROMPTS)} prompts, {counts[name][1]}/{len(PROMPTS)} "
              "parse as JSON)", flush=True)
    ratio = statistics.median(speeds["json_schema"]) / statistics.median(speeds["unconstrained"])
    print(f"ratio {engine.name} constrained / unconstrained = {ratio:.2f}x (target >= 0.8x)", flush=True)


def serving(model: str, tokens: int, threads: int) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "llmkit", "serve", "--model", model, "--port", "0", "--threads", str(threads)],
                            stderr=subprocess.PIPE, text=True)
    try:
        url = None
        while url is None:
            line = proc.stderr.readline()  # type: ignore[union-attr]
            if not line:
                raise SystemExit("llmkit serve did not start")
            if found := re.search(r"on (http://\S+)", line):
                url = found.group(1)

        def ask(body: dict) -> int:
            req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=600) as r:
                return json.loads(r.read())["usage"]["completion_tokens"]

        ask({"prompt": "Hi", "max_tokens": 4, "temperature": 0})
        for name, extra in [("no logprobs", {}), ("logprobs 5", {"logprobs": 5})]:
            start, new = time.perf_counter(), 0
            for prompt in PROMPTS:
                new += ask({"prompt": prompt, "max_tokens": tokens, "temperature": 0, **extra})
            seconds = time.perf_counter() - start
            print(f"serve    llama.cpp    {name:<13} {new / seconds:6.1f} tok/s  ({new} tokens, {len(PROMPTS)} requests)", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)


def tool_accuracy(model: str, run: str | None, examples: int) -> None:
    import tempfile
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    work = Path(tempfile.mkdtemp(prefix="llmkit-bench-tools-"))
    subprocess.run([sys.executable, repo / "recipes" / "data" / "tool_use.py"], cwd=work, check=True, capture_output=True)
    if run is not None:
        run = str(Path(run).resolve())  # evaluate runs in the work folder
    else:
        run = str(work / "runs" / "tools-lora")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "llmkit", "finetune", "--recipe", repo / "recipes" / "smollm2-135m-tools-lora.yaml",
                        "--out", run, "--quiet"], cwd=work, check=True)
        print(f"tools recipe fine-tune: {time.perf_counter() - start:.0f} s", flush=True)
    for label, which in [("base model, zero-shot", model), ("tools recipe LoRA", run)]:
        out = subprocess.run([sys.executable, "-m", "llmkit", "evaluate", "--model", which, "--data",
                              work / "data" / "tools" / "validation.jsonl", "--max-examples", str(examples), "--quiet"],
                             cwd=work, check=True, capture_output=True, text=True).stdout
        line = next((x for x in out.splitlines() if x.startswith("tool-call accuracy")), out.strip()[-300:])
        print(f"tools    {label:<22} {line}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1, help="1: steady numbers on a shared machine (README: Threads)")
    parser.add_argument("--tools-run", help="the tool-use recipe's LoRA run folder (else it is trained here)")
    parser.add_argument("--tool-examples", type=int, default=200, help="held-out conversations scored for tool calls")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes per generation setting (the median is printed)")
    parser.add_argument("--parts", default="generate,serve,tools", help="which parts to run, comma-separated")
    args = parser.parse_args()
    print(cpu_line(), flush=True)
    parts = args.parts.split(",")
    if "generate" in parts:
        generation(args.model, "llama.cpp", args.tokens, args.threads, args.rounds)
        generation(args.model, "transformers", args.tokens, args.threads, args.rounds)
    if "serve" in parts:
        serving(args.model, args.tokens, args.threads)
    if "tools" in parts:
        tool_accuracy(args.model, args.tools_run, args.tool_examples)


if __name__ == "__main__":
    main()
