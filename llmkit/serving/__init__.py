"""Serving: `llmkit serve`, an OpenAI-compatible HTTP server, its engine and continuous batching (on `llmkit.inference.llama_batch`).

- `app`: the HTTP routes (FastAPI) and the chat page at /
- `engine`: the model, the worker thread that owns it, the request queue and slots (`Engine`)
- `job`: one request's work and the events it sends back (`Job`)
- `protocol`: OpenAI's request and response shapes (pydantic bodies, `APIError`, `Output`)
"""

from llmkit import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "app": ["create_app"],
    "engine": ["Engine"],
    "protocol": ["ChatRequest", "CompletionRequest"],
})
