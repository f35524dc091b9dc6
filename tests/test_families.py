"""Every family in the README's support table, on a tiny random model of it (tests/families.py).

GGUF Q8_0 export by llama.cpp's converter that llama.cpp loads and whose first 8 greedy tokens equal transformers'
on the same weights; each family's chat template masks exactly the replies and its end-of-turn token becomes the
GGUF's stop token; LoRA / full / QLoRA fine-tunes that then generate on llama.cpp (adapters merged in fp32 on the
way); distillation to half the layers; int8 quantization. About 40 s in all: the models are 64 wide.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.families import FAMILIES, build

NAMES = list(FAMILIES)
PROMPT = "Once upon a time the fox"


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build(FAMILIES[name], tmp_path_factory.mktemp(name.replace(" ", "-").lower()))
        return built[name]

    return get


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


def _gguf_field(path: Path, name: str):
    import gguf

    f = gguf.GGUFReader(str(path)).fields.get(name)
    if f is None:
        return None
    value = f.parts[f.data[0]]
    return bytes(value).decode() if f.types[0] == gguf.GGUFValueType.STRING else int(value[0])


@pytest.mark.parametrize("name", NAMES)
def test_gguf_export_greedy_equals_transformers(name, family_dir, cache):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.export.gguf import cached_gguf
    from llmkit.inference.llama_cpp import LlamaCppBackend
    from llmkit.models.refs import ModelRef, resolve

    folder = family_dir(name)
    path = cached_gguf(resolve(str(folder)), "q8_0", progress=False)  # llama.cpp loaded it, and splits text as HF does
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, eos_token_id=None, output_scores=True,
                         return_dict_in_generate=True)
    want = out.sequences[0, ids.shape[1]:].tolist()
    backend = LlamaCppBackend(ModelRef(name, "gguf", path, "local"), 64, threads=1)
    try:
        got = backend.greedy_token_ids(ids[0].tolist(), 8)
    finally:
        backend.close()
    if got != want:
        # Q8_0 rounds each weight by up to 1/254 of its block's largest: it may only flip a tie transformers itself
        # is within a hair of (tiny random models have flat logits); anything else is a conversion error
        k = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
        scores = out.scores[k][0]
        assert scores[want[k]] - scores[got[k]] < 0.01, (k, got, want)


@pytest.mark.parametrize("name", [n for n in NAMES if FAMILIES[n].template])
def test_chat_masks_and_stop_token(name, family_dir, cache):
    """The template's replies and end-of-turn token are exactly what is learned; the GGUF stops at that token."""
    from transformers import AutoTokenizer

    from llmkit.data.chat import ChatEncoder
    from llmkit.data.formats import Conversation
    from llmkit.export.gguf import cached_gguf
    from llmkit.models.refs import resolve

    fam, folder = FAMILIES[name], family_dir(name)
    tok = AutoTokenizer.from_pretrained(folder)
    replies = ["there was a little model.", "The quick brown fox jumps over the lazy dog."]
    conv = Conversation([{"role": "user", "content": "Once upon a time?"}, {"role": "assistant", "content": replies[0]},
                         {"role": "user", "content": "And the fox?"}, {"role": "assistant", "content": replies[1]}], "test")
    encoder = ChatEncoder(tok, tok.chat_template)
    _, labels = encoder.encode(conv)
    eot = tok.convert_tokens_to_ids(fam.end_of_turn)
    runs, run = [], []
    for lab in [*labels, -100]:
        if lab != -100:
            run.append(lab)
        elif run:
            runs.append(run)
            run = []
    assert [tok.decode(r[:-1]).strip() for r in runs] == replies and all(r[-1] == eot for r in runs)
    assert encoder.end_of_turn == {eot}

    path = cached_gguf(resolve(str(folder)), "q8_0", progress=False)
    assert _gguf_field(path, "tokenizer.ggml.eot_token_id") == eot
    assert _gguf_field(path, "tokenizer.chat_template") == fam.template


@pytest.mark.parametrize("name", NAMES)
def test_finetune_every_method_then_generate_on_llama_cpp(name, family_dir, cli, toy_data, tmp_path, cache):
    """LoRA, full and QLoRA fine-tunes of each family; the LoRA adapter (merged in fp32 on export) and the full
    fine-tune then run on llama.cpp, and `--merge` writes a folder transformers loads without llmkit."""
    from transformers import AutoModelForCausalLM

    folder = family_dir(name)
    common = ["--data", toy_data / "train.txt", "--max-steps", "2", "--block-size", "32", "--batch-size", "2", "--quiet"]
    for run, extra in [("lora", []), ("lora-merged", ["--merge"]), ("full", []), ("qlora", [])]:
        out = tmp_path / run
        code, _, err = cli("finetune", "--model", folder, "--method", run.split("-")[0], "--out", out, *common, *extra)
        assert code == 0, (run, err)
        if run == "qlora":
            continue  # its adapter sits on a 4-bit base: runs on transformers (see test_qlora.py)
        code, stdout, err = cli("generate", "--model", out, PROMPT, "--max-new-tokens", "4", "--backend", "llama.cpp", "--seed", "0")
        assert code == 0 and stdout.strip(), (run, err)
    assert (tmp_path / "lora" / "adapter_config.json").exists() and not (tmp_path / "lora-merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora-merged")  # a plain folder: no llmkit, no peft
    assert type(merged).__name__ == FAMILIES[name].model


@pytest.mark.parametrize("name", NAMES)
def test_distill_to_half_the_layers(name, family_dir, cli, toy_data, tmp_path, cache):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "student"
    code, _, err = cli("distill", "--teacher", family_dir(name), "--student-layers", "2", "--data", toy_data / "train.txt",
                       "--out", out, "--max-steps", "2", "--block-size", "32", "--batch-size", "2", "--quiet")
    assert code == 0, err
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.num_hidden_layers == 2 and type(student).__name__ == FAMILIES[name].model
    assert json.loads((out / "llmkit.json").read_text())["student"]["kept_layers"] is not None


@pytest.mark.parametrize("name", NAMES)
def test_int8_quantize(name, family_dir, cli, toy_data, tmp_path):
    out = tmp_path / "int8"
    code, stdout, err = cli("quantize", "--model", family_dir(name), "--method", "int8", "--out", out,
                            "--eval-data", toy_data / "train.txt", "--json", "--quiet", "--force")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["after"]["disk_bytes"] < report["before"]["disk_bytes"]


def test_readme_support_table_is_this_matrix():
    """The README's table is rendered from tests/families.py, whose every cell the tests above prove."""
    from tests.families import render_table

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert render_table() in readme, "README's support table is stale: paste tests.families.render_table() into it"
