"""What only CUDA shows: bf16 / fp16 autocast, FSDP on NCCL, QLoRA's GPU kernels, --compile on Triton, Liger's kernels
(with the `gpu` extra: pip install 'llmkit[gpu]'). Skipped without a GPU.

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
    from llmkit.training.lifecycle import resolve_precision

    assert resolve_precision("auto") == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")


def test_fsdp_on_one_gpu_matches_plain_training(cli, tiny_llama, toy_data, tmp_path):
    """NCCL with one process: the sharded code path end to end (wrap, clip, sharded checkpoint, gather, save)."""
    common = ("--mixed-precision", "no", "--save-every", "10", "--set", "train.liger=false")  # FSDP runs without Liger
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


def test_compile_on_a_gpu_trains_like_eager(cli, tiny_llama, toy_data, tmp_path):
    """--compile on CUDA (inductor's Triton kernels): the same losses as the eager run, and the compile time logged."""
    common = ("--mixed-precision", "no", "--max-steps", "4", "--method", "lora", "--set", "train.liger=false")
    assert cli(*args(tiny_llama, toy_data / "train.txt", tmp_path / "eager", *common))[0] == 0
    code, _, err = cli(*args(tiny_llama, toy_data / "train.txt", tmp_path / "compiled", *common, "--compile"))
    assert code == 0, err
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-3)
    assert json.loads((tmp_path / "compiled" / "llmkit.json").read_text())["llmkit"]["compile_seconds"] >= 0


def test_liger_gives_the_same_losses(cli, tiny_llama, toy_data, tmp_path):
    """train.liger (Liger's RMSNorm, RoPE, SwiGLU and fused linear cross-entropy) against llmkit's own path."""
    pytest.importorskip("liger_kernel")
    common = ("--mixed-precision", "no", "--max-steps", "4", "--method", "lora")
    # off first: applying Liger also patches module-level functions (RoPE) for the rest of the process
    assert cli(*args(tiny_llama, toy_data / "train.txt", tmp_path / "off", *common, "--set", "train.liger=false"))[0] == 0
    code, _, err = cli(*args(tiny_llama, toy_data / "train.txt", tmp_path / "on", *common, "--set", "train.liger=true"))
    assert code == 0, err
    assert losses(tmp_path / "on") == pytest.approx(losses(tmp_path / "off"), rel=2e-3)
    record = json.loads((tmp_path / "on" / "llmkit.json").read_text())
    assert record["train"]["liger"] == "true"
    # `auto` turns it on where it can run: here
    code, _, err = cli(*args(tiny_llama, toy_data / "train.txt", tmp_path / "auto", *common))
    assert code == 0, err
    assert json.loads((tmp_path / "auto" / "llmkit.json").read_text())["train"]["liger"] == "true"


def test_liger_lowers_peak_memory_at_a_262k_vocabulary(cli, tiny_llama, toy_data, tmp_path):
    """Gemma 3's vocabulary size on a narrow Llama: the model's own loss holds tokens x 262k logits (and their
    softmax and gradient); Liger's fused linear cross-entropy holds a chunk of them at a time."""
    pytest.importorskip("liger_kernel")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model = tmp_path / "vocab262k"
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=262_144, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id)).save_pretrained(model)
    tok.save_pretrained(model)
    common = ("--mixed-precision", "no", "--max-steps", "2", "--method", "lora", "--block-size", "64", "--batch-size", "8")
    plain, liger = tmp_path / "plain", tmp_path / "liger"
    code, _, err = cli(*args(model, toy_data / "train.txt", plain, *common, "--set", "train.liger=false", "--set", "train.chunked_loss=false"))
    assert code == 0, err
    code, _, err = cli(*args(model, toy_data / "train.txt", liger, *common, "--set", "train.liger=true"))
    assert code == 0, err
    peak = {name: json.loads((out / "llmkit.json").read_text())["llmkit"]["peak_memory_gb"] for name, out in (("plain", plain), ("liger", liger))}
    assert peak["liger"] < 0.5 * peak["plain"], peak  # 8 x 64 x 262k fp32 logits alone are 0.5 GB
    assert losses(liger) == pytest.approx(losses(plain), rel=2e-3)
