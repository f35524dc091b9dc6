"""THE training loop: one visible function on Accelerate, shared by `finetune` and `distill`.

    accelerator = make_accelerator(cfg.train)        # llmkit/training/lifecycle.py
    result = fit(TrainJob(model, train_set, eval_set, collate, "causal-lm", cfg.train, out), accelerator)

`fit` reads top to bottom: make the loaders, prepare them with Accelerate, resume, then per micro-batch a
forward/backward under `accelerator.accumulate`, and per optimizer step: log, evaluate, checkpoint. Each phase
is a named helper below it; checkpoints are `llmkit/training/checkpoints.py`'s, evaluation `llmkit/training/evaluation.py`'s.

The same code runs on one CPU, one GPU, or N processes under `torchrun` / `accelerate launch`: Accelerate
shards the batches and averages the gradients, and every process takes the same branches (eval, save,
early stop) because every decision is made on values all processes share.

With `--fsdp` the model is sharded first (llmkit/training/sharding.py: every process holds 1/N of weights, gradients
and optimizer state) and is not wrapped by Accelerate; the loop is the same, and only saving and loading weights
go through sharding.py's collectives.

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

import functools
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit.config import TrainConfig
from llmkit.data.examples import Collator, EpochSampler, ExampleSet
from llmkit.errors import Diverged, Interrupted, UsageError
from llmkit.runfolder import CHECKPOINTS, METRICS
from llmkit.training.checkpoints import Checkpointer, TrainState, max_over_processes
from llmkit.training.chunked_loss import chunked_causal_lm_loss
from llmkit.training.evaluation import BEST_METRIC, eval_loader, evaluate_model, full_precision


@dataclass
class TrainJob:
    model: Any  # what the optimizer trains (a peft model for LoRA)
    train_set: ExampleSet
    eval_set: ExampleSet | None
    collate: Collator
    task: str  # "causal-lm", "seq-cls" or "preference": which eval metrics (evaluation.BEST_METRIC)
    cfg: TrainConfig
    out: Path
    num_labels: int = 2
    loss_fn: Callable[[Any, dict[str, Any]], Any] | None = None  # default: the model's own loss, or the chunked one
    chunked_loss: bool = False  # causal LMs: the LM head + cross-entropy in chunks of tokens (llmkit/training/chunked_loss.py)
    log_extra: Callable[[], dict[str, Any]] | None = None  # more values to log (e.g. distillation's loss parts)
    eval_fn: Callable[[Any, Any, Any], dict[str, float]] | None = None  # (model, loader, accelerator) -> metrics; default: evaluate_model
    quiet: bool = False
    resume: bool = False
    rebuild: Callable[[], Any] | None = None  # a fresh unsharded model of the same kind, to receive --fsdp's gathered weights

    @property
    def streaming(self) -> bool:  # --streaming: each process reads its own part of the data, endlessly
        return getattr(self.train_set, "streaming", False)


@dataclass
class TrainResult:
    state: TrainState
    total_steps: int
    eval_metrics: dict[str, float] = field(default_factory=dict)  # of the model that was kept
    model: Any = None  # the trained model, whole and unwrapped, on the main process (None on the others)
    peak_memory_gb: float | None = None  # the largest process's training peak: GPU memory on GPUs, resident memory on CPU
    compile_seconds: float | None = None  # --compile: the first step's extra time (llmkit/training/speedups.py, set by run.py)


def _default_loss(model: Any, batch: dict[str, Any], chunked: bool = False) -> Any:
    """The model's own loss; for a causal LM with `chunked`, the same loss without tokens x vocabulary logits."""
    return chunked_causal_lm_loss(model, batch) if chunked else model(**batch).loss


def fit(job: TrainJob, accelerator: Any) -> TrainResult:
    """Train `job.model`; writes metrics.jsonl and checkpoints under `job.out`; returns the final state."""
    cfg = job.cfg
    loss_fn = job.loss_fn or functools.partial(_default_loss, chunked=job.chunked_loss)
    model, optimizer, train_loader, evals = prepare(job, accelerator, *make_loaders(job, accelerator.num_processes))
    batches = None if job.streaming else len(train_loader)  # per epoch, per process
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * max(1, math.ceil(batches / cfg.grad_accum))))
    scheduler = make_scheduler(cfg, optimizer, total)
    checkpoints = Checkpointer(job.out / CHECKPOINTS, accelerator, cfg.keep_checkpoints, job.train_set if job.streaming else None)
    state = resume(job, checkpoints, model, optimizer, scheduler, total) if job.resume else TrainState()
    log = StepLog(job, accelerator, state, total, batches)
    stop = _StopSignal()
    model.train()
    with stop.installed():
        while state.step < total and not state.stopped_early:
            for batch in epoch_batches(job, accelerator, train_loader, state):
                counts = _counts(batch)
                with accelerator.accumulate(model):
                    log.losses.append(micro_step(accelerator, model, loss_fn, batch))
                    if accelerator.sync_gradients:
                        bad, stopping = optimizer_step(accelerator, model, optimizer, scheduler, log.losses, cfg, stop.signum)
                    optimizer.zero_grad(set_to_none=True)
                state.batch_in_epoch += 1
                log.count(*counts)
                if not accelerator.sync_gradients:
                    continue
                state.step += 1
                log.step_done(bad, scheduler, checkpoints)  # metrics.jsonl every log_every steps
                end_of_epoch = not job.streaming and state.batch_in_epoch >= batches
                if evals is not None and ((cfg.eval_every and state.step % cfg.eval_every == 0)
                                          or (not cfg.eval_every and end_of_epoch)):
                    evaluate(job, accelerator, model, evals, state, log, checkpoints)
                    if cfg.early_stopping and state.bad_evals >= cfg.early_stopping:
                        state.stopped_early = True
                if end_of_epoch:
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                done = state.step >= total or state.stopped_early
                checkpoint(cfg, checkpoints, state, model, optimizer, scheduler, log, done, end_of_epoch, stopping, total)
                if done or end_of_epoch:
                    break
            else:  # the loader ran out without a sync (cannot happen with accelerate's end-of-data sync)
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    return finish(job, accelerator, model, evals, state, log, checkpoints, total)


# ------------------------------------------------------------------------------------------ the phases


def make_loaders(job: TrainJob, world: int) -> tuple[Any, Any]:
    """(train loader, eval loader or None). Data order is the `EpochSampler`'s: seeded, per epoch, and (by default)
    batches of similar lengths, so padding costs little."""
    import torch
    from torch.utils.data import DataLoader

    cfg = job.cfg
    # Its own generator: creating a DataLoader iterator draws a seed, which must not come from the global RNG
    # (dropout's), or a resumed run would draw it at another moment and diverge from an uninterrupted one.
    generator = torch.Generator().manual_seed(cfg.seed)
    if job.streaming:
        train = DataLoader(job.train_set, batch_size=cfg.batch_size, collate_fn=job.collate, generator=generator)
    else:
        lengths = job.train_set.lengths
        by_length = cfg.group_by_length and len(lengths) and lengths.min() != lengths.max()
        sampler = EpochSampler(len(job.train_set), cfg.seed, cfg.batch_size * world, lengths if by_length else None)
        train = DataLoader(job.train_set, batch_size=cfg.batch_size, sampler=sampler, collate_fn=job.collate, generator=generator)
    evals = None if job.eval_set is None else eval_loader(job.eval_set, job.collate, cfg.eval_batch_size or 2 * cfg.batch_size)
    return train, evals


def prepare(job: TrainJob, accelerator: Any, train_loader: Any, evals: Any) -> tuple[Any, Any, Any, Any]:
    """(model, optimizer, train loader, eval loader) as Accelerate places and wraps them."""
    import torch

    cfg = job.cfg
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(job.model)
    if cfg.fsdp:  # before the optimizer exists: it must hold the shards, not the whole parameters
        from llmkit.training.sharding import shard

        shard(job.model, accelerator.device.type, accelerator.mixed_precision)
    # fused AdamW: one kernel for all parameters instead of a dozen ops each (a 3x faster step on CPU here)
    fused = accelerator.device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(_param_groups(job.model, cfg.weight_decay), lr=cfg.lr, fused=fused)
    # FSDP already averages gradients and places the shards: Accelerate must not wrap it in DDP too. A stream is
    # already this process's share: Accelerate must not deal its batches out again.
    prepared = accelerator.prepare(*([] if cfg.fsdp else [job.model]), optimizer, *([] if job.streaming else [train_loader]))
    prepared = prepared if isinstance(prepared, tuple) else (prepared,)  # one object in, one (not a tuple) out
    model = job.model if cfg.fsdp else prepared[0]
    optimizer = prepared[0 if cfg.fsdp else 1]
    train_loader = train_loader if job.streaming else prepared[-1]
    return model, optimizer, train_loader, None if evals is None else accelerator.prepare(evals)


def make_scheduler(cfg: TrainConfig, optimizer: Any, total: int) -> Any:
    """Stepped by hand once per optimizer step (not prepared): Accelerate would step it once per process, which
    makes a 2-process schedule differ from a 1-process one."""
    from transformers import get_scheduler

    return get_scheduler("constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler, optimizer,
                         num_warmup_steps=int(cfg.warmup_ratio * total), num_training_steps=total)


def resume(job: TrainJob, checkpoints: Checkpointer, model: Any, optimizer: Any, scheduler: Any, total: int) -> TrainState:
    state, latest = checkpoints.resume(model, optimizer, scheduler, job.out / METRICS)
    _say(job, f"resuming from {latest.name} (step {state.step}/{total}, epoch {state.epoch + 1})")
    return state


def epoch_batches(job: TrainJob, accelerator: Any, train_loader: Any, state: TrainState) -> Iterator[dict[str, Any]]:
    """This epoch's micro-batches on the device, from where a resumed run left off."""
    if job.streaming:  # not through Accelerate's loader, which would place it
        for batch in train_loader:
            yield {k: v.to(accelerator.device) for k, v in batch.items()}
        return
    # Through Accelerate's loader: it re-sets the sampler's epoch to its own pass counter at every iter(), and that
    # counter does not advance when the loop leaves a pass at its last batch (as this one does), so setting only
    # the sampler gave every epoch epoch 0's order.
    train_loader.set_epoch(state.epoch)
    yield from (accelerator.skip_first_batches(train_loader, state.batch_in_epoch) if state.batch_in_epoch else train_loader)


def _counts(batch: dict[str, Any]) -> tuple[int, int]:
    """(real tokens, examples): packed rows say how many they hold; others count the mask and the rows."""
    n_tokens = int(batch.pop("num_tokens")) if "num_tokens" in batch else int(batch["attention_mask"].sum())
    n_examples = int(batch.pop("num_examples")) if "num_examples" in batch else len(batch["input_ids"])
    return n_tokens, n_examples


def micro_step(accelerator: Any, model: Any, loss_fn: Callable[[Any, dict[str, Any]], Any], batch: dict[str, Any]) -> Any:
    loss = loss_fn(model, batch)
    accelerator.backward(loss)
    return loss.detach()


def optimizer_step(accelerator: Any, model: Any, optimizer: Any, scheduler: Any, losses: list[Any], cfg: TrainConfig,
                   signum: int) -> tuple[bool, int]:
    """Clip, check and step once the gradients are accumulated: (was this step bad?, the stop signal, if any)."""
    # The norm is computed (not clipped) even with clipping off: a non-finite norm is how a bad step is seen on
    # every process alike, since gradients are already averaged across them.
    norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # sharded: a DTensor
    scaler = accelerator.scaler
    bad, stopping = _agree(accelerator, not _finite(losses, None if scaler else norm), signum)
    # fp16's scaler skips overflowing steps itself (and must see them to lower its scale)
    if not bad or scaler is not None:
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:
            scheduler.step()
    return bad, stopping


def evaluate(job: TrainJob, accelerator: Any, model: Any, evals: Any, state: TrainState, log: StepLog,
             checkpoints: Checkpointer) -> dict[str, float]:
    """Evaluate the fp32 model on every process's share; keep its weights when it is the best so far."""
    t0 = time.perf_counter()
    with full_precision(accelerator, model) as fp32_model:
        metrics = (job.eval_fn(fp32_model, evals, accelerator) if job.eval_fn
                   else evaluate_model(fp32_model, evals, job.task, accelerator, job.num_labels))
    log.pause(time.perf_counter() - t0)  # eval time does not count against training speed
    state.last_eval_step = state.step
    log.append({"step": state.step, "epoch": log.epoch(), **{f"eval_{k}": v for k, v in metrics.items()}})
    name, higher_is_better = BEST_METRIC[job.task]
    value = metrics[name]
    if state.best is None or (value > state.best if higher_is_better else value < state.best):
        state.best, state.best_step, state.bad_evals = value, state.step, 0
        checkpoints.save_best(model, state, metrics)
    else:
        state.bad_evals += 1
    log.postfix(f"eval_{name}={value:.4g}")
    return metrics


def checkpoint(cfg: TrainConfig, checkpoints: Checkpointer, state: TrainState, model: Any, optimizer: Any, scheduler: Any,
               log: StepLog, done: bool, end_of_epoch: bool, stopping: int, total: int) -> None:
    """Save when due; on Ctrl-C / SIGTERM save and stop (Interrupted says how to continue)."""
    saved = None
    # no periodic checkpoint inside a run of bad steps: the one before it is the one to go back to
    if not done and not log.bad_in_a_row and ((cfg.save_every and state.step % cfg.save_every == 0)
                                              or (not cfg.save_every and end_of_epoch)):
        saved = checkpoints.save(state, model, optimizer, scheduler)
    if stopping and not done:
        saved = saved or checkpoints.save(state, model, optimizer, scheduler)
        log.close()
        raise Interrupted(f"stopped by {signal.Signals(stopping).name} after step {state.step}/{total}; checkpoint {saved} written. "
                          "Continue with the same command plus --resume", stopping)


def finish(job: TrainJob, accelerator: Any, model: Any, evals: Any, state: TrainState, log: StepLog,
           checkpoints: Checkpointer, total: int) -> TrainResult:
    """Report speed and memory, evaluate the last step if it was not, keep the best model, gather it whole."""
    log.close()
    result = TrainResult(state, total)
    if state.train_seconds:
        import torch

        from llmkit.machine import peak_memory_gb

        precision = "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision
        result.peak_memory_gb = round(max_over_processes(accelerator, [peak_memory_gb(accelerator.device)])[0], 3)
        processes = accelerator.num_processes
        _say(job, f"trained {state.step} steps in {state.train_seconds:.1f} s: {state.tokens / state.train_seconds:,.0f} tokens/s, "
                  f"{state.samples / state.train_seconds:.2f} samples/s, peak memory {result.peak_memory_gb:.2f} GB per process "
                  f"({precision}, {torch.get_num_threads()} threads, {processes} process{'es' if processes > 1 else ''}"
                  f"{', sharded' if job.cfg.fsdp else ''})")
    if evals is not None:
        if state.last_eval_step != state.step:
            result.eval_metrics = evaluate(job, accelerator, model, evals, state, log, checkpoints)
        result.eval_metrics, loaded = checkpoints.best_metrics(state, model, result.eval_metrics)
        if loaded:
            _say(job, f"kept the best model: step {state.best_step} ({BEST_METRIC[job.task][0]} {state.best:.4g})")
    result.model = whole_model(job, accelerator, model)
    accelerator.wait_for_everyone()
    return result


# ------------------------------------------------------------------------------------------ logging


class StepLog:
    """metrics.jsonl (and --report-to's trackers), the progress bar, and the window of steps since the last log line."""

    def __init__(self, job: TrainJob, accelerator: Any, state: TrainState, total: int, batches: int | None) -> None:
        from llmkit.machine import reset_peak_memory, return_freed_memory
        from llmkit.progress import bar

        self.job, self.accelerator, self.state, self.total, self.batches = job, accelerator, state, total, batches
        self.main = accelerator.is_main_process
        if accelerator.device.type == "cpu":
            return_freed_memory()
        reset_peak_memory(accelerator.device)  # the training peak, not loading's
        self.bar = bar(total, "training", "step", enabled=not job.quiet and self.main, initial=state.step)
        self.losses: list[Any] = []  # this optimizer step's micro-batch losses
        self.window_loss: list[Any] = []
        self.tokens, self.samples, self.skipped, self.bad_in_a_row = 0, 0, 0, 0
        self.start = time.perf_counter()

    def epoch(self) -> float:
        if self.job.streaming:
            return self.job.train_set.epoch
        return round(self.state.epoch + self.state.batch_in_epoch / self.batches, 3)

    def count(self, tokens: int, examples: int) -> None:
        self.tokens, self.samples = self.tokens + tokens, self.samples + examples

    def pause(self, seconds: float) -> None:
        self.start += seconds

    def step_done(self, bad: bool, scheduler: Any, checkpoints: Checkpointer) -> None:
        """Count a bad (skipped) step, or keep the step's losses (too many bad steps in a row end the run); log when due."""
        cfg, step = self.job.cfg, self.state.step
        if bad:
            self.skipped += 1
            self.bad_in_a_row += 1
            _warn(f"step {step}: the loss or its gradient is NaN/inf; skipped this update "
                  f"({self.bad_in_a_row}/{cfg.max_bad_steps} in a row)", self.main)
            if self.bad_in_a_row >= cfg.max_bad_steps:
                raise Diverged(_divergence_advice(cfg, step, self.accelerator.mixed_precision, checkpoints.latest()))
        else:
            self.window_loss.extend(self.losses)
            self.bad_in_a_row = 0
        self.losses = []
        if step % cfg.log_every == 0 or step == self.total:
            self.write(scheduler.get_last_lr()[0])
        if self.bar is not None:
            self.bar.update(1)

    def write(self, lr: float) -> None:
        """One metrics.jsonl line for the window. Every process joins these reductions at the same steps, so none
        waits on another."""
        import torch

        accelerator, state = self.accelerator, self.state
        extra = self.job.log_extra() if self.job.log_extra else {}
        loss_sum = torch.stack(self.window_loss).float().sum().cpu() if self.window_loss else torch.tensor(0.0)
        values = [loss_sum, torch.tensor(float(len(self.window_loss))), torch.tensor(float(self.tokens)),
                  torch.tensor(float(self.samples)), *[torch.as_tensor(v, dtype=torch.float32).reshape(()).cpu() for v in extra.values()]]
        stats = accelerator.reduce(torch.stack(values).to(accelerator.device), reduction="sum")
        seconds = time.perf_counter() - self.start
        mean_loss = float(stats[0]) / float(stats[1]) if float(stats[1]) else None
        tokens, samples = int(stats[2]), int(stats[3])
        extra = {k: _finite_or_none(float(v) / accelerator.num_processes) for k, v in zip(extra, stats[4:], strict=True)}
        state.tokens += tokens
        state.samples += samples
        state.train_seconds += seconds
        self.append({"step": state.step, "epoch": self.epoch(), "loss": None if mean_loss is None else round(mean_loss, 6), **extra,
                     "lr": lr, "tokens_per_s": round(tokens / seconds, 1), "samples_per_s": round(samples / seconds, 2),
                     **({"skipped_steps": self.skipped} if self.skipped else {})})
        if mean_loss is not None:  # learning from rewards: the reward is what people watch
            self.postfix(f"loss={mean_loss:.4f} tok/s={tokens / seconds:,.0f}" + (f" reward={extra['reward']:.3f}" if extra.get("reward") is not None else ""))
        self.window_loss, self.tokens, self.samples, self.start, self.skipped = [], 0, 0, time.perf_counter(), 0

    def append(self, record: dict[str, Any]) -> None:
        if self.main:
            with open(self.job.out / METRICS, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            self.accelerator.log(record, step=record["step"])  # its numbers to --report-to's trackers (llmkit/training/trackers.py)

    def postfix(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ------------------------------------------------------------------------------------------ helpers


def whole_model(job: TrainJob, accelerator: Any, model: Any) -> Any:
    """The trained model on the main process, ready for save_pretrained: sharded weights are gathered into a
    fresh copy of the model (`job.rebuild`), so what is saved is exactly what an unsharded run saves."""
    from llmkit.training.sharding import full_state, is_sharded

    if not is_sharded(model):
        return accelerator.unwrap_model(model) if accelerator.is_main_process else None
    tensors = full_state(model)  # every process takes part; the main one gets the tensors
    if not accelerator.is_main_process:
        return None
    whole = job.rebuild()
    whole.load_state_dict(tensors)
    return whole


def enable_gradient_checkpointing(model: Any) -> None:
    """transformers' own activation checkpointing, non-reentrant (works with frozen bases, LoRA and FSDP, and
    keeps dropout's random numbers, so the loss and gradients equal those of a run without it)."""
    if not getattr(model, "supports_gradient_checkpointing", True) or not hasattr(model, "gradient_checkpointing_enable"):
        raise UsageError(f"--gradient-checkpointing: {type(model).__name__} does not support it; run without it")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: decaying biases and norm scales hurts and helps nothing."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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
    bad_max, signum_max = max_over_processes(accelerator, [float(bad), float(signum)])
    return bool(bad_max), int(signum_max)


def _finite_or_none(v: float) -> float | None:
    return round(v, 6) if math.isfinite(v) else None  # NaN is not JSON: metrics.jsonl must stay parseable


def _divergence_advice(cfg: TrainConfig, step: int, precision: str, last: Path | None) -> str:
    hints = [f"lower --lr (now {cfg.lr:g})"]
    if precision == "fp16":
        hints.append("use --mixed-precision bf16 or no (fp16 overflows)")
    elif precision == "bf16":
        hints.append("try --mixed-precision no (fp32)")
    if not cfg.max_grad_norm:
        hints.append("turn gradient clipping back on (train.max_grad_norm=1.0)")
    hints.append("check the data for broken rows")
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
