"""Tool-calling training data (issue 41): rows with tools, calls and results, rendered in the format `llmkit serve`
parses; calls are learned, results are context."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmkit.data.chat import ChatEncoder
from llmkit.data.formats import read_conversations
from llmkit.errors import UsageError
from llmkit.models.templates import CHATML
from llmkit.models.tools import call_text, parse_calls
from tests.conftest import make_tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ROW = {"tools": [WEATHER], "messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    {"role": "assistant", "content": "It is sunny in Paris."}]}
SHAREGPT = {"tools": json.dumps([WEATHER]), "conversations": [
    {"from": "human", "value": "Weather in Paris?"},
    {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
    {"from": "observation", "value": "sunny, 21 C"},
    {"from": "gpt", "value": "It is sunny in Paris."}]}


def _write(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _learned(labels: list[int]) -> list[list[int]]:
    runs, cur = [], []
    for lab in labels:
        if lab != -100:
            cur.append(lab)
        elif cur:
            runs, cur = [*runs, cur], []
    return [*runs, cur] if cur else runs


def test_calls_are_learned_and_results_are_context(tmp_path):
    conv = read_conversations(_write(tmp_path / "tools.jsonl", [ROW]))[0]
    share = read_conversations(_write(tmp_path / "share.jsonl", [SHAREGPT]))[0]
    assert share.messages == conv.messages  # ShareGPT's function_call / observation: the same rendering
    assert conv.messages[0]["role"] == "system" and '"name": "get_weather"' in conv.messages[0]["content"]
    assert conv.messages[2] == {"role": "assistant", "content": call_text("get_weather", {"city": "Paris"})}
    assert conv.messages[3]["role"] == "user" and conv.messages[3]["content"].startswith("<tool_response>")

    tok = make_tokenizer(["<|im_start|>", "<|im_end|>"])
    ids, labels = ChatEncoder(tok, CHATML).encode(conv)
    assert [tok.decode(r) for r in _learned(labels)] == [
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>',
        "It is sunny in Paris.<|im_end|>"]
    context = tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab == -100])
    assert "sunny, 21 C" in context and "get_weather" in context  # the result and the tools block: context only


@pytest.mark.parametrize(("change", "message"), [
    (lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments="{city: Paris"),
     r"bad.jsonl:line 2: turn 2: the arguments of 'get_weather' is not valid JSON"),
    (lambda r: r["messages"][1]["tool_calls"][0]["function"].update(name="get_time"),
     r"bad.jsonl:line 2: turn 2 calls the tool 'get_time', which is not in the row's tools \(get_weather\)"),
    (lambda r: r.pop("tools"), r"bad.jsonl:line 2: turn 2 calls the tool 'get_weather', which is not in the row's tools \(the row has no 'tools'\)"),
    (lambda r: r["messages"][2].update(tool_call_id="call_9"),
     r"bad.jsonl:line 2: turn 3 is a tool result that answers no earlier tool call \(tool_call_id 'call_9'\)"),
    (lambda r: r.update(tools={"name": "x"}), r"bad.jsonl:line 2: 'tools' must be a list of tools"),
    (lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments="[1]"),
     r"bad.jsonl:line 2: turn 2: the arguments of 'get_weather' must be a JSON object"),
])
def test_bad_tool_rows_are_one_line_errors(tmp_path, change, message):
    bad = json.loads(json.dumps(ROW))
    change(bad)
    path = _write(tmp_path / "bad.jsonl", [ROW, bad])
    with pytest.raises(UsageError, match=message) as e:
        read_conversations(path)
    assert "\n" not in str(e.value)


def test_a_model_trained_on_the_format_is_parsed_by_serve_to_the_same_call(tmp_path):
    """No training needed: what serve renders for the same history is the training prompt, and the learned reply
    (the assistant turn's text) parses to the call in the data."""
    from llmkit.serving.protocol import ChatRequest
    from llmkit.serving.tools import parse_reply

    conv = read_conversations(_write(tmp_path / "tools.jsonl", [ROW]))[0]
    request = ChatRequest(model="m", messages=ROW["messages"][:1], tools=[WEATHER])
    assert request.prompts()[0] == conv.messages[:2]
    content, calls = parse_reply(conv.messages[2]["content"], ["get_weather"], forced=False)
    assert content is None and [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"})]
    # the rest of the history as a client sends it back renders as training rendered it, results included
    history = ChatRequest(model="m", messages=ROW["messages"], tools=[WEATHER])
    assert history.prompts()[0] == conv.messages
    assert parse_calls("no call here", ["get_weather"]) == ("no call here", [])


def test_a_template_that_renders_tools_itself_gets_them_in_its_own_format(tmp_path):
    """Qwen 2.5's template takes `tools=` and writes calls as `<tool_call>` JSON: training, serving and the parser all
    use that format (the model keeps the tool prompt it was made with); templates without tools keep llmkit's."""
    from llmkit.models.templates import knows_tools, render_chat, tool_format
    from llmkit.models.tools import TOOLS_HEADER, structured, with_tools
    from llmkit.serving.protocol import ChatRequest
    from llmkit.serving.tools import parse_reply
    from tests.chat_models import QWEN25_TOOLS
    from tests.families import FAMILIES

    assert knows_tools(QWEN25_TOOLS) and not knows_tools(CHATML)
    assert (tool_format(QWEN25_TOOLS), tool_format(CHATML)) == ("template", "llmkit")  # what llmkit.json records
    assert not any(knows_tools(f.template) for f in FAMILIES.values() if f.template)  # their test templates know no tools

    conv = read_conversations(_write(tmp_path / "tools.jsonl", [ROW]))[0]
    tok = make_tokenizer(["<|im_start|>", "<|im_end|>"])
    encoder = ChatEncoder(tok, QWEN25_TOOLS)
    full, _ = encoder.spans(conv)
    assert TOOLS_HEADER not in full and '<tools>\n{"type": "function", "function": {"name": "get_weather"' in full
    assert "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>" in full
    ids, labels = encoder.encode(conv)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert [tok.decode(r) for r in _learned(labels)] == [call + "<|im_end|>", "It is sunny in Paris.<|im_end|>"]
    assert "sunny, 21 C" in tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab == -100])

    # serve: the client's history renders as training rendered it, and the learned reply parses to the data's call
    prompt = ChatRequest(model="m", messages=ROW["messages"][:3], tools=[WEATHER]).prompts()[0]
    assert full.startswith(render_chat(QWEN25_TOOLS, prompt))
    content, calls = parse_reply(call, ["get_weather"], forced=False)
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}

    # the conversion back is exact: a system prompt kept, two calls in one turn answered in order
    spec = {"name": "get_weather", "description": "", "parameters": {"type": "object", "properties": {}}}
    two = with_tools([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paris and Rome?"},
                      {"role": "assistant", "content": call_text("get_weather", {"city": "Paris"}) + call_text("get_weather", {"city": "Rome"})},
                      {"role": "user", "content": '<tool_response>{"tool_call_id": "a", "content": "sunny"}</tool_response>'},
                      {"role": "user", "content": '<tool_response>{"tool_call_id": "b", "content": "rain"}</tool_response>'}], [spec])
    messages, tools = structured(two)
    assert tools == [{"type": "function", "function": spec}] and messages[0] == {"role": "system", "content": "Be brief."}
    assert [c["function"]["arguments"] for c in messages[2]["tool_calls"]] == [{"city": "Paris"}, {"city": "Rome"}]
    assert [(m["tool_call_id"], m["content"]) for m in messages[3:]] == [("call_1", "sunny"), ("call_2", "rain")]


def test_tool_call_scores_of_a_known_output():
    from llmkit.evaluate import score_tool_calls

    spec = {"name": "get_weather", "description": "", "parameters": WEATHER["function"]["parameters"]}
    ref = [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    outs = [call_text("get_weather", {"city": "Paris"}),  # right
            call_text("get_weather", {"city": "Rome"}),  # right function, wrong arguments
            "<tool_call>{not json</tool_call>", "It is sunny."]
    assert score_tool_calls(outs[:1], [ref], [[spec]]) == {"tool_calls": 1, "tool_call_accuracy": 1.0,
                                                          "tool_name_accuracy": 1.0, "tool_valid_json_rate": 1.0}
    scores = score_tool_calls(outs, [ref] * 4, [[spec]] * 4)
    assert (scores["tool_call_accuracy"], scores["tool_name_accuracy"], scores["tool_valid_json_rate"]) == (0.25, 0.5, 0.5)
    # equal to the reference but not valid against the schema (a reference that breaks it) is not counted right
    bad = [{"name": "get_weather", "arguments": {"city": 3}}]
    assert score_tool_calls([call_text("get_weather", {"city": 3})], [bad], [[spec]])["tool_call_accuracy"] == 0.0


def test_evaluate_reports_tool_metrics_on_a_tiny_model(tmp_path, cli, monkeypatch):
    from tests.chat_models import endless_chat_model

    monkeypatch.setenv("LLMKIT_GGUF_TYPE", "off")  # transformers: no GGUF export, which would take most of the test

    model = endless_chat_model(tmp_path / "tiny")  # a 4k context: the tools block is long for a 400-token vocabulary
    data = _write(tmp_path / "tools.jsonl", [ROW, json.loads(json.dumps(ROW).replace("Paris", "Rome"))])
    code, out, err = cli("evaluate", "--model", str(model), "--data", data, "--json", "-n", "6", "--quiet")
    assert code == 0, err
    result = json.loads(out)
    assert result["tool_calls"] == 2 and result["conversations"] == 2
    for key in ("tool_call_accuracy", "tool_name_accuracy", "tool_valid_json_rate"):
        assert 0.0 <= result[key] <= 1.0


def test_the_tool_use_recipe_data_is_valid_and_its_validation_values_are_unseen(tmp_path):
    """recipes/data/tool_use.py: every row reads as tool data, every reference call validates against its tool's
    schema, the results are computed (the calculator's is the expression's value), and validation questions carry
    cities and numbers no training row has (so evaluate measures copying, not memory)."""
    import re
    import subprocess
    import sys

    from llmkit.evaluate import tool_examples
    from llmkit.models.tools import schema_errors

    script = Path(__file__).resolve().parents[1] / "recipes" / "data" / "tool_use.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--train", "200", "--validation", "40"],
                   check=True, capture_output=True)
    splits = {s: read_conversations(str(tmp_path / f"{s}.jsonl")) for s in ("train", "validation")}
    assert [len(c) for c in splits.values()] == [200, 40]
    cases = {s: tool_examples(c) for s, c in splits.items()}
    assert len(cases["train"]) == 150  # three calling rows in four; the fourth needs no tool
    assert {calls[0]["name"] for _, calls, _ in cases["train"]} == {"get_weather", "convert_units", "calculator"}
    for _, calls, specs in cases["train"] + cases["validation"]:
        spec = next(s for s in specs if s["name"] == calls[0]["name"])
        assert schema_errors(calls[0]["arguments"], spec["parameters"]) == []
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    for row in rows:
        m = row["messages"]
        if len(m) == 4 and m[1]["tool_calls"][0]["function"]["name"] == "calculator":
            expression = json.loads(m[1]["tool_calls"][0]["function"]["arguments"])["expression"]
            assert json.loads(m[2]["content"])["result"] == round(eval(expression), 4)  # digits the script wrote

    def values(split: str) -> set[str]:
        text = " ".join(m["content"] for conv in splits[split] for m in conv.messages if m["role"] == "user")
        return set(re.findall(r"\b[A-Z][a-z]+\b|\b\d+\b", text))

    arguments = [calls[0]["arguments"] for _, calls, _ in cases["validation"]]
    cities = {a["city"] for a in arguments if "city" in a}
    numbers = {str(a["value"]) for a in arguments if "value" in a}
    assert cities and numbers and not (cities | numbers) & values("train")
    # training asks about many different places, most of them once: the model must copy the name, not recall it
    trained = [a["city"] for _, calls, _ in cases["train"] for a in [calls[0]["arguments"]] if "city" in a]
    assert len(set(trained)) > 0.8 * len(trained) and any(" " in c for c in trained)
