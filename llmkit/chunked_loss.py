"""Causal-LM cross-entropy that never holds tokens x vocabulary logits: the LM head and the loss, chunk by chunk.

    >>> loss = chunked_causal_lm_loss(model, batch)     # the value and the gradients of model(**batch).loss

A 262k-token vocabulary (Gemma 3) at 4 x 256 tokens gives 1 GB of fp32 logits, and the plain path keeps three
such tensors (logits, their log-softmax, its gradient): the first wall users hit, long before the model's own
size. Here the model runs as usual but asked for no logits (`logits_to_keep` empty: its LM head sees zero
positions); a hook takes the backbone's last hidden states, and `ChunkedLinearCrossEntropy` runs the head over
CHUNK tokens at a time. Each chunk's loss and its gradients (for the hidden states, and for the head's weight when
it is trained) are computed at once, in forward, and the chunk's logits are freed before the next one: the idea
of Liger's fused linear cross-entropy, without a kernel of its own. At most one chunk of logits exists at a time.

The model goes through its own forward (DDP's hooks, LoRA layers, gradient checkpointing all as usual); only
the last step, head + loss, is replaced. Families whose head is followed by a scale or a soft-cap (Granite's
`logits_scaling`, Cohere's `logit_scale`, Gemma 2's `final_logit_softcapping`) get the same transformation.
"""

from __future__ import annotations

import functools
from typing import Any

# Logits per chunk, in elements: 2^25 fp32 = 128 MB (SmolLM2's 49k vocabulary: 682 tokens; Gemma's 262k: 128).
CHUNK_ELEMENTS = 2**25


def supports_chunked_loss(model: Any) -> bool:
    """Whether `model` (a transformers causal LM, maybe peft- or DDP-wrapped) can take the chunked loss."""
    import inspect

    base = _unwrap(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return (head is not None and type(head).__name__ == "Linear" and hasattr(base, "get_decoder")
            and "logits_to_keep" in inspect.signature(type(base).forward).parameters
            and not type(head.weight).__name__.startswith("DTensor"))  # FSDP2 shards the head: the plain path


def chunked_causal_lm_loss(model: Any, batch: dict[str, Any]) -> Any:
    """Mean next-token cross-entropy over labelled tokens (-100 ignored), as `model(**batch).loss`, chunked."""
    hidden, head, transform = _last_hidden(model, batch)
    targets = batch["labels"][:, 1:]
    return linear_cross_entropy()(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, targets.reshape(-1), transform)


def chunked_causal_lm_nll(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """Evaluation (under no_grad): per-example summed NLL and predicted-token counts, a chunk of rows' logits at a time."""
    import torch
    import torch.nn.functional as F

    hidden, head, transform = _last_hidden(model, batch)
    targets = batch["labels"][:, 1:]
    nll = torch.zeros(targets.shape[0], dtype=torch.float32, device=targets.device)
    rows = max(1, CHUNK_ELEMENTS // (head.weight.shape[0] * max(1, targets.shape[1])))
    for start in range(0, targets.shape[0], rows):
        logits, _ = _transformed(F.linear(hidden[start:start + rows], head.weight, head.bias).float(), transform)
        t = targets[start:start + rows]
        nll[start:start + rows] = F.cross_entropy(logits.transpose(1, 2), t, ignore_index=-100, reduction="none").sum(dim=1)
    return nll, (targets != -100).sum(dim=1).to(torch.long)


def _last_hidden(model: Any, batch: dict[str, Any]) -> tuple[Any, Any, tuple[Any, Any, Any]]:
    """The model run without logits: (last hidden states but the last position, the LM head, its transform)."""
    import torch

    base = _unwrap(model)
    captured: list[Any] = []
    hook = base.get_decoder().register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        model(**inputs, logits_to_keep=torch.zeros(0, dtype=torch.long, device=batch["input_ids"].device))
    finally:
        hook.remove()
    cfg = base.config
    transform = (getattr(cfg, "logit_scale", None), getattr(cfg, "logits_scaling", None), getattr(cfg, "final_logit_softcapping", None))
    return captured[-1][:, :-1], base.get_output_embeddings(), transform


def _unwrap(model: Any) -> Any:
    model = getattr(model, "module", model)  # DDP
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft


def _transformed(logits: Any, transform: tuple[Any, Any, Any]) -> tuple[Any, Any]:
    """The family's logits after the head, and d(them)/d(head output) elementwise (None: 1)."""
    import torch

    scale, divide, cap = transform
    factor = (scale or 1.0) / (divide or 1.0)
    if factor != 1.0:
        logits = logits * factor
    if not cap:
        return logits, (None if factor == 1.0 else factor)
    t = torch.tanh(logits / cap)
    return t * cap, (1 - t * t) * factor


@functools.cache
def linear_cross_entropy() -> Any:
    """`f(hidden [N, H], weight [V, H], bias, targets [N], transform) -> loss`: CE(transform(hidden @ W^T + b), targets),
    the mean over targets != -100, in chunks (a torch.autograd.Function's apply, made on first use: importing llmkit
    does not import torch)."""
    import torch
    import torch.nn.functional as F

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, hidden: Any, weight: Any, bias: Any, targets: Any, transform: tuple[Any, Any, Any]) -> Any:
            n, vocab = hidden.shape[0], weight.shape[0]
            valid = targets != -100
            count = valid.sum().clamp(min=1).float()
            # gradients only for what needs them: none under no_grad (evaluation), no head gradient for LoRA
            need_h, need_w, need_b = ctx.needs_input_grad[:3]
            grad_h = torch.zeros_like(hidden) if need_h else None
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
            grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            step = max(1, CHUNK_ELEMENTS // vocab)
            for start in range(0, n, step):
                rows = valid[start:start + step]
                if not bool(rows.any()):
                    continue
                h = hidden[start:start + step][rows]
                t = targets[start:start + step][rows]
                raw = F.linear(h, weight, bias).float()  # autocast picks the matmul's dtype, as for the model's own head
                logits, slope = _transformed(raw, transform)
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if not (need_h or need_w or need_b):
                    continue
                # d loss / d logits = (softmax - one_hot) / count, then through the transform to the head's output
                grad = torch.softmax(logits, dim=-1)
                grad[torch.arange(len(t), device=grad.device), t] -= 1
                grad /= count
                if slope is not None:
                    grad *= slope
                del logits, raw
                if grad_h is not None:
                    index = torch.arange(start, min(start + step, n), device=hidden.device)[rows]
                    grad_h.index_copy_(0, index, (grad @ weight.float()).to(hidden.dtype))
                if grad_w is not None:
                    grad_w += grad.t() @ h.float()
                if grad_b is not None:
                    grad_b += grad.sum(0)
            ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
            ctx.has = (grad_h is not None, grad_w is not None, grad_b is not None)
            ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
            return total / count

        @staticmethod
        def backward(ctx: Any, grad_out: Any) -> Any:
            # the gradients were computed in forward for a loss of 1: scale them by what comes back
            saved = iter(ctx.saved_tensors)
            grads = [(next(saved) * grad_out).to(dtype) if has else None for has, dtype in zip(ctx.has, ctx.dtypes, strict=True)]
            return (*grads, None, None)

    return Fn.apply
