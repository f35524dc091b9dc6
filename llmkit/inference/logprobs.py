"""Token log-probabilities from a model's logits, the same way on every backend (OpenAI's `logprobs`, `echo`).

    >>> from llmkit.inference.logprobs import entries
    >>> entries(logits, targets=[42, 7], k=2, token_bytes=lambda i: vocab[i])   # one TokenLogprob per row

A backend hands over raw logits (numpy, one row per position) and the token that followed each row; what the
log-probability of a token is (log-softmax in float64, before temperature or any constraint reshapes the draw),
which alternatives are "top" and how a token's text is written are decided here, once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmkit.inference.sampling import TokenLogprob


def log_softmax(rows: Any) -> Any:
    """Rows of logits -> rows of log-probabilities, in float64 (float32 sums over a 50k vocabulary lose ~1e-4)."""
    import numpy as np

    x = np.asarray(rows, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def token_text(raw: bytes) -> str:
    # a token can hold half a UTF-8 character; OpenAI writes those with escapes and gives the bytes separately
    return raw.decode("utf-8", errors="replace")


def entries(logits: Any, targets: list[int], k: int, token_bytes: Callable[[int], bytes]) -> list[TokenLogprob]:
    """One TokenLogprob per row of `logits`: the log-probability of `targets[i]` under row i, and the `k` most
    likely tokens of that row with theirs."""
    import numpy as np

    if not len(targets):
        return []
    lp = log_softmax(logits)
    out = []
    for row, target in zip(lp, targets, strict=True):
        top: list[tuple[str, float]] = []
        if k > 0:
            best = np.argpartition(-row, min(k, len(row) - 1))[:k]
            best = best[np.argsort(-row[best], kind="stable")]
            top = [(token_text(token_bytes(int(i))), float(row[i])) for i in best]
        raw = token_bytes(int(target))
        out.append(TokenLogprob(token_text(raw), raw, float(row[target]), top))
    return out


def first(token: int, token_bytes: Callable[[int], bytes]) -> TokenLogprob:
    """The first prompt token: nothing before it predicts it (OpenAI reports None)."""
    raw = token_bytes(token)
    return TokenLogprob(token_text(raw), raw, None, [])


def trim(items: list[TokenLogprob], text: str) -> list[TokenLogprob]:
    """The tokens that start inside `text`: a stop string cuts the text mid-token, and its tokens are not shown."""
    kept, seen = [], 0
    for item in items:
        if seen >= len(text) and items:
            break
        kept.append(item)
        seen += len(item.token)
    return kept
