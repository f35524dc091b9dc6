"""Everything a checkpoint is: writing, rotating, finding and loading them, the best weights, RNG state, fsync.

    OUT/checkpoints/
      step-00000120/     trainable.safetensors (or sharded/ with --fsdp), optimizer.pt, scheduler.pt, scaler.pt,
                         rng-RANK.pt, stream-RANK.pt (--streaming), state.json (TrainState + world size), COMPLETE
      best-00000100/     trainable.safetensors + state.json (the eval metrics of the best model so far)

A checkpoint is written to `.tmp-step-N`, fsynced and renamed into place only when complete, and old ones are
deleted only after that: a crash during a save leaves the previous checkpoint as it was. Everything is loaded
back with `torch.load(weights_only=True)`, which cannot run code. `train.fit` talks to one `Checkpointer`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmkit.atomic import atomic_path, tmp_sibling, write_atomic
from llmkit.errors import DiskError, Diverged, UsageError
from llmkit.runfolder import read_json, read_metrics


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


def cached_tensors(path: Path, accelerator: Any, compute: Any) -> dict[str, Any]:
    """Tensors computed once and kept at `path` (safetensors): the main process computes and writes them atomically
    when absent; the other processes wait, then every process loads them."""
    from safetensors.torch import load_file, save_file

    with accelerator.main_process_first():
        if not path.exists() and accelerator.is_main_process:
            tensors = compute()
            with atomic_path(path, sweep=True) as tmp:
                save_file(tensors, str(tmp))
        return load_file(str(path))


def max_over_processes(accelerator: Any, values: list[float]) -> list[float]:
    if accelerator.num_processes == 1:
        return values
    import torch

    return accelerator.reduce(torch.tensor(values, device=accelerator.device), reduction="max").tolist()


class Checkpointer:
    """One run's checkpoints (torchtune's checkpointer role): what `fit` saves, resumes from and keeps as best."""

    def __init__(self, root: Path, accelerator: Any, keep: int, stream: Any = None) -> None:
        self.root, self.accelerator, self.keep, self.stream = root, accelerator, keep, stream

    def save(self, state: TrainState, model: Any, optimizer: Any, scheduler: Any) -> Path:
        return save_checkpoint(self.accelerator, self.root, state, model, optimizer, scheduler, self.keep, self.stream)

    def resume(self, model: Any, optimizer: Any, scheduler: Any, metrics: Path) -> tuple[TrainState, Path]:
        """Load the newest complete checkpoint into the model, optimizer, scheduler (and stream); forget metrics
        logged after it. Refused, before anything in the folder changes, when there is none or the process count differs."""
        latest = latest_checkpoint(self.root)
        if latest is None:
            raise UsageError(f"--resume: no complete checkpoint in {self.root}; run without --resume (and --overwrite) to start over")
        check_same_world(latest, self.accelerator.num_processes)
        main = self.accelerator.is_main_process
        if main:
            for partial in partial_checkpoints(self.root):
                print(f"warning: ignoring the incomplete checkpoint {partial} (its save was interrupted); resuming from "
                      f"{latest.name}", file=sys.stderr)
                shutil.rmtree(partial, ignore_errors=True)
        state = load_checkpoint(latest, self.accelerator, model, optimizer, scheduler, self.stream)
        if main:
            truncate_metrics(metrics, state.step)
        return state, latest

    def save_best(self, model: Any, state: TrainState, metrics: dict[str, float]) -> None:
        save_trainable(self.accelerator, model, best_folder(self.root, state.step), extra={"step": state.step, **metrics})
        if self.accelerator.is_main_process:
            prune_best(self.root, state.best_step)

    def best_metrics(self, state: TrainState, model: Any, current: dict[str, float]) -> tuple[dict[str, float], bool]:
        """(eval metrics of the model to keep, whether the best weights were loaded back into `model`).

        The best model is the one kept: when it is older than the last step, its weights go back into the model
        (on every process: with --fsdp a collective)."""
        if state.best_step is None:
            return current, False
        best = best_folder(self.root, state.best_step)
        if state.best_step != state.step:
            saved = load_trainable(best, self.accelerator.unwrap_model(model))
            return {k: v for k, v in saved.items() if k != "step"}, True
        if not current:
            return {k: v for k, v in read_json(best / "state.json", strict=False).items() if k != "step"}, False
        return current, False

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)


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
    from llmkit.training.sharding import full_state, is_sharded

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

    what = f"the best model to {folder}"
    error = None
    tensors = gather_trainable(accelerator, model)
    if accelerator.is_main_process:
        try:
            # `.tmp-best-N` (one writer: the main process); the previous folder of that name is deleted only once
            # this one is in place
            with atomic_path(folder, per_process=False) as tmp:
                tmp.mkdir()
                save_file(tensors, str(tmp / "trainable.safetensors"))
                (tmp / "state.json").write_text(json.dumps(extra or {}))
        except Exception as e:
            error = _disk_error_or_raise(e, what)
    _raise_if_any_failed(accelerator, error, what)


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


def _raise_if_any_failed(accelerator: Any, error: DiskError | None, what: str) -> None:
    """A failed write on one process must stop all of them (not leave the others waiting at a barrier forever).
    Raised inside the main process's `atomic_path`, which removes the half-written copy (and frees its space)."""
    failed = bool(max_over_processes(accelerator, [float(error is not None)])[0])  # also the barrier
    if failed:
        raise error or DiskError(f"another process failed while writing {what}")


def load_trainable(folder: Path, model: Any) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise UsageError(f"checkpoint {folder} does not match the model (unknown weight {missing[0]}); was it made by another run?")
    import torch

    from llmkit.training.sharding import is_sharded, load_full

    if is_sharded(model):
        load_full(model, tensors)
        return read_json(folder / "state.json", strict=False)
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    return read_json(folder / "state.json", strict=False)


def save_checkpoint(accelerator: Any, root: Path, state: TrainState, model: Any, optimizer: Any, scheduler: Any,
                    keep: int, stream: Any = None) -> Path:
    """Write a complete checkpoint, then rename it into place, then rotate out the oldest.

    A failure part-way (disk full) removes the half-written folder and raises DiskError; the checkpoints
    already there are not touched, because rotation only runs once the new one is complete.
    """
    final = root / f"step-{state.step:08d}"
    what = f"checkpoint {final}"
    main = accelerator.is_main_process
    # `.tmp-step-N`: one name for every process, each writing its own files into it (rng, stream, FSDP shard);
    # only the main process creates it, renames it into place, or removes it when any process failed
    writing = atomic_path(final, per_process=False) if main else contextlib.nullcontext(tmp_sibling(final, per_process=False))
    with writing as tmp:
        if main:
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        from llmkit.training.sharding import SHARDED_DIR, is_sharded, save_sharded

        sharded = is_sharded(accelerator.unwrap_model(model))
        error = None
        try:
            _save_torch(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
            if stream is not None:  # --streaming: where this process's stream is (file position, buffer, packer, RNG)
                _save_torch(stream.state_dict(), tmp / f"stream-{accelerator.process_index}.pt")
            if sharded:  # every process writes its own shard of weights and optimizer state
                save_sharded(tmp / SHARDED_DIR, model, optimizer)
            if main:
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
        _raise_if_any_failed(accelerator, error, what)
        if main:
            try:
                (tmp / "COMPLETE").write_text("ok\n")
                _fsync_tree(tmp)  # on disk before the rename: a power cut cannot leave a "complete" empty checkpoint
            except Exception as e:
                raise _disk_error_or_raise(e, what) from None
    # the rename happened (atomic: a reader sees no checkpoint or a complete one); only now may old ones go
    if main:
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
    keep = {best_step} | {read_json(c / "state.json", strict=False).get("best_step") for c in complete_checkpoints(root)}
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


def check_same_world(folder: Path, processes: int) -> None:
    """Each process's place in the data (and, with --fsdp, its shard) is saved per process: the count must match."""
    world = read_json(folder / "state.json", strict=False).get("world_size", processes)
    if world != processes:
        raise UsageError(f"--resume: {folder.name} was written by {world} processes and this run has {processes}; "
                         "resume with the same number of processes")


def load_checkpoint(folder: Path, accelerator: Any, model: Any, optimizer: Any, scheduler: Any, stream: Any = None) -> TrainState:

    saved = read_json(folder / "state.json", strict=False)
    saved.pop("world_size", None)
    from llmkit.training.sharding import SHARDED_DIR, is_sharded, load_sharded

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


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, forget metrics logged after the checkpoint: they will be logged again."""
    if not path.exists():
        return
    keep = [json.dumps(row) for row in read_metrics(path.parent) if row.get("step", 0) <= step]
    write_atomic(path, "".join(line + "\n" for line in keep))
