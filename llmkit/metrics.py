"""Evaluation metrics, one implementation for training-time eval and `llmkit evaluate`.

Perplexity is exp(total NLL / predicted tokens) over non-overlapping windows, exactly like
`../shared/bench/ppl.py`, so the numbers compare. Accuracy and F1 are scikit-learn's, which is what the
`evaluate` package's "accuracy" and "f1" modules compute; `evaluate.load` fetches those modules from the Hub,
which would make every evaluation fail offline.

Logits are reduced to per-example sums inside each batch, never accumulated (a full-vocabulary logits cache
is how evaluation runs out of memory, transformers#15466).
"""

from __future__ import annotations

import math
import time
from typing import Any

from llmkit.progress import bar as progress_bar


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


def causal_lm_nll(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """Per-example summed NLL and predicted-token counts (labels -100 are not predicted)."""
    import torch
    import torch.nn.functional as F

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
    with torch.no_grad():
        for batch in loader:
            if task == "causal-lm":
                nll, cnt = gather(causal_lm_nll(model, batch))
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
BEST_METRIC = {"causal-lm": ("perplexity", False), "seq-cls": ("accuracy", True)}


def evaluate_data(model_name: str, data: str, *, task: str | None = None, block_size: int | None = None,
                  max_blocks: int | None = None, batch_size: int = 8, text_column: str = "text",
                  text_pair_column: str | None = None, label_column: str = "label", max_length: int | None = None,
                  device: str | None = None, allow_pickle: bool = False, trust_remote_code: bool = False,
                  progress: bool = False, data_format: str = "auto", chat_template: str | None = None,
                  answers: bool = False, max_new_tokens: int = 64, max_examples: int | None = None) -> dict[str, Any]:
    """Perplexity (causal-lm) or accuracy / F1 (seq-cls) of any model llmkit can load, on a data file.

    Conversations (chat data) give the perplexity of the assistant tokens only, and with `answers` the
    exact-match / contains-match of greedy answers to each conversation's last user turn (`evaluate_chat`).

        >>> evaluate_data("runs/shakespeare", "../shared/data/tinyshakespeare/validation.txt", block_size=256)
        {'perplexity': 21.3, 'tokens': 32640, 'blocks': 128, 'block_size': 256, ...}
    """
    import time

    import torch
    from torch.utils.data import DataLoader

    from llmkit.config import DataConfig
    from llmkit.data import Collator, Labels
    from llmkit.datafiles import find_sources
    from llmkit.datarows import make_plan
    from llmkit.errors import UsageError
    from llmkit.models import adapter_task, architectures, context_length, load_causal_lm, load_seq_cls, load_tokenizer, resolve
    from llmkit.prepare import prepare_eval

    ref = resolve(model_name, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    inferred = adapter_task(ref) or ("seq-cls" if any(a.endswith("ForSequenceClassification") for a in architectures(ref)) else "causal-lm")
    task = task or inferred
    if task not in ("causal-lm", "seq-cls"):
        raise UsageError(f"--task {task!r} is not one of causal-lm, seq-cls")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if max_blocks is not None and max_blocks < 1:
        raise UsageError(f"--max-blocks must be >= 1, got {max_blocks}")
    _, sources = find_sources(data, task=task, what="--data")  # a missing file before the (slow) model load
    plan = make_plan(sources, task, DataConfig(format=data_format, text_column=text_column))
    if plan.kind == "chat":
        return evaluate_chat(ref, data, data_format=data_format, chat_template=chat_template, block_size=block_size or 1024,
                             batch_size=batch_size, max_examples=max_examples, answers=answers, max_new_tokens=max_new_tokens,
                             device=device, progress=progress) | {"model": model_name, "data": data}
    if answers:
        raise UsageError(f"--generate-answers needs conversations ('messages' / 'conversations' / 'prompt'+'completion'); {data} has none")
    tokenizer = load_tokenizer(ref)
    start = time.perf_counter()
    common = {"text_column": text_column, "text_pair_column": text_pair_column, "label_column": label_column, "quiet": not progress}
    if task == "causal-lm":
        model = load_causal_lm(ref, device=device, dtype="float32", progress=progress)
        limit = context_length(model.config)
        block = block_size or min(limit or 1024, 1024)
        if block < 2:
            raise UsageError(f"--block-size must be >= 2, got {block}")
        if limit and block > limit:
            raise UsageError(f"--block-size {block} is longer than the model's context ({limit} tokens); use --block-size {limit} or less")
        blocks, _ = prepare_eval(data, tokenizer, task=task, block_size=block, max_length=block, labels=None,
                                 limit=max_blocks or 0, **common)
        loader = DataLoader(blocks, batch_size=batch_size, collate_fn=Collator(tokenizer.pad_token_id, causal=True))
    else:
        model = load_seq_cls(ref, device=device, progress=progress)
        labels = Labels.from_config(model.config.id2label)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        examples, _ = prepare_eval(data, tokenizer, task=task, block_size=1024, max_length=max_length or _trained_max_length(ref.path),
                                   labels=labels, **common)
        import numpy as np

        ordered = examples.select(np.argsort(examples.lengths, kind="stable"))  # similar lengths together: little padding
        loader = DataLoader(ordered, batch_size=batch_size, collate_fn=Collator(tokenizer.pad_token_id, causal=False))
    dev = next(model.parameters()).device
    batches = ({k: v.to(dev) for k, v in b.items()} for b in loader)
    bar = progress_bar(len(loader), "evaluating", "batch", enabled=progress)
    with torch.inference_mode():
        result = evaluate_model(model, batches, task, num_labels=len(labels.names) if task == "seq-cls" else 2, progress=bar)
    if bar is not None:
        bar.close()
    result = {k: v for k, v in result.items() if k != "loss"} | {"loss": result["loss"]}
    if task == "causal-lm":
        result.update(blocks=len(blocks), block_size=block)
    result.update(task=task, model=model_name, data=data, seconds=round(time.perf_counter() - start, 2))
    return result


def _trained_max_length(folder: Any) -> int:
    """seq-cls truncation: what the run was trained with (llmkit.json), so evaluation sees the same inputs.

    A model from elsewhere gets 512, the longest input BERT-style encoders read: nothing is cut that the model
    could have used.
    """
    from pathlib import Path

    from llmkit.outputs import read_run

    try:
        return int((read_run(Path(folder)) or {})["data"]["max_length"])
    except (KeyError, TypeError, ValueError):
        return 512


def evaluate_chat(ref: Any, data: str, *, data_format: str = "auto", chat_template: str | None = None, block_size: int = 1024,
                  batch_size: int = 8, max_examples: int | None = None, answers: bool = False, max_new_tokens: int = 64,
                  device: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Did a chat fine-tune work? Assistant-token loss / perplexity, and (with `answers`) greedy answers scored.

    Each conversation's last assistant turn is the reference; the model answers everything before it with
    the chat template (`llmkit generate --chat` does the same). exact_match compares case-folded text with
    surrounding whitespace and final punctuation removed; contains_match asks whether the reference appears in
    the answer.
    """
    import torch
    from torch.utils.data import DataLoader

    from llmkit.chat import ChatEncoder, read_conversations, resolve_template
    from llmkit.data import Collator
    from llmkit.errors import UsageError
    from llmkit.generation import SamplingOptions, TransformersBackend, open_backend
    from llmkit.models import load_causal_lm, load_tokenizer
    from llmkit.prepare import prepare_eval

    if max_examples is not None and max_examples < 1:
        raise UsageError(f"--max-examples must be >= 1, got {max_examples}")
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    tokenizer = load_tokenizer(ref)
    template = resolve_template(tokenizer, chat_template, ref.name)
    encoder = ChatEncoder(tokenizer, template)
    examples, _ = prepare_eval(data, tokenizer, task="causal-lm", block_size=block_size, max_length=block_size, labels=None,
                               chat=encoder, data_format=data_format, limit=max_examples or 0, quiet=not progress)
    start = time.perf_counter()
    opts = SamplingOptions(max_new_tokens=max_new_tokens, temperature=0, chat=True)
    backend = None
    if answers:
        convs = read_conversations(data, data_format, limit=max_examples)
        prompts = [c.messages[:_last_assistant(c.messages)] for c in convs]
        backend = open_backend(ref, prompts, opts, device=device, dtype="float32", batch_size=batch_size, progress=progress)
        if chat_template:  # answer with the template the loss was measured with
            if isinstance(backend, TransformersBackend):
                backend.tokenizer.chat_template = template
            else:
                raise UsageError("--chat-template applies to models run by transformers; this one runs on llama.cpp with its own template")
    model = backend.model if isinstance(backend, TransformersBackend) else load_causal_lm(ref, device=device, dtype="float32", progress=progress)
    loader = DataLoader(examples, batch_size=batch_size, collate_fn=Collator(tokenizer.pad_token_id, causal=True))
    dev = next(model.parameters()).device
    with torch.inference_mode():
        loss = evaluate_model(model, ({k: v.to(dev) for k, v in b.items()} for b in loader), "causal-lm")
    result: dict[str, Any] = {"task": "chat", "conversations": len(examples), "assistant_tokens": loss["tokens"],
                              "perplexity": loss["perplexity"], "loss": loss["loss"]}
    if backend is not None:
        refs = [c.messages[_last_assistant(c.messages)]["content"] for c in convs]
        outs = [g.text for g in backend.generate(prompts, opts)]
        exact = [_norm(o) == _norm(r) for o, r in zip(outs, refs, strict=True)]
        contains = [_norm(r) in _norm(o) for o, r in zip(outs, refs, strict=True)]
        result.update(answered=len(outs), exact_match=sum(exact) / len(outs), contains_match=sum(contains) / len(outs),
                      backend=backend.name, examples=[
                          {"prompt": p[-1]["content"], "reference": r, "answer": o, "exact": e}
                          for p, r, o, e in list(zip(prompts, refs, outs, exact, strict=True))[:3]])
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _last_assistant(messages: list[dict[str, str]]) -> int:
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def _norm(text: str) -> str:
    return " ".join(text.casefold().split()).strip(" .!?\"'")


def generation_speed(model: Any, prompt_ids: list[int], new_tokens: int = 32) -> float:
    """Greedy tokens/s of `model.generate` (fp32, KV cache), after a short warm-up."""
    import torch

    model.eval()
    ids = torch.tensor([prompt_ids], device=next(model.parameters()).device)
    kwargs = {"do_sample": False, "attention_mask": torch.ones_like(ids), "pad_token_id": model.config.eos_token_id
              if isinstance(model.config.eos_token_id, int) else 0}
    was = model.config.use_cache
    model.config.use_cache = True
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)
        seconds = float("inf")
        for _ in range(2):  # best of two: a busy moment on the machine should not decide the ratio
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
            seconds = min(seconds, time.perf_counter() - t0)
    model.config.use_cache = was
    return new_tokens / seconds


def inference_speed(model: Any, examples: Any, collate: Any, batch_size: int = 32, limit: int = 512) -> float:
    """Classifier samples/s over up to `limit` examples (fp32, no_grad), after one warm-up batch."""
    import torch

    model.eval()
    n = min(limit, len(examples))
    dev = next(model.parameters()).device
    batches = [collate([examples[i] for i in range(s, min(s + batch_size, n))]) for s in range(0, n, batch_size)]
    with torch.inference_mode():
        model(input_ids=batches[0]["input_ids"].to(dev), attention_mask=batches[0]["attention_mask"].to(dev))
        t0 = time.perf_counter()
        for b in batches:
            model(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev))
        seconds = time.perf_counter() - t0
    return n / seconds


def weight_bytes(model: Any) -> int:
    """Bytes of a model's parameters and buffers as they sit in memory (tied or shared tensors counted once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "meta" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
