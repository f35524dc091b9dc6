"""`--compile` and `train.liger` (llmkit/training/speedups.py): a compiled run trains to the same losses as an eager one, and the
combinations that are not supported stop in one line. Liger itself needs CUDA: tests/test_gpu.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(model), "--data", str(data), "--out", str(out), "--quiet", "--block-size", "16",
            "--max-steps", "4", "--batch-size", "4", "--lr", "3e-3", "--mixed-precision", "no", "--set", "train.log_every=1", *extra]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def summary(out: Path) -> dict:
    return json.loads((out / "llmkit.json").read_text())["llmkit"]


# Inductor builds C++ kernels with gcc on CPU: ~1-2 min for a tiny model on a 2-core machine the first time (its disk
# cache makes later runs of the same shapes ~10 s), hence slow.
@pytest.mark.slow
@pytest.mark.parametrize("extra", [("--method", "lora"), ("--method", "full", "--gradient-checkpointing")], ids=["lora", "full-checkpointing"])
def test_compiled_run_trains_like_an_eager_one(cli, tiny_llama, toy_data, tmp_path, extra):
    """Same losses step by step (LoRA through the chunked loss; full weights with checkpointing re-running the
    compiled blocks in backward), the compile time logged, and the saved model loads as usual."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    code, _, err = cli(*args(tiny_llama, toy_data / "train.txt", eager, *extra))
    assert code == 0, err
    code, _, err = cli(*args(tiny_llama, toy_data / "train.txt", compiled, *extra, "--compile"))
    assert code == 0, err
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-3)
    assert summary(compiled)["compile_seconds"] >= 0 and "compile_seconds" not in summary(eager)
    assert json.loads((compiled / "llmkit.json").read_text())["train"]["compile"] is True


@pytest.mark.parametrize(("extra", "message"), [
    (("--compile", "--fsdp"), "--compile cannot be combined with --fsdp"),
    (("--compile", "--method", "qlora"), "--compile cannot be combined with --method qlora"),
    (("--set", "train.liger=maybe"), "train.liger 'maybe' is not one of auto, true, false"),
    (("--compile", "--set", "train.liger=true"), "train.liger=true cannot be combined with --compile"),
    (("--set", "train.liger=true"), "train.liger=true: Liger's kernels are Triton kernels for CUDA GPUs; this run is on cpu"),
])
def test_unsupported_combinations_stop_in_one_line(cli, tiny_llama, toy_data, tmp_path, extra, message):
    out = tmp_path / "run"
    code, _, err = cli(*args(tiny_llama, toy_data / "train.txt", out, *extra))
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def test_distill_refuses_liger_true(cli, tiny_llama, toy_data, tmp_path):
    code, _, err = cli("distill", "--teacher", str(tiny_llama), "--data", str(toy_data / "train.txt"), "--out", str(tmp_path / "s"),
                       "--set", "train.liger=true")
    assert code == 2 and "train.liger=true is for llmkit finetune" in err


def test_liger_auto_stays_off_where_it_cannot_run():
    from llmkit.config import TrainConfig
    from llmkit.training.speedups import use_liger

    why: list[str] = []
    assert not use_liger(TrainConfig(), "causal-lm", "lora", "cpu", object(), why) and "CUDA" in why[0]
    assert not use_liger(TrainConfig(liger="false"), "causal-lm", "lora", "cuda", object())
    assert not use_liger(TrainConfig(compile=True), "causal-lm", "lora", "cuda", object())
    assert not use_liger(TrainConfig(), "seq-cls", "lora", "cuda", object())


def test_compile_on_cpu_without_a_compiler_says_so(monkeypatch):
    from llmkit.errors import UsageError
    from llmkit.training.speedups import check_compiler

    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(UsageError, match="needs a C\\+\\+ compiler"):
        check_compiler("cpu")
    check_compiler("cuda")  # Triton there, not a C++ compiler


def test_first_step_clock_counts_training_forwards_only():
    import torch

    from llmkit.training.speedups import FirstStepClock

    model = torch.nn.Linear(2, 2)
    clock = FirstStepClock(model)
    x = torch.ones(1, 2)
    model(x)
    assert clock.seconds() is None  # one forward: nothing to compare with (and the hook is gone)
    clock = FirstStepClock(model)
    with torch.no_grad():
        model(x)  # evaluation: not a step
    model.eval()
    model(x)
    model.train()
    for _ in range(4):
        model(x)
    assert len(clock.starts) == 3 and clock.seconds() >= 0
