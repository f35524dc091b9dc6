"""LoRA adapters on llama.cpp at run time (llmkit.export.adapter): the base GGUF unchanged plus a GGUF adapter.

Every family of tests/families.py: a LoRA with random (nonzero) B, written as a llama.cpp adapter, gives on
llama.cpp the greedy tokens transformers gives with the adapter, changes llama.cpp's output, and without it llama.cpp
gives the base's tokens again. Run folders travel (a moved folder with an emptied cache generates); a missing base is
one line, exit 2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.families import FAMILIES, build, make_lora

NAMES = list(FAMILIES)
PROMPT = "Once upon a time the fox"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


def _greedy(model, ids, n: int = 8):
    out = model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                         output_scores=True, return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:].tolist(), out.scores


def _same_or_tie(got: list[int], want: list[int], scores) -> None:
    if got != want:  # F16 base rounding may only flip a near-tie of transformers' own logits (tiny random models)
        k = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
        assert scores[k][0][want[k]] - scores[k][0][got[k]] < 0.01, (k, got, want)


@pytest.mark.parametrize("name", NAMES)
def test_adapter_gguf_greedy_equals_transformers(name, tmp_path, cache):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.export.adapter import cached_adapter
    from llmkit.export.gguf import cached_gguf
    from llmkit.inference.llama_cpp import LlamaCppBackend
    from llmkit.models.refs import ModelRef, resolve

    base = build(FAMILIES[name], tmp_path / "base")
    lora = make_lora(base, tmp_path / "lora")
    ref = resolve(str(lora))
    adapter = cached_adapter(ref)
    assert cached_adapter(ref) == adapter  # cached
    base_gguf = cached_gguf(resolve(str(base)), "f16", progress=False)

    tok = AutoTokenizer.from_pretrained(base)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), lora)
    want, scores = _greedy(peft, ids)
    with peft.disable_adapter():
        want_base, base_scores = _greedy(peft, ids)
    assert want != want_base  # the LoRA really changes the output

    def run(adapter_file: Path | None) -> list[int]:
        backend = LlamaCppBackend(ModelRef(name, "gguf", base_gguf, "local", adapter=adapter_file), 64, threads=1)
        try:
            return backend.greedy_token_ids(ids[0].tolist(), 8)
        finally:
            backend.close()

    _same_or_tie(run(adapter), want, scores)
    _same_or_tie(run(None), want_base, base_scores)  # without it: the base's own tokens again


def test_adapter_tensors_follow_llama_cpp_layout(tmp_path, cache):
    """GGUF shapes: lora_a [r, in], lora_b [out, r] (numpy order); general.type adapter; alpha as peft's."""
    import gguf

    from llmkit.export.adapter import cached_adapter
    from llmkit.models.refs import resolve

    base = build(FAMILIES["Llama 3"], tmp_path / "base")
    path = cached_adapter(resolve(str(make_lora(base, tmp_path / "lora"))))
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["general.type"]
    assert bytes(field.parts[field.data[0]]).decode() == "adapter"
    assert float(reader.fields["adapter.lora.alpha"].parts[-1][0]) == 8.0
    shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in reader.tensors}
    assert shapes["blk.0.attn_q.weight.lora_a"] == (4, 64) and shapes["blk.0.ffn_down.weight.lora_b"] == (64, 4)


@pytest.mark.slow  # the merged export: ~25-70 s on 2 busy cores
def test_unsupported_adapter_falls_back_to_merged_export(tmp_path, cache, capsys):
    from llmkit.export.gguf import for_llama_cpp
    from llmkit.models.refs import resolve

    base = build(FAMILIES["Llama 3"], tmp_path / "base")
    lora = make_lora(base, tmp_path / "lora", targets=["q_proj", "embed_tokens"])  # embeddings: merged instead
    gguf_ref, _ = for_llama_cpp(resolve(str(lora)), progress=True)
    assert gguf_ref.adapter is None
    err = capsys.readouterr().err
    assert "cannot apply this LoRA at run time (it adapts the token embeddings" in err


def test_moved_run_folder_with_empty_cache_generates(tmp_path, cli, monkeypatch):
    base = build(FAMILIES["Llama 3"], tmp_path / "base")
    lora = make_lora(base, tmp_path / "runs" / "lora")
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache-1"))
    code, out, err = cli("generate", "--model", lora, PROMPT, "-n", "4", "--temperature", "0")
    assert code == 0, err
    moved = tmp_path / "elsewhere" / "lora"
    shutil.copytree(lora, moved)
    shutil.rmtree(lora)
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache-2"))  # emptied: nothing of the first run is reused
    code, out2, err = cli("generate", "--model", moved, PROMPT, "-n", "4", "--temperature", "0")
    assert code == 0, err
    assert out2 == out and "llama.cpp" in err
    assert list((tmp_path / "cache-2" / "gguf" / "adapters").glob("*.lora.gguf"))

    shutil.rmtree(base)  # the base is gone: one line, exit 2
    code, _, err = cli("generate", "--model", moved, PROMPT, "-n", "4")
    assert code == 2 and "cannot be loaded" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow  # 12 s alone, 102 s on 2 busy cores: the fp32 and llama.cpp perplexities
def test_quantize_gguf_lora_writes_the_adapter_and_gates_what_runs(tmp_path, cli, cache, toy_data):
    """`--method gguf-lora`: the adapter file; the gate compares base + adapter on llama.cpp with the fp32 adapter model."""
    import gguf

    base = build(FAMILIES["Llama 3"], tmp_path / "base")
    lora = make_lora(base, tmp_path / "lora")
    out = tmp_path / "sql.lora.gguf"
    held_out = tmp_path / "held-out.txt"
    held_out.write_text(((toy_data / "train.txt").read_text() + "\n") * 8)  # two 256-token windows at least
    code, _, err = cli("quantize", "--model", lora, "--method", "gguf-lora", "--out", out,
                       "--eval-data", held_out, "--max-ppl-increase", "1")
    assert code == 0, err
    field = gguf.GGUFReader(str(out)).fields["general.type"]
    assert bytes(field.parts[field.data[0]]).decode() == "adapter"
    report = json.loads(next(tmp_path.glob("sql.lora*.json")).read_text())
    assert report["method"] == "gguf-lora" and Path(report["base"]).exists()
    code, _, err = cli("quantize", "--model", base, "--method", "gguf-lora", "--out", tmp_path / "x.gguf")
    assert code == 2 and "is not a LoRA adapter" in err and not (tmp_path / "x.gguf").exists()


def test_gguf_auto_picks_the_adapter_and_steps_up_to_f16(tmp_path, monkeypatch, capsys):
    """gguf-auto: a LoRA run -> gguf-lora (or merged with merge=True); a full model -> q8_0, and F16 when Q8_0 fails the gate."""
    import llmkit.quantize as q

    base = build(FAMILIES["Llama 3"], tmp_path / "base")
    lora = make_lora(base, tmp_path / "lora")
    calls: list[str] = []

    def fake(cfg, say=None):
        method = cfg.method
        calls.append(method)
        report = {"method": method, "gate": {"metric": "perplexity increase", "change": "+3.10%", "allowed": "2.0%", "failed": True}}
        if method == "gguf-q8_0":
            raise q.QualityGateError(report)
        return report

    monkeypatch.setattr(q, "quantize", fake)
    capsys.readouterr()  # building the models' progress bars
    assert q.quantize_auto(q.QuantizeConfig(model=str(lora), out=str(tmp_path / "a.gguf")))["method"] == "gguf-lora"
    report = q.quantize_auto(q.QuantizeConfig(model=str(base), out=str(tmp_path / "b.gguf")))
    assert calls[1:] == ["gguf-q8_0", "gguf-f16"] and report["stepped_up_from"] == "gguf-q8_0"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gguf-q8_0 failed the quality gate (perplexity increase +3.10% > 2.0%); writing gguf-f16" in err
    assert json.loads((tmp_path / "b.quantize_report.json").read_text())["stepped_up_from"] == "gguf-q8_0"
    calls.clear()
    q.quantize_auto(q.QuantizeConfig(model=str(lora), out=str(tmp_path / "c.gguf"), merge=True))
    assert calls == ["gguf-q8_0", "gguf-f16"]
