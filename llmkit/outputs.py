"""The run folder: refuse to clobber what is not ours, then write a normal Hugging Face model folder.

    OUT/
      config.json, model.safetensors       (full / merged)   or   adapter_config.json, adapter_model.safetensors (LoRA)
      tokenizer files
      llmkit.json       the resolved recipe + run facts (llmkit loads adapters' base models from it)
      metrics.jsonl     one JSON object per logged step and per evaluation
      loss.png          train / eval loss curves
      README.md         model card: final metrics, the command that made it, how to load it
      checkpoints/      resumable checkpoints (step-*) and the best weights (best/)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmkit import __version__
from llmkit.errors import UsageError

RUN_FILE = "llmkit.json"


def read_run(out: Path) -> dict[str, Any] | None:
    """The llmkit.json of a run folder, or None if `out` is not an llmkit run."""
    try:
        data = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and "llmkit" in data else None


def check_out_dir(out: Path, *, overwrite: bool, resume: bool) -> None:
    """Decide, before anything is loaded or written, whether `out` may be used."""
    if overwrite and resume:
        raise UsageError("--overwrite and --resume contradict each other: --resume continues the run in --out, --overwrite replaces it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; choose a folder")
    if resume:
        if read_run(out) is None:
            raise UsageError(f"--resume: {out} is not an llmkit run folder; run without --resume to start one")
        if read_run(out).get("llmkit", {}).get("status") == "done":
            raise UsageError(f"--resume: the run in {out} has finished; there is nothing to resume (use --overwrite to train again)")
        return
    if not out.exists() or not any(out.iterdir()):
        return
    if overwrite:
        here = Path.cwd().resolve()
        if out.resolve() in (here, *here.parents, Path.home().resolve()):
            raise UsageError(f"--overwrite refuses to delete {out}: it is the current folder, one of its parents or your home")
        return
    if read_run(out) is not None:
        raise UsageError(f"{out} already holds an llmkit run; pass --resume to continue it or --overwrite to start over")
    raise UsageError(f"--out {out} exists and is not an llmkit run; choose another folder or pass --overwrite to replace it")


def start_run(out: Path, overwrite: bool, resume: bool, record: dict[str, Any]) -> None:
    """Create (or clear) the folder and mark it as an llmkit run; called once everything has been validated."""
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    write_json(out / RUN_FILE, {**record, "llmkit": {"version": __version__, "status": "running", "command": command_line()}})


@contextmanager
def run_guard(out: Path, *, resume: bool, main: bool) -> Iterator[None]:
    """Around training + saving: a run that fails leaves either nothing or a folder `--resume` can continue.

    Before its first checkpoint a new run has nothing worth keeping, so the folder it created goes (no
    half-written output). After that, the checkpoints stay and the user is told how to continue.
    """
    try:
        yield
    except BaseException as e:
        if main:
            from llmkit.errors import Interrupted
            from llmkit.train import CHECKPOINTS, complete_checkpoints

            shutil.rmtree(out / ".tmp-model", ignore_errors=True)
            kept = complete_checkpoints(out / CHECKPOINTS)
            if kept:
                if not isinstance(e, Interrupted):  # its message already says how to continue
                    print(f"the checkpoints in {out} are kept: continue this run with the same command plus --resume",
                          file=sys.stderr)
                _mark_stopped(out, e, kept[-1])
            elif not resume:
                shutil.rmtree(out, ignore_errors=True)
        raise


def _mark_stopped(out: Path, error: BaseException, checkpoint: Path) -> None:
    """llmkit.json tells the truth about a run that stopped: `interrupted` or `failed`, and where to resume from."""
    from llmkit.errors import Interrupted

    try:
        run = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
        state = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
        interrupted = isinstance(error, (Interrupted, KeyboardInterrupt))
        message = (str(error).splitlines() or [type(error).__name__])[0]
        run["llmkit"] = {**run.get("llmkit", {}), "status": "interrupted" if interrupted else "failed", "error": message,
                         "checkpoint": checkpoint.name, "step": state.get("step")}
        write_json(out / RUN_FILE, run)
    except (OSError, ValueError):  # the disk that failed the run may fail this too: the checkpoints still say it all
        pass


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def command_line() -> str:
    import shlex

    argv = list(sys.argv)
    argv[0] = "llmkit" if argv and Path(argv[0]).name in ("llmkit", "__main__.py", "-m") else Path(argv[0]).name
    return " ".join(shlex.quote(a) for a in argv)


def install_files(tmp: Path, out: Path) -> None:
    """Move every file of `tmp` into `out` (each rename is atomic), llmkit.json last, then remove `tmp`.

    Until llmkit.json says "done", the folder is a run in progress (resumable), never a finished-looking model.
    """
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == RUN_FILE):
        os.replace(f, out / f.name)
    tmp.rmdir()


def plot_losses(metrics_path: Path, png: Path, title: str) -> bool:
    """loss.png: training loss per logged step, eval loss per evaluation. False if there is nothing to plot."""
    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()] if metrics_path.exists() else []
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return True


def model_card(*, title: str, base: str, task: str, method: str, merged: bool, metrics: dict[str, float],
               steps: int, command: str, data: str, extra: str = "", intro: str | None = None, out: str = "OUT",
               peft_base: str | None = None, num_labels: int | None = None) -> str:
    """README.md of an output folder; its Python snippets name the real folder, base and label count, so they run as shown."""
    library = "peft" if method in ("lora", "qlora") and not merged else "transformers"
    pipeline = "text-generation" if task == "causal-lm" else "text-classification"
    rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items())
    causal = task == "causal-lm"
    labels = "" if causal else f", num_labels={num_labels}"
    if library == "peft":
        auto = "AutoPeftModelForCausalLM" if causal else "AutoPeftModelForSequenceClassification"
        load = f"from peft import {auto}\nmodel = {auto}.from_pretrained({out!r}{labels})"
        if peft_base:
            load += f"  # base: {peft_base}"
        if not causal:  # the base config does not know (GPT-2, Llama) the pad token
            load += f"\nfrom transformers import AutoTokenizer\nmodel.config.pad_token_id = AutoTokenizer.from_pretrained({out!r}).pad_token_id"
        if method == "qlora":  # the adapter was trained on the NF4-quantized base: the same quantization reproduces it
            load += (f"\n\n# exactly as trained, on the base in 4-bit NF4 (bitsandbytes):\nimport torch\n"
                     f"from transformers import BitsAndBytesConfig\nmodel = {auto}.from_pretrained({out!r}, quantization_config="
                     f"BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True, "
                     f"bnb_4bit_compute_dtype=torch.float32))")
        if peft_base and peft_base != base:
            hf = "AutoModelForCausalLM" if causal else "AutoModelForSequenceClassification"
            load += (f"\n\n# where that base folder is missing (another machine), take the base from the Hub:\n"
                     f"from peft import PeftModel\nfrom transformers import {hf}\n"
                     f"model = PeftModel.from_pretrained({hf}.from_pretrained({base!r}{labels}), {out!r})")
    else:
        auto = "AutoModelForCausalLM" if causal else "AutoModelForSequenceClassification"
        load = f"from transformers import {auto}\nmodel = {auto}.from_pretrained({out!r})"
    use = f"llmkit generate --model {out} \"Once upon a time\"" if causal else f"llmkit evaluate --model {out} --data test.csv"
    return f"""---
library_name: {library}
base_model: {base}
pipeline_tag: {pipeline}
tags: [llmkit, {method}]
---

# {title}

{intro or f"Fine-tuned from `{base}` with llmkit {__version__} ({task}, {method}{', merged' if merged else ''}), {steps} optimizer steps on `{data}`."}

## Evaluation

| metric | value |
|---|---|
{rows or "| (no eval data) | |"}

{extra}
## Made with

```
{command}
```

The full resolved recipe is in `llmkit.json`; per-step metrics in `metrics.jsonl`; curves in `loss.png`.

## Use

```python
{load}
```

```
{use}
```
"""
