"""Quantized models: int8 (torchao, a plain Hugging Face folder), bitsandbytes LLM.int8(), and GGUF export (f16 to 4-bit).

    >>> from llmkit.quantize import QuantizeConfig, quantize
    >>> report = quantize(QuantizeConfig(model="smollm2-135m", out="runs/smollm2-int8", method="int8"))
    >>> report["after"]["perplexity"], report["ratios"]["tokens_per_s"], report["kernel"]

`int8` writes what transformers' `TorchAoConfig` + `save_pretrained` write: per-output-channel int8 weights for
every `nn.Linear` (torchao `Int8Tensor`), loaded back by plain `AutoModelFor*.from_pretrained(folder)` with
torchao installed, and by every llmkit command. The kernel (`--kernel`, default per task and CPU kind:
`llmkit.models.int8.default_kernel`) is `weight-only` (decoding is memory-bound: fewer weight bytes) or `dynamic`
(int8 activations too, for compute-bound classifiers). Embeddings, tied LM heads, classifier heads and GPT-2's
`Conv1D` layers stay in float (the format quantizes `nn.Linear` only); the report counts what was converted. Speed
is measured after a warm-up, over several timed runs (the median and every run), on the model as llmkit runs it.

`gguf-f16`, `gguf-q8_0`, `gguf-q5_k_m` and `gguf-q4_k_m` write a GGUF file (llama.cpp's format; every architecture
its converter knows, `llmkit.export.gguf.unsupported` names the others) with the tokenizer and chat template inside;
`llmkit.export.gguf` says what each type holds. llama.cpp and transformers (`gguf_file=`) load it; its quality and
speed are measured in llama.cpp itself. `load_int8` (`llmkit.models.int8`) is re-exported here."""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llmkit.atomic import atomic_path
from llmkit.errors import UsageError
from llmkit.export.gguf import LLAMA_CPP_TYPES, k_quant_fallbacks, unsupported
from llmkit.export.gguf import TYPES as GGUF_TYPES
from llmkit.export.gguf import export as export_gguf
from llmkit.export.int8 import KEEP_FP32, write_int8  # noqa: F401  (KEEP_FP32: --keep-fp32's help)
from llmkit.models.int8 import KERNELS, default_dtype, default_kernel, load_int8, quantized_method, quiet_torchao  # noqa: F401  (load_int8: re-exported)
from llmkit.runfolder import read_json, write_json

GGUF_METHODS = {f"gguf-{t}": t for t in GGUF_TYPES}  # --method -> GGUF type; METHODS (every --method) is below
LORA_METHOD = "gguf-lora"  # a LoRA run folder as a llama.cpp adapter file, used with its unchanged base (llmkit.export.adapter)
# gguf-auto: the adapter for a LoRA run (the merged export with --merge), else Q8_0 stepping up to F16 (quantize_auto)
AUTO_METHOD = "gguf-auto"
REPORT = "quantize_report.json"


# --------------------------------------------------------------------------------------------- the command
@dataclass
class QuantizeConfig:
    """What `llmkit quantize` is asked to do: one field per flag (`llmkit.commands.quantize` fills it from them)."""

    model: str = ""
    """--model: alias, folder (e.g. a finetune output), .gguf or Hub id."""
    out: str = ""
    """--out: the output folder (int8, bnb-int8) or .gguf file (gguf-*)."""
    method: str = "int8"
    """--method: one of METHODS."""
    eval_data: str | None = None
    """--eval-data: held-out text for perplexity, or labelled data for classifiers; None = the built-in sample."""
    max_ppl_increase: float = 2.0
    """--max-ppl-increase: the quality gate, in % of perplexity (points of accuracy for classifiers)."""
    overwrite: bool = False
    """--overwrite: replace an existing --out, once the new one is complete and passed the gate."""
    force: bool = False
    """--force: keep the model even when it fails the quality gate."""
    keep_fp32: tuple[str, ...] = ()
    """--keep-fp32: int8: module names left in fp32 (besides KEEP_FP32)."""
    kernel: str = "auto"
    """--kernel: int8: auto (per task and CPU: llmkit.models.int8.default_kernel) or one of KERNELS."""
    speed_runs: int = 5
    """Timed runs behind each speed (after one warm-up); the report gives their median and all of them."""
    block_size: int = 256
    """Tokens per perplexity window (at most the model's context)."""
    max_blocks: int = 16
    """Perplexity windows measured, before and after."""
    merge: bool = False
    """--merge: gguf-auto on a LoRA run writes the merged export instead of the adapter."""
    allow_pickle: bool = False
    trust_remote_code: bool = False
    progress: bool = False
    """Loading bars (a TTY) or log lines; False for --quiet."""

    @property
    def gguf_type(self) -> str | None:
        return GGUF_METHODS.get(self.method)

    @property
    def out_path(self) -> Path:
        return Path(self.out).expanduser()

    def validate(self) -> None:
        """Before anything is loaded: one UsageError naming the flag behind each problem the flags alone show,
        or the package the method needs and lacks."""
        problems: list[str] = []
        out, gguf_type = self.out_path, self.gguf_type
        if not self.model:
            problems.append("--model is required")
        if self.method not in (*METHODS, AUTO_METHOD):
            problems.append(f"--method {self.method!r} is not one of {', '.join((*METHODS, AUTO_METHOD))}")
        if self.merge and self.method != AUTO_METHOD:
            problems.append(f"--merge goes with --method {AUTO_METHOD} (any --method gguf-TYPE on a LoRA run is the merged export)")
        if self.kernel not in ("auto", *KERNELS):
            problems.append(f"--kernel {self.kernel!r} is not one of auto, {', '.join(KERNELS)}")
        elif self.kernel != "auto" and self.method != "int8":
            problems.append(f"--kernel goes with --method int8, not {self.method}")
        if self.method == "int8":
            try:
                with quiet_torchao():
                    pass
            except ImportError:
                problems.append("--method int8 needs torchao: pip install 'llmkit[quant]' (or pip install torchao)")
        if self.max_ppl_increase < 0:
            problems.append(f"--max-ppl-increase must be >= 0, got {self.max_ppl_increase}")
        if (gguf_type or self.method in (LORA_METHOD, AUTO_METHOD)) and out.suffix != ".gguf":
            problems.append(f"--out {out}: for {self.method}, --out is the .gguf file to write (e.g. {out.with_suffix('.gguf')})")
        if gguf_type in LLAMA_CPP_TYPES:
            from llmkit.inference.backends import llama_cpp_available

            if not llama_cpp_available():
                problems.append(f"--method {self.method} uses llama.cpp's quantizer: pip install 'llmkit[edge]' (or pip install llama-cpp-python)")
        if self.method == "bnb-int8":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                problems.append("--method bnb-int8 needs bitsandbytes: pip install 'llmkit[quant]' (or pip install bitsandbytes)")
        if out.exists() and not self.overwrite:
            problems.append(f"--out {out} already exists; choose another path, or pass --overwrite to replace it")
        if problems:
            raise UsageError("; ".join(problems))


@dataclass
class Source:
    """The model to quantize and what measuring it takes: the same windows and prompt before and after."""

    ref: Any
    task: str  # causal-lm | seq-cls
    tokenizer: Any
    blocks: list[list[int]]  # perplexity windows (causal-lm)
    eval_name: str
    eval_data: str | None  # classifiers: the labelled file, read with the model's labels
    max_length: int
    prompt: list[int]  # for tokens/s
    model: Any = None  # the fp32 model, until a method takes it

    def take_model(self) -> Any:
        """The fp32 model, no longer held here: a method drops it before its output is loaded and measured, so the
        two are never in memory together."""
        model, self.model = self.model, None
        return model


def quantize(cfg: QuantizeConfig, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Quantize `cfg.model` into `cfg.out`, measure before / after, and return the report (also written to disk)."""
    from transformers.utils import logging as hf_logging

    from llmkit.progress import tty_bars
    from llmkit.training.evaluation import weight_bytes

    say = say or (lambda msg: None)
    cfg.validate()
    if cfg.method == AUTO_METHOD:
        return quantize_auto(cfg, say)
    if not tty_bars(cfg.progress):
        hf_logging.disable_progress_bar()  # "Writing model shards" bars
    src = load_source(cfg, say)  # refuses here what the model itself rules out

    say("measuring the fp32 model")
    fp32_bytes = weight_bytes(src.model)  # what save_pretrained writes and what sits in memory
    before = {"memory_bytes": fp32_bytes, "disk_bytes": fp32_bytes, "source_disk_bytes": _files_bytes(src.ref.path),
              **_measure(src.model, src, cfg.speed_runs)}

    # quantize into a temporary name (`.tmp-OUT-PID`), measure, then rename: a failure or a failed gate leaves
    # nothing behind, and with --overwrite the old output is removed only once the new one is in place
    out = cfg.out_path
    with atomic_path(out, sweep=True) as tmp:  # creates out's folder: `--out runs/x.gguf` on a fresh checkout
        say(f"quantizing ({cfg.method})")
        qmodel, details = METHODS[cfg.method](src, tmp, cfg)
        disk = _files_bytes(tmp)
        say("measuring the quantized model")
        if qmodel is not None:
            after = {"disk_bytes": disk, "memory_bytes": weight_bytes(qmodel), **_measure(qmodel, src, cfg.speed_runs)}
        else:  # llama.cpp maps the file: weights in memory = the file
            gguf, adapter = (Path(details["base"]), tmp) if cfg.method == LORA_METHOD else (tmp, None)
            after = {"disk_bytes": disk, "memory_bytes": disk, **_gguf_quality_and_speed(gguf, src.blocks, src.prompt, adapter, cfg.speed_runs)}
        report = _report(cfg.model, cfg.method, src.task, src.eval_name, before, after, details, cfg.max_ppl_increase)
        if report["gate"]["failed"] and not cfg.force:
            raise QualityGateError(report)
        write_json(tmp / REPORT if tmp.is_dir() else _report_path(out), report)
    return report


def load_source(cfg: QuantizeConfig, say: Callable[[str], None]) -> Source:
    """Resolve and load the fp32 model with its evaluation windows, refusing what this model cannot be quantized to."""
    from llmkit.models.load import architectures, load_tokenizer
    from llmkit.models.refs import resolve
    from llmkit.training.evaluation import default_max_length

    ref = resolve(cfg.model, allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code)
    if not ref.is_gguf and quantized_method(ref.path):  # a GGUF source is de-quantized to fp32: a fine start
        raise UsageError(f"{cfg.model} is already quantized ({quantized_method(ref.path)}); quantize the fp32 / bf16 original instead")
    if cfg.method == LORA_METHOD and ref.adapter is None:
        raise UsageError(f"--method {LORA_METHOD} writes a LoRA run folder's adapter; {cfg.model} is not a LoRA adapter (use gguf-q8_0)")
    task = "seq-cls" if any(a.endswith("ForSequenceClassification") for a in architectures(ref)) else "causal-lm"
    if (cfg.gguf_type or cfg.method == LORA_METHOD) and task != "causal-lm":
        raise UsageError("GGUF export is for causal LMs (llama.cpp runs text generation); use --method int8 for classifiers")
    if task == "seq-cls" and not cfg.eval_data:
        raise UsageError("a classifier's accuracy needs labelled data: pass --eval-data a .csv/.jsonl with text and label columns")
    tokenizer = load_tokenizer(ref)
    block_size = cfg.block_size
    if not ref.is_gguf:  # windows no longer than the model's context (tiny and old models have short ones)
        from types import SimpleNamespace

        from llmkit.models.load import context_length

        ctx = context_length(SimpleNamespace(**read_json(ref.path / "config.json")))
        block_size = min(block_size, ctx or block_size)
    blocks, eval_name = _eval_blocks(cfg.eval_data, tokenizer, block_size, cfg.max_blocks, task)  # a too-short file fails here
    max_length = default_max_length(None if ref.is_gguf else ref.path)  # seq-cls: as the run was trained
    say(f"loading {ref.name} (fp32)")
    model = _load_fp32(ref, task, cfg.progress)
    why = cfg.gguf_type and unsupported(model.config.architectures or [type(model).__name__], model.config.model_type)
    if why:
        raise UsageError(f"--method {cfg.method} cannot export {cfg.model}: {why} (use --method int8 or bnb-int8)")
    prompt = blocks[0][:32] if blocks else tokenizer("Once upon a time")["input_ids"]
    return Source(ref, task, tokenizer, blocks, eval_name, cfg.eval_data, max_length, prompt, model)


def _measure(model: Any, src: Source, runs_n: int = 5) -> dict[str, Any]:
    """Quality (perplexity or accuracy) and, for causal LMs, greedy tokens/s of a model in torch."""
    import torch

    from llmkit.training.evaluation import generation_speeds

    runs_n = max(1, runs_n)
    from llmkit.machine import physical_cores

    torch.set_num_threads(physical_cores())
    with _no_bnb_cast_log():
        found = _quality(model, src.blocks, src.task, src.eval_data, src.tokenizer, src.max_length, runs_n)
        if src.task == "causal-lm":
            found.update(_speed("tokens_per_s", generation_speeds(model, src.prompt, runs=runs_n)))
    return found


def _speed(key: str, runs: list[float]) -> dict[str, Any]:
    """The median of several timed runs, and the runs: one run of a short generation swung 0.75x-1.5x (issue 39)."""
    import statistics

    return {key: round(statistics.median(runs), 2), f"{key}_runs": [round(r, 2) for r in runs]}


# --------------------------------------------------------------------------------------------- the methods
# Each quantizes `src`'s model and writes it to `tmp`; returns (the quantized model to measure in torch, or None for
# a GGUF file, which llama.cpp measures; what the report adds about it).


def _int8(src: Source, tmp: Path, cfg: QuantizeConfig) -> tuple[Any, dict[str, Any]]:
    kernel = default_kernel(src.task) if cfg.kernel == "auto" else cfg.kernel
    qmodel, details = write_int8(src.take_model(), src.tokenizer, tmp, src.task, kernel, cfg.keep_fp32, default_dtype(src.task, kernel))
    return qmodel, {**details, "kernel_chosen_by": "default for this task and CPU" if cfg.kernel == "auto" else "--kernel"}


def _bnb(src: Source, tmp: Path, cfg: QuantizeConfig) -> tuple[Any, dict[str, Any]]:
    tmp.mkdir(parents=True)
    qmodel = _bnb_int8(src.take_model(), src.ref, tmp, src.task, cfg.progress)
    src.tokenizer.save_pretrained(tmp)
    return qmodel, {}


def _gguf(gguf_type: str, src: Source, tmp: Path, cfg: QuantizeConfig) -> tuple[Any, dict[str, Any]]:
    # a LoRA adapter was merged into the fp32 model by _load_fp32, so every type starts from full precision
    details: dict[str, Any] = {"tensor_types": export_gguf(src.take_model(), src.tokenizer, tmp, gguf_type,
                                                           source_gguf=src.ref.path if src.ref.is_gguf else None)}
    if gguf_type in LLAMA_CPP_TYPES:
        details["k_quant_fallbacks"] = k_quant_fallbacks(tmp)
    return None, details


def _lora(src: Source, tmp: Path, cfg: QuantizeConfig) -> tuple[Any, dict[str, Any]]:
    # the gate measures what runs: the base, unchanged (or its cached export), plus this adapter applied by llama.cpp
    from llmkit.export.adapter import write_adapter
    from llmkit.export.gguf import for_llama_cpp

    src.take_model()  # measured already; freed before llama.cpp loads the base
    write_adapter(src.ref, tmp)
    return None, {"base": str(for_llama_cpp(src.ref, progress=cfg.progress)[0].path)}


Method = Callable[[Source, Path, QuantizeConfig], tuple[Any, dict[str, Any]]]
METHODS: dict[str, Method] = {"int8": _int8, "bnb-int8": _bnb, **{m: functools.partial(_gguf, t) for m, t in GGUF_METHODS.items()},
                              LORA_METHOD: _lora}


def _files_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


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


def _quality(model: Any, blocks: list[list[int]], task: str, eval_data: str | None, tokenizer: Any, max_length: int,
             runs_n: int = 5) -> dict[str, Any]:
    """Perplexity, or accuracy and samples/s (the median of `runs_n` timed passes over up to 256 examples)."""
    from llmkit.data.examples import Collator, ExampleSet, Labels
    from llmkit.data.prepare import prepare_eval
    from llmkit.training.evaluation import evaluate_examples, inference_speeds

    if task == "causal-lm":
        m = evaluate_examples(model, ExampleSet(blocks), task, tokenizer.pad_token_id)
        return {"perplexity": round(m["perplexity"], 4), "eval_tokens": m["tokens"]}
    labels = Labels.from_config(model.config.id2label)
    examples, _ = prepare_eval(str(eval_data), tokenizer, task=task, block_size=max_length, max_length=max_length, labels=labels)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    m = evaluate_examples(model, examples, task, tokenizer.pad_token_id, num_labels=len(labels.names))
    runs = inference_speeds(model, examples, Collator(tokenizer.pad_token_id, causal=False), runs=runs_n, limit=256)
    return {"accuracy": round(m["accuracy"], 4), "eval_samples": m["samples"], **_speed("samples_per_s", runs)}


def _gguf_quality_and_speed(path: Path, blocks: list[list[int]], prompt: list[int], adapter: Path | None = None,
                            runs_n: int = 5) -> dict[str, Any]:
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
    backend.greedy_token_ids(prompt, 8)  # warm-up
    runs = []
    for _ in range(runs_n):
        t0 = time.perf_counter()
        made = len(backend.greedy_token_ids(prompt, n_new))
        runs.append(made / (time.perf_counter() - t0))
    backend.close()
    return {"perplexity": round(math.exp(nll / count), 4), "eval_tokens": count, **_speed("tokens_per_s", runs)}


def _report(model: str, method: str, task: str, eval_name: str, before: dict[str, Any], after: dict[str, Any], details: dict[str, Any],
            max_ppl_increase: float) -> dict[str, Any]:
    ratios = {"disk": round(after["disk_bytes"] / before["disk_bytes"], 4), "memory": round(after["memory_bytes"] / before["memory_bytes"], 4)}
    for speed in ("tokens_per_s", "samples_per_s"):
        if speed in after and speed in before:
            ratios[speed] = round(after[speed] / before[speed], 3)
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
    speed = "tokens_per_s" if "tokens_per_s" in r else "samples_per_s" if "samples_per_s" in r else None
    if speed:
        rows.append((speed.replace("_per_s", "/s"), b[speed], a[speed], r[speed]))
    print(f"{'':12s} {'fp32':>10s} {report['method']:>10s} {'ratio':>7s}", file=stream)
    for name, x, y, ratio in rows:
        print(f"{name:12s} {x:10.2f} {y:10.2f} {ratio:7.3f}", file=stream)
    if speed:  # the spread says how far the ratio can be trusted on this machine today
        spread = [f"{min(m.get(speed + '_runs') or [m[speed]]):.1f}-{max(m.get(speed + '_runs') or [m[speed]]):.1f}" for m in (b, a)]
        print(f"speed: median of {len(b.get(speed + '_runs', []))} timed runs after a warm-up; fp32 {spread[0]}, {report['method']} {spread[1]}", file=stream)
    if "kernel" in report:
        m = report["modules"]
        print(f"kernel: int8 {report['kernel']} (torchao, {report['kernel_chosen_by']}); {m['int8_linear']} linear layers int8, "
              f"kept in {report['dtype']}: {report['kept_in_float']}", file=stream)
        if "cpu_engine" in report:
            print(f"measured as llmkit runs it on CPU: {report['cpu_engine']}", file=stream)
    g = report["gate"]
    print(f"quality: {g['metric']} {g['change']} (allowed {g['allowed']}){'  FAILED' if g['failed'] else ''}", file=stream)


def quantize_auto(cfg: QuantizeConfig, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """`--method gguf-auto`: a LoRA run folder -> its llama.cpp adapter (gguf-lora) unless `--merge`; anything else
    (full fine-tunes, merged exports) -> gguf-q8_0, stepping up to gguf-f16 with one line when Q8_0 fails the gate.

    Why: Q8_0 costs a fine-tune measurable quality on small models more often than it costs speed to keep F16; a
    refusal leaves the user to guess the next method, so auto takes the next step itself and says so.
    """
    from llmkit.export.adapter import adapter_problem
    from llmkit.models.refs import resolve

    ref = resolve(cfg.model, allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code)
    if ref.adapter is not None and not cfg.merge:
        why = adapter_problem(ref.adapter)
        if why is None:
            return quantize(replace(cfg, method=LORA_METHOD, merge=False), say)
        print(f"{AUTO_METHOD}: llama.cpp cannot apply this LoRA at run time ({why}): writing the merged export", file=sys.stderr)
    try:  # never --force here: a failed Q8_0 steps up
        return quantize(replace(cfg, method="gguf-q8_0", merge=False, force=False), say)
    except QualityGateError as e:
        g = e.report["gate"]
        print(f"{AUTO_METHOD}: gguf-q8_0 failed the quality gate ({g['metric']} {g['change']} > {g['allowed']}); "
              "writing gguf-f16 instead", file=sys.stderr, flush=True)
    report = quantize(replace(cfg, method="gguf-f16", merge=False), say)
    report["stepped_up_from"] = "gguf-q8_0"
    write_json(_report_path(cfg.out_path), report)
    return report
