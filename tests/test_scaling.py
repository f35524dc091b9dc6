"""Models that do not fit: gradient checkpointing, QLoRA, the memory estimate (FSDP's multi-process tests: test_fsdp.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def finetune_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(model), "--data", str(data), "--out", str(out), "--quiet", "--block-size", "16",
            "--mixed-precision", "no", "--set", "train.log_every=1", *extra]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# ------------------------------------------------------------------------------------ fused LoRA forward


@pytest.mark.parametrize("arch,dropout", [("llama", 0.0), ("gpt2", 0.0), ("llama", 0.1)])
def test_fused_lora_gives_peft_s_loss_and_gradients(request, arch, dropout):
    """lora.fused (the default) adds B(A(x)) x scaling into the base output in place: the same loss and gradients as
    peft's own forward (GPT-2's Conv1D base too, and with dropout drawing the same masks), and peft's forward
    when the adapters are disabled or merged."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmkit.config import FinetuneConfig, LoraConfig
    from llmkit.models.lora import add_lora

    folder = request.getfixturevalue(f"tiny_{arch}")
    x = torch.randint(0, 300, (4, 24), generator=torch.Generator().manual_seed(1))

    def build(fused: bool) -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        torch.manual_seed(0)
        model = add_lora(model, FinetuneConfig(method="lora", lora=LoraConfig(dropout=dropout, fused=fused)))
        for name, p in model.named_parameters():  # B starts at zero; make the adapters matter
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(2))
        return model.train()

    def grads(model: torch.nn.Module) -> tuple[float, dict[str, torch.Tensor]]:
        torch.manual_seed(3)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, fused = build(False), build(True)
    assert "_fused_forward_in_place" in repr(next(m.forward for m in fused.modules() if hasattr(m, "lora_A")))
    loss_plain, g_plain = grads(plain)
    loss_fused, g_fused = grads(fused)
    assert loss_fused == pytest.approx(loss_plain, rel=1e-6)
    assert g_plain and set(g_plain) == set(g_fused)
    for name in g_plain:
        assert torch.allclose(g_fused[name], g_plain[name], atol=1e-6, rtol=1e-5), name
    with torch.autocast("cpu", torch.bfloat16):  # in-place ops skip autocast: the fused path casts as it would
        assert float(fused(input_ids=x, labels=x).loss) == pytest.approx(float(plain(input_ids=x, labels=x).loss), rel=2e-2)
    fused.eval(), plain.eval()
    with torch.no_grad(), fused.disable_adapter(), plain.disable_adapter():
        assert torch.equal(fused(input_ids=x).logits, plain(input_ids=x).logits)
    merged = fused.merge_and_unload()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=x).logits, plain(input_ids=x).logits, atol=1e-4)


# ------------------------------------------------------------------------------------ gradient checkpointing


@pytest.mark.parametrize("arch,method", [("gpt2", "full"), ("llama", "lora")])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(request, arch, method):
    """Recomputing activations changes memory, not math: same loss and gradients (1e-5), dropout included
    (GPT-2's dropout is on: the recomputation must draw the same masks)."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmkit.config import FinetuneConfig
    from llmkit.models.lora import add_lora
    from llmkit.training.loop import enable_gradient_checkpointing

    folder = request.getfixturevalue(f"tiny_{arch}")
    x = torch.randint(0, 300, (4, 24), generator=torch.Generator().manual_seed(1))

    def grads(checkpointing: bool) -> tuple[float, dict[str, torch.Tensor]]:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model.config.use_cache = False
        if method == "lora":
            torch.manual_seed(0)
            model = add_lora(model, FinetuneConfig(method="lora"))
            for name, p in model.named_parameters():  # B starts at zero; make the adapters matter
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(2))
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        torch.manual_seed(3)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_plain, g_plain = grads(False)
    loss_ckpt, g_ckpt = grads(True)
    assert loss_ckpt == pytest.approx(loss_plain, rel=1e-5)
    assert g_plain and set(g_plain) == set(g_ckpt)
    for name in g_plain:
        assert torch.allclose(g_ckpt[name], g_plain[name], atol=1e-5, rtol=1e-4), name


def test_gradient_checkpointing_run_matches_a_plain_run(cli, tiny_llama, toy_data, tmp_path):
    common = ("--max-steps", "4", "--lr", "1e-3")
    assert cli(*finetune_args(tiny_llama, toy_data / "train.txt", tmp_path / "plain", *common))[0] == 0
    code, _, err = cli(*finetune_args(tiny_llama, toy_data / "train.txt", tmp_path / "ckpt", *common, "--gradient-checkpointing"))
    assert code == 0, err
    assert losses(tmp_path / "ckpt") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)
    assert json.loads((tmp_path / "ckpt" / "llmkit.json").read_text())["train"]["gradient_checkpointing"] is True


# ---------------------------------------------------------------------------------------------------- QLoRA

BNB = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (llmkit[quant])")


@pytest.fixture(scope="module")
def llama64(tiny_llama, tmp_path_factory) -> Path:
    """tiny_llama at widths (and vocabulary) of multiples of 64: bitsandbytes' CPU inference kernel quantizes in blocks of 64 (real models'
    widths are multiples of it; a width of 32 fails inside bitsandbytes)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("llama64")
    for f in tiny_llama.iterdir():
        if f.name.startswith(("tokenizer", "special", "chat")):
            shutil.copy(f, out / f.name)
    cfg = LlamaConfig.from_pretrained(tiny_llama)
    cfg.hidden_size, cfg.intermediate_size, cfg.head_dim = 64, 128, 16
    cfg.vocab_size = (cfg.vocab_size + 63) // 64 * 64  # the head is a quantized linear layer too
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def nf4_base(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32),
        device_map={"": "cpu"})


def test_qlora_trains_and_the_adapter_loads_with_plain_peft_on_the_4bit_base(cli, llama64, toy_data, tmp_path):
    import torch
    from peft import PeftModel

    out = tmp_path / "qlora"
    code, _, err = cli(*finetune_args(llama64, toy_data / "train.txt", out, "--method", "qlora", "--max-steps", "30", "--lr", "1e-2",
                                      "--eval-data", str(toy_data / "eval.txt"), "--eval-every", "10", "--set", "lora.dropout=0"))
    assert code == 0, err
    curve = losses(out)
    assert curve[-1] < curve[0] - 0.2, curve  # it learns (an eval every 10 steps in between must not break the gradients)
    config = json.loads((out / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == llama64.resolve()  # the full-precision base
    assert "BitsAndBytesConfig" in (out / "README.md").read_text()

    x = torch.tensor([[int(t) for t in range(5, 21)]])
    base = nf4_base(llama64)
    with torch.no_grad():
        before = base(input_ids=x, labels=x).loss
    model = PeftModel.from_pretrained(base, out)  # plain peft on the 4-bit base, as the model card shows
    with torch.no_grad():
        after = model(input_ids=x, labels=x).loss
    assert not torch.isclose(after, before), "the adapter changed nothing"
    evals = [r["eval_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0]


def test_qlora_gradients_survive_an_eval_forward(llama64):
    """bitsandbytes repacks 4-bit weights for a CPU kernel without backward at the first eval forward; llmkit must
    keep gradients flowing through the frozen base afterwards (else earlier layers' adapters silently stop learning)."""
    import torch

    from llmkit.config import FinetuneConfig
    from llmkit.models.lora import add_lora
    from llmkit.models.qlora import load_4bit

    torch.manual_seed(0)
    model = add_lora(load_4bit(llama64, progress=False, gradient_checkpointing=False), FinetuneConfig(method="qlora"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(2))
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    first = next(p for n, p in model.named_parameters() if "layers.0." in n and "lora_A" in n)

    def grad() -> torch.Tensor:
        model.train()
        model.zero_grad()
        torch.manual_seed(5)  # the same LoRA dropout masks
        model(input_ids=x, labels=x).loss.backward()
        return first.grad.clone()

    before = grad()
    model.eval()
    with torch.no_grad():
        model(input_ids=x)
    after = grad()
    assert before.abs().sum() > 0
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-6)


def test_qlora_merge_goes_into_the_full_precision_base(cli, llama64, toy_data, tmp_path):
    """Merged weights are exactly fp32 base + B @ A * scale; merging into the 4-bit weights instead (what users
    of other tools hit, transformers#31293) would be off by the NF4 rounding, far more than the update."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from llmkit.config import FinetuneConfig
    from llmkit.models.lora import add_lora
    from llmkit.models.qlora import load_4bit, merge_into_full_precision

    torch.manual_seed(0)
    cfg = FinetuneConfig(method="qlora")
    trained = add_lora(load_4bit(llama64, progress=False, gradient_checkpointing=False), cfg)
    for name, p in trained.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01, generator=torch.Generator().manual_seed(2))
    fp32_base = AutoModelForCausalLM.from_pretrained(llama64, dtype=torch.float32)
    original = fp32_base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    lora = trained.base_model.model.model.layers[0].self_attn.q_proj
    delta = (lora.lora_B["default"].weight @ lora.lora_A["default"].weight).detach() * lora.scaling["default"]
    merged = merge_into_full_precision(trained, add_lora(fp32_base, FinetuneConfig(method="lora")))
    got = merged.model.layers[0].self_attn.q_proj.weight
    assert got.dtype == torch.float32
    assert torch.allclose(got, original + delta, atol=1e-6)
    # why not into the 4-bit weights: rounding base + update back to NF4 loses a large part of the update (here ~45%)
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    nf4 = dequantize_4bit(lora.base_layer.weight.data, lora.base_layer.weight.quant_state)
    naive = dequantize_4bit(*quantize_4bit(nf4 + delta, blocksize=64, quant_type="nf4"))
    assert float(((naive - nf4) - delta).norm() / delta.norm()) > 0.2

    # end to end: the --merge folder is a plain fp32 transformers model
    out = tmp_path / "merged"
    code, _, err = cli(*finetune_args(llama64, toy_data / "train.txt", out, "--method", "qlora", "--merge", "--max-steps", "3"))
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert all(t.dtype == torch.float32 for t in load_file(out / "model.safetensors").values())
    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("extra,message", [
    (("--method", "qlora", "--fsdp"), "--method qlora cannot be combined with --fsdp"),
    (("--method", "qlora", "--task", "seq-cls"), "--method qlora is for --task causal-lm"),
    (("--fsdp", "--mixed-precision", "fp16"), "--fsdp with --mixed-precision fp16 is not supported"),
])
def test_unsupported_combinations_are_usage_errors(cli, llama64, toy_data, tmp_path, extra, message):
    code, _, err = cli(*finetune_args(llama64, toy_data / "train.txt", tmp_path / "out", *extra))
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_distill_refuses_fsdp(cli, llama64, toy_data, tmp_path):
    code, _, err = cli("distill", "--teacher", llama64, "--data", toy_data / "train.txt", "--out", tmp_path / "s", "--set", "train.fsdp=true")
    assert code == 2 and "--fsdp is for llmkit finetune" in err


# ------------------------------------------------------------------------------------------ memory estimate


def test_estimate_memory_prints_the_parts_and_writes_nothing(cli, tiny_llama, toy_data, tmp_path):
    out = tmp_path / "never"
    code, text, err = cli(*finetune_args(tiny_llama, toy_data / "train.txt", out, "--estimate-memory"))
    assert code == 0, err
    for part in ("weights", "gradients", "optimizer state", "activations", "total", "fits."):
        assert part in text
    assert not out.exists()


def test_estimate_memory_suggests_what_fits(cli, tiny_llama, toy_data, tmp_path):
    code, text, _ = cli(*finetune_args(tiny_llama, toy_data / "train.txt", tmp_path / "x", "--estimate-memory",
                                       "--batch-size", "100000", "--block-size", "128"))
    assert code == 0 and "does not fit" in text
    rows = {line.split("  ")[1].strip(): float(line.split("GB")[0].split()[-1]) for line in text.splitlines() if line.startswith("  --")}
    total = float(next(line for line in text.splitlines() if "total" in line).split()[1])
    assert rows["--gradient-checkpointing"] < total  # the logits over the vocabulary are not checkpointed
    assert rows["--batch-size 25000 --grad-accum 4"] < 0.3 * total


def test_estimate_shrinks_as_expected(tiny_llama):
    from dataclasses import replace

    from llmkit.config import FinetuneConfig
    from llmkit.training.memory import Shape, estimate, model_shape

    full = FinetuneConfig(method="full")
    full.model.name = str(tiny_llama)
    shape = model_shape(full)
    one = estimate(shape, full, 1, "cpu")
    full.train.fsdp = True
    two = estimate(shape, full, 2, "cpu")
    assert two.optimizer == pytest.approx(one.optimizer / 2)
    # weights: half, plus the two blocks FSDP holds whole at a time (in a 30-block model, a small part)
    big = Shape(params=10**9, quantizable=8 * 10**8, lora_params=10**6, head_params=0, layers=30, hidden=2048,
                intermediate=8192, kv_hidden=512, vocab=32000, largest_block=27 * 10**6)
    assert estimate(big, full, 2, "cpu").weights < 0.6 * estimate(big, replace(full, train=replace(full.train, fsdp=False)), 1, "cpu").weights
    qlora = FinetuneConfig(method="qlora")
    qlora.model.name = str(tiny_llama)
    lora = FinetuneConfig(method="lora")
    lora.model.name = str(tiny_llama)
    q, lo = estimate(model_shape(qlora), qlora, 1, "cpu"), estimate(model_shape(lora), lora, 1, "cpu")
    assert q.weights < lo.weights and q.optimizer == lo.optimizer
    # LoRA dropout keeps each adapted layer's dropped-out input (+ its mask): all-linear on a Llama block = 6 x hidden
    # + intermediate per token; the CPU heap's holes are a third of the blocks' activations, none under FSDP or on CUDA
    lora_shape = model_shape(lora)
    assert lora_shape.lora_inputs == 6 * lora_shape.hidden + lora_shape.intermediate
    dropped = replace(lora, lora=replace(lora.lora, dropout=0.1))
    tokens = lora.train.batch_size * lora.data.block_size
    added = estimate(lora_shape, dropped, 1, "cpu").activations - estimate(lora_shape, lora, 1, "cpu").activations
    assert added == pytest.approx(tokens * (lora_shape.layers + 1) * lora_shape.lora_inputs * 5 / 1e9)
    assert one.allocator > 0 and two.allocator == 0 and estimate(shape, replace(full, train=replace(full.train, fsdp=False)), 1, "cuda").allocator == 0
    assert shape.params == sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(tiny_llama).parameters())


# ----------------------------------------------------------------------------------- sharded checkpoint index


def test_a_planted_sharded_checkpoint_index_cannot_run_code(tmp_path):
    import os
    import pickle

    from llmkit.errors import UsageError
    from llmkit.training.sharding import safe_reader

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UsageError, match="refusing"):
        safe_reader(str(tmp_path)).read_metadata()
    assert not (tmp_path / "pwned").exists()
