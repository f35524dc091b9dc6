"""`--streaming`: a resumed stream gives the batches an uninterrupted one gives; processes read disjoint parts that
together are the whole data; bad input is still one line naming file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _jsonl(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"text": f"story {i}: once upon a time there was model number {i}."}) + "\n" for i in range(n)),
                    encoding="utf-8")
    return path


def _stream(folder, data: Path, rank: int = 0, world: int = 1, **kw):
    from transformers import AutoTokenizer

    from llmkit.config import DataConfig
    from llmkit.data.chat import ChatEncoder
    from llmkit.data.files import find_sources
    from llmkit.data.rows import make_plan
    from llmkit.data.streaming import StreamingExamples

    tok = AutoTokenizer.from_pretrained(str(folder))
    name, sources = find_sources(str(data), task="causal-lm")
    d = DataConfig(train=str(data), block_size=kw.pop("block_size", 8))
    plan = make_plan(sources, "causal-lm", d)
    chat = ChatEncoder(tok, tok.chat_template) if plan.kind == "chat" else None
    job = {"tokenizer": tok, "chat": chat, "labels": None, "max_length": 8, "block_size": d.block_size}
    return StreamingExamples(name, sources, plan, job, block_size=d.block_size, packing=False,
                             seed=kw.pop("seed", 0), buffer=kw.pop("buffer", 0), rank=rank, world=world)


def _epoch(stream) -> list[list[int]]:
    out, it = [], iter(stream)
    while True:
        example = next(it)
        if stream.epoch:
            return out
        out.append(example["input_ids"].tolist())


@pytest.mark.parametrize("kind", ["jsonl", "txt"])
def test_two_processes_read_disjoint_parts_that_make_the_whole(tiny_gpt2, tiny_llama, tmp_path, kind):
    if kind == "jsonl":  # conversations: one example per line
        data = tmp_path / "chat.jsonl"
        data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}?"},
                                                         {"role": "assistant", "content": f"answer {i}."}]}) + "\n" for i in range(101)))
        whole = [tuple(x) for x in _epoch(_stream(tiny_llama, data, block_size=1024))]
        parts = [[tuple(x) for x in _epoch(_stream(tiny_llama, data, r, 2, block_size=1024))] for r in (0, 1)]
        assert len(whole) == 101 and set(parts[0]).isdisjoint(parts[1]) and sorted(parts[0] + parts[1]) == sorted(whole)
    else:
        data = tmp_path / "t.txt"
        data.write_text("\n".join(f"line {i} of a long story" for i in range(300)), encoding="utf-8")
        tokens = [sum(len(b) for b in _epoch(_stream(tiny_gpt2, data, r, 2))) for r in (0, 1)]
        whole = sum(len(b) for b in _epoch(_stream(tiny_gpt2, data)))
        assert abs(sum(tokens) - whole) <= 2 * 8 and min(tokens) > 0.4 * whole  # each half; only the unfilled tails differ


def test_the_shuffle_buffer_is_seeded_and_its_state_resumes_exactly(tiny_gpt2, tmp_path):
    data = _jsonl(tmp_path / "rows.jsonl", 60)
    a = _stream(tiny_gpt2, data, buffer=16, seed=3)
    it = iter(a)
    first = [next(it)["input_ids"].tolist() for _ in range(25)]
    state = a.state_dict()
    rest = [next(it)["input_ids"].tolist() for _ in range(60)]  # across an epoch boundary too
    b = _stream(tiny_gpt2, data, buffer=16, seed=3)
    b.load_state_dict(state)
    jt = iter(b)
    assert [next(jt)["input_ids"].tolist() for _ in range(60)] == rest
    c = _stream(tiny_gpt2, data, buffer=16, seed=3)
    kt = iter(c)
    assert [next(kt)["input_ids"].tolist() for _ in range(25)] == first
    assert first != [x for x in _epoch(_stream(tiny_gpt2, data))][:25]  # shuffled


def test_resumed_stream_gives_the_same_batches_and_weights(tiny_gpt2, tmp_path, monkeypatch):
    import llmkit.training.loop
    from llmkit.cli import main

    data = _jsonl(tmp_path / "rows.jsonl", 40)
    seen: list[list[list[int]]] = []
    real = llmkit.training.loop._default_loss

    def recording(model, batch, **kw):
        seen.append(batch["input_ids"].tolist())
        return real(model, batch, **kw)

    monkeypatch.setattr(llmkit.training.loop, "_default_loss", recording)

    def run(out: Path, *extra: str) -> int:
        with pytest.raises(SystemExit) as e:
            main(["finetune", "--model", str(tiny_gpt2), "--data", str(data), "--streaming", "--block-size", "16", "--batch-size", "4",
                  "--max-steps", "8", "--save-every", "2", "--quiet", "--set", "train.log_every=1", "--set", "data.shuffle_buffer=8",
                  "--out", str(out), *extra])
        return e.value.code or 0

    assert run(tmp_path / "whole") == 0
    straight = list(seen)
    seen.clear()

    calls = {"n": 0}

    def dying(model, batch, **kw):
        calls["n"] += 1
        if calls["n"] == 6:  # during step 6: the newest checkpoint is step 4's
            raise KeyboardInterrupt
        return recording(model, batch, **kw)

    monkeypatch.setattr(llmkit.training.loop, "_default_loss", dying)
    assert run(tmp_path / "cut") == 130
    monkeypatch.setattr(llmkit.training.loop, "_default_loss", recording)
    before = list(seen[:4])
    seen.clear()
    assert run(tmp_path / "cut", "--resume") == 0
    assert before + seen == straight  # the batches of steps 5-8 are the ones the uninterrupted run saw

    def losses(out: Path) -> list[float]:
        return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "whole"), abs=1e-6)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(float((a[k] - b[k]).abs().max()) < 1e-6 for k in a)


def test_streaming_errors(cli, tiny_gpt2, toy_data, tmp_path):
    base = ["finetune", "--model", tiny_gpt2, "--streaming", "--out", tmp_path / "out", "--block-size", "8", "--quiet"]
    code, _, err = cli(*base, "--data", toy_data / "train.txt")
    assert code == 2 and "--streaming needs --max-steps" in err
    code, _, err = cli(*base, "--data", toy_data / "train.csv", "--max-steps", "2")
    assert code == 2 and "--streaming reads .txt/.md and .jsonl files" in err and "train.csv" in err
    bad = _jsonl(tmp_path / "bad.jsonl", 30)
    bad.write_text(bad.read_text() + '{"text": "cut off\n', encoding="utf-8")
    code, _, err = cli(*base, "--data", bad, "--max-steps", "40", "--batch-size", "8", "--set", "data.shuffle_buffer=0")
    assert code == 2 and "bad.jsonl:line 31: not valid JSON" in err
    code, _, err = cli(*base, "--data", toy_data / "train.txt", "--max-steps", "2", "--task", "seq-cls")
    assert code == 2 and "--streaming is for --task causal-lm" in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("packing", [False, True])
def test_the_stream_makes_the_examples_the_cache_makes(tiny_llama, tmp_path, packing):
    """One pass of the stream (no shuffle) is the prepared data: same blocks, same conversations, same packing."""
    from transformers import AutoTokenizer

    from llmkit.config import load_recipe
    from llmkit.data.chat import ChatEncoder
    from llmkit.data.examples import Collator
    from llmkit.data.files import find_sources
    from llmkit.data.prepare import prepare_data
    from llmkit.data.rows import make_plan
    from llmkit.data.streaming import StreamingExamples

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}?" * (1 + i % 4)},
                                                     {"role": "assistant", "content": f"answer {i}."}]}) + "\n" for i in range(30)))
    cfg = load_recipe(None, [], {"data.train": str(data), "data.block_size": 48, "data.packing": packing, "quiet": True})
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    cached = prepare_data(cfg, tok).train
    name, sources = find_sources(str(data), task="causal-lm")
    job = {"tokenizer": tok, "chat": ChatEncoder(tok, tok.chat_template), "labels": None, "max_length": 8, "block_size": 48}
    stream = StreamingExamples(name, sources, make_plan(sources, "causal-lm", cfg.data), job, block_size=48, packing=packing,
                               seed=0, buffer=0)
    it, streamed = iter(stream), []
    while len(streamed) < len(cached) - packing:  # packing: the cache also writes the last, half-filled row
        streamed.append({k: v.tolist() for k, v in next(it).items()})
    assert streamed == [cached[i] for i in range(len(streamed))]
    batch = Collator(0, causal=True)([next(it) for _ in range(2)])  # the stream's int32 arrays batch like the cache's lists
    assert batch["input_ids"].shape[0] == 2 and ("position_ids" in batch) == packing
