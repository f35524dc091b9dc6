"""What only CUDA shows: bf16 / fp16 autocast, FSDP on NCCL, QLoRA's GPU kernels. Skipped without a GPU.

Run where a GPU is: `python -m pytest -m gpu tests/test_gpu.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(model), "--data", str(data), "--out", str(out), "--quiet", "--block-size", "16",
            "--max-steps", "20", "--lr", "3e-3", "--set", "train.log_every=1", *extra]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def saved_dtypes(out: Path) -> set:
    from safetensors.torch import load_file

    name = "model.safetensors" if (out / "model.safetensors").exists() else "adapter_model.safetensors"
    return {t.dtype for t in load_file(out / name).values()}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_saves_fp32(cli, tiny_llama, toy_data, tmp_path, precision):
    out = tmp_path / precision
    code, _, err = cli(*args(tiny_llama, toy_data / "train.txt", out, "--mixed-precision", precision))
    assert code == 0, err
    curve = losses(out)
    assert all(v is not None for v in curve) and curve[-1] < curve[0]
    assert saved_dtypes(out) == {torch.float32}
    assert json.loads((out / "llmkit.json").read_text())["machine"]["device"] == "cuda"


def test_auto_precision_is_bf16_or_fp16_on_a_gpu():
    from llmkit.run import resolve_precision

    assert resolve_precision("auto") == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")


def test_fsdp_on_one_gpu_matches_plain_training(cli, tiny_llama, toy_data, tmp_path):
    """NCCL with one process: the sharded code path end to end (wrap, clip, sharded checkpoint, gather, save)."""
    common = ("--mixed-precision", "no", "--save-every", "10")
    assert cli(*args(tiny_llama, toy_data / "train.txt", tmp_path / "plain", *common))[0] == 0
    code, _, err = cli(*args(tiny_llama, toy_data / "train.txt", tmp_path / "fsdp", *common, "--fsdp"))
    assert code == 0, err
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "plain"), rel=1e-3)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "fsdp" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3


def test_fsdp_bf16_policy_and_lora(cli, tiny_llama, toy_data, tmp_path):
    out = tmp_path / "run"
    code, _, err = cli(*args(tiny_llama, toy_data / "train.txt", out, "--fsdp", "--mixed-precision", "bf16", "--method", "lora",
                             "--gradient-checkpointing", "--lr", "1e-2"))
    assert code == 0, err
    curve = losses(out)
    assert curve[-1] < curve[0]
    assert saved_dtypes(out) == {torch.float32}


def test_gradient_checkpointing_on_gpu_gives_the_same_loss(cli, tiny_llama, toy_data, tmp_path):
    common = ("--mixed-precision", "no", "--max-steps", "4")
    assert cli(*args(tiny_llama, toy_data / "train.txt", tmp_path / "a", *common))[0] == 0
    assert cli(*args(tiny_llama, toy_data / "train.txt", tmp_path / "b", *common, "--gradient-checkpointing"))[0] == 0
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), rel=1e-4)


def test_estimate_memory_reads_the_gpu(cli, tiny_llama, toy_data, tmp_path):
    code, text, _ = cli(*args(tiny_llama, toy_data / "train.txt", tmp_path / "x", "--estimate-memory"))
    assert code == 0 and "on cuda" in text and torch.cuda.get_device_name() in text


def test_qlora_on_a_gpu_trains_and_merges(cli, tiny_llama, toy_data, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    code, _, err = cli(*args(tiny_llama, toy_data / "train.txt", out, "--method", "qlora", "--lr", "1e-2"))
    assert code == 0, err
    curve = losses(out)
    assert curve[-1] < curve[0]
    merged = tmp_path / "merged"
    code, _, err = cli(*args(tiny_llama, toy_data / "train.txt", merged, "--method", "qlora", "--merge", "--max-steps", "3"))
    assert code == 0, err
    assert saved_dtypes(merged) == {torch.float32}
