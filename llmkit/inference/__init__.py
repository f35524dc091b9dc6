"""Inference: sampling options and results, the backends (transformers, llama.cpp), the terminal chat session.

- `sampling`: `SamplingOptions`, `Generation`, stop strings, the context check
- `backends`: the `Backend` protocol, choosing one, opening a model on it
- `transformers`, `llama_cpp`: the two backends
- `terminal_chat`: `llmkit chat`: history, the context budget, /commands, Ctrl-C
- `llama_batch`: many sequences in one llama.cpp context, one decode call per step (`BatchedLlama`; serve, rollouts)
- `rollouts`: the interface GRPO's rollout backends implement (G completions per prompt, synced to the policy), the
  transformers one, and `open_rollouts` (--rollout-backend)
- `llama_rollouts`: GRPO's rollouts on llama.cpp: the base GGUF + the policy's LoRA as an adapter, re-synced every step
"""

from llmkit import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "sampling": ["Generation", "SamplingOptions"],
    "backends": ["Backend", "choose_backend", "llama_cpp_available", "open_backend"],
    "llama_cpp": ["LlamaCppBackend"],
    "transformers": ["TransformersBackend"],
    "terminal_chat": ["ChatSession"],
    "rollouts": ["RolloutRequest", "TransformersRollouts", "open_rollouts"],
})
