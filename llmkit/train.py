"""THE training loop: one visible function on Accelerate, shared by `finetune` and `distill`.

    accelerator = make_accelerator(cfg.train)
    result = fit(TrainJob(model, train_set, eval_set, collate, "causal-lm", cfg.train, out), accelerator)

The same code runs on one CPU, one GPU, or N processes under `torchrun` / `accelerate launch`: Accelerate
shards the batches and averages the gradients, and every process takes the same branches (eval, save,
early stop) because every decision is made on values all processes share.

With `--fsdp` the model is sharded first (llmkit/sharding.py: every process holds 1/N of weights, gradients
and optimizer state) and is not wrapped by Accelerate; the loop is the same, and only saving and loading weights
go through sharding.py's collectives.

Checkpoints (`OUT/checkpoints/step-00000120/`) hold the trainable weights (safetensors), optimizer and
scheduler state, every process's RNG state and the data position. They are written to a temporary folder
and renamed into place only when complete, and old ones are deleted only after that: a crash during a save
leaves the previous checkpoint as it was. Everything is loaded back with `torch.load(weights_only=True)`,
which cannot run code.

What can go wrong while training, and what happens (llmkit/errors.py lists the exit codes):
- Ctrl-C / SIGTERM: the current optimizer step finishes, a checkpoint is written, the process exits with
  130 / 143; `--resume` continues exactly where it stopped. A second Ctrl-C stops at once.
- A NaN/inf loss or gradient: that update is skipped (weights and optimizer state untouched); after
  `train.max_bad_steps` such steps in a row the run stops with advice (exit 4). Nothing non-finite is saved.
- A full disk while saving: the half-written checkpoint is removed and the run stops (exit 74); the older
  checkpoints are untouched, because rotation only runs after a new checkpoint is complete.
- A SIGKILL or power loss: `--resume` picks the newest complete checkpoint and warns about partial ones.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmkit.config import TrainConfig
from llmkit.data import Collator, EpochSampler, ExampleSet
from llmkit.errors import DiskError, Diverged, Interrupted, UsageError
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
    rebuild: Callable[[], Any] | None = None  # a fresh unsharded model of the same kind, to receive --fsdp's gathered weights


@dataclass
class TrainResult:
    state: TrainState
    total_steps: int
    eval_metrics: dict[str, float] = field(default_factory=dict)  # of the model that was kept
    model: Any = None  # the trained model, whole and unwrapped, on the main process (None on the others)
    peak_memory_gb: float | None = None  # the largest process's training peak: GPU memory on GPUs, resident memory on CPU


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
    from llmkit.machine import cpu_has_amx

    return "bf16" if cpu_has_amx() else "no"


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

    streaming = getattr(job.train_set, "streaming", False)  # --streaming: each process reads its own part, endlessly
    # Its own generator: creating a DataLoader iterator draws a seed, which must not come from the global RNG
    # (dropout's), or a resumed run would draw it at another moment and diverge from an uninterrupted one.
    generator = torch.Generator().manual_seed(cfg.seed)
    if streaming:
        train_loader = DataLoader(job.train_set, batch_size=cfg.batch_size, collate_fn=job.collate, generator=generator)
    else:
        lengths = job.train_set.lengths
        sampler = EpochSampler(len(job.train_set), cfg.seed, cfg.batch_size * world,
                               lengths if cfg.group_by_length and len(lengths) and lengths.min() != lengths.max() else None)
        train_loader = DataLoader(job.train_set, batch_size=cfg.batch_size, sampler=sampler, collate_fn=job.collate,
                                  generator=generator)
    eval_loader = None
    if job.eval_set is not None:
        eval_loader = DataLoader(job.eval_set, batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                                 collate_fn=job.collate)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(job.model)
    if cfg.fsdp:  # before the optimizer exists: it must hold the shards, not the whole parameters
        from llmkit.sharding import shard

        shard(job.model, accelerator.device.type, accelerator.mixed_precision)
    # fused AdamW: one kernel for all parameters instead of a dozen ops each (a 3x faster step on CPU here)
    fused = accelerator.device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(_param_groups(job.model, cfg.weight_decay), lr=cfg.lr, fused=fused)
    # FSDP already averages gradients and places the shards: Accelerate must not wrap it in DDP too. A stream is
    # already this process's share: Accelerate must not deal its batches out again.
    prepared = accelerator.prepare(*([] if cfg.fsdp else [job.model]), optimizer, *([] if streaming else [train_loader]))
    prepared = prepared if isinstance(prepared, tuple) else (prepared,)  # one object in, one (not a tuple) out
    model = job.model if cfg.fsdp else prepared[0]
    optimizer = prepared[0 if cfg.fsdp else 1]
    if not streaming:
        train_loader = prepared[-1]
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)

    batches = None if streaming else len(train_loader)  # per epoch, per process
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * max(1, math.ceil(batches / cfg.grad_accum))))
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
        _check_same_world(latest, accelerator.num_processes)  # refused before anything in the folder changes
        if main:
            for partial in partial_checkpoints(ckpt_root):
                _warn(f"ignoring the incomplete checkpoint {partial} (its save was interrupted); resuming from {latest.name}")
                shutil.rmtree(partial, ignore_errors=True)
        state = load_checkpoint(latest, accelerator, model, optimizer, scheduler, job.train_set if streaming else None)
        if main:
            _truncate_metrics(job.out / METRICS, state.step)
            _say(job, f"resuming from {latest.name} (step {state.step}/{total}, epoch {state.epoch + 1})")

    metric_name, higher_is_better = BEST_METRIC[job.task]
    if accelerator.device.type == "cpu":
        from llmkit.machine import return_freed_memory

        return_freed_memory()
    reset_peak_memory(accelerator.device)
    bar = _progress(job, total, state.step, main)
    window_loss: list[Any] = []
    window_tokens, window_samples, window_start = 0, 0, time.perf_counter()
    model.train()

    def epoch_now() -> float:
        return job.train_set.epoch if streaming else round(state.epoch + state.batch_in_epoch / batches, 3)

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
        log({"step": state.step, "epoch": epoch_now(), **{f"eval_{k}": v for k, v in metrics.items()}})
        value = metrics[metric_name]
        better = state.best is None or (value > state.best if higher_is_better else value < state.best)
        if better:
            state.best, state.best_step, state.bad_evals = value, state.step, 0
            save_trainable(accelerator, model, best_folder(ckpt_root, state.step), extra={"step": state.step, **metrics})
            if main:
                prune_best(ckpt_root, state.best_step)
        else:
            state.bad_evals += 1
        if bar is not None:
            bar.set_postfix_str(f"eval_{metric_name}={value:.4g}", refresh=False)
        return metrics

    stop = _StopSignal()
    stream = job.train_set if streaming else None
    scaler = accelerator.scaler
    step_losses: list[Any] = []  # this optimizer step's micro-batch losses
    window_skipped, bad_in_a_row = 0, 0
    done = state.step >= total
    with stop.installed():
        while not done:
            # Through Accelerate's loader: it re-sets the sampler's epoch to its own pass counter at every iter(),
            # and that counter does not advance when the loop leaves a pass at its last batch (as this one does),
            # so setting only the sampler gave every epoch epoch 0's order.
            loader = train_loader
            if not streaming:
                train_loader.set_epoch(state.epoch)
                if state.batch_in_epoch:
                    loader = accelerator.skip_first_batches(train_loader, state.batch_in_epoch)
            for batch in loader:
                if streaming:  # not through Accelerate's loader, which would place it
                    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                # packed rows say how many real tokens / conversations they hold; others count rows and the mask
                n_tokens = int(batch.pop("num_tokens")) if "num_tokens" in batch else int(batch["attention_mask"].sum())
                n_examples = int(batch.pop("num_examples")) if "num_examples" in batch else len(batch["input_ids"])
                with accelerator.accumulate(model):
                    loss = loss_fn(model, batch)
                    accelerator.backward(loss)
                    step_losses.append(loss.detach())
                    if accelerator.sync_gradients:
                        # The norm is computed (not clipped) even with clipping off: a non-finite norm is how a bad
                        # step is seen on every process alike, since gradients are already averaged across them.
                        norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
                        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # sharded: a DTensor
                        bad, stopping = _agree(accelerator, not _finite(step_losses, None if scaler else norm), stop.signum)
                        # fp16's scaler skips overflowing steps itself (and must see them to lower its scale)
                        if not bad or scaler is not None:
                            optimizer.step()
                            if not accelerator.optimizer_step_was_skipped:
                                scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                state.batch_in_epoch += 1
                window_tokens += n_tokens
                window_samples += n_examples
                if not accelerator.sync_gradients:
                    continue

                state.step += 1
                if bad:
                    window_skipped += 1
                    bad_in_a_row += 1
                    _warn(f"step {state.step}: the loss or its gradient is NaN/inf; skipped this update "
                          f"({bad_in_a_row}/{cfg.max_bad_steps} in a row)", main)
                    if bad_in_a_row >= cfg.max_bad_steps:
                        raise Diverged(_divergence_advice(cfg, state.step, accelerator.mixed_precision, ckpt_root))
                else:
                    window_loss.extend(step_losses)
                    bad_in_a_row = 0
                step_losses = []
                if state.step % cfg.log_every == 0 or state.step == total:
                    # every process joins these reductions at the same steps, so none waits on another
                    extra = job.log_extra() if job.log_extra else {}
                    loss_sum = torch.stack(window_loss).float().sum().cpu() if window_loss else torch.tensor(0.0)
                    stats = accelerator.reduce(torch.stack([loss_sum, torch.tensor(float(len(window_loss))),
                                                            torch.tensor(float(window_tokens)), torch.tensor(float(window_samples)),
                                                            *[torch.as_tensor(v, dtype=torch.float32).reshape(()).cpu() for v in extra.values()]]
                                                           ).to(accelerator.device), reduction="sum")
                    seconds = time.perf_counter() - window_start
                    mean_loss = float(stats[0]) / float(stats[1]) if float(stats[1]) else None
                    tokens, samples = int(stats[2]), int(stats[3])
                    extra = {k: _finite_or_none(float(v) / world) for k, v in zip(extra, stats[4:], strict=True)}
                    state.tokens += tokens
                    state.samples += samples
                    state.train_seconds += seconds
                    log({"step": state.step, "epoch": epoch_now(),
                         "loss": None if mean_loss is None else round(mean_loss, 6), **extra, "lr": scheduler.get_last_lr()[0],
                         "tokens_per_s": round(tokens / seconds, 1), "samples_per_s": round(samples / seconds, 2),
                         **({"skipped_steps": window_skipped} if window_skipped else {})})
                    if bar is not None and mean_loss is not None:
                        bar.set_postfix_str(f"loss={mean_loss:.4f} tok/s={tokens / seconds:,.0f}", refresh=False)
                    window_loss, window_tokens, window_samples, window_start, window_skipped = [], 0, 0, time.perf_counter(), 0
                if bar is not None:
                    bar.update(1)

                end_of_epoch = not streaming and state.batch_in_epoch >= batches
                if eval_loader is not None and (
                        (cfg.eval_every and state.step % cfg.eval_every == 0) or (not cfg.eval_every and end_of_epoch)):
                    run_eval()
                    if cfg.early_stopping and state.bad_evals >= cfg.early_stopping:
                        state.stopped_early = True
                done = state.step >= total or state.stopped_early
                if end_of_epoch:
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                saved = None
                # no periodic checkpoint inside a run of bad steps: the one before it is the one to go back to
                if not done and not bad_in_a_row and (
                        (cfg.save_every and state.step % cfg.save_every == 0) or (not cfg.save_every and end_of_epoch)):
                    saved = save_checkpoint(accelerator, ckpt_root, state, model, optimizer, scheduler, cfg.keep_checkpoints, stream)
                if stopping and not done:
                    saved = saved or save_checkpoint(accelerator, ckpt_root, state, model, optimizer, scheduler, cfg.keep_checkpoints, stream)
                    if bar is not None:
                        bar.close()
                    name = signal.Signals(stopping).name
                    raise Interrupted(f"stopped by {name} after step {state.step}/{total}; checkpoint {saved} written. "
                                      "Continue with the same command plus --resume", stopping)
                if done or end_of_epoch:
                    break
            else:  # the loader ran out without a sync (cannot happen with accelerate's end-of-data sync)
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0

    if bar is not None:
        bar.close()
    result = TrainResult(state, total)
    if state.train_seconds:
        import torch

        precision = "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision
        result.peak_memory_gb = round(_max_over_processes(accelerator, [peak_memory_gb(accelerator.device)])[0], 3)
        _say(job, f"trained {state.step} steps in {state.train_seconds:.1f} s: {state.tokens / state.train_seconds:,.0f} tokens/s, "
                  f"{state.samples / state.train_seconds:.2f} samples/s, peak memory {result.peak_memory_gb:.2f} GB per process "
                  f"({precision}, {torch.get_num_threads()} threads, {accelerator.num_processes} "
                  f"process{'es' if accelerator.num_processes > 1 else ''}{', sharded' if cfg.fsdp else ''})")
    if eval_loader is not None:
        if state.last_eval_step != state.step:
            result.eval_metrics = run_eval()
        best_dir = best_folder(ckpt_root, state.best_step) if state.best_step is not None else None
        if best_dir is not None and state.best_step != state.step:
            best = load_trainable(best_dir, accelerator.unwrap_model(model))  # on every process (sharded: a collective)
            result.eval_metrics = {k: v for k, v in best.items() if k != "step"}
            _say(job, f"kept the best model: step {state.best_step} ({metric_name} {state.best:.4g})")
        elif not result.eval_metrics and best_dir is not None:
            result.eval_metrics = {k: v for k, v in _read_json(best_dir / "state.json").items() if k != "step"}
    result.model = whole_model(job, accelerator, model)
    accelerator.wait_for_everyone()
    return result


def whole_model(job: TrainJob, accelerator: Any, model: Any) -> Any:
    """The trained model on the main process, ready for save_pretrained: sharded weights are gathered into a
    fresh copy of the model (`job.rebuild`), so what is saved is exactly what an unsharded run saves."""
    from llmkit.sharding import full_state, is_sharded

    if not is_sharded(model):
        return accelerator.unwrap_model(model) if accelerator.is_main_process else None
    tensors = full_state(model)  # every process takes part; the main one gets the tensors
    if not accelerator.is_main_process:
        return None
    whole = job.rebuild()
    whole.load_state_dict(tensors)
    return whole


def reset_peak_memory(device: Any) -> None:
    """Start measuring the training peak here: loading a model (a GGUF is de-quantized) can peak higher than training."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM, the peak resident set size
    except OSError:
        pass  # elsewhere the peak counts from the process start


def peak_memory_gb(device: Any) -> float:
    """This process's peak since reset_peak_memory: allocated GPU memory on CUDA, else the resident set size."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) * 1024 / 1e9
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


def enable_gradient_checkpointing(model: Any) -> None:
    """transformers' own activation checkpointing, non-reentrant (works with frozen bases, LoRA and FSDP, and
    keeps dropout's random numbers, so the loss and gradients equal those of a run without it)."""
    if not getattr(model, "supports_gradient_checkpointing", True) or not hasattr(model, "gradient_checkpointing_enable"):
        raise UsageError(f"--gradient-checkpointing: {type(model).__name__} does not support it; run without it")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


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
    from llmkit.progress import bar

    return bar(total, "training", "step", enabled=not job.quiet and main, initial=initial)


class _StopSignal:
    """Ctrl-C / SIGTERM during training set a flag; the loop finishes its step, saves and exits cleanly.

    A second Ctrl-C raises KeyboardInterrupt at once, for when even one more step is too long to wait.
    """

    def __init__(self) -> None:
        self.signum = 0

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step and writing a checkpoint "
              "(Ctrl-C again to stop at once)", file=sys.stderr)

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
            yield
            return
        before = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in before.items():
                signal.signal(s, handler)


def _finite(losses: list[Any], norm: Any) -> bool:
    import torch

    ok = bool(torch.isfinite(torch.stack(losses).float()).all())
    return ok and (norm is None or bool(torch.isfinite(torch.as_tensor(norm)).all()))


def _agree(accelerator: Any, bad: bool, signum: int) -> tuple[bool, int]:
    """(skip this step?, stop after it?) decided the same on every process, or they would go separate ways."""
    bad_max, signum_max = _max_over_processes(accelerator, [float(bad), float(signum)])
    return bool(bad_max), int(signum_max)


def _max_over_processes(accelerator: Any, values: list[float]) -> list[float]:
    if accelerator.num_processes == 1:
        return values
    import torch

    return accelerator.reduce(torch.tensor(values, device=accelerator.device), reduction="max").tolist()


def _finite_or_none(v: float) -> float | None:
    return round(v, 6) if math.isfinite(v) else None  # NaN is not JSON: metrics.jsonl must stay parseable


def _divergence_advice(cfg: TrainConfig, step: int, precision: str, ckpt_root: Path) -> str:
    hints = [f"lower --lr (now {cfg.lr:g})"]
    if precision == "fp16":
        hints.append("use --mixed-precision bf16 or no (fp16 overflows)")
    elif precision == "bf16":
        hints.append("try --mixed-precision no (fp32)")
    if not cfg.max_grad_norm:
        hints.append("turn gradient clipping back on (train.max_grad_norm=1.0)")
    hints.append("check the data for broken rows")
    last = latest_checkpoint(ckpt_root)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
    return (f"training diverged: the loss or its gradient was NaN/inf for {cfg.max_bad_steps} steps in a row "
            f"(up to step {step}); nothing non-finite was saved and {kept}. To fix: {'; '.join(hints)}")


def _warn(msg: str, main: bool = True) -> None:
    """Warnings go to stderr even with --quiet: they are about the user's run, not progress chatter."""
    if main:
        print(f"warning: {msg}", file=sys.stderr)


def _say(job: TrainJob, msg: str) -> None:
    if not job.quiet:
        print(msg, file=sys.stderr)


# ------------------------------------------------------------------------------------------ checkpoints


def trainable_tensors(model: Any) -> dict[str, Any]:
    """The parameters being trained (all of them for full fine-tuning, adapters + head for LoRA).

    named_parameters() lists tied weights once (GPT-2's embedding / LM head), which safetensors requires.
    """
    tensors = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
    _check_finite(tensors)
    return tensors


def _check_finite(tensors: dict[str, Any]) -> None:
    import torch

    bad = next((n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:  # never write a checkpoint or model that would poison whatever loads it
        raise Diverged(f"weight {bad} is NaN/inf; nothing was saved. Lower --lr or use --mixed-precision no")


def gather_trainable(accelerator: Any, model: Any) -> dict[str, Any]:
    """trainable_tensors on the main process ({} on the others); sharded weights are gathered first (a collective)."""
    from llmkit.sharding import full_state, is_sharded

    inner = accelerator.unwrap_model(model)
    if is_sharded(inner):
        names = {n for n, p in inner.named_parameters() if p.requires_grad}
        whole = full_state(inner, names)
        if not accelerator.is_main_process:
            return {}
        _check_finite(whole)
        return whole
    return trainable_tensors(inner) if accelerator.is_main_process else {}


def save_trainable(accelerator: Any, model: Any, folder: Path, extra: dict[str, Any] | None = None) -> None:
    """Write the trainable weights to `folder`, atomically (temp folder + rename); main process only."""
    from safetensors.torch import save_file

    tmp = folder.with_name(".tmp-" + folder.name)
    error = None
    tensors = gather_trainable(accelerator, model)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            save_file(tensors, str(tmp / "trainable.safetensors"))
            (tmp / "state.json").write_text(json.dumps(extra or {}))
            _replace_dir(tmp, folder)
        except Exception as e:
            error = _disk_error_or_raise(e, f"the best model to {folder}")
    _raise_if_any_failed(accelerator, error, tmp, f"the best model to {folder}")


def _disk_error_or_raise(e: Exception, what: str) -> DiskError:
    err = DiskError.classify(e, what)
    if err is None:
        raise e
    return err


def _save_torch(obj: Any, path: Path) -> None:
    """torch.save through a Python file: a full disk then raises OSError(ENOSPC), not a vague RuntimeError."""
    import torch

    with open(path, "wb") as f:
        torch.save(obj, f)


def _raise_if_any_failed(accelerator: Any, error: DiskError | None, tmp: Path, what: str) -> None:
    """A failed write on one process must stop all of them (not leave the others waiting at a barrier forever)."""
    failed = bool(_max_over_processes(accelerator, [float(error is not None)])[0])  # also the barrier
    if failed:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # free what the half-written copy took
        raise error or DiskError(f"another process failed while writing {what}")


def load_trainable(folder: Path, model: Any) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise UsageError(f"checkpoint {folder} does not match the model (unknown weight {missing[0]}); was it made by another run?")
    import torch

    from llmkit.sharding import is_sharded, load_full

    if is_sharded(model):
        load_full(model, tensors)
        return _read_json(folder / "state.json")
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
                    keep: int, stream: Any = None) -> Path:
    """Write a complete checkpoint, then rename it into place, then rotate out the oldest.

    A failure part-way (disk full) removes the half-written folder and raises DiskError; the checkpoints
    already there are not touched, because rotation only runs once the new one is complete.
    """
    final = root / f"step-{state.step:08d}"
    tmp = root / f".tmp-{final.name}"
    what = f"checkpoint {final}"
    error = None
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    from llmkit.sharding import SHARDED_DIR, is_sharded, save_sharded

    sharded = is_sharded(accelerator.unwrap_model(model))
    try:
        _save_torch(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
        if stream is not None:  # --streaming: where this process's stream is (file position, buffer, packer, RNG)
            _save_torch(stream.state_dict(), tmp / f"stream-{accelerator.process_index}.pt")
        if sharded:  # every process writes its own shard of weights and optimizer state
            save_sharded(tmp / SHARDED_DIR, model, optimizer)
        if accelerator.is_main_process:
            from safetensors.torch import save_file

            if not sharded:
                save_file(trainable_tensors(accelerator.unwrap_model(model)), str(tmp / "trainable.safetensors"))
                _save_torch(optimizer.state_dict(), tmp / "optimizer.pt")
            _save_torch(scheduler.state_dict(), tmp / "scheduler.pt")
            if accelerator.scaler is not None:
                _save_torch(accelerator.scaler.state_dict(), tmp / "scaler.pt")
            (tmp / "state.json").write_text(json.dumps({**asdict(state), "world_size": accelerator.num_processes}))
    except Exception as e:
        error = _disk_error_or_raise(e, what)
    _raise_if_any_failed(accelerator, error, tmp, what)
    if accelerator.is_main_process:
        try:
            (tmp / "COMPLETE").write_text("ok\n")
            _fsync_tree(tmp)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _disk_error_or_raise(e, what) from None
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # atomic: a reader sees no checkpoint or a complete one
        for old in sorted(complete_checkpoints(root))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        prune_best(root, state.best_step)
    accelerator.wait_for_everyone()
    return final


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_dir():
            _fsync_tree(f)
            continue
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


def partial_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders a crash left half-written: never loaded, removed on --resume."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (
        p.name.startswith(".tmp-") or (p.name.startswith("step-") and not (p / "COMPLETE").exists())))


def best_folder(root: Path, step: int) -> Path:
    return root / f"best-{step:08d}"


def prune_best(root: Path, best_step: int | None) -> None:
    """Keep the best weights of the run so far and those any remaining checkpoint refers to.

    A resumed run goes back to its checkpoint's idea of the best step; a best saved after that checkpoint
    (by the run that was killed) must not have replaced it.
    """
    keep = {best_step} | {_read_json(c / "state.json").get("best_step") for c in complete_checkpoints(root)}
    for folder in root.glob("best-*"):
        if folder.is_dir() and int(folder.name.split("-")[1]) not in keep:
            shutil.rmtree(folder, ignore_errors=True)


def remove_best(root: Path) -> None:
    """Once the output folder holds the final (best) model, the copies kept during training are redundant."""
    for folder in root.glob("best-*"):
        shutil.rmtree(folder, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _check_same_world(folder: Path, processes: int) -> None:
    """Each process's place in the data (and, with --fsdp, its shard) is saved per process: the count must match."""
    world = _read_json(folder / "state.json").get("world_size", processes)
    if world != processes:
        raise UsageError(f"--resume: {folder.name} was written by {world} processes and this run has {processes}; "
                         "resume with the same number of processes")


def load_checkpoint(folder: Path, accelerator: Any, model: Any, optimizer: Any, scheduler: Any, stream: Any = None) -> TrainState:

    saved = _read_json(folder / "state.json")
    saved.pop("world_size", None)
    from llmkit.sharding import SHARDED_DIR, is_sharded, load_sharded

    if is_sharded(accelerator.unwrap_model(model)) != (folder / SHARDED_DIR).is_dir():
        raise UsageError(f"--resume: {folder.name} was written {'with' if (folder / SHARDED_DIR).is_dir() else 'without'} --fsdp; "
                         "resume with the same setting")
    if (folder / SHARDED_DIR).is_dir():
        load_sharded(folder / SHARDED_DIR, accelerator.unwrap_model(model), optimizer)
    else:
        load_trainable(folder, accelerator.unwrap_model(model))
        optimizer.load_state_dict(_load_torch(folder / "optimizer.pt"))
    scheduler.load_state_dict(_load_torch(folder / "scheduler.pt"))
    if accelerator.scaler is not None and (folder / "scaler.pt").exists():
        accelerator.scaler.load_state_dict(_load_torch(folder / "scaler.pt"))
    rng = folder / f"rng-{accelerator.process_index}.pt"
    if rng.exists():
        _set_rng_state(_load_torch(rng))
    if stream is not None:
        position = folder / f"stream-{accelerator.process_index}.pt"
        if not position.exists():
            raise UsageError(f"--resume --streaming: {folder.name} was written without --streaming; resume with the same setting")
        stream.load_state_dict(_load_torch(position))
    return TrainState(**saved)


def _load_torch(path: Path) -> Any:
    """Tensors, numbers, strings and containers only (`weights_only`): a planted pickle cannot run code."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise UsageError(f"--resume: refusing {path}: it is not a checkpoint file llmkit wrote ({str(e).splitlines()[0][:120]}); "
                         "delete that checkpoint folder to resume from an older one") from None


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
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except (json.JSONDecodeError, AttributeError):  # the half-written last line of a killed run
            continue
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
