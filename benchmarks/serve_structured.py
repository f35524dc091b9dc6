"""Constrained decoding and log-probs: what they cost (issue 41).

    python benchmarks/serve_structured.py [--model smollm2-135m] [--tokens 48] [--threads 1]

1. Generation tokens/s on the same chat prompts, greedy, without and with a JSON-schema constraint: llama.cpp
   (its grammar sampler) and transformers (xgrammar), on the same model.
2. `llmkit serve` (llama.cpp) completion tokens/s with and without `logprobs` (top 5), one request at a time.
Prints one line per measurement after the CPU line.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import urllib.request

from llmkit.machine import cpu_line

PROMPTS = ["Describe a person.", "Invent a city.", "A book you like.", "Describe a pet."]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


def generation(model: str, backend: str, tokens: int, threads: int) -> None:
    from llmkit.inference.backends import open_backend
    from llmkit.inference.constraints import json_schema
    from llmkit.inference.sampling import SamplingOptions
    from llmkit.models.refs import resolve

    plain = SamplingOptions(max_new_tokens=tokens, temperature=0, chat=True)
    engine = open_backend(resolve(model), PROMPTS, plain, backend, threads=threads, progress=False)
    list(engine.generate(PROMPTS[:1], SamplingOptions(max_new_tokens=4, temperature=0, chat=True)))  # warm-up
    for name, opts in [("unconstrained", plain), ("json_schema", SamplingOptions(max_new_tokens=tokens, temperature=0, chat=True,
                                                                                   constraint=json_schema(SCHEMA)))]:
        start, new, valid = time.perf_counter(), 0, 0
        for prompt in PROMPTS:  # one at a time: transformers would batch, llama.cpp cannot
            gen = next(iter(engine.generate([prompt], opts)))
            new += gen.new_tokens
            try:
                valid += isinstance(json.loads(gen.text), dict)
            except ValueError:
                pass
        seconds = time.perf_counter() - start
        print(f"generate {engine.name:<12} {name:<13} {new / seconds:6.1f} tok/s  ({new} tokens, {len(PROMPTS)} prompts, "
              f"{valid}/{len(PROMPTS)} parse as JSON)", flush=True)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1, help="1: steady numbers on a shared machine (README: Threads)")
    args = parser.parse_args()
    print(cpu_line(), flush=True)
    generation(args.model, "llama.cpp", args.tokens, args.threads)
    generation(args.model, "transformers", args.tokens, args.threads)
    serving(args.model, args.tokens, args.threads)


if __name__ == "__main__":
    main()
