"""Reward functions for `--objective grpo` and `llmkit evaluate --reward`: built-ins and the user's own Python.

    >>> rewards = load_rewards(["exact:answer", "length:max=32"], tokenizer)
    >>> rewards[0](prompts=["Q"], completions=["Positive."], answer=["positive"])    # [1.0]

Every reward has TRL's signature, `fn(prompts, completions, **columns) -> list[float | None]`: one value per
completion, None where the reward does not apply (it then counts as 0 in the weighted sum and is left out of its
own mean). The built-ins:

    exact:COLUMN      1 if the completion equals the row's COLUMN, after normalising case, whitespace and trailing
                      punctuation ("Positive." == "positive"), else 0
    contains:COLUMN   1 if the normalised completion contains the normalised COLUMN, else 0
    regex:PATTERN     1 if PATTERN matches the (stripped) completion (re.fullmatch), else 0
    json              1 if the completion parses as JSON; json:schema.json: 1 if it also validates (jsonschema)
    length:max=N      1 up to N tokens, falling linearly to 0 at 2N (a soft brevity reward)
    file.py:function  the user's function, loaded once, checked to take (prompts, completions, **kwargs)

A bad spec (missing file or function, not callable, wrong signature) is a UsageError before anything is written;
a reward that raises or returns the wrong number of values stops the run naming the function, the step and the row.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkit.errors import UsageError

_PUNCT = string.punctuation + " \t\n"


def normalise(text: Any) -> str:
    """Case, runs of whitespace and trailing punctuation do not count: "  Positive. " -> "positive"."""
    return " ".join(str(text).split()).lower().strip().rstrip(_PUNCT).lstrip()


@dataclass
class Reward:
    name: str  # the spec as given: what metrics.jsonl calls it (reward/NAME)
    fn: Callable[..., list[float | None]]
    column: str | None = None  # the column a built-in reads; checked against the data before training

    def __call__(self, prompts: list[Any], completions: list[str], **columns: Any) -> list[float | None]:
        return self.fn(prompts=prompts, completions=completions, **columns)


def load_rewards(specs: list[str], tokenizer: Any = None) -> list[Reward]:
    return [load_reward(s, tokenizer) for s in specs]


def load_reward(spec: str, tokenizer: Any = None) -> Reward:
    kind, _, arg = spec.partition(":")
    if kind in ("exact", "contains"):
        same = (lambda c, a: c == a) if kind == "exact" else (lambda c, a: a in c)

        def match(prompts: list[Any], completions: list[str], **cols: Any) -> list[float | None]:
            answers = cols[arg]
            return [None if a is None else float(same(normalise(c), normalise(a))) for c, a in zip(completions, answers, strict=True)]

        return Reward(spec, match, arg)
    if kind == "regex":
        pattern = re.compile(arg)
        return Reward(spec, lambda prompts, completions, **cols: [float(pattern.fullmatch(c.strip()) is not None) for c in completions])
    if kind == "json":
        return Reward(spec, _json_reward(arg))
    if kind == "length":
        limit = int(arg.removeprefix("max="))

        def length(prompts: list[Any], completions: list[str], **cols: Any) -> list[float | None]:
            counts = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) if tokenizer is not None else len(c.split()) for c in completions]
            return [max(0.0, min(1.0, 2.0 - n / limit)) for n in counts]

        return Reward(spec, length)
    return Reward(spec, _user_function(spec))


def _json_reward(schema_path: str) -> Callable[..., list[float | None]]:
    validator = None
    if schema_path:
        path = Path(schema_path).expanduser()
        if not path.is_file():
            raise UsageError(f"--reward json:{schema_path}: no such schema file")
        try:
            import jsonschema
        except ImportError:
            raise UsageError(f"--reward json:{schema_path} validates with jsonschema: pip install jsonschema") from None
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
            validator = jsonschema.Draft202012Validator(schema)
        except (ValueError, jsonschema.SchemaError) as e:
            raise UsageError(f"--reward json:{schema_path}: not a valid JSON schema ({str(e).splitlines()[0]})") from None

    def parses(prompts: list[Any], completions: list[str], **cols: Any) -> list[float | None]:
        out = []
        for c in completions:
            try:
                value = json.loads(c)
            except ValueError:
                out.append(0.0)
                continue
            out.append(1.0 if validator is None or validator.is_valid(value) else 0.0)
        return out

    return parses


def _user_function(spec: str) -> Callable[..., Any]:
    where, _, name = spec.rpartition(":")
    path = Path(where).expanduser()
    if not path.is_file():
        raise UsageError(f"--reward {spec}: no such file {where}")
    module_spec = importlib.util.spec_from_file_location(f"llmkit_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
    try:
        module_spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as e:  # the user's file: any error is theirs to fix, reported in one line
        raise UsageError(f"--reward {spec}: importing {where} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise UsageError(f"--reward {spec}: {where} has no function {name!r}")
    if not callable(fn):
        raise UsageError(f"--reward {spec}: {name} is a {type(fn).__name__}, not a function")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn
    takes_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
    # called with keywords only, as TRL calls it: prompts=, completions=, and every column by name
    required = {n for n, p in params.items() if p.default is inspect.Parameter.empty
                and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)}
    if not takes_kwargs or not required <= {"prompts", "completions"}:
        raise UsageError(f"--reward {spec}: {name}{inspect.signature(fn)} must take (prompts, completions, **kwargs) and return "
                         "one float (or None) per completion, as TRL's reward functions")
    return fn


def score(rewards: list[Reward], prompts: list[Any], completions: list[str], columns: dict[str, list[Any]], step: int,
          rows: list[str]) -> list[list[float | None]]:
    """Each reward's values (rewards x completions). `rows`: where each completion's prompt came from (file:line N);
    a reward that raises or returns the wrong number of values is a UsageError naming the function, step and row."""
    out = []
    for r in rewards:
        try:
            values = list(r(prompts, completions, **columns))
        except Exception as e:  # the user's code: stop with what failed and where, not a traceback inside the loop
            raise UsageError(f"reward {r.name} raised {type(e).__name__}: {e} (step {step}, prompt {rows[0]})") from None
        if len(values) != len(completions):
            raise UsageError(f"reward {r.name} returned {len(values)} values for {len(completions)} completions (step {step}, "
                             f"prompt {rows[0]}); return one float or None per completion")
        for k, v in enumerate(values):
            if v is not None and not isinstance(v, (int, float)):
                raise UsageError(f"reward {r.name} returned {v!r} (step {step}, prompt {rows[k]}); return a float or None")
        out.append([None if v is None else float(v) for v in values])
    return out


def check_columns(rewards: list[Reward], columns: set[str], spec: str) -> None:
    """Built-ins that read a column: the data must have it (before anything is written)."""
    for r in rewards:
        if r.column is not None and r.column not in columns:
            raise UsageError(f"--reward {r.name}: {spec} has no column {r.column!r} (columns: {', '.join(sorted(columns)) or 'only prompt'})")
