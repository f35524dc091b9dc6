"""llmkit: generate, fine-tune, distill, quantize and evaluate Hugging Face language models from one CLI.

Everything a command does can be called from Python too, e.g. `llmkit.models.resolve` and
`llmkit.backends.open_backend`. Importing llmkit is cheap: torch and transformers load only when used.
"""

__version__ = "0.1.0"
