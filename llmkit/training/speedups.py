"""Opt-in speed levers on top of the training loop: `--compile` (torch.compile of each transformer block) and Liger's
Triton kernels on CUDA (`train.liger`).

    clock = compile_blocks(job.model)            # llmkit/training/lifecycle.py, before fit; clock.seconds() afterwards
    if use_liger(cfg, device_type):              # llmkit/finetune.py, on the built model
        apply_liger(model)

`--compile` compiles each block's `forward` (the modules transformers marks as not to be split, as --fsdp shards them),
not the whole model: every block of a model shares one graph (so 30 blocks compile once, not 30 times), the model's
own forward stays eager, so what wraps a block still works unchanged around the compiled one: LoRA layers are inside
the block and compiled with it; gradient checkpointing wraps the block's call and re-runs the compiled forward in
backward; the chunked loss (llmkit/training/chunked_loss.py) hooks the decoder's output and runs the LM head itself, outside.
FSDP and QLoRA are refused in config.validate (FSDP2's per-block hooks and bitsandbytes' 4-bit layers are untested
under compile). The cost is the first step: inductor generates and builds kernels (C++ with gcc on CPU, Triton on
CUDA; cached on disk under /tmp/torchinductor_$USER, so a second run of the same model compiles far faster).

Liger (`pip install 'llmkit[gpu]'`) swaps RMSNorm, RoPE and SwiGLU for its kernels and the model's head + loss for its
fused linear cross-entropy, which never holds tokens x vocabulary logits: on CUDA it replaces llmkit's chunked loss.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

from llmkit.config import TrainConfig
from llmkit.errors import UsageError
from llmkit.training.sharding import blocks


class FirstStepClock:
    """The first training step's extra time over the second: what compiling costs a run.

    A forward pre-hook on the trained model notes when each training forward starts (evaluation's, under no_grad or
    in eval mode, are not counted); step k lasts from the k-th start to the next. Compilation happens in the first
    forward and backward, so (first - second) is the compile time plus the small warm-up an eager run also pays.
    """

    def __init__(self, model: Any) -> None:
        self.starts: list[float] = []
        self.handle = model.register_forward_pre_hook(self._pre)

    def _pre(self, module: Any, args: Any) -> None:
        import torch

        if module.training and torch.is_grad_enabled():
            self.starts.append(time.perf_counter())
            if len(self.starts) >= 3:  # enough: no cost on the rest of the run
                self.handle.remove()

    def seconds(self) -> float | None:
        """None for a run of fewer than 3 forwards (nothing to compare the first step with)."""
        self.handle.remove()
        if len(self.starts) < 3:
            return None
        first, second = self.starts[1] - self.starts[0], self.starts[2] - self.starts[1]
        return round(max(0.0, first - second), 2)


def compile_blocks(model: Any, device_type: str) -> FirstStepClock:
    """torch.compile every transformer block's forward in place; returns the clock that measures the compile time."""
    import torch

    check_compiler(device_type)
    units = blocks(model)
    if not units:
        raise UsageError(f"--compile: found no transformer blocks in this {type(model).__name__} (its class names none in "
                         "_no_split_modules); run without --compile")
    for unit in units:
        # the bound forward, not the module's __call__: hooks (checkpointing's, peft's, Accelerate's) stay eager
        unit.forward = torch.compile(unit.forward)
    return FirstStepClock(model)


def check_compiler(device_type: str) -> None:
    """Inductor builds CPU kernels with the C++ compiler; without one the first step would fail deep inside torch."""
    if device_type != "cpu":
        return
    cxx = os.environ.get("CXX") or "g++"
    if not (shutil.which(cxx) or shutil.which("clang++")):
        raise UsageError(f"--compile on CPU needs a C++ compiler ({cxx} or clang++; e.g. apt-get install g++); run without --compile")


def use_liger(cfg: TrainConfig, task: str, method: str, device_type: str, model: Any, why_not: list[str] | None = None) -> bool:
    """Whether to apply Liger (`train.liger`): `auto` = where it can run (CUDA, installed, a causal LM of a family it
    knows, without --compile, --fsdp or qlora); `true` where it cannot is a UsageError saying why. `why_not` collects
    auto's reason for staying off."""
    setting = str(cfg.liger).lower()
    if setting == "false":
        return False
    reason = liger_blocker(cfg, task, method, device_type, model)
    if reason and setting == "true":
        raise UsageError(f"train.liger=true: {reason}; use train.liger=auto or false")
    if reason and why_not is not None:
        why_not.append(reason)
    return reason is None


def liger_blocker(cfg: TrainConfig, task: str, method: str, device_type: str, model: Any) -> str | None:
    """Why Liger cannot (or, with `auto`, should not) run on this model here, or None."""
    if task != "causal-lm":
        return f"Liger's kernels are for causal LMs, not --task {task}"
    if device_type != "cuda":
        return f"Liger's kernels are Triton kernels for CUDA GPUs; this run is on {device_type}"
    # untested together: Liger's fused loss reads the whole LM head (FSDP shards it), 4-bit bases, compiled blocks
    for on, what in ((cfg.compile, "--compile is on"), (cfg.fsdp, "--fsdp is on"), (method == "qlora", "--method qlora")):
        if on:
            return what
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return "liger-kernel is not installed (pip install 'llmkit[gpu]')"
    model_type = getattr(_base(model).config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"Liger has no kernels for model type {model_type!r}"
    return None


def apply_liger(model: Any) -> None:
    """Patch this model instance (the base under peft's LoRA) with Liger's kernels, its fused linear cross-entropy
    included: in training with labels, `model(**batch).loss` then never materializes the logits."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=_base(model), fused_linear_cross_entropy=True, cross_entropy=False)


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
