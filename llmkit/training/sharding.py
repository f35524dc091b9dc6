"""Fully sharded data parallel training (`--fsdp`) with PyTorch FSDP2, on GPUs and on CPU processes alike.

    torchrun --nproc_per_node 4 -m llmkit finetune --model smollm2-135m --data train.txt --fsdp --out runs/big

Every process holds 1/N of the parameters, gradients and AdamW state: each transformer block is one shard unit
(gathered for its forward and backward, freed after), the embeddings, final norm and head are the root unit.
llmkit applies `fully_shard` itself rather than through Accelerate, whose FSDP plugin is silently ignored on CPU
processes (`Accelerator(cpu=True)` falls back to plain DDP); the training loop in `train.py` stays the same.

Loading once: under torchrun only rank 0 reads the weights (`load_once`: it goes first, de-quantizing a GGUF once for
everyone); the other processes build the same model with its parameters on the meta device (shapes, no bytes) and
receive their shards from rank 0 once the model is sharded (`shard`). So no process but rank 0 ever holds the whole
fp32 model, and rank 0 only until its weights have been sent.

What changes for the loop, all kept here:
- weights are gathered (a collective: every process calls it) to save a model or the best weights;
- checkpoints are sharded with `torch.distributed.checkpoint`: every process writes its own shard file;
- resuming needs the same number of processes (the data position is per process); llmkit refuses others.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmkit.errors import UsageError

SHARDED_DIR = "sharded"  # inside a checkpoint folder: the DCP files of model and optimizer state


def is_sharded(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def blocks(model: Any) -> list[Any]:
    """The transformer blocks: modules whose class transformers marks as not to be split across devices."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def ensure_process_group(device_type: str) -> None:
    """One process (`llmkit finetune --fsdp` without torchrun) is a group of one: FSDP then shards nothing, but the
    same code path runs, e.g. to test a GPU set-up before launching many."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)


@contextlib.contextmanager
def load_once(accelerator: Any, enabled: bool) -> Iterator[None]:
    """Build the model to train inside this: with `enabled` (--fsdp) and several processes, only the main process (rank 0)
    reads the weights; the others build it empty (llmkit.models.meta) and get them in `shard`.

    The main process goes first and the others wait: it de-quantizes a GGUF into the kept folder once (llmkit.models.gguf_base),
    whose config.json the others then read instead of parsing the GGUF file themselves.
    """
    from llmkit.models.meta import building_empty

    if not enabled or accelerator.num_processes == 1:
        yield
        return
    with building_empty(not accelerator.is_main_process), accelerator.main_process_first():
        yield


def shard(model: Any, device_type: str, precision: str) -> None:
    """Apply FSDP2 in place: one unit per transformer block, then the root (embeddings, norm, head).

    bf16 runs use FSDP's own mixed-precision policy (bf16 compute, fp32 gradient reduction and master weights),
    the sharded equivalent of the autocast that unsharded runs use. A model built empty (`load_once`) on some process
    gets rank 0's weights here (a collective: every process calls `shard`).
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if precision == "fp16":
        raise UsageError("--fsdp with --mixed-precision fp16 is not supported (its loss scaler does not see sharded "
                         "gradients); use --mixed-precision bf16 or no")
    units = blocks(model)
    if not units:
        raise UsageError(f"--fsdp: found no transformer blocks to shard in this {type(model).__name__} (its class names none in "
                         "_no_split_modules); run without --fsdp")
    ensure_process_group(device_type)
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device(device_type)
    empty = any(p.is_meta for p in model.parameters())
    from_rank0 = _anyone(empty, device)
    if from_rank0:
        _tie_as_rank0(model, empty)
    _check_same_parameters(model, device)
    if from_rank0 and dist.get_rank() == 0 and empty:
        raise RuntimeError("--fsdp: rank 0 built its model without weights; it is the one that must load them")
    # rank 0's whole weights, kept (not copied: references) past fully_shard, which copies each process's shard out of them
    whole = model.state_dict() if from_rank0 and dist.get_rank() == 0 else {}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()} if empty else {}
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else MixedPrecisionPolicy()
    for unit in units:
        fully_shard(unit, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    if from_rank0:
        _receive(model, whole, buffers if empty else None, device)
        del whole  # rank 0's last reference to its whole weights: only its shard stays
    if device_type == "cpu":
        _return_freed_memory()


def _anyone(flag: bool, device: Any) -> bool:
    """Whether `flag` is true on any process (a collective)."""
    import torch
    import torch.distributed as dist

    if dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _tie_as_rank0(model: Any, empty: bool) -> None:
    """Tie the parameters rank 0 ties, and only those (a collective). Whether transformers ties the LM head to the
    embeddings depends on the checkpoint too (both matrices in it, with different values: not tied, whatever the
    config says), which a process that read no weights cannot know."""
    import torch
    import torch.distributed as dist

    def tied_groups() -> list[list[str]]:
        groups: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        return sorted(g for g in groups.values() if len(g) > 1)

    theirs = [tied_groups() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(theirs, src=0)
    if not empty or tied_groups() == theirs[0]:
        return

    def put(name: str, param: Any) -> None:
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, param)

    for group in tied_groups():  # untie: every name its own (still empty) parameter
        for name in group[1:]:
            p = model.get_parameter(name)
            put(name, torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad))
    for group in theirs[0]:
        for name in group[1:]:
            put(name, model.get_parameter(group[0]))


def _check_same_parameters(model: Any, device: Any) -> None:
    """Every process must hold the same parameters, or the first all-gather of a shard unit fails deep in the process
    group's transport: checked here, in one line (a collective)."""
    import torch
    import torch.distributed as dist

    if dist.get_world_size() == 1:
        return
    params = list(model.parameters())
    count, numel = len(params), sum(p.numel() for p in params)
    t = torch.tensor([count, numel, -count, -numel], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if t[0] != -t[2] or t[1] != -t[3]:
        raise RuntimeError(f"--fsdp: the processes built different models ({count} parameters, {numel:,} values here; between "
                           f"{-int(t[2])} and {int(t[0])} parameters over all processes)")


def _receive(model: Any, whole: dict[str, Any], buffers: dict[str, Any] | None, device: Any) -> None:
    """Rank 0 sends its `whole` weights tensor by tensor; every process keeps its own shard of each (a collective).

    Processes that built the model empty (`buffers` given) first allocate their shards (`to_empty`: this process's 1/N only, never the
    whole model) and put back the buffers they computed at build time (`to_empty` leaves every tensor uninitialized).
    Tied weights (SmolLM2's embeddings and LM head) are one parameter to FSDP and stay one. Finally every process takes
    rank 0's random-number state: building empty draws nothing (LoRA's initial matrices, new embedding rows), and
    dropout must draw on every process as before, when every process built the model the same way.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    if buffers is not None:
        model.to_empty(device=device)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    set_model_state_dict(model, whole, options=_options(full_state_dict=True, broadcast_from_rank0=True))
    rng = torch.get_rng_state().to(device)
    dist.broadcast(rng, src=0)
    torch.set_rng_state(rng.cpu())


def _return_freed_memory() -> None:
    """On CPU, make freed memory go back to the OS, or sharding saves nothing a process is charged for.

    glibc keeps freed blocks for reuse: the whole parameters each process loaded (freed once sharded), and every
    step's activations, which its adaptive threshold soon serves from that kept heap. Measured on SmolLM2-135M with
    2 processes: the resident peak grew step after step to 3.2 GB, against 2.4 GB with blocks over 1 MB mapped
    and unmapped directly (M_MMAP_THRESHOLD). Not glibc: nothing to do.
    """
    from llmkit.machine import return_freed_memory

    return_freed_memory(mmap_threshold=1 << 20)


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def full_state(model: Any, names: set[str] | None = None) -> dict[str, Any]:
    """The whole weights (only `names` if given) as plain CPU tensors on the main process, {} on the others.

    A collective: every process must call it.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    tensors = get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))
    return {k: v for k, v in tensors.items() if names is None or k in names}


def load_full(model: Any, tensors: dict[str, Any]) -> None:
    """Put whole weights (every process passes the same) into the sharded model; a collective."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, tensors, options=_options(full_state_dict=True, strict=False))


def save_sharded(folder: Path, model: Any, optimizer: Any) -> None:
    """Each process writes its shard of the weights and optimizer state into `folder` (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, _inner(optimizer))}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder), sync_files=True))


def load_sharded(folder: Path, model: Any, optimizer: Any) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    inner = _inner(optimizer)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, inner)}
    dcp.load(state, storage_reader=safe_reader(str(folder)))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, inner, state["optim"])


def _inner(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps the torch one


def local_bytes(model: Any, optimizer: Any = None) -> tuple[int, int]:
    """(parameter bytes, optimizer-state bytes) this process holds: its shards when sharded, else everything."""
    import torch

    def size(t: Any) -> int:
        local = t.to_local() if hasattr(t, "to_local") else t
        return local.numel() * local.element_size()

    params = sum(size(p) for p in model.parameters())
    optim = 0
    if optimizer is not None:
        for state in _inner(optimizer).state.values():
            optim += sum(size(v) for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return params, optim


class _SafeUnpickler(pickle.Unpickler):
    """DCP writes its `.metadata` index with pickle; this reads it back allowing only DCP's own classes, torch's
    sizes, dtypes and layouts and paths, so a planted checkpoint cannot run code (shards are read with weights_only)."""

    def find_class(self, module: str, name: str) -> Any:
        import torch

        obj = super().find_class(module, name) if module.startswith(("torch", "pathlib", "collections")) else None
        allowed = (
            (module.startswith("torch.distributed.checkpoint.") and isinstance(obj, type))  # its dataclasses and enums
            or (module == "torch" and (name == "Size" or isinstance(obj, torch.dtype | torch.layout | torch.memory_format)))
            or (module, name) == ("torch.serialization", "_get_layout")
            or (module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"))
            or (module, name) == ("collections", "OrderedDict")
        )
        if not allowed:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}")
        return obj


def _safe_reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self) -> Any:
            path = Path(self.path) / ".metadata"
            try:
                with open(path, "rb") as f:
                    metadata = _SafeUnpickler(f).load()
            except pickle.UnpicklingError as e:
                raise UsageError(f"--resume: refusing {path}: {e}; it is not a checkpoint index llmkit wrote. Delete that "
                                 "checkpoint folder to resume from an older one") from None
            if getattr(metadata, "storage_meta", None) is None:
                from torch.distributed.checkpoint.metadata import StorageMeta

                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


def safe_reader(path: str) -> Any:
    """A DCP FileSystemReader whose index is read with `_SafeUnpickler` (a function: torch is imported lazily)."""
    return _safe_reader_class()(path)
