"""`llmkit quantize`: an 8-bit (or GGUF f16 / 5-bit / 4-bit) model for small devices, with quality and speed measured before and after."""

from __future__ import annotations

import typer


def quantize(
    model: str = typer.Option(..., "--model", "-m", help="Model to quantize: alias, folder (e.g. a finetune output), .gguf or Hub id."),
    out: str = typer.Option(..., "--out", "-o", help="Output folder (int8, bnb-int8) or .gguf file (gguf-*); must not exist unless --overwrite."),
    method: str = typer.Option("int8", "--method", help="int8 (torchao, a folder plain transformers loads) | bnb-int8 (bitsandbytes) | "
                               "gguf-f16 | gguf-q8_0 | gguf-q5_k_m | gguf-q4_k_m (llama.cpp files) | "
                               "gguf-lora (a LoRA run as a llama.cpp adapter for its unchanged base) | "
                               "gguf-auto (gguf-lora for a LoRA run, else gguf-q8_0, stepping up to gguf-f16 when Q8_0 fails the gate)."),
    merge: bool = typer.Option(False, "--merge", help="gguf-auto on a LoRA run: the merged export (Q8_0, F16 if it fails the gate) instead of the adapter."),
    eval_data: str = typer.Option(None, "--eval-data", help="Held-out text (.txt / .csv / .jsonl) for perplexity, or labelled data for classifiers "
                                  "[default: a built-in public-domain sample].", show_default=False),
    max_ppl_increase: float = typer.Option(2.0, "--max-ppl-increase", help="Quality gate: allowed perplexity increase in % (accuracy drop in points)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out (only once the new one is complete and passed the gate)."),
    force: bool = typer.Option(False, "--force", help="Keep the model even when it fails the quality gate."),
    keep_fp32: str = typer.Option(None, "--keep-fp32", help="int8: module names to leave in fp32, comma-separated (e.g. lm_head).", show_default=False),
    kernel: str = typer.Option("auto", "--kernel", help="int8: weight-only | dynamic (int8 activations too) | auto (measured default "
                               "per task and CPU; the report names the one used)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress messages."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle (.bin/.pt) weights: they can run code."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run Python code shipped with the model."),
) -> None:
    """Quantize a model (8-bit, or GGUF f16 to 4-bit); measures size, perplexity (or accuracy) and speed before and after.

    Examples (offline, bundled model):

      llmkit quantize --model smollm2-135m --method int8 --out runs/smollm2-int8

      llmkit quantize --model smollm2-135m --method gguf-q8_0 --out runs/smollm2-q8_0.gguf

      llmkit quantize --model smollm2-135m --method gguf-q4_k_m --out runs/smollm2-q4_k_m.gguf --max-ppl-increase 15

      llmkit quantize --model runs/lora-sql --method gguf-auto --out runs/sql.lora.gguf   # LoRA: adapter for the unchanged base

      llmkit generate --model runs/smollm2-q8_0.gguf "Once upon a time"
    """
    import json
    import sys

    from llmkit.quantize import QualityGateError, QuantizeConfig, print_report
    from llmkit.quantize import quantize as run

    cfg = QuantizeConfig(model=model, out=out, method=method, eval_data=eval_data, max_ppl_increase=max_ppl_increase,
                         overwrite=overwrite, force=force, keep_fp32=tuple(k.strip() for k in (keep_fp32 or "").split(",") if k.strip()),
                         merge=merge, kernel=kernel, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, progress=not quiet)
    say = (lambda msg: print(msg, file=sys.stderr)) if not quiet else None
    try:
        report = run(cfg, say)
    except QualityGateError as e:
        print_report(e.report, sys.stderr)
        raise
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        print_report(report)
        if report["gate"]["failed"]:
            typer.echo(f"WARNING: kept despite the failed quality gate (--force): {report['gate']['metric']} {report['gate']['change']}", err=True)
        typer.echo(f"saved to {out}")
