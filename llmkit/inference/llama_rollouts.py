"""GRPO's rollouts on llama.cpp: the policy's G completions per prompt, all sequences of a step in one context.

    >>> rollouts = LlamaCppRollouts(peft_model, tokenizer, model_ref="smollm2-135m", max_context=2048)
    >>> rollouts.sync(peft_model)                       # after every optimizer step
    >>> rollouts.generate(RolloutRequest(prompts, num_generations=8, max_new_tokens=32, temperature=1.0,
    ...                                  top_p=1.0, seed=step))   # 8 * len(prompts) id lists, prompt-major
    >>> rollouts.close()

Keeping llama.cpp in sync with weights that change every step:

- LoRA (a peft model): the base GGUF is loaded once, unchanged — the bundled model's own file (the policy trains on
  its de-quantized copy, so both compute with the same base weights), or an HF folder's F16 export from the cache
  (llmkit.export.gguf) — and each `sync` writes the live adapter's A and B as a GGUF adapter file
  (llmkit.export.adapter.AdapterWriter: converter class and index mappings built once) and loads it with
  `llama_adapter_lora_init`; the previous adapter is freed. llama.cpp adds `scale * B (A x)` in fp32.
- Full fine-tuning (or a LoRA llama.cpp cannot apply: DoRA, modules_to_save, embeddings): each `sync` writes the
  weights (LoRA merged in fp32) to a folder, converts it to an F16 GGUF with llama.cpp's converter and reloads.

Measured on SmolLM2-135M-Instruct (`smollm2-135m`, LoRA r=16 / alpha 32 on all linear layers: 210 matrices, 4.88M
trainable), 2-core Intel Xeon (avx512_vnni, no AMX), load average ~8 from other processes:
  adapter sync  0.34 s median over 30 syncs (0.23 min; one 5.3 s outlier under load): state dict -> 19.6 MB
                adapter file 0.12-0.21 s, llama_adapter_lora_init 0.02-0.03 s; no RSS growth over the 30 (2905 ->
                2906 MB: each sync frees the previous adapter). The first sync also opens the base (0.5 s) and
                probes each matrix's layout through the converter once (2.7 s).
  merged sync   15.0 and 16.5 s (merge in fp32, safetensors, F16 conversion by llama.cpp's converter, reload)
The adapter path is ~45x cheaper per step and leaves the user's quantized base exactly as it is: it is the choice
for LoRA. Full fine-tuning has no smaller form than the weights, so it pays the re-export (a step of GRPO on this
machine takes longer than that anyway). Rollouts themselves, 8 sentiment prompts x G=8 x up to 32 tokens on the same
LoRA model: llama.cpp batched + adapter 27.4 tokens/s against transformers `generate` of the whole group in one batch
(what TRL does on CPU) 3.1 tokens/s, 8.9x. `python benchmarks/grpo.py --rollouts-only` prints all of these.

Decoding goes through `llmkit.inference.llama_batch.BatchedLlama` (the continuous batcher `llmkit serve` uses): every
sequence of the request gets a slot, the G copies of a prompt share its prefilled cells (`llama_memory_seq_cp`), and
each step is ONE `llama_decode` for all running sequences. Each sequence has its own sampler chain (top-p,
temperature, a draw seeded from the request's seed and the sequence's index; argmax at temperature 0). No top-k and
no repetition penalty: the loss is computed on the policy's own probabilities, so the draw must come from them.
The context is cleared before every request (`BatchedLlama.reset`), so cells land at the same places each time:
same request + seed + weights -> the same completions.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

from llmkit.errors import UsageError

ADAPTER = "policy"  # the name the live adapter has among the batcher's adapters (one at a time)


def can_run(model: Any) -> bool:
    """True when llama.cpp can run this policy: llama-cpp-python imports, it is a causal LM, and llama.cpp's converter
    knows its family (open_rollouts("auto") asks; cheap: the config and the converter's list of architectures)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    from llmkit.export.gguf import unsupported

    cfg = model.config
    archs = getattr(cfg, "architectures", None) or [type(model).__name__]
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return False  # the converter also knows encoders (BERT), which do not generate
    return unsupported(archs, cfg.model_type) is None


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _config(model: Any) -> dict[str, Any]:
    return json.loads(model.config.to_json_string())


def merged_state_dict(model: Any) -> dict[str, Any]:
    """The model's weights as the plain (non-peft) model names them, each LoRA delta added in fp32; tied copies once."""
    if not _is_peft(model):
        sd = {k: v.detach() for k, v in model.state_dict().items()}
    else:
        from peft.tuners.lora import LoraLayer

        deltas = {}
        for name, module in model.get_base_model().named_modules():
            if isinstance(module, LoraLayer):
                deltas[f"{name}.weight"] = sum(module.get_delta_weight(a) for a in module.active_adapters)
        sd = {}
        for key, value in model.get_base_model().state_dict().items():
            if "lora_" in key:
                continue
            key = key.replace(".base_layer.", ".")
            sd[key] = value.detach() + deltas[key] if key in deltas else value.detach()
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # safetensors refuses shared tensors; the converter ties them again
    return {k: v.float().contiguous() for k, v in sd.items()}


class LlamaCppRollouts:
    """The Rollouts protocol (llmkit.inference.rollouts) on llama.cpp; see the module docstring.

    `threads`: llama.cpp's (default: the cores other processes leave idle). `merged`: sync a LoRA by re-exporting
    merged weights, as full fine-tuning does (what benchmarks/grpo.py compares the adapter path with).
    """

    name = "llama.cpp"

    def __init__(self, model: Any, tokenizer: Any, *, model_ref: str, max_context: int, threads: int | None = None,
                 merged: bool = False) -> None:
        from llmkit.export.adapter import AdapterUnsupported, AdapterWriter
        from llmkit.models.refs import resolve

        ref = resolve(model_ref)
        self.base_ref = replace(ref, adapter=None)
        self.tokenizer, self.max_context, self.threads = tokenizer, max_context, threads
        self.dir = Path(tempfile.mkdtemp(prefix="llmkit-rollouts-"))
        self.native: Any = None  # the backend's NativeLlama: C handles, and the adapters the batcher can select
        self.backend: Any = None  # LlamaCppBackend: owns the llama.cpp model (and frees it with its adapters)
        self.batched: Any = None  # BatchedLlama on that model, sized to the largest request so far
        self.adapter: Any = None  # llama_adapter_lora * of the current sync
        self.syncs = 0  # weight transfers made
        self.writer: AdapterWriter | None = None
        if _is_peft(model) and not merged:
            try:
                peft_cfg = model.peft_config[model.active_adapter].to_dict()
                self.writer = AdapterWriter(_config(model), peft_cfg, "policy")
            except AdapterUnsupported as e:
                self._fall_back(e)
        self.mode = "adapter" if self.writer is not None else "merged"

    def _fall_back(self, why: Exception) -> None:
        """Sync by merged re-export from now on, saying why in one line (DoRA, modules_to_save, embeddings, ...)."""
        print(f"llama.cpp cannot apply this LoRA at run time ({why}); rollouts re-export the merged weights every step",
              file=sys.stderr, flush=True)
        self.writer, self.mode = None, "merged"

    # -- keeping the weights in sync

    def sync(self, model: Any) -> None:
        """Make the next `generate` sample from `model`'s current weights (see the module docstring for how).

        Every call transfers: the caller knows when the weights changed (GRPO syncs once per optimizer step). Nothing on
        the tensors can tell: the fused AdamW the training loop uses updates them without bumping their version
        counters, and a check on those left the rollouts on the first step's weights for a whole run.
        """
        if self.mode == "adapter":
            from llmkit.export.adapter import AdapterUnsupported

            try:
                self._sync_adapter(model)
            except AdapterUnsupported as e:  # the weights' names show what the config did not (an adapted embedding)
                self._close_model()
                self._fall_back(e)
                self._sync_merged(model)
        else:
            self._sync_merged(model)
        self.syncs += 1

    def _base_gguf(self) -> Path:
        from llmkit.export.gguf import cached_gguf

        if self.base_ref.is_gguf:
            return self.base_ref.path  # the bundled model's own file, exactly what the policy's base was de-quantized from
        # F16 rather than the cache's default Q8_0: rollouts should come from the weights being trained, not a rounding
        return cached_gguf(self.base_ref, "f16", progress=True, threads=self.threads)

    def _sync_adapter(self, model: Any) -> None:
        import llama_cpp as ll
        from peft import get_peft_model_state_dict

        assert self.writer is not None
        if self.backend is None:
            self._open(self._base_gguf())
        path = self.dir / "policy.lora.gguf"
        self.writer.write(get_peft_model_state_dict(model), path)
        handle = ll.llama_adapter_lora_init(self.native.model, str(path).encode("utf-8"))
        if not handle:
            raise RuntimeError(f"llama.cpp could not load the policy's adapter {path}")
        self._drop_adapter()
        self.adapter = handle
        self.native.adapters[ADAPTER] = handle
        path.unlink()  # llama.cpp has copied the tensors by the time llama_adapter_lora_init returns

    def _drop_adapter(self) -> None:
        """Free the previous sync's adapter, after making sure no context still computes with it."""
        if self.adapter is None:
            return
        import llama_cpp as ll

        from llmkit.inference.llama_cpp import set_adapters

        if self.batched is not None and self.batched.adapter is not None:
            set_adapters(ll, self.batched.ctx, None)
            self.batched.adapter = None  # so its next decode sets the new adapter (same name, new handle)
        ll.llama_adapter_lora_free(self.adapter)
        self.adapter = None

    def _sync_merged(self, model: Any) -> None:
        from safetensors.torch import save_file

        from llmkit.export.converter import convert

        folder = self.dir / "hf"
        if not folder.exists():
            folder.mkdir()
            self.tokenizer.save_pretrained(folder)  # once: the converter reads the vocabulary from the folder
            (folder / "config.json").write_text(model.config.to_json_string(), encoding="utf-8")
        save_file(merged_state_dict(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
        path = self.dir / "policy.f16.gguf"
        convert(folder, path, "f16", self.base_ref.path if self.base_ref.is_gguf else None)
        self._close_model()
        self._open(path)
        path.unlink()  # llama.cpp maps the file: the open mapping keeps the data, the name is not needed

    def _open(self, gguf: Path) -> None:
        from llmkit.inference.llama_cpp import LlamaCppBackend
        from llmkit.models.refs import ModelRef

        # its own context is never used (rollouts decode in the batcher's): the smallest llama.cpp allows
        self.backend = LlamaCppBackend(ModelRef(self.base_ref.name, "gguf", gguf, "local"), 256, threads=self.threads)
        self.native = self.backend.native_llama()

    def _close_model(self) -> None:
        if self.batched is not None:
            self.batched.close()
            self.batched = None
        if self.backend is not None:
            self._drop_adapter()
            self.backend.close()
            self.backend = None

    # -- sampling

    def generate(self, request: Any) -> list[list[int]]:
        """len(prompts) * G completions of a `RolloutRequest`, prompt-major; each ends with the end-of-generation id when
        the model stopped. (`request` is not annotated with its class: llmkit.inference.rollouts imports this module.)"""
        from llmkit.inference.llama_batch import Sequence
        from llmkit.inference.sampling import SamplingOptions

        if self.backend is None:
            raise RuntimeError("LlamaCppRollouts.generate before the first sync(model)")
        g = request.num_generations
        for i, prompt in enumerate(request.prompts):
            if len(prompt) + request.max_new_tokens > self.max_context:
                raise UsageError(f"prompt {i} has {len(prompt)} tokens; with --max-new-tokens {request.max_new_tokens} "
                                 f"that is over the model's context of {self.max_context}: shorten the prompt or lower "
                                 "--max-new-tokens")
        # top_k 0 and no repetition penalty: the draw must follow the policy's own probabilities
        opts = SamplingOptions(max_new_tokens=request.max_new_tokens, temperature=request.temperature, top_k=0,
                               top_p=request.top_p, repetition_penalty=1.0)
        adapter = ADAPTER if self.adapter is not None else None
        seqs = [Sequence(prompt="", tokens=list(p), opts=opts, index=k, adapter=adapter,
                         seed=(request.seed * 1_000_003 + i * g + k) & 0x7FFFFFFF)
                for i, p in enumerate(request.prompts) for k in range(g)]
        batched = self._batcher(len(seqs), sum(len(s.tokens) + request.max_new_tokens for s in seqs)
                                + max(len(p) for p in request.prompts))
        batched.reset()  # cells from the previous request (and the previous weights) never serve as a prefix
        queue = deque(seqs)
        while queue or not batched.idle():
            while queue and batched.fits(queue[0]):
                batched.add(queue.popleft())
            if batched.idle():
                raise RuntimeError("a rollout sequence does not fit the llama.cpp context")  # _batcher sized it: a bug
            batched.step()
        return [s.generated for s in seqs]

    def _batcher(self, parallel: int, cells: int) -> Any:
        """The batcher, made again only when a request needs more slots or cells than the current one has."""
        from llmkit.inference.llama_batch import BatchedLlama

        b = self.batched
        if b is None or b.parallel < parallel or b.n_ctx < cells:
            if b is not None:
                b.close()
            self.batched = BatchedLlama(self.native, parallel, cells)
        return self.batched

    def close(self) -> None:
        """Free the llama.cpp model, its context and adapter, and remove the temporary files."""
        self._close_model()
        shutil.rmtree(self.dir, ignore_errors=True)
