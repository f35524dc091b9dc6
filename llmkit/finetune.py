"""Fine-tuning end to end: validate everything, build the data, train with `train.fit`, write the model folder.

    >>> from llmkit.config import load_recipe
    >>> from llmkit.finetune import finetune
    >>> finetune(load_recipe("recipes/minilm-l6-sentiment-lora.yaml", ["out=runs/sentiment"]))

Order matters for "nothing is lost": every check that can fail on user input (flags, model, columns,
labels, lengths, the output folder) runs before the output folder is touched.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from llmkit.chat import ChatEncoder
from llmkit.config import DistillConfig, FinetuneConfig
from llmkit.data import Collator, Labels
from llmkit.errors import UsageError
from llmkit.losses import sparse_causal_lm_loss
from llmkit.models import ALIASES, ModelRef, resolve
from llmkit.prepare import Prepared, prepare_data

# LoRA targets per architecture (model_type). GPT-2's are Conv1D layers; peft adapts them with fan_in_fan_out.
LORA_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt_neox": ["query_key_value"],
}


def set_threads(threads: int) -> None:
    """Physical cores shared among this machine's processes: oversubscribed BLAS threads slow training down."""
    import torch

    from llmkit.generation import physical_cores

    if not threads:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = max(1, physical_cores() // local)
    torch.set_num_threads(threads)


def build_model(cfg: FinetuneConfig, ref: ModelRef, tokenizer: Any, labels: Labels | None, progress: bool,
                grow_vocab: bool = False) -> Any:
    """The model to train: base weights in fp32, a new head for seq-cls, LoRA adapters when asked.

    `grow_vocab`: the chat template added special tokens to the tokenizer; the embeddings grow to match.
    """
    from llmkit.models import architectures, load_seq_cls

    if cfg.task == "seq-cls":
        model = load_seq_cls(ref, progress=progress, num_labels=len(labels.names), id2label=labels.id2label,
                             label2id=labels.label2id, pad_token_id=tokenizer.pad_token_id)
        # decoders (GPT-2, Llama) pool the last non-pad token, so the config must know the pad id
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        archs = architectures(ref)
        if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
            raise UsageError(f"{ref.name} is a {archs[0]}, not a causal LM; --task causal-lm needs one (or use --task seq-cls)")
        import torch
        from transformers import AutoModelForCausalLM

        from llmkit.models import apply_adapter, from_pretrained_checked

        if cfg.method == "qlora":
            model = qlora_base(cfg, ref, tokenizer, progress)
        else:
            source = ref
            if ref.is_gguf and (base_folder(ref) / "config.json").exists():
                # an earlier LoRA run kept this GGUF de-quantized (keep_base): the same fp32 weights, read in a second
                # or two instead of de-quantized again (~15 s for SmolLM2), so a second run starts within seconds
                source = resolve(str(base_folder(ref)))
            model = from_pretrained_checked(AutoModelForCausalLM, source, progress, dtype=torch.float32)
            if ref.adapter is not None:  # continue training a LoRA run: start from base + its adapter, merged
                model = apply_adapter(model, ref, merge=True)
    if grow_vocab and model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)  # new rows start at the mean embedding
    model.config.use_cache = False  # the KV cache is for generation; in training it only costs memory
    if cfg.method in ("lora", "qlora"):
        if cfg.method == "lora" and (ref.is_gguf or ref.adapter is not None):
            keep_base(ref, model, tokenizer)  # so that plain peft can load the adapter (peft_base)
        model = add_lora(model, cfg)
    return model


def qlora_base(cfg: FinetuneConfig, ref: ModelRef, tokenizer: Any, progress: bool) -> Any:
    """The base in 4-bit NF4. bitsandbytes quantizes while loading an HF folder, so a GGUF base (or a LoRA run's
    merged base) is de-quantized into the kept fp32 base folder first (`keep_base`), and loaded from there."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmkit.models import apply_adapter, from_pretrained_checked, source_kwargs
    from llmkit.qlora import load_4bit

    if ref.is_gguf or ref.adapter is not None:
        if not (base_folder(ref) / "config.json").exists():
            fp32 = from_pretrained_checked(AutoModelForCausalLM, ref, progress, dtype=torch.float32)
            keep_base(ref, apply_adapter(fp32, ref, merge=True) if ref.adapter is not None else fp32, tokenizer)
            del fp32
        return load_4bit(base_folder(ref), progress, cfg.train.gradient_checkpointing)
    where, kwargs = source_kwargs(ref)  # safetensors only unless --allow-pickle, as every other load
    return load_4bit(where, progress, cfg.train.gradient_checkpointing, **kwargs)


def add_lora(model: Any, cfg: FinetuneConfig) -> Any:
    from peft import LoraConfig, TaskType, get_peft_model

    mtype = model.config.model_type
    # Causal LMs: every linear layer of attention and MLP, as the QLoRA paper found necessary to match full
    # fine-tuning (TRL, axolotl, unsloth recipes do the same); on SmolLM2 / Shakespeare attention-only ended 2.3
    # perplexity points worse at equal steps. Classifiers keep the attention projections (the head is trained too).
    targets: Any = cfg.lora.target_modules or ("all-linear" if cfg.task == "causal-lm" else LORA_TARGETS.get(mtype)) or "all-linear"
    if targets == ["all-linear"]:
        targets = "all-linear"
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if targets != "all-linear":
        unknown = [t for t in targets if t not in names]
        if unknown:
            raise UsageError(f"--lora-targets: {', '.join(unknown)} not found in this {mtype} model; "
                             f"use layer names such as {', '.join(sorted(LORA_TARGETS.get(mtype, []))) or 'all-linear'}")
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM if cfg.task == "causal-lm" else TaskType.SEQ_CLS,  # SEQ_CLS trains the head too
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=targets,
        fan_in_fan_out=mtype == "gpt2",
    )
    return get_peft_model(model, lora)


def keeps_logits(model: Any) -> bool:
    """Whether the model's forward takes `logits_to_keep` (transformers' causal LMs do; a custom one may not)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(type(base).forward).parameters


def keep_chat_format(chat: ChatEncoder, tokenizer: Any, model: Any) -> None:
    """The saved folder chats exactly as it was trained: same template, and generation stops at the end-of-turn token.

    The template goes into the tokenizer files (transformers, llmkit generate / serve and the GGUF export read it
    there). The token that closed every assistant reply becomes the tokenizer's EOS and joins the model's
    generation stop ids, so plain `model.generate` stops where the model learned to stop.
    """
    tokenizer.chat_template = chat.template
    if len(chat.end_of_turn) == 1:
        (eot,) = chat.end_of_turn
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eot)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        old = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
        stop = sorted({*(i for i in old if i is not None), *chat.end_of_turn})
        gen.eos_token_id = stop[0] if len(stop) == 1 else stop


def finetune(cfg: FinetuneConfig) -> Path:
    """Run a fine-tune described by `cfg`; returns the output folder."""
    from llmkit.outputs import check_out_dir, run_guard

    cfg.validate()
    out = Path(cfg.out).expanduser()
    check_out_dir(out, overwrite=cfg.overwrite, resume=cfg.resume)
    ref = resolve(cfg.model.name, allow_pickle=cfg.model.allow_pickle, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.resume:
        check_resume_matches(out, cfg, ("task", "method", "data.block_size", "data.max_length", "data.packing", "data.format",
                                        "data.chat_template", "data.train_on_prompt", "train.batch_size", "train.grad_accum", "train.seed"))

    from accelerate.utils import set_seed

    from llmkit.machine import summary as machine_summary
    from llmkit.models import load_tokenizer
    from llmkit.train import TrainJob, fit, make_accelerator

    set_threads(cfg.train.threads)
    accelerator = make_accelerator(cfg.train)
    main = accelerator.is_main_process
    progress = not cfg.quiet and main
    tokenizer = load_tokenizer(ref)
    with accelerator.main_process_first():  # the main process prepares (or finds) the data; the others then open it
        data = prepare_data(cfg, tokenizer, main=main)
    if data.added_tokens and cfg.method in ("lora", "qlora"):
        raise UsageError(f"the chat template needs {', '.join(data.added_tokens)}, which {ref.name}'s tokenizer lacks; new token "
                         "embeddings must be trained, so use --method full, or a template made of the model's own tokens")
    set_seed(cfg.train.seed)  # the new head and the LoRA matrices start the same on every process and every run
    model = build_model(cfg, ref, tokenizer, data.labels, progress, grow_vocab=bool(data.added_tokens))

    record = run_record(cfg, ref, data, accelerator)
    if main:
        from llmkit.outputs import start_run

        start_run(out, cfg.overwrite, cfg.resume, record)
    accelerator.wait_for_everyone()
    if not cfg.quiet and main:
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        what = _describe_data(cfg, data)
        print(f"fine-tuning {ref.name} ({cfg.task}, {cfg.method}, {n:,} trainable parameters) on {what}, "
              f"{machine_summary(record['machine'])}", file=sys.stderr)

    # prompt/response and chat rows learn a few tokens each: run the LM head only where a label is
    sparse = data.chat is not None or (cfg.task == "causal-lm" and bool(cfg.data.prompt_column))
    job = TrainJob(model, data.train, data.eval, Collator(tokenizer.pad_token_id, cfg.task == "causal-lm"), cfg.task,
                   cfg.train, out, num_labels=len(data.labels.names) if data.labels else 2, quiet=cfg.quiet or not main,
                   resume=cfg.resume, loss_fn=sparse_causal_lm_loss if sparse and keeps_logits(model) else None,
                   rebuild=lambda: build_model(cfg, ref, tokenizer, data.labels, False, grow_vocab=bool(data.added_tokens)))
    with run_guard(out, resume=cfg.resume, main=main):
        result = fit(job, accelerator)
        if main:
            save_outputs(cfg, ref, result.model, tokenizer, out, record, result, data.chat)
        accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def _describe_data(cfg: FinetuneConfig, data: Prepared) -> str:
    d = cfg.data
    if d.streaming:
        return f"a stream of {d.train} ({'conversations' if data.chat is not None else f'blocks of {d.block_size} tokens'})"
    what = f"{len(data.train)} blocks of {d.block_size} tokens" if cfg.task == "causal-lm" else f"{len(data.train)} examples"
    if data.chat is not None:
        what = f"{data.train.conversations} conversations (assistant turns learned{', all tokens' if d.train_on_prompt else ''})"
    if d.packing:
        what += f", packed into {len(data.train)} rows of up to {d.block_size} tokens"
    return what


def run_record(cfg: FinetuneConfig | DistillConfig, ref: ModelRef, data: Prepared, accelerator: Any) -> dict[str, Any]:
    """llmkit.json: the resolved recipe, with the model reference made absolute so the folder can move, and the
    machine it ran on (CPU and flags, threads, the precision `auto` resolved to)."""
    from llmkit.machine import facts

    record = cfg.to_dict()
    if ref.source == "local":
        record["model" if "model" in record else "teacher"]["name"] = str(ref.adapter or ref.path)
    record["data"]["train"] = _abs(cfg.data.train)
    record["data"]["eval"] = _abs(cfg.data.eval) if cfg.data.eval else None
    record["labels"] = data.labels.names if data.labels else None
    streaming = getattr(data.train, "streaming", False)
    record["examples"] = {"train": None if streaming else len(data.train), "eval": len(data.eval) if data.eval else 0,
                          "train_tokens": None if streaming else data.train.tokens}
    record["prepared_data"] = str(data.folder) if data.folder else None  # llmkit's cache of the tokenized data
    if (data.chat is not None or cfg.data.packing) and not streaming:
        record["examples"]["train_conversations"] = data.train.conversations
    if data.train.dropped or (data.eval and data.eval.dropped):
        record["examples"]["dropped"] = {"train": data.train.dropped, "eval": data.eval.dropped if data.eval else 0}
    record["machine"] = facts(accelerator.device.type, accelerator.mixed_precision, accelerator.num_processes)
    return record


def _abs(spec: str) -> str:
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else spec


def check_resume_matches(out: Path, cfg: Any, keys: tuple[str, ...]) -> None:
    """A resumed run must be the same run: other data or another model would silently mix two trainings."""
    from llmkit.outputs import read_run

    before = read_run(out) or {}
    now = cfg.to_dict()
    for key in keys:
        section, _, name = key.partition(".")
        old = before.get(section, {}).get(name) if name else before.get(section)
        new = now[section][name] if name else now[section]
        if old is not None and old != new:
            raise UsageError(f"--resume: {key} was {old!r} in the run in {out}, now {new!r}; resume with the same settings")


def base_model_id(ref: ModelRef) -> str:
    """The base as the Hub knows it (model card metadata): a Hub id, else an absolute path."""
    if ref.source == "alias":
        return ALIASES[ref.name.lower()].hub_id
    if ref.source == "hub":
        return ref.name
    return str(ref.path.parent if ref.is_gguf else ref.path)


def peft_base(ref: ModelRef) -> str:
    """What the adapter's `base_model_name_or_path` says: a base that plain peft loads on this machine, offline.

    transformers cannot open a GGUF file from a folder name, and a base that was itself a LoRA run exists only
    merged in memory, so those bases are kept once as an HF folder in llmkit's cache (`base_folder`). A Hub
    base stays a Hub id; a bundled or local folder is its absolute path.
    """
    if ref.is_gguf or ref.adapter is not None:
        return str(base_folder(ref))
    return ref.name if ref.source == "hub" else str(ref.path.resolve())


def base_folder(ref: ModelRef) -> Path:
    """`$LLMKIT_CACHE/bases/NAME-KEY`: keyed by the files it comes from, so a changed file gets a new folder."""
    import hashlib

    from llmkit.models import cache_root

    sources = [ref.path] + ([ref.adapter / "adapter_model.safetensors"] if ref.adapter is not None else [])
    facts = [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sources]
    key = hashlib.sha1("|".join(facts).encode()).hexdigest()[:12]
    name = (ref.adapter.name if ref.adapter is not None else ref.path.stem).split(".")[0]
    return cache_root() / "bases" / f"{name}-{key}"


def keep_base(ref: ModelRef, model: Any, tokenizer: Any) -> None:
    """Write the base a LoRA adapter is trained on to `base_folder(ref)` (once; fp32, exactly the trained-on weights)."""
    import shutil

    folder = base_folder(ref)
    if (folder / "config.json").exists():
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")  # torchrun: every process may get here first
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process installed it first
        shutil.rmtree(tmp, ignore_errors=True)


def run_summary(result: Any, metrics: dict[str, float]) -> dict[str, Any]:
    """llmkit.json's "llmkit" section of a finished training run."""
    state = result.state
    return {"status": "done", "steps": state.step, "total_steps": result.total_steps, "epochs": state.epoch,
            "stopped_early": state.stopped_early, "best_step": state.best_step, "train_seconds": round(state.train_seconds, 2),
            "train_tokens_per_s": round(state.tokens / state.train_seconds, 1) if state.train_seconds else None,
            "train_samples_per_s": round(state.samples / state.train_seconds, 2) if state.train_seconds else None,
            "peak_memory_gb": result.peak_memory_gb, "metrics": metrics}


def save_outputs(cfg: FinetuneConfig, ref: ModelRef, model: Any, tokenizer: Any, out: Path, record: dict[str, Any],
                 result: Any, chat: ChatEncoder | None = None) -> None:
    """Write the model folder: weights, tokenizer, llmkit.json, loss.png, README.md (main process only)."""
    import shutil

    if chat is not None:
        keep_chat_format(chat, tokenizer, model)

    from llmkit.outputs import RUN_FILE, command_line, install_files, model_card, plot_losses, write_json

    tmp = out / ".tmp-model"
    shutil.rmtree(tmp, ignore_errors=True)
    adapters = cfg.method in ("lora", "qlora")
    merged = adapters and cfg.lora.merge
    if adapters:
        model.peft_config["default"].base_model_name_or_path = peft_base(ref)
        if merged and cfg.method == "qlora":  # into the fp32 base, loaded afresh, never into the 4-bit weights
            from llmkit.qlora import merge_into_full_precision

            model = merge_into_full_precision(model, build_model(replace(cfg, method="lora"), ref, tokenizer, None, False))
        elif merged:
            model = model.merge_and_unload()  # fp32 weights: merged in full precision
    if adapters and not merged:
        # embeddings are never resized here; "auto" would look the base model up on the Hub to check
        model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
    else:
        model.config.use_cache = True
        model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)

    from llmkit import __version__

    metrics = {f"eval_{k}": v for k, v in result.eval_metrics.items()}
    run = {**record, "llmkit": {**run_summary(result, metrics), "command": command_line(), "version": __version__}}
    plotted = plot_losses(out / "metrics.jsonl", tmp / "loss.png", f"{ref.name} - {cfg.task} {cfg.method}")
    card = model_card(title=out.name, base=base_model_id(ref), task=cfg.task, method=cfg.method, merged=merged,
                      metrics=metrics, steps=result.state.step, command=command_line(), data=cfg.data.train,
                      extra="![loss curves](loss.png)\n" if plotted else "", out=cfg.out,
                      peft_base=peft_base(ref) if adapters else None,
                      num_labels=len(model.config.id2label) if cfg.task == "seq-cls" else None)
    (tmp / "README.md").write_text(card, encoding="utf-8")
    write_json(tmp / RUN_FILE, run)
    for stale in ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "adapter_config.json"):
        (out / stale).unlink(missing_ok=True)  # an --overwrite'd or resumed folder must not mix full and adapter files
    install_files(tmp, out)  # everything was written above; now only renames, llmkit.json ("status: done") last
    from llmkit.train import remove_best

    remove_best(out / "checkpoints")  # the folder's model *is* the best one now
