"""The HTTP side of `llmkit serve`: OpenAI's request and response shapes (`protocol`)."""
