"""What generating text means in llmkit, whatever the backend: the options, the results, stop strings, the context check.

    >>> from llmkit.inference.backends import open_backend
    >>> from llmkit.inference.sampling import SamplingOptions
    >>> from llmkit.models import resolve
    >>> opts = SamplingOptions(max_new_tokens=32, temperature=0)          # temperature 0 = greedy
    >>> backend = open_backend(resolve("smollm2-135m"), ["Once upon a time"], opts)
    >>> [g.text for g in backend.generate(["Once upon a time"], opts)]

The backends themselves (transformers, llama.cpp), the interface they share and the choice between them are in
`llmkit.inference.backends`; everything here is plain data and text handling that both feed through, so the two give the
same kind of output for the same options.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmkit.errors import UsageError
from llmkit.models.templates import Prompt

# Called with (index of the output, new text) as text becomes safe to show.
OnText = Callable[[int, str], None]


@dataclass
class SamplingOptions:
    """Decoding settings shared by both backends; the CLI flags of `llmkit generate` map 1:1 onto these."""

    max_new_tokens: int = 128
    """Tokens to generate after the prompt (prompt + this must fit the model's context)."""
    temperature: float = 0.8
    """0 means greedy decoding; higher is more random."""
    top_k: int = 50
    """Sample only from the k most likely tokens (0 = no limit)."""
    top_p: float = 0.95
    """Sample only from the smallest set of tokens whose probability adds up to p (1 = no limit)."""
    repetition_penalty: float = 1.0
    """>1 makes repeating earlier tokens less likely (1 = off)."""
    num_return_sequences: int = 1
    """Continuations per prompt."""
    stop: tuple[str, ...] = ()
    """Strings that end a continuation; the stop string itself is not part of the text."""
    seed: int | None = None
    """Same seed, same model, same options: same text."""
    chat: bool = False
    """Prompts are chat: a string is one user message, a list of {"role", "content"} dicts a whole conversation;
    either is rendered with the model's own chat template (the one it was trained with)."""
    system: str | None = None
    """With `chat`: a system message put before a string prompt."""
    logprobs: int | None = None
    """Report each generated token's log-probability and this many most likely alternatives (0: the chosen
    token's only; None: off). Log-probabilities are the model's own (log-softmax of its logits), before
    temperature, top-k/top-p or a constraint reshape the draw, as OpenAI and vLLM report them."""
    prompt_logprobs: bool = False
    """Also score the prompt: each prompt token's log-probability given the ones before it (OpenAI's `echo`)."""
    constraint: Constraint | None = None
    """Constrained decoding: the text generated must match this grammar or JSON schema (llmkit.inference.constraints)."""

    def validate(self) -> None:
        """Collect every problem, then raise one error that names the flags to change."""
        problems = []
        if self.max_new_tokens <= 0:
            problems.append(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            problems.append(f"--temperature must be >= 0, 0 meaning greedy (got {self.temperature})")
        if self.top_k < 0:
            problems.append(f"--top-k must be >= 0, 0 meaning no limit (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1] (got {self.top_p})")
        if self.repetition_penalty <= 0:
            problems.append(f"--repetition-penalty must be > 0, 1 meaning off (got {self.repetition_penalty})")
        if self.num_return_sequences < 1:
            problems.append(f"--num-return-sequences must be at least 1 (got {self.num_return_sequences})")
        if any(not s for s in self.stop):
            problems.append("--stop must not be an empty string")
        if problems:
            raise UsageError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Constraint:
    """What generated text must match: `kind` "json_schema" (text: the schema as JSON), "json_object" (any JSON
    object; text unused) or "gbnf" (text: a llama.cpp GBNF grammar, root rule `root`)."""

    kind: str
    text: str = ""


@dataclass
class TokenLogprob:
    """One token's log-probability and the most likely alternatives at its position (OpenAI's logprobs entry)."""

    token: str
    token_bytes: bytes
    logprob: float | None  # None: the first prompt token, which nothing predicts
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Generation:
    """One generated continuation; `to_json()` is the `--json` line."""

    prompt: Prompt
    text: str
    new_tokens: int
    seconds: float
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    index: int = 0  # which of --num-return-sequences
    prompt_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None  # with SamplingOptions.logprobs: one per generated token shown in `text`
    prompt_logprobs: list[TokenLogprob] | None = None  # with SamplingOptions.prompt_logprobs: one per prompt token

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "text": self.text, "new_tokens": self.new_tokens,
                "seconds": round(self.seconds, 4), "tokens_per_s": round(self.tokens_per_s, 2),
                "index": self.index, "prompt_tokens": self.prompt_tokens, "finish_reason": self.finish_reason}


class StopScanner:
    """Cuts streamed text at the first stop string, and holds back text that may be the start of one.

    Both backends feed decoded text through this, so streamed output and the final text always agree.
    """

    def __init__(self, stops: tuple[str, ...] = ()) -> None:
        self.stops = stops
        self.text = ""
        self.stopped = False
        self._shown = 0

    def feed(self, chunk: str) -> str:
        """Add new text; return the part that is now safe to show."""
        if self.stopped:
            return ""
        start = max(0, self._shown - max((len(s) for s in self.stops), default=0))
        self.text += chunk
        cuts = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if cuts:
            self.text, self.stopped = self.text[: min(cuts)], True
            return self._take(len(self.text))
        held = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._take(len(self.text) - held)

    def flush(self) -> str:
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        out = self.text[self._shown:end]
        self._shown = max(self._shown, end)
        return out


def check_context(prompt_tokens: list[int], opts: SamplingOptions, limit: int | None) -> None:
    """Refuse, before any model call, a prompt that cannot fit together with --max-new-tokens."""
    if limit is None:
        return
    for i, n in enumerate(prompt_tokens, 1):
        if n + opts.max_new_tokens > limit:
            raise UsageError(
                f"prompt {i} is {n} tokens; with --max-new-tokens {opts.max_new_tokens} that exceeds the "
                f"model's context of {limit} tokens: shorten the prompt or lower --max-new-tokens"
            )
