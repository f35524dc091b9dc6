"""Constrained decoding: generated text that must match a JSON schema, any JSON object, or a GBNF grammar.

    >>> from llmkit.inference.constraints import json_schema, check
    >>> c = json_schema({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    >>> check(c)                                 # UsageError naming the problem when it cannot be enforced
    >>> SamplingOptions(constraint=c)            # both backends then only draw tokens the grammar allows

On llama.cpp the constraint becomes a GBNF grammar (llama-cpp-python's own JSON-schema converter, which is
llama.cpp's), applied by llama.cpp's grammar sampler. On transformers it is compiled by xgrammar (the `structured`
extra; measured against outlines-core and lm-format-enforcer in benchmarks/serve_structured.py's notes in the
README) into a logits processor. Once the grammar is complete only end-of-generation is allowed, so a constrained
answer stops by itself.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from llmkit.errors import UsageError
from llmkit.inference.sampling import Constraint

KINDS = ("json_schema", "json_object", "gbnf")


def json_schema(schema: dict[str, Any] | str) -> Constraint:
    return Constraint("json_schema", schema if isinstance(schema, str) else json.dumps(schema, sort_keys=True))


def json_object() -> Constraint:
    return Constraint("json_object")


def gbnf(grammar: str) -> Constraint:
    return Constraint("gbnf", grammar)


def check(constraint: Constraint) -> None:
    """Raise a one-line UsageError when `constraint` cannot be enforced (not a schema, a broken grammar)."""
    if constraint.kind not in KINDS:
        raise UsageError(f"unknown constraint kind {constraint.kind!r}: one of {', '.join(KINDS)}")
    if constraint.kind == "json_schema":
        try:
            schema = json.loads(constraint.text)
        except ValueError as e:
            raise UsageError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise UsageError("the JSON schema must be a JSON object")
        _schema_type_check(schema, "schema")
    if _llama_cpp_importable():
        to_gbnf(constraint)  # the converter refuses what it cannot express


def _schema_type_check(schema: Any, where: str) -> None:
    # llama.cpp's converter silently treats unknown types as "anything": a typo would then be no constraint at all
    known = {"object", "array", "string", "integer", "number", "boolean", "null"}
    if not isinstance(schema, dict):
        return
    kinds = schema.get("type")
    for kind in kinds if isinstance(kinds, list) else [kinds] if kinds is not None else []:
        if kind not in known:
            raise UsageError(f"{where}: unknown type {kind!r} (JSON Schema types: {', '.join(sorted(known))})")
    for key, sub in (schema.get("properties") or {}).items() if isinstance(schema.get("properties"), dict) else []:
        _schema_type_check(sub, f"{where}.properties.{key}")
    if isinstance(schema.get("items"), dict):
        _schema_type_check(schema["items"], f"{where}.items")
    for key in ("anyOf", "oneOf", "allOf"):
        for i, sub in enumerate(schema.get(key) or []):
            _schema_type_check(sub, f"{where}.{key}.{i}")


@functools.lru_cache(maxsize=64)
def to_gbnf(constraint: Constraint) -> str:
    """The constraint as a GBNF grammar (root rule `root`), the form llama.cpp and xgrammar both take."""
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    if constraint.kind == "json_object":
        return JSON_GBNF
    if constraint.kind == "gbnf":
        if "root" not in constraint.text or "::=" not in constraint.text:
            raise UsageError("the grammar has no `root ::= ...` rule (GBNF, as llama.cpp reads it)")
        return constraint.text
    try:
        # JSON strings cannot hold raw control characters, which this converter's `char` rule lets through (an
        # untuned model picked \x19 and \x01: the answer did not parse)
        return json_schema_to_gbnf(constraint.text).replace('char ::= [^"\\\\]', 'char ::= [^"\\\\\\x00-\\x1F\\x7F]')
    except Exception as e:  # its own errors are assertions, KeyErrors and ValueErrors on what it cannot express
        raise UsageError(f"the JSON schema cannot be enforced: {type(e).__name__}: {str(e)[:200]}") from None


def llama_grammar(constraint: Constraint) -> Any:
    """A llama_cpp.LlamaGrammar for the constraint; it is parsed by llama.cpp, which refuses a bad grammar here."""
    from llama_cpp import LlamaGrammar

    try:
        return LlamaGrammar.from_string(to_gbnf(constraint), verbose=False)
    except Exception as e:
        raise UsageError(f"llama.cpp cannot parse the grammar: {str(e)[:200]}") from None


def hf_logits_processor(constraint: Constraint, tokenizer: Any, vocab_size: int) -> Any:
    """A transformers LogitsProcessor enforcing the constraint, compiled by xgrammar (imported only here)."""
    try:
        import xgrammar as xgr
    except ImportError:
        raise UsageError("constrained decoding on transformers needs xgrammar: pip install 'llmkit[structured]'") from None
    compiler = _compiler(tokenizer, vocab_size)
    try:
        # any_whitespace=False: an untuned model otherwise fills max_tokens with indentation (llama.cpp bounds it too)
        if constraint.kind == "gbnf" or _llama_cpp_importable():
            # llama.cpp's converter's grammar: the same JSON on both backends, and its strings exclude raw control
            # characters, which xgrammar 0.2.9's own JSON-schema grammar lets through (invalid JSON: measured)
            compiled = compiler.compile_grammar(_explicit_empty(to_gbnf(constraint)))
        else:
            compiled = compiler.compile_json_schema(constraint.text or '{"type": "object"}', any_whitespace=False)
    except Exception as e:
        raise UsageError(f"the constraint cannot be compiled: {str(e).splitlines()[0][:200]}") from None
    masker = xgr.contrib.hf.LogitsProcessor(compiled)

    def constrain(input_ids: Any, scores: Any) -> Any:
        # xgrammar masks in place, and generate()'s output_logits (the raw logits log-probs are read from) can be
        # that very tensor: mask a copy
        return masker(input_ids, scores.clone())

    return constrain


def _explicit_empty(grammar: str) -> str:
    """GBNF's empty alternative (`space ::= | " "`) written as `""`, which xgrammar's parser requires."""
    import re

    return re.sub(r'(::=|\||\()([ \t]*)(?=\||\)|$)', r'\1\2""', grammar, flags=re.M)


def _llama_cpp_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


_COMPILERS: dict[int, Any] = {}


def _compiler(tokenizer: Any, vocab_size: int) -> Any:
    # building the tokenizer info walks the whole vocabulary: once per tokenizer, not per request
    import xgrammar as xgr

    key = id(tokenizer)
    if key not in _COMPILERS:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        _COMPILERS[key] = xgr.GrammarCompiler(info)
    return _COMPILERS[key]
