"""Rollouts for learning from rewards (`--objective grpo`): G sampled completions per prompt from the current policy.

Online RL spends most of its time here, so the backend is a choice (`--rollout-backend auto | llama.cpp |
transformers`): llama.cpp decodes a group in one batch on CPU (`llmkit.inference.llama_rollouts`), transformers
`generate` is the path on CUDA and for families llama.cpp cannot run. Both take and return token ids, so the
training side scores exactly the tokens that were sampled (no re-tokenisation).

The training loop calls `sync(model)` after every optimizer step, so the next `generate` samples from the weights
being trained, and passes a seed derived from the step, so a resumed run samples the same completions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

ROLLOUT_BACKENDS = ("auto", "llama.cpp", "transformers")


@dataclass(frozen=True)
class RolloutRequest:
    prompts: list[list[int]]  # prompt token ids, chat template already applied
    num_generations: int  # G completions per prompt
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int  # same request + same seed + same weights -> same completions


class Rollouts(Protocol):
    name: str  # "llama.cpp" or "transformers": what the metrics and the progress line say ran

    def sync(self, model: Any) -> None:
        """Make the next `generate` sample from `model`'s current weights (a peft model or a plain one)."""

    def generate(self, request: RolloutRequest) -> list[list[int]]:
        """len(prompts) * G completions, prompt-major (prompt 0's G first); completion ids only, ending with
        the end-of-sequence id when the model stopped, cut at max_new_tokens otherwise."""

    def close(self) -> None:
        """Free the backend's memory (llama.cpp contexts, temporary adapter files)."""
