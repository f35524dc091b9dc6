"""GRPO's llama.cpp rollouts (llmkit.inference.llama_rollouts) on tiny_llama: after a sync, llama.cpp samples from
exactly the weights being trained (greedy = transformers' greedy, for a LoRA with nonzero B and for full weights),
a sync after a weight change changes the output, a seed reproduces the samples, the shape is prompt-major with G per
prompt, and close() frees everything it made."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmkit.inference.rollouts import RolloutRequest

N = 6  # greedy tokens compared with transformers


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _lora(base: Path, seed: int = 1, targets: str | list[str] = "all-linear"):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    # init_lora_weights=False: B is random too, so the adapter really changes what the model says
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))


def _prompts(tokenizer) -> list[list[int]]:
    return [tokenizer(t).input_ids for t in ("hello world the", "a b c d e", "the fox jumps over the")]


def _greedy(model, ids: list[int], n: int = N):
    import torch

    out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, output_scores=True, return_dict_in_generate=True)
    return out.sequences[0, len(ids):].tolist(), out.scores


def _same_or_tie(got: list[int], want: list[int], scores) -> None:
    """F16/fp32 rounding in llama.cpp may only flip a near-tie of transformers' own logits (tiny random models)."""
    if got != want:
        k = next(i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b)
        assert scores[k][0][want[k]] - scores[k][0][got[k]] < 0.01, (k, got, want)


def _agrees_with_transformers(got: list[list[int]], model, prompts: list[list[int]]) -> None:
    """Each rollout is transformers' greedy continuation of its prompt with the same weights (up to near-ties)."""
    import torch

    with torch.no_grad():
        for i, ids in enumerate(prompts):
            want, scores = _greedy(model, ids)
            _same_or_tie(got[i], want[:len(got[i])], scores)


def _request(prompts, g=1, n=N, temperature=0.0, seed=0) -> RolloutRequest:
    return RolloutRequest(prompts=prompts, num_generations=g, max_new_tokens=n, temperature=temperature, top_p=1.0, seed=seed)


def _open(model, tiny_llama: Path):
    from transformers import AutoTokenizer

    from llmkit.inference.llama_rollouts import LlamaCppRollouts

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    rollouts = LlamaCppRollouts(model, tok, model_ref=str(tiny_llama), max_context=128, threads=1)
    rollouts.sync(model)
    return rollouts, tok


def test_lora_greedy_equals_transformers_and_sync_follows_the_weights(tiny_llama, cache):
    import torch

    model = _lora(tiny_llama)
    rollouts, tok = _open(model, tiny_llama)
    try:
        assert rollouts.mode == "adapter"
        prompts = _prompts(tok)
        got = rollouts.generate(_request(prompts, g=2))
        assert len(got) == 2 * len(prompts)
        with torch.no_grad():
            for i, ids in enumerate(prompts):
                want, scores = _greedy(model, ids)
                for k in range(2):  # prompt-major: prompt i's G completions are rows i*G .. i*G+G-1
                    # eos_token_id=None above: transformers runs on past EOS; llama.cpp's row stops there, and a
                    # row of N tokens means it did not stop
                    _same_or_tie(got[2 * i + k], want[:len(got[2 * i + k])], scores)
                    assert len(got[2 * i + k]) == N or got[2 * i + k][-1] == tok.eos_token_id
        before = rollouts.generate(_request(prompts))
        # an optimizer step's worth of change: every B moves
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.add_(torch.randn_like(p) * 0.5)
        assert rollouts.generate(_request(prompts)) == before  # not synced yet: still the old weights
        rollouts.sync(model)
        assert rollouts.syncs == 2
        after = rollouts.generate(_request(prompts))
        assert after != before
        _agrees_with_transformers(after, model, prompts)
    finally:
        rollouts.close()


def test_full_weights_sync_by_reexport(tiny_llama, cache):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    rollouts, tok = _open(model, tiny_llama)
    try:
        assert rollouts.mode == "merged"
        prompts = _prompts(tok)
        before = rollouts.generate(_request(prompts))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        rollouts.sync(model)
        after = rollouts.generate(_request(prompts))
        assert after != before
        _agrees_with_transformers(after, model, prompts)
    finally:
        rollouts.close()


def test_lora_llama_cpp_cannot_apply_falls_back_to_merged(tiny_llama, cache, capsys):

    model = _lora(tiny_llama, targets=["q_proj", "embed_tokens"])  # an adapted embedding: not an adapter llama.cpp applies
    rollouts, tok = _open(model, tiny_llama)
    try:
        assert rollouts.mode == "merged" and "re-export the merged weights" in capsys.readouterr().err
        prompts = _prompts(tok)
        got = rollouts.generate(_request(prompts))
        _agrees_with_transformers(got, model, prompts)
    finally:
        rollouts.close()


def test_seeded_sampling_is_reproducible_and_groups_differ(tiny_llama, cache):
    model = _lora(tiny_llama)
    rollouts, tok = _open(model, tiny_llama)
    try:
        prompts = _prompts(tok)
        first = rollouts.generate(_request(prompts, g=4, n=12, temperature=1.0, seed=7))
        assert len(first) == 12 and all(0 < len(c) <= 12 for c in first)
        assert all(len(c) == 12 or c[-1] == tok.eos_token_id for c in first)  # stopped rows end with EOS
        assert all(tok.eos_token_id not in c[:-1] for c in first)  # and nothing follows it
        assert len({tuple(c) for c in first[:4]}) > 1  # G samples of one prompt are not copies
        assert rollouts.generate(_request(prompts, g=4, n=12, temperature=1.0, seed=7)) == first
        rollouts.sync(model)  # the same weights transferred again: the same samples
        assert rollouts.syncs == 2
        assert rollouts.generate(_request(prompts, g=4, n=12, temperature=1.0, seed=7)) == first
        assert rollouts.generate(_request(prompts, g=4, n=12, temperature=1.0, seed=8)) != first
    finally:
        rollouts.close()


def test_context_overflow_is_one_clear_error_and_close_cleans_up(tiny_llama, cache):
    from llmkit.errors import UsageError

    model = _lora(tiny_llama)
    rollouts, _ = _open(model, tiny_llama)
    folder = rollouts.dir
    assert folder.is_dir()
    with pytest.raises(UsageError, match="over the model's context of 128"):
        rollouts.generate(_request([list(range(5, 100))], n=64))
    rollouts.close()
    assert not folder.exists() and rollouts.backend is None and rollouts.batched is None


def test_can_run(tiny_llama, tiny_bert):
    from transformers import AutoModel, AutoModelForCausalLM

    from llmkit.inference.llama_rollouts import can_run

    assert can_run(AutoModelForCausalLM.from_pretrained(tiny_llama))
    assert not can_run(AutoModel.from_pretrained(tiny_bert))
