"""Knowledge distillation: a smaller student learns the teacher's output distribution on the shared loop.

    >>> from llmkit.config import DistillConfig, load_recipe
    >>> from llmkit.distill import distill
    >>> distill(load_recipe("recipes/distill-smollm2-135m-shakespeare.yaml", ["out=runs/student"], cls=DistillConfig))

The student is the teacher with some layers dropped (`--student-layers N`; by default the N layers that change
the hidden states most, `--layer-selection even` for evenly spaced ones as DistilBERT / DistilGPT2; embeddings,
norms and heads copied) or any model built from `--student-config` that shares the teacher's tokenizer. Training is `train.fit` with `DistillLoss` as the loss:
the teacher runs in eval mode under no_grad, or not at all when its top-k logits are cached on disk.

Teacher logit cache (`distill.cache_top_k=K`): the teacher runs once over the training set and its K largest
logits per token are stored as fp16 values + int32 ids, 6*K bytes per token (K=32: ~192 MB per million tokens,
against 98 GB for SmolLM2's full 49,152-entry distributions in fp16). The KD term then uses the teacher's
distribution renormalised over those K tokens; K=16-64 keeps nearly all of its probability mass. The cache is
keyed by teacher, data and K, so later student runs (other sizes, learning rates, seeds) skip the teacher's
forward pass and do not hold the teacher in memory while training.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkit.config import DistillConfig, KDConfig
from llmkit.errors import UsageError
from llmkit.models import ModelRef, resolve
from llmkit.progress import bar as progress_bar

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
REPORT = "distill_report.json"


# ----------------------------------------------------------------------------------------------- students


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


# --------------------------------------------------------------------------------------------------- loss


class DistillLoss:
    """`TrainJob.loss_fn`: alpha * T^2 * KL + (1 - alpha) * CE (+ hidden cosine), over real tokens only."""

    def __init__(self, task: str, kd: KDConfig, accelerator: Any, teacher: Any = None, cache: TeacherCache | None = None,
                 align: list[int] | None = None) -> None:
        self.task, self.kd, self.accelerator, self.teacher, self.cache, self.align = task, kd, accelerator, teacher, cache, align
        self.sums: dict[str, float] = {}
        self.count = 0

    def __call__(self, model: Any, batch: dict[str, Any]) -> Any:
        import torch

        from llmkit.losses import hidden_cosine_loss, kd_loss, kd_loss_topk

        kd, T = self.kd, self.kd.temperature
        index = batch.pop("index", None)
        hidden = kd.hidden_weight > 0
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    output_hidden_states=hidden)
        # which positions count: real tokens for LMs (padding never), every example for classifiers
        mask = batch["attention_mask"].bool() if self.task == "causal-lm" else torch.ones(len(batch["input_ids"]), dtype=torch.bool,
                                                                                          device=out.logits.device)
        loss, parts = (1 - kd.alpha) * out.loss, {"ce_loss": out.loss.detach()}
        if kd.alpha == 0 and not hidden:  # plain training of the student (the no-KD baseline): no teacher needed
            kd_term = out.loss.new_zeros(())
        elif self.cache is not None:
            values, indices = self.cache.lookup(index, out.logits.device)
            kd_term = (kd_loss_topk(out.logits, values, indices, mask, T) if indices is not None
                       else kd_loss(out.logits, values, mask, T))
        else:
            with torch.no_grad(), self.accelerator.autocast():
                t_out = self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=hidden)
            kd_term = kd_loss(out.logits, t_out.logits, mask, T)
            if hidden:
                token_mask = batch["attention_mask"].bool()
                h = hidden_cosine_loss([out.hidden_states[j + 1] for j in range(len(self.align))],
                                       [t_out.hidden_states[t + 1] for t in self.align], token_mask)
                loss = loss + kd.hidden_weight * h
                parts["hidden_loss"] = h.detach()
        loss = loss + kd.alpha * kd_term
        parts["kd_loss"] = kd_term.detach()
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        return loss

    def log_extra(self) -> dict[str, Any]:
        """Mean loss parts since the last call (train.fit logs them beside the total loss)."""
        means = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        self.sums, self.count = {}, 0
        return means


# ------------------------------------------------------------------------------------------ teacher cache


class TeacherCache:
    """Teacher logits per training example: top-k (values, ids) per token for LMs, all logits for classifiers."""

    def __init__(self, values: Any, indices: Any | None) -> None:
        self.values, self.indices = values, indices

    def lookup(self, index: Any, device: Any) -> tuple[Any, Any | None]:
        i = index.cpu()
        values = self.values[i].to(device)
        return values, None if self.indices is None else self.indices[i].to(device)

    @staticmethod
    def key(teacher_ref: ModelRef, task: str, k: int, examples: Any) -> str:
        """Teacher, task, k and the examples (by their prepared-data key: a content hash, not a pass over every token)."""
        h = hashlib.sha256()
        h.update(json.dumps([task, k, teacher_ref.name, _fingerprint(teacher_ref), examples.key, len(examples)]).encode())
        return h.hexdigest()[:24]

    @classmethod
    def build_or_load(cls, path: Path, teacher: Any, examples: Any, collate: Any, task: str, k: int, batch_size: int,
                      accelerator: Any, progress: bool) -> TeacherCache:
        """Load `path`, or (main process) compute it and write it atomically; other processes wait, then load."""
        from safetensors.torch import load_file, save_file

        with accelerator.main_process_first():
            if not path.exists() and accelerator.is_main_process:
                tensors = _teacher_logits(teacher, examples, collate, task, k, batch_size, accelerator, progress)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                save_file(tensors, str(tmp))
                os.replace(tmp, path)
            tensors = load_file(str(path))
        return cls(tensors["values"], tensors.get("indices"))


def _fingerprint(ref: ModelRef) -> list[Any]:
    """What identifies the teacher's weights without hashing them: each weight file's name, size and mtime."""
    folders = [p for p in (ref.adapter, ref.path) if p is not None]
    files = []
    for p in folders:
        candidates = [p] if p.is_file() else sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")) + sorted(p.glob("*.gguf"))
        files += [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in candidates]
    return files


def _teacher_logits(teacher: Any, examples: Any, collate: Any, task: str, k: int, batch_size: int, accelerator: Any,
                    progress: bool) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(examples, batch_size=batch_size, collate_fn=collate)
    bar = progress_bar(len(loader), "caching teacher logits", "batch", enabled=progress)
    values, indices = [], []
    with torch.no_grad(), accelerator.autocast():
        for batch in loader:
            logits = teacher(input_ids=batch["input_ids"].to(accelerator.device),
                             attention_mask=batch["attention_mask"].to(accelerator.device)).logits.float()
            if task == "causal-lm":
                top = logits.topk(k, dim=-1)
                values.append(top.values.half().cpu())
                indices.append(top.indices.int().cpu())
            else:
                values.append(logits.cpu())
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if task == "causal-lm":
        # packed blocks all have block_size tokens, so the per-example tensors stack without padding
        return {"values": torch.cat(values), "indices": torch.cat(indices)}
    return {"values": torch.cat(values)}


def cache_dir(cfg: KDConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    from llmkit.models import cache_root

    return cache_root() / "teacher-logits"


class IndexedExamples:
    """The training examples, each carrying its position so the loss can find its cached teacher logits."""

    def __init__(self, examples: Any) -> None:
        self.examples = examples
        self.lengths = examples.lengths
        self.input_ids = examples.input_ids

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.examples[i], "index": i}

    @property
    def tokens(self) -> int:
        return self.examples.tokens


# ------------------------------------------------------------------------------------------------ measure


@dataclass
class Measured:
    parameters: int
    size_bytes: int  # fp32 weights as save_pretrained writes them (tied weights once)
    metrics: dict[str, float]
    speed: float  # generation tokens/s (causal-lm) or inference samples/s (seq-cls)
    layers: int

    def as_dict(self, unit: str) -> dict[str, Any]:
        return {"parameters": self.parameters, "size_bytes": self.size_bytes, "layers": self.layers,
                "metrics": self.metrics, unit: round(self.speed, 2)}


def parameter_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() lists tied weights once


def measure(model: Any, task: str, eval_loader: Any, speed_set: Any, collate: Any, num_labels: int) -> Measured:
    """Eval metrics (fp32, this process alone) and speed of one model, for the teacher-vs-student report."""
    from llmkit.metrics import evaluate_model, generation_speed, inference_speed, weight_bytes

    metrics = {}
    if eval_loader is not None:
        dev = next(model.parameters()).device
        batches = ({k: v.to(dev) for k, v in b.items()} for b in eval_loader)
        metrics = evaluate_model(model, batches, task, None, num_labels)
        metrics.pop("tokens", None)
        metrics.pop("samples", None)
    if task == "causal-lm":
        speed = generation_speed(model, speed_set.input_ids[0][:32])
    else:
        speed = inference_speed(model, speed_set, collate)
    return Measured(parameter_count(model), weight_bytes(model), metrics, speed, count_layers(model))


# ------------------------------------------------------------------------------------------------ command


def load_teacher(cfg: DistillConfig, ref: ModelRef, progress: bool, device: str) -> Any:
    from llmkit.models import adapter_task, architectures, load_causal_lm, load_seq_cls

    if cfg.task == "causal-lm":
        teacher = load_causal_lm(ref, device=device, dtype="float32", progress=progress)
    else:
        trained = adapter_task(ref) == "seq-cls" or any(a.endswith("ForSequenceClassification") for a in architectures(ref))
        if not trained:
            raise UsageError(f"--teacher {ref.name} is not a trained classifier; fine-tune one first "
                             "(llmkit finetune --task seq-cls ...) and pass its output folder")
        teacher = load_seq_cls(ref, device=device, progress=progress)
    teacher.eval().requires_grad_(False)
    return teacher


def distill(cfg: DistillConfig) -> Path:
    """Distill `cfg.teacher` into a smaller student; returns the output folder."""
    from accelerate.utils import set_seed

    from llmkit.data import Collator, Labels
    from llmkit.finetune import check_resume_matches, run_record, set_threads
    from llmkit.machine import summary as machine_summary
    from llmkit.models import load_tokenizer
    from llmkit.outputs import check_out_dir, run_guard
    from llmkit.prepare import prepare_data
    from llmkit.train import TrainJob, fit, full_precision, make_accelerator

    cfg.validate()
    out = Path(cfg.out).expanduser()
    check_out_dir(out, overwrite=cfg.overwrite, resume=cfg.resume)
    ref = resolve(cfg.teacher.name, allow_pickle=cfg.teacher.allow_pickle, trust_remote_code=cfg.teacher.trust_remote_code)
    if cfg.resume:
        check_resume_matches(out, cfg, ("task", "student.layers", "student.layer_selection", "student.config", "data.block_size", "data.max_length",
                                        "train.batch_size", "train.grad_accum", "train.seed"))
    set_threads(cfg.train.threads)
    accelerator = make_accelerator(cfg.train)
    main = accelerator.is_main_process
    progress = not cfg.quiet and main
    say = (lambda msg: print(msg, file=sys.stderr)) if not cfg.quiet and main else (lambda msg: None)
    tokenizer = load_tokenizer(ref)

    teacher = load_teacher(cfg, ref, progress, accelerator.device.type)
    labels = Labels.from_config(teacher.config.id2label) if cfg.task == "seq-cls" else None
    if cfg.task == "seq-cls" and teacher.config.pad_token_id is None:
        teacher.config.pad_token_id = tokenizer.pad_token_id
    with accelerator.main_process_first():
        data = prepare_data(cfg, tokenizer, labels, main=main)

    set_seed(cfg.train.seed)  # a config student's random init is the same on every process and every run
    kept = None
    if cfg.student.config:
        student = student_from_config(cfg.student.config, teacher, cfg.task, tokenizer, progress)
    else:
        n = cfg.student.layers or max(1, count_layers(teacher) // 2)
        chosen = None
        if cfg.student.layer_selection == "importance":
            chosen = choose_layers(teacher, data.train, Collator(tokenizer.pad_token_id, cfg.task == "causal-lm"), n,
                                   cfg.student.selection_samples, accelerator.device)
        student, kept = student_from_layers(teacher, n, chosen)
    check_vocab(teacher, student, tokenizer)
    align = aligned_layers(kept, count_layers(student), count_layers(teacher))
    if cfg.distill.hidden_weight > 0 and student.config.hidden_size != teacher.config.hidden_size:
        raise UsageError(f"--hidden-weight compares hidden states, but the student's are {student.config.hidden_size}-wide and the "
                         f"teacher's {teacher.config.hidden_size}; use --hidden-weight 0 or a student of the teacher's width")
    student.config.use_cache = False
    if cfg.task == "seq-cls":
        student.config.pad_token_id = tokenizer.pad_token_id
    student.to(accelerator.device)

    record = run_record(cfg, ref, data, accelerator)
    record["student"]["kept_layers"] = kept
    if main:
        from llmkit.outputs import start_run

        start_run(out, cfg.overwrite, cfg.resume, record)
    accelerator.wait_for_everyone()

    with run_guard(out, resume=cfg.resume, main=main):  # from here on a failure cleans up after itself
        collate = Collator(tokenizer.pad_token_id, cfg.task == "causal-lm")
        num_labels = len(labels.names) if labels else 2
        eval_loader = None
        if data.eval is not None:
            from torch.utils.data import DataLoader

            eval_loader = DataLoader(data.eval, batch_size=cfg.train.eval_batch_size or 2 * cfg.train.batch_size, collate_fn=collate)
        speed_set = data.eval or data.train
        teacher_measured = None
        if main:  # the report is written by the main process; the others wait at the next collective
            say(f"measuring the teacher ({count_layers(teacher)} layers)")
            teacher_measured = measure(teacher, cfg.task, eval_loader, speed_set, collate, num_labels)

        teacher_layers, teacher_params = count_layers(teacher), parameter_count(teacher)
        train_set: Any = data.train
        cache = None
        if cfg.distill.cache_top_k:
            k = min(cfg.distill.cache_top_k, student.get_input_embeddings().num_embeddings)
            path = cache_dir(cfg.distill) / f"{TeacherCache.key(ref, cfg.task, k, data.train)}.safetensors"
            say(f"teacher logits cache: {path}" + (" (found)" if path.exists() else " (computing once)"))
            cache = TeacherCache.build_or_load(path, teacher, data.train, collate, cfg.task, k,
                                               cfg.train.eval_batch_size or 2 * cfg.train.batch_size, accelerator, progress)
            train_set = IndexedExamples(data.train)
        if cache is not None or (cfg.distill.alpha == 0 and cfg.distill.hidden_weight == 0):
            teacher = None  # not needed while training: its memory goes back
            import gc

            gc.collect()
        loss = DistillLoss(cfg.task, cfg.distill, accelerator, teacher=teacher, cache=cache, align=align)
        say(f"distilling {ref.name} ({teacher_layers} layers, {teacher_params:,} parameters) into a "
            f"{count_layers(student)}-layer student ({parameter_count(student):,} parameters)"
            + (f", layers {kept}" if kept else "") + f", T={cfg.distill.temperature} alpha={cfg.distill.alpha}, "
            + machine_summary(record["machine"]))
        job = TrainJob(student, train_set, data.eval, collate, cfg.task, cfg.train, out, num_labels=num_labels,
                       loss_fn=loss, log_extra=loss.log_extra, quiet=cfg.quiet or not main, resume=cfg.resume)
        result = fit(job, accelerator)  # trains `student` in place
        if main:
            say("measuring the student")
            with full_precision(accelerator, student) as fp32_student:  # without the training autocast, as users will run it
                student_measured = measure(fp32_student, cfg.task, eval_loader, speed_set, collate, num_labels)
            save_student(cfg, ref, student, tokenizer, out, record, result, teacher_measured, student_measured)
        accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def save_student(cfg: DistillConfig, ref: ModelRef, student: Any, tokenizer: Any, out: Path, record: dict[str, Any], result: Any,
                 teacher: Measured, measured: Measured) -> None:
    """The student folder: model, tokenizer, distill_report.json, llmkit.json, loss.png, model card."""
    from llmkit import __version__
    from llmkit.finetune import base_model_id, run_summary
    from llmkit.outputs import RUN_FILE, command_line, install_files, model_card, plot_losses, write_json

    tmp = out / ".tmp-model"
    shutil.rmtree(tmp, ignore_errors=True)
    student.config.use_cache = True
    student.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)

    unit = "generation_tokens_per_s" if cfg.task == "causal-lm" else "inference_samples_per_s"
    metric = "perplexity" if cfg.task == "causal-lm" else "accuracy"
    disk = sum(f.stat().st_size for f in tmp.glob("model*.safetensors"))
    report: dict[str, Any] = {
        "task": cfg.task, "teacher_model": cfg.teacher.name,
        "teacher": teacher.as_dict(unit), "student": {**measured.as_dict(unit), "disk_bytes": disk, "kept_layers": record["student"]["kept_layers"]},
        "ratios": {
            "parameters": round(measured.parameters / teacher.parameters, 4),
            "size": round(measured.size_bytes / teacher.size_bytes, 4),
            "speed": round(measured.speed / teacher.speed, 3),
        },
        "settings": {"temperature": cfg.distill.temperature, "alpha": cfg.distill.alpha, "hidden_weight": cfg.distill.hidden_weight,
                     "cache_top_k": cfg.distill.cache_top_k, "steps": result.state.step},
    }
    if metric in teacher.metrics and metric in measured.metrics:
        report["ratios"][metric] = round(measured.metrics[metric] / teacher.metrics[metric], 4)
    write_json(tmp / REPORT, report)

    metrics = {f"eval_{k}": v for k, v in result.eval_metrics.items()}
    run = {**record, "llmkit": {**run_summary(result, metrics), "command": command_line(), "version": __version__}}
    plotted = plot_losses(out / "metrics.jsonl", tmp / "loss.png", f"{ref.name} -> {measured.layers}-layer student ({cfg.task})")
    rows = [("layers", teacher.layers, measured.layers), ("parameters", f"{teacher.parameters:,}", f"{measured.parameters:,}"),
            ("fp32 size (MB)", f"{teacher.size_bytes / 1e6:.1f}", f"{measured.size_bytes / 1e6:.1f}"),
            (unit.replace("_", " "), f"{teacher.speed:.1f}", f"{measured.speed:.1f}")]
    rows += [(k, f"{teacher.metrics[k]:.4f}", f"{measured.metrics[k]:.4f}") for k in measured.metrics if k in teacher.metrics]
    table = "| | teacher | student |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    intro = (f"Distilled from `{base_model_id(ref)}` with llmkit {__version__} ({cfg.task}, T={cfg.distill.temperature}, "
             f"alpha={cfg.distill.alpha}), {result.state.step} optimizer steps on `{cfg.data.train}`.")
    card = model_card(title=out.name, base=base_model_id(ref), task=cfg.task, method="distill", merged=False, metrics=metrics,
                      steps=result.state.step, command=command_line(), data=cfg.data.train, intro=intro, out=cfg.out,
                      extra=f"## Teacher and student\n\n{table}\n\n" + ("![loss curves](loss.png)\n" if plotted else ""))
    (tmp / "README.md").write_text(card, encoding="utf-8")
    write_json(tmp / RUN_FILE, run)
    install_files(tmp, out)  # everything was written above; now only renames, llmkit.json ("status: done") last
    from llmkit.train import remove_best

    remove_best(out / "checkpoints")
