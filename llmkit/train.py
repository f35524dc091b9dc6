"""THE training loop: one visible function on Accelerate, shared by `finetune` and `distill`.

    accelerator = make_accelerator(cfg.train)
    result = fit(TrainJob(model, train_set, eval_set, collate, "causal-lm", cfg.train, out), accelerator)

The same code runs on one CPU, one GPU, or N processes under `torchrun` / `accelerate launch`: Accelerate
shards the batches and averages the gradients, and every process takes the same branches (eval, save,
early stop) because every decision is made on values all processes share.

Checkpoints (`OUT/checkpoints/step-00000120/`) hold the trainable weights (safetensors), optimizer and
scheduler state, every process's RNG state and the data position. They are written to a temporary folder
and renamed into place only when complete, and old ones are deleted only after that: a crash during a save
leaves the previous checkpoint as it was. Everything is loaded back with `torch.load(weights_only=True)`,
which cannot run code.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmkit.config import TrainConfig
from llmkit.data import Collator, EpochSampler, ExampleSet
from llmkit.errors import UsageError
from llmkit.metrics import BEST_METRIC, evaluate_model

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"


@dataclass
class TrainState:
    """Where a run is; saved in every checkpoint and restored by --resume."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed (per process)
    best: float | None = None  # best eval metric so far (BEST_METRIC[task])
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the best one
    last_eval_step: int | None = None
    tokens: int = 0  # training tokens seen (all processes)
    samples: int = 0
    train_seconds: float = 0.0
    stopped_early: bool = False


@dataclass
class TrainJob:
    model: Any  # what the optimizer trains (a peft model for LoRA)
    train_set: ExampleSet
    eval_set: ExampleSet | None
    collate: Collator
    task: str  # "causal-lm" or "seq-cls": which eval metrics
    cfg: TrainConfig
    out: Path
    num_labels: int = 2
    loss_fn: Callable[[Any, dict[str, Any]], Any] | None = None  # default: the model's own loss
    log_extra: Callable[[], dict[str, Any]] | None = None  # more values to log (e.g. distillation's loss parts)
    quiet: bool = False
    resume: bool = False


@dataclass
class TrainResult:
    state: TrainState
    total_steps: int
    eval_metrics: dict[str, float] = field(default_factory=dict)  # of the model that was kept


def resolve_precision(name: str) -> str:
    """`auto`: bf16 on GPUs that support it, fp16 on other GPUs; on CPU bf16 where the hardware has it, else fp32.

    Weights, optimizer state and evaluation stay fp32 either way; autocast only runs the matmuls in bf16.
    """
    import torch

    if name != "auto":
        if name == "fp16" and not torch.cuda.is_available():
            raise UsageError("--mixed-precision fp16 needs a GPU; use bf16 or no on CPU")
        return name
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "no"


def cpu_has_bf16() -> bool:
    """CPUs with bf16 matrix hardware (Intel AMX, AVX512-BF16): autocast there is faster, not emulated."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def make_accelerator(cfg: TrainConfig) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration

    # Accelerate keeps its settings in a process-wide singleton; a second run from Python (tests, notebooks)
    # may use another precision. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    from llmkit.models import pick_device

    return Accelerator(
        # cpu=True on machines without an accelerator: only then does Accelerate treat torchrun's WORLD_SIZE
        # as a multi-process CPU job (gloo); otherwise every process would train alone on all the data.
        cpu=pick_device() == "cpu",
        gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision=resolve_precision(cfg.mixed_precision),
        dataloader_config=DataLoaderConfiguration(even_batches=True),
    )


def _default_loss(model: Any, batch: dict[str, Any]) -> Any:
    return model(**batch).loss


def fit(job: TrainJob, accelerator: Any) -> TrainResult:
    """Train `job.model`; writes metrics.jsonl and checkpoints under `job.out`; returns the final state."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import get_scheduler

    cfg, main = job.cfg, accelerator.is_main_process
    loss_fn = job.loss_fn or _default_loss
    world = accelerator.num_processes

    sampler = EpochSampler(len(job.train_set), cfg.seed, cfg.batch_size * world,
                           job.train_set.lengths if cfg.group_by_length and job.task == "seq-cls" else None)
    # Its own generator: creating a DataLoader iterator draws a seed, which must not come from the global RNG
    # (dropout's), or a resumed run would draw it at another moment and diverge from an uninterrupted one.
    train_loader = DataLoader(job.train_set, batch_size=cfg.batch_size, sampler=sampler, collate_fn=job.collate,
                              generator=torch.Generator().manual_seed(cfg.seed))
    eval_loader = None
    if job.eval_set is not None:
        eval_loader = DataLoader(job.eval_set, batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                                 collate_fn=job.collate)
    # fused AdamW: one kernel for all parameters instead of a dozen ops each (a 3x faster step on CPU here)
    fused = accelerator.device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(_param_groups(job.model, cfg.weight_decay), lr=cfg.lr, fused=fused)
    model, optimizer, train_loader = accelerator.prepare(job.model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)

    steps_per_epoch = max(1, math.ceil(len(train_loader) / cfg.grad_accum))
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    # The scheduler is stepped by hand once per optimizer step (not prepared): Accelerate would step it once
    # per process, which makes a 2-process schedule differ from a 1-process one.
    scheduler = get_scheduler("constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler, optimizer,
                              num_warmup_steps=int(cfg.warmup_ratio * total), num_training_steps=total)

    state = TrainState()
    ckpt_root = job.out / CHECKPOINTS
    if job.resume:
        latest = latest_checkpoint(ckpt_root)
        if latest is None:
            raise UsageError(f"--resume: no complete checkpoint in {ckpt_root}; run without --resume (and --overwrite) to start over")
        state = load_checkpoint(latest, accelerator, model, optimizer, scheduler)
        if main:
            _truncate_metrics(job.out / METRICS, state.step)
            _say(job, f"resuming from {latest.name} (step {state.step}/{total}, epoch {state.epoch + 1})")

    metric_name, higher_is_better = BEST_METRIC[job.task]
    bar = _progress(job, total, state.step, main)
    window_loss, window_tokens, window_samples, window_start = [], 0, 0, time.perf_counter()
    model.train()

    def log(record: dict[str, Any]) -> None:
        if main:
            with open(job.out / METRICS, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def run_eval() -> dict[str, float]:
        nonlocal window_start
        t0 = time.perf_counter()
        with full_precision(accelerator, model) as fp32_model:
            metrics = evaluate_model(fp32_model, eval_loader, job.task, accelerator, job.num_labels)
        window_start += time.perf_counter() - t0  # eval time does not count against training speed
        state.last_eval_step = state.step
        log({"step": state.step, "epoch": round(state.epoch + state.batch_in_epoch / len(train_loader), 3),
             **{f"eval_{k}": v for k, v in metrics.items()}})
        value = metrics[metric_name]
        better = state.best is None or (value > state.best if higher_is_better else value < state.best)
        if better:
            state.best, state.best_step, state.bad_evals = value, state.step, 0
            save_trainable(accelerator, model, ckpt_root / "best", extra={"step": state.step, **metrics})
        else:
            state.bad_evals += 1
        if bar is not None:
            bar.set_postfix_str(f"eval_{metric_name}={value:.4g}", refresh=False)
        return metrics

    done = state.step >= total
    while not done:
        sampler.set_epoch(state.epoch)
        loader = train_loader
        if state.batch_in_epoch:
            loader = accelerator.skip_first_batches(train_loader, state.batch_in_epoch)
        for batch in loader:
            with accelerator.accumulate(model):
                loss = loss_fn(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state.batch_in_epoch += 1
            window_loss.append(loss.detach())
            window_tokens += int(batch["attention_mask"].sum())
            window_samples += len(batch["input_ids"])
            if not accelerator.sync_gradients:
                continue

            state.step += 1
            if state.step % cfg.log_every == 0 or state.step == total:
                # every process joins these reductions at the same steps, so none waits on another
                extra = job.log_extra() if job.log_extra else {}
                stats = accelerator.reduce(torch.stack([torch.stack(window_loss).float().mean().cpu(),
                                                        torch.tensor(float(window_tokens)), torch.tensor(float(window_samples)),
                                                        *[torch.as_tensor(v, dtype=torch.float32).reshape(()).cpu() for v in extra.values()]]
                                                       ).to(accelerator.device), reduction="sum")
                seconds = time.perf_counter() - window_start
                mean_loss, tokens, samples = float(stats[0]) / world, int(stats[1]), int(stats[2])
                extra = {k: round(float(v) / world, 6) for k, v in zip(extra, stats[3:], strict=True)}
                state.tokens += tokens
                state.samples += samples
                state.train_seconds += seconds
                log({"step": state.step, "epoch": round(state.epoch + state.batch_in_epoch / len(train_loader), 3),
                     "loss": round(mean_loss, 6), **extra, "lr": scheduler.get_last_lr()[0],
                     "tokens_per_s": round(tokens / seconds, 1), "samples_per_s": round(samples / seconds, 2)})
                if bar is not None:
                    bar.set_postfix_str(f"loss={mean_loss:.4f} tok/s={tokens / seconds:,.0f}", refresh=False)
                window_loss, window_tokens, window_samples, window_start = [], 0, 0, time.perf_counter()
            if bar is not None:
                bar.update(1)

            end_of_epoch = state.batch_in_epoch >= len(train_loader)
            if eval_loader is not None and (
                    (cfg.eval_every and state.step % cfg.eval_every == 0) or (not cfg.eval_every and end_of_epoch)):
                run_eval()
                if cfg.early_stopping and state.bad_evals >= cfg.early_stopping:
                    state.stopped_early = True
            done = state.step >= total or state.stopped_early
            if end_of_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            if not done and ((cfg.save_every and state.step % cfg.save_every == 0) or (not cfg.save_every and end_of_epoch)):
                save_checkpoint(accelerator, ckpt_root, state, model, optimizer, scheduler, cfg.keep_checkpoints)
            if done or end_of_epoch:
                break
        else:  # the loader ran out without a sync (cannot happen with accelerate's end-of-data sync)
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0

    if bar is not None:
        bar.close()
    result = TrainResult(state, total)
    if eval_loader is not None:
        if state.last_eval_step != state.step:
            result.eval_metrics = run_eval()
        if state.best_step is not None and state.best_step != state.step:
            best = load_trainable(ckpt_root / "best", accelerator.unwrap_model(model))
            result.eval_metrics = {k: v for k, v in best.items() if k != "step"}
            _say(job, f"kept the best model: step {state.best_step} ({metric_name} {state.best:.4g})")
        elif not result.eval_metrics:
            result.eval_metrics = {k: v for k, v in _read_json(ckpt_root / "best" / "state.json").items() if k != "step"}
    accelerator.wait_for_everyone()
    return result


@contextmanager
def full_precision(accelerator: Any, model: Any) -> Iterator[Any]:
    """The bare model with Accelerate's autocast forward switched off: metrics are those of the fp32 model saved.

    No gradients flow in evaluation, so the DDP wrapper is not needed either.
    """
    inner = accelerator.unwrap_model(model)
    patched, original = inner.__dict__.get("forward"), getattr(inner, "_original_forward", None)
    if patched is not None and original is not None:
        inner.forward = original
    try:
        yield inner
    finally:
        if patched is not None and original is not None:
            inner.forward = patched


def _param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: decaying biases and norm scales hurts and helps nothing."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _progress(job: TrainJob, total: int, initial: int, main: bool) -> Any:
    if job.quiet or not main or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True)


def _say(job: TrainJob, msg: str) -> None:
    if not job.quiet:
        print(msg, file=sys.stderr)


# ------------------------------------------------------------------------------------------ checkpoints


def trainable_tensors(model: Any) -> dict[str, Any]:
    """The parameters being trained (all of them for full fine-tuning, adapters + head for LoRA).

    named_parameters() lists tied weights once (GPT-2's embedding / LM head), which safetensors requires.
    """
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_trainable(accelerator: Any, model: Any, folder: Path, extra: dict[str, Any] | None = None) -> None:
    """Write the trainable weights to `folder`, atomically (temp folder + rename); main process only."""
    from safetensors.torch import save_file

    if accelerator.is_main_process:
        tensors = trainable_tensors(accelerator.unwrap_model(model))
        tmp = folder.with_name(".tmp-" + folder.name)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / "trainable.safetensors"))
        (tmp / "state.json").write_text(json.dumps(extra or {}))
        _replace_dir(tmp, folder)
    accelerator.wait_for_everyone()


def load_trainable(folder: Path, model: Any) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise UsageError(f"checkpoint {folder} does not match the model (unknown weight {missing[0]}); was it made by another run?")
    import torch

    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    return _read_json(folder / "state.json")


def _replace_dir(tmp: Path, folder: Path) -> None:
    """Put `tmp` where `folder` is. The old folder is moved aside first and deleted only afterwards."""
    old = folder.with_name(".old-" + folder.name)
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(accelerator: Any, root: Path, state: TrainState, model: Any, optimizer: Any, scheduler: Any,
                    keep: int) -> Path:
    """Write a complete checkpoint, then rename it into place, then rotate out the oldest."""
    import torch

    final = root / f"step-{state.step:08d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        from safetensors.torch import save_file

        save_file(trainable_tensors(accelerator.unwrap_model(model)), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        (tmp / "state.json").write_text(json.dumps({**asdict(state), "world_size": accelerator.num_processes}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "COMPLETE").write_text("ok\n")
        _fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # atomic: a reader sees no checkpoint or a complete one
        for old in sorted(complete_checkpoints(root))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "COMPLETE").exists() and (p / "state.json").exists())


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(folder: Path, accelerator: Any, model: Any, optimizer: Any, scheduler: Any) -> TrainState:
    import torch

    saved = _read_json(folder / "state.json")
    world = saved.pop("world_size", accelerator.num_processes)
    if world != accelerator.num_processes:
        raise UsageError(f"--resume: {folder.name} was written by {world} processes and this run has "
                         f"{accelerator.num_processes}; resume with the same number of processes")
    load_trainable(folder, accelerator.unwrap_model(model))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=True))
    if accelerator.scaler is not None and (folder / "scaler.pt").exists():
        accelerator.scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
    rng = folder / f"rng-{accelerator.process_index}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=True))
    return TrainState(**saved)


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, forget metrics logged after the checkpoint: they will be logged again."""
    if not path.exists():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
