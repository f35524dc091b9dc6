"""The run folder's life: refuse to clobber what is not ours, mark a run started / stopped, and publish the
finished model as a normal Hugging Face model folder (the layout itself is llmkit/runfolder.py's).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkit import __version__
from llmkit.errors import UsageError
from llmkit.runfolder import CHECKPOINTS, LOSS_PLOT, METRICS, RECORD, TMP_MODEL, read_json, read_metrics, read_record, write_json
from llmkit.training.checkpoints import complete_checkpoints, remove_best


def check_out_dir(out: Path, *, overwrite: bool, resume: bool) -> None:
    """Decide, before anything is loaded or written, whether `out` may be used."""
    if overwrite and resume:
        raise UsageError("--overwrite and --resume contradict each other: --resume continues the run in --out, --overwrite replaces it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; choose a folder")
    if resume:
        if read_record(out) is None:
            raise UsageError(f"--resume: {out} is not an llmkit run folder; run without --resume to start one")
        if read_record(out).get("llmkit", {}).get("status") == "done":
            raise UsageError(f"--resume: the run in {out} has finished; there is nothing to resume (use --overwrite to train again)")
        return
    if not out.exists() or not any(out.iterdir()):
        return
    if overwrite:
        here = Path.cwd().resolve()
        if out.resolve() in (here, *here.parents, Path.home().resolve()):
            raise UsageError(f"--overwrite refuses to delete {out}: it is the current folder, one of its parents or your home")
        return
    if read_record(out) is not None:
        raise UsageError(f"{out} already holds an llmkit run; pass --resume to continue it or --overwrite to start over")
    raise UsageError(f"--out {out} exists and is not an llmkit run; choose another folder or pass --overwrite to replace it")


def start_run(out: Path, overwrite: bool, resume: bool, record: dict[str, Any]) -> None:
    """Create (or clear) the folder and mark it as an llmkit run; called once everything has been validated."""
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        (out / METRICS).unlink(missing_ok=True)
    write_json(out / RECORD, {**record, "llmkit": {"version": __version__, "status": "running", "command": command_line()}})


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

            shutil.rmtree(out / TMP_MODEL, ignore_errors=True)
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
        run = read_json(out / RECORD)
        state = read_json(checkpoint / "state.json")
        interrupted = isinstance(error, (Interrupted, KeyboardInterrupt))
        message = (str(error).splitlines() or [type(error).__name__])[0]
        run["llmkit"] = {**run.get("llmkit", {}), "status": "interrupted" if interrupted else "failed", "error": message,
                         "checkpoint": checkpoint.name, "step": state.get("step")}
        write_json(out / RECORD, run)
    except (OSError, ValueError, UsageError):  # the disk that failed the run may fail this too: the checkpoints still say it all
        pass


@dataclass
class Card:
    """What an objective says on its model card beyond the facts every run has (base, task, metrics, command)."""

    base: str  # the base as the Hub knows it (models.base_model_id)
    plot_title: str
    method: str
    merged: bool = False
    intro: str | None = None  # replaces the card's "Fine-tuned from ..." sentence
    extra: str = ""  # markdown before the loss curves (distill: the teacher-vs-student table)
    peft_base: str | None = None  # LoRA: the base folder plain peft loads
    num_labels: int | None = None


def run_summary(result: Any, metrics: dict[str, float]) -> dict[str, Any]:
    """llmkit.json's "llmkit" section of a finished training run."""
    state = result.state
    return {"status": "done", "steps": state.step, "total_steps": result.total_steps, "epochs": state.epoch,
            "stopped_early": state.stopped_early, "best_step": state.best_step, "train_seconds": round(state.train_seconds, 2),
            "train_tokens_per_s": round(state.tokens / state.train_seconds, 1) if state.train_seconds else None,
            "train_samples_per_s": round(state.samples / state.train_seconds, 2) if state.train_seconds else None,
            "peak_memory_gb": result.peak_memory_gb, "metrics": metrics,
            **({"compile_seconds": result.compile_seconds} if getattr(result, "compile_seconds", None) is not None else {})}


def publish(tmp: Path, out: Path, cfg: Any, record: dict[str, Any], result: Any, card: Card) -> None:
    """Finish the model folder staged in `tmp` (weights and tokenizer already there): llmkit.json, loss.png and
    README.md, then move it all into `out`, llmkit.json ("status: done") last. Main process only."""
    metrics = {f"eval_{k}": v for k, v in result.eval_metrics.items()}
    run = {**record, "llmkit": {**run_summary(result, metrics), "command": command_line(), "version": __version__}}
    plotted = plot_losses(out, tmp / LOSS_PLOT, card.plot_title)
    text = model_card(title=out.name, base=card.base, task=cfg.task, method=card.method, merged=card.merged, metrics=metrics,
                      steps=result.state.step, command=command_line(), data=cfg.data.train, intro=card.intro, out=cfg.out,
                      extra=card.extra + (f"![loss curves]({LOSS_PLOT})\n" if plotted else ""), peft_base=card.peft_base,
                      num_labels=card.num_labels)
    (tmp / "README.md").write_text(text, encoding="utf-8")
    write_json(tmp / RECORD, run)
    for stale in ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "adapter_config.json"):
        (out / stale).unlink(missing_ok=True)  # an --overwrite'd or resumed folder must not mix full and adapter files
    install_files(tmp, out)  # everything was written above; now only renames
    remove_best(out / CHECKPOINTS)  # the folder's model *is* the best one now


def command_line() -> str:
    import shlex

    argv = list(sys.argv)
    argv[0] = "llmkit" if argv and Path(argv[0]).name in ("llmkit", "__main__.py", "-m") else Path(argv[0]).name
    return " ".join(shlex.quote(a) for a in argv)


def install_files(tmp: Path, out: Path) -> None:
    """Move every file of `tmp` into `out` (each rename is atomic), llmkit.json last, then remove `tmp`.

    Until llmkit.json says "done", the folder is a run in progress (resumable), never a finished-looking model.
    """
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == RECORD):
        os.replace(f, out / f.name)
    tmp.rmdir()


def plot_losses(out: Path, png: Path, title: str) -> bool:
    """loss.png: training loss per logged step, eval loss per evaluation (and, for preference tuning, the reward
    margins and accuracy beside it). False if there is nothing to plot."""
    rows = read_metrics(out)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    rewards = {name: [(r["step"], r[name]) for r in rows if r.get(name) is not None]
               for name in ("rewards/margins", "rewards/accuracy", "eval_rewards/margins", "eval_rewards/accuracy",
                            "reward", "eval_reward", "eval_pass_rate")}  # the last three: --objective grpo
    rewards = {k: v for k, v in rewards.items() if v}
    fig, axes = plt.subplots(1, 2 if rewards else 1, figsize=(12 if rewards else 7, 4), dpi=100, squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if rewards:
        ax = axes[0][1]
        for name, points in rewards.items():
            ax.plot(*zip(*points, strict=True), "o-" if name.startswith("eval_") else "-", label=name, lw=1.2)
        ax.set_xlabel("optimizer step")
        ax.set_title("reward per step (eval: greedy answers)" if "reward" in rewards else "rewards (implicit): margin chosen - rejected, accuracy")
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
