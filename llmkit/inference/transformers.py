"""The transformers backend: any HF causal LM (folder, Hub id, LoRA adapter), on CPU or GPU.

    >>> from llmkit.inference.transformers import TransformersBackend
    >>> from llmkit.inference.sampling import SamplingOptions
    >>> backend = TransformersBackend(resolve("runs/my-finetune"), device="cpu")
    >>> [g.text for g in backend.generate(["Once upon a time"], SamplingOptions(max_new_tokens=16))]

Prompts of similar length are generated together in batches (left padding); with an `on_text` callback it
generates one sequence at a time instead, so tokens can be shown as they come.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator
from typing import Any

from llmkit.errors import UsageError
from llmkit.inference.logprobs import entries, first, trim
from llmkit.inference.sampling import Generation, OnText, SamplingOptions, StopScanner, TokenLogprob, check_context
from llmkit.models.refs import ModelRef
from llmkit.models.templates import Prompt, chat_messages, render_chat


class TransformersBackend:
    """Any HF causal LM: batched generation with left padding, token streaming when one text at a time."""

    name = "transformers"
    batches = True  # see llmkit.inference.backends.Backend.batches

    def __init__(self, ref: ModelRef, *, device: str | None = None, dtype: str = "auto", batch_size: int = 8,
                 progress: bool = True) -> None:
        from llmkit.models.load import context_length, load_causal_lm, load_tokenizer

        # Decoder-only models continue from the last position, so padding goes on the left.
        self.tokenizer = load_tokenizer(ref, padding_side="left")
        self.model = load_causal_lm(ref, device=device, dtype=dtype, progress=progress)
        self.context = context_length(self.model.config)
        self.batch_size = max(1, batch_size)
        self.per_prompt: list[str | None] | None = None  # use_adapter([...]): each prompt's LoRA adapter
        self._stacked: Any = False  # the adapters stacked for mixed batches (llmkit.inference.stacked_lora); False: not built yet
        # The model's stop ids and the tokenizer's EOS: a chat fine-tune saves its end-of-turn token as the
        # tokenizer's EOS (llmkit.finetune.keep_chat_format), and an adapter folder carries only the tokenizer.
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {i for i in [*(eos if isinstance(eos, list) else [eos]), self.tokenizer.eos_token_id] if i is not None}

    def load_adapter(self, name: str, path: str) -> None:
        """Load the peft LoRA folder `path` beside the model's other adapters, selected by `use_adapter(name)`."""
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self.model.load_adapter(path, adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
        self.model.eval()
        self._stacked = False

    def use_adapter(self, name: str | list[str | None] | None) -> None:
        """Generate with the adapter loaded as `name` from now on (None: the base alone, its adapters switched off).

        A list names one adapter per prompt of the next generate() calls: prompts of different adapters then share
        one batch (each LoRA layer applies each row's own adapter: all adapters stacked, llmkit.inference.stacked_lora,
        or peft's mixed-adapter batches where they cannot be), which is what lets `llmkit serve --adapter` batch
        requests for different adapters together on this backend.
        """
        self.per_prompt = name if isinstance(name, list) else None
        if name is None:
            self.model.base_model.disable_adapter_layers()
            return
        self.model.base_model.enable_adapter_layers()
        if isinstance(name, str):
            self.model.set_adapter(name)

    @property
    def window(self) -> int | None:
        return self.context

    def format(self, prompt: Prompt, opts: SamplingOptions) -> str:
        if not opts.chat:
            return str(prompt)
        if not self.tokenizer.chat_template:
            raise UsageError("this model's tokenizer has no chat template; drop --chat")
        return render_chat(self.tokenizer.chat_template, chat_messages(prompt, opts.system),
                           bos_token=self.tokenizer.bos_token, eos_token=self.tokenizer.eos_token)

    def _encode(self, texts: list[str], chat: bool) -> dict[str, Any]:
        # A chat template already contains the special tokens it needs (BOS included).
        return self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)

    def prompt_lengths(self, prompts: list[Prompt], opts: SamplingOptions) -> list[int]:
        texts = [self.format(p, opts) for p in prompts]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=not opts.chat)["input_ids"]]

    def token_counter(self) -> Callable[[list[Prompt], SamplingOptions], list[int]]:
        # A tokenizer of its own: HF fast tokenizers fail ("Already borrowed") when one object is used from two
        # threads at once, and this one may be busy inside generate().
        counter = copy.copy(self)
        counter.tokenizer = copy.deepcopy(self.tokenizer)
        return counter.prompt_lengths

    def set_chat_template(self, template: str) -> None:
        self.tokenizer.chat_template = template

    def torch_model(self) -> Any:
        return self.model

    def native_llama(self) -> None:
        return None

    def _mixed(self, adapters: list[str | None]) -> tuple[Any, dict[str, Any]]:
        """A context and generate() arguments that give output row i the adapter `adapters[i]` (None: the base)."""
        from llmkit.inference.stacked_lora import StackedLora

        if len(set(adapters)) == 1:  # one adapter for the whole batch: peft's own layers, no other adapter's columns
            if adapters[0] is None:
                return self.model.disable_adapter(), {}
            self.model.set_adapter(adapters[0])
            return contextlib.nullcontext(), {}
        if self._stacked is False:
            self._stacked = StackedLora.build(self.model)
        if self._stacked is not None:
            return self._stacked.rows(adapters), {}
        return contextlib.nullcontext(), {"adapter_names": [a or "__base__" for a in adapters]}

    def _gen_kwargs(self, opts: SamplingOptions, n: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": opts.max_new_tokens, "num_return_sequences": n,
            "pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": sorted(self.eos_ids),
            "repetition_penalty": opts.repetition_penalty,
        }
        if opts.greedy:  # explicit Nones silence "temperature is set but do_sample=False" warnings
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k or None)
        if opts.stop:
            kwargs.update(stop_strings=list(opts.stop), tokenizer=self.tokenizer)
        if opts.logprobs is not None:  # raw logits of every step, for llmkit.inference.logprobs
            kwargs.update(output_logits=True, return_dict_in_generate=True)
        if opts.constraint is not None:
            from llmkit.inference.constraints import hf_logits_processor

            kwargs["logits_processor"] = [hf_logits_processor(opts.constraint, self.tokenizer, self.model.config.vocab_size)]
        return kwargs

    def generate(self, prompts: list[Prompt], opts: SamplingOptions, on_text: OnText | None = None) -> Iterator[Generation]:
        import torch
        import transformers

        check_context(self.prompt_lengths(prompts, opts), opts, self.context)
        if opts.seed is not None:
            transformers.set_seed(opts.seed)
        device = self.model.device
        if on_text is not None:  # streaming: one sequence at a time, so tokens can be shown as they come
            for p, prompt in enumerate(prompts):
                enc = self._encode([self.format(prompt, opts)], opts.chat).to(device)
                for idx in range(opts.num_return_sequences):
                    streamer = _TokenStreamer(self.tokenizer, opts.stop, lambda t, i=idx: on_text(i, t))
                    mixing, mixed = self._mixed([self.per_prompt[p]]) if self.per_prompt is not None else (contextlib.nullcontext(), {})
                    start = time.perf_counter()
                    with torch.inference_mode(), mixing:
                        out = self.model.generate(**enc, **self._gen_kwargs(opts, 1), **mixed, streamer=streamer)
                        result = self._result(prompt, enc, out, 0, idx, time.perf_counter() - start, opts)
                    yield result
            return
        # Batches of similar length waste less compute on padding; results come back in the input order.
        texts = [self.format(p, opts) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(texts[i]))
        results: dict[int, list[Generation]] = {}
        for b in range(0, len(order), self.batch_size):
            batch = order[b:b + self.batch_size]
            enc = self._encode([texts[i] for i in batch], opts.chat).to(device)
            start = time.perf_counter()
            # greedy decoding gives every sample the same text, and transformers refuses greedy n > 1: decode once
            per_prompt = 1 if opts.greedy else opts.num_return_sequences
            kwargs = self._gen_kwargs(opts, per_prompt)
            mixing: Any = contextlib.nullcontext()
            if self.per_prompt is not None:  # one adapter per output row: generate() repeats each prompt per_prompt times
                mixing, mixed = self._mixed([self.per_prompt[i] for i in batch for _ in range(per_prompt)])
                kwargs.update(mixed)
            with torch.inference_mode(), mixing:
                out = self.model.generate(**enc, **kwargs)
            seconds = time.perf_counter() - start
            n = opts.num_return_sequences
            # each prompt's own adapter, for its prompt log-probs (a forward pass of their own; set_adapter walks
            # every layer, so only when they are asked for)
            own = self.per_prompt is not None and opts.prompt_logprobs
            for j, i in enumerate(batch):
                row_enc = {k: v[j:j + 1] for k, v in enc.items()}
                with self._mixed([self.per_prompt[i]])[0] if own else contextlib.nullcontext():
                    results[i] = [self._result(prompts[i], row_enc, out, j * per_prompt + k % per_prompt, k, seconds, opts)
                                  for k in range(n)]
        for i in range(len(prompts)):
            yield from results[i]

    def _result(self, prompt: Prompt, enc: Any, out: Any, row: int, idx: int, seconds: float, opts: SamplingOptions) -> Generation:
        """Row `row` of generate()'s output (a tensor, or with logprobs a GenerateOutput) as a Generation."""
        seq = out.sequences[row] if hasattr(out, "sequences") else out[row]
        prompt_len = enc["input_ids"].shape[1]
        new = seq[prompt_len:].tolist()
        finish = "length"
        for k, tok in enumerate(new):
            if tok in self.eos_ids:  # also where right-padding after an early finish begins (pad = EOS)
                new, finish = new[: k + 1], "stop"
                break
        scanner = StopScanner(opts.stop)
        scanner.feed(self.tokenizer.decode(new, skip_special_tokens=True))
        if scanner.stopped:
            finish = "stop"
        real_prompt = int(enc["attention_mask"][0].sum())
        gen = Generation(prompt, scanner.text, len(new), seconds, finish, idx, real_prompt)
        if opts.logprobs is not None:
            shown = [t for t in new if t not in self.eos_ids]
            rows = [step[row].float().cpu().numpy() for step in out.logits[:len(shown)]]
            gen.logprobs = trim(entries(rows, shown, opts.logprobs, self._token_bytes), gen.text)
        if opts.prompt_logprobs:
            gen.prompt_logprobs = self.prompt_logprobs(enc["input_ids"][0, prompt_len - real_prompt:].tolist(), opts.logprobs or 0)
        return gen

    # -- log-probabilities (OpenAI's logprobs and echo: llmkit.inference.logprobs)

    def _token_bytes(self, tok: int) -> bytes:
        return self.tokenizer.decode([tok], skip_special_tokens=False, clean_up_tokenization_spaces=False).encode("utf-8")

    def prompt_logprobs(self, tokens: list[int], k: int) -> list[TokenLogprob]:
        """Each prompt token's log-probability given the ones before it (the first: None): one forward pass."""
        import torch

        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([tokens], device=self.model.device)).logits[0, :-1].float().cpu().numpy()
        return [first(tokens[0], self._token_bytes), *entries(logits, tokens[1:], k, self._token_bytes)]


class _TokenStreamer:
    """transformers streamer that decodes incrementally and never shows half a UTF-8 character or a stop string."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...], emit: Callable[[str], None]) -> None:
        self.tokenizer, self.emit = tokenizer, emit
        self.scanner = StopScanner(stops)
        self.ids: list[int] = []
        self.decoded = ""
        self.first = True

    def put(self, value: Any) -> None:
        if self.first:  # generate() hands over the prompt first
            self.first = False
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return
        if shown := self.scanner.feed(text[len(self.decoded):]):
            self.emit(shown)
        self.decoded = text

    def end(self) -> None:
        # Whatever is left, even an incomplete character, so the stream ends exactly like the batch text.
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if shown := self.scanner.feed(text[len(self.decoded):]) + self.scanner.flush():
            self.emit(shown)
