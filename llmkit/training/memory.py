"""`llmkit finetune ... --estimate-memory`: the memory a run needs per process, and what would make it fit.

Like `accelerate estimate-memory`, but for the whole training run rather than the weights alone:

    weights        parameters x bytes (fp32: 4; QLoRA's NF4 base: ~0.53 per quantized weight)
    gradients      trainable parameters x 4
    optimizer      AdamW's two moments: trainable parameters x 8
    activations    what backward needs, per token and block (below), plus the logits over the vocabulary
    allocator      CPU: what glibc's heap keeps of freed short-lived tensors between the live ones (below)
    runtime        the Python / torch / CUDA process itself

FSDP divides weights, gradients and optimizer state by the number of processes, plus the two blocks it holds
whole while computing. The model is built on PyTorch's "meta" device, so nothing is loaded or allocated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from llmkit.config import FinetuneConfig
from llmkit.training.chunked_loss import CHUNK_ELEMENTS
from llmkit.training.grpo import prompts_once

GB = 1e9
RUNTIME_GB = {"cpu": 0.45, "cuda": 0.6}  # measured: a tiny-model run's peak RSS here; a CUDA context and kernels
# On CPU, every step makes and frees GBs of tensors a block at a time; glibc reuses freed heap blocks only for
# requests that fit them and returns none of them to the OS until they reach the heap's top, so the resident peak
# is the live tensors plus these holes. Measured (SmolLM2-135M, 8 x 256, fp32; the holes are the gap to a run
# where glibc maps every block of 1 MB or more separately): 0.12-0.55 of the blocks' activations without
# checkpointing, for full, LoRA, QLoRA and checkpointed runs alike; a third is within 15% of all of them.
# FSDP on CPU maps large blocks separately already (llmkit/training/sharding.py); CUDA's caching allocator is not measured here.
HEAP_HOLES = 1 / 3
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, an 8-bit absmax per 64 weights, an fp32 one per 256 blocks


@dataclass
class Shape:
    """What the estimate needs to know about the model, read from its config and a meta-device copy."""

    params: int  # all parameters (tied weights once)
    quantizable: int  # those in the blocks' linear layers (what QLoRA stores in 4 bits)
    lora_params: int  # adapter parameters the LoRA settings would add (and train), whatever the method
    head_params: int  # a new classification head (trained with LoRA too)
    layers: int
    hidden: int
    intermediate: int
    kv_hidden: int
    vocab: int
    largest_block: int  # parameters of one block: FSDP gathers it whole for its forward and backward
    lora_inputs: int = 0  # per block, the summed input widths of the layers LoRA adapts (each dropout keeps a copy)


@dataclass
class Estimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    allocator: float
    runtime: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.allocator + self.runtime


def model_shape(cfg: FinetuneConfig) -> Shape:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from llmkit.models.load import source_kwargs
    from llmkit.models.lora import add_lora, base_folder
    from llmkit.models.refs import resolve
    from llmkit.training.sharding import blocks

    ref = resolve(cfg.model.name, allow_pickle=cfg.model.allow_pickle, trust_remote_code=cfg.model.trust_remote_code)
    where, kwargs = source_kwargs(ref)
    kwargs.pop("use_safetensors", None)  # a config, not weights
    if ref.is_gguf and (base_folder(ref) / "config.json").exists():  # its config without parsing the whole GGUF (seconds)
        where, kwargs = str(base_folder(ref)), {}
    config = AutoConfig.from_pretrained(where, **kwargs)
    auto = AutoModelForCausalLM if cfg.task == "causal-lm" else AutoModelForSequenceClassification
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=ref.trust_remote_code)
    params = sum(p.numel() for p in model.parameters())
    units = blocks(model)
    quantizable = sum(m.weight.numel() for u in units for m in u.modules() if isinstance(m, torch.nn.Linear))
    with torch.device("meta"):  # what the adapters would add, also for a full run (the options below compare)
        peft_model = add_lora(model, replace(cfg, method="lora"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    lora_params = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    first = blocks(peft_model)[:1]
    lora_inputs = sum(m.in_features for u in first for m in u.modules() if hasattr(m, "lora_A") and hasattr(m, "in_features"))
    head = trainable - lora_params
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return Shape(params=params, quantizable=quantizable, lora_params=lora_params, head_params=head, layers=len(units),
                 hidden=hidden, intermediate=getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden,
                 kv_hidden=hidden * kv_heads // heads, vocab=getattr(config, "vocab_size", 0),
                 largest_block=max((sum(p.numel() for p in u.parameters()) for u in units), default=0), lora_inputs=lora_inputs)


def estimate(shape: Shape, cfg: FinetuneConfig, processes: int, device: str) -> Estimate:
    t = cfg.train
    seq, rows = grpo_rows(cfg)
    tokens = rows * seq
    shared = cfg.objective == "grpo" and prompts_once(processes, t.gradient_checkpointing)
    if shared:  # llmkit.training.grpo.shared_prompt_logps: each prompt once, then the G completions on its repeated cache
        tokens = t.batch_size * (seq - cfg.rl.max_new_tokens) + rows * cfg.rl.max_new_tokens
    act_bytes = 2 if t.mixed_precision == "bf16" or (t.mixed_precision == "auto" and device == "cuda") else 4
    # Per token and block, the tensors autograd keeps (a Llama-style block; GPT-2's is about the same): the block
    # input and two norm outputs, q / k / v and their rotated copies, the attention output and the o_proj input,
    # and four MLP-wide tensors (gate, up, activation, product). Attention itself runs fused (SDPA): no s x s scores.
    per_token_block = (8 * shape.hidden + 4 * shape.kv_hidden + 4 * shape.intermediate) * act_bytes
    if cfg.method != "full" and cfg.lora.dropout > 0:  # peft keeps each adapted layer's dropped-out input and its mask
        per_token_block += shape.lora_inputs * (act_bytes + 1)
    # plus, either way, one block's backward: the gradients of its tensors, as large as they are
    all_blocks = tokens * shape.layers * per_token_block
    if t.gradient_checkpointing:  # only each block's input is kept; one block is recomputed at a time
        blocks_bytes = tokens * (shape.layers * shape.hidden * act_bytes + 2 * per_token_block)
    else:
        blocks_bytes = all_blocks + tokens * per_token_block
    # the heap's holes scale with what a step makes and frees, checkpointed or not: every block's tensors
    holes = HEAP_HOLES * all_blocks if device == "cpu" and not t.fsdp else 0.0
    # causal LM: fp32 logits, their log-softmax and its gradient over the whole vocabulary; a classifier's are tiny.
    # The chunked loss (train.chunked_loss, not under FSDP) holds that for one chunk of tokens, plus the hidden
    # states' gradient it computes in forward.
    logits = 3 * tokens * shape.vocab * 4 if cfg.task == "causal-lm" else 0
    if logits and t.chunked_loss and not t.fsdp:
        logits = 3 * min(tokens * shape.vocab, CHUNK_ELEMENTS) * 4 + tokens * shape.hidden * 4
    if cfg.objective == "grpo":  # the LM head runs at the completion's positions only; the rollouts' KV cache (no grad)
        logits = 3 * rows * (cfg.rl.max_new_tokens + 1) * shape.vocab * 4  # is freed before this forward: the larger counts
        blocks_bytes = max(blocks_bytes, 2 * shape.layers * shape.kv_hidden * tokens * act_bytes)
        if shared:  # the prompts' keys and values repeated G times, kept for attention's backward
            blocks_bytes += 2 * shape.layers * shape.kv_hidden * rows * (seq - cfg.rl.max_new_tokens) * act_bytes
    if cfg.method == "full":
        trainable, weights = shape.params, shape.params * 4
    else:
        trainable = shape.lora_params + shape.head_params
        base = (shape.params - shape.quantizable) * 4 + shape.quantizable * (NF4_BYTES if cfg.method == "qlora" else 4)
        weights = base + trainable * 4
    grads, optim = trainable * 4, trainable * 8
    if t.fsdp and processes > 1:
        gathered = 2 * shape.largest_block * 4  # the block being computed and the next one, prefetched
        weights = weights / processes + gathered
        grads, optim = grads / processes + gathered, optim / processes
    return Estimate(weights / GB, grads / GB, optim / GB, (blocks_bytes + logits) / GB, holes / GB, RUNTIME_GB.get(device, 0.45))


def grpo_rows(cfg: FinetuneConfig) -> tuple[int, int]:
    """(tokens per row, rows per forward): --objective grpo puts batch x G sequences of a prompt (at most
    data.block_size: an upper bound) plus --max-new-tokens through each forward; other objectives their batch."""
    seq = cfg.data.block_size if cfg.task == "causal-lm" else cfg.data.max_length
    if cfg.objective == "grpo":
        return seq + cfg.rl.max_new_tokens, cfg.train.batch_size * cfg.rl.num_generations
    return seq, cfg.train.batch_size


def available_gb(device: str, processes_here: int) -> tuple[float, str]:
    """Memory one process may use: its GPU's, or this machine's RAM shared by the processes on it."""
    if device == "cuda":
        import torch

        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return props.total_memory / GB, f"{props.name} has {props.total_memory / GB:.1f} GB"
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GB
    share = f", shared by {processes_here} processes" if processes_here > 1 else ""
    return total / processes_here, f"this machine has {total:.1f} GB of RAM{share}"


def estimate_run(cfg: FinetuneConfig) -> str:
    """The report `--estimate-memory` prints: the parts, the total against what is there, and options that fit."""
    from llmkit.models.load import pick_device

    # nothing is read or written: an estimate needs no --data or --out
    cfg = replace(cfg, out=cfg.out or "(estimate)", data=replace(cfg.data, train=cfg.data.train or "(estimate)"))
    cfg.validate()
    device = pick_device()
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    here = int(os.environ.get("LOCAL_WORLD_SIZE", str(processes)))
    shape = model_shape(cfg)
    est = estimate(shape, cfg, processes, device)
    have, where = available_gb(device, here)
    seq = grpo_rows(cfg)[0]
    grpo = f" prompts x {cfg.rl.num_generations} completions" if cfg.objective == "grpo" else ""
    what = (f"{cfg.method}{', fsdp' if cfg.train.fsdp else ''}{', gradient checkpointing' if cfg.train.gradient_checkpointing else ''}, "
            f"{processes} process{'es' if processes > 1 else ''}, batch {cfg.train.batch_size}{grpo} x {seq} tokens")
    trainable = shape.params if cfg.method == "full" else shape.lora_params + shape.head_params
    lines = [f"memory estimate per process for {cfg.model.name} ({what}) on {device}:",
             f"  weights          {est.weights:8.2f} GB   {shape.params / 1e6:,.1f}M parameters"
             + (" (blocks' linear layers in 4-bit NF4)" if cfg.method == "qlora" else ""),
             f"  gradients        {est.gradients:8.2f} GB   {trainable / 1e6:,.2f}M trainable parameters x 4 bytes",
             f"  optimizer state  {est.optimizer:8.2f} GB   AdamW: 2 x 4 bytes per trainable parameter",
             f"  activations      {est.activations:8.2f} GB   {shape.layers} blocks"
             + (" (checkpointed)" if cfg.train.gradient_checkpointing else "")
             + ((" + logits, a chunk of tokens at a time" if cfg.train.chunked_loss and not cfg.train.fsdp else " + logits over the vocabulary")
                if cfg.task == "causal-lm" else ""),
             *([f"  allocator        {est.allocator:8.2f} GB   freed tensors' blocks the CPU heap keeps (a third of all blocks' activations)"]
               if est.allocator else []),
             f"  runtime          {est.runtime:8.2f} GB   Python, torch, kernels",
             f"  total            {est.total:8.2f} GB   ({where})"]
    if est.total <= 0.9 * have:
        lines.append("fits.")
        return "\n".join(lines)
    lines.append("does not fit; options (the same global batch and result, except LoRA / QLoRA):")
    options = [("--gradient-checkpointing", replace(cfg.train, gradient_checkpointing=True), cfg.method, processes),
               ("--method lora", cfg.train, "lora", processes), ("--method qlora", cfg.train, "qlora", processes),
               (f"--batch-size {max(1, cfg.train.batch_size // 4)} --grad-accum {4 * cfg.train.grad_accum}",
                replace(cfg.train, batch_size=max(1, cfg.train.batch_size // 4), grad_accum=4 * cfg.train.grad_accum), cfg.method, processes)]
    smaller = replace(cfg.train, batch_size=max(1, cfg.train.batch_size // 4), grad_accum=4 * cfg.train.grad_accum)
    options.append((f"--gradient-checkpointing --batch-size {smaller.batch_size} --grad-accum {smaller.grad_accum}",
                    replace(smaller, gradient_checkpointing=True), cfg.method, processes))
    options += [(f"--fsdp on {n} processes", replace(cfg.train, fsdp=True), cfg.method, n) for n in (2, 4, 8) if cfg.method != "qlora"]
    for flag, train, method, n in options:
        alt = replace(cfg, train=train, method=method)
        total = estimate(shape, alt, n, device).total
        # more CPU processes on this machine share its RAM; more GPUs each bring their own memory
        room = have if n == processes else available_gb(device, n if device == "cpu" else 1)[0]
        lines.append(f"  {flag:<40} {total:8.2f} GB per process {'(fits)' if total <= 0.9 * room else ''}".rstrip())
    return "\n".join(lines)
