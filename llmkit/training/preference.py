"""Preference tuning on the one loop: DPO, IPO, SimPO, ORPO (+ RPO's NLL term), with a cached reference.

    >>> loss = PreferenceLoss("dpo", beta=0.1)         # TrainJob.loss_fn: batches of [chosen; rejected] rows
    >>> loss = PreferenceLoss("dpo", reference=BatchReference(...))   # reference log-probs per batch (training/reference.py)

Every objective scores a response by the sum of its tokens' log-probs under the policy (pi) and, for DPO and IPO,
under the reference (ref: the starting model). With c / r for chosen / rejected and |y| a response's length:

    dpo     -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))              rewards beta * (pi - ref)
    ipo     ((pi_c - ref_c)/|c| - (pi_r - ref_r)/|r| - 1 / (2 beta))^2          (per-token log-probs, as TRL)
    simpo   -log sigmoid(beta * (pi_c/|c| - pi_r/|r|) - gamma)                   rewards beta * pi/|y|
    orpo    NLL(c) - beta * log sigmoid(log odds(c) - log odds(r)),  odds(y) = p / (1 - p),  p = exp(pi/|y|)
    + sft_weight * NLL(c)   (RPO)        NLL(c): the chosen tokens' mean cross-entropy

The reference needs no second model in memory (llmkit/training/reference.py): with LoRA it is the model with its
adapter disabled, computed per batch as the batch is drawn; a full fine-tune's is computed before training with the
model as built, for the rows the run will draw only. Either way each row is cached on disk as it is computed, keyed
by the starting weights, the data and the precision: `--resume` and later runs find them; any change computes anew.

Both sides of a batch go through the model in one forward ([chosen; rejected] rows), and the LM head runs only
at response positions (`logits_to_keep`), as chat SFT's sparse loss does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmkit.data.examples import Collator
from llmkit.progress import bar as progress_bar
from llmkit.training.losses import LoggedParts, keeps_logits

DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "orpo": 0.1, "simpo": 2.0}
NEEDS_REFERENCE = ("dpo", "ipo")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy", "logps/chosen", "logps/rejected")


def resolved_beta(objective: str, beta: float | None) -> float:
    return DEFAULT_BETA[objective] if beta is None else beta


def preference_losses(objective: str, beta: float, chosen: Any, rejected: Any, n_chosen: Any, n_rejected: Any,
                      ref_chosen: Any = None, ref_rejected: Any = None, simpo_gamma: float = 0.5) -> tuple[Any, Any, Any]:
    """(per-pair loss, chosen rewards, rejected rewards) from summed response log-probs ([pairs] tensors each).

    ORPO's NLL term is not in the per-pair loss: it is a mean over tokens, added by the caller (`PreferenceLoss`)."""
    import torch
    import torch.nn.functional as F

    if objective == "dpo":
        rc, rr = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
        return -F.logsigmoid(rc - rr), rc, rr
    if objective == "ipo":
        c, r = (chosen - ref_chosen) / n_chosen, (rejected - ref_rejected) / n_rejected
        return (c - r - 1 / (2 * beta)) ** 2, beta * c, beta * r
    avg_c, avg_r = chosen / n_chosen, rejected / n_rejected
    if objective == "simpo":
        return -F.logsigmoid(beta * (avg_c - avg_r) - simpo_gamma), beta * avg_c, beta * avg_r
    if objective == "orpo":
        # log(1 - p) = log(-expm1(log p)): exact where p is close to 1
        log_odds = (avg_c - avg_r) - (torch.log(-torch.expm1(avg_c)) - torch.log(-torch.expm1(avg_r)))
        return -beta * F.logsigmoid(log_odds), beta * avg_c, beta * avg_r
    raise ValueError(f"unknown preference objective {objective!r}")


def sequence_logps(model: Any, batch: dict[str, Any], sparse: bool = True) -> tuple[Any, Any]:
    """(summed log-prob of each row's labelled tokens, their count), the LM head run only where some row has a label."""
    import torch.nn.functional as F

    targets = batch["labels"][:, 1:]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if sparse:
        keep = (targets != -100).any(dim=0).nonzero().squeeze(-1)
        logits = model(**inputs, logits_to_keep=keep).logits
        targets = targets[:, keep]
    else:
        logits = model(**inputs).logits[:, :-1]
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
    return -nll.sum(-1), (targets != -100).sum(-1)


class PreferenceCollator:
    """A batch of B pairs as 2B rows, chosen then rejected, padded alike; `reference` [B, 2] when the pairs carry it."""

    def __init__(self, pad_id: int) -> None:
        self.rows = Collator(pad_id, causal=True)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = self.rows([{"input_ids": it["input_ids"], "labels": it["labels"]} for it in items]
                          + [{"input_ids": it["rejected_ids"], "labels": it["rejected_labels"]} for it in items])
        if "reference" in items[0]:
            batch["reference"] = torch.tensor([it["reference"] for it in items], dtype=torch.float32)
        if "index" in items[0]:  # the reference is looked up (or computed) per batch: llmkit/training/reference.py
            batch["index"] = torch.tensor([it["index"] for it in items], dtype=torch.int64)
        batch["num_tokens"] = batch["attention_mask"].sum()
        batch["num_examples"] = torch.tensor(len(items))  # samples/s counts pairs
        return batch


class WithReference:
    """Pairs, each carrying its reference log-probs (chosen, rejected) from the cache."""

    def __init__(self, examples: Any, reference: Any) -> None:
        self.examples, self.reference = examples, reference.tolist()
        self.lengths, self.input_ids, self.key = examples.lengths, examples.input_ids, examples.key

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.examples[i], "reference": self.reference[i]}

    @property
    def tokens(self) -> int:
        return self.examples.tokens


class PreferenceLoss(LoggedParts):
    """`TrainJob.loss_fn` for preference objectives; keeps the metrics of the batches since the last log line."""

    def __init__(self, objective: str, beta: float | None = None, sft_weight: float = 0.0, simpo_gamma: float = 0.5,
                 model: Any = None, reference: Callable[[dict[str, Any]], Any] | None = None) -> None:
        self.reference = reference  # batch -> [pairs, 2], for batches that carry row indices, not log-probs
        self.objective, self.beta, self.sft_weight, self.simpo_gamma = objective, resolved_beta(objective, beta), sft_weight, simpo_gamma
        self.sparse = model is None or keeps_logits(model)
        super().__init__()

    def terms(self, model: Any, batch: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """(the batch's loss, per-pair metric tensors)."""
        logps, counts = sequence_logps(model, batch, self.sparse)
        pairs = len(logps) // 2
        chosen, rejected, n_c, n_r = logps[:pairs], logps[pairs:], counts[:pairs], counts[pairs:]
        ref = batch.get("reference")
        if ref is None and "index" in batch and self.reference is not None:
            ref = self.reference(batch)
        ref_c, ref_r = (ref[:, 0], ref[:, 1]) if ref is not None else (None, None)
        losses, rc, rr = preference_losses(self.objective, self.beta, chosen, rejected, n_c, n_r, ref_c, ref_r, self.simpo_gamma)
        loss = losses.mean()
        nll = -chosen.sum() / n_c.sum().clamp(min=1)
        if self.objective == "orpo":
            loss = loss + nll
        if self.sft_weight:
            loss = loss + self.sft_weight * nll
        metrics = {"rewards/chosen": rc, "rewards/rejected": rr, "rewards/margins": rc - rr, "rewards/accuracy": (rc > rr).float(),
                   "logps/chosen": chosen, "logps/rejected": rejected, "logp_accuracy": (chosen > rejected).float()}
        return loss, metrics

    def __call__(self, model: Any, batch: dict[str, Any]) -> Any:
        loss, metrics = self.terms(model, batch)
        self.keep({name: metrics[name].detach().float().mean() for name in METRICS})
        return loss

    def evaluate(self, model: Any, loader: Any, accelerator: Any = None) -> dict[str, float]:
        """Held-out loss and metrics over every pair (means), plus `preference_accuracy` when the reference is known."""
        import torch

        gather = accelerator.gather_for_metrics if accelerator is not None else (lambda x: x)
        was_training = model.training
        model.eval()
        per_pair: dict[str, list[Any]] = {}
        with torch.no_grad():
            for batch in loader:
                batch = {k: v for k, v in batch.items() if k not in ("num_tokens", "num_examples")}
                loss, metrics = self.terms(model, batch)
                metrics["loss"] = loss.reshape(1).expand(len(metrics["logps/chosen"]))  # the batch mean, per pair
                for name, values in zip(metrics, gather(tuple(metrics.values())), strict=True):
                    per_pair.setdefault(name, []).append(values.float().cpu())
        if was_training:
            model.train()
        out = {name: float(torch.cat(v).mean()) for name, v in per_pair.items()}
        out["pairs"] = int(sum(len(v) for v in per_pair["loss"]))
        return out


# ------------------------------------------------------------------------------------------ scoring pairs


def pair_logps(model: Any, examples: Any, collate: PreferenceCollator, accelerator: Any = None, batch_size: int = 8,
               progress: bool = False, what: str = "reference log-probs") -> Any:
    """[N, 2]: each pair's summed (chosen, rejected) response log-probs under `model`, in eval mode, under the
    accelerator's autocast (the training precision) when one is given."""
    import contextlib

    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(examples, batch_size=batch_size, collate_fn=collate)
    bar = progress_bar(len(loader), what, "batch", enabled=progress)
    sparse = keeps_logits(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad(), accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
        for batch in loader:
            logps, _ = sequence_logps(model, {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}, sparse)
            out.append(logps.float().view(2, -1).t().cpu())
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if was_training:
        model.train()
    return torch.cat(out) if out else torch.zeros(0, 2)


def disable_dropout(model: Any) -> None:
    """Every dropout at p=0: nn.Dropout modules (the model's and LoRA's) and the attention dropout transformers'
    attention modules keep as a float (read at init from the config)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
