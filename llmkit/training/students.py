"""Students for distillation: a copy of the teacher with layers dropped, or a model from a config.

    >>> student, kept = student_from_layers(teacher, 15, choose_layers(teacher, examples, collate, 15, 32, "cpu"))

`--student-layers N` keeps N of the teacher's layers, chosen by `--layer-selection` (`resolve_selection`): the ones
that change the hidden states most (`choose_layers`, re-measured after each removal) or evenly spaced ones as
DistilBERT / DistilGPT2 did; embeddings, norms and heads are copied, nothing starts random. `--student-config`
builds any model sharing the teacher's tokenizer.

Any model whose blocks sit in one `nn.ModuleList` works (`layer_stack` finds it by the config's layer count, not
by architecture name). The student's config follows the kept layers (`student_config`): the layer count, every
per-layer list (`layer_types`' sliding / full attention pattern, `mlp_layer_types`, `no_rope_layers`, ...),
lists of layer indices (`mlp_only_layers`, `moe_layers`, ...) and `first_k_dense_replace`-style counts.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from llmkit.errors import UsageError
from llmkit.models.refs import resolve

LAYER_COUNTS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")  # what configs call their number of blocks
# Config lists of layer *indices* (not one entry per layer): kept indices are renumbered, dropped ones go.
INDEX_LISTS = ("mlp_only_layers", "moe_layers", "full_attn_idxs", "rope_scaling_layers", "local_layer_ids",
               "global_attn_indexes", "kv_source_layers")
# Config integers "the first k layers are X" (DeepSeek's dense layers before the MoE ones): k becomes the kept count below k.
FIRST_K = ("first_k_dense_replace", "first_k_dense", "moe_layer_start_index")


def kept_layers(teacher_layers: int, n: int) -> list[int]:
    """`n` layer indices out of `teacher_layers`, evenly spaced, first and last included (6 -> 3: 0, 2, 5)."""
    if n == 1:
        return [0]
    return [round(i * (teacher_layers - 1) / (n - 1)) for i in range(n)]


def resolve_selection(selection: str, task: str) -> str:
    """`--layer-selection auto` (the default) by the kind of model: `importance` for causal LMs (measured on SmolLM2:
    held-out perplexity 143 against 249 for evenly spaced layers after healing, README), `even` for classifiers
    (encoders such as BERT / MiniLM, and decoders with a classification head, where importance is unmeasured).
    Block influence ranks the embedding-adjacent layer of an encoder low although the layers above depend on it:
    MiniLM-L6 sentiment cut to 3 layers kept 2, 4, 5 by importance and reached 0.951x the teacher's held-out
    accuracy, evenly spaced 0, 2, 5 reached 0.999x."""
    if selection != "auto":
        return selection
    return "importance" if task == "causal-lm" else "even"


def text_config(config: Any) -> Any:
    """The config that holds the decoder's layer count: the model's own, or its `text_config` in a composite model."""
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


def declared_layers(config: Any) -> int | None:
    """The number of blocks the config declares (`num_hidden_layers`, GPT-2's `n_layer`, ...), None if it names none."""
    cfg = text_config(config)
    for name in LAYER_COUNTS:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def layer_stack(model: Any) -> tuple[str, Any]:
    """(qualified name, ModuleList) of the model's blocks: of the `nn.ModuleList`s as long as the config's layer count,
    the one with the most parameters (`model.layers`, GPT-2's `transformer.h`, BERT's `bert.encoder.layer`, ...).
    A UsageError for models that keep their blocks otherwise."""
    import torch

    count = declared_layers(model.config)
    best: tuple[int, str, Any] | None = None
    if count:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.ModuleList) and len(module) == count:
                size = sum(p.numel() for p in module.parameters())
                if size and (best is None or size > best[0]):
                    best = (size, name, module)
    if best is None:
        raise UsageError(f"--student-layers: the teacher (a {model.config.model_type}) keeps no list of {count or '?'} blocks "
                         "to take layers from; pass --student-config with a smaller config of the same tokenizer instead")
    return best[1], best[2]


def student_config(config: Any, kept: list[int]) -> Any:
    """A copy of `config` for a model of the `kept` layers (ascending teacher indices): the layer count, every per-layer
    list (a list attribute as long as the old layer count, e.g. `layer_types`) re-indexed, index lists renumbered,
    "first k layers" counts clamped."""
    cfg = copy.deepcopy(config)
    text = text_config(cfg)
    total = declared_layers(cfg)
    position = {t: s for s, t in enumerate(kept)}
    for name, value in list(vars(text).items()):
        if name.startswith("_") or "token" in name or name == "architectures" or not isinstance(value, (list, tuple)):
            continue
        if name in INDEX_LISTS:
            renumbered = [position[i] for i in value if isinstance(i, int) and i in position]
        elif len(value) == total:
            renumbered = [value[i] for i in kept]  # one entry per layer: sliding / full attention, rope on / off, ...
        else:
            continue
        setattr(text, name, type(value)(renumbered))
    for name in FIRST_K:
        value = getattr(text, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(text, name, sum(k < value for k in kept))
    name = next(n for n in LAYER_COUNTS if isinstance(getattr(text, n, None), int))
    setattr(text, name, len(kept))  # GPT-2 maps num_hidden_layers onto n_layer
    return cfg


CACHE_BYTES = 2 << 30  # LayerScores keeps every layer's input up to this size (SmolLM2, 32 x 256 tokens: 0.6 GB)


class LayerScores:
    """Block influence of each layer: the mean angular change 1 - cos(input, output) it makes to the hidden states
    of real tokens (ShortGPT, Men et al. 2024). Layers that barely turn the hidden state can go with least harm.

    One pass over `batches` records how the model calls each block (its input hidden states and arguments: masks,
    position embeddings, per layer type) and scores every layer. `remove(j)` takes layer j out and re-scores only the
    layers after it, run from j's recorded input: the layers before j see exactly what they saw, so their scores
    stand. The scores are those of the shortened model's full pass (the same calls on the same inputs; tested), at
    a fraction of its cost when the removed layers are late, as block influence tends to pick. Past CACHE_BYTES of
    inputs only the first block's are kept: then every removal re-runs the blocks from the first.
    """

    def __init__(self, teacher: Any, batches: Any) -> None:
        import inspect

        import torch

        batches = list(batches)  # read twice (masks, then the pass): a generator must not run dry
        _, self.layers = layer_stack(teacher)
        self.kept = list(range(len(self.layers)))
        self.masks = [b["attention_mask"].float() for b in batches]
        self.count = max(sum(int(m.sum()) for m in self.masks), 1)
        self.calls: list[list[Any]] = [[] for _ in self.layers]  # per layer, per batch: [hidden, args after it, kwargs, by keyword]
        self.scores: dict[int, float] = {}
        self.keep_inputs = True
        sums = [0.0] * len(self.layers)
        kept_bytes = [0]

        def before(i: int) -> Any:
            def hook(module: Any, args: tuple, kwargs: dict) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                self.calls[i].append([hidden, args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"}, not args])
                if i and self.keep_inputs:
                    kept_bytes[0] += hidden.numel() * hidden.element_size()
                    if kept_bytes[0] > CACHE_BYTES:  # from now on only the first block's inputs are kept
                        self.keep_inputs = False
                        for calls in self.calls[1:]:
                            for call in calls:
                                if call is not self.calls[i][-1]:  # still to be scored by its `after` hook
                                    call[0] = None
            return hook

        def after(i: int) -> Any:
            def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
                sums[i] += self._change(self.calls[i][-1][0], output, len(self.calls[i]) - 1)
                if i and not self.keep_inputs:
                    self.calls[i][-1][0] = None
            return hook

        body = getattr(teacher, "base_model", teacher)  # transformers' model without its head (`model`, `transformer`, `bert`)
        # the LM head (SmolLM2: 576 x 49,152 per token) would be a quarter of the pass and scores nothing; no KV cache, so
        # that a block can be run again on the arguments it was given
        extra = {"use_cache": False} if "use_cache" in inspect.signature(body.forward).parameters else {}
        handles = [h for i, layer in enumerate(self.layers) for h in (layer.register_forward_pre_hook(before(i), with_kwargs=True),
                                                                      layer.register_forward_hook(after(i), with_kwargs=True))]
        try:
            with torch.no_grad():
                for batch in batches:
                    body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra)
        finally:
            for h in handles:
                h.remove()
        self.scores = {i: v / self.count for i, v in enumerate(sums)}

    def _change(self, hidden: Any, output: Any, batch: int) -> float:
        import torch

        out = output[0] if isinstance(output, tuple) else output
        cos = torch.nn.functional.cosine_similarity(hidden.float(), out.float(), dim=-1)
        return float(((1 - cos) * self.masks[batch]).sum())

    def remove(self, layer: int) -> None:
        """Take `layer` out and re-score the layers after it (all of them when inputs are not kept)."""
        import torch

        p = self.kept.index(layer)
        self.kept.pop(p)
        del self.scores[layer]
        start = p if self.keep_inputs else 0
        rerun = self.kept[start:]
        if not rerun:
            return
        sums = dict.fromkeys(rerun, 0.0)
        with torch.no_grad():
            for b in range(len(self.masks)):
                # the first block to re-run gets the removed one's input, or (inputs not kept) the first block its own
                hidden = self.calls[layer][b][0] if start == p else self.calls[self.kept[0]][b][0]
                for j in rerun:
                    call = self.calls[j][b]
                    if self.keep_inputs or j == self.kept[0]:
                        call[0] = hidden
                    _, rest, kwargs, by_keyword = call
                    out = self.layers[j](hidden_states=hidden, **kwargs) if by_keyword else self.layers[j](hidden, *rest, **kwargs)
                    sums[j] += self._change(hidden, out, b)
                    hidden = out[0] if isinstance(out, tuple) else out
        self.scores.update({j: v / self.count for j, v in sums.items()})
        self.calls[layer] = []


def layer_importance(teacher: Any, batches: Any) -> list[float]:
    """Block influence of each of the teacher's layers (LayerScores), in layer order."""
    scores = LayerScores(teacher, batches).scores
    return [scores[i] for i in sorted(scores)]


def choose_layers(teacher: Any, examples: Any, collate: Any, n: int, samples: int, device: Any) -> list[int]:
    """`--layer-selection importance`: on the first `samples` training examples, drop the layer with the lowest block
    influence, re-measure the layers that remain in the shortened model, and repeat until `n` are left.

    Re-measuring matters because a layer's influence changes once its neighbours are gone. Measured on SmolLM2
    (30 layers, benchmarks/distill_layers.py): scoring once and keeping the top n gave held-out perplexity 495
    (20 layers) and 6772 (15) right after the cut; re-measuring after each removal 207 and 2070-27453 (two runs; at
    15 layers the choice depends on the sample) (evenly spaced: 21164 and 1.5M). It re-runs, per removed layer, the
    layers after it on the sample (LayerScores)."""
    from torch.utils.data import DataLoader, Subset

    subset = Subset(examples, range(min(samples, len(examples))))
    batches = [{k: v.to(device) for k, v in b.items() if k in ("input_ids", "attention_mask")}
               for b in DataLoader(subset, batch_size=4, collate_fn=collate)]
    if count_layers(teacher) <= n:
        return list(range(count_layers(teacher)))
    scores = LayerScores(teacher, batches)
    while len(scores.kept) > n:
        scores.remove(min(scores.kept, key=scores.scores.__getitem__))
    return scores.kept


def student_from_layers(teacher: Any, n: int, kept: list[int] | None = None) -> tuple[Any, list[int]]:
    """A copy of `teacher` keeping `n` of its layers (`kept`, else evenly spaced); every weight is copied, none is random."""
    total = len(layer_stack(teacher)[1])
    if not 1 <= n < total:
        raise UsageError(f"--student-layers must be between 1 and {total - 1} (the teacher has {total} layers), got {n}")
    kept = kept or kept_layers(total, n)
    return keep_layers(teacher, kept), kept


def keep_layers(teacher: Any, kept: list[int]) -> Any:
    """A copy of `teacher` with only the layers `kept` (ascending), in a model built from `student_config`; every
    weight is the teacher's. Each block's `layer_idx` (its slot in the KV cache) is its new position."""
    stack, _ = layer_stack(teacher)
    student = type(teacher)(student_config(teacher.config, kept))
    position = {t: s for s, t in enumerate(kept)}
    state: dict[str, Any] = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(stack + "."):
            index, rest = key[len(stack) + 1:].split(".", 1)
            if int(index) not in position:
                continue
            key = f"{stack}.{position[int(index)]}.{rest}"
        state[key] = value.detach().clone()
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = set(getattr(student, "_tied_weights_keys", None) or [])
    missing = [m for m in missing if m not in tied and not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise UsageError(f"cannot copy the teacher's weights into the student ({(missing or unexpected)[0]}); "
                         "use --student-config instead")
    student.tie_weights()
    for slot, block in enumerate(layer_stack(student)[1]):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = slot
    return student


def student_from_config(spec: str, teacher: Any, task: str, tokenizer: Any, progress: bool) -> Any:
    """A student from a config.json (random init) or a model folder (its weights), with the teacher's labels."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = Path(spec).expanduser()
    if not path.exists():
        raise UsageError(f"--student-config {spec} does not exist; pass a config.json or a model folder")
    folder = path if path.is_dir() else path.parent
    _check_tokenizer(folder, tokenizer)
    labels = {}
    if task == "seq-cls":
        labels = {"num_labels": teacher.config.num_labels, "id2label": teacher.config.id2label,
                  "label2id": teacher.config.label2id, "pad_token_id": tokenizer.pad_token_id}
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    has_weights = path.is_dir() and any(folder.glob("*.safetensors"))
    if has_weights:
        from llmkit.models.load import from_pretrained_checked

        ref = resolve(str(folder))
        import torch

        extra = {**labels, "ignore_mismatched_sizes": True} if labels else {}
        return from_pretrained_checked(auto, ref, progress, dtype=torch.float32, **extra)
    try:
        cfg = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise UsageError(f"--student-config {spec}: not a model config ({str(e).splitlines()[0][:160]})") from None
    for k, v in labels.items():
        setattr(cfg, k, v)
    try:
        return auto.from_config(cfg)
    except ValueError as e:
        raise UsageError(f"--student-config {spec}: {str(e).splitlines()[0][:200]}") from None


def _check_tokenizer(folder: Path, tokenizer: Any) -> None:
    """A student folder with its own tokenizer must have the teacher's: KD compares distributions token by token."""
    if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer_config.json").exists():
        return
    from transformers import AutoTokenizer

    try:
        own = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError):
        return
    if own.get_vocab() != tokenizer.get_vocab():
        raise UsageError(f"--student-config {folder}: its tokenizer ({len(own)} tokens) differs from the teacher's "
                         f"({len(tokenizer)} tokens); teacher and student must share one vocabulary")


def check_vocab(teacher: Any, student: Any, tokenizer: Any) -> None:
    """Teacher and student logits must index the same tokens (trl#2215: found mid-run is too late)."""
    t = teacher.get_input_embeddings().num_embeddings
    s = student.get_input_embeddings().num_embeddings
    if s != t:
        raise UsageError(f"vocabulary mismatch: the teacher has {t} token embeddings and the student {s}; "
                         f"give the student config vocab_size={t} (the teacher's tokenizer has {len(tokenizer)} tokens)")
    if len(tokenizer) > s:
        raise UsageError(f"vocabulary mismatch: the tokenizer has {len(tokenizer)} tokens but the models embed only {s}")


def aligned_layers(kept: list[int] | None, student_layers: int, teacher_layers: int) -> list[int]:
    """The teacher layer each student layer imitates in the hidden-state loss."""
    if kept is not None:
        return kept
    return [round((j + 1) * teacher_layers / student_layers) - 1 for j in range(student_layers)]


def count_layers(model: Any) -> int:
    """The model's number of blocks, as its config declares it (else the length of its block list)."""
    declared = declared_layers(model.config)
    return declared if declared is not None else len(layer_stack(model)[1])
