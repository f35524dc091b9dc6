"""The tokenizer inside a GGUF file: written from the HF tokenizer (or copied from a source GGUF), then checked.

    >>> from llmkit.export.tokenizer import tokenizer_mismatch
    >>> tokenizer_mismatch(Path("runs/model.Q8_0.gguf"), load_tokenizer(ref))    # None: llama.cpp splits text the same way

llama.cpp re-implements each tokenizer family from a name in the file (`tokenizer.ggml.pre`, the regex that splits
text before BPE); `llmkit.export.gguf` writes these fields for every export, and its cache runs `tokenizer_mismatch`
on each new export, so a model whose text llama.cpp would split differently never runs there.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

from llmkit.errors import UsageError
from llmkit.machine import native_stderr_silenced
from llmkit.models.gguf_base import gguf_reader

# Tokenization is checked on this text after every cache export: digits, punctuation runs, contractions,
# repeated spaces, newlines, tabs and non-ASCII are where pre-tokenizer regexes differ.
PROBE_TEXT = ("Hello world! It's 2024: 3.14159 + 42 = 45.14159...  Don't   stop;\n\n\tindent (x) [y] {z} "
              "naïve café, Zürich — “quotes” 日本語 😀 ok?!")


def add_tokenizer(writer: Any, tokenizer: Any, arch: str, source_gguf: Path | None, vocab_size: int | None = None) -> None:
    """The tokenizer goes into the file: copied from the source GGUF when there is one, else from tokenizer.json.

    `vocab_size`: the model's embedding rows; the token list is padded to it (llama.cpp wants one token per row).

    The chat template is always the HF tokenizer's when it has one: a fine-tuned adapter folder may carry a
    template other than its base GGUF's, and it is the one the model was trained with.
    """
    import gguf

    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: llama.cpp reads the default one
        template = template.get("default")
    if source_gguf is not None:
        reader = gguf_reader(source_gguf)
        fields = {f.name: f for f in reader.fields.values() if f.name.startswith("tokenizer.")}
        tokens = fields.get("tokenizer.ggml.tokens")
        if tokens is not None and len(tokens.data) >= len(tokenizer):  # no tokens were added since: same vocabulary
            for name, field in fields.items():
                if not (template and name == "tokenizer.chat_template"):
                    _copy_field(writer, field)
            if template:
                writer.add_chat_template(template)
            return
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise UsageError("GGUF export supports byte-level BPE tokenizers (GPT-2, SmolLM2, Llama-3 style); "
                         f"this one is {model.get('type')}")
    vocab = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values()) + 1, vocab_size or 0)
    tokens_list = [f"[PAD{i}]" for i in range(size)]
    for tok, i in vocab.items():
        tokens_list[i] = tok
    special = set(tokenizer.all_special_ids) | {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(size)]
    for i, tok in enumerate(tokens_list):
        if tok.startswith("[PAD") and tok not in vocab:
            types[i] = gguf.TokenType.UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(data.get("pre_tokenizer"), arch))
    writer.add_token_list(tokens_list)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    # llama.cpp adds BOS / EOS to a plain prompt exactly when the HF tokenizer does, so both backends see the same ids
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    writer.add_add_bos_token(len(ids) > len(plain) and ids[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(len(ids) > len(plain) and ids[-1] == tokenizer.eos_token_id)
    if template:
        writer.add_chat_template(template)


QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def _pre_tokenizer(pre: dict[str, Any] | None, arch: str) -> str:
    """llama.cpp's name for the regex that splits text before BPE, read from tokenizer.json's pre_tokenizer.

    GPT-2: ByteLevel with its own regex; SmolLM2: single digits first, then GPT-2's regex. Anything else gets
    llama.cpp's default; `tokenizer_mismatch` catches the cases where that splits text differently.
    """
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre or {}]
    kinds = [(s.get("type"), s.get("use_regex", True), s.get("individual_digits")) for s in steps or []]
    if kinds == [("ByteLevel", True, None)]:
        return "gpt-2"
    if kinds == [("Digits", True, True), ("ByteLevel", True, None)]:
        return "smollm"
    if len(kinds) == 2 and kinds[0][0] == "Split" and kinds[1][:2] == ("ByteLevel", False):
        regex = (steps[0].get("pattern") or {}).get("Regex", "")
        if "\\p{N}{1,3}" in regex:
            return "llama-bpe"  # Llama-3's regex (numbers in groups of up to three)
        if regex == QWEN2_REGEX:
            return "qwen2"  # single digits; what transformers' Qwen2Tokenizer uses whatever tokenizer.json says
    return "gpt-2" if arch == "gpt2" else "default"


def _copy_field(writer: Any, field: Any) -> None:
    import gguf

    kind = field.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        sub = field.types[1]
        if sub == gguf.GGUFValueType.STRING:
            values = [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        else:
            values = [field.parts[i].tolist()[0] for i in field.data]
        writer.add_array(field.name, values)
    elif kind == gguf.GGUFValueType.STRING:
        writer.add_string(field.name, bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace"))
    else:
        writer.add_key_value(field.name, field.parts[field.data[0]].tolist()[0], kind)


def tokenizer_mismatch(path: Path, tokenizer: Any, texts: tuple[str, ...] = (PROBE_TEXT,)) -> str | None:
    """None when llama.cpp tokenizes `texts` with the file's tokenizer exactly as `tokenizer` does; else the first difference."""
    import llama_cpp

    # llama.cpp warns about the (unused) context of a vocabulary-only load, from C and through Python's logger
    with native_stderr_silenced(), contextlib.redirect_stderr(io.StringIO()):
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in texts:
            ours = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            theirs = tokenizer(text, add_special_tokens=False)["input_ids"]
            if ours != theirs:
                at = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))
                return f"llama.cpp splits {text!r} differently from the model's tokenizer (token {at}: {ours[at:at + 3]} vs {theirs[at:at + 3]})"
    finally:
        llm.close()
    return None
