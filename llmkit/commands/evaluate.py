"""`llmkit evaluate`: perplexity or accuracy / F1 of any model llmkit can load, on a data file."""

from __future__ import annotations

import json

import typer


def evaluate(
    model: str = typer.Option(..., "--model", "-m", help="Model folder (full or LoRA adapter), .gguf file, alias or Hub id.", show_default=False),
    data: str = typer.Option(..., "--data", "-d", help="Text file (perplexity) or labeled CSV/JSONL (accuracy, F1).", show_default=False),
    task: str = typer.Option(None, "--task", help="causal-lm | seq-cls [default: from the model].", show_default=False),
    block_size: int = typer.Option(None, "--block-size", help="Perplexity window in tokens [default: the model's context, at most 1024].", show_default=False),
    max_blocks: int = typer.Option(None, "--max-blocks", help="Only the first N windows.", show_default=False),
    batch_size: int = typer.Option(8, "--batch-size", help="Windows or examples per forward pass."),
    text_column: str = typer.Option("text", "--text-column", help="Text column of CSV/JSONL data."),
    text_pair_column: str = typer.Option(None, "--text-pair-column", help="Second text column (pair tasks).", show_default=False),
    label_column: str = typer.Option("label", "--label-column", help="Label column (seq-cls)."),
    max_length: int = typer.Option(None, "--max-length", help="seq-cls: truncate inputs to this many tokens [default: the run's "
                                   "training --max-length, else 512].", show_default=False),
    data_format: str = typer.Option("auto", "--format", help="Chat data: auto | messages | sharegpt | prompt-completion (auto: from the columns)."),
    chat_template: str = typer.Option(None, "--chat-template", help="Chat data: chatml or a .jinja file [default: the model's own].", show_default=False),
    generate_answers: bool = typer.Option(False, "--generate-answers", help="Chat data: answer each last user turn greedily; report exact / contains match."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="With --generate-answers or tool data: tokens per answer."),
    max_examples: int = typer.Option(None, "--max-examples", help="Chat / preference data: only the first N conversations or pairs.", show_default=False),
    reference: str = typer.Option(None, "--reference", help="Preference data: the model rewards are measured against [default: "
                                  "an adapter's base, or the model the run started from].", show_default=False),
    reward: list[str] = typer.Option(None, "--reward", help="Prompt rows: answer greedily and score with these rewards (as "
                                     "finetune --objective grpo): mean reward and pass rate (repeatable).", show_default=False),
    device: str = typer.Option(None, "--device", help="cpu, cuda, mps [default: best available].", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle (.bin/.pt) weights: they can run code."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run Python code shipped with the model."),
) -> None:
    """Measure a model: perplexity on text (non-overlapping windows), accuracy and F1 on labeled rows.

    Examples:

      llmkit evaluate --model smollm2-135m --data ../shared/data/tinyshakespeare/validation.txt --block-size 256 --max-blocks 16

      llmkit evaluate --model runs/sentiment --data ../shared/data/rt-polarity/validation.csv --json

      llmkit evaluate --model runs/chat --data chat-val.jsonl --generate-answers --max-examples 200   # conversations

      llmkit evaluate --model runs/dpo --data pairs-val.jsonl --json   # prompt/chosen/rejected: preference accuracy

      llmkit evaluate --model runs/grpo --data prompts-val.jsonl --reward exact:answer -n 8   # prompt rows: mean reward, pass rate
    """
    from llmkit.evaluate import evaluate_data

    result = evaluate_data(model, data, task=task, block_size=block_size, max_blocks=max_blocks, batch_size=batch_size,
                           text_column=text_column, text_pair_column=text_pair_column, label_column=label_column,
                           max_length=max_length, device=device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                           progress=not quiet, data_format=data_format, chat_template=chat_template,
                           answers=generate_answers, max_new_tokens=max_new_tokens, max_examples=max_examples, reference=reference,
                           rewards=reward or None)
    if as_json:
        typer.echo(json.dumps(result))
    elif result["task"] == "rewards":
        for ex in result["examples"]:
            typer.echo(f"  {ex['prompt'][-50:]!r} -> {ex['answer'][:40]!r}")
        per = "  ".join(f"{k} {v:.4f}" for k, v in result["per_reward"].items() if v is not None)
        typer.echo(f"mean reward {result['reward']:.4f}  pass rate {result['pass_rate']:.4f}  ({per}) over {result['prompts']} prompts "
                   f"in {result['seconds']} s")
    elif result["task"] == "preference":
        line = f"logp accuracy {result['logp_accuracy']:.4f}"
        if "preference_accuracy" in result:
            line = (f"preference accuracy {result['preference_accuracy']:.4f} (log-ratio margin {result['logratio_margin']:.4f}, "
                    f"reference {result['reference']})  ") + line
        typer.echo(f"{line} over {result['pairs']} pairs in {result['seconds']} s")
    elif result["task"] == "chat":
        typer.echo(f"assistant-token perplexity {result['perplexity']:.3f} (loss {result['loss']:.4f}) over {result['assistant_tokens']} "
                   f"tokens of {result['conversations']} conversations in {result['seconds']} s")
        if "exact_match" in result:
            for ex in result["examples"]:
                typer.echo(f"  {'ok  ' if ex['exact'] else 'MISS'} {ex['prompt'][:70]!r} -> {ex['answer'][:40]!r} (reference {ex['reference'][:40]!r})")
            typer.echo(f"exact match {result['exact_match']:.4f}  contains match {result['contains_match']:.4f} "
                       f"over {result['answered']} answers ({result['backend']})")
        if "tool_call_accuracy" in result:
            typer.echo(f"tool-call accuracy {result['tool_call_accuracy']:.4f}  right function {result['tool_name_accuracy']:.4f}  "
                       f"valid JSON {result['tool_valid_json_rate']:.4f} over {result['tool_calls']} calls ({result['backend']})")
    elif result["task"] == "causal-lm":
        typer.echo(f"perplexity {result['perplexity']:.3f} over {result['tokens']} tokens "
                   f"({result['blocks']} windows of {result['block_size']}) in {result['seconds']} s")
    else:
        typer.echo(f"accuracy {result['accuracy']:.4f}  f1 {result['f1']:.4f} over {result['samples']} examples in {result['seconds']} s")
