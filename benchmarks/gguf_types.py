"""GGUF types and fine-tuned folders at llama.cpp speed, on the bundled SmolLM2-135M, in one run.

(a) Every GGUF type llmkit writes (f16, q8_0 by llmkit's writer; q5_k_m, q4_k_m by llama.cpp's quantizer from
    an fp32 export) and the bundled Q4_1 file for reference: size, perplexity change against the fp32 model
    (transformers) on 16 x 256 tokens of ../shared/data/tinyshakespeare/validation.txt (llama.cpp computes the
    GGUF perplexities, as the `llmkit quantize` report does), greedy tokens/s in llama.cpp.
(b) A fine-tuned-style HF folder (SmolLM2 saved with save_pretrained, fp32 safetensors) through
    `llmkit generate --model FOLDER -n 64 --temperature 0`, end to end: on transformers, then `--backend auto`
    (first run converts into the GGUF cache, later runs use it; the default q8_0, then LLMKIT_GGUF_TYPE=q4_k_m),
    against the bundled GGUF. Target: the cached folder at >= 0.9x the bundled GGUF's tokens/s; and the first
    greedy tokens equal transformers'.

Usage: python benchmarks/gguf_types.py [--new 64] [--prompt "Once upon a time"] [--threads N]

--threads N runs torch, llama.cpp and every `llmkit generate` on N threads (default: llmkit's, one per core).
On a machine shared with other jobs use 1: llama.cpp's threads spin at barriers, so two threads on two busy
cores measured 10-30x slower than one (f16 prompt evaluation worst of all).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import LLMKIT, SHARED, first_line


def llama_speed(path: Path, prompt_ids: list[int], new: int, repeats: int = 2) -> float:
    """Greedy tokens/s in llama.cpp (best of `repeats`: the machine is shared)."""
    from llmkit.inference import LlamaCppBackend
    from llmkit.models import resolve
    backend = LlamaCppBackend(resolve(str(path)), n_ctx=len(prompt_ids) + new + 8)
    best = 0.0
    for _ in range(repeats):
        backend.llm.reset()
        made, start = 0, time.perf_counter()
        for _tok in backend.llm.generate(prompt_ids, temp=0.0, top_k=1):
            made += 1
            if made >= new:
                break
        best = max(best, made / (time.perf_counter() - start))
    backend.llm.close()
    return best


def type_table(work: Path, new: int, threads: int) -> Path:
    """Part (a); returns the fp32 HF folder that part (b) uses."""
    from llmkit import quantize as qz
    from llmkit.export import export, k_quant_fallbacks, tensor_types
    from llmkit.models import load_causal_lm, load_tokenizer, resolve
    ref = resolve("smollm2-135m")
    tok = load_tokenizer(ref)
    val = SHARED / "data" / "tinyshakespeare" / "validation.txt"
    blocks, _ = qz._eval_blocks(str(val), tok, 256, 16, "causal-lm")
    t = time.perf_counter()
    model = load_causal_lm(ref, device="cpu", dtype="float32", progress=False)
    print(f"loaded SmolLM2-135M fp32 in {time.perf_counter() - t:.1f} s; eval: {len(blocks)} x {len(blocks[0])} tokens of {val.name}", flush=True)
    import torch

    torch.set_num_threads(threads)
    fp32 = qz._quality(model, blocks, "causal-lm", str(val), tok)["perplexity"]
    folder = work / "smollm2-hf"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    fp32_mb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6
    print(f"{'type':18s} {'MB':>7s} {'size':>6s} {'ppl':>8s} {'ppl_change':>10s} {'tok/s':>7s} {'export_s':>8s}  tensor types", flush=True)
    print(f"{'fp32 (transformers)':18s} {fp32_mb:7.1f} {1:6.3f} {fp32:8.3f} {'':>10s} {'':>7s} {'':>8s}", flush=True)
    prompt = blocks[0][:32]
    rows = [(f"gguf-{t}", work / f"smollm2.{t}.gguf") for t in ("f16", "q8_0", "q5_k_m", "q4_k_m")] + [("bundled Q4_1", ref.path)]
    for name, path in rows:
        seconds = 0.0
        if not path.exists():
            t = time.perf_counter()
            export(model, tok, path, name.removeprefix("gguf-"), source_gguf=ref.path)
            seconds = time.perf_counter() - t
        ppl = qz._gguf_quality_and_speed(path, blocks, prompt)["perplexity"]
        speed = llama_speed(path, prompt, new)
        change = 100 * (ppl / fp32 - 1)
        types = tensor_types(path)
        note = f"  fallbacks (rows not a multiple of 256): {k_quant_fallbacks(path)}" if name.endswith("_k_m") else ""
        mb = path.stat().st_size / 1e6
        print(f"{name:18s} {mb:7.1f} {mb / fp32_mb:6.3f} {ppl:8.3f} {change:+9.2f}% {speed:7.1f} {seconds:8.1f}  {types}{note}", flush=True)
    del model
    return folder


def generate_json(model: Path | str, prompt: str, new: int, backend: str, env: dict[str, str], threads: int) -> tuple[dict, float]:
    cmd = [*LLMKIT, "generate", "--model", model, prompt, "-n", str(new), "--temperature", "0", "--json", "--backend", backend,
           "--threads", str(threads)]
    start = time.perf_counter()
    import subprocess

    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"generate {model} --backend {backend} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[0]), wall


def folder_speed(folder: Path, work: Path, prompt: str, new: int, threads: int) -> None:
    """Part (b)."""
    from transformers import AutoTokenizer

    from llmkit.models import alias_path
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LLMKIT_CACHE": str(work / "cache")}
    env.pop("LLMKIT_GGUF_TYPE", None)
    def best(model: Path | str, backend: str, run_env: dict[str, str], repeats: int = 2) -> tuple[dict, float]:
        """Best of `repeats` runs (tokens/s and wall): the machine is shared, and a slow outlier says nothing about llmkit."""
        results = [generate_json(model, prompt, new, backend, run_env, threads) for _ in range(repeats)]
        return max(results, key=lambda r: r[0]["tokens_per_s"])[0], min(r[1] for r in results)

    q4_env = {**env, "LLMKIT_GGUF_TYPE": "q4_k_m"}
    runs = {}
    runs["transformers"] = generate_json(folder, prompt, new, "transformers", env, threads)
    runs["auto, 1st (converts)"] = generate_json(folder, prompt, new, "auto", env, threads)
    runs["auto, cached q8_0"] = best(folder, "auto", env)
    runs["bundled Q4_1 GGUF"] = best(alias_path("smollm2-135m"), "auto", env)
    runs["auto q4_k_m, 1st"] = generate_json(folder, prompt, new, "auto", q4_env, threads)
    runs["auto, cached q4_k_m"] = best(folder, "auto", q4_env)
    cached = sorted((work / "cache" / "gguf").glob("*.gguf"))
    print(f"\nfine-tuned-style folder ({folder.name}, fp32 safetensors), `llmkit generate -n {new} --temperature 0 --threads {threads}`, "
          f"end to end (cached / bundled: best of 2); cache: {', '.join(f'{p.name} ({p.stat().st_size / 1e6:.0f} MB)' for p in cached)}", flush=True)
    print(f"{'run':22s} {'wall_s':>7s} {'tok/s':>7s}", flush=True)
    for name, (gen, wall) in runs.items():
        print(f"{name:22s} {wall:7.1f} {gen['tokens_per_s']:7.1f}", flush=True)
    tf, hit, bundled, q4 = (runs[k][0] for k in ("transformers", "auto, cached q8_0", "bundled Q4_1 GGUF", "auto, cached q4_k_m"))
    tok = AutoTokenizer.from_pretrained(folder)

    def same_prefix(x: str, y: str) -> str:
        a, b = tok(x)["input_ids"], tok(y)["input_ids"]
        n = next((i for i, (u, v) in enumerate(zip(a, b, strict=False)) if u != v), min(len(a), len(b)))
        return f"first {n} of {min(len(a), len(b))} tokens equal{' (identical text)' if x == y else ''}"

    print(f"ratios: cached q8_0 / bundled GGUF tokens/s = {hit['tokens_per_s'] / bundled['tokens_per_s']:.2f} (target >= 0.9); "
          f"cached q4_k_m / bundled = {q4['tokens_per_s'] / bundled['tokens_per_s']:.2f}; "
          f"cached q8_0 / transformers tokens/s = {hit['tokens_per_s'] / tf['tokens_per_s']:.2f}; "
          f"wall transformers / cached q8_0 = {runs['transformers'][1] / runs['auto, cached q8_0'][1]:.2f}; "
          f"q8_0 conversion overhead (1st - cached wall) = {runs['auto, 1st (converts)'][1] - runs['auto, cached q8_0'][1]:.1f} s", flush=True)
    print(f"greedy text vs transformers: cached q8_0 {same_prefix(hit['text'], tf['text'])}; cached q4_k_m {same_prefix(q4['text'], tf['text'])}; "
          f"1st and cached auto runs identical: {runs['auto, 1st (converts)'][0]['text'] == hit['text']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    import llmkit.export.gguf
    import llmkit.inference.llama_cpp

    threads = args.threads or llmkit.inference.llama_cpp.physical_cores()
    # every LlamaCppBackend made here without explicit threads (the quantize report's perplexity code too), and
    # llama.cpp's quantizer (the K-quant exports), use this
    llmkit.inference.llama_cpp.physical_cores = llmkit.export.gguf.physical_cores = lambda: threads
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loader draws a bar whatever its progress setting
    print(f"{first_line()}; load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="llmkit-bench-gguf-"))
    started = time.perf_counter()
    try:
        print(f"threads: {threads} (torch, llama.cpp, llmkit generate --threads)", flush=True)
        folder = type_table(work, args.new, threads)
        folder_speed(folder, work, args.prompt, args.new, threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"total {time.perf_counter() - started:.0f} s; load average at end: {os.getloadavg()[0]:.1f} "
          "(other jobs share this machine: compare ratios, not absolutes)", flush=True)


if __name__ == "__main__":
    main()
