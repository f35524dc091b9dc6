"""One run lifecycle for every training objective: `finetune`, `distill` and whatever comes next are each an
`Objective` that describes what differs; `run` does the rest, in this order:

    setup   guard the output folder, resolve the model, check --resume matches, threads, accelerator, tokenizer,
            objective.labels (distill loads its teacher here), prepare the data, seed, objective.build
    record  llmkit.json (the resolved recipe + machine facts), marked "running"
    train   objective.job -> train.fit (checkpoints, eval, resume), all inside outputs.run_guard
    save    objective.save writes the model into OUT/.tmp-model; outputs.publish adds llmkit.json, loss.png and the
            model card, then renames everything into OUT
    cleanup accelerator.end_training (finishes --report-to's tracker runs)

    >>> from llmkit.config import load_recipe
    >>> from llmkit.finetune import Finetune
    >>> run(Finetune(load_recipe("recipes/minilm-l6-sentiment-lora.yaml", ["out=runs/sentiment"])))

Order matters for "nothing is lost": every check that can fail on user input (flags, model, columns, labels,
lengths, the output folder) runs before the output folder is touched, and from then on a failure leaves either
nothing or a folder `--resume` continues.
"""

from __future__ import annotations

import abc
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit.config import ModelConfig, RunConfig, TrainConfig
from llmkit.data.examples import Labels
from llmkit.data.prepare import Prepared, prepare_data
from llmkit.errors import UsageError
from llmkit.models.refs import ModelRef, resolve
from llmkit.runfolder import TMP_MODEL, read_record
from llmkit.training.loop import TrainJob, TrainResult, fit
from llmkit.training.outputs import Card, check_out_dir, publish, run_guard, start_run
from llmkit.training.trackers import make_trackers, require_trackers, tracking


@dataclass
class Run:
    """What every objective gets: the resolved model, the accelerator, the tokenizer, the data and the record."""

    cfg: Any  # FinetuneConfig, DistillConfig, ...
    out: Path
    ref: ModelRef
    accelerator: Any
    tokenizer: Any
    data: Prepared | None = None
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def progress(self) -> bool:
        """Progress bars and messages: on the main process, unless --quiet."""
        return not self.cfg.quiet and self.main

    def say(self, msg: str) -> None:
        if self.progress:
            print(msg, file=sys.stderr)


class Objective(abc.ABC):
    """What a training command is beyond the shared lifecycle: which model, how it is built, its loss, what it saves."""

    resume_keys: tuple[str, ...] = ()  # settings a --resume must not change (llmkit.json of the run vs now)

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg: Any = cfg

    def model_config(self) -> ModelConfig:
        """The model the run starts from (finetune: --model; distill: --teacher)."""
        return self.cfg.model

    def labels(self, run: Run) -> Labels | None:
        """Labels fixed before the data is read (distill: the teacher's); None lets the data decide."""
        return None

    @abc.abstractmethod
    def build(self, run: Run) -> None:
        """Make the model(s) to train; the data is prepared and the seed set."""

    def amend_record(self, record: dict[str, Any]) -> None:  # noqa: B027 (an optional hook: most objectives add nothing)
        """Add what this objective knows to llmkit.json before the run starts."""

    @abc.abstractmethod
    def job(self, run: Run) -> TrainJob:
        """What `fit` trains, with which loss; runs inside the guard (a failure here cleans up)."""

    @abc.abstractmethod
    def save(self, run: Run, result: TrainResult, tmp: Path) -> Card:
        """Write the trained model and tokenizer (and any report) into `tmp`; say what the model card adds."""


def run(objective: Objective) -> Path:
    """Run `objective` from validation to the finished model folder; returns the folder."""
    cfg = objective.cfg
    cfg.validate()  # flags, the output folder and the model are checked before torch is even imported
    require_trackers(cfg.train.report_to)  # --report-to's packages are installed
    out = Path(cfg.out).expanduser()
    check_out_dir(out, overwrite=cfg.overwrite, resume=cfg.resume)
    m = objective.model_config()
    ref = resolve(m.name, allow_pickle=m.allow_pickle, trust_remote_code=m.trust_remote_code)
    if cfg.resume:
        check_resume_matches(out, cfg, objective.resume_keys)
    from accelerate.utils import set_seed

    from llmkit.models.load import load_tokenizer

    set_threads(cfg.train.threads)
    accelerator = make_accelerator(cfg.train, make_trackers(cfg.train.report_to, out, cfg.quiet))
    current = Run(cfg, out, ref, accelerator, load_tokenizer(ref))
    labels = objective.labels(current)
    with accelerator.main_process_first():  # the main process prepares (or finds) the data; the others then open it
        current.data = prepare_data(cfg, current.tokenizer, labels, main=current.main)
    set_seed(cfg.train.seed)  # new heads, LoRA matrices and random students start the same on every process and run
    from llmkit.training.sharding import load_once

    with load_once(accelerator, cfg.train.fsdp):  # --fsdp: rank 0 alone reads the weights (llmkit/training/sharding.py)
        objective.build(current)

    current.record = run_record(cfg, ref, current.data, accelerator)
    objective.amend_record(current.record)
    if current.main:
        start_run(out, cfg.overwrite, cfg.resume, current.record)
    accelerator.wait_for_everyone()
    # from here on a failure cleans up after itself; --report-to's trackers log the run (marked failed if it fails)
    with run_guard(out, resume=cfg.resume, main=current.main), tracking(accelerator, out, current.record, cfg.quiet):
        job = objective.job(current)
        clock = compile_model(job, current) if cfg.train.compile else None
        result = fit(job, accelerator)
        result.compile_seconds = clock.seconds() if clock else None
        if current.main:
            tmp = out / TMP_MODEL
            shutil.rmtree(tmp, ignore_errors=True)
            card = objective.save(current, result, tmp)
            publish(tmp, out, cfg, current.record, result, card)
        accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def compile_model(job: TrainJob, current: Run) -> Any:
    """--compile: the blocks of what `fit` trains (after the objective's own uses of the model, e.g. preference
    reference log-probs, which would otherwise compile an inference graph first); returns speedups' clock."""
    from llmkit.training.speedups import compile_blocks

    clock = compile_blocks(job.model, current.accelerator.device.type)
    current.say("--compile: transformer blocks compiled with torch.compile; the first step builds their kernels")
    return clock


def resolve_precision(name: str) -> str:
    """`auto`: bf16 on GPUs that support it, fp16 on other GPUs; on CPU bf16 where the hardware has it, else fp32.

    Weights, optimizer state and evaluation stay fp32 either way; autocast only runs the matmuls in bf16.
    """
    import torch

    if name != "auto":
        if name == "fp16" and not torch.cuda.is_available():
            raise UsageError("--mixed-precision fp16 needs a GPU; use bf16 or no on CPU")
        return name
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    from llmkit.machine import cpu_has_amx

    return "bf16" if cpu_has_amx() else "no"


def make_accelerator(cfg: TrainConfig, log_with: list[Any] | None = None) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration

    # Accelerate keeps its settings in a process-wide singleton; a second run from Python (tests, notebooks)
    # may use another precision. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    from llmkit.models.load import pick_device

    return Accelerator(
        # cpu=True on machines without an accelerator: only then does Accelerate treat torchrun's WORLD_SIZE
        # as a multi-process CPU job (gloo); otherwise every process would train alone on all the data.
        cpu=pick_device() == "cpu",
        gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision=resolve_precision(cfg.mixed_precision),
        dataloader_config=DataLoaderConfiguration(even_batches=True),
        log_with=log_with,  # --report-to (llmkit/training/trackers.py)
    )


def set_threads(threads: int) -> None:
    """Physical cores shared among this machine's processes: oversubscribed BLAS threads slow training down."""
    import torch

    from llmkit.machine import physical_cores

    if not threads:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = max(1, physical_cores() // local)
    torch.set_num_threads(threads)


def check_resume_matches(out: Path, cfg: Any, keys: tuple[str, ...]) -> None:
    """A resumed run must be the same run: other data or another model would silently mix two trainings."""
    before = read_record(out) or {}
    now = cfg.to_dict()
    for key in keys:
        section, _, name = key.partition(".")
        old = before.get(section, {}).get(name) if name else before.get(section)
        new = now[section][name] if name else now[section]
        if old is not None and old != new:
            raise UsageError(f"--resume: {key} was {old!r} in the run in {out}, now {new!r}; resume with the same settings")


def run_record(cfg: Any, ref: ModelRef, data: Prepared, accelerator: Any) -> dict[str, Any]:
    """llmkit.json: the resolved recipe, with the model reference made absolute so the folder can move, and the
    machine it ran on (CPU and flags, threads, the precision `auto` resolved to)."""
    from llmkit.machine import facts
    from llmkit.models.templates import tool_format

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
    if data.chat is not None:
        # how tool calls are written for this model: serve and generate decide the same way from the saved template
        record["tool_format"] = tool_format(data.chat.template)
    if data.train.dropped or (data.eval and data.eval.dropped):
        record["examples"]["dropped"] = {"train": data.train.dropped, "eval": data.eval.dropped if data.eval else 0}
    record["machine"] = facts(accelerator.device.type, accelerator.mixed_precision, accelerator.num_processes)
    return record


def _abs(spec: str) -> str:
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else spec
