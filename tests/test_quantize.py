"""`llmkit quantize`: int8 / bnb-int8 / gguf-q8_0 round trips (other GGUF types: test_gguf.py), GGUF contents, the quality gate, bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm())


IDS = list(range(3, 40))
# Per-channel int8 rounds each weight by at most half a step, max|row| / 254 (<= 0.4% of the row's largest weight);
# through two layers of these tiny random models that moves the logits by ~1% of their norm. 3% leaves room
# for noise and still fails for per-tensor scales or a transposed Conv1D (errors of 20-100%).
TOL = 0.03


# A fresh interpreter with only transformers (and torchao, which transformers imports for the folder's
# quantization_config): greedy token ids for IDS, and whether any warning was printed while loading.
PLAIN_LOAD = """
import sys, warnings, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
assert not any(name.startswith("llmkit") for name in sys.modules), "plain transformers needed llmkit"
ids = torch.tensor([[int(i) for i in sys.argv[2].split(",")]])
out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
print("TOKENS", ",".join(map(str, out[0, ids.shape[1]:].tolist())))
"""


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_int8_folder_loads_in_plain_transformers(cli, tiny_gpt2, tiny_llama, toy_data, tmp_path, arch):
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from llmkit.models.int8 import KERNELS, load_int8
    from llmkit.models.int8_cpu import DECODE_ROWS, load_for_cpu, packed_layers

    src = tiny_gpt2 if arch == "gpt2" else tiny_llama
    out = tmp_path / "q"
    code, stdout, err = cli("quantize", "--model", src, "--method", "int8", "--out", out, "--eval-data", toy_data / "train.txt", "--json", "--quiet")
    assert code == 0, err
    report = json.loads(stdout)
    assert report == json.loads((out / "quantize_report.json").read_text())
    assert report["kernel"] in KERNELS and report["after"]["disk_bytes"] == (out / "model.safetensors").stat().st_size
    assert abs(report["ratios"]["perplexity"] - 1) < 0.02 and not report["gate"]["failed"]
    # speed: the median of several timed runs, each one kept in the report
    runs = report["after"]["tokens_per_s_runs"]
    assert len(runs) == 5 and sorted(runs)[2] == report["after"]["tokens_per_s"]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao" and config["model_type"] == arch

    fp32 = AutoModelForCausalLM.from_pretrained(src).eval()
    q = load_int8(out)
    assert _rel_err(_logits(q, IDS), _logits(fp32, IDS)) < TOL
    # what llmkit commands run on CPU: the same int8 weights through torch's int8 kernel (llmkit.models.int8_cpu),
    # for a prompt (de-quantized, fp32) and for decoding-sized calls (int8pack_mm, bf16 activations)
    packed = load_for_cpu(out)
    # every int8 layer, and GPT-2's tied head (quantized at load time; its Conv1D layers stay in float)
    n = packed_layers(packed)["torch._weight_int8pack_mm"]
    assert n == report["modules"]["int8_linear"] + (arch == "gpt2")
    assert report["cpu_engine"].startswith(f"torch._weight_int8pack_mm on {n} layer")
    for ids in (IDS, IDS[:DECODE_ROWS]):
        assert _rel_err(_logits(packed, ids), _logits(fp32, ids)) < TOL
    if arch == "gpt2":  # Conv1D is not nn.Linear: transformers' torchao format leaves it in float, and the report says so
        assert report["modules"] == {"int8_linear": 0, "float_linear": 1, "float_conv1d": 8}  # 1: the tied LM head
        # a causal LM's folder is bf16 (llmkit.models.int8.default_dtype), so what stays in float still halves
        assert "Conv1D" in report["kept_in_float"] and report["dtype"] == "bfloat16" and 0.45 < report["ratios"]["disk"] < 0.6
    else:  # every linear layer but the (untied) LM head's float copy is int8: 2 layers x 7, plus lm_head
        assert report["modules"]["int8_linear"] == 15 and report["modules"]["float_linear"] == 0
        assert type(q.model.layers[0].self_attn.q_proj.weight).__name__ == "Int8Tensor"
        assert report["ratios"]["disk"] < 0.7  # the float embedding is a third of this tiny model
    # plain transformers in a fresh interpreter (no llmkit) loads it without a warning and decodes what llmkit does
    plain = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(out), ",".join(map(str, IDS))], capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr
    # torchao's own import notes on a CPU-only torch (CUDA .so files; an Enum registration) are torchao's, whatever
    # the folder: anything else printed while loading would be about the folder
    about_folder = [line for line in plain.stderr.splitlines() if line.strip() and "Failed to load" not in line and "register_constant" not in line]
    assert about_folder == [], plain.stderr
    plain_ids = [int(t) for t in plain.stdout.split("TOKENS ")[1].split(",")]
    with __import__("torch").no_grad():
        ours = q.generate(__import__("torch").tensor([IDS]), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert ours[0, len(IDS):].tolist() == plain_ids
    # llmkit takes it anywhere a model is taken, without a word from transformers
    code, stdout, err = cli("evaluate", "--model", out, "--data", toy_data / "train.txt", "--json", "--block-size", "64", "--max-blocks", "16")
    assert code == 0, err
    assert "You are using a model of type" not in err and "Failed to load" not in err
    assert json.loads(stdout)["perplexity"] == pytest.approx(report["after"]["perplexity"], rel=1e-3)
    code, stdout, err = cli("generate", "--model", out, "Once upon", "--max-new-tokens", "5", "--temperature", "0")
    assert code == 0, err


def test_int8_packed_linear_is_the_dequantized_layer_at_any_alignment():
    """torch's int8 kernel reads with aligned vector loads: weights memory-mapped from safetensors at an odd offset
    (a tiny Gemma 3's sat at 24 mod 64) crashed the process before `aligned` copied them."""
    import torch

    from llmkit.models.int8_cpu import DECODE_ROWS, Int8PackedLinear

    torch.manual_seed(0)
    w = torch.randn(48, 64)
    scale = w.abs().amax(1, keepdim=True) / 127
    q = torch.round(w / scale).to(torch.int8)
    odd = torch.empty(q.numel() + 24, dtype=torch.int8)[24:].view(48, 64).copy_(q)
    assert odd.data_ptr() % 64 != 0
    bias = torch.randn(48)
    layer = Int8PackedLinear(odd, scale, bias)
    for rows in (1, DECODE_ROWS, DECODE_ROWS + 1, 100):  # decoding-sized calls (bf16 activations) and prompts (fp32)
        x = torch.randn(rows, 64)
        want = x @ (q.float() * scale).T + bias
        assert _rel_err(layer(x), want) < (0.01 if rows <= DECODE_ROWS else 1e-5), rows
    x = torch.randn(2, 3, 65, dtype=torch.bfloat16)[..., 1:]  # a bf16 view, as attention outputs can be
    assert layer(x).shape == (2, 3, 48) and layer(x).dtype == torch.bfloat16


def test_int8_classifier_folder(cli, tiny_bert, tmp_path):
    """A classifier: int8 encoder layers, the head left in float, plain transformers loads it with its labels."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    src = tmp_path / "cls"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2, id2label={0: "neg", 1: "pos"},
                                                               label2id={"neg": 0, "pos": 1})
    model.save_pretrained(src)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(src)
    data = tmp_path / "eval.csv"
    data.write_text("text,label\n" + "".join(f"{'good' if i % 2 else 'bad'} film number {i},{'pos' if i % 2 else 'neg'}\n" for i in range(40)))
    out = tmp_path / "q"
    code, stdout, err = cli("quantize", "--model", src, "--method", "int8", "--kernel", "dynamic", "--out", out,
                            "--eval-data", data, "--json", "--quiet", "--force")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["kernel"] == "dynamic" and report["kernel_chosen_by"] == "--kernel"
    assert len(report["after"]["samples_per_s_runs"]) == 5 and "samples_per_s" in report["ratios"]
    q = AutoModelForSequenceClassification.from_pretrained(out)
    assert q.config.id2label == {0: "neg", 1: "pos"}
    assert q.classifier.weight.dtype == torch.float32  # the head: float (KEEP_FP32)
    assert type(q.bert.encoder.layer[0].attention.self.query.weight).__name__ == "Int8Tensor"
    ids = torch.tensor([IDS[:16]])
    with torch.no_grad():
        assert _rel_err(q(ids).logits, model.eval()(ids).logits) < 0.1  # int8 activations too: a looser bound
    # what llmkit runs on CPU (and the report measured): the folder's int8 weights on fbgemm's int8 x int8 matmul
    from llmkit.models.int8_cpu import Int8DynamicLinear, fbgemm, load_for_cpu, packed_layers

    if fbgemm():
        packed = load_for_cpu(out)
        n = packed_layers(packed)["fbgemm dynamic int8"]
        assert n == report["modules"]["int8_linear"] > 0 and report["cpu_engine"].startswith(f"fbgemm dynamic int8 on {n} layers")
        layer = packed.bert.encoder.layer[0].attention.self.query
        assert isinstance(layer, Int8DynamicLinear)
        with torch.no_grad():
            assert _rel_err(packed(ids).logits, model(ids).logits) < 0.1
            x = torch.randn(2, 5, layer.in_features)  # one layer: the same weights as torchao's, activations rounded alike
            want = q.bert.encoder.layer[0].attention.self.query(x)
            assert _rel_err(layer(x), want) < 0.05


def test_old_llmkit_int8_folder_is_refused_in_one_line(cli, tiny_llama, tmp_path):
    import shutil

    old = shutil.copytree(tiny_llama, tmp_path / "old")
    config = json.loads((Path(tiny_llama) / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**config, "model_type": "llmkit-int8",
                                                 "quantization_config": {"quant_method": "llmkit-int8", "base_model_type": "llama"}}))
    code, _, err = cli("generate", "--model", old, "Once", "-n", "2")
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and "re-run `llmkit quantize --method int8`" in lines[0], err


def test_gguf_q8_0_file_loads_in_llama_cpp_and_transformers(cli, tiny_llama, tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "model.gguf"
    code, stdout, err = cli("quantize", "--model", tiny_llama, "--method", "gguf-q8_0", "--out", out, "--json", "--quiet")
    assert code == 0, err
    report = json.loads(stdout)
    assert json.loads((tmp_path / "model.quantize_report.json").read_text()) == report
    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert all(types[n] == gguf.GGMLQuantizationType.Q8_0 for n in types if n.endswith(("attn_q.weight", "ffn_down.weight", "output.weight")))
    assert all(types[n] == gguf.GGMLQuantizationType.F32 for n in types if n.endswith("norm.weight"))
    assert int(reader.fields["general.file_type"].parts[-1][0]) == gguf.LlamaFileType.MOSTLY_Q8_0
    # the tokenizer inside the file gives the same ids as the original
    import llama_cpp

    hf_tok = AutoTokenizer.from_pretrained(tiny_llama)
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    for text in ["Once upon a time there was a model.", "To be, or not to be: that is the question!"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == hf_tok(text, add_special_tokens=False)["input_ids"]
    # transformers reads it back (de-quantized): logits close to the fp32 original, so the Q/K permutation is right
    fp32 = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name).eval()
    assert _rel_err(_logits(back, IDS), _logits(fp32, IDS)) < TOL
    # and llama.cpp computes the same perplexity (the report measured it through llama.cpp)
    assert abs(report["ratios"]["perplexity"] - 1) < 0.02
    code, stdout, err = cli("generate", "--model", out, "Once upon", "--max-new-tokens", "5", "--backend", "llama.cpp")
    assert code == 0, err


def test_gguf_gpt2_export(cli, tmp_path):
    """GPT-2: Conv1D weights transposed, tied head written as output.weight, learned positions.

    n_positions is GPT-2's real 1024 here: transformers' GGUF reader maps the file's context_length onto `n_ctx`,
    not `n_positions`, so it can only read GPT-2 files with the default 1024 positions (llama.cpp reads any).
    """
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from tests.conftest import make_tokenizer

    torch.manual_seed(0)
    tok = make_tokenizer(["<|endoftext|>"])
    tok.eos_token = tok.bos_token = "<|endoftext|>"
    src = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=32, n_layer=2, n_head=4,
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(src)
    tok.save_pretrained(src)
    out = tmp_path / "runs" / "gpt2.gguf"  # a folder that does not exist yet
    code, stdout, err = cli("quantize", "--model", src, "--method", "gguf-q8_0", "--out", out, "--json", "--quiet")
    assert code == 0, err
    assert abs(json.loads(stdout)["ratios"]["perplexity"] - 1) < 0.02  # llama.cpp agrees with transformers fp32
    fp32 = AutoModelForCausalLM.from_pretrained(src).eval()
    back = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name).eval()
    assert _rel_err(_logits(back, IDS), _logits(fp32, IDS)) < TOL


def test_bnb_int8_round_trip(cli, tiny_llama, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bnb"
    code, _, err = cli("quantize", "--model", tiny_llama, "--method", "bnb-int8", "--out", out, "--json", "--quiet")
    assert code == 0, err
    # bitsandbytes logs a line on every fp32 matmul (15,120 for SmolLM2): gone, and the filter does not outlive the call
    assert "MatMul8bitLt" not in err
    assert not logging.getLogger("bitsandbytes.autograd._functions").filters
    q = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, from the saved folder
    assert q.model.layers[0].self_attn.q_proj.weight.dtype.is_floating_point is False
    fp32 = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    assert _rel_err(_logits(q, IDS), _logits(fp32, IDS)) < TOL


@pytest.mark.parametrize("method,name", [("int8", "q"), ("gguf-q8_0", "q.gguf")])
def test_overwrite_replaces_only_a_finished_output(cli, tiny_llama, tmp_path, method, name):
    out = tmp_path / name
    assert cli("quantize", "--model", tiny_llama, "--method", method, "--out", out, "--quiet", "--force")[0] == 0
    code, _, err = cli("quantize", "--model", tiny_llama, "--method", method, "--out", out, "--quiet", "--force")
    assert code == 2 and "--overwrite" in err  # refused, and says how
    if out.is_dir():
        (out / "marker").write_text("old")
    before = out.stat().st_mtime_ns
    code, _, err = cli("quantize", "--model", tiny_llama, "--method", method, "--out", out, "--quiet", "--force", "--overwrite")
    assert code == 0, err
    assert out.exists() and not (out / "marker").exists() and out.stat().st_mtime_ns != before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp or old copies left


def test_quality_gate_refuses_and_force_keeps(cli, tiny_llama, tmp_path, monkeypatch):
    import llmkit.quantize as q

    real = q.write_int8

    def broken(*args, **kwargs):  # a deliberately terrible int8 model: logits 50x too sharp (the final norm scaled)
        model, details = real(*args, **kwargs)
        model.model.norm.weight.data.mul_(50)
        return model, details

    monkeypatch.setattr(q, "write_int8", broken)
    out = tmp_path / "bad"
    code, _, err = cli("quantize", "--model", tiny_llama, "--method", "int8", "--out", out, "--quiet", "--max-ppl-increase", "1")
    assert code == 3, err
    assert "QUALITY GATE FAILED" in err and "--force" in err
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))
    code, _, err = cli("quantize", "--model", tiny_llama, "--method", "int8", "--out", out, "--quiet", "--max-ppl-increase", "1", "--force")
    assert code == 0, err
    assert json.loads((out / "quantize_report.json").read_text())["gate"]["failed"] is True


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory) -> Path:
    """OPT: a causal LM transformers runs and llama.cpp's converter does not know."""
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    from tests.conftest import make_tokenizer

    tok = make_tokenizer(["<|endoftext|>"])
    tok.eos_token = "<|endoftext|>"
    out = tmp_path_factory.mktemp("opt")
    OPTForCausalLM(OPTConfig(vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=1, word_embed_proj_dim=32,
                             num_attention_heads=4, max_position_embeddings=64)).save_pretrained(out)
    tok.save_pretrained(out)
    assert AutoTokenizer.from_pretrained(out)
    return out


@pytest.mark.parametrize("case", ["gguf_arch", "already_quantized", "no_bitsandbytes", "short_eval", "out_exists", "gguf_suffix"])
def test_bad_input(cli, tiny_llama, tiny_opt, tmp_path, monkeypatch, case):
    import sys

    model, method, out, extra, expect = tiny_llama, "int8", tmp_path / "out", [], ""
    if case == "gguf_arch":
        model, method, out, expect = tiny_opt, "gguf-q8_0", tmp_path / "out.gguf", "llama.cpp's converter does not support opt"
    elif case == "already_quantized":
        code, _, err = cli("quantize", "--model", tiny_llama, "--method", "int8", "--out", tmp_path / "q8", "--quiet")
        assert code == 0, err
        model, expect = tmp_path / "q8", "already quantized"
    elif case == "no_bitsandbytes":
        monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if it were not installed
        method, expect = "bnb-int8", "pip install"
    elif case == "short_eval":
        (tmp_path / "short.txt").write_text("Too short.")
        extra, expect = ["--eval-data", tmp_path / "short.txt"], "too short for one"
    elif case == "out_exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        expect = "already exists"
    elif case == "gguf_suffix":
        method, expect = "gguf-q8_0", ".gguf file"
    code, _, err = cli("quantize", "--model", model, "--method", method, "--out", out, "--quiet", *extra)
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and expect in lines[0], err
    if case == "out_exists":
        assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    else:
        assert not out.exists()
    assert not list(tmp_path.glob(".tmp-*"))
