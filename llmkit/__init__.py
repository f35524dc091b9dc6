"""llmkit: generate, fine-tune, distill, quantize and evaluate Hugging Face language models from one CLI.

Everything a command does can be called from Python; the names users need are re-exported here and by each
package (`llmkit.models`, `llmkit.data`, `llmkit.training`, `llmkit.export`, `llmkit.inference`, `llmkit.serving`):

    >>> import llmkit
    >>> opts = llmkit.SamplingOptions(max_new_tokens=32, temperature=0)   # temperature 0 = greedy
    >>> backend = llmkit.open_backend(llmkit.resolve("smollm2-135m"), ["Once upon a time"], opts)
    >>> from llmkit.finetune import finetune                            # each capability is its own module
    >>> out = finetune(llmkit.load_recipe("recipes/minilm-l6-sentiment-lora.yaml", ["train.max_steps=50"]))

Importing llmkit is cheap: a re-exported name loads its module (and torch, transformers) on first use, so
`llmkit --help` stays instant.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

__version__ = "0.2.0"


def lazy_exports(package: str, table: dict[str, list[str]]) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """`__getattr__`, `__dir__` and `__all__` for a package whose public names load on first use (PEP 562).

    `table` maps a module (relative to `package`, or absolute when it starts with "llmkit.") to the names it
    exports. Eager re-exports would make every `import llmkit.x.y` load the whole package (its __init__ runs first).
    """
    where = {name: module if module.startswith("llmkit.") else f"{package}.{module}"
             for module, names in table.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(where) | set(vars(sys.modules[package])))

    return __getattr__, __dir__, sorted(where)


__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "llmkit.config": ["DistillConfig", "FinetuneConfig", "load_recipe"],
    "llmkit.errors": ["LlmkitError", "UsageError"],
    "llmkit.models.refs": ["ModelRef", "resolve"],
    "llmkit.models.load": ["load_causal_lm", "load_seq_cls", "load_tokenizer"],
    "llmkit.inference.backends": ["open_backend"],
    "llmkit.inference.sampling": ["Generation", "SamplingOptions"],
    "llmkit.evaluate": ["evaluate_data"],
    "llmkit.serving.app": ["create_app"],
    "llmkit.serving.engine": ["Engine"],
})
__all__ = ["__version__", *__all__]
