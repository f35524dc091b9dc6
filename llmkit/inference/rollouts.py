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


class TransformersRollouts:
    """Rollouts with transformers `generate` on the policy itself: the group in one left-padded batch, sampled under
    the request's seed. `sync` has nothing to do (it is the same module); dropout is off while sampling (eval mode)
    and the module's mode is restored after."""

    name = "transformers"

    def __init__(self, model: Any, tokenizer: Any, *, stop_ids: list[int] | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        gen = getattr(model, "generation_config", None)
        eos = gen.eos_token_id if gen is not None else None
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        ids |= {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self.stop_ids = sorted(ids | set(stop_ids or []))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]

    def sync(self, model: Any) -> None:
        self.model = model  # the same weights, already current

    def generate(self, request: RolloutRequest) -> list[list[int]]:
        import torch

        model, g = self.model, request.num_generations
        device = next(model.parameters()).device
        width = max(len(p) for p in request.prompts)
        ids = torch.full((len(request.prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(request.prompts):  # left padding: every prompt ends where generation starts
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        ids, mask = ids.repeat_interleave(g, 0).to(device), mask.repeat_interleave(g, 0).to(device)
        was_training = model.training
        model.eval()
        devices = [device] if device.type == "cuda" else []
        try:
            # generate samples from the global RNG: fork it, so the seed fixes these completions and training's
            # dropout / data RNG continues as if no rollout had been drawn (exact --resume)
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                torch.manual_seed(request.seed)
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=request.temperature,
                                     top_p=request.top_p, top_k=0, max_new_tokens=request.max_new_tokens, eos_token_id=self.stop_ids,
                                     pad_token_id=self.pad_id, use_cache=True)
        finally:
            if was_training:
                model.train()
        completions = []
        for row in out[:, width:].tolist():
            cut = next((k + 1 for k, t in enumerate(row) if t in self.stop_ids), len(row))
            completions.append(row[:cut])
        return completions

    def close(self) -> None:
        self.model = None


def open_rollouts(backend: str, model: Any, tokenizer: Any, *, model_ref: str, max_context: int,
                  stop_ids: list[int] | None = None) -> Rollouts:
    """The rollout backend `--rollout-backend` names. `auto`: llama.cpp on CPU where llama-cpp-python is installed and
    can run this model's family (`llama_rollouts.can_run`), transformers otherwise (CUDA, other families)."""
    from llmkit.errors import UsageError

    if backend not in ROLLOUT_BACKENDS:
        raise UsageError(f"--rollout-backend {backend!r} is not one of {', '.join(ROLLOUT_BACKENDS)}")
    if backend == "auto":
        backend = "llama.cpp" if _llama_cpp_can_run(model) else "transformers"
    if backend == "transformers":
        return TransformersRollouts(model, tokenizer, stop_ids=stop_ids)
    try:
        import llmkit.inference.llama_rollouts as llama_rollouts
    except ImportError as e:
        raise UsageError(f"--rollout-backend llama.cpp is not available here ({e}); use --rollout-backend transformers") from None
    return llama_rollouts.LlamaCppRollouts(model, tokenizer, model_ref=model_ref, max_context=max_context)


def _llama_cpp_can_run(model: Any) -> bool:
    import importlib.util

    if next(model.parameters()).device.type != "cpu" or importlib.util.find_spec("llama_cpp") is None:
        return False
    try:
        import llmkit.inference.llama_rollouts as llama_rollouts
    except ImportError:
        return False
    can_run = getattr(llama_rollouts, "can_run", None)
    return bool(can_run(model)) if can_run is not None else False
