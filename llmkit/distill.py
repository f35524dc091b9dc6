"""Knowledge distillation: a smaller student learns the teacher's output distribution on the shared loop.

    >>> from llmkit.config import DistillConfig, load_recipe
    >>> from llmkit.distill import distill
    >>> distill(load_recipe("recipes/distill-smollm2-135m-shakespeare.yaml", ["out=runs/student"], cls=DistillConfig))

The student is the teacher with some layers dropped (`--student-layers N`; `--layer-selection auto`, the
default, keeps the N layers that change the hidden states most for causal LMs and evenly spaced ones, as
DistilBERT, for classifiers, where importance cost accuracy; llmkit.json records what `auto` resolved to;
embeddings, norms and heads copied: llmkit/training/students.py) or any model built from `--student-config` that shares
the teacher's tokenizer. `Distill` is an objective on the shared run lifecycle (llmkit/training/lifecycle.py): training is
`train.fit` with `DistillLoss` as the loss; the teacher runs in eval mode under no_grad, or not at all when its
top-k logits are cached on disk.

Teacher logit cache (`distill.cache_top_k=K`): the teacher runs once over the training set and its K largest
logits per token are stored as fp16 values + int32 ids, 6*K bytes per token (K=32: ~192 MB per million tokens,
against 98 GB for SmolLM2's full 49,152-entry distributions in fp16). The KD term then uses the teacher's
distribution renormalised over those K tokens; K=16-64 keeps nearly all of its probability mass. The cache is
keyed by teacher, data and K, so later student runs (other sizes, learning rates, seeds) skip the teacher's
forward pass and do not hold the teacher in memory while training.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkit.config import DistillConfig, KDConfig, ModelConfig
from llmkit.data.examples import Collator, IndexedExamples, Labels
from llmkit.errors import UsageError
from llmkit.models.refs import ModelRef, base_model_id, cache_folder, weights_fingerprint
from llmkit.progress import bar as progress_bar
from llmkit.runfolder import read_record, write_json
from llmkit.training.checkpoints import cached_tensors
from llmkit.training.chunked_loss import supports_chunked_loss
from llmkit.training.evaluation import evaluate_examples, full_precision, generation_speed, inference_speed, weight_bytes
from llmkit.training.lifecycle import Objective, Run, run
from llmkit.training.loop import TrainJob, TrainResult
from llmkit.training.losses import LoggedParts
from llmkit.training.outputs import Card
from llmkit.training.students import aligned_layers, check_vocab, choose_layers, count_layers, resolve_selection, student_from_config, student_from_layers

REPORT = "distill_report.json"


# --------------------------------------------------------------------------------------------------- loss


class DistillLoss(LoggedParts):
    """`TrainJob.loss_fn`: alpha * T^2 * KL + (1 - alpha) * CE (+ hidden cosine), over real tokens only."""

    def __init__(self, task: str, kd: KDConfig, accelerator: Any, teacher: Any = None, cache: TeacherCache | None = None,
                 align: list[int] | None = None, chunked: bool = False) -> None:
        self.task, self.kd, self.accelerator, self.teacher, self.cache, self.align = task, kd, accelerator, teacher, cache, align
        self.chunked = chunked  # causal LMs: `chunked_loss` below, never tokens x vocabulary logits
        super().__init__()

    def __call__(self, model: Any, batch: dict[str, Any]) -> Any:
        import torch

        from llmkit.training.losses import hidden_cosine_loss, kd_loss, kd_loss_topk

        kd, T = self.kd, self.kd.temperature
        index = batch.pop("index", None)
        if self.chunked:
            return self.chunked_loss(model, batch, index)
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
        self.keep(parts)
        return loss

    def chunked_loss(self, model: Any, batch: dict[str, Any], index: Any) -> Any:
        """The same loss (value and gradients) without the student's tokens x vocabulary logits, nor the teacher's.

        The student runs without its LM head (llmkit/training/chunked_loss.py); CE and the KD term are two chunk losses over
        the same head outputs, so each chunk of positions runs the head once for both. The KD term reads the cached
        top-k logits of those positions, or the live teacher's logits, computed a chunk at a time from its last hidden
        states. CE is over positions 0..S-2 (position s predicts label s+1), KD over every real token (the last one
        too), as in the plain path: the rows are all positions, with a -100 target at each row's last one.
        """
        import torch

        from llmkit.training.chunked_loss import WeightedChunks, chunked_head, cross_entropy_chunks, head_inputs, head_logits, kd_chunks
        from llmkit.training.losses import hidden_cosine_loss

        kd = self.kd
        hidden = kd.hidden_weight > 0
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        student = head_inputs(model, inputs, output_hidden_states=hidden)
        labels = batch["labels"]
        targets = torch.cat([labels[:, 1:], labels.new_full((len(labels), 1), -100)], dim=1).reshape(-1)
        mask = batch["attention_mask"].bool().reshape(-1)
        # the teacher's side of the KD term, for the flattened positions of a chunk: (values, ids) or (all logits, None)
        teacher: Callable[[Any], tuple[Any, Any]] | None = None  # None: the no-KD baseline (alpha 0, no hidden loss)
        live = None
        if self.cache is not None:
            values, indices = self.cache.lookup(index, labels.device)
            values, indices = values.reshape(-1, values.shape[-1]), indices.reshape(-1, indices.shape[-1])
            teacher = lambda rows: (values[rows], indices[rows])  # noqa: E731
        elif self.teacher is not None:
            with torch.no_grad(), self.accelerator.autocast():  # the teacher without its head: [B, S, H], not [B, S, V]
                live = head_inputs(self.teacher, inputs, output_hidden_states=hidden)

            def teacher(rows: Any) -> tuple[Any, Any]:
                with torch.no_grad(), self.accelerator.autocast():  # as the plain path's teacher forward
                    return head_logits(live, rows), None
        ce_valid = targets != -100
        terms = WeightedChunks({"ce_loss": (1 - kd.alpha, cross_entropy_chunks(targets, ce_valid.sum().clamp(min=1).float()))})
        if teacher is not None:
            terms.terms["kd_loss"] = (kd.alpha, kd_chunks(teacher, mask, kd.temperature))
        h, head = student.hidden, student.head
        loss = chunked_head()(h.reshape(-1, h.shape[-1]), head.weight, head.bias, student.transform,
                              ce_valid if teacher is None else ce_valid | mask, terms)
        parts = {name: torch.as_tensor(terms.totals.get(name, 0.0), device=loss.device).detach() for name in ("ce_loss", "kd_loss")}
        if hidden and live is not None:  # the cosine loss on hidden states, outside the head: through autograd as usual
            token_mask = batch["attention_mask"].bool()
            h_loss = hidden_cosine_loss([student.output.hidden_states[j + 1] for j in range(len(self.align))],
                                        [live.output.hidden_states[t + 1] for t in self.align], token_mask)
            loss = loss + kd.hidden_weight * h_loss
            parts["hidden_loss"] = h_loss.detach()
        self.keep(parts)
        return loss


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
        h.update(json.dumps([task, k, teacher_ref.name, weights_fingerprint(teacher_ref), examples.key, len(examples)]).encode())
        return h.hexdigest()[:24]

    @classmethod
    def build_or_load(cls, path: Path, teacher: Any, examples: Any, collate: Any, task: str, k: int, batch_size: int,
                      accelerator: Any, progress: bool) -> TeacherCache:
        """Load `path`, or (main process) compute it and write it atomically; other processes wait, then load."""
        tensors = cached_tensors(path, accelerator,
                                 lambda: _teacher_logits(teacher, examples, collate, task, k, batch_size, accelerator, progress))
        return cls(tensors["values"], tensors.get("indices"))


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


def measure(model: Any, task: str, examples: Any, speed_set: Any, collate: Collator, num_labels: int, batch_size: int) -> Measured:
    """Eval metrics (fp32, this process alone) and speed of one model, for the teacher-vs-student report."""
    metrics = {}
    if examples is not None:
        metrics = evaluate_examples(model, examples, task, collate.pad_id, batch_size=batch_size, num_labels=num_labels)
        metrics.pop("tokens", None)
        metrics.pop("samples", None)
    if task == "causal-lm":
        speed = generation_speed(model, speed_set.input_ids[0][:32])
    else:
        speed = inference_speed(model, speed_set, collate)
    return Measured(parameter_count(model), weight_bytes(model), metrics, speed, count_layers(model))


# ------------------------------------------------------------------------------------------------ the run


def distill(cfg: DistillConfig) -> Path:
    """Distill `cfg.teacher` into a smaller student; returns the output folder."""
    return run(Distill(cfg))


class Distill(Objective):
    # student.layer_selection is checked as resolved (check_resumed_selection): `auto` is recorded as importance / even
    resume_keys = ("task", "student.layers", "student.config", "data.block_size", "data.max_length",
                   "train.batch_size", "train.grad_accum", "train.seed")

    def model_config(self) -> ModelConfig:
        return self.cfg.teacher

    def labels(self, run: Run) -> Labels | None:
        """The teacher, loaded before the data: a classifier's labels are the teacher's."""
        cfg = self.cfg
        self.teacher = load_teacher(cfg, run.ref, run.progress, run.accelerator.device.type)
        if cfg.task == "seq-cls" and self.teacher.config.pad_token_id is None:
            self.teacher.config.pad_token_id = run.tokenizer.pad_token_id
        return Labels.from_config(self.teacher.config.id2label) if cfg.task == "seq-cls" else None

    def build(self, run: Run) -> None:
        cfg, teacher, tokenizer = self.cfg, self.teacher, run.tokenizer
        self.collate = Collator(tokenizer.pad_token_id, cfg.task == "causal-lm")
        self.kept = None
        self.selection = None if cfg.student.config else resolve_selection(cfg.student.layer_selection, cfg.task)
        if cfg.resume:
            self.check_resumed_selection(run.out)
        if cfg.student.config:
            student = student_from_config(cfg.student.config, teacher, cfg.task, tokenizer, run.progress)
        else:
            n = cfg.student.layers or max(1, count_layers(teacher) // 2)
            chosen = None
            if self.selection == "importance":
                chosen = choose_layers(teacher, run.data.train, self.collate, n, cfg.student.selection_samples, run.accelerator.device)
            student, self.kept = student_from_layers(teacher, n, chosen)
        check_vocab(teacher, student, tokenizer)
        self.align = aligned_layers(self.kept, count_layers(student), count_layers(teacher))
        if cfg.distill.hidden_weight > 0 and student.config.hidden_size != teacher.config.hidden_size:
            raise UsageError(f"--hidden-weight compares hidden states, but the student's are {student.config.hidden_size}-wide and "
                             f"the teacher's {teacher.config.hidden_size}; use --hidden-weight 0 or a student of the teacher's width")
        student.config.use_cache = False
        if cfg.task == "seq-cls":
            student.config.pad_token_id = tokenizer.pad_token_id
        self.student = student.to(run.accelerator.device)

    def check_resumed_selection(self, out: Path) -> None:
        """`auto` is recorded as what it resolved to, so a resume compares that (resume_keys compare the flags as given)."""
        before = ((read_record(out) or {}).get("student") or {}).get("layer_selection")
        if self.selection is not None and before not in (None, self.selection):
            raise UsageError(f"--resume: student.layer_selection was {before!r} in the run in {out}, now {self.selection!r}; "
                             f"resume with --layer-selection {before}")

    def amend_record(self, record: dict[str, Any]) -> None:
        record["student"]["kept_layers"] = self.kept
        if self.selection is not None:
            record["student"]["layer_selection"] = self.selection  # what `auto` resolved to

    def job(self, run: Run) -> TrainJob:
        """Measure the teacher, cache its logits if asked, then train the student with `DistillLoss`."""
        from llmkit.machine import summary as machine_summary

        cfg, data, teacher, student = self.cfg, run.data, self.teacher, self.student
        self.num_labels = len(data.labels.names) if data.labels else 2
        self.eval_batch_size = cfg.train.eval_batch_size or 2 * cfg.train.batch_size
        self.teacher_measured = None
        if run.main:  # the report is written by the main process; the others wait at the next collective
            run.say(f"measuring the teacher ({count_layers(teacher)} layers)")
            self.teacher_measured = measure(teacher, cfg.task, data.eval, data.eval or data.train, self.collate, self.num_labels,
                                            self.eval_batch_size)
        teacher_layers, teacher_params = count_layers(teacher), parameter_count(teacher)
        train_set: Any = data.train
        cache = None
        if cfg.distill.cache_top_k:
            k = min(cfg.distill.cache_top_k, student.get_input_embeddings().num_embeddings)
            path = cache_folder(cfg.distill.cache_dir, "teacher-logits") / f"{TeacherCache.key(run.ref, cfg.task, k, data.train)}.safetensors"
            run.say(f"teacher logits cache: {path}" + (" (found)" if path.exists() else " (computing once)"))
            cache = TeacherCache.build_or_load(path, teacher, data.train, self.collate, cfg.task, k, self.eval_batch_size,
                                               run.accelerator, run.progress)
            train_set = IndexedExamples(data.train)
        if cache is not None or (cfg.distill.alpha == 0 and cfg.distill.hidden_weight == 0):
            teacher = self.teacher = None  # not needed while training: its memory goes back
            import gc

            gc.collect()
        # the chunked head (llmkit/training/chunked_loss.py) when both sides' logits can come a chunk at a time: the student's
        # through its head, the teacher's from the cache or its own head (a 262k vocabulary: GBs of logits otherwise)
        chunked = (cfg.task == "causal-lm" and cfg.train.chunked_loss and supports_chunked_loss(student)
                   and (cache is not None or teacher is None or supports_chunked_loss(teacher)))
        loss = DistillLoss(cfg.task, cfg.distill, run.accelerator, teacher=teacher, cache=cache, align=self.align, chunked=chunked)
        run.say(f"distilling {run.ref.name} ({teacher_layers} layers, {teacher_params:,} parameters) into a "
                f"{count_layers(student)}-layer student ({parameter_count(student):,} parameters)"
                + (f", layers {self.kept}" if self.kept else "") + f", T={cfg.distill.temperature} alpha={cfg.distill.alpha}, "
                + machine_summary(run.record["machine"]))
        return TrainJob(student, train_set, data.eval, self.collate, cfg.task, cfg.train, run.out, num_labels=self.num_labels,
                        loss_fn=loss, log_extra=loss.log_extra, quiet=not run.progress, resume=cfg.resume)

    def save(self, run: Run, result: TrainResult, tmp: Path) -> Card:
        run.say("measuring the student")
        data = run.data
        with full_precision(run.accelerator, self.student) as fp32_student:  # without the training autocast, as users will run it
            measured = measure(fp32_student, self.cfg.task, data.eval, data.eval or data.train, self.collate, self.num_labels,
                               self.eval_batch_size)
        return save_student(self.cfg, run.ref, self.student, run.tokenizer, tmp, run.record, result, self.teacher_measured, measured)


def load_teacher(cfg: DistillConfig, ref: ModelRef, progress: bool, device: str) -> Any:
    from llmkit.models.load import architectures, load_causal_lm, load_seq_cls
    from llmkit.models.refs import adapter_task

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


def save_student(cfg: DistillConfig, ref: ModelRef, student: Any, tokenizer: Any, tmp: Path, record: dict[str, Any],
                 result: TrainResult, teacher: Measured, measured: Measured) -> Card:
    """The student folder: model, tokenizer and distill_report.json; the card compares teacher and student."""
    from llmkit import __version__

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

    rows = [("layers", teacher.layers, measured.layers), ("parameters", f"{teacher.parameters:,}", f"{measured.parameters:,}"),
            ("fp32 size (MB)", f"{teacher.size_bytes / 1e6:.1f}", f"{measured.size_bytes / 1e6:.1f}"),
            (unit.replace("_", " "), f"{teacher.speed:.1f}", f"{measured.speed:.1f}")]
    rows += [(k, f"{teacher.metrics[k]:.4f}", f"{measured.metrics[k]:.4f}") for k in measured.metrics if k in teacher.metrics]
    table = "| | teacher | student |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    intro = (f"Distilled from `{base_model_id(ref)}` with llmkit {__version__} ({cfg.task}, T={cfg.distill.temperature}, "
             f"alpha={cfg.distill.alpha}), {result.state.step} optimizer steps on `{cfg.data.train}`.")
    return Card(base=base_model_id(ref), plot_title=f"{ref.name} -> {measured.layers}-layer student ({cfg.task})", method="distill",
                intro=intro, extra=f"## Teacher and student\n\n{table}\n\n")
