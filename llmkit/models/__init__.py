"""Models: resolving a reference safely, loading it, LoRA/QLoRA bases, int8, GGUF bases, chat templates, the catalog.

- `refs`: aliases, folders, .gguf files and Hub ids to a `ModelRef`; pickle and remote-code safety; the cache root
- `load`: device and dtype, tokenizers, causal LMs and classifiers, adapters applied
- `templates`: chat templates: one renderer for training, generation and serving
- `lora`, `qlora`: LoRA targets and the base an adapter trains on; 4-bit (NF4) bases
- `gguf_base`: a .gguf de-quantized once and kept as safetensors
- `int8`: int8 (torchao) folders: kernels per CPU, loading them quietly
- `int8_cpu`: weight-only int8 layers run by torch's int8 kernel on CPU (what llmkit decodes int8 folders with)
- `meta`: building a model without memory (meta device) for sharded loads
- `catalog`: `llmkit models`: the bundled aliases and the run folders here
"""

from llmkit import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "refs": ["ALIASES", "DEFAULT_CAUSAL_LM", "ModelRef", "alias_path", "cache_root", "resolve"],
    "load": ["architectures", "context_length", "from_pretrained_checked", "load_causal_lm", "load_seq_cls",
             "load_tokenizer", "pick_device"],
    "templates": ["CHATML", "Prompt", "chat_messages", "render_chat", "resolve_template"],
    "lora": ["add_lora", "base_folder", "keep_base"],
    "qlora": ["base_weight_bytes", "load_4bit"],
    "gguf_base": ["kept_folder", "load_gguf"],
    "int8": ["load_int8"],
    "int8_cpu": ["load_for_cpu", "pack_for_cpu"],
    "catalog": ["list_models"],
})
