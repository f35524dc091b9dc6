"""What serves requests in `llmkit serve`, below the HTTP routes (`llmkit.serve`).

- `engine`: the model, the worker thread that owns it, the request queue and slots (`Engine`)
- `job`: one request's work and the events it sends back (`Job`)
- `llama_batch`: continuous batching on llama.cpp, many sequences in one context (`BatchedLlama`)
- `protocol`: OpenAI's request and response shapes (pydantic bodies, `APIError`, `Output`)
"""
