"""Check 8: NaN / inf losses. A bad step is skipped (no update); K in a row stop the run with advice, exit 4.
Nothing non-finite is ever written: not in checkpoints, not in the model, not in metrics.jsonl (NaN is not JSON).
"""

from __future__ import annotations

import json
import math

import pytest
from reliability_helpers import record


def strict_json_lines(path):
    def refuse(name):
        raise AssertionError(f"{name} in {path}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines() if line.strip()]


def inject(monkeypatch, bad_steps: set[int], value: float) -> None:
    import llmkit.training.loop as train

    real = train._default_loss
    calls = {"n": 0}

    def loss(model, batch, **kw):
        calls["n"] += 1
        out = real(model, batch, **kw)
        return out * value if calls["n"] in bad_steps else out  # NaN / inf flows into every gradient

    monkeypatch.setattr(train, "_default_loss", loss)


def args(model, data, out, *extra):
    return ["finetune", "--model", model, "--data", data / "train.txt", "--out", out, "--block-size", "16", "--batch-size", "4",
            "--max-steps", "10", "--save-every", "1", "--mixed-precision", "no", "--quiet",
            "--set", "train.log_every=1", "--set", "train.keep_checkpoints=20", *extra]


def all_finite(folder) -> bool:
    from safetensors.torch import load_file

    return all(bool(t.isfinite().all()) for f in folder.rglob("*.safetensors") for t in load_file(f).values())


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_few_bad_steps_are_skipped_and_training_finishes(cli, tiny_gpt2, toy_data, tmp_path, monkeypatch, value):
    import torch

    out = tmp_path / "run"
    inject(monkeypatch, {3, 6, 7}, value)
    code, _, err = cli(*args(tiny_gpt2, toy_data, out))
    assert code == 0, err
    assert err.count("skipped this update") == 3
    rows = strict_json_lines(out / "metrics.jsonl")
    assert [r["step"] for r in rows if r.get("skipped_steps")] == [3, 6, 7]
    assert all(r["loss"] is None for r in rows if r.get("skipped_steps"))
    assert all(math.isfinite(r["loss"]) for r in rows if not r.get("skipped_steps"))
    # a skipped step changes nothing: after step 4, AdamW has made 3 updates, not 4
    ck = out / "checkpoints"
    assert not (ck / "step-00000003").exists()  # no checkpoint of a skipped step
    optim = torch.load(ck / "step-00000004" / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in optim["state"].values()} == {3.0}
    assert all_finite(out)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_persistent_bad_losses_stop_with_advice(cli, tiny_gpt2, toy_data, tmp_path, monkeypatch, one_line_error, value):
    out = tmp_path / "run"
    inject(monkeypatch, set(range(4, 100)), value)
    code, _, err = cli(*args(tiny_gpt2, toy_data, out, "--set", "train.max_bad_steps=3"))
    assert code == 4, err
    line = one_line_error(err, "NaN/inf", "3 steps in a row", "lower --lr", "step-00000003")
    assert "--mixed-precision" not in line or "fp32" in line
    assert not (out / "model.safetensors").exists()
    assert [p.name for p in sorted((out / "checkpoints").glob("step-*"))][-1] == "step-00000003"  # no bad step was saved
    assert all_finite(out)
    strict_json_lines(out / "metrics.jsonl")
    record(8, f"injected {value} loss from step 4 (max_bad_steps=3)",
           "3 updates skipped, stopped with advice, exit 4; every saved tensor finite, metrics.jsonl valid JSON")


def test_weights_that_became_non_finite_are_never_saved(tiny_gpt2, tmp_path):
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from llmkit.errors import Diverged
    from llmkit.training.checkpoints import save_trainable

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("inf")
    with pytest.raises(Diverged, match="NaN/inf"):
        save_trainable(Accelerator(cpu=True), model, tmp_path / "best")
    assert not (tmp_path / "best").exists() and not (tmp_path / ".tmp-best").exists()
