"""The chunked LM-head loss equals the model's own loss, and its gradients, on every family (1e-5)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tests.families import FAMILIES, build


def _batch(vocab: int, sparse: bool):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (3, 24), generator=g)
    labels = ids.clone()
    labels[0, :10] = -100  # a prompt that is not learned
    labels[2, -4:] = -100  # padding
    if sparse:  # chat-style: a few learned tokens per row
        labels[:, :-3] = -100
    mask = torch.ones_like(ids)
    mask[2, -4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _grads(model, loss) -> dict[str, object]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


CASES = [(name, {}) for name in FAMILIES] + [
    ("Granite 3", {"logits_scaling": 4.0}),              # the head's output divided
    ("Gemma 3", {"final_logit_softcapping": 3.0}),       # soft-capped: tanh(x / c) * c
]


@pytest.mark.parametrize(("name", "extra"), CASES, ids=[f"{n}{'+' + next(iter(e)) if e else ''}" for n, e in CASES])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_same_loss_and_gradients_as_the_model(name, extra, lora, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from llmkit.training import chunked_loss
    from llmkit.training.chunked_loss import chunked_causal_lm_loss, supports_chunked_loss

    monkeypatch.setattr(chunked_loss, "CHUNK_ELEMENTS", 7 * 400)  # several chunks, one of them partly ignored
    fam = FAMILIES[name]
    fam = dataclasses.replace(fam, extra={**fam.extra, **extra})
    model = AutoModelForCausalLM.from_pretrained(build(fam, tmp_path), dtype=torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.02)  # B starts at zero: make every LoRA weight matter
    model.train()
    assert supports_chunked_loss(model)
    for sparse in (False, True):
        batch = _batch(model.config.vocab_size if not lora else model.get_base_model().config.vocab_size, sparse)
        torch.manual_seed(0)
        want = model(**batch).loss
        want_grads = _grads(model, want)
        torch.manual_seed(0)
        got = chunked_causal_lm_loss(model, batch)
        got_grads = _grads(model, got)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got.item(), want.item())
        assert got_grads.keys() == want_grads.keys()
        for n in want_grads:
            assert torch.allclose(got_grads[n], want_grads[n], atol=1e-5, rtol=1e-4), n


def test_peak_memory_does_not_grow_with_the_vocabulary(tmp_path):
    """A 262k-token vocabulary: the chunked loss's extra memory is a chunk, not tokens x vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmkit.training.chunked_loss import chunked_causal_lm_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=262_144, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    model.lm_head.weight.requires_grad_(False)  # as with LoRA: the head is frozen
    model.model.embed_tokens.weight.requires_grad_(False)
    ids = torch.randint(0, 262_144, (4, 256))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    plain = model(**batch).loss
    logits_bytes = 4 * 256 * 262_144 * 4  # one fp32 tokens x vocabulary tensor: 1 GiB
    from llmkit.training.chunked_loss import CHUNK_ELEMENTS

    # what the chunked path keeps for backward: the hidden states' gradient, nothing vocabulary-sized
    chunked = chunked_causal_lm_loss(model, batch)
    assert torch.allclose(chunked, plain, atol=1e-5)
    saved = sum(t.numel() * t.element_size() for t in chunked.grad_fn.saved_tensors)
    assert saved < logits_bytes / 100 and CHUNK_ELEMENTS * 4 < logits_bytes / 4


@pytest.mark.parametrize("name", ["Llama 3", "GPT-2", "Gemma 3"])
def test_evaluation_nll_equals_the_plain_one(name, tmp_path, monkeypatch):
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from llmkit.training import chunked_loss

    monkeypatch.setattr(chunked_loss, "CHUNK_ELEMENTS", 400 * 24)  # a row at a time
    model = AutoModelForCausalLM.from_pretrained(build(FAMILIES[name], tmp_path), dtype=torch.float32).eval()
    batch = _batch(model.config.vocab_size, sparse=False)
    with torch.no_grad():
        nll, count = chunked_loss.chunked_causal_lm_nll(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        want = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none").sum(1)
    assert torch.allclose(nll, want, atol=1e-4) and count.tolist() == (labels != -100).sum(1).tolist()


def test_finetune_trains_the_same_with_and_without_it(cli, tiny_llama, toy_data, tmp_path, monkeypatch):
    """`train.chunked_loss` (on by default) changes memory, not the run: the same losses step by step."""
    import llmkit.training.loop

    calls = []
    real = llmkit.training.loop.chunked_causal_lm_loss
    monkeypatch.setattr(llmkit.training.loop, "chunked_causal_lm_loss", lambda *a: calls.append(1) or real(*a))
    losses = {}
    for on in ("true", "false"):
        out = tmp_path / on
        code, _, err = cli("finetune", "--model", tiny_llama, "--data", toy_data / "train.txt", "--eval-data", toy_data / "eval.txt",
                           "--out", out, "--max-steps", "4", "--block-size", "32", "--batch-size", "2", "--quiet",
                           "--set", "train.log_every=1", "--set", f"train.chunked_loss={on}")
        assert code == 0, err
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[on] = [(r.get("loss"), r.get("eval_loss")) for r in rows if "loss" in r or "eval_loss" in r]
    assert len(losses["true"]) >= 4 and len(calls) == 4  # the chunked loss ran each step of the first run only
    for a, b in zip(losses["true"], losses["false"], strict=True):
        assert all(x == y or abs(x - y) < 1e-4 for x, y in zip(a, b, strict=True) if x is not None), (a, b)


def test_evaluation_asks_whether_the_model_takes_the_chunked_head_once(tmp_path, monkeypatch):
    """`supports_chunked_loss` (wrappers unwrapped, the forward's signature read) runs once per evaluation, not per
    batch; every batch still goes through the chunked head, and the metrics equal the plain path's."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmkit.training import evaluation

    model = AutoModelForCausalLM.from_pretrained(build(FAMILIES["Llama 3"], tmp_path), dtype=torch.float32)
    batch = _batch(model.config.vocab_size, sparse=False)
    loader = [{k: v[i:i + 1] for k, v in batch.items()} for i in range(3)]  # 3 batches of one row
    asked, chunked = [], []
    real_supports, real_nll = evaluation.supports_chunked_loss, evaluation.chunked_causal_lm_nll
    monkeypatch.setattr(evaluation, "supports_chunked_loss", lambda m: asked.append(1) or real_supports(m))
    monkeypatch.setattr(evaluation, "chunked_causal_lm_nll", lambda m, b: chunked.append(1) or real_nll(m, b))
    got = evaluation.evaluate_model(model, loader, "causal-lm")
    assert len(asked) == 1 and len(chunked) == 3
    monkeypatch.setattr(evaluation, "supports_chunked_loss", lambda m: False)
    want = evaluation.evaluate_model(model, loader, "causal-lm")
    assert got["tokens"] == want["tokens"] and got["loss"] == pytest.approx(want["loss"], rel=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_head_gives_the_gradients_of_an_fp32_copy(dtype, monkeypatch):
    """Through a bf16/fp16 head the hidden states' gradient is fp32 grad @ the weight in fp32, though the weight is
    converted a block of vocabulary rows at a time (never a whole-vocabulary fp32 copy); loss and gradients are those
    of the same head in fp32 up to the half-precision matmul of the forward."""
    import torch

    from llmkit.training import chunked_loss
    from llmkit.training.chunked_loss import _times_weight, linear_cross_entropy

    monkeypatch.setattr(chunked_loss, "CHUNK_ELEMENTS", 7 * 1000)  # chunks of 7 rows; blocks of 437 vocabulary rows
    torch.manual_seed(0)
    weight = (torch.randn(1000, 16) * 0.3).to(getattr(torch, dtype))
    grad = torch.randn(7, 1000)
    assert torch.allclose(_times_weight(grad, weight, autocast=False), grad @ weight.float(), rtol=1e-5, atol=1e-4)  # fp32 sums reordered

    hidden = torch.randn(24, 16).to(weight.dtype).requires_grad_(True)
    weight.requires_grad_(True)
    targets = torch.randint(0, 1000, (24,))
    targets[:5] = -100
    loss = linear_cross_entropy()(hidden, weight, None, targets, (None, None, 3.0))  # soft-capped: through the cap too
    loss.backward()
    h32, w32 = hidden.detach().float().requires_grad_(True), weight.detach().float().requires_grad_(True)  # same values
    want = torch.nn.functional.cross_entropy(torch.tanh((h32 @ w32.t()) / 3.0) * 3.0, targets, ignore_index=-100)
    want.backward()
    assert hidden.grad.dtype == weight.grad.dtype == weight.dtype
    assert torch.allclose(loss, want, rtol=1e-3)
    assert torch.allclose(hidden.grad.float(), h32.grad, rtol=2e-2, atol=1e-4)
    assert torch.allclose(weight.grad.float(), w32.grad, rtol=2e-2, atol=1e-4)
