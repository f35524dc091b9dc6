"""Check 10: padding changes nothing. For GPT-2 and Llama, a padded batch gives the loss and logits of the
same examples run one by one (1e-5), in training (the collator + the loss the loop uses), classification
(pooling the last real token) and generation (left padding, greedy scores at every step).
"""

from __future__ import annotations

import pytest
from reliability_helpers import record

TOL = 1e-5
TEXTS = ["Once upon a time", "To be, or not to be, that is the question.", "Hello", "The quick brown fox jumps over the lazy dog"]
worst: dict[str, float] = {}


def setup(path):
    from llmkit.models.load import load_tokenizer
    from llmkit.models.refs import resolve

    ref = resolve(str(path))
    return ref, load_tokenizer(ref)


def note(what: str, diff: float) -> None:
    worst[what] = max(worst.get(what, 0.0), diff)
    assert diff <= TOL, (what, diff)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_training_loss_and_logits(request, arch):
    import torch
    from transformers import AutoModelForCausalLM

    from llmkit.data.examples import Collator, encode_prompt_response

    ref, tok = setup(request.getfixturevalue(f"tiny_{arch}"))
    model = AutoModelForCausalLM.from_pretrained(ref.path).eval()
    ids, labels, _ = encode_prompt_response(tok, TEXTS[::-1], TEXTS, 64)  # prompt/response rows of different lengths
    collate = Collator(tok.pad_token_id, causal=True)
    items = [{"input_ids": i, "labels": y} for i, y in zip(ids, labels, strict=True)]
    with torch.no_grad():
        batch = collate(items)
        assert (batch["attention_mask"] == 0).any()  # really padded
        out = model(**batch)
        total, count = 0.0, 0
        for row, item in enumerate(items):
            one = model(**collate([item]))
            n = int((torch.tensor(item["labels"][1:]) != -100).sum())
            total, count = total + float(one.loss) * n, count + n
            real = len(item["input_ids"])
            note("training logits", float((out.logits[row, :real] - one.logits[0]).abs().max()))
        # the batch loss is the token-weighted mean of the examples' losses: padding adds nothing to it
        note("training loss", abs(float(out.loss) - total / count))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_classification_logits(request, arch):
    import torch

    from llmkit.data.examples import Collator, encode_seq_cls
    from llmkit.models.load import load_seq_cls

    ref, tok = setup(request.getfixturevalue(f"tiny_{arch}"))
    torch.manual_seed(0)
    model = load_seq_cls(ref, progress=False, num_labels=3, pad_token_id=tok.pad_token_id).eval()
    model.config.pad_token_id = tok.pad_token_id
    items = [{"input_ids": i, "labels": 0} for i in encode_seq_cls(tok, TEXTS, None, 64)]
    collate = Collator(tok.pad_token_id, causal=False)
    with torch.no_grad():
        batch = collate(items)
        assert (batch["attention_mask"] == 0).any()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for row, item in enumerate(items):
            one = collate([item])
            single = model(input_ids=one["input_ids"], attention_mask=one["attention_mask"]).logits
            note("classification logits", float((logits[row] - single[0]).abs().max()))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generation_scores_and_tokens(request, arch):
    import torch

    from llmkit.inference.sampling import SamplingOptions
    from llmkit.inference.transformers import TransformersBackend

    ref, _ = setup(request.getfixturevalue(f"tiny_{arch}"))
    backend = TransformersBackend(ref, device="cpu", dtype="fp32", batch_size=len(TEXTS), progress=False)
    opts = SamplingOptions(max_new_tokens=8, temperature=0)
    kwargs = {**backend._gen_kwargs(opts, 1), "output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad():
        enc = backend._encode(TEXTS, chat=False)
        assert (enc["attention_mask"] == 0).any()  # left-padded
        batched = backend.model.generate(**enc, **kwargs)
        for row, text in enumerate(TEXTS):
            single = backend.model.generate(**backend._encode([text], chat=False), **kwargs)
            steps = len(single.scores)
            for t in range(steps):
                note("generation scores", float((batched.scores[t][row] - single.scores[t][0]).abs().max()))
            width = enc["input_ids"].shape[1]
            n_prompt = single.sequences.shape[1] - steps
            assert batched.sequences[row, width:width + steps].tolist() == single.sequences[0, n_prompt:].tolist()
    # and through llmkit's own batching: batch of 4 and one at a time give the same continuations
    together = [g.text for g in backend.generate(TEXTS, opts)]
    backend.batch_size = 1
    assert [g.text for g in backend.generate(TEXTS, opts)] == together


def test_report_padding():
    if worst:
        record(10, "padded batch vs one by one (GPT-2, Llama)",
               "max abs diff " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()) + f" (tolerance {TOL:g})")
