"""Quantized models: llmkit int8 (CPU-fast, per-channel), bitsandbytes LLM.int8(), and GGUF export (f16 to 4-bit).

    >>> from llmkit.quantize import quantize
    >>> report = quantize("smollm2-135m", "runs/smollm2-int8", method="int8")
    >>> report["after"]["perplexity"], report["ratios"]["tokens_per_s"]

`int8` is weight-only int8 with one scale per output channel (symmetric, absmax / 127), for every linear layer,
GPT-2's `Conv1D` layers (transposed into linear form: generic int8 code silently skips them, pytorch#33433),
and the token embedding, whose int8 rows also serve as the tied LM head. Activations stay in fp32: per-token
int8 activations cost SmolLM2 +4% perplexity (GUIDE §3). Decoding runs on `torch._weight_int8pack_mm`, the
CPU kernel that reads int8 weights directly, with bf16 activations (its fast path); decoding is memory-bound,
so 4x fewer weight bytes is what makes it faster. Prompts and evaluation batches (32+ tokens) on CPUs without
AMX widen the weights to fp32 instead (`llmkit.int8.DEQUANTIZE_ROWS`). Classifier heads stay fp32 (tiny, and every error there lands on the prediction).
Why not a library: torchao's int8 weight-only config was measured here at +0.57% perplexity but only 1.31x,
with the embedding and tied head left in fp32 (41% of the fp32 size for SmolLM2); optimum-quanto was slower
than fp32. The folder stores int8 tensors and scales in safetensors; `load_int8(folder)` (or any llmkit
command with `--model folder`) rebuilds the model.

`gguf-f16`, `gguf-q8_0`, `gguf-q5_k_m` and `gguf-q4_k_m` write a GGUF file (llama.cpp's format; gpt2 and
llama architectures) with the tokenizer and chat template inside; see `llmkit.export.gguf` for what each type holds.
It loads in llama.cpp / llama-cpp-python and in transformers (`from_pretrained(folder, gguf_file=name)`);
`llmkit generate --model out.gguf` runs it. GGUF quality and speed are measured in llama.cpp itself.

The int8 layers and `load_int8` live in `llmkit.int8` (what loading needs, without the quantizers); they are
re-exported here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmkit.errors import UsageError
from llmkit.export.gguf import LLAMA_CPP_TYPES, k_quant_fallbacks, unsupported
from llmkit.export.gguf import TYPES as GGUF_TYPES
from llmkit.export.gguf import export as export_gguf
from llmkit.models.int8 import (  # noqa: F401  (re-exported: `from llmkit.quantize import load_int8` is documented)
    QUANT_METHOD,
    Int8Embedding,
    Int8Linear,
    TiedInt8Head,
    int8_matmul,
    load_int8,
    quantized_method,
    set_module,
)
from llmkit.runfolder import read_json

GGUF_METHODS = {f"gguf-{t}": t for t in GGUF_TYPES}  # --method -> GGUF type
# gguf-lora: a LoRA run folder as a llama.cpp adapter file, used with its unchanged base (llmkit.export.adapter)
LORA_METHOD = "gguf-lora"
METHODS = ("int8", "bnb-int8", *GGUF_METHODS, LORA_METHOD)
REPORT = "quantize_report.json"
# modules left in fp32: classifier heads (small, and their error goes straight into the prediction)
KEEP_FP32 = ("score", "classifier", "qa_outputs")


# --------------------------------------------------------------------------------------------- int8 modules


def quantize_int8_(model: Any, keep: tuple[str, ...] = ()) -> dict[str, str]:
    """Replace linear, Conv1D and token-embedding layers by int8 ones in place; returns {module name: kind}."""
    import torch
    from transformers.pytorch_utils import Conv1D

    keep = (*KEEP_FP32, *keep)
    emb = model.get_input_embeddings()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = out_emb is not None and getattr(out_emb, "weight", None) is not None and out_emb.weight is emb.weight
    modules: dict[str, str] = {}
    names = {id(m): n for n, m in model.named_modules()}
    int8_emb = None
    for name, module in list(model.named_modules()):
        if any(name == k or name.endswith("." + k) or name.startswith(k + ".") for k in keep):
            continue
        if module is emb and isinstance(module, torch.nn.Embedding):
            int8_emb = Int8Embedding.from_float(module)
            new, kind = int8_emb, "embedding"
        elif isinstance(module, Conv1D):  # GPT-2: y = x W + b with W [in, out]
            new, kind = Int8Linear.from_float(module.weight.t(), module.bias), "conv1d"
        elif isinstance(module, torch.nn.Linear) and not (tied and module is out_emb):
            new, kind = Int8Linear.from_float(module.weight, module.bias), "linear"
        else:
            continue
        set_module(model, name, new)
        modules[name] = kind
    if tied and int8_emb is not None:
        head = names[id(out_emb)]
        set_module(model, head, TiedInt8Head(int8_emb))
        modules[head] = "tied_head"
    return modules



def save_int8(model: Any, modules: dict[str, str], folder: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    # model_type "llmkit-int8": plain transformers then refuses the folder loudly ("does not recognize this
    # architecture") instead of loading int8 codes as float weights, which it would otherwise do without a word.
    path = folder / "config.json"
    cfg = read_json(path)
    cfg["quantization_config"] = {"quant_method": QUANT_METHOD, "base_model_type": cfg["model_type"], "bits": 8,
                                  "scheme": "symmetric per-channel weight-only", "modules": modules,
                                  "load_with": "from llmkit.quantize import load_int8; model = load_int8(folder)"}
    cfg["model_type"] = QUANT_METHOD
    path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------- the command


def _files_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def quantize(model_name: str, out: str | Path, *, method: str, eval_data: str | None = None, max_ppl_increase: float = 2.0,
             force: bool = False, keep: tuple[str, ...] = (), block_size: int = 256, max_blocks: int = 16,
             allow_pickle: bool = False, trust_remote_code: bool = False, progress: bool = False,
             say: Any = None, overwrite: bool = False) -> dict[str, Any]:
    """Quantize `model_name` into `out`, measure before / after, and return the report (also written to disk)."""
    import torch

    from llmkit.models.load import architectures, load_tokenizer
    from llmkit.models.refs import resolve

    say = say or (lambda msg: None)
    from transformers.utils import logging as hf_logging

    from llmkit.progress import tty_bars

    if not tty_bars(progress):
        hf_logging.disable_progress_bar()  # "Writing model shards" bars
    if method not in METHODS:
        raise UsageError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    if max_ppl_increase < 0:
        raise UsageError(f"--max-ppl-increase must be >= 0, got {max_ppl_increase}")
    out = Path(out).expanduser()
    gguf_type = GGUF_METHODS.get(method)
    if (gguf_type or method == LORA_METHOD) and out.suffix != ".gguf":
        raise UsageError(f"--out {out}: for {method}, --out is the .gguf file to write (e.g. {out.with_suffix('.gguf')})")
    if gguf_type in LLAMA_CPP_TYPES:
        from llmkit.inference.backends import llama_cpp_available

        if not llama_cpp_available():
            raise UsageError(f"--method {method} uses llama.cpp's quantizer: pip install 'llmkit[edge]' (or pip install llama-cpp-python)")
    if out.exists() and not overwrite:
        raise UsageError(f"--out {out} already exists; choose another path, or pass --overwrite to replace it")
    ref = resolve(model_name, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if not ref.is_gguf and quantized_method(ref.path):  # a GGUF source is de-quantized to fp32: a fine start
        raise UsageError(f"{model_name} is already quantized ({quantized_method(ref.path)}); quantize the fp32 / bf16 original instead")
    if method == LORA_METHOD and ref.adapter is None:
        raise UsageError(f"--method {LORA_METHOD} writes a LoRA run folder's adapter; {model_name} is not a LoRA adapter (use gguf-q8_0)")
    if method == "bnb-int8":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UsageError("--method bnb-int8 needs bitsandbytes: pip install 'llmkit[quant]' (or pip install bitsandbytes)") from None
    archs = architectures(ref)
    task = "seq-cls" if any(a.endswith("ForSequenceClassification") for a in archs) else "causal-lm"
    if (gguf_type or method == LORA_METHOD) and task != "causal-lm":
        raise UsageError("GGUF export is for causal LMs (llama.cpp runs text generation); use --method int8 for classifiers")
    if task == "seq-cls" and not eval_data:
        raise UsageError("a classifier's accuracy needs labelled data: pass --eval-data a .csv/.jsonl with text and label columns")
    tokenizer = load_tokenizer(ref)
    if not ref.is_gguf:  # windows no longer than the model's context (tiny and old models have short ones)
        from types import SimpleNamespace

        from llmkit.models.load import context_length

        ctx = context_length(SimpleNamespace(**read_json(ref.path / "config.json")))
        block_size = min(block_size, ctx or block_size)
    blocks, eval_name = _eval_blocks(eval_data, tokenizer, block_size, max_blocks, task)  # a too-short file fails here

    # ---- before
    from llmkit.training.evaluation import default_max_length, generation_speed, weight_bytes

    max_length = default_max_length(None if ref.is_gguf else ref.path)  # seq-cls: as the run was trained
    say(f"loading {ref.name} (fp32)")
    model = _load_fp32(ref, task, progress)
    why = gguf_type and unsupported(model.config.architectures or [type(model).__name__], model.config.model_type)
    if why:
        raise UsageError(f"--method gguf-{gguf_type} cannot export {model_name}: {why} (use --method int8 or bnb-int8)")
    torch.set_num_threads(_threads())
    say("measuring the fp32 model")
    fp32_bytes = weight_bytes(model)  # what save_pretrained writes and what sits in memory
    before = {"memory_bytes": fp32_bytes, "disk_bytes": fp32_bytes, "source_disk_bytes": _source_bytes(ref),
              **_quality(model, blocks, task, eval_data, tokenizer, max_length)}
    prompt = blocks[0][:32] if blocks else tokenizer("Once upon a time")["input_ids"]
    if task == "causal-lm":
        before["tokens_per_s"] = round(generation_speed(model, prompt), 2)

    # ---- quantize into a temporary name, measure, then rename: a failure leaves nothing behind
    tmp = out.with_name(f".tmp-{out.name}")
    out.parent.mkdir(parents=True, exist_ok=True)  # `--out runs/x.gguf` on a fresh checkout: runs/ is not there yet
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    try:
        after: dict[str, Any] = {}
        details: dict[str, Any] = {}
        say(f"quantizing ({method})")
        if method == "int8":
            tmp.mkdir(parents=True)
            modules = quantize_int8_(model, keep)
            save_int8(model, modules, tmp)
            tokenizer.save_pretrained(tmp)
            del model
            qmodel = load_int8(tmp)  # measure what was saved, reloaded the way users will load it
            details["modules"] = {k: sum(1 for v in modules.values() if v == k) for k in sorted(set(modules.values()))}
        elif method == "bnb-int8":
            tmp.mkdir(parents=True)
            qmodel = _bnb_int8(model, ref, tmp, task, progress)
            del model
            tokenizer.save_pretrained(tmp)
        elif method == LORA_METHOD:
            # the gate measures what runs: the base, unchanged, plus this adapter applied by llama.cpp in fp32
            from llmkit.export.adapter import write_adapter
            from llmkit.export.gguf import for_llama_cpp

            del model
            write_adapter(ref, tmp)
            base_gguf = for_llama_cpp(ref, progress=progress)[0].path  # the base itself, or its cached export
            details["base"] = str(base_gguf)
            qmodel = None
        else:
            # a LoRA adapter was merged into the fp32 model by _load_fp32, so every type starts from full precision
            details["tensor_types"] = export_gguf(model, tokenizer, tmp, gguf_type, source_gguf=ref.path if ref.is_gguf else None)
            if gguf_type in LLAMA_CPP_TYPES:
                details["k_quant_fallbacks"] = k_quant_fallbacks(tmp)
            del model
            qmodel = None
        after["disk_bytes"] = _files_bytes(tmp)
        say("measuring the quantized model")
        if qmodel is not None:
            torch.set_num_threads(_threads())
            after["memory_bytes"] = weight_bytes(qmodel)
            with _no_bnb_cast_log():
                after.update(_quality(qmodel, blocks, task, eval_data, tokenizer, max_length))
                if task == "causal-lm":
                    after["tokens_per_s"] = round(generation_speed(qmodel, prompt), 2)
        else:
            after["memory_bytes"] = after["disk_bytes"]  # llama.cpp maps the file: weights in memory = the file
            after.update(_gguf_quality_and_speed(base_gguf, blocks, prompt, adapter=tmp) if method == LORA_METHOD
                         else _gguf_quality_and_speed(tmp, blocks, prompt))
        report = _report(model_name, method, task, eval_name, before, after, details, max_ppl_increase)
        if report["gate"]["failed"] and not force:
            raise QualityGateError(report)
        if tmp.is_dir():
            (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        else:
            _report_path(out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        _install(tmp, out)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise
    return report


@contextlib.contextmanager
def _no_bnb_cast_log() -> Iterator[None]:
    """bitsandbytes logs "MatMul8bitLt: inputs will be cast from float32 to float16" on every fp32 matmul (15,120
    lines while measuring SmolLM2); that one message is dropped while llmkit measures, and nothing else."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")

    def keep(record: logging.LogRecord) -> bool:
        return "MatMul8bitLt: inputs will be cast" not in record.getMessage()

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _install(tmp: Path, out: Path) -> None:
    """Rename the finished output into place; with --overwrite, the old output is removed only after that."""
    old = None
    if out.is_dir():  # os.replace cannot put a folder over a non-empty folder: move the old one aside first
        old = out.with_name(f".old-{out.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class QualityGateError(UsageError):
    """The quantized model lost more quality than allowed; nothing was written."""

    exit_code = 3

    def __init__(self, report: dict[str, Any]) -> None:
        self.report = report
        g = report["gate"]
        super().__init__(f"QUALITY GATE FAILED: {g['metric']} {g['change']} exceeds the allowed {g['allowed']}; nothing was written. "
                         "Pass --force to keep the model anyway, or raise --max-ppl-increase")


def _report_path(out: Path) -> Path:
    return out.with_name(out.stem + "." + REPORT)


def _threads() -> int:
    from llmkit.machine import physical_cores

    return physical_cores()


def _source_bytes(ref: Any) -> int:
    if ref.is_gguf:
        return ref.path.stat().st_size
    return sum(f.stat().st_size for f in ref.path.glob("*.safetensors"))


def _load_fp32(ref: Any, task: str, progress: bool) -> Any:
    from llmkit.models.load import load_causal_lm, load_seq_cls

    if task == "causal-lm":
        return load_causal_lm(ref, device="cpu", dtype="float32", progress=progress)
    return load_seq_cls(ref, device="cpu", progress=progress).eval()


def _bnb_int8(model: Any, ref: Any, tmp: Path, task: str, progress: bool) -> Any:
    """LLM.int8() through transformers: from an fp32 folder (a GGUF-loaded model cannot take a quantization_config)."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    with tempfile.TemporaryDirectory(prefix="llmkit-fp32-") as fp32:
        model.save_pretrained(fp32, safe_serialization=True)
        q = auto.from_pretrained(fp32, quantization_config=BitsAndBytesConfig(load_in_8bit=True), dtype=torch.float32,
                                 device_map={"": "cuda" if torch.cuda.is_available() else "cpu"})
    q.save_pretrained(tmp, safe_serialization=True)
    return q.eval()


def _eval_blocks(eval_data: str | None, tokenizer: Any, block_size: int, max_blocks: int, task: str) -> tuple[Any, str]:
    """Token blocks for perplexity (causal-lm); for classifiers the data is read in `_quality` (it needs the model's labels)."""
    from llmkit.data.examples import pack_causal_lm
    from llmkit.data.files import find_sources

    if task == "seq-cls":
        find_sources(str(eval_data), task=task, what="--eval-data")
        return [], str(eval_data)
    if eval_data:
        from llmkit.data.prepare import prepare_eval

        try:
            blocks, _ = prepare_eval(eval_data, tokenizer, task="causal-lm", block_size=block_size, max_length=block_size,
                                     labels=None, limit=max_blocks)
        except UsageError as e:
            if "fewer than one block" not in str(e):
                raise
            raise UsageError(f"--eval-data is too short for one {block_size}-token window: {e}") from None
        return list(blocks.input_ids), str(eval_data)
    name = "llmkit built-in held-out sample (public-domain prose)"
    try:
        blocks = pack_causal_lm([default_eval_text()], tokenizer, block_size, name)
    except UsageError as e:
        raise UsageError(f"--eval-data is too short for one {block_size}-token window: {e}") from None
    return blocks[:max_blocks], name


def default_eval_text() -> str:
    return (Path(__file__).parent / "heldout.txt").read_text(encoding="utf-8")


def _quality(model: Any, blocks: list[list[int]], task: str, eval_data: str | None, tokenizer: Any, max_length: int) -> dict[str, Any]:
    from llmkit.data.examples import ExampleSet, Labels
    from llmkit.data.prepare import prepare_eval
    from llmkit.training.evaluation import evaluate_examples

    if task == "causal-lm":
        m = evaluate_examples(model, ExampleSet(blocks), task, tokenizer.pad_token_id)
        return {"perplexity": round(m["perplexity"], 4), "eval_tokens": m["tokens"]}
    labels = Labels.from_config(model.config.id2label)
    examples, _ = prepare_eval(str(eval_data), tokenizer, task=task, block_size=max_length, max_length=max_length, labels=labels)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    t0 = time.perf_counter()
    m = evaluate_examples(model, examples, task, tokenizer.pad_token_id, num_labels=len(labels.names))
    return {"accuracy": round(m["accuracy"], 4), "eval_samples": m["samples"], "samples_per_s": round(m["samples"] / (time.perf_counter() - t0), 1)}


def _gguf_quality_and_speed(path: Path, blocks: list[list[int]], prompt: list[int], adapter: Path | None = None) -> dict[str, Any]:
    """Perplexity on the same token windows, and greedy tokens/s, computed by llama.cpp itself (with `adapter` applied)."""
    import math

    from llmkit.inference.llama_cpp import LlamaCppBackend
    from llmkit.models.refs import ModelRef

    n_new = 32
    backend = LlamaCppBackend(ModelRef(str(path), "gguf", Path(path), adapter=adapter), n_ctx=max(len(blocks[0]), len(prompt) + n_new) + 8, logits_all=True)
    nll, count = 0.0, 0
    for block in blocks:
        nll += backend.nll(block)
        count += len(block) - 1
    t0 = time.perf_counter()
    made = len(backend.greedy_token_ids(prompt, n_new))
    speed = made / (time.perf_counter() - t0)
    backend.close()
    return {"perplexity": round(math.exp(nll / count), 4), "eval_tokens": count, "tokens_per_s": round(speed, 2)}


def _report(model: str, method: str, task: str, eval_name: str, before: dict[str, Any], after: dict[str, Any], details: dict[str, Any],
            max_ppl_increase: float) -> dict[str, Any]:
    ratios = {"disk": round(after["disk_bytes"] / before["disk_bytes"], 4), "memory": round(after["memory_bytes"] / before["memory_bytes"], 4)}
    if "tokens_per_s" in after and "tokens_per_s" in before:
        ratios["tokens_per_s"] = round(after["tokens_per_s"] / before["tokens_per_s"], 3)
    if task == "causal-lm":
        change = 100 * (after["perplexity"] / before["perplexity"] - 1)
        gate = {"metric": "perplexity increase", "change": f"{change:+.2f}%", "allowed": f"{max_ppl_increase}%", "failed": change > max_ppl_increase}
        ratios["perplexity"] = round(after["perplexity"] / before["perplexity"], 4)
    else:
        drop = 100 * (before["accuracy"] - after["accuracy"])
        gate = {"metric": "accuracy drop", "change": f"{drop:+.2f} points", "allowed": f"{max_ppl_increase} points", "failed": drop > max_ppl_increase}
        ratios["accuracy"] = round(after["accuracy"] / before["accuracy"], 4)
    return {"model": model, "method": method, "task": task, "eval_data": eval_name, "before": before, "after": after,
            "ratios": ratios, "gate": gate, **details}


def print_report(report: dict[str, Any], stream: Any = None) -> None:
    stream = stream or sys.stdout
    b, a, r = report["before"], report["after"], report["ratios"]
    metric = "perplexity" if report["task"] == "causal-lm" else "accuracy"
    rows = [("disk MB", b["disk_bytes"] / 1e6, a["disk_bytes"] / 1e6, r["disk"]), ("memory MB", b["memory_bytes"] / 1e6, a["memory_bytes"] / 1e6, r["memory"]),
            (metric, b[metric], a[metric], r[metric])]
    if "tokens_per_s" in r:
        rows.append(("tokens/s", b["tokens_per_s"], a["tokens_per_s"], r["tokens_per_s"]))
    print(f"{'':12s} {'fp32':>10s} {report['method']:>10s} {'ratio':>7s}", file=stream)
    for name, x, y, ratio in rows:
        print(f"{name:12s} {x:10.2f} {y:10.2f} {ratio:7.3f}", file=stream)
    g = report["gate"]
    print(f"quality: {g['metric']} {g['change']} (allowed {g['allowed']}){'  FAILED' if g['failed'] else ''}", file=stream)


# gguf-auto: what `llmkit quantize` picks for llama.cpp when the user does not (see quantize_auto)
AUTO_METHOD = "gguf-auto"


def quantize_auto(model_name: str, out: str | Path, *, merge: bool = False, force: bool = False, **kw: Any) -> dict[str, Any]:
    """`--method gguf-auto`: a LoRA run folder -> its llama.cpp adapter (gguf-lora) unless `merge`; anything else
    (full fine-tunes, merged exports) -> gguf-q8_0, stepping up to gguf-f16 with one line when Q8_0 fails the gate.

    Why: Q8_0 costs a fine-tune measurable quality on small models more often than it costs speed to keep F16; a
    refusal leaves the user to guess the next method, so auto takes the next step itself and says so.
    """
    from llmkit.export.adapter import adapter_problem
    from llmkit.models.refs import resolve

    kw.pop("method", None)  # chosen here
    ref = resolve(model_name, allow_pickle=kw.get("allow_pickle", False), trust_remote_code=kw.get("trust_remote_code", False))
    if ref.adapter is not None and not merge:
        why = adapter_problem(ref.adapter)
        if why is None:
            return quantize(model_name, out, method=LORA_METHOD, force=force, **kw)
        print(f"{AUTO_METHOD}: llama.cpp cannot apply this LoRA at run time ({why}): writing the merged export", file=sys.stderr)
    try:
        return quantize(model_name, out, method="gguf-q8_0", **kw)  # never --force here: a failed Q8_0 steps up
    except QualityGateError as e:
        g = e.report["gate"]
        print(f"{AUTO_METHOD}: gguf-q8_0 failed the quality gate ({g['metric']} {g['change']} > {g['allowed']}); "
              "writing gguf-f16 instead", file=sys.stderr, flush=True)
    report = quantize(model_name, out, method="gguf-f16", force=force, **kw)
    report["stepped_up_from"] = "gguf-q8_0"
    _report_path(Path(out).expanduser()).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report
