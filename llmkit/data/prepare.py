"""Prepared data: the user's files tokenized once into Arrow tables in llmkit's cache, and reused.

    >>> from llmkit.data.prepare import prepare_data
    >>> data = prepare_data(cfg, tokenizer)       # data.train, data.eval: ExampleSets; data.key, data.folder
    $ llmkit prepare --model smollm2-135m --data big.txt --block-size 256   # the same, ahead of time

Three passes, memory flat in the size of the data:
1. check: every row is read and checked (llmkit/data/rows.py; plain text is checked for UTF-8 and cut into ~1 MB
   pieces), so a bad row at line 4,000,000 is an error before anything is tokenized;
2. encode: pieces of rows are tokenized by `data.num_proc` worker processes (default: this machine's cores), each
   writing its part as int32 Arrow;
3. assemble, in order: text is packed into `--block-size` blocks with EOS between documents, chat / prompt-response
   rows are packed (`--packing`) or kept, and the result is one Arrow file per split.

The cache (`$LLMKIT_CACHE/data/KEY/`) is keyed on what the result depends on: each input file's absolute path, size
and mtime, the tokenizer (its whole definition, special tokens and chat template), every data setting and the
format version below. It is written under a temporary name and renamed when complete, so a killed preparation
is never used; `--rebuild-data` ignores what is there. `datasets`' own fingerprints are not relied on: their
misses and false hits are a long list of issues in every peer.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit.atomic import atomic_path
from llmkit.data.encoding import Assembler, run_tasks
from llmkit.data.examples import ExampleSet, Labels
from llmkit.data.files import Source, find_sources, scan_text
from llmkit.data.rows import Plan, make_plan, normalize, read_arrow
from llmkit.errors import UsageError
from llmkit.runfolder import read_json

FORMAT_VERSION = 2  # bump when what a key's folder holds changes (2: tool conversations in a template's own tool format)
META = "meta.json"
TASK_BYTES = 4 << 20  # plain text per encode task
TASK_ROWS = 4096  # rows per encode task


@dataclass
class Prepared:
    """Tokenized data and what the model needs to know about it."""

    train: ExampleSet
    eval: ExampleSet | None
    labels: Labels | None
    chat: Any = None  # ChatEncoder for chat data: the template it was rendered with, and its end-of-turn tokens
    added_tokens: tuple[str, ...] = ()  # special tokens the template needed and the tokenizer lacked (embeddings grow)
    key: str = ""
    folder: Path | None = None
    report: dict[str, Any] = field(default_factory=dict)  # meta.json: rows, tokens, dropped rows, seconds


@dataclass
class Split:
    """One input to prepare: its sources, how to read them, and the settings its examples depend on."""

    name: str  # "train" / "eval"
    spec: str  # what the user passed
    sources: list[Source]
    plan: Plan
    labels: Labels | None = None  # known classes (eval data, a teacher's), else inferred from the rows
    packing: bool = False
    limit: int = 0  # stop after this many examples (0 = all)


def cache_folder() -> Path:
    from llmkit.models.refs import cache_root

    return cache_root() / "data"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Everything tokenizing depends on: the whole tokenizer definition, special tokens, chat template."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.special_tokens_map, tokenizer.eos_token_id, getattr(tokenizer, "chat_template", None),
                         getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None)],
                        sort_keys=True, default=str).encode())
    return h.hexdigest()


def data_key(splits: list[Split], tokenizer: Any, settings: dict[str, Any]) -> str:
    facts = {"version": FORMAT_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer), "settings": settings,
             "splits": [{"name": s.name, "inputs": [src.fingerprint() for src in s.sources], "plan": s.plan.__dict__,
                         "labels": s.labels.names if s.labels else None, "packing": s.packing, "limit": s.limit} for s in splits]}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:20]


# ------------------------------------------------------------------------------------------ entry points


def prepare_data(cfg: Any, tokenizer: Any, labels: Labels | None = None, *, main: bool = True) -> Prepared:
    """Train (and eval) examples of a FinetuneConfig / DistillConfig, from the cache or built into it.

    Every data error is raised here, before a model is loaded or a folder written. `main`: under torchrun only the
    main process builds (it goes first); the others find the finished cache.
    """
    from llmkit.data.chat import ChatEncoder
    from llmkit.models.templates import add_template_tokens, resolve_template

    d, task = cfg.data, cfg.task
    if getattr(cfg, "objective", "sft") == "grpo":
        return prepare_prompts(cfg, tokenizer, main=main)
    train_name, train_sources = find_sources(d.train, task=task, what="--data")
    eval_spec = find_sources(d.eval, task=task, what="--eval-data") if d.eval else None
    plan = make_plan(train_sources, task, d)
    objective = getattr(cfg, "objective", "sft")
    if (plan.kind == "preference") != (objective != "sft"):
        raise UsageError(f"{d.train} holds preference pairs ('chosen'/'rejected'); train on them with --objective dpo (or ipo, "
                         "simpo, orpo)" if plan.kind == "preference" else
                         f"--objective {objective} needs preference pairs: rows with 'prompt', 'chosen' and 'rejected' (or "
                         f"'chosen'/'rejected' conversations); {d.train} has none")
    chat, added = None, ()
    if plan.kind in ("chat", "preference"):
        model_name = cfg.model.name if hasattr(cfg, "model") else cfg.teacher.name
        template = resolve_template(tokenizer, d.chat_template, model_name)
        added = tuple(add_template_tokens(tokenizer, template))
        chat = ChatEncoder(tokenizer, template, d.train_on_prompt)
    elif d.chat_template or d.train_on_prompt:
        raise UsageError(f"--chat-template and --train-on-prompt are for chat data; {d.train} holds no conversations "
                         "('messages', 'conversations' or 'prompt'/'completion' columns, or pass --format)")
    if d.eval_split > 0 and not d.eval and d.packing:
        raise UsageError("data.eval_split cannot split packed rows; pass --eval-data for evaluation with --packing")
    # with an eval split the whole set is needed before the first examples are known; otherwise a quick trial
    # (--max-train-samples) stops tokenizing once it has its examples
    early = d.eval_split == 0 or bool(d.eval)
    splits = [Split("train", train_name, train_sources, plan, labels, d.packing, d.max_train_samples if early else 0)]
    if eval_spec is not None:
        eval_plan = make_plan(eval_spec[1], task, d)
        if eval_plan.kind != plan.kind and "preference" in (eval_plan.kind, plan.kind):
            raise UsageError(f"--eval-data {d.eval} and --data {d.train} must both be preference pairs")
        if (eval_plan.kind == "chat") != (plan.kind == "chat"):
            raise UsageError(f"--eval-data {d.eval} and --data {d.train} must both be conversations or both plain text")
        splits.append(Split("eval", eval_spec[0], eval_spec[1], eval_plan, labels, False, d.max_eval_samples))
    settings = {"task": task, "block_size": d.block_size, "max_length": d.max_length,
                "template": chat.template if chat else None, "train_on_prompt": d.train_on_prompt}
    if d.streaming:  # training data comes from the stream; only held-out data is prepared
        return _streaming(cfg, splits, tokenizer, chat, added, settings, main)
    key = data_key(splits, tokenizer, settings)
    folder = cache_folder() / key
    quiet = cfg.quiet or not main
    meta = load_or_build(folder, splits, tokenizer, chat, d, task, rebuild=d.rebuild and main, main=main, quiet=quiet)
    if chat is not None:
        chat.end_of_turn = set(meta.get("end_of_turn", []))
    labels = Labels(**meta["labels"]) if meta.get("labels") else labels
    train = examples(folder, "train", meta, key)
    evals = examples(folder, "eval", meta, key) if eval_spec is not None else None
    if evals is None and d.eval_split > 0:
        train, evals = split(train, d.eval_split, cfg.train.seed)
    return Prepared(train.head(d.max_train_samples), evals.head(d.max_eval_samples) if evals is not None else None,
                    labels, chat, added, key, folder, meta)


def _streaming(cfg: Any, splits: list[Split], tokenizer: Any, chat: Any, added: tuple[str, ...], settings: dict[str, Any],
               main: bool) -> Prepared:
    from llmkit.data.streaming import StreamingExamples

    d, train = cfg.data, splits[0]
    evals, key, folder, meta = None, "", None, {"splits": {}}
    if len(splits) > 1:
        key = data_key(splits[1:], tokenizer, settings)
        folder = cache_folder() / key
        meta = load_or_build(folder, splits[1:], tokenizer, chat, d, cfg.task, rebuild=d.rebuild and main, main=main,
                             quiet=cfg.quiet or not main)
        evals = examples(folder, "eval", meta, key).head(d.max_eval_samples)
        if chat is not None:
            chat.end_of_turn = set(meta.get("end_of_turn", []))
    job = {"tokenizer": tokenizer, "chat": chat, "labels": None, "max_length": d.max_length, "block_size": d.block_size}
    stream = StreamingExamples(train.spec, train.sources, train.plan, job, block_size=d.block_size, packing=d.packing,
                               seed=cfg.train.seed, buffer=d.shuffle_buffer, rank=int(os.environ.get("RANK", 0)),
                               world=int(os.environ.get("WORLD_SIZE", 1)))
    if chat is not None and not chat.end_of_turn:
        # the saved model must know which token ends a reply (generation stops there): encoding one row tells
        next(iter(StreamingExamples(train.spec, train.sources, train.plan, job, block_size=d.block_size, packing=False, seed=0, buffer=0)))
    return Prepared(stream, evals, None, chat, added, key, folder, meta)  # type: ignore[arg-type]


def prepare_prompts(cfg: Any, tokenizer: Any, *, main: bool = True) -> Prepared:
    """--objective grpo: PromptSets (llmkit/data/prompts.py) for training, and for eval from --eval-data or
    data.eval_split; cached under a key of the files, the tokenizer and the template, like all prepared data."""
    from llmkit.data.chat import ChatEncoder
    from llmkit.data.prompts import PromptSet, read_prompts
    from llmkit.models.templates import resolve_template

    d = cfg.data
    encoder = None
    if d.chat_template or getattr(tokenizer, "chat_template", None):
        encoder = ChatEncoder(tokenizer, resolve_template(tokenizer, d.chat_template, cfg.model.name))
    specs = {"train": d.train, **({"eval": d.eval} if d.eval else {})}
    inputs = {name: [s.fingerprint() for s in find_sources(spec, task="causal-lm", what="--data")[1]] for name, spec in specs.items()}
    facts = [FORMAT_VERSION, "prompts", tokenizer_fingerprint(tokenizer), encoder.template if encoder else None, inputs]
    key = "prompts-" + hashlib.sha256(json.dumps(facts, default=str).encode()).hexdigest()[:20]
    folder = cache_folder() / key
    if not (folder / "prompts.json").exists() or (d.rebuild and main):
        splits = {name: read_prompts(spec, tokenizer, encoder, "--data" if name == "train" else "--eval-data") for name, spec in specs.items()}
        with atomic_path(folder, sweep=True) as tmp:
            tmp.mkdir()
            (tmp / "prompts.json").write_text(json.dumps(splits), encoding="utf-8")
    splits = read_json(folder / "prompts.json")
    train = PromptSet(splits["train"], f"{key}:train")
    evals = PromptSet(splits["eval"], f"{key}:eval") if "eval" in splits else None
    if evals is None and d.eval_split > 0:
        import random

        idx = list(range(len(train)))
        random.Random(cfg.train.seed).shuffle(idx)
        n_eval = max(1, round(len(idx) * d.eval_split))
        if n_eval >= len(idx):
            raise UsageError(f"data.eval_split={d.eval_split} leaves no training prompts out of {len(idx)}; lower it or pass --eval-data")
        train, evals = (PromptSet([train.rows[i] for i in sorted(part)], f"{train.key}:{tag}")
                        for part, tag in ((idx[n_eval:], "train"), (idx[:n_eval], "eval")))
    return Prepared(train.head(d.max_train_samples), evals.head(d.max_eval_samples) if evals is not None else None, None,
                    encoder, (), key, folder, {"rows": len(train)})


def prepare_eval(spec: str, tokenizer: Any, *, task: str, block_size: int, max_length: int, labels: Labels | None,
                 text_column: str = "text", text_pair_column: str | None = None, label_column: str = "label",
                 chat: Any = None, data_format: str = "text", limit: int = 0, quiet: bool = True) -> tuple[ExampleSet, Path]:
    """Examples of one evaluation file (llmkit evaluate, quantize's gate), through the same cache.

    Conversations need `chat` (a ChatEncoder: the template and which tokens are scored); text is packed into
    `block_size` windows, classification rows truncated to `max_length` with `labels` (the model's classes).
    """
    from llmkit.config import DataConfig

    d = DataConfig(train=spec, text_column=text_column, text_pair_column=text_pair_column, label_column=label_column,
                   block_size=block_size, max_length=max_length, format=data_format if chat is not None else "text")
    name, sources = find_sources(spec, task=task, what="--data")
    plan = make_plan(sources, task, d)
    if chat is not None and plan.kind not in ("chat", "preference"):
        raise UsageError(f"{spec} holds no conversations (no 'messages', 'conversations' or 'prompt'/'completion' columns)")
    s = Split("eval", name, sources, plan, labels, False, limit)
    key = data_key([s], tokenizer, {"task": task, "block_size": block_size, "max_length": max_length,
                                    "template": chat.template if chat is not None else None})
    folder = cache_folder() / key
    meta = load_or_build(folder, [s], tokenizer, chat, d, task, rebuild=False, main=True, quiet=quiet, say_where=False)
    if chat is not None:
        chat.end_of_turn = set(meta.get("end_of_turn", []))
    return examples(folder, "eval", meta, key).head(limit), folder


def examples(folder: Path, name: str, meta: dict[str, Any], key: str) -> ExampleSet:
    info = meta["splits"][name]
    return ExampleSet(table=read_arrow(folder / f"{name}.arrow"), dropped=info.get("dropped", 0), key=f"{key}:{name}")


def split(data: ExampleSet, fraction: float, seed: int) -> tuple[ExampleSet, ExampleSet]:
    """`data.eval_split`: a seeded random share of the rows held out (a view, nothing copied)."""
    import random

    idx = list(range(len(data)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, round(len(idx) * fraction))
    if n_eval >= len(idx):
        raise UsageError(f"data.eval_split={fraction} leaves no training examples out of {len(idx)}; lower it or pass --eval-data")
    # rows dropped before the split are counted once, with the training rows they were read among
    return (data.select(sorted(idx[n_eval:]), tag=f":split{fraction}:{seed}:train"),
            data.select(sorted(idx[:n_eval]), dropped=0, tag=f":split{fraction}:{seed}:eval"))


def load_or_build(folder: Path, splits: list[Split], tokenizer: Any, chat: Any, d: Any, task: str, *, rebuild: bool,
                  main: bool, quiet: bool, say_where: bool = True) -> dict[str, Any]:
    """`quiet`: no progress; `say_where`: name the cache folder (training commands do; evaluate keeps stderr for results)."""
    say = (lambda msg: None) if quiet or not say_where else (lambda msg: print(msg, file=sys.stderr))
    meta_path = folder / META
    if meta_path.exists() and not rebuild:
        meta = read_json(meta_path)
        say(f"prepared data: {folder} (cached; built in {meta['seconds']:.1f} s; --rebuild-data to build again)")
    elif not main:
        raise UsageError(f"the main process did not prepare the data in {folder}; see its error")
    else:
        say(f"preparing data into {folder}")
        meta = build(folder, splits, tokenizer, chat, d, task, quiet)
        say(f"prepared data: {folder} in {meta['seconds']:.1f} s")
    for s in splits:
        info = meta["splits"][s.name]
        if info.get("identical"):
            print(f"warning: dropped {info['identical']} of {info['rows']} pairs of {s.spec} whose chosen and rejected responses "
                  "are identical (no preference to learn)", file=sys.stderr)
        if info.get("dropped"):
            print(f"warning: dropped {info['dropped']} of {info['rows']} rows of {s.spec} whose response is cut off entirely "
                  f"by --block-size {d.block_size} (first: {info['first_dropped']}); raise --block-size to keep them", file=sys.stderr)
    return meta


# ------------------------------------------------------------------------------------------ building


def build(folder: Path, splits: list[Split], tokenizer: Any, chat: Any, d: Any, task: str, quiet: bool) -> dict[str, Any]:
    """Prepare every split into a temporary folder, then rename it to `folder` (a killed run leaves no usable cache)."""
    start = time.perf_counter()
    # `.tmp-KEY-PID`, swept by the next build of this key once its process is gone; an existing folder
    # (--rebuild-data) goes only once the new one is complete
    with atomic_path(folder, sweep=True) as tmp:
        tmp.mkdir()
        meta: dict[str, Any] = {"version": FORMAT_VERSION, "splits": {}, "labels": None, "end_of_turn": []}
        labels = splits[0].labels
        for s in splits:
            s.labels = s.labels or labels
            info, labels_found, eot = build_split(tmp, s, tokenizer, chat, d, task, quiet)
            labels = labels or labels_found
            meta["splits"][s.name] = info
            meta["end_of_turn"] = sorted(set(meta["end_of_turn"]) | eot)
        meta["labels"] = {"names": labels.names, "ints": labels.ints} if labels else None
        meta["seconds"] = round(time.perf_counter() - start, 2)
        meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        (tmp / META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        for part in tmp.glob("part-*"):
            part.unlink()
    return meta


def build_split(tmp: Path, s: Split, tokenizer: Any, chat: Any, d: Any, task: str, quiet: bool
                ) -> tuple[dict[str, Any], Labels | None, set[int]]:
    from llmkit.progress import bar

    labels = s.labels
    if s.plan.kind == "text-files":
        pieces, rows = [], 0
        for i, src in enumerate(s.sources):
            ranges, nonempty = scan_text(src)
            if nonempty:  # a blank file is no document (and no EOS)
                pieces += [(i, a, b, k == 0) for k, (a, b) in enumerate(ranges)]
                rows += 1
        if not pieces:
            raise UsageError(f"{s.spec}: every row of column 'text' is empty; there is nothing to train on")
        tasks: list[Any] = []
        size = 0
        for p in pieces:
            if not tasks or size >= TASK_BYTES:
                tasks.append([])
                size = 0
            tasks[-1].append(p)
            size += p[2] - p[1]
        units = [sum(p[2] - p[1] for p in t) for t in tasks]
        unit = "MB"
    else:
        reading = bar(None, f"checking {s.name} data", "row", enabled=not quiet)
        rows_path = tmp / f"rows-{s.name}.arrow"
        norm = normalize(s.spec, s.sources, s.plan, rows_path, labels, progress=reading)
        if reading is not None:
            reading.close()
        labels, rows = norm.labels, norm.rows
        tasks = [(a, min(a + TASK_ROWS, rows)) for a in range(0, rows, TASK_ROWS)]
        units = [b - a for a, b in tasks]
        unit = "row"
    job = {"kind": s.plan.kind, "tokenizer": tokenizer, "chat": chat, "sources": s.sources, "labels": labels, "task": task,
           "block_size": d.block_size, "max_length": d.max_length, "tmp": tmp, "split": s.name,
           "rows": tmp / f"rows-{s.name}.arrow"}
    scale = 1_000_000 if unit == "MB" else 1
    progress = bar(round(sum(units) / scale), f"tokenizing {s.name} data", unit, enabled=not quiet)
    out = Assembler(tmp / f"{s.name}.arrow", s, tokenizer.eos_token_id, d.block_size)
    t0, tokens, done, shown = time.perf_counter(), 0, 0, 0
    results = run_tasks(job, tasks, d.num_proc)
    try:
        for (part, stats), n in zip(results, units, strict=False):
            tokens += stats["tokens"]
            out.add(part, stats)
            part.unlink()
            if progress is not None:
                done += n
                progress.update(round(done / scale) - shown)
                shown = round(done / scale)
                progress.set_postfix_str(f"{tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tokens/s", refresh=False)
            if out.full():  # a quick trial has its examples: the rest is not tokenized
                break
    finally:
        results.close()  # stops the workers when the loop ended early
        if progress is not None:
            progress.close()
    info = out.finish()
    info.update(rows=rows, row_unit="files" if s.plan.kind == "text-files" else "rows", tokenize_seconds=round(time.perf_counter() - t0, 2),
                tokens_per_s=round(tokens / max(time.perf_counter() - t0, 1e-9), 1))
    (tmp / f"rows-{s.name}.arrow").unlink(missing_ok=True)
    return info, labels, out.end_of_turn


# ------------------------------------------------------------------------------------------ `llmkit prepare`


def prepare_command(cfg: Any) -> dict[str, Any]:
    """`llmkit prepare`: build (or find) the prepared data of a finetune / distill configuration; returns its report."""
    from llmkit.config import chat_problems, data_problems
    from llmkit.models.load import load_tokenizer
    from llmkit.models.refs import resolve

    problems = data_problems(cfg.data) + chat_problems(cfg.task, cfg.data)
    if not cfg.data.train:
        problems.insert(0, "--data is required (a training file, folder or Hub dataset id)")
    if cfg.data.streaming:
        problems.append("--streaming reads the data while training; `llmkit prepare` builds the cache a run without it uses")
    if problems:
        raise UsageError("; ".join(problems))
    model = cfg.model
    ref = resolve(model.name, allow_pickle=model.allow_pickle, trust_remote_code=model.trust_remote_code)
    data = prepare_data(cfg, load_tokenizer(ref))
    report = {"key": data.key, "folder": str(data.folder), "model": model.name, "task": cfg.task,
              "built_seconds": data.report.get("seconds"), "labels": data.labels.names if data.labels else None}
    for name, examples in (("train", data.train), ("eval", data.eval)):
        if examples is None:
            continue
        info = data.report["splits"].get(name, {})
        report[name] = {"rows": info.get("rows"), "row_unit": info.get("row_unit", "rows"), "examples": len(examples), "tokens": examples.tokens,
                        "dropped": info.get("dropped", 0), "first_dropped": info.get("first_dropped"),
                        "tokens_per_s": info.get("tokens_per_s")}
        if cfg.data.packing or data.chat is not None:
            report[name]["conversations"] = examples.conversations
    return report


def describe(report: dict[str, Any], cfg: Any) -> str:
    """The report as lines for a person."""
    what = "blocks" if cfg.task == "causal-lm" and report["train"].get("conversations") is None and not cfg.data.prompt_column else "examples"
    lines = [f"prepared data {report['key']} for {report['model']} ({report['task']}): {report['folder']}"]
    for name in ("train", "eval"):
        r = report.get(name)
        if r is None:
            continue
        unit = f"{what} of {cfg.data.block_size} tokens" if what == "blocks" else what
        line = f"  {name}: {r['rows']:,} {r['row_unit']} -> {r['examples']:,} {unit}, {r['tokens']:,} tokens"
        if r.get("conversations") is not None:
            line += f" ({r['conversations']:,} conversations)"
        if r["dropped"]:
            line += (f"; {r['dropped']:,} rows dropped: their response is cut off entirely by --block-size {cfg.data.block_size} "
                     f"(first: {r['first_dropped']})")
        lines.append(line)
    if report["labels"]:
        lines.append(f"  labels: {', '.join(report['labels'])}")
    speed = report["train"].get("tokens_per_s")
    lines.append(f"  built in {report['built_seconds']:.1f} s" + (f" ({speed:,.0f} tokens/s tokenizing)" if speed else "")
                 + "; `llmkit finetune` with the same data flags and model starts from it")
    return "\n".join(lines)
