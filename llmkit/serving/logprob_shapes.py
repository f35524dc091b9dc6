"""OpenAI's two `logprobs` shapes, from llmkit's TokenLogprob lists (llmkit.inference.logprobs).

    >>> completion_logprobs(gen.prompt_logprobs, gen.logprobs, start=0)   # /v1/completions: tokens, token_logprobs, ...
    >>> chat_logprobs(gen.logprobs)                                      # /v1/chat/completions: {"content": [...]}

The completions shape is what lm-evaluation-harness's `local-completions` reads to score multiple choice:
with `echo`, one entry per prompt token (the first's log-probability is None: nothing predicts it), then one per
generated token.
"""

from __future__ import annotations

from typing import Any

from llmkit.inference.sampling import TokenLogprob


def completion_logprobs(prompt: list[TokenLogprob] | None, generated: list[TokenLogprob] | None, start: int) -> dict[str, Any]:
    """{"tokens", "token_logprobs", "top_logprobs", "text_offset"}; offsets count characters of the returned text
    from `start` (0 with echo, where the text begins with the prompt; else the prompt's length, as OpenAI does)."""
    items = [*(prompt or []), *(generated or [])]
    offsets, at = [], start
    for item in items:
        offsets.append(at)
        at += len(item.token)
    return {"tokens": [t.token for t in items], "token_logprobs": [t.logprob for t in items],
            "top_logprobs": [None if t.logprob is None else dict(t.top) for t in items], "text_offset": offsets}


def chat_logprobs(generated: list[TokenLogprob] | None) -> dict[str, Any]:
    def entry(token: str, logprob: float, raw: bytes | None = None) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(raw if raw is not None else token.encode("utf-8"))}

    return {"content": [entry(t.token, t.logprob or 0.0, t.token_bytes) | {"top_logprobs": [entry(s, lp) for s, lp in t.top]}
                        for t in generated or []], "refusal": None}
