"""Check 11: generation requests that cannot work are refused before the model runs (one line, exit 2).

The models' forward passes are replaced by a tripwire: a refused request must never reach them. Empty
prompts and max-new-tokens <= 0 are refused before the model is even loaded.
"""

from __future__ import annotations

import pytest
from reliability_helpers import record


@pytest.fixture
def tripwire(monkeypatch):
    """Counts model loads; any forward pass of the test models fails the test."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    from llmkit.inference.transformers import TransformersBackend

    calls = {"forward": 0, "load": 0}

    def forward(self, *a, **k):
        calls["forward"] += 1
        raise AssertionError("the model was called for a request that should have been refused")

    monkeypatch.setattr(GPT2LMHeadModel, "forward", forward)
    monkeypatch.setattr(LlamaForCausalLM, "forward", forward)
    real_load = TransformersBackend.__init__

    def counting_init(self, *a, **k):
        calls["load"] += 1
        real_load(self, *a, **k)

    monkeypatch.setattr(TransformersBackend, "__init__", counting_init)
    return calls


LONG = " ".join(["the quick brown fox"] * 40)  # ~160 tokens: over both tiny models' context


@pytest.mark.parametrize("arch,context", [("gpt2", 64), ("llama", 128)])
def test_context_overflow_is_refused_before_generating(cli, request, tripwire, one_line_error, arch, context):
    model = request.getfixturevalue(f"tiny_{arch}")
    code, _, err = cli("generate", "--model", model, LONG, "-n", "4")
    assert code == 2
    one_line_error(err, f"context of {context} tokens", "shorten the prompt")
    code, _, err = cli("generate", "--model", model, "Hello there", "-n", str(context))  # prompt fits, prompt + new does not
    assert code == 2
    one_line_error(err, f"--max-new-tokens {context}", f"context of {context} tokens")
    for flag in ([], ["--json"], ["--stream"], ["--batch-size", "1"]):
        code, _, err = cli("generate", "--model", model, "Hi", LONG, "-n", "4", *flag)
        assert code == 2, flag
        one_line_error(err, "prompt 2")
    assert tripwire["forward"] == 0


@pytest.mark.parametrize("argv,needle", [
    (["-n", "0", "Hello"], "--max-new-tokens must be at least 1"),
    (["-n", "-5", "Hello"], "--max-new-tokens must be at least 1"),
    ([""], "prompt 1 is empty"),
    (["   \n\t"], "prompt 1 is empty"),
    (["Hello", ""], "prompt 2 is empty"),
    (["--chat", " "], "prompt 1 is empty"),
])
def test_bad_requests_are_refused_before_loading_the_model(cli, tiny_llama, tripwire, one_line_error, argv, needle):
    code, _, err = cli("generate", "--model", tiny_llama, *argv)
    assert code == 2
    one_line_error(err, needle)
    assert tripwire == {"forward": 0, "load": 0}


def test_an_empty_prompts_file_is_refused(cli, tiny_gpt2, tmp_path, tripwire, one_line_error):
    f = tmp_path / "prompts.txt"
    f.write_text("\n   \n\n")
    code, _, err = cli("generate", "--model", tiny_gpt2, "--prompts-file", f)
    assert code == 2
    one_line_error(err, "holds no prompts")
    assert tripwire == {"forward": 0, "load": 0}
    record(11, "generation limits (overflow, -n <= 0, empty prompts)",
           "refused with one line, exit 2; forward passes 0 (overflow), model loads 0 (-n, empty)")
