"""Chat fine-tuning: formats, templates, assistant-only masks, packing, the saved folder chats and stops, chat evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmkit.data.chat import ChatEncoder, encode_conversations, pack
from llmkit.data.examples import Collator
from llmkit.data.formats import Conversation, read_conversations
from llmkit.errors import UsageError
from llmkit.models.templates import CHATML
from tests.conftest import make_tokenizer

# SmolLM2-135M-Instruct's own template (a default system prompt when none is given), as shipped in its GGUF.
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a "
           "helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' "
           "+ message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
          "message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
SIMPLE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# roles must alternate, like Llama-2 / Mistral templates: the template raises for anything else
ALTERNATING = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
               "<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")

TEMPLATES = {
    "smollm2": (SMOLLM2, ["<|im_start|>", "<|im_end|>"], {}, "<|im_end|>"),
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], {}, "<|im_end|>"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, "<|eot_id|>"),
    "simple": (SIMPLE, ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"], {"bos_token": "<s>", "eos_token": "</s>"}, "</s>"),
}
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Once upon a time?"},
    {"role": "assistant", "content": "there was a little model."},
    {"role": "user", "content": "And the fox?"},
    {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."},
]


def _tokenizer(name: str):
    template, specials, roles, _ = TEMPLATES[name]
    tok = make_tokenizer(specials)
    for attr, value in roles.items():
        setattr(tok, attr, value)
    tok.chat_template = template
    return tok


def _runs(labels: list[int]) -> list[list[int]]:
    """Consecutive learned positions, as lists of token ids."""
    runs, current = [], []
    for lab in labels:
        if lab != -100:
            current.append(lab)
        elif current:
            runs.append(current)
            current = []
    return [*runs, current] if current else runs


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_learned_tokens_are_exactly_each_reply_and_its_end_of_turn(name):
    tok = _tokenizer(name)
    eot = TEMPLATES[name][3]
    enc = ChatEncoder(tok, tok.chat_template)
    ids, labels = enc.encode(Conversation(CONVERSATION, "x.jsonl:line 1"))
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    runs = _runs(labels)
    assert [tok.decode(r) for r in runs] == [r + eot for r in replies]
    assert all(r[-1] == tok.convert_tokens_to_ids(eot) for r in runs)
    assert enc.end_of_turn == {tok.convert_tokens_to_ids(eot)}
    # everything else (system, user turns, role headers, separators) is context only
    assert tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab == -100]).count(CONVERSATION[1]["content"]) == 1
    # --train-on-prompt learns every token
    all_ids, all_labels = ChatEncoder(tok, tok.chat_template, train_on_prompt=True).encode(Conversation(CONVERSATION, "x"))
    assert all_labels == all_ids == ids


def test_template_without_end_of_turn_is_refused():
    tok = _tokenizer("simple")
    enc = ChatEncoder(tok, "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    with pytest.raises(UsageError, match=r"x.jsonl:line 3: .*could never learn to stop"):
        enc.encode(Conversation(CONVERSATION, "x.jsonl:line 3"))


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_formats_are_detected_and_parsed(tmp_path):
    msgs = _write_jsonl(tmp_path / "m.jsonl", [{"messages": CONVERSATION}])
    share = _write_jsonl(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "system", "value": "You answer briefly."}, {"from": "human", "value": "Once upon a time?"},
        {"from": "gpt", "value": "there was a little model."}, {"from": "human", "value": "And the fox?"},
        {"from": "gpt", "value": "The quick brown fox jumps over the lazy dog."}]}])
    pc = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Once upon a time?", "completion": "there was a little model."}])
    a = read_conversations(str(msgs), "auto")
    b = read_conversations(str(share), "auto")
    c = read_conversations(str(pc), "auto")
    assert a[0].messages == b[0].messages == CONVERSATION
    assert c[0].messages == CONVERSATION[1:3]
    assert a[0].where == f"{msgs}:line 1"


@pytest.mark.parametrize(("rows", "message"), [
    ([{"messages": [{"role": "robot", "content": "hi"}]}], r"line 1: turn 1 has unknown role 'robot'"),
    ([{"conversations": [{"from": "bot", "value": "hi"}]}], r"line 1: turn 1 has unknown role 'from': 'bot'"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], r"line 1: the conversation has no assistant turn"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}], r"line 1: turn 2 \(assistant\) has empty content"),
    ([{"messages": CONVERSATION}, {"conversations": [{"from": "human", "value": "hi"}]}],
     r"line 2: a sharegpt row in a file of messages rows .*line 1.; keep one chat format per file"),
    ([{"messages": "hello"}], r"line 1: 'messages' is text, not a list of turns"),
])
def test_bad_conversations_are_one_line_errors(tmp_path, rows, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UsageError, match=message):
        read_conversations(str(path), "auto")


def test_template_exception_names_the_row():
    tok = _tokenizer("simple")
    enc = ChatEncoder(tok, ALTERNATING)
    convs = [Conversation(CONVERSATION[1:3], "chat.jsonl:line 1"),
             Conversation([CONVERSATION[1], CONVERSATION[1], CONVERSATION[2]], "chat.jsonl:line 2")]
    with pytest.raises(UsageError, match=r"^chat.jsonl:line 2: the chat template refused this conversation: Conversation roles must alternate"):
        encode_conversations(enc, convs, 128)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_loss_equals_unpacked_loss(arch, tiny_llama, tiny_gpt2):
    import torch
    from transformers import AutoTokenizer

    folder = tiny_llama if arch == "llama" else tiny_gpt2
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = SIMPLE if arch == "llama" else "{% for m in messages %}{{ m['content'] }}<|endoftext|>{% endfor %}"
    enc = ChatEncoder(tok, tok.chat_template)
    convs = [Conversation([{"role": "user", "content": q}, {"role": "assistant", "content": a}], f"row {i}")
             for i, (q, a) in enumerate([("Once upon a time", "there was a model."), ("To be?", "or not to be, that is the question."),
                                         ("Hello", "world!"), ("The quick brown fox", "jumps over the lazy dog, again and again.")])]
    ids, labels, _ = encode_conversations(enc, convs, 64)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
    model.config.use_cache = False  # as in training: with a KV cache transformers would not look for packed sequences
    pad = tok.eos_token_id
    with torch.no_grad():
        unpacked = model(**Collator(pad, causal=True)([{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels, strict=True)])).loss
        p_ids, p_labels, p_pos = pack(ids, labels, 48)
        assert len(p_ids) < len(ids)  # several conversations really share a row
        batch = Collator(pad, causal=True)([{"input_ids": i, "labels": lab, "position_ids": p}
                                            for i, lab, p in zip(p_ids, p_labels, p_pos, strict=True)])
        assert int(batch.pop("num_examples")) == len(convs)
        assert int(batch.pop("num_tokens")) == sum(len(i) for i in ids)
        packed = model(**batch).loss
        # without the position ids the conversations would see each other: the loss differs
        leaky = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert abs(float(packed) - float(unpacked)) < 1e-5
    assert abs(float(leaky) - float(unpacked)) > 1e-4


# ------------------------------------------------------------------------------------------ end to end

QA = [("What colour is the sky?", "blue"), ("What do cows drink?", "water"), ("Say hello.", "hello world"),
      ("Which animal jumps?", "the quick brown fox")]


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("chat")
    _write_jsonl(d / "train.jsonl", [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA * 8])
    _write_jsonl(d / "eval.jsonl", [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA])
    return d


@pytest.fixture(scope="module")
def chat_run(tiny_llama, chat_data, tmp_path_factory) -> Path:
    """The tiny Llama fine-tuned to answer QA and stop; shared by the tests that read its folder."""
    from llmkit.cli import main

    out = tmp_path_factory.mktemp("runs") / "chat"
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--model", str(tiny_llama), "--data", str(chat_data / "train.jsonl"), "--eval-data", str(chat_data / "eval.jsonl"),
              "--out", str(out), "--max-steps", "150", "--lr", "5e-3", "--batch-size", "8", "--packing", "--block-size", "64", "--quiet"])
    assert e.value.code == 0
    return out


def test_chat_finetune_output_answers_and_stops_with_plain_transformers(chat_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_run)
    model = AutoModelForCausalLM.from_pretrained(chat_run)
    assert tok.chat_template == SIMPLE  # the template it was trained with travels with the folder
    run = json.loads((chat_run / "llmkit.json").read_text())
    assert run["data"]["packing"] is True and run["examples"]["train"] < len(QA) * 8  # packed rows
    assert run["tool_format"] == "llmkit"  # a template that knows no tools: tool calls in llmkit's fallback format
    for q, a in QA:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=20, do_sample=False)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        assert new[-1] == tok.eos_token_id and len(new) < 20  # it stopped by itself
        assert tok.decode(new, skip_special_tokens=True) == a


def test_chat_generate_and_evaluate_answers(chat_run, chat_data, cli):
    code, out, err = cli("generate", "What colour is the sky?", "--model", chat_run, "--chat", "--temperature", "0", "--json", "-n", "20")
    gen = json.loads(out.splitlines()[0])
    assert code == 0 and gen["text"] == "blue" and gen["finish_reason"] == "stop"
    code, out, err = cli("generate", "What colour is the sky?", "--model", chat_run, "--chat", "--system", "Be brief.", "--json", "-n", "5")
    assert code == 0 and json.loads(out.splitlines()[0])["prompt_tokens"] > gen["prompt_tokens"]
    code, out, err = cli("evaluate", "--model", chat_run, "--data", chat_data / "eval.jsonl", "--generate-answers", "--json", "-n", "20")
    result = json.loads(out)
    assert code == 0 and "Traceback" not in err and result["task"] == "chat" and result["answered"] == len(QA)
    assert result["exact_match"] == result["contains_match"] == 1.0
    assert result["perplexity"] < 1.5 and result["conversations"] == len(QA)
    assert result["examples"][0]["reference"] == QA[0][1]


def test_evaluate_answers_score_against_references(chat_run, tmp_path, cli):
    wrong = _write_jsonl(tmp_path / "wrong.jsonl", [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                                                    for q, a in [(QA[0][0], "blue"), (QA[1][0], "milk"), (QA[2][0], "hello")]])
    code, out, _ = cli("evaluate", "--model", chat_run, "--data", wrong, "--generate-answers", "--json", "-n", "20")
    result = json.loads(out)
    # blue == blue; "water" is not "milk"; "hello world" contains "hello" but is not it
    assert code == 0 and result["exact_match"] == pytest.approx(1 / 3) and result["contains_match"] == pytest.approx(2 / 3)


def test_model_without_template_needs_chat_template(tiny_gpt2, chat_data, tmp_path, cli):
    code, _, err = cli("finetune", "--model", tiny_gpt2, "--data", chat_data / "train.jsonl", "--out", tmp_path / "a", "--max-steps", "1")
    assert code == 2 and "--chat-template" in err and err.count("\n") == 1 and not (tmp_path / "a").exists()
    code, _, err = cli("finetune", "--model", tiny_gpt2, "--data", chat_data / "train.jsonl", "--out", tmp_path / "b", "--max-steps", "1",
                       "--chat-template", "chatml", "--method", "lora")
    assert code == 2 and "--method full" in err and not (tmp_path / "b").exists()
    code, _, err = cli("finetune", "--model", tiny_gpt2, "--data", chat_data / "train.jsonl", "--out", tmp_path / "c", "--max-steps", "2",
                       "--chat-template", "chatml", "--quiet")
    assert code == 0, err
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "c")
    assert tok.chat_template == CHATML and tok.eos_token == "<|im_end|>"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "c").get_input_embeddings().num_embeddings == len(tok)


def test_chat_usage_errors(tiny_llama, tiny_bert, chat_data, toy_data, tmp_path, cli):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}\n{{ m['content'] }\n", encoding="utf-8")
    cases = [
        (["--data", chat_data / "train.jsonl", "--chat-template", bad], f"--chat-template {bad}:line 2: not a valid Jinja template"),
        (["--data", chat_data / "train.jsonl", "--chat-template", tmp_path / "missing.jinja"], "no such file"),
        (["--data", toy_data / "train.csv", "--task", "seq-cls", "--packing", "--model", tiny_bert], "--packing is for causal-lm chat data"),
        (["--data", toy_data / "train.txt", "--train-on-prompt"], "are for chat data"),
        (["--data", chat_data / "train.jsonl", "--format", "sharegpt"], "has no column 'conversations'"),
        (["--data", chat_data / "train.jsonl", "--format", "yaml"], "--format 'yaml' is not one of"),
    ]
    for k, (args, message) in enumerate(cases):
        argv = ["finetune", "--model", tiny_llama, "--out", tmp_path / f"out{k}", "--max-steps", "1", *args]
        code, _, err = cli(*argv)
        assert code == 2 and message in err and "Traceback" not in err, (args, err)
        assert not (tmp_path / f"out{k}").exists()


@pytest.mark.slow
def test_smollm2_chat_lora_learns_sentiment_answers(tmp_path, cli):
    """20 LoRA steps of the real SmolLM2-Instruct on 64 sentiment-as-chat rows: exact-match on those rows rises."""
    import csv

    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "rt-polarity" / "train.csv"
    if not root.exists():
        pytest.skip("shared data not present")
    with open(root, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:64]
    data = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "user", "content": f"Review: {r['text']}\nIs the sentiment of this movie review positive or negative? Answer with one word."},
        {"role": "assistant", "content": "positive" if r["label"] == "1" else "negative"}]} for r in rows])
    code, out, err = cli("evaluate", "--model", "smollm2-135m", "--data", data, "--generate-answers", "--json", "-n", "4")
    before = json.loads(out)["exact_match"]
    code, _, err = cli("finetune", "--model", "smollm2-135m", "--method", "lora", "--data", data, "--out", tmp_path / "run", "--max-steps", "20",
                       "--batch-size", "8", "--lr", "5e-4", "--quiet")
    assert code == 0, err
    code, out, err = cli("evaluate", "--model", tmp_path / "run", "--data", data, "--generate-answers", "--json", "-n", "4")
    after = json.loads(out)["exact_match"]
    assert code == 0 and after > before + 0.2, (before, after)


def test_serving_renders_prompts_exactly_as_training_did(chat_run):
    """The saved folder carries the training template: generate / serve render a conversation's prompt to the same text."""
    from transformers import AutoTokenizer

    from llmkit.inference.sampling import SamplingOptions
    from llmkit.inference.transformers import TransformersBackend
    from llmkit.models.refs import resolve

    tok = AutoTokenizer.from_pretrained(chat_run)
    trained = ChatEncoder(tok, SIMPLE)
    backend = TransformersBackend(resolve(str(chat_run)), device="cpu")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QA[0][0]}]
    assert backend.format(msgs, SamplingOptions(chat=True)) == trained.render(msgs, add_generation_prompt=True)
    assert backend.format(QA[0][0], SamplingOptions(chat=True, system="Be brief.")) == trained.render(msgs, add_generation_prompt=True)


def test_truncation_never_leaves_an_all_masked_row(tiny_llama, tmp_path, cli):
    """A conversation whose reply is cut off by --block-size is dropped and counted; if all are, the run stops."""
    long_q = " ".join(["the quick brown fox"] * 30)
    rows = [{"messages": [{"role": "user", "content": long_q if i % 2 else "Hello"}, {"role": "assistant", "content": "world"}]}
            for i in range(8)]
    data = _write_jsonl(tmp_path / "long.jsonl", rows)
    code, _, err = cli("finetune", "--model", tiny_llama, "--data", data, "--out", tmp_path / "a", "--max-steps", "1", "--block-size", "24", "--quiet")
    assert code == 0 and "dropped 4 of 8 rows" in err and f"{data}:line 2" in err
    assert json.loads((tmp_path / "a" / "llmkit.json").read_text())["examples"]["dropped"]["train"] == 4
    only_long = _write_jsonl(tmp_path / "only-long.jsonl", rows[1::2])
    code, _, err = cli("finetune", "--model", tiny_llama, "--data", only_long, "--out", tmp_path / "b", "--max-steps", "1", "--block-size", "24")
    assert code == 2 and "no response token is left" in err and not (tmp_path / "b").exists()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("packed", [False, True])
def test_sparse_loss_equals_the_models_own_loss_and_gradients(arch, packed, tiny_llama, tiny_gpt2):
    """The LM head run only at learned positions gives the model's own loss and the same gradients."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.training.losses import keeps_logits, sparse_causal_lm_loss

    folder = tiny_llama if arch == "llama" else tiny_gpt2
    tok = AutoTokenizer.from_pretrained(folder)
    template = SIMPLE if arch == "llama" else "{% for m in messages %}{{ m['content'] }}<|endoftext|>{% endfor %}"
    convs = [Conversation([{"role": "user", "content": q}, {"role": "assistant", "content": a}], f"row {i}") for i, (q, a) in enumerate(QA)]
    ids, labels, _ = encode_conversations(ChatEncoder(tok, template), convs, 64)
    items = [{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels, strict=True)]
    if packed:
        p_ids, p_labels, p_pos = pack(ids, labels, 40)
        items = [{"input_ids": i, "labels": lab, "position_ids": p} for i, lab, p in zip(p_ids, p_labels, p_pos, strict=True)]
    batch = Collator(tok.eos_token_id, causal=True)(items)
    batch.pop("num_tokens", None), batch.pop("num_examples", None)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32")
    model.config.use_cache = False
    assert keeps_logits(model)
    grads = []
    for loss_fn in (lambda m, b: m(**b).loss, sparse_causal_lm_loss):
        model.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        grads.append((float(loss.detach()), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    assert abs(grads[0][0] - grads[1][0]) < 1e-5
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)
