"""Check 9: rows whose labels are all masked after truncation (prompt/response data whose prompt fills the
whole --block-size) are dropped and counted, so the loss is never NaN (0/0) or silently 0 because of them.
"""

from __future__ import annotations

import json
import math

from reliability_helpers import metrics_rows, record

BLOCK = 12


def write_rows(path, tok):
    """Half the rows have a prompt longer than BLOCK tokens: nothing of their response survives the cut."""
    short, long = "Say hi", " ".join(["once upon a time"] * 6)
    rows = [{"prompt": long if i % 2 else short, "text": f"hello number {i}"} for i in range(16)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    n_long = sum(1 for r in rows if len(tok(r["prompt"])["input_ids"]) >= BLOCK)
    assert n_long == 8
    return n_long


def test_fully_masked_rows_are_dropped_and_counted(cli, tiny_llama, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.data.examples import Collator, encode_prompt_response

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    data = tmp_path / "sft.jsonl"
    n_long = write_rows(data, tok)

    # the hazard being guarded against: one such row alone in a batch makes the model's loss NaN
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    p = tok(rows[1]["prompt"])["input_ids"][:BLOCK]
    masked = Collator(0, causal=True)([{"input_ids": p, "labels": [-100] * len(p)}])
    with torch.no_grad():
        assert math.isnan(float(AutoModelForCausalLM.from_pretrained(tiny_llama)(**masked).loss))
    _, labels, kept = encode_prompt_response(tok, [r["prompt"] for r in rows], [r["text"] for r in rows], BLOCK)
    assert len(kept) == len(rows) - n_long and all(any(t != -100 for t in y[1:]) for y in labels)

    out = tmp_path / "run"
    code, _, err = cli("finetune", "--model", tiny_llama, "--data", data, "--eval-data", data, "--prompt-column", "prompt",
                       "--block-size", str(BLOCK), "--batch-size", "4", "--epochs", "3", "--lr", "1e-2", "--out", out,
                       "--quiet", "--set", "train.log_every=1")
    assert code == 0, err
    assert f"dropped {n_long} of 16 rows of {data}" in err and "sft.jsonl:line 2" in err
    run = json.loads((out / "llmkit.json").read_text())
    assert run["examples"]["train"] == 16 - n_long
    assert run["examples"]["dropped"] == {"train": n_long, "eval": n_long}
    losses = [r["loss"] for r in metrics_rows(out) if "loss" in r]
    assert losses and all(math.isfinite(x) and x > 0 for x in losses)
    assert not any(r.get("skipped_steps") for r in metrics_rows(out))
    assert math.isfinite(run["llmkit"]["metrics"]["eval_loss"]) and run["llmkit"]["metrics"]["eval_loss"] > 0
    record(9, "prompt/response rows cut off entirely by --block-size",
           f"{n_long} of 16 dropped and counted (train and eval); {len(losses)} logged losses all finite and > 0")


def test_every_row_cut_off_is_an_error(cli, tiny_llama, tmp_path, one_line_error):
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": "once upon a time " * 8, "text": "hi"}) for _ in range(4)))
    code, _, err = cli("finetune", "--model", tiny_llama, "--data", data, "--prompt-column", "prompt", "--block-size", "8",
                       "--out", tmp_path / "run", "--quiet")
    assert code == 2
    one_line_error(err, "every prompt fills all 8 tokens", "--block-size")
    assert not (tmp_path / "run").exists()
