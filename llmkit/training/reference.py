"""The reference model's log-probs (DPO, IPO; later GRPO's KL term): per batch, only for the rows a run draws, cached per row.

    >>> cache = ReferenceCache(folder)                              # every row earlier runs computed (any process)
    >>> ref = BatchReference(model, cache, accelerator, lazy=True)  # LoRA: the adapter off, when a batch is drawn
    >>> logps = ref(batch)                                          # [pairs, 2]: (chosen, rejected), from the cache or computed

The reference is the starting model. With LoRA it is the model with its adapter disabled, at any step, so it is
computed lazily, when a batch is drawn: no pass over rows the run never sees, and no second model in memory. A full
fine-tune changes the very weights the reference needs, so its rows are computed up front (`fill`), with the model
as built, but only the rows the run will draw (`planned_rows`: the epoch sampler's seeded order, steps x batch x
accumulation), not the whole data set.

Each computed batch is written at once as its own small safetensors file through llmkit.atomic: a kill loses at
most the batch being computed, and `--resume` (or a later run on the same pairs and weights) finds every row
computed before. Many small files are merged into one when the cache is opened.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmkit.atomic import atomic_path, remove
from llmkit.data.examples import EpochSampler
from llmkit.progress import bar as progress_bar
from llmkit.training.checkpoints import max_over_processes
from llmkit.training.losses import keeps_logits
from llmkit.training.preference import sequence_logps

CACHE_VERSION = 2  # 1: one [N, 2] file of every pair, written before training
MERGE_OVER = 256  # chunk files: more than this and the cache is merged into one file when opened


def reference_key(weights: list[Any], model_name: str, method: str, precision: str, examples: Any) -> str:
    """What reference log-probs depend on: the starting weights, how they are held (4-bit or not), the precision of
    the forward pass, and the pairs (their prepared-data key: tokenizer, template, lengths, rows)."""
    facts = [CACHE_VERSION, model_name, weights, method == "qlora", precision, examples.key, len(examples)]
    return hashlib.sha256(json.dumps(facts, default=str).encode()).hexdigest()[:24]


def batch_reference_logps(model: Any, batch: dict[str, Any], autocast: Callable[[], Any] | None = None) -> Any:
    """[pairs, 2] float32 on the CPU: each pair's summed (chosen, rejected) response log-probs under the reference,
    `model` with its LoRA adapter disabled (a plain model as it is), in eval mode, without gradients; `batch` holds
    [chosen; rejected] rows (`PreferenceCollator`). `autocast`: makes the training precision's context (Accelerate's
    `accelerator.autocast`), when there is one."""
    import torch

    off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    was_training = model.training
    model.eval()  # dropout off, as when the old up-front pass ran
    try:
        with torch.no_grad(), off, autocast() if autocast is not None else contextlib.nullcontext():
            logps, _ = sequence_logps(model, {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}, keeps_logits(model))
    finally:
        if was_training:
            model.train()
    return logps.float().view(2, -1).t().cpu()


class ReferenceCache:
    """The rows of one reference (a `reference_key` folder): {row index: (chosen, rejected)}, read from every chunk
    file in the folder, and grown one crash-safe chunk file per computed batch."""

    def __init__(self, folder: Path, process: int = 0) -> None:
        self.folder, self.process = Path(folder), process
        self.rows: dict[int, tuple[float, float]] = {}
        self.computed = 0  # rows this process computed (tests and the closing line count them)
        self._load()

    def _load(self) -> None:
        from safetensors.torch import load_file

        files = sorted(self.folder.glob("rows-*.safetensors"))
        for f in files:
            t = load_file(str(f))
            self.rows.update(zip(t["index"].tolist(), map(tuple, t["logps"].tolist()), strict=True))
        if len(files) > MERGE_OVER and self.process == 0:
            # the merged file is complete before any chunk goes: a kill in between leaves duplicates, same values
            self._write(sorted(self.rows), "merged")
            for f in files:
                remove(f)

    def missing(self, rows: list[int]) -> list[int]:
        return [i for i in dict.fromkeys(rows) if i not in self.rows]

    def add(self, index: list[int], logps: Any) -> None:
        """Keep rows `index` ([k, 2] `logps`): on disk first, then in memory."""
        values = dict(zip(index, map(tuple, logps.tolist()), strict=True))  # a wrapped-around batch repeats a row
        self.rows.update(values)
        self.computed += len(values)
        self._write(list(values), f"p{self.process}")

    def _write(self, index: list[int], tag: str) -> None:
        import torch
        from safetensors.torch import save_file

        digest = hashlib.sha1(json.dumps(index).encode()).hexdigest()[:12]
        tensors = {"index": torch.tensor(index, dtype=torch.int64), "logps": torch.tensor([self.rows[i] for i in index],
                                                                                           dtype=torch.float32).reshape(-1, 2)}
        with atomic_path(self.folder / f"rows-{tag}-{digest}.safetensors", sweep=True) as tmp:
            save_file(tensors, str(tmp))

    def tensor(self, rows: list[int]) -> Any:
        import torch

        return torch.tensor([self.rows[i] for i in rows], dtype=torch.float32).reshape(-1, 2)


def fill(model: Any, examples: Any, rows: list[int], cache: ReferenceCache, collate: Any, accelerator: Any = None,
         batch_size: int = 8, progress: bool = False) -> int:
    """Compute the rows of `rows` the cache lacks, `batch_size` pairs a forward, each batch kept as it is done; the
    number computed. With the model as it is now: before training, for a full fine-tune or the eval pairs."""
    todo = cache.missing(rows)
    bar = progress_bar(len(todo), "reference log-probs", "pair", enabled=progress and bool(todo))
    device = next(model.parameters()).device
    autocast = accelerator.autocast if accelerator is not None else None
    for start in range(0, len(todo), batch_size):
        index = todo[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in index]).items() if k in ("input_ids", "attention_mask", "labels")}
        cache.add(index, batch_reference_logps(model, batch, autocast))
        if bar is not None:
            bar.update(len(index))
    if bar is not None:
        bar.close()
    return len(todo)


def planned_rows(n: int, lengths: Any, batch_size: int, grad_accum: int, max_steps: int, seed: int, world: int = 1,
                 group_by_length: bool = True) -> list[int]:
    """The rows a run draws, in the order it first draws them: `fit`'s epoch sampler (llmkit/training/loop.py
    `make_loaders`, same arguments) dealing global batches of batch_size x processes. Without --max-steps, or with
    at least an epoch of steps, that is every row; otherwise the first max_steps x grad_accum global batches of
    epoch 0 (an epoch's optimizer steps are ceil(batches / grad_accum): the last one may take a short window)."""
    group = batch_size * world
    batches = math.ceil(n / group)  # per process
    if not max_steps or max_steps >= math.ceil(batches / grad_accum):
        return list(range(n))
    import numpy as np

    lengths = np.asarray(lengths)
    by_length = group_by_length and len(lengths) and lengths.min() != lengths.max()  # as make_loaders decides
    order = list(EpochSampler(n, seed, group, lengths if by_length else None))
    return order[:max_steps * grad_accum * group]


class BatchReference:
    """The `reference` of a training batch ([pairs, 2] on its device) from the rows its pairs carry (`llmkit.data.examples.IndexedExamples`):
    cached rows read, the others computed with `batch_reference_logps` when `lazy` (the reference does not move
    while training: LoRA), or refused (a full fine-tune's rows are all computed before its first step)."""

    def __init__(self, model: Any, cache: ReferenceCache, accelerator: Any, lazy: bool, expected: int = 0,
                 progress: bool = False) -> None:
        self.model, self.cache, self.accelerator, self.lazy, self.left = model, cache, accelerator, lazy, expected
        # the rows the run will compute as it goes: what the bar counts toward
        self.bar = progress_bar(expected, "reference log-probs (as batches are drawn)", "pair", enabled=progress and lazy and expected > 0)

    def __call__(self, batch: dict[str, Any]) -> Any:
        index = batch["index"].tolist()
        missing = self.cache.missing(index)
        # every process forwards together or none does: a sharded (FSDP) model's forward is a collective
        compute = bool(missing)
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            compute = max_over_processes(self.accelerator, [float(compute)])[0] > 0
        if compute:
            if not self.lazy and missing:
                raise RuntimeError(f"reference log-probs of rows {missing[:5]} were not computed before training (the "
                                   "weights have changed since): llmkit/training/reference.py planned_rows missed them")
            autocast = self.accelerator.autocast if self.accelerator is not None else None
            logps = batch_reference_logps(self.model, batch, autocast)
            todo = set(missing)
            fresh = [k for k, i in enumerate(index) if i in todo]
            if fresh:
                import torch

                self.cache.add([index[k] for k in fresh], logps[torch.tensor(fresh)])
                self.left -= len(todo)
                if self.bar is not None:
                    self.bar.update(len(todo))
                    if self.left <= 0:
                        self.close()
        return self.cache.tensor(index).to(batch["input_ids"].device)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
