"""llmkit generate on tiny GPT-2 / Llama models: decoding options, batching, streaming, output, bad input."""

from __future__ import annotations

import io
import json

import pytest

from llmkit.errors import UsageError
from llmkit.inference.backends import choose_backend
from llmkit.inference.sampling import SamplingOptions, StopScanner
from llmkit.inference.transformers import TransformersBackend
from llmkit.models.refs import resolve

PROMPTS = ["Once upon a time", "To be", "The quick brown fox jumps over the"]


def _greedy(n=12, **kw):
    return SamplingOptions(max_new_tokens=n, temperature=0, **kw)


def _jsonl(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture(params=["tiny_gpt2", "tiny_llama"])
def tiny(request):
    return request.getfixturevalue(request.param)


def test_batched_greedy_equals_one_by_one(tiny):
    backend = TransformersBackend(resolve(str(tiny)), device="cpu", batch_size=8)
    opts = _greedy(10)
    batched = [g.text for g in backend.generate(PROMPTS, opts)]
    single = [next(iter(backend.generate([p], opts))).text for p in PROMPTS]
    assert batched == single
    assert all(t for t in batched)


def test_seed_makes_sampling_repeatable(cli, tiny_llama):
    args = ["generate", "Once upon a time", "--model", tiny_llama, "-n", "16", "--json", "--temperature", "1.0"]
    a = _jsonl(cli(*args, "--seed", "7")[1])
    b = _jsonl(cli(*args, "--seed", "7")[1])
    c = _jsonl(cli(*args, "--seed", "8")[1])
    assert a[0]["text"] == b[0]["text"]
    assert a[0]["text"] != c[0]["text"]  # 16 tokens from a random 400-token vocab: a tie is vanishingly unlikely


def test_num_return_sequences_differ_and_keep_order(cli, tiny_llama):
    out = cli("generate", "To be", "Hello", "--model", tiny_llama, "-n", "12", "--json", "--seed", "1",
              "--num-return-sequences", "3", "--temperature", "1.0")[1]
    rows = _jsonl(out)
    assert [(r["prompt"], r["index"]) for r in rows] == [("To be", 0), ("To be", 1), ("To be", 2),
                                                         ("Hello", 0), ("Hello", 1), ("Hello", 2)]
    assert len({r["text"] for r in rows[:3]}) > 1


def test_json_fields(cli, tiny_gpt2):
    code, out, err = cli("generate", *PROMPTS[:2], "--model", tiny_gpt2, "-n", "5", "--temperature", "0", "--json")
    assert code == 0
    rows = _jsonl(out)
    assert len(rows) == 2
    assert "tokens/s" in err.splitlines()[-1]  # the speed summary stays, on stderr, out of the JSON
    for row, prompt in zip(rows, PROMPTS[:2], strict=True):
        assert row["prompt"] == prompt
        assert {"text", "new_tokens", "seconds", "tokens_per_s"} <= set(row)
        assert 1 <= row["new_tokens"] <= 5
        assert row["tokens_per_s"] > 0
        assert not row["text"].startswith(prompt)  # continuation only


def test_stop_string_cuts_text_and_generation(tiny_llama):
    backend = TransformersBackend(resolve(str(tiny_llama)), device="cpu")
    full = next(iter(backend.generate(["Once upon a time"], _greedy(24)))).text
    assert len(full) > 6
    stop = full[3:6]  # something we know the model will produce
    cut = next(iter(backend.generate(["Once upon a time"], _greedy(24, stop=(stop,)))))
    assert cut.text == full[: full.find(stop)]
    assert cut.finish_reason == "stop"


def test_stream_prints_same_text_as_batch(cli, tiny_gpt2):
    base = ["generate", "Once upon a time", "--model", tiny_gpt2, "-n", "12", "--temperature", "0", "-q"]
    streamed = cli(*base, "--stream")[1]
    plain = cli(*base, "--no-stream")[1]
    row = _jsonl(cli(*base, "--json")[1])[0]
    assert streamed == plain == "Once upon a time" + row["text"] + "\n"


def test_chat_template_applied(tiny_llama, cli):
    backend = TransformersBackend(resolve(str(tiny_llama)), device="cpu")
    assert backend.format("hi", SamplingOptions(chat=True)) == "<|user|>hi</s><|assistant|>"
    assert backend.prompt_lengths(["hi"], SamplingOptions(chat=True))[0] > backend.prompt_lengths(["hi"], SamplingOptions())[0]
    code, out, _ = cli("generate", "hi", "--model", tiny_llama, "--chat", "-n", "4", "--json", "--temperature", "0")
    assert code == 0 and _jsonl(out)[0]["prompt_tokens"] == backend.prompt_lengths(["hi"], SamplingOptions(chat=True))[0]


def test_chat_without_template_is_an_error(cli, tiny_gpt2):
    code, _, err = cli("generate", "hi", "--model", tiny_gpt2, "--chat")
    assert code == 2 and "no chat template" in err


def test_prompts_file_and_stdin(cli, tiny_gpt2, tmp_path, monkeypatch):
    f = tmp_path / "prompts.txt"
    f.write_text("first prompt\n\nsecond prompt\n")
    rows = _jsonl(cli("generate", "-f", f, "--model", tiny_gpt2, "-n", "3", "--json")[1])
    assert [r["prompt"] for r in rows] == ["first prompt", "second prompt"]
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin\n"))
    rows = _jsonl(cli("generate", "--model", tiny_gpt2, "-n", "3", "--json")[1])
    assert [r["prompt"] for r in rows] == ["from stdin"]


@pytest.mark.parametrize("args, message", [
    (["", "-n", "4"], "prompt 1 is empty"),
    (["   ", "-n", "4"], "prompt 1 is empty"),
    (["hi", "-n", "0"], "--max-new-tokens must be at least 1"),
    (["hi", "-n", "-3"], "--max-new-tokens must be at least 1"),
    (["hi", "--temperature", "-1"], "--temperature must be >= 0"),
    (["hi", "--backend", "vllm"], "--backend vllm is not one of"),
    (["hi", "--stop", ""], "--stop must not be an empty string"),
    (["-f", "/no/such/prompts.txt"], "does not exist"),
    (["hi " * 40, "-n", "40"], "exceeds the model's context of 64 tokens"),  # tiny GPT-2: n_positions=64
    (["hi", "--threads", "0"], "--threads must be at least 1"),
])
def test_bad_input_is_one_line_exit_2(cli, tiny_gpt2, args, message):
    code, out, err = cli("generate", *args, "--model", tiny_gpt2)
    assert code == 2, err
    assert message in err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert out == ""


def test_unknown_model(cli):
    code, _, err = cli("generate", "hi", "--model", "no-such-alias-or/model-xyz")
    assert code == 2 and "smollm2-135m" in err


def test_stop_scanner_holds_back_possible_stop_prefix():
    s = StopScanner(("END",))
    assert s.feed("hello E") == "hello "  # "E" could start "END"
    assert s.feed("N") == ""
    assert s.feed("Dmore") == ""
    assert s.stopped and s.text == "hello "
    s = StopScanner(("END",))
    assert s.feed("a E") == "a " and s.feed("x") == "Ex" and s.flush() == ""


def test_backend_choice(tiny_gpt2, tiny_bert):
    from llmkit.inference.backends import llama_cpp_available

    ref = resolve(str(tiny_gpt2))  # an HF folder of a GGUF-exportable architecture: llama.cpp through the GGUF cache
    assert choose_backend(ref) == ("llama.cpp" if llama_cpp_available() else "transformers")
    assert choose_backend(ref, "transformers") == "transformers"
    with pytest.raises(UsageError):
        choose_backend(resolve(str(tiny_bert)), "llama.cpp")


def test_options_validation_names_every_flag():
    with pytest.raises(UsageError) as e:
        SamplingOptions(max_new_tokens=0, top_p=0, num_return_sequences=0).validate()
    assert "--max-new-tokens" in str(e.value) and "--top-p" in str(e.value) and "--num-return-sequences" in str(e.value)


def test_greedy_with_several_sequences_repeats_the_one_greedy_text(tiny_gpt2):
    """transformers refuses greedy num_return_sequences > 1; greedy gives one text, so every sample is that text."""
    backend = TransformersBackend(resolve(str(tiny_gpt2)), device="cpu")
    gens = list(backend.generate(PROMPTS[:2], _greedy(num_return_sequences=2)))
    assert [g.index for g in gens] == [0, 1, 0, 1]
    assert gens[0].text == gens[1].text and gens[2].text == gens[3].text
    assert gens[0].text == next(iter(backend.generate(PROMPTS[:1], _greedy()))).text


# ------------------------------------------------------------------------------ threads on a busy machine


def _stat(per_cpu: list[tuple[int, int]]) -> str:
    """/proc/stat text with these (busy, idle) jiffies per core; busy goes in `user`."""
    lines = [f"cpu  {sum(b for b, _ in per_cpu)} 0 0 {sum(i for _, i in per_cpu)} 0 0 0 0 0 0"]
    lines += [f"cpu{k} {b} 0 0 {i} 0 0 0 0 0 0" for k, (b, i) in enumerate(per_cpu)]
    return "\n".join([*lines, "intr 1 2 3", "procs_running 3"])


def _sample(when: float, per_cpu: list[tuple[int, int]], own: float = 0.0, cpus: set[int] | None = None):
    from llmkit.machine import CpuSample, parse_proc_stat

    busy, total, n = parse_proc_stat(_stat(per_cpu), cpus)
    return CpuSample(when, busy, total, own, n)


@pytest.mark.parametrize("others_busy, own, threads", [
    ((0, 0), 0.0, 2),        # idle machine: every core, today's speed
    ((1, 0), 0.0, 2),        # a shell blinking on one core: still both
    ((100, 0), 0.0, 1),      # a training process on one core: the other one only
    ((100, 100), 0.0, 1),    # both cores busy: one thread, never none
    ((60, 60), 0.0, 1),      # 1.2 cores busy
    ((100, 0), 1.0, 2),      # the busy core was this process itself (loading the model): not a competitor
])
def test_thread_choice_from_proc_stat(others_busy, own, threads):
    """Two cores, 1 s (100 jiffies each) between samples; llmkit's own CPU seconds are not someone else's load."""
    from llmkit.machine import idle_cores, threads_for

    before = _sample(0.0, [(1000, 5000), (2000, 4000)])
    after = _sample(1.0, [(1000 + others_busy[0], 5100 - others_busy[0]), (2000 + others_busy[1], 4100 - others_busy[1])], own=own)
    idle = idle_cores(before, after, hz=100)
    assert threads_for(idle, 2) == threads


def test_thread_choice_counts_only_this_process_cores_and_needs_a_long_enough_window():
    from llmkit.machine import CoreWatch, idle_cores, threads_for

    # cores 0-1 of 4 are ours (affinity); cores 2-3 are saturated by others and must not count
    before = _sample(0.0, [(0, 0)] * 4, cpus={0, 1})
    after = _sample(1.0, [(0, 100), (0, 100), (100, 0), (100, 0)], cpus={0, 1})
    assert after.cores == 2 and threads_for(idle_cores(before, after, hz=100), 2) == 2
    # 10 ms apart: too few jiffies to tell, so no change from every core
    close = _sample(0.01, [(1, 0), (0, 1), (0, 0), (0, 0)], cpus={0, 1})
    assert idle_cores(before, close, hz=100) is None and threads_for(None, 2) == 2
    assert threads_for(0.0, 16) == 1 and threads_for(13.0, 16) == 13 and threads_for(7.9, 8) == 8

    # CoreWatch re-checks: busy -> 1 thread, quiet again -> back to 2; no change -> None
    samples = iter([_sample(0.0, [(0, 0), (0, 0)]), _sample(1.0, [(100, 0), (100, 0)]),
                    _sample(2.0, [(200, 0), (200, 0)]), _sample(3.0, [(200, 100), (200, 100)])])
    watch = CoreWatch(2, window=0.0, every=0.0, sample=lambda: next(samples))
    assert watch.recheck() == 1 and watch.recheck() is None and watch.recheck() == 2 and watch.threads == 2


def test_progress_lines_say_batches():
    from llmkit.progress import LogBar, plural

    log = LogBar(18, "evaluating", "batch", every=0, file=io.StringIO())
    log.update(16)
    assert "evaluating: 16/18 batches (89%)" in log.line() and "batches/s" in log.line() and "batchs" not in log.line()
    assert [plural(u) for u in ("step", "batch", "text", "row", "entry", "box", "day")] == \
        ["steps", "batches", "texts", "rows", "entries", "boxes", "days"]
