"""Students for distillation: a copy of the teacher with layers dropped, or a model from a config.

    >>> student, kept = student_from_layers(teacher, 15, choose_layers(teacher, examples, collate, 15, 32, "cpu"))

`--student-layers N` keeps N of the teacher's layers: by default the ones that change the hidden states most
(`choose_layers`, re-measured after each removal), with `--layer-selection even` evenly spaced ones as DistilBERT /
DistilGPT2 did; embeddings, norms and heads are copied, nothing starts random. `--student-config` builds any
model sharing the teacher's tokenizer.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from llmkit.errors import UsageError
from llmkit.models import resolve

# Where each supported architecture keeps its stack of layers (the name of the ModuleList ends with it).
LAYER_STACKS: dict[str, str] = {
    "gpt2": "h",
    "llama": "layers",
    "mistral": "layers",
    "qwen2": "layers",
    "qwen3": "layers",
    "gemma": "layers",
    "bert": "encoder.layer",
    "roberta": "encoder.layer",
    "xlm-roberta": "encoder.layer",
}


def kept_layers(teacher_layers: int, n: int) -> list[int]:
    """`n` layer indices out of `teacher_layers`, evenly spaced, first and last included (6 -> 3: 0, 2, 5)."""
    if n == 1:
        return [0]
    return [round(i * (teacher_layers - 1) / (n - 1)) for i in range(n)]


def layer_stack(model: Any) -> tuple[str, Any]:
    """(qualified name, ModuleList) of the model's transformer layers, or a UsageError for other architectures."""
    import torch

    mtype = model.config.model_type
    suffix = LAYER_STACKS.get(mtype)
    if suffix is not None:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.ModuleList) and (name == suffix or name.endswith("." + suffix)):
                return name, module
    raise UsageError(f"--student-layers: layer extraction supports {', '.join(sorted(LAYER_STACKS))} models, and the teacher "
                     f"is a {mtype}; pass --student-config with a smaller config of the same tokenizer instead")


def layer_importance(teacher: Any, batches: Any) -> list[float]:
    """Block influence of each layer: the mean angular change 1 - cos(input, output) it makes to the hidden states
    of real tokens (ShortGPT, Men et al. 2024). Layers that barely turn the hidden state can go with least harm."""
    import torch

    _, layers = layer_stack(teacher)
    sums = [0.0] * len(layers)
    count = 0
    inputs: dict[int, Any] = {}
    mask: list[Any] = [None]

    def before(i: int) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            inputs[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def after(i: int) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(inputs.pop(i).float(), out.float(), dim=-1)
            sums[i] += float(((1 - cos) * mask[0]).sum())
        return hook

    handles = [h for i, layer in enumerate(layers) for h in (layer.register_forward_pre_hook(before(i), with_kwargs=True),
                                                             layer.register_forward_hook(after(i), with_kwargs=True))]
    try:
        with torch.no_grad():
            for batch in batches:
                mask[0] = batch["attention_mask"].float()
                count += int(mask[0].sum())
                teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return [v / max(count, 1) for v in sums]


def choose_layers(teacher: Any, examples: Any, collate: Any, n: int, samples: int, device: Any) -> list[int]:
    """`--layer-selection importance`: on the first `samples` training examples, drop the layer with the lowest block
    influence, re-measure the layers that remain in the shortened model, and repeat until `n` are left.

    Re-measuring matters because a layer's influence changes once its neighbours are gone. Measured on SmolLM2
    (30 layers, benchmarks/distill_layers.py): scoring once and keeping the top n gave held-out perplexity 495
    (20 layers) and 6772 (15) right after the cut; re-measuring after each removal 207 and 2070 (evenly spaced:
    21164 and 1.5M). It costs one pass over the sample per removed layer."""
    from torch.utils.data import DataLoader, Subset

    subset = Subset(examples, range(min(samples, len(examples))))
    batches = [{k: v.to(device) for k, v in b.items() if k in ("input_ids", "attention_mask")}
               for b in DataLoader(subset, batch_size=4, collate_fn=collate)]
    kept = list(range(count_layers(teacher)))
    model = teacher
    while len(kept) > n:
        scores = layer_importance(model, batches)
        kept.pop(min(range(len(kept)), key=scores.__getitem__))
        if len(kept) > n:
            model = student_from_layers(teacher, len(kept), kept)[0].to(device).eval()
    return kept


def student_from_layers(teacher: Any, n: int, kept: list[int] | None = None) -> tuple[Any, list[int]]:
    """A copy of `teacher` keeping `n` of its layers (`kept`, else evenly spaced); every weight is copied, none is random."""
    stack, layers = layer_stack(teacher)
    total = len(layers)
    if not 1 <= n < total:
        raise UsageError(f"--student-layers must be between 1 and {total - 1} (the teacher has {total} layers), got {n}")
    kept = kept or kept_layers(total, n)
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = n  # GPT-2 maps this onto n_layer
    if isinstance(getattr(cfg, "layer_types", None), list) and len(cfg.layer_types) == total:
        cfg.layer_types = [cfg.layer_types[i] for i in kept]  # per-layer attention kinds (sliding / full)
    student = type(teacher)(cfg)
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
    return student, kept


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
        from llmkit.models import from_pretrained_checked

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
    return int(model.config.num_hidden_layers)
