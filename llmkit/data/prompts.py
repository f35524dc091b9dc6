"""Prompts for learning from rewards (`--objective grpo`): token ids to sample from, and the columns rewards read.

    >>> data = prepare_data(cfg, tokenizer)        # cfg.objective == "grpo": data.train is a PromptSet (llmkit/data/prepare.py)
    >>> data.train.prompt_ids(3), data.train.columns(3)   # [ids], {"answer": "positive", ...}

Row shapes (JSONL / JSON / CSV / parquet / Hub, like every other data):

    {"prompt": "Q: 2+3=? A:", "answer": "5"}                              plain text, tokenized as it is
    {"prompt": [{"role": "user", "content": "2+3?"}], "answer": "5"}      messages: rendered with the chat template
                                                                           and its generation prompt, as `generate --chat`

Every column other than `prompt` is kept as it is and handed to the reward functions by name (TRL's convention).
The result goes through llmkit's prepared-data cache like all data: keyed on the files, the tokenizer and the
template, written under a temporary name and renamed when complete.
"""

from __future__ import annotations

from typing import Any

from llmkit.errors import UsageError

PROMPTS_VERSION = 1


class PromptSet:
    """Prompt token ids and their rows' other columns; a dataset of row indices for the training loop's sampler."""

    streaming = False
    dropped = 0

    def __init__(self, rows: list[dict[str, Any]], key: str) -> None:
        import numpy as np

        self.rows, self.key = rows, key  # rows: {"ids": [...], "prompt": str | messages, "columns": {...}, "where": "file:line N"}
        self.lengths = np.array([len(r["ids"]) for r in rows], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"index": i, "tokens": len(self.rows[i]["ids"])}

    @property
    def conversations(self) -> int:  # what the run record counts for chat data: one per prompt
        return len(self.rows)

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

    def prompt_ids(self, i: int) -> list[int]:
        return self.rows[i]["ids"]

    def prompt(self, i: int) -> Any:
        return self.rows[i]["prompt"]

    def columns(self, i: int) -> dict[str, Any]:
        return self.rows[i]["columns"]

    def where(self, i: int) -> str:
        return self.rows[i]["where"]

    def head(self, n: int) -> PromptSet:
        return self if not n or n >= len(self) else PromptSet(self.rows[:n], f"{self.key}:head{n}")


class PromptCollator:
    """A batch of row indices (the rollouts are made from them inside the GRPO loss). `num_tokens` counts the prompt
    tokens of its `group` rollouts each, what the loop's tokens/s can know before sampling; the loss logs the
    completions' own speeds (rollout_tokens_per_s, train_tokens_per_s)."""

    def __init__(self, group: int) -> None:
        self.group = group

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        return {"index": torch.tensor([it["index"] for it in items], dtype=torch.int64), "num_examples": torch.tensor(len(items)),
                "num_tokens": torch.tensor(self.group * sum(it["tokens"] for it in items))}


def read_prompts(spec: str, tokenizer: Any, encoder: Any, what: str = "--data") -> list[dict[str, Any]]:
    """Every row of `spec` checked and tokenized; a missing or empty `prompt`, or a wrong shape, is one error naming the row."""
    from llmkit.data.files import find_sources, iter_records

    _, sources = find_sources(spec, task="causal-lm", what=what)
    rows: list[dict[str, Any]] = []
    for source in sources:
        if source.kind == "text":
            raise UsageError(f"{what} {spec}: --objective grpo reads rows with a 'prompt' column (JSONL, CSV, parquet), not plain text")
        for where, record in iter_records(source):
            if not isinstance(record, dict) or "prompt" not in record:
                cols = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise UsageError(f"{where}: no 'prompt' column (found: {cols}); --objective grpo needs a 'prompt' per row, as "
                                 "text or as a list of messages")
            prompt = record["prompt"]
            if isinstance(prompt, str):
                if not prompt:
                    raise UsageError(f"{where}: the 'prompt' is empty")
                text = prompt
            elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
                if encoder is None:
                    raise UsageError(f"{where}: the prompt is a list of messages but the model has no chat template; pass --chat-template")
                text = encoder.render([{"role": m["role"], "content": m["content"]} for m in prompt], add_generation_prompt=True)
            else:
                raise UsageError(f"{where}: 'prompt' must be text or a list of {{'role', 'content'}} messages")
            rows.append({"prompt": prompt, "text": text, "where": where, "columns": {k: v for k, v in record.items() if k != "prompt"}})
    if not rows:
        raise UsageError(f"{what} {spec} holds no rows")
    # chat templates write their own BOS; plain text prompts get the tokenizer's usual special tokens
    chat = [isinstance(r["prompt"], list) for r in rows]
    plain = tokenizer([r["text"] for r, c in zip(rows, chat, strict=True) if not c])["input_ids"] if not all(chat) else []
    templ = tokenizer([r["text"] for r, c in zip(rows, chat, strict=True) if c], add_special_tokens=False)["input_ids"] if any(chat) else []
    it_plain, it_templ = iter(plain), iter(templ)
    for r, c in zip(rows, chat, strict=True):
        r["ids"] = list(next(it_templ) if c else next(it_plain))
        del r["text"]
    return rows
