"""Causal-LM cross-entropy that never holds tokens x vocabulary logits: the LM head and the loss, chunk by chunk.

    >>> loss = chunked_causal_lm_loss(model, batch)     # the value and the gradients of model(**batch).loss

A 262k-token vocabulary (Gemma 3) at 4 x 256 tokens gives 1 GB of fp32 logits, and the plain path keeps three
such tensors (logits, their log-softmax, its gradient): the first wall users hit, long before the model's own
size. Here the model runs as usual but asked for no logits (`logits_to_keep` empty: its LM head sees zero
positions); a hook takes the backbone's last hidden states, and `ChunkedLinearCrossEntropy` runs the head over
CHUNK tokens at a time. Each chunk's loss and its gradients (for the hidden states, and for the head's weight when
it is trained) are computed at once, in forward, and the chunk's logits are freed before the next one: the idea
of Liger's fused linear cross-entropy, without a kernel of its own. At most one chunk of logits exists at a time.

The head-and-chain-rule part is generic (`chunked_head`, over a per-chunk loss callback, `ChunkLoss`): the
cross-entropy is one such loss, distillation's KD term against a teacher's cached top-k logits (or its full logits,
computed a chunk at a time from its own hidden states) another, and `WeightedChunks` sums them over one pass of the
head (llmkit/distill.py, `DistillLoss.chunked_loss`).

The model goes through its own forward (DDP's hooks, LoRA layers, gradient checkpointing all as usual); only
the last step, head + loss, is replaced. Families whose head is followed by a scale or a soft-cap (Granite's
`logits_scaling`, Cohere's `logit_scale`, Gemma 2's `final_logit_softcapping`) get the same transformation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
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
    run = head_inputs(model, batch)
    targets = batch["labels"][:, 1:]
    return linear_cross_entropy()(run.hidden[:, :-1].reshape(-1, run.hidden.shape[-1]), run.head.weight, run.head.bias,
                                  targets.reshape(-1), run.transform)


def chunked_causal_lm_nll(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """Evaluation (under no_grad): per-example summed NLL and predicted-token counts, a chunk of rows' logits at a time."""
    import torch
    import torch.nn.functional as F

    run = head_inputs(model, batch)
    hidden, head = run.hidden[:, :-1], run.head
    targets = batch["labels"][:, 1:]
    nll = torch.zeros(targets.shape[0], dtype=torch.float32, device=targets.device)
    rows = max(1, CHUNK_ELEMENTS // (head.weight.shape[0] * max(1, targets.shape[1])))
    for start in range(0, targets.shape[0], rows):
        logits, _ = _transformed(F.linear(hidden[start:start + rows], head.weight, head.bias).float(), run.transform)
        t = targets[start:start + rows]
        nll[start:start + rows] = F.cross_entropy(logits.transpose(1, 2), t, ignore_index=-100, reduction="none").sum(dim=1)
    return nll, (targets != -100).sum(dim=1).to(torch.long)


@dataclass
class HeadInputs:
    """A causal LM run without its LM head: what the head would have seen, and the head itself."""

    hidden: Any  # [B, S, H]: the backbone's last hidden states, every position (callers drop the last for next-token CE)
    head: Any  # the LM head (a Linear)
    transform: tuple[Any, Any, Any]  # (logit_scale, logits_scaling, final_logit_softcapping) of the family, None where absent
    output: Any  # the model's own output (hidden_states when asked; logits empty)


def head_inputs(model: Any, batch: dict[str, Any], **kwargs: Any) -> HeadInputs:
    """Run `model` (`batch` without labels, + kwargs such as output_hidden_states) asking for no logits."""
    import torch

    base = _unwrap(model)
    captured: list[Any] = []
    hook = base.get_decoder().register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = model(**inputs, **kwargs, logits_to_keep=torch.zeros(0, dtype=torch.long, device=batch["input_ids"].device))
    finally:
        hook.remove()
    cfg = base.config
    transform = (getattr(cfg, "logit_scale", None), getattr(cfg, "logits_scaling", None), getattr(cfg, "final_logit_softcapping", None))
    return HeadInputs(captured[-1], base.get_output_embeddings(), transform, out)


def head_logits(run: HeadInputs, rows: Any) -> Any:
    """fp32 logits (after the family's transform) of the flattened positions `rows`: a teacher's, a chunk at a time."""
    import torch.nn.functional as F

    hidden = run.hidden.reshape(-1, run.hidden.shape[-1])
    return _transformed(F.linear(hidden[rows], run.head.weight, run.head.bias).float(), run.transform)[0]


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


# ------------------------------------------------------------------------------- the chunked head, and its losses

# A chunk's loss: (fp32 logits [n, V] after the transform, their row numbers [n] in the flattened positions, whether
# gradients are wanted) -> (the chunk's share of the loss, a 0-dim tensor; d(that)/d(logits) [n, V], or None for 0).
ChunkLoss = Callable[[Any, Any, bool], tuple[Any, Any]]


@functools.cache
def chunked_head() -> Any:
    """`f(hidden [N, H], weight [V, H], bias, transform, rows [N] bool, loss: ChunkLoss) -> loss`: the sum of `loss` over
    chunks of the `rows` (positions no term reads are skipped), the head run on each chunk and its logits freed before
    the next. Every loss over the head's logits (cross-entropy, a KD term, their weighted sum) is a `ChunkLoss`; this
    does the rest once: the head, the family's transform, and the chain rule back to hidden / weight / bias.
    (A torch.autograd.Function's apply, made on first use: importing llmkit does not import torch.)"""
    import torch
    import torch.nn.functional as F

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, hidden: Any, weight: Any, bias: Any, transform: tuple[Any, Any, Any], rows: Any, loss: ChunkLoss) -> Any:
            n, vocab = hidden.shape[0], weight.shape[0]
            # gradients only for what needs them: none under no_grad (evaluation), no head gradient for LoRA
            need_h, need_w, need_b = ctx.needs_input_grad[:3]
            need = need_h or need_w or need_b
            grad_h = torch.zeros_like(hidden) if need_h else None
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
            grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            autocast = torch.is_autocast_enabled(hidden.device.type)
            step = max(1, CHUNK_ELEMENTS // vocab)
            for start in range(0, n, step):
                keep = rows[start:start + step]
                if not bool(keep.any()):
                    continue
                index = torch.arange(start, min(start + step, n), device=hidden.device)[keep]
                h = hidden[index]
                raw = F.linear(h, weight, bias).float()  # autocast picks the matmul's dtype, as for the model's own head
                logits, slope = _transformed(raw, transform)
                value, grad = loss(logits, index, need)
                total += value
                del logits, raw  # the chunk's logits go before the next chunk's come
                if grad is None:
                    continue
                if slope is not None:  # through the transform, back to the head's output
                    grad *= slope
                if grad_h is not None:
                    grad_h.index_copy_(0, index, _times_weight(grad, weight, autocast).to(hidden.dtype))
                if grad_w is not None:
                    grad_w += grad.t() @ h.float()
                if grad_b is not None:
                    grad_b += grad.sum(0)
            ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
            ctx.has = (grad_h is not None, grad_w is not None, grad_b is not None)
            ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
            return total

        @staticmethod
        def backward(ctx: Any, grad_out: Any) -> Any:
            # the gradients were computed in forward for a loss of 1: scale them by what comes back
            saved = iter(ctx.saved_tensors)
            grads = [(next(saved) * grad_out).to(dtype) if has else None for has, dtype in zip(ctx.has, ctx.dtypes, strict=True)]
            return (*grads, None, None, None)

    return Fn.apply


def _times_weight(grad: Any, weight: Any, autocast: bool) -> Any:
    """`grad @ weight.float()` (grad [n, V] fp32, the head's weight [V, H]) without an fp32 copy of the whole weight.

    A bf16/fp16 head goes to fp32 a block of vocabulary rows at a time, a block no bigger than a chunk's logits (which
    the loss holds anyway). Measured on a 262k x 640 bf16 head, 4 x 256 tokens, frozen (CPU, one forward+backward):
    a whole copy each chunk peaks at +788 MB, one copy kept for the whole forward at +1045 MB (it then sits beside
    a chunk's logits and softmax) for ~10% less CPU time, these blocks at +404 MB in the same time as whole copies.
    Under autocast the matmul runs in autocast's dtype whatever it is given (an fp32 copy would be cast straight
    back), so the weight goes as it is: the same result, no copy (+1172 MB -> +403 MB). An fp32 head is used as it is."""
    import torch

    if autocast or weight.dtype == torch.float32:
        return grad @ weight
    rows = max(1, CHUNK_ELEMENTS // weight.shape[1])
    if rows >= weight.shape[0]:
        return grad @ weight.float()
    out = grad.new_zeros(grad.shape[0], weight.shape[1])
    for start in range(0, weight.shape[0], rows):
        out.addmm_(grad[:, start:start + rows], weight[start:start + rows].float())
    return out


def linear_cross_entropy() -> Callable[..., Any]:
    """`f(hidden [N, H], weight [V, H], bias, targets [N], transform) -> loss`: CE(transform(hidden @ W^T + b), targets),
    the mean over targets != -100, in chunks."""

    def apply(hidden: Any, weight: Any, bias: Any, targets: Any, transform: tuple[Any, Any, Any]) -> Any:
        valid = targets != -100
        return chunked_head()(hidden, weight, bias, transform, valid, cross_entropy_chunks(targets, valid.sum().clamp(min=1).float()))

    return apply


def cross_entropy_chunks(targets: Any, count: Any) -> ChunkLoss:
    """CE against `targets` [N] (-100: no term at that row), summed and divided by `count` (the batch's labelled tokens)."""
    import torch

    def loss(logits: Any, index: Any, need: bool) -> tuple[Any, Any]:
        t = targets[index]
        valid = t != -100
        if not bool(valid.any()):  # a row only another term reads (the KD term at the last position)
            return logits.new_zeros(()), None
        partial = not bool(valid.all())
        if partial:
            t = t.clamp(min=0)
        lse = torch.logsumexp(logits, dim=-1)
        per_row = lse - logits.gather(1, t[:, None]).squeeze(1)
        value = (per_row[valid] if partial else per_row).sum() / count
        if not need:
            return value, None
        # d loss / d logits = (softmax - one_hot) / count, 0 where no target
        grad = torch.softmax(logits, dim=-1)
        grad[torch.arange(len(t), device=grad.device), t] -= 1
        if partial:
            grad[~valid] = 0
        grad /= count
        return value, grad

    return loss


def kd_chunks(teacher: Callable[[Any], tuple[Any, Any]], mask: Any, temperature: float) -> ChunkLoss:
    """losses.kd_loss_topk / kd_loss, chunked: T^2 * KL(p || q) averaged over the rows where `mask` [N] is true, with
    q the student's softmax(logits / T) and p the teacher's softmax(values / T) over its `indices` (all V when None);
    `teacher(rows) -> (values [n, K or V], indices [n, K] or None)` gives the teacher's side of those rows."""
    import torch

    count = mask.sum().clamp(min=1).float()
    T = temperature

    def loss(logits: Any, index: Any, need: bool) -> tuple[Any, Any]:
        m = mask[index]
        if not bool(m.any()):
            return logits.new_zeros(()), None
        partial = not bool(m.all())
        values, indices = teacher(index[m])
        log_q = torch.log_softmax((logits[m] if partial else logits) / T, dim=-1)
        log_p = torch.log_softmax(values.float() / T, dim=-1)
        p = log_p.exp()
        read = log_q if indices is None else log_q.gather(1, indices.long())
        value = (p * (log_p - read)).sum() * (T * T) / count
        if not need:
            return value, None
        # d/d logits of T^2 * sum_k p_k (log p_k - log q_k) / count = T * (q * sum_k p_k - p scattered to its ids) / count,
        # the chain of log_softmax and gather that autograd takes through the plain path (sum_k p_k kept: ~1, not 1)
        g = log_q.exp_().mul_(p.sum(-1, keepdim=True))
        if indices is None:
            g -= p
        else:
            g.scatter_add_(1, indices.long(), -p)
        g *= T / count
        if not partial:
            return value, g
        grad = torch.zeros_like(logits)
        grad[m] = g
        return value, grad

    return loss


class WeightedChunks:
    """The weighted sum of several chunk losses over the same logits (the head runs once for all), each one's own
    (unweighted) total kept in `totals` for logging."""

    def __init__(self, terms: dict[str, tuple[float, ChunkLoss]]) -> None:
        self.terms = terms
        self.totals: dict[str, Any] = {}

    def __call__(self, logits: Any, index: Any, need: bool) -> tuple[Any, Any]:
        value, grad = 0.0, None
        for name, (weight, term) in self.terms.items():
            v, g = term(logits, index, need and weight != 0)  # a zero weight: logged, no gradient computed
            self.totals[name] = self.totals.get(name, 0.0) + v
            value = value + weight * v
            if g is not None:
                grad = g.mul_(weight) if grad is None else grad.add_(g, alpha=weight)
        return value, grad
