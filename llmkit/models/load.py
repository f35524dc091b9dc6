"""Load a resolved model: device and dtype, tokenizer, causal LM or classifier, adapters applied.

    >>> from llmkit.models.load import load_causal_lm, load_tokenizer
    >>> from llmkit.models.refs import resolve
    >>> ref = resolve("smollm2-135m")
    >>> model, tokenizer = load_causal_lm(ref), load_tokenizer(ref)

Every load goes through `from_pretrained_checked`: safetensors only (the resolver already refused pickle unless
allowed), a GGUF read from its kept de-quantized folder (`models.gguf_base`), an int8 (torchao) folder in its
own dtype through `models.int8`, a LoRA folder on the base its llmkit.json names.
"""


from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmkit.errors import UsageError
from llmkit.models.gguf_base import is_kept, kept_base, kept_folder, load_gguf, one_parse
from llmkit.models.refs import DEFAULT_CAUSAL_LM, ModelRef, adapter_task, cache_root
from llmkit.runfolder import RECORD, read_json

if TYPE_CHECKING:  # heavy imports stay out of `llmkit --help`
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def pick_device(device: str | None = None) -> str:
    """`cuda` when there is a GPU, else `mps` on Apple silicon, else `cpu`; an explicit choice wins."""
    import torch

    if device:
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto`: bf16 on GPUs that have it (fp16 otherwise), fp32 on CPU, where it is the accurate choice."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise UsageError(f"--dtype {dtype} is not one of auto, float32, bfloat16, float16") from None


def source_kwargs(ref: ModelRef) -> tuple[str, dict[str, Any]]:
    """Where from_pretrained should look, and how (GGUF file, safetensors only, remote code)."""
    if ref.is_gguf:
        return str(ref.path.parent), {"gguf_file": ref.path.name}
    return str(ref.path), {"use_safetensors": not ref.allow_pickle, "trust_remote_code": ref.trust_remote_code}


def load_tokenizer(ref: ModelRef, padding_side: str = "right") -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token: GPT-2 and Llama ship none, and batching needs one.

    Pad is set to EOS only for batching; attention masks keep the padding out of the computation.
    An adapter folder's own tokenizer (saved beside it by `llmkit finetune`) wins over the base model's.
    """
    from transformers import AutoTokenizer

    where, kwargs = source_kwargs(ref)
    kwargs.pop("use_safetensors", None)
    if ref.is_gguf and is_kept(kept_folder(cache_root(), ref.path)):  # the GGUF's own tokenizer, saved, read in no time
        where, kwargs = str(kept_folder(cache_root(), ref.path)), {}
    if ref.adapter is not None and (ref.adapter / "tokenizer_config.json").exists():
        where, kwargs = str(ref.adapter), {}
    try:
        with one_parse():  # a GGUF file's tokenizer: the de-quantizing load that may follow reuses this parse
            tok = AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load the tokenizer of {ref.name}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UsageError(f"the tokenizer of {ref.name} has neither a pad nor an EOS token; add one to it")
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def architectures(ref: ModelRef) -> list[str]:
    return [] if ref.is_gguf else list(read_json(ref.path / "config.json").get("architectures") or [])


def load_causal_lm(ref: ModelRef, *, device: str | None = None, dtype: str = "auto",
                   progress: bool = True) -> PreTrainedModel:
    """A causal LM in eval mode on `device`; a GGUF file is de-quantized once and kept (llmkit.models.gguf_base)."""
    from transformers import AutoModelForCausalLM

    if adapter_task(ref) == "seq-cls":
        raise UsageError(f"{ref.name} is a classification adapter, not a causal language model")
    # transformers would happily put a random LM head on an encoder (BertModel -> BertLMHeadModel).
    archs = architectures(ref)
    if archs and not any(a.endswith(_CAUSAL_SUFFIXES) for a in archs):
        raise UsageError(f"{ref.name} is not a causal language model (it is {archs[0]}); "
                         f"generation needs one, such as {DEFAULT_CAUSAL_LM}")
    device = pick_device(device)
    if _int8_folder(ref):
        from llmkit.models.int8 import load_int8  # not llmkit.quantize: loading needs none of the quantizers

        if device == "cpu":  # torchao's weight-only path decodes slower than fp32 on CPU: torch's int8 kernel instead
            from llmkit.models.int8_cpu import load_for_cpu

            return load_for_cpu(ref.path, AutoModelForCausalLM)
        return load_int8(ref.path, AutoModelForCausalLM).to(device)
    model = from_pretrained_checked(AutoModelForCausalLM, ref, progress, dtype=pick_dtype(dtype, device))
    if ref.adapter is not None:
        model = apply_adapter(model, ref, merge=True)
    return model.to(device).eval()


def load_seq_cls(ref: ModelRef, *, device: str | None = None, progress: bool = True, **config: Any) -> PreTrainedModel:
    """A sequence classifier (fp32); `config` (num_labels, id2label, pad_token_id, ...) sets up a new head."""
    from transformers import AutoModelForSequenceClassification

    if adapter_task(ref) == "causal-lm":
        raise UsageError(f"{ref.name} is a causal-LM adapter, not a classifier; use --task causal-lm")
    if ref.adapter is not None and not config:
        # the base model's config knows nothing of the labels the adapter's head was trained on
        names = read_json(ref.adapter / RECORD).get("labels")
        if names:
            config = {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}
    extra: dict[str, Any] = {}
    if config:
        extra = {**config, "ignore_mismatched_sizes": True}  # a new head replaces one of another size
    import torch

    if _int8_folder(ref) and not config:
        from llmkit.models.int8 import load_int8  # not llmkit.quantize: loading needs none of the quantizers
        from llmkit.models.int8_cpu import load_for_cpu

        device = pick_device(device)
        if device == "cpu":  # llmkit.models.int8_cpu: dynamic layers on fbgemm (torchao's CPU path is slower than fp32)
            return load_for_cpu(ref.path, AutoModelForSequenceClassification)
        return load_int8(ref.path, AutoModelForSequenceClassification).to(device)
    model = from_pretrained_checked(AutoModelForSequenceClassification, ref, progress, dtype=torch.float32, **extra)
    if ref.adapter is not None:
        model = apply_adapter(model, ref, merge=True)
    return model.to(pick_device(device))


def _int8_folder(ref: ModelRef) -> bool:
    """An `llmkit quantize --method int8` folder (torchao): transformers loads it, in the folder's own dtype and after
    a quiet torchao import (`models.int8.load_int8`); an old `llmkit-int8` folder is refused in one line."""
    if ref.is_gguf or ref.adapter is not None:
        return False
    from llmkit.models.int8 import check_int8_folder

    return check_int8_folder(ref.path)


def from_pretrained_checked(auto_cls: Any, ref: ModelRef, progress: bool, **extra: Any) -> PreTrainedModel:
    """`auto_cls.from_pretrained` on `ref`, its errors in one line. A GGUF file is de-quantized once into a kept fp32
    folder (llmkit.models.gguf_base.kept_base) and read back from there as plain safetensors, in `extra`'s dtype."""
    from transformers.utils import logging as hf_logging

    from llmkit.progress import tty_bars

    where, kwargs = source_kwargs(ref)
    hf_logging.set_verbosity_error()  # GGUF loading logs a line per tensor; new heads log a load report
    bars = tty_bars(progress)
    if not bars:
        hf_logging.disable_progress_bar()
    from llmkit.models.meta import building, empty_model

    try:
        if building():  # --fsdp, not rank 0: the model without its weights, which come from rank 0 (llmkit.models.meta)
            if ref.is_gguf and is_kept(kept_folder(cache_root(), ref.path)):
                where, kwargs = str(kept_folder(cache_root(), ref.path)), {}
            return empty_model(auto_cls, where, kwargs, extra)
        if ref.is_gguf:
            kept = kept_base(ref.path, cache_root(), progress, bars)
            if kept is None:
                return load_gguf(auto_cls, ref.path, bars, **extra)
            where, kwargs = str(kept), {"use_safetensors": True}
        return auto_cls.from_pretrained(where, **kwargs, **extra)
    except ValueError as e:
        first = str(e).splitlines()[0]
        if "Unrecognized configuration class" in first or "not supported" in first.lower():
            what = "causal language model" if "CausalLM" in auto_cls.__name__ else "sequence classifier"
            raise UsageError(f"{ref.name} cannot be loaded as a {what} ({first[:160]})") from None
        raise UsageError(f"cannot load {ref.name}: {first}") from None
    except OSError as e:
        raise UsageError(f"cannot load {ref.name}: {str(e).splitlines()[0]}") from None


def apply_adapter(model: PreTrainedModel, ref: ModelRef, merge: bool) -> PreTrainedModel:
    from peft import PeftModel

    from llmkit.models.meta import building

    if merge and building():  # an empty model (--fsdp, not rank 0): merged, it has the same layers; rank 0 sends the weights
        return model

    try:
        peft_model = PeftModel.from_pretrained(model, str(ref.adapter))
    except (ValueError, RuntimeError, KeyError) as e:
        raise UsageError(f"cannot apply the adapter {ref.name} to its base model: {str(e).splitlines()[0][:200]}") from None
    return peft_model.merge_and_unload() if merge else peft_model


def context_length(config: Any) -> int | None:
    """The longest sequence a model was built for (GPT-2: n_positions=1024; Llama: max_position_embeddings)."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
