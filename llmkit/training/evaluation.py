"""Evaluation, one path for all of llmkit: training-time eval, `llmkit evaluate`, distill's teacher-vs-student
report and quantize's quality gate all run `evaluate_model` with the defaults below.

    >>> metrics = evaluate_examples(model, examples, "causal-lm", tokenizer.pad_token_id)   # one process
    >>> metrics = evaluate_model(model, accelerator.prepare(eval_loader(...)), task, accelerator)   # in training

Perplexity is exp(total NLL / predicted tokens) over non-overlapping windows, exactly like
`../shared/bench/ppl.py`, so the numbers compare. Accuracy and F1 are scikit-learn's, which is what the
`evaluate` package's "accuracy" and "f1" modules compute; `evaluate.load` fetches those modules from the Hub,
which would make every evaluation fail offline.

Logits are reduced to per-example sums inside each batch, never accumulated (a full-vocabulary logits cache
is how evaluation runs out of memory, transformers#15466). Speed measures (generation tokens/s, classifier
samples/s, weight bytes) live here too: distill and quantize report them beside the metrics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmkit.data.examples import Collator
from llmkit.progress import bar as progress_bar
from llmkit.runfolder import read_record
from llmkit.training.chunked_loss import chunked_causal_lm_nll, supports_chunked_loss

# Defaults wherever a model is evaluated outside its training run (evaluate, distill's report, quantize's gate).
BATCH_SIZE = 8
MAX_LENGTH = 512  # seq-cls truncation for a model llmkit did not train: the longest input BERT-style encoders read


def default_max_length(folder: Path | None) -> int:
    """seq-cls truncation: what the run was trained with (llmkit.json), so evaluation sees the same inputs; else
    MAX_LENGTH, so nothing is cut that the model could have used."""
    record = read_record(Path(folder)) if folder is not None else None
    try:
        return int((record or {})["data"]["max_length"])
    except (KeyError, TypeError, ValueError):
        return MAX_LENGTH


def eval_loader(examples: Any, collate: Collator, batch_size: int = BATCH_SIZE) -> Any:
    from torch.utils.data import DataLoader

    return DataLoader(examples, batch_size=batch_size, collate_fn=collate)


def evaluate_examples(model: Any, examples: Any, task: str, pad_token_id: int, *, batch_size: int = BATCH_SIZE,
                      num_labels: int = 2, progress: bool = False) -> dict[str, float]:
    """`evaluate_model` in this process alone (no Accelerate), batches on the model's device, under inference_mode.

    Classification examples go in length order, so a batch holds similar lengths and little padding; the
    metrics do not depend on the order."""
    import numpy as np
    import torch

    causal = task == "causal-lm"
    if not causal:
        examples = examples.select(np.argsort(examples.lengths, kind="stable"))
    loader = eval_loader(examples, Collator(pad_token_id, causal=causal), batch_size)
    dev = next(model.parameters()).device
    bar = progress_bar(len(loader), "evaluating", "batch", enabled=progress)
    with torch.inference_mode():
        result = evaluate_model(model, ({k: v.to(dev) for k, v in b.items()} for b in loader), task,
                                num_labels=num_labels, progress=bar)
    if bar is not None:
        bar.close()
    return result


@contextmanager
def full_precision(accelerator: Any, model: Any) -> Iterator[Any]:
    """The bare model with Accelerate's autocast forward switched off: metrics are those of the fp32 model saved.

    No gradients flow in evaluation, so the DDP wrapper is not needed either.
    """
    inner = accelerator.unwrap_model(model)
    patched, original = inner.__dict__.get("forward"), getattr(inner, "_original_forward", None)
    if patched is not None and original is not None:
        inner.forward = original
    try:
        yield inner
    finally:
        if patched is not None and original is not None:
            inner.forward = patched


def classification_metrics(preds: list[int], labels: list[int], num_labels: int) -> dict[str, float]:
    """Accuracy, and F1 (binary F1 of class 1 for two classes, macro F1 otherwise)."""
    from sklearn.metrics import accuracy_score, f1_score

    if num_labels == 2:
        f1 = f1_score(labels, preds, average="binary", pos_label=1, zero_division=0)
    else:
        f1 = f1_score(labels, preds, average="macro", labels=list(range(num_labels)), zero_division=0)
    return {"accuracy": float(accuracy_score(labels, preds)), "f1": float(f1)}


def perplexity(nll_sum: float, tokens: int) -> float:
    return math.exp(nll_sum / tokens) if tokens else float("nan")


def causal_lm_nll(model: Any, batch: dict[str, Any], chunked: bool | None = None) -> tuple[Any, Any]:
    """Per-example summed NLL and predicted-token counts (labels -100 are not predicted).

    Models that take it get the chunked head (llmkit.training.chunked_loss): no tokens x vocabulary logits for the batch.
    `chunked`: whether `model` takes it, as `supports_chunked_loss(model)` said; a loop over batches asks once and
    passes it (the check walks the wrappers and reads the forward's signature). None: asked here.
    """
    import torch
    import torch.nn.functional as F

    if chunked is None:
        chunked = supports_chunked_loss(model)
    if chunked:
        return chunked_causal_lm_nll(model, {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "labels") if k in batch})

    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), position_ids=batch.get("position_ids")).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none")
    nll = nll.view(labels.shape).sum(dim=1)
    return nll, (labels != -100).sum(dim=1).to(torch.long)


def evaluate_model(model: Any, loader: Any, task: str, accelerator: Any = None, num_labels: int = 2,
                   progress: Any = None) -> dict[str, float]:
    """Run `model` over `loader` and return {"loss", "perplexity", "tokens"} or {"loss", "accuracy", "f1", "samples"}.

    Under Accelerate every process evaluates its shard; `gather_for_metrics` drops the samples it padded in.
    """
    import torch

    gather = accelerator.gather_for_metrics if accelerator is not None else (lambda x: x)
    was_training = model.training
    model.eval()
    nll_sum, tokens, n = 0.0, 0, 0
    preds: list[int] = []
    refs: list[int] = []
    loss_sum = 0.0
    chunked = task == "causal-lm" and supports_chunked_loss(model)  # the same model for every batch: asked once
    with torch.no_grad():
        for batch in loader:
            if task == "causal-lm":
                nll, cnt = gather(causal_lm_nll(model, batch, chunked))
                nll_sum += float(nll.sum())
                tokens += int(cnt.sum())
            else:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
                loss = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
                p, y, loss = gather((logits.argmax(-1), batch["labels"], loss))
                preds.extend(p.tolist())
                refs.extend(y.tolist())
                loss_sum += float(loss.sum())
                n += len(y)
            if progress is not None:
                progress.update(1)
    if was_training:
        model.train()
    if task == "causal-lm":
        return {"loss": nll_sum / max(tokens, 1), "perplexity": perplexity(nll_sum, tokens), "tokens": tokens}
    return {"loss": loss_sum / max(n, 1), **classification_metrics(preds, refs, num_labels), "samples": n}


# Which eval metric decides "best" and early stopping, and whether lower is better.
BEST_METRIC = {"causal-lm": ("perplexity", False), "seq-cls": ("accuracy", True), "preference": ("loss", False),
               "grpo": ("reward", True)}  # grpo: mean reward of greedy answers to the eval prompts


def generation_speed(model: Any, prompt_ids: list[int], new_tokens: int = 32) -> float:
    """Greedy tokens/s of `model.generate` (KV cache), after a short warm-up: the best of two timed runs."""
    return max(generation_speeds(model, prompt_ids, runs=2, new_tokens=new_tokens))


def generation_speeds(model: Any, prompt_ids: list[int], runs: int = 5, new_tokens: int = 32) -> list[float]:
    """Greedy tokens/s of `model.generate` (KV cache) in each of `runs` timed runs, after one warm-up generation
    (first calls allocate caches and pick kernels)."""
    import torch

    model.eval()
    ids = torch.tensor([prompt_ids], device=next(model.parameters()).device)
    kwargs = {"do_sample": False, "attention_mask": torch.ones_like(ids), "pad_token_id": model.config.eos_token_id
              if isinstance(model.config.eos_token_id, int) else 0}
    was = model.config.use_cache
    model.config.use_cache = True
    speeds = []
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kwargs)
        for _ in range(runs):
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
            speeds.append(new_tokens / (time.perf_counter() - t0))
    model.config.use_cache = was
    return speeds


def inference_speed(model: Any, examples: Any, collate: Any, batch_size: int = 32, limit: int = 512) -> float:
    """Classifier samples/s over up to `limit` examples (no_grad), after one warm-up batch."""
    return inference_speeds(model, examples, collate, runs=1, batch_size=batch_size, limit=limit)[0]


def inference_speeds(model: Any, examples: Any, collate: Any, runs: int = 5, batch_size: int = 32, limit: int = 512) -> list[float]:
    """Classifier samples/s over up to `limit` examples in each of `runs` timed passes, after one warm-up batch."""
    import torch

    model.eval()
    n = min(limit, len(examples))
    dev = next(model.parameters()).device
    batches = [collate([examples[i] for i in range(s, min(s + batch_size, n))]) for s in range(0, n, batch_size)]
    speeds = []
    with torch.inference_mode():
        model(input_ids=batches[0]["input_ids"].to(dev), attention_mask=batches[0]["attention_mask"].to(dev))
        for _ in range(runs):
            t0 = time.perf_counter()
            for b in batches:
                model(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev))
            speeds.append(n / (time.perf_counter() - t0))
    return speeds


def weight_bytes(model: Any) -> int:
    """Bytes of a model's parameters and buffers as they sit in memory (tied or shared tensors counted once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "meta" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
