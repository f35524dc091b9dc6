"""Which layers should a student keep? Evenly spaced vs importance (block influence), SmolLM2-135M, one run.

The teacher is the bundled SmolLM2-135M (30 layers); students keep 20 and 15 of its layers, chosen either evenly
spaced (first and last kept, DistilBERT's rule) or by importance (`--layer-selection importance`: drop the layer
whose output turns the hidden state least on 32 training blocks, ShortGPT's block influence, re-measure, repeat). For each: held-out
perplexity right after the cut ("before healing") and after --steps distillation steps of 8 x 256 tokens of Tiny
Shakespeare (T=2, alpha=0.5, teacher top-32 logits cached once and shared by all four students, same seed).
Perplexity on the first 16 blocks of validation.txt. Targets (issue 18): importance beats even spacing at equal
steps; the 20-layer student within 1.5x the teacher's perplexity.

Usage: python benchmarks/distill_layers.py [--steps 60] [--layers 20,15] [--selections even,importance] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from _common import LLMKIT, SHARED, first_line, run


def before_healing(layers: list[int], selections: list[str], threads: int) -> dict[tuple[int, str], float]:
    """Perplexity of each cut student with no training, and the teacher's, on the same 16 held-out blocks."""
    import torch
    from torch.utils.data import DataLoader

    from llmkit.data import Collator, ExampleSet
    from llmkit.models import load_causal_lm, load_tokenizer, resolve
    from llmkit.training import choose_layers, evaluate_model, layer_importance, student_from_layers
    torch.set_num_threads(threads)
    ref = resolve("smollm2-135m")
    tok = load_tokenizer(ref)
    teacher = load_causal_lm(ref, device="cpu", dtype="float32", progress=False).eval()

    def first_blocks(name: str, n: int) -> list[list[int]]:  # llmkit's own reading and packing of the file
        from llmkit.data import prepare_eval
        path = str(SHARED / "data" / "tinyshakespeare" / name)
        return list(prepare_eval(path, tok, task="causal-lm", block_size=256, max_length=256, labels=None, limit=n)[0].input_ids)

    blocks = first_blocks("validation.txt", 16)  # what the distill runs evaluate (--max-eval-samples 16)
    sample = first_blocks("train.txt", 32)  # what --layer-selection importance measures on
    collate = Collator(tok.pad_token_id, causal=True)

    def ppl(model: object) -> float:
        loader = DataLoader(ExampleSet(blocks), batch_size=4, collate_fn=collate)
        with torch.no_grad():
            return evaluate_model(model, loader, "causal-lm")["perplexity"]

    scores = layer_importance(teacher, ({k: v for k, v in b.items() if k in ("input_ids", "attention_mask")}
                                        for b in DataLoader(ExampleSet(sample), batch_size=4, collate_fn=collate)))
    print("block influence per layer: " + " ".join(f"{i}:{s:.3f}" for i, s in enumerate(scores)), flush=True)
    out = {(0, "teacher"): ppl(teacher)}
    for n in layers:
        for how in selections:
            start = time.perf_counter()
            chosen = choose_layers(teacher, ExampleSet(sample), collate, n, len(sample), "cpu") if how == "importance" else None
            if chosen is not None and n == min(layers):
                selection_speed(teacher, sample, collate, n, chosen, time.perf_counter() - start)
            student, kept = student_from_layers(teacher, n, chosen)
            out[(n, how)] = ppl(student.eval())
            print(f"cut {n} layers {how:10s} kept={kept} ppl_before_healing={out[(n, how)]:.2f}", flush=True)
    return out


def selection_speed(teacher: object, sample: list[list[int]], collate: object, n: int, chosen: list[int], seconds: float) -> None:
    """The same selection with the shortened model re-run whole after each removal (what llmkit did before
    LayerScores re-ran only the layers after the removed one): its time, and whether it picks the same layers."""
    from torch.utils.data import DataLoader

    from llmkit.data import ExampleSet
    from llmkit.training.students import count_layers, keep_layers, layer_importance

    batches = [{k: v for k, v in b.items() if k in ("input_ids", "attention_mask")}
               for b in DataLoader(ExampleSet(sample), batch_size=4, collate_fn=collate)]
    start = time.perf_counter()
    kept, model = list(range(count_layers(teacher))), teacher
    while len(kept) > n:
        scores = layer_importance(model, batches)
        kept.pop(min(range(len(kept)), key=scores.__getitem__))
        model = keep_layers(teacher, kept).eval()
    whole = time.perf_counter() - start
    print(f"selection of {n} layers: llmkit {seconds:.1f} s, whole-model re-runs {whole:.1f} s, speedup {whole / seconds:.2f}x, "
          f"same layers: {kept == chosen}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--layers", default="20,15")
    ap.add_argument("--selections", default="even,importance", help="which layer choices to run (comma-separated)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = llmkit's default)")
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    selections = args.selections.split(",")
    print(first_line(), f"(--threads {args.threads or 'default'})", flush=True)
    import os

    before = before_healing(layers, selections, args.threads or os.cpu_count() or 1)
    teacher_ppl = before[(0, "teacher")]
    print(f"teacher (30 layers) ppl={teacher_ppl:.2f}", flush=True)
    data = SHARED / "data" / "tinyshakespeare"
    work = Path(tempfile.mkdtemp(prefix="llmkit-bench-layers-"))
    after = {}
    try:
        for n in layers:
            for how in selections:
                out = work / f"s{n}-{how}"
                cmd = [*LLMKIT, "distill", "--teacher", "smollm2-135m", "--data", data / "train.txt", "--eval-data",
                       data / "validation.txt", "--student-layers", n, "--layer-selection", how, "--max-steps", args.steps,
                       "--batch-size", 8, "--lr", "2e-4", "--block-size", 256, "--max-train-samples", 8 * args.steps,
                       "--max-eval-samples", 16, "--out", out, "--quiet", "--set", "distill.cache_top_k=32",
                       "--set", f"distill.cache_dir={work / 'cache'}", "--set", "train.warmup_ratio=0.05"]
                if args.threads:
                    cmd += ["--threads", args.threads]
                _, wall = run(cmd, f"distill {n} {how}")
                report = json.loads((out / "distill_report.json").read_text())
                after[(n, how)] = report["student"]["metrics"]["perplexity"]
                print(f"healed {n} layers {how:10s} kept={report['student']['kept_layers']} steps={args.steps} "
                      f"ppl={after[(n, how)]:.2f} ({after[(n, how)] / teacher_ppl:.2f}x teacher) wall_s={wall:.0f}", flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for n in layers if len(selections) == 2 else []:
        e, i = after[(n, "even")], after[(n, "importance")]
        print(f"ratio {n} layers: importance/even ppl before healing = {before[(n, 'importance')] / before[(n, 'even')]:.3f}, "
              f"after {args.steps} steps = {i / e:.3f} (< 1: importance wins); best/teacher = {min(e, i) / teacher_ppl:.2f}x "
              f"(target for 20 layers <= 1.5x)")


if __name__ == "__main__":
    main()
