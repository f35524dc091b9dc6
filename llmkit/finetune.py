"""Fine-tuning: the `Finetune` objective on the shared run lifecycle (llmkit/training/lifecycle.py) and training loop (train.py).

    >>> from llmkit.config import load_recipe
    >>> from llmkit.finetune import finetune
    >>> finetune(load_recipe("recipes/minilm-l6-sentiment-lora.yaml", ["out=runs/sentiment"]))

What is particular to fine-tuning: the model to train (a base with a new head for seq-cls, LoRA adapters, a
4-bit QLoRA base), the loss (the sparse causal-LM loss for prompt/response and chat rows; a preference objective,
llmkit/training/preference.py, for --objective dpo|ipo|simpo|orpo; rewards, llmkit/training/grpo.py, for --objective grpo,
with the rollouts backend made here from llmkit/inference/rollouts.py and handed to training), and what is saved (an adapter or a merged model, with
the chat template it was trained with).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from llmkit.config import FinetuneConfig
from llmkit.data.chat import ChatEncoder
from llmkit.data.examples import Collator, Labels
from llmkit.data.prepare import Prepared
from llmkit.errors import UsageError
from llmkit.models.gguf_base import BASE_CONFIG
from llmkit.models.lora import add_lora, base_folder, keep_base, peft_base
from llmkit.models.refs import ModelRef, base_model_id, cache_folder, resolve, weights_fingerprint
from llmkit.training.chunked_loss import supports_chunked_loss
from llmkit.training.lifecycle import Objective, Run, run
from llmkit.training.loop import TrainJob, TrainResult
from llmkit.training.losses import keeps_logits, sparse_causal_lm_loss
from llmkit.training.outputs import Card


def finetune(cfg: FinetuneConfig) -> Path:
    """Run a fine-tune described by `cfg`; returns the output folder."""
    return run(Finetune(cfg))


class Finetune(Objective):
    resume_keys = ("task", "method", "objective", "preference.beta", "preference.sft_weight",
                   "data.block_size", "data.max_length", "data.packing", "data.format", "data.chat_template",
                   "data.train_on_prompt", "train.batch_size", "train.grad_accum", "train.seed", "rl.num_generations",
                   "rl.max_new_tokens", "rl.rewards", "rl.reward_weights", "rl.steps_per_generation", "rl.loss", "rl.scale_rewards")

    def build(self, run: Run) -> None:
        cfg, data = self.cfg, run.data
        if data.added_tokens and cfg.method in ("lora", "qlora"):
            raise UsageError(f"the chat template needs {', '.join(data.added_tokens)}, which {run.ref.name}'s tokenizer lacks; new "
                             "token embeddings must be trained, so use --method full, or a template made of the model's own tokens")
        if cfg.objective == "grpo":  # every reward and length problem before the model loads and anything is written
            self.rewards = grpo_checks(cfg, run)
        self.model = build_model(cfg, run.ref, run.tokenizer, data.labels, run.progress, grow_vocab=bool(data.added_tokens))
        if cfg.objective == "grpo":
            check_context(cfg, run, self.model)
        self.liger = liger(cfg, run, self.model)
        if cfg.objective != "sft" and cfg.preference.disable_dropout:
            from llmkit.training.preference import disable_dropout

            disable_dropout(self.model)  # step 0: loss ln 2, rewards 0; log-probs comparable with the reference's

    def amend_record(self, record: dict[str, Any]) -> None:
        record["train"]["liger"] = "true" if self.liger else "false"  # what `auto` resolved to

    def job(self, run: Run) -> TrainJob:
        from llmkit.machine import summary as machine_summary

        cfg, data, model = self.cfg, run.data, self.model
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        what = cfg.task if cfg.objective == "sft" else cfg.objective
        run.say(f"fine-tuning {run.ref.name} ({what}, {cfg.method}, {n:,} trainable parameters) on {_describe_data(cfg, data)}, "
                f"{machine_summary(run.record['machine'])}")
        if cfg.objective == "grpo":
            return self.grpo_job(run)
        if cfg.objective != "sft":
            return self.preference_job(run)
        # prompt/response and chat rows learn a few tokens each: run the LM head only where a label is
        sparse = data.chat is not None or (cfg.task == "causal-lm" and bool(cfg.data.prompt_column))
        sparse = sparse and keeps_logits(model)
        # no tokens x vocabulary logits (FSDP shards the head: the model's own loss there)
        # Liger's fused linear cross-entropy does the same inside the model's own loss
        chunked = (not sparse and cfg.task == "causal-lm" and cfg.train.chunked_loss and not cfg.train.fsdp and not self.liger
                   and supports_chunked_loss(model))
        return TrainJob(model, data.train, data.eval, Collator(run.tokenizer.pad_token_id, cfg.task == "causal-lm"), cfg.task,
                        cfg.train, run.out, num_labels=len(data.labels.names) if data.labels else 2, quiet=not run.progress,
                        resume=cfg.resume, loss_fn=sparse_causal_lm_loss if sparse else None, chunked_loss=chunked,
                        rebuild=lambda: build_model(cfg, run.ref, run.tokenizer, data.labels, False, grow_vocab=bool(data.added_tokens)))

    def preference_job(self, run: Run) -> TrainJob:
        """DPO and relatives: pairs in, [chosen; rejected] rows through the model; the reference's log-probs (DPO, IPO)
        for the rows the run draws (llmkit/training/reference.py): with LoRA computed per batch as it is drawn (the
        adapter off), for a full fine-tune before any step with the model as built; cached per row either way."""
        from llmkit.data.examples import IndexedExamples
        from llmkit.training.preference import NEEDS_REFERENCE, PreferenceCollator, PreferenceLoss, WithReference
        from llmkit.training.reference import BatchReference, ReferenceCache, fill, planned_rows, reference_key

        cfg, data, p, model, t, acc = self.cfg, run.data, self.cfg.preference, self.model, self.cfg.train, run.accelerator
        collate = PreferenceCollator(run.tokenizer.pad_token_id)
        sets, reference = [data.train, data.eval], None
        if cfg.objective in NEEDS_REFERENCE:
            if acc.device.type != "cpu" and cfg.method != "qlora" and not t.fsdp:
                model.to(acc.device)  # where training puts it anyway; a 4-bit base is already placed
            lazy = cfg.method in ("lora", "qlora")  # the adapter disabled is the reference at every step
            for i, examples in enumerate(sets):
                if examples is None:
                    continue
                key = reference_key(weights_fingerprint(run.ref), run.ref.name, cfg.method, acc.mixed_precision, examples)
                folder = cache_folder(p.cache_dir, "reference-logps") / key
                rows = planned_rows(len(examples), examples.lengths, t.batch_size, t.grad_accum, t.max_steps, t.seed,
                                    acc.num_processes, t.group_by_length) if i == 0 else list(range(len(examples)))
                later = lazy and i == 0
                with acc.main_process_first():  # the main process fills the cache; the others then read it
                    cache = ReferenceCache(folder, acc.process_index)
                    todo = cache.missing(rows)
                    which = "training" if i == 0 else "eval"
                    run.say(f"reference log-probs of the {which} pairs: {folder}" + (" (found)" if not todo else
                            f" (computing once) for {len(todo)} of the {len(rows)} pairs the run draws"
                            + (", as their batches are drawn (the adapter off)" if later else "")))
                    if acc.is_main_process and not later:
                        fill(model, examples, todo, cache, collate, acc, t.eval_batch_size or 2 * t.batch_size, run.progress)
                if i == 0:
                    reference = BatchReference(model, cache, acc, lazy, len(todo), run.progress)
                    sets[0] = IndexedExamples(examples)
                else:
                    sets[1] = WithReference(examples, cache.tensor(rows))
        loss = PreferenceLoss(cfg.objective, p.beta, p.sft_weight, p.simpo_gamma, model, reference)
        return TrainJob(model, sets[0], sets[1], collate, "preference", cfg.train, run.out, quiet=not run.progress, resume=cfg.resume,
                        loss_fn=loss, log_extra=loss.log_extra, eval_fn=loss.evaluate,
                        rebuild=lambda: build_model(cfg, run.ref, run.tokenizer, None, False, grow_vocab=bool(data.added_tokens)))

    def grpo_job(self, run: Run) -> TrainJob:
        """Learning from rewards: the prompt rows go through the loop; the loss samples, scores and learns
        (llmkit/training/grpo.py). The rollouts backend is made here, where inference may be imported, and injected."""
        from llmkit.data.prompts import PromptCollator
        from llmkit.inference.rollouts import RolloutRequest, open_rollouts
        from llmkit.runfolder import CHECKPOINTS, read_json
        from llmkit.training.checkpoints import latest_checkpoint
        from llmkit.training.grpo import GRPOLoss, prompts_once

        cfg, data, model, acc, r = self.cfg, run.data, self.model, run.accelerator, self.cfg.rl
        if acc.device.type != "cpu" and cfg.method != "qlora":
            model.to(acc.device)  # rollouts run before the loop's first step places it
        stop_ids = sorted(data.chat.end_of_turn) if data.chat is not None and data.chat.end_of_turn else None
        self.rollouts = open_rollouts(r.rollout_backend, model, run.tokenizer, model_ref=cfg.model.name, max_context=context_length(model),
                                      stop_ids=stop_ids)
        start = 0
        latest = latest_checkpoint(run.out / CHECKPOINTS) if cfg.resume else None
        if latest is not None:
            start = int(read_json(latest / "state.json", strict=False).get("step", 0))
        once = prompts_once(acc.num_processes, cfg.train.gradient_checkpointing)
        if acc.device.type == "cpu" and cfg.train.batch_size * r.num_generations > 16 and not once:
            run.say(f"note: {cfg.train.batch_size} prompts x {r.num_generations} completions = {cfg.train.batch_size * r.num_generations} "
                    "sequences go through each forward and backward; if memory runs short, lower --batch-size and raise --grad-accum "
                    "(the same prompts per step)")
        run.say(f"rollouts: {self.rollouts.name}, {r.num_generations} completions of up to {r.max_new_tokens} tokens per prompt; "
                f"rewards: {', '.join(x.name for x in self.rewards)}")
        loss = GRPOLoss(data.train, self.rollouts, self.rewards, r.reward_weights, r, tokenizer=run.tokenizer, request=RolloutRequest,
                        pad_id=run.tokenizer.pad_token_id, seed=cfg.train.seed, grad_accum=cfg.train.grad_accum, out=run.out,
                        start_step=start, process=acc.process_index, main=acc.is_main_process, save_every=cfg.train.save_every,
                        eval_prompts=data.eval)
        return TrainJob(model, data.train, data.eval, PromptCollator(r.num_generations), "grpo", cfg.train, run.out, quiet=not run.progress, resume=cfg.resume,
                        loss_fn=loss, log_extra=loss.log_extra, eval_fn=loss.evaluate if data.eval is not None else None,
                        rebuild=lambda: build_model(cfg, run.ref, run.tokenizer, None, False))

    def save(self, run: Run, result: TrainResult, tmp: Path) -> Card:
        if getattr(self, "rollouts", None) is not None:
            import shutil

            from llmkit.training.grpo import BUFFERS

            self.rollouts.close()
            shutil.rmtree(run.out / BUFFERS, ignore_errors=True)  # rollouts kept for --resume: the run is done
        return save_model(self.cfg, run.ref, result.model, run.tokenizer, tmp, run.data.chat)


def grpo_checks(cfg: FinetuneConfig, run: Run) -> list[Any]:
    """The rewards, loaded (a bad file or function is an error here), and the columns they read, checked on the data."""
    from llmkit.training.rewards import check_columns, load_rewards

    rewards = load_rewards(cfg.rl.rewards, run.tokenizer)
    for prompts, spec in ((run.data.train, cfg.data.train), (run.data.eval, cfg.data.eval or cfg.data.train)):
        if prompts is not None and len(prompts):
            check_columns(rewards, set(prompts.columns(0)), spec)
    return rewards


def context_length(model: Any) -> int:
    c = model.config
    return int(getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 2048)


def check_context(cfg: FinetuneConfig, run: Run, model: Any) -> None:
    """A prompt plus --max-new-tokens must fit the model's context, or the rollouts would run past its positions."""
    limit = context_length(model)
    for prompts in (run.data.train, run.data.eval):
        if prompts is None or not len(prompts):
            continue
        i = int(prompts.lengths.argmax())
        if int(prompts.lengths[i]) + cfg.rl.max_new_tokens > limit:
            raise UsageError(f"{prompts.where(i)}: the prompt ({int(prompts.lengths[i])} tokens) plus --max-new-tokens "
                             f"{cfg.rl.max_new_tokens} is over {run.ref.name}'s context of {limit} tokens; lower --max-new-tokens "
                             "or shorten the prompt")


def liger(cfg: FinetuneConfig, run: Run, model: Any) -> bool:
    """train.liger: Liger's kernels on this model where they can run (llmkit/training/speedups.py); says why not on a GPU."""
    from llmkit.training.speedups import apply_liger, use_liger

    device, why_not = run.accelerator.device.type, []
    if not use_liger(cfg.train, cfg.task, cfg.method, device, model, why_not):
        if why_not and device == "cuda":
            run.say(f"Liger kernels: off ({why_not[0]})")
        return False
    apply_liger(model)
    run.say("Liger kernels: on (RMSNorm, RoPE, SwiGLU; fused linear cross-entropy instead of the chunked loss)")
    return True


def build_model(cfg: FinetuneConfig, ref: ModelRef, tokenizer: Any, labels: Labels | None, progress: bool,
                grow_vocab: bool = False) -> Any:
    """The model to train: base weights in fp32, a new head for seq-cls, LoRA adapters when asked.

    `grow_vocab`: the chat template added special tokens to the tokenizer; the embeddings grow to match.
    """
    from llmkit.models.load import architectures, load_seq_cls
    from llmkit.models.meta import building

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

        from llmkit.models.load import apply_adapter, from_pretrained_checked

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
    empty = building()  # --fsdp, not rank 0: parameters on the meta device, rank 0's weights arrive when sharded
    if grow_vocab and model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=not empty)  # new rows start at the mean embedding
    model.config.use_cache = False  # the KV cache is for generation; in training it only costs memory
    if cfg.method in ("lora", "qlora"):
        if cfg.method == "lora" and (ref.is_gguf or ref.adapter is not None) and not empty:
            keep_base(ref, model, tokenizer)  # so that plain peft can load the adapter (peft_base)
        model = add_lora(model, cfg)
    return model


def qlora_base(cfg: FinetuneConfig, ref: ModelRef, tokenizer: Any, progress: bool) -> Any:
    """The base in 4-bit NF4. bitsandbytes quantizes while loading an HF folder, so a GGUF base (or a LoRA run's
    merged base) is de-quantized into the kept fp32 base folder first (`keep_base`), and loaded from there."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmkit.models.load import apply_adapter, from_pretrained_checked, source_kwargs
    from llmkit.models.qlora import load_4bit

    if ref.is_gguf or ref.adapter is not None:
        if not (base_folder(ref) / "config.json").exists():
            fp32 = from_pretrained_checked(AutoModelForCausalLM, ref, progress, dtype=torch.float32)
            keep_base(ref, apply_adapter(fp32, ref, merge=True) if ref.adapter is not None else fp32, tokenizer)
            del fp32
        return load_4bit(base_folder(ref), progress, cfg.train.gradient_checkpointing)
    where, kwargs = source_kwargs(ref)  # safetensors only unless --allow-pickle, as every other load
    return load_4bit(where, progress, cfg.train.gradient_checkpointing, **kwargs)


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


def _describe_data(cfg: FinetuneConfig, data: Prepared) -> str:
    d = cfg.data
    if cfg.objective == "grpo":
        return f"{len(data.train)} prompts, rewards {', '.join(cfg.rl.rewards)}"
    if cfg.objective != "sft":
        return f"{len(data.train)} preference pairs"
    if d.streaming:
        return f"a stream of {d.train} ({'conversations' if data.chat is not None else f'blocks of {d.block_size} tokens'})"
    what = f"{len(data.train)} blocks of {d.block_size} tokens" if cfg.task == "causal-lm" else f"{len(data.train)} examples"
    if data.chat is not None:
        what = f"{data.train.conversations} conversations (assistant turns learned{', all tokens' if d.train_on_prompt else ''})"
    if d.packing:
        what += f", packed into {len(data.train)} rows of up to {d.block_size} tokens"
    return what


def save_model(cfg: FinetuneConfig, ref: ModelRef, model: Any, tokenizer: Any, tmp: Path, chat: ChatEncoder | None) -> Card:
    """Write the trained model (an adapter, or full / merged weights) and its tokenizer into `tmp`."""
    if chat is not None:
        keep_chat_format(chat, tokenizer, model)
    adapters = cfg.method in ("lora", "qlora")
    merged = adapters and cfg.lora.merge
    if adapters:
        model.peft_config["default"].base_model_name_or_path = peft_base(ref)
        if merged and cfg.method == "qlora":  # into the fp32 base, loaded afresh, never into the 4-bit weights
            from llmkit.models.qlora import merge_into_full_precision

            model = merge_into_full_precision(model, build_model(replace(cfg, method="lora"), ref, tokenizer, None, False))
        elif merged:
            model = model.merge_and_unload()  # fp32 weights: merged in full precision
    if adapters and not merged:
        # embeddings are never resized here; "auto" would look the base model up on the Hub to check
        model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
        if ref.is_gguf:  # the base's hyperparameters for its llama.cpp adapter export (QLoRA's 4-bit load left out)
            base_config = {k: v for k, v in model.get_base_model().config.to_dict().items() if k != "quantization_config"}
            (tmp / BASE_CONFIG).write_text(json.dumps(base_config, indent=2), encoding="utf-8")
    else:
        model.config.use_cache = True
        model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    what = cfg.task if cfg.objective == "sft" else cfg.objective
    return Card(base=base_model_id(ref), plot_title=f"{ref.name} - {what} {cfg.method}", method=cfg.method, merged=merged,
                peft_base=peft_base(ref) if adapters else None,
                num_labels=len(model.config.id2label) if cfg.task == "seq-cls" else None)
