"""Losses beyond the model's own: knowledge distillation (logits and hidden states).

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(labels)
           + hidden_weight * (1 - cos(student hidden, teacher hidden))

The T^2 factor (Hinton et al., 2015) keeps the KD gradients the same size whatever the temperature, so
alpha means the same thing at T=1 and T=4. Only real positions count: `mask` drops padding.
"""

from __future__ import annotations

from typing import Any


def kd_loss(student_logits: Any, teacher_logits: Any, mask: Any, temperature: float) -> Any:
    """T^2 * KL(teacher || student) per position, averaged over positions where `mask` is true.

    Logits are [..., V]; `mask` has the leading shape ([B] for classifiers, [B, S] for LMs).
    """
    import torch.nn.functional as F

    s = student_logits[mask].float() / temperature
    t = teacher_logits[mask].float() / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    return kl.mean() * temperature**2


def kd_loss_topk(student_logits: Any, top_values: Any, top_indices: Any, mask: Any, temperature: float) -> Any:
    """The KD term against a cached teacher: its top-k logits, renormalised over those k tokens.

    KL(p_k || q) with p_k the teacher's distribution restricted to its k most likely tokens and q the
    student's full distribution read at those tokens. With k = V it is exactly `kd_loss`.
    """
    import torch.nn.functional as F

    log_q = F.log_softmax(student_logits[mask].float() / temperature, -1).gather(-1, top_indices[mask].long())
    log_p = F.log_softmax(top_values[mask].float() / temperature, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temperature**2


def hidden_cosine_loss(student_hidden: list[Any], teacher_hidden: list[Any], mask: Any) -> Any:
    """Mean over aligned layer pairs of (1 - cosine similarity), over real tokens (DistilBERT's cosine loss)."""
    import torch.nn.functional as F

    total = 0.0
    for s, t in zip(student_hidden, teacher_hidden, strict=True):
        total = total + (1 - F.cosine_similarity(s[mask].float(), t[mask].float(), dim=-1)).mean()
    return total / len(student_hidden)


def sparse_causal_lm_loss(model: Any, batch: dict[str, Any]) -> Any:
    """The model's own causal-LM loss (mean next-token cross-entropy over labelled tokens), with the LM head run
    only at positions whose next token is learned in some row of the batch.

    Assistant-only chat data labels ~3% of the tokens (a one-word reply in a 77-token conversation): the
    vocabulary projection (SmolLM2: 576 x 49152, about a fifth of the model's compute) and its fp32 logits are
    then mostly wasted. transformers' `logits_to_keep` takes the positions to keep; the loss is the same.
    """
    import torch.nn.functional as F

    targets = batch["labels"][:, 1:]
    keep = (targets != -100).any(dim=0).nonzero().squeeze(-1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=keep).logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[:, keep].reshape(-1), ignore_index=-100)


def keeps_logits(model: Any) -> bool:
    """Whether the model's forward takes `logits_to_keep` (transformers' causal LMs do; a custom one may not)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(type(base).forward).parameters


class LoggedParts:
    """A loss (`TrainJob.loss_fn`) that keeps named values of each micro-batch (loss parts, rewards); `log_extra`
    gives their means since the last call, which train.fit logs beside the loss."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.count = 0

    def keep(self, parts: dict[str, Any]) -> None:
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def log_extra(self) -> dict[str, Any]:
        means = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        self.sums, self.count = {}, 0
        return means
