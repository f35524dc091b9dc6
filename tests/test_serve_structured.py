"""llmkit serve's log-probs, JSON answers and tools, with the real `openai` client against a real server (issue 41)."""

from __future__ import annotations

import json
import shutil
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
