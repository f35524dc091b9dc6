"""Prepared data: the same examples as the in-memory reference, a cache keyed on exactly what they depend on,
atomic builds, any number of worker processes, errors that name the row even at the end of a big file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmkit.config import load_recipe
from llmkit.errors import UsageError


def _cfg(data: Path | str, **flags):
    return load_recipe(None, [], {"data.train": str(data), "quiet": True, **flags})


def _tok(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _rows(examples):
    return [examples[i] for i in range(len(examples))]


def _chat_file(path: Path, n: int = 12) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Once upon a time {i}?"},
                          {"role": "assistant", "content": "there was a little model." * (1 + i % 3)}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_text_blocks_equal_the_in_memory_packing(tiny_llama, toy_data, tmp_path):
    from llmkit.data.examples import pack_causal_lm
    from llmkit.data.prepare import prepare_data

    tok = _tok(tiny_llama)
    # a folder of two documents: EOS between them, BOS at the start of each (the Llama tokenizer adds it)
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text((toy_data / "train.txt").read_text())
    (folder / "b.txt").write_text((toy_data / "eval.txt").read_text())
    texts = [(folder / "a.txt").read_text(), (folder / "b.txt").read_text()]
    data = prepare_data(_cfg(folder, **{"data.block_size": 16}), tok)
    assert [r["input_ids"] for r in _rows(data.train)] == pack_causal_lm(texts, tok, 16, "x")
    assert data.train.lengths.tolist() == [16] * len(data.train)


def test_text_cut_into_pieces_gives_the_same_tokens(tiny_gpt2, toy_data, tmp_path, monkeypatch):
    """A big file is tokenized in ~1 MB pieces cut at line ends: on a byte-level BPE the tokens do not change."""
    import llmkit.data.files
    from llmkit.data.examples import pack_causal_lm
    from llmkit.data.prepare import prepare_data

    tok = _tok(tiny_gpt2)
    text = (toy_data / "train.txt").read_text()
    monkeypatch.setattr(llmkit.data.files, "CHUNK_BYTES", 200)  # many pieces, several tasks
    monkeypatch.setattr("llmkit.data.prepare.TASK_BYTES", 600)
    data = prepare_data(_cfg(toy_data / "train.txt", **{"data.block_size": 16, "data.num_proc": 2}), tok)
    assert [r["input_ids"] for r in _rows(data.train)] == pack_causal_lm([text], tok, 16, "x")


def test_chat_rows_equal_the_in_memory_encoder_packed_or_not(tiny_llama, tmp_path):
    from llmkit.data.chat import ChatEncoder, encode_conversations, pack
    from llmkit.data.formats import read_conversations
    from llmkit.data.prepare import prepare_data

    path = _chat_file(tmp_path / "chat.jsonl")
    tok = _tok(tiny_llama)
    convs = read_conversations(str(path))
    ids, labels, _ = encode_conversations(ChatEncoder(tok, tok.chat_template), convs, 24)
    plain = prepare_data(_cfg(path, **{"data.block_size": 24}), tok)
    assert [(r["input_ids"], r["labels"]) for r in _rows(plain.train)] == list(zip(ids, labels, strict=True))
    assert plain.chat.end_of_turn == {tok.convert_tokens_to_ids("</s>")}
    packed = prepare_data(_cfg(path, **{"data.block_size": 24, "data.packing": True, "data.num_proc": 2}), tok)
    p_ids, p_labels, p_pos = pack(ids, labels, 24)
    assert [(r["input_ids"], r["labels"], r["position_ids"]) for r in _rows(packed.train)] == list(zip(p_ids, p_labels, p_pos, strict=True))
    assert packed.train.conversations == len(ids)


def test_classification_rows_equal_the_in_memory_encoder(tiny_bert, toy_data):
    import csv

    from llmkit.data.examples import encode_seq_cls
    from llmkit.data.prepare import prepare_data

    tok = _tok(tiny_bert)
    rows = list(csv.DictReader(open(toy_data / "train.csv", encoding="utf-8")))
    data = prepare_data(_cfg(toy_data / "train.csv", task="seq-cls", **{"data.max_length": 8}), tok)
    assert data.labels.names == ["neg", "pos"]
    assert [r["input_ids"] for r in _rows(data.train)] == encode_seq_cls(tok, [r["text"] for r in rows], None, 8)
    assert [r["labels"] for r in _rows(data.train)] == [data.labels.label2id[r["label"]] for r in rows]


def test_prompt_response_rows_drop_what_cannot_be_learned(tiny_gpt2, tmp_path, capsys):
    from llmkit.data.examples import encode_prompt_response
    from llmkit.data.prepare import prepare_data

    tok = _tok(tiny_gpt2)
    path = tmp_path / "pr.csv"
    rows = [("short prompt", "an answer"), ("a very long prompt " * 10, "lost"), ("hi", "there")]
    path.write_text("prompt,text\n" + "".join(f'"{p}","{r}"\n' for p, r in rows), encoding="utf-8")
    data = prepare_data(_cfg(path, **{"data.prompt_column": "prompt", "data.block_size": 12}), tok)
    ids, labels, kept = encode_prompt_response(tok, [p for p, _ in rows], [r for _, r in rows], 12)
    assert [(r["input_ids"], r["labels"]) for r in _rows(data.train)] == list(zip(ids, labels, strict=True))
    assert kept == [0, 2] and data.train.dropped == 1
    assert f"dropped 1 of 3 rows of {path}" in capsys.readouterr().err and ":line 3" in str(data.report)


def test_the_cache_key_follows_exactly_what_the_examples_depend_on(tiny_llama, tiny_gpt2, toy_data, tmp_path):
    from llmkit.data.prepare import prepare_data

    tok = _tok(tiny_llama)
    text = tmp_path / "t.txt"
    text.write_text((toy_data / "train.txt").read_text())
    chat = _chat_file(tmp_path / "c.jsonl")

    def key(data=text, tokenizer=tok, **flags) -> str:
        return prepare_data(_cfg(data, **flags), tokenizer).key

    base = key(**{"data.block_size": 16})
    assert key(**{"data.block_size": 16}) == base  # the same inputs: the same folder, reused
    assert key(**{"data.block_size": 16, "data.num_proc": 2, "train.lr": 1.0, "out": "elsewhere"}) == base  # not data settings
    assert key(**{"data.block_size": 32}) != base
    assert key(tokenizer=_tok(tiny_gpt2), **{"data.block_size": 16}) != base
    assert key(**{"data.block_size": 16, "data.max_train_samples": 3}) != base
    time.sleep(0.01)
    text.write_text((toy_data / "train.txt").read_text() + "\nOne more line.")  # content (and with it size and mtime)
    assert key(**{"data.block_size": 16}) != base
    c = key(chat)
    assert key(chat, **{"data.packing": True}) != c
    assert key(chat, **{"data.train_on_prompt": True}) != c
    assert key(chat, **{"data.chat_template": "chatml"}) != c  # another template
    assert key(chat, **{"data.format": "messages"}) != c  # another way of reading the rows
    assert key(chat, **{"data.max_length": 7}) != c  # (max_length is part of every key: it is cheap to be safe)
    other_template = _tok(tiny_llama)
    other_template.chat_template = other_template.chat_template.replace("</s>", "</s>\n")
    assert key(chat, tokenizer=other_template) != c
    csv_file = tmp_path / "d.csv"
    csv_file.write_text("a,b\nhello,there\nmore,text\n")
    assert key(csv_file, **{"data.text_column": "a", "data.block_size": 4}) != key(csv_file, **{"data.text_column": "b", "data.block_size": 4})


def test_a_failed_or_killed_build_leaves_nothing_a_later_run_uses(tiny_gpt2, toy_data, tmp_path, monkeypatch):
    import llmkit.data.prepare
    from llmkit.data.prepare import cache_folder, prepare_data

    tok = _tok(tiny_gpt2)
    cfg = _cfg(toy_data / "train.txt", **{"data.block_size": 8})
    real = llmkit.data.prepare.Assembler.finish

    def boom(self):
        raise RuntimeError("killed while assembling")

    monkeypatch.setattr(llmkit.data.prepare.Assembler, "finish", boom)
    with pytest.raises(RuntimeError):
        prepare_data(cfg, tok)
    monkeypatch.setattr(llmkit.data.prepare.Assembler, "finish", real)
    assert not any(p.name.startswith(".tmp-") for p in cache_folder().iterdir())  # cleaned up
    data = prepare_data(cfg, tok)
    assert len(data.train) and (data.folder / "meta.json").exists()

    # a SIGKILL cannot clean up: its temporary folder stays, under a name no run reads
    big = tmp_path / "big.txt"
    big.write_text((toy_data / "train.txt").read_text() * 4000)
    env = {**os.environ, "LLMKIT_CACHE": str(tmp_path / "cache"), "LLMKIT_PROGRESS_EVERY": "0"}
    cmd = [sys.executable, "-m", "llmkit", "prepare", "--model", str(tiny_gpt2), "--data", str(big), "--block-size", "8"]
    proc = subprocess.Popen([*cmd, "--num-proc", "1"], env=env, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # kill it in the middle of tokenizing
        if line.startswith("tokenizing"):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    data_dir = tmp_path / "cache" / "data"
    assert [p.name for p in data_dir.iterdir() if not p.name.startswith(".tmp-")] == []
    done = subprocess.run([*cmd, "--json"], env=env, capture_output=True, text=True, check=True)
    report = json.loads(done.stdout)
    assert [p.name for p in data_dir.iterdir()] == [report["key"]]  # the killed build's leftovers were removed
    assert report["train"]["examples"] == len(prepare_data(_cfg(big, **{"data.block_size": 8}), tok).train)


def test_rebuild_data_builds_again_and_a_hit_says_where(cli, tiny_gpt2, toy_data):
    args = ["prepare", "--model", tiny_gpt2, "--data", toy_data / "train.txt", "--block-size", "8"]
    code, out, err = cli(*args)
    assert code == 0 and "preparing data into" in err and "blocks of 8 tokens" in out
    code, out, err = cli(*args)
    assert code == 0 and "(cached; built in" in err
    code, out, err = cli(*args, "--rebuild-data", "--json")
    assert code == 0 and "preparing data into" in err and json.loads(out)["train"]["examples"] > 0


def test_progress_lines_when_not_a_terminal(cli, tiny_gpt2, toy_data, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMKIT_PROGRESS_EVERY", "0")
    csv_file = tmp_path / "many.csv"
    csv_file.write_text("text\n" + "".join(f"row number {i} of a longer file\n" for i in range(10000)))
    code, _, err = cli("prepare", "--model", tiny_gpt2, "--data", csv_file, "--block-size", "8")
    assert code == 0
    assert "checking train data: " in err and " rows/s" in err
    assert "tokenizing train data: " in err and "tokens/s" in err and "ETA" in err


def test_a_bad_row_at_the_end_of_a_big_file_is_named(cli, tiny_gpt2, tmp_path):
    path = tmp_path / "big.jsonl"
    n = 100_000
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n - 1):
            f.write(json.dumps({"text": f"row {i}"}) + "\n")
        f.write('{"text": {"nested": "not text"}}\n')
    code, _, err = cli("prepare", "--model", tiny_gpt2, "--data", path, "--quiet")
    assert code == 2 and f"big.jsonl:line {n}: column 'text' holds a JSON dict" in err
    path.write_text(path.read_text(encoding="utf-8").rsplit("\n", 2)[0] + '\n{"text": "cut off\n', encoding="utf-8")
    code, _, err = cli("prepare", "--model", tiny_gpt2, "--data", path, "--quiet")
    assert code == 2 and f"big.jsonl:line {n}: not valid JSON" in err


def test_worker_count_does_not_change_the_examples(tiny_llama, tmp_path, monkeypatch):
    from llmkit.data.prepare import prepare_data

    monkeypatch.setattr("llmkit.data.prepare.TASK_ROWS", 5)  # several tasks per worker
    path = _chat_file(tmp_path / "chat.jsonl", n=40)
    tok = _tok(tiny_llama)
    one = prepare_data(_cfg(path, **{"data.num_proc": 1, "data.rebuild": True}), tok)
    two = prepare_data(_cfg(path, **{"data.num_proc": 2, "data.rebuild": True}), tok)
    assert one.key == two.key and _rows(one.train) == _rows(two.train) and len(one.train) == 40


def test_prepare_usage_errors(cli, tiny_gpt2, tmp_path):
    code, _, err = cli("prepare", "--model", tiny_gpt2)
    assert code == 2 and "--data is required" in err
    code, _, err = cli("prepare", "--model", tiny_gpt2, "--data", tmp_path / "missing.txt")
    assert code == 2 and "no such file" in err
    with pytest.raises(UsageError, match="--block-size must be >= 2"):
        from llmkit.data.prepare import prepare_command

        prepare_command(_cfg(tmp_path, **{"data.block_size": 1}))


def test_a_quick_trial_stops_the_workers_it_no_longer_needs(cli, tiny_llama, tmp_path, monkeypatch):
    """--max-train-samples ends tokenizing early: the pool's busy workers are stopped (SIGTERM) and the command goes on.

    Under the CLI, whose SIGTERM handler raises: a worker busy with a task turned the signal into that task's result,
    lived on, and the pool waited for it forever (seen in the README's quick trial of the chat recipe).
    """
    def hung(*_):
        raise TimeoutError("the pool never stopped its workers")

    monkeypatch.setattr("llmkit.data.prepare.TASK_ROWS", 500)  # tasks long enough that the other worker is busy at the stop
    path = _chat_file(tmp_path / "chat.jsonl", n=6000)
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(90)
    try:
        code, out, err = cli("prepare", "--model", tiny_llama, "--data", path, "--num-proc", "2", "--max-train-samples", "5", "--json")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert code == 0, err
    assert json.loads(out)["train"]["examples"] == 5
