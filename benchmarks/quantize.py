"""8-bit on CPU, one run: SmolLM2-135M decoding and a MiniLM-L6 classifier, int8 against fp32, GGUF Q8_0 beside.

The CPU line first (speeds differ 2x between the machines this runs on; ratios are against fp32 in the same run).
- SmolLM2-135M (bundled): `llmkit quantize --method int8` (a torchao folder, run by llmkit on CPU with torch's
  `_weight_int8pack_mm`, `+int8pack_mm` in the engine column; the kernel its default picks on this CPU) and
  `--method gguf-q8_0` (llama.cpp), held-out perplexity on 16 x 256 tokens of
  ../shared/data/tinyshakespeare/validation.txt, greedy decode tokens/s as the median of 5 timed runs after a
  warm-up (fp32 and int8 in transformers, Q8_0 in llama.cpp). Targets: int8 >= 1.5x fp32 at <= +1% perplexity.
- MiniLM-L6 sentiment classifier, the seq-cls recipe's output (recipes/minilm-l6-sentiment-full.yaml, trained here
  for --cls-steps steps unless --cls-model names one): int8 with each kernel, samples/s (median of 5 passes over 256
  rt-polarity validation reviews) and accuracy on all 1000. Target: >= 1.5x fp32 at <= 0.5 point accuracy loss.

Usage: python benchmarks/quantize.py [--only smollm2,minilm] [--cls-model runs/sentiment-full] [--cls-steps 80]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from _common import LLMKIT, SHARED, first_line, run

HERE = Path(__file__).resolve().parent


def quantize(model: str | Path, method: str, out: Path, data: Path, label: str, *extra: str) -> tuple[dict, float]:
    text, wall = run([*LLMKIT, "quantize", "--model", model, "--method", method, "--out", out, "--eval-data", data,
                      "--json", "--quiet", "--force", *extra], label)
    return json.loads(text[text.index("{"): text.rindex("}") + 1]), wall


def spread(measured: dict, key: str) -> str:
    runs = measured.get(key + "_runs") or [measured[key]]
    return f"{min(runs):.1f}-{max(runs):.1f}"


def smollm2(work: Path) -> None:
    val = SHARED / "data" / "tinyshakespeare" / "validation.txt"
    for method, out in (("int8", work / "smollm2-int8"), ("gguf-q8_0", work / "smollm2-q8_0.gguf")):
        r, wall = quantize("smollm2-135m", method, out, val, f"smollm2 {method}")
        b, q, ratio = r["before"], r["after"], r["ratios"]
        engine = "llama.cpp" if method != "int8" else f"torchao:{r['kernel']}" + ("+int8pack_mm" if "cpu_engine" in r else "")
        print(f"smollm2-135m {method:9s} engine={engine} size_ratio={ratio['disk']:.3f} ppl_fp32={b['perplexity']:.3f} "
              f"ppl_8bit={q['perplexity']:.3f} ppl_change={100 * (ratio['perplexity'] - 1):+.2f}% "
              f"decode_tok_s_fp32={b['tokens_per_s']:.1f} ({spread(b, 'tokens_per_s')}) "
              f"decode_tok_s_8bit={q['tokens_per_s']:.1f} ({spread(q, 'tokens_per_s')}) tok_s_ratio={ratio['tokens_per_s']:.2f} "
              f"wall_s={wall:.0f}", flush=True)


def minilm(work: Path, model: str | None, steps: int) -> None:
    val = SHARED / "data" / "rt-polarity" / "validation.csv"
    if model is None:
        model = str(work / "minilm-sentiment")
        run([*LLMKIT, "finetune", "--recipe", HERE.parent / "recipes" / "minilm-l6-sentiment-full.yaml", "--out", model,
             "--max-steps", str(steps), "--quiet"], "minilm finetune")
    for kernel in ("weight-only", "dynamic"):
        r, wall = quantize(model, "int8", work / f"minilm-{kernel}", val, f"minilm int8 {kernel}", "--kernel", kernel)
        b, q, ratio = r["before"], r["after"], r["ratios"]
        engine = "fbgemm" if "fbgemm" in r.get("cpu_engine", "") else "int8pack_mm/fp32" if "int8pack" in r.get("cpu_engine", "") else "torchao"
        print(f"minilm-l6-cls int8 kernel={kernel:11s} engine={engine} size_ratio={ratio['disk']:.3f} acc_fp32={b['accuracy']:.4f} "
              f"acc_8bit={q['accuracy']:.4f} acc_change={100 * (q['accuracy'] - b['accuracy']):+.2f}pt "
              f"samples_s_fp32={b['samples_per_s']:.1f} ({spread(b, 'samples_per_s')}) "
              f"samples_s_8bit={q['samples_per_s']:.1f} ({spread(q, 'samples_per_s')}) "
              f"samples_s_ratio={ratio['samples_per_s']:.2f} wall_s={wall:.0f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--only", default="smollm2,minilm")
    p.add_argument("--cls-model", default=None, help="a trained MiniLM classifier folder (default: train one here)")
    p.add_argument("--cls-steps", type=int, default=80, help="steps of the seq-cls recipe when training it here")
    a = p.parse_args()
    print(first_line(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="llmkit-bench-quant-"))
    try:
        if "smollm2" in a.only:
            smollm2(work)
        if "minilm" in a.only:
            minilm(work, a.cls_model, a.cls_steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
