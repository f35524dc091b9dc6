"""Many LoRA adapters behind one `llmkit serve` (llmkit.serving.adapters): a request's `model` picks the adapter.

Two LoRAs with different random (nonzero) B on one tiny Llama: each answers with its own adapter's greedy text, the
text `llmkit generate --model RUN_FOLDER` gives, one at a time, concurrently, with `--parallel 4` and on transformers;
/v1/models lists the base and both names; an unknown name is an OpenAI-shaped 404 naming `model`; an --adapter that
is not a LoRA on the served base is one line, exit 2.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.families import FAMILIES, build, make_lora
from tests.test_serve import Server

PROMPTS = ["Once upon a time the fox", "To be, or not to be"]
N = 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    base = build(FAMILIES["Llama 3"], root / "base")
    return {"base": base, "sql": make_lora(base, root / "runs" / "lora-sql", seed=1),
            "poet": make_lora(base, root / "runs" / "lora-poet", seed=2)}


def _generate(model: Path, backend: str) -> list[str]:
    """Greedy texts of `llmkit generate --model MODEL --backend BACKEND -n N --temperature 0` (its backend, opened
    the same way, in-process: a subprocess per model costs a minute of imports on a busy machine)."""
    from llmkit.inference.backends import open_backend
    from llmkit.inference.sampling import SamplingOptions
    from llmkit.models.refs import resolve

    opts = SamplingOptions(max_new_tokens=N, temperature=0)
    engine = open_backend(resolve(str(model)), PROMPTS, opts, backend, threads=1, progress=False)
    try:
        return [g.text for g in engine.generate(PROMPTS, opts)]
    finally:
        getattr(engine, "close", lambda: None)()


@pytest.fixture(scope="module")
def expected(runs) -> dict[str, list[str]]:
    want = {name: _generate(path, "llama.cpp") for name, path in runs.items()}
    assert want["sql"] != want["poet"] != want["base"]  # the adapters really differ
    return want


def _ask(srv: Server, model: str, prompt: str) -> str:
    code, body = srv.post("/v1/completions", {"model": model, "prompt": prompt, "max_tokens": N, "temperature": 0})
    assert code == 200, body
    assert body["model"] == model
    return body["choices"][0]["text"]


def _mixed(srv: Server, expected: dict[str, list[str]], base_name: str, rounds: int = 3) -> None:
    """Requests of the base and both adapters at once (8 in flight): each gets its own model's text."""
    asks = [(name, i) for _ in range(rounds) for name in ("sql", "poet", "base") for i in range(len(PROMPTS))]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda a: _ask(srv, base_name if a[0] == "base" else a[0], PROMPTS[a[1]]), asks))
    assert got == [expected[name][i] for name, i in asks]


@pytest.mark.parametrize("parallel", ["1", "4"])
def test_each_adapter_answers_with_its_own_text(runs, expected, tmp_path, parallel):
    srv = Server(tmp_path, "--model", str(runs["base"]), "--adapter", f"sql={runs['sql']}", "--adapter", f"poet={runs['poet']}",
                 "--parallel", parallel, "--threads", "1")
    try:
        assert srv.backend == "llama.cpp"
        listing = json.loads(_get(srv, "/v1/models"))
        assert [m["id"] for m in listing["data"]] == [srv.model, "sql", "poet"]
        for name in ("sql", "poet"):
            assert [_ask(srv, name, p) for p in PROMPTS] == expected[name]
        assert [_ask(srv, srv.model, p) for p in PROMPTS] == expected["base"]
        _mixed(srv, expected, srv.model)
        code, body = srv.post("/v1/completions", {"model": "nope", "prompt": "hi", "max_tokens": 2})
        assert code == 404 and body["error"]["param"] == "model" and "'sql'" in body["error"]["message"]
    finally:
        srv.stop()


@pytest.mark.slow  # 64 s on 2 busy cores: a transformers server process plus peft
def test_adapters_on_transformers(runs, tmp_path):
    want = {name: _generate(path, "transformers") for name, path in runs.items()}
    srv = Server(tmp_path, "--model", str(runs["base"]), "--adapter", f"sql={runs['sql']}", "--adapter", f"poet={runs['poet']}",
                 "--backend", "transformers")
    try:
        assert srv.backend == "transformers"
        _mixed(srv, want, srv.model, rounds=1)
    finally:
        srv.stop()


def test_transformers_batches_rows_of_different_adapters(runs):
    """One generate() call with a row per adapter (and one for the base) gives each row its own model's greedy text:
    what lets serve batch requests for different adapters on transformers (llmkit.inference.stacked_lora)."""
    from llmkit.inference.sampling import SamplingOptions
    from llmkit.inference.transformers import TransformersBackend
    from llmkit.models.refs import resolve

    opts = SamplingOptions(max_new_tokens=N, temperature=0, logprobs=1, prompt_logprobs=True)
    backend = TransformersBackend(resolve(str(runs["base"])), progress=False)
    for name in ("sql", "poet"):
        backend.load_adapter(name, str(runs[name]))
    alone, echo = {}, {}
    for name in ("sql", "poet", None):
        backend.use_adapter(name)
        gens = list(backend.generate(PROMPTS, opts))
        alone[name] = [g.text for g in gens]
        echo[name] = [[t.logprob for t in g.prompt_logprobs[1:]] for g in gens]
    assert alone["sql"] != alone["poet"] != alone[None]
    names = ["sql", "poet", None, "poet"]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[0]]
    calls = []
    generate = backend.model.generate
    backend.model.generate = lambda **kw: (calls.append(kw.get("adapter_names")), generate(**kw))[1]
    backend.use_adapter(names)
    gens = list(backend.generate(prompts, opts))
    assert [g.text for g in gens] == [alone[n][PROMPTS.index(p)] for n, p in zip(names, prompts, strict=True)]
    for g, n, p in zip(gens, names, prompts, strict=True):  # echo's prompt log-probs come from the row's own adapter
        assert [t.logprob for t in g.prompt_logprobs[1:]] == pytest.approx(echo[n][PROMPTS.index(p)], abs=1e-4)
    assert len(calls) == 1 and calls[0] is None  # one batch, the adapters stacked rather than peft's per-adapter loop


def test_stacked_adapters_match_peft_mixed_batches(runs, tmp_path):
    """StackedLora's one-pass mix gives each row the logits peft's own mixed batch gives it, with adapters of
    different ranks and target layers (the third LoRA touches only q_proj and v_proj) and a base row."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmkit.inference.stacked_lora import StackedLora

    narrow = make_lora(runs["base"], tmp_path / "lora-narrow", seed=3, targets=["q_proj", "v_proj"], r=2)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(runs["base"]), runs["sql"], adapter_name="sql")
    model.load_adapter(str(runs["poet"]), adapter_name="poet")
    model.load_adapter(str(narrow), adapter_name="narrow")
    model.eval()
    rows = ["poet", None, "narrow", "sql", "poet"]
    ids = torch.randint(3, model.config.vocab_size, (len(rows), 7), generator=torch.Generator().manual_seed(0))
    stacked = StackedLora.build(model)
    assert stacked is not None and stacked.names == ["sql", "poet", "narrow"]
    with torch.inference_mode():
        want = model(input_ids=ids, adapter_names=[r or "__base__" for r in rows]).logits
        with stacked.rows(rows):
            got = model(input_ids=ids).logits
        after = model(input_ids=ids, adapter_names=[r or "__base__" for r in rows]).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert torch.equal(after, want)  # leaving the block restores peft's own layers
    assert not torch.allclose(want[2], want[1], atol=1e-3)  # the narrow adapter does change its row


def _get(srv: Server, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(srv.url + path, timeout=10) as r:
        return r.read().decode()


def test_bad_adapters_are_one_line_exit_2(runs, cli, tmp_path, capsys):
    other = build(FAMILIES["Qwen 2.5"], tmp_path / "other")
    stranger = make_lora(other, tmp_path / "lora-other")
    capsys.readouterr()  # building the models' progress bars
    for spec, words in [(f"x={runs['base']}", "is not a LoRA run folder"), (f"x={stranger}", "not on the served --model"),
                        ("sql", "NAME=RUN_FOLDER"), (f"x={tmp_path / 'missing'}", "")]:
        code, _, err = cli("serve", "--model", runs["base"], "--adapter", spec, "--port", "0")
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_each_adapter_keeps_its_own_cached_prompt(runs):
    """Continuous batching caches a prompt prefix per adapter (its keys and values are the adapter's): requests that
    alternate between two adapters keep reusing their own adapter's prefix instead of evicting each other's."""
    from dataclasses import replace

    from llmkit.export.gguf import for_llama_cpp
    from llmkit.inference.llama_batch import BatchedLlama, Sequence
    from llmkit.inference.llama_cpp import LlamaCppBackend
    from llmkit.inference.sampling import SamplingOptions
    from llmkit.models.refs import resolve

    adapters = {name: for_llama_cpp(resolve(str(runs[name])), progress=False)[0] for name in ("sql", "poet")}
    backend = LlamaCppBackend(replace(adapters["sql"], adapter=None), 512, threads=1)
    for name, ref in adapters.items():
        backend.load_adapter(name, str(ref.adapter))
    engine = BatchedLlama(backend.native_llama(), 2, 512)
    opts = SamplingOptions(max_new_tokens=4, temperature=0)
    shared = "Once upon a time the fox and the crow met by the river and they talked about"

    def run(adapter: str, tail: str) -> Sequence:
        seq = Sequence(shared + tail, backend.tokens(shared + tail, opts), opts, 0, 0, adapter=adapter)
        engine.add(seq)
        while engine.active:
            engine.step()
        return seq

    try:
        assert run("sql", " cheese").reused == 0 and run("poet", " cheese").reused == 0  # nothing cached under poet yet
        again = [run("sql", " bread"), run("poet", " bread"), run("sql", " wine")]
        assert all(seq.reused >= 8 for seq in again), [seq.reused for seq in again]
        assert set(engine.caches) == {"sql", "poet"}
    finally:
        engine.close()
        backend.close()
