"""`llmkit finetune` / `llmkit evaluate` end to end on tiny models: both tasks x both methods, resume, crashes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def base_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(model), "--data", str(data), "--out", str(out), "--quiet", *extra]


def perplexity_with_plain_transformers(model, tok, text: str, block: int) -> float:
    """ppl.py's computation: non-overlapping windows, mean NLL over predicted tokens."""
    import torch

    ids = tok(text, return_tensors="pt").input_ids[0]
    n = len(ids) // block
    x = torch.stack([ids[i * block:(i + 1) * block] for i in range(n)])
    with torch.no_grad():
        loss = model(x, labels=x).loss
    return math.exp(float(loss))


@pytest.mark.parametrize("arch,method", [("gpt2", "full"), ("gpt2", "lora"), ("llama", "lora")])
def test_causal_lm_trains_and_reloads_with_plain_transformers(cli, request, toy_data, tmp_path, arch, method):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = request.getfixturevalue(f"tiny_{arch}")
    out = tmp_path / "run"
    code, _, err = cli(*base_args(model_dir, toy_data / "train.txt", out, "--method", method, "--eval-data", str(toy_data / "eval.txt"),
                                  "--block-size", "32", "--epochs", "8", "--lr", "3e-2" if method == "lora" else "3e-3",
                                  "--batch-size", "4"))
    assert code == 0, err
    for f in ("llmkit.json", "metrics.jsonl", "loss.png", "README.md", "tokenizer.json"):
        assert (out / f).exists(), f
    assert (out / ("adapter_model.safetensors" if method == "lora" else "model.safetensors")).exists()
    assert not list(out.glob("*.bin"))
    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    # memorisable data: full fine-tuning must fall clearly; adapters on a random tiny base move slowly, but move
    assert losses[-1] < losses[0] * (0.7 if method == "full" else 0.999), losses
    if method == "lora":
        from safetensors.torch import load_file

        # the default for causal LMs is every linear layer, MLP included (not the LM head)
        targets = {t.rsplit(".", 1)[-1] for t in json.loads((out / "adapter_config.json").read_text())["target_modules"]}
        assert targets == ({"c_attn", "c_proj", "c_fc"} if arch == "gpt2" else
                           {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}), targets

        lora_b = [v for k, v in load_file(out / "adapter_model.safetensors").items() if "lora_B" in k]
        assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: non-zero means trained
    run = json.loads((out / "llmkit.json").read_text())
    assert run["llmkit"]["status"] == "done" and run["task"] == "causal-lm"
    # what `auto` resolved to on this machine, and the machine, so any number can be traced to its hardware
    machine = run["machine"]
    assert machine["precision"] in ("fp32", "bf16") and run["train"]["mixed_precision"] == "auto"
    assert machine["cpu"] and machine["threads"] >= 1 and machine["processes"] == 1 and machine["device"] == "cpu"
    from llmkit.machine import cpu_has_amx

    assert machine["precision"] == ("bf16" if cpu_has_amx() else "fp32")

    # The saved folder, loaded by plain transformers / peft, is the model that was evaluated in training.
    if method == "lora":
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(out)
    else:
        model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ppl = perplexity_with_plain_transformers(model.eval(), tok, (toy_data / "eval.txt").read_text(), 32)
    assert ppl == pytest.approx(run["llmkit"]["metrics"]["eval_perplexity"], rel=1e-4)

    # ...and llmkit evaluate (same metric code) agrees, on the folder as given.
    code, out_json, err = cli("evaluate", "--model", out, "--data", toy_data / "eval.txt", "--block-size", "32", "--json")
    assert code == 0, err
    assert json.loads(out_json)["perplexity"] == pytest.approx(ppl, rel=1e-4)


@pytest.mark.parametrize("arch,method", [("bert", "full"), ("bert", "lora"), ("gpt2", "lora"), ("llama", "full")])
def test_seq_cls_trains_and_reloads(cli, request, toy_data, tmp_path, arch, method):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = request.getfixturevalue(f"tiny_{arch}")
    out = tmp_path / "run"
    lora = method == "lora"  # adapters on a random tiny base need more steps and a higher rate
    code, _, err = cli(*base_args(model_dir, toy_data / "train.csv", out, "--task", "seq-cls", "--method", method,
                                  "--eval-data", str(toy_data / "eval.csv"), "--epochs", "20" if lora else "10",
                                  "--lr", "1e-2" if lora else "3e-3", "--batch-size", "8", "--mixed-precision", "no"))
    assert code == 0, err
    run = json.loads((out / "llmkit.json").read_text())
    assert run["labels"] == ["neg", "pos"]
    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    assert losses[-1] < losses[0], losses
    assert run["llmkit"]["metrics"]["eval_accuracy"] >= 0.9  # one word decides the label

    if method == "lora":
        from peft import AutoPeftModelForSequenceClassification

        model = AutoPeftModelForSequenceClassification.from_pretrained(out)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(out)
        assert model.config.id2label == {0: "neg", 1: "pos"}
        assert model.config.pad_token_id is not None  # decoders pool the last non-pad token
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token is not None  # saved with the pad token llmkit set (EOS for GPT-2 / Llama)
    model.config.pad_token_id = tok.pad_token_id  # the base config of an adapter has none (the model card says so)
    rows = (toy_data / "eval.csv").read_text().splitlines()[1:]
    texts, labels = [r.rsplit(",", 1)[0] for r in rows], [r.rsplit(",", 1)[1] for r in rows]
    with torch.no_grad():
        enc = tok(texts, padding=True, return_tensors="pt")
        logits = model.eval()(**enc).logits
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0 if y == "neg" else 1 for y in labels]))
    assert float(loss) == pytest.approx(run["llmkit"]["metrics"]["eval_loss"], rel=1e-4)

    code, out_json, err = cli("evaluate", "--model", out, "--data", toy_data / "eval.csv", "--json")
    assert code == 0, err
    res = json.loads(out_json)
    assert res["task"] == "seq-cls" and res["samples"] == len(rows)
    assert res["accuracy"] == pytest.approx(run["llmkit"]["metrics"]["eval_accuracy"])


def test_lora_merge_writes_a_full_model_and_generate_loads_adapters(cli, tiny_llama, toy_data, tmp_path):
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    common = ["--method", "lora", "--block-size", "32", "--max-steps", "4", "--lr", "1e-2", "--set", "lora.dropout=0"]
    assert cli(*base_args(tiny_llama, toy_data / "train.txt", merged, *common, "--merge"))[0] == 0
    assert cli(*base_args(tiny_llama, toy_data / "train.txt", adapter, *common))[0] == 0
    assert (merged / "model.safetensors").exists() and not (merged / "adapter_config.json").exists()
    assert (adapter / "adapter_config.json").exists()
    outs = []
    for folder in (merged, adapter):
        code, out, err = cli("generate", "--model", folder, "Once upon", "-n", "8", "-t", "0", "--json")
        assert code == 0, err
        outs.append(json.loads(out)["text"])
    assert outs[0] == outs[1]  # same seed, same training: merged and adapter are the same model


def test_adapter_on_a_gguf_base_loads_in_plain_peft_offline(cli, toy_data, tmp_path, monkeypatch):
    """peft cannot read a GGUF base: the de-quantized base is kept as a folder that base_model_name_or_path names.

    Loaded with plain AutoPeftModelForCausalLM (HF_HUB_OFFLINE is set for every test), the adapter gives the
    perplexity llmkit measured in training, so the kept base is exactly the one the adapter was trained on.
    """
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.conftest import make_tokenizer

    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    # transformers' GGUF tokenizer reader adds <|endoftext|> when a BPE vocabulary lacks it, and AutoPeft then grows the
    # embeddings to the tokenizer: a tiny-model artefact (real BPE vocabularies such as SmolLM2's have it), avoided here
    tok = make_tokenizer(["<s>", "</s>", "<|endoftext|>"])
    tok.bos_token, tok.eos_token = "<s>", "</s>"
    torch.manual_seed(0)
    src = tmp_path / "src"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id)).save_pretrained(src)
    tok.save_pretrained(src)
    gguf = tmp_path / "base.gguf"
    assert cli("quantize", "--model", src, "--method", "gguf-q8_0", "--out", gguf, "--force", "--quiet")[0] == 0
    out = tmp_path / "adapter"
    code, _, err = cli(*base_args(gguf, toy_data / "train.txt", out, "--method", "lora", "--block-size", "32", "--max-steps", "3",
                                  "--lr", "1e-2", "--eval-data", toy_data / "eval.txt"))
    assert code == 0, err
    base = Path(json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"])
    assert base.is_dir() and base.is_relative_to(tmp_path / "cache") and (base / "model.safetensors").exists()
    model = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    run = json.loads((out / "llmkit.json").read_text())
    with torch.no_grad():
        ppl = perplexity_with_plain_transformers(model, tok, (toy_data / "eval.txt").read_text(), 32)
    assert ppl == pytest.approx(run["llmkit"]["metrics"]["eval_perplexity"], rel=1e-4)
    card = (out / "README.md").read_text()
    assert f"AutoPeftModelForCausalLM.from_pretrained({str(out)!r})  # base: {base}" in card


def _train_cfg(model: Path, data: Path, out: Path, **train):
    from llmkit.config import load_recipe

    flags = {"model.name": str(model), "data.train": str(data), "out": str(out), "data.block_size": 16, "train.batch_size": 4,
             "train.max_steps": 8, "train.save_every": 2, "train.keep_checkpoints": 10, "train.lr": 1e-3,
             "train.mixed_precision": "no", "quiet": True, "train.log_every": 1}
    flags.update({f"train.{k}": v for k, v in train.items()})
    return load_recipe(None, [], flags)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_gpt2, toy_data, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import llmkit.training.checkpoints as checkpoints
    from llmkit.finetune import finetune

    finetune(_train_cfg(tiny_gpt2, toy_data / "train.txt", tmp_path / "a"))

    real_save = checkpoints.save_checkpoint

    def save_then_die(accelerator, root, state, *args, **kwargs):
        path = real_save(accelerator, root, state, *args, **kwargs)
        if state.step == 4:
            raise KeyboardInterrupt  # the user pressed Ctrl-C right after the step-4 checkpoint
        return path

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        finetune(_train_cfg(tiny_gpt2, toy_data / "train.txt", tmp_path / "b"))
    monkeypatch.setattr(checkpoints, "save_checkpoint", real_save)
    assert not (tmp_path / "b" / "model.safetensors").exists()

    cfg = _train_cfg(tiny_gpt2, toy_data / "train.txt", tmp_path / "b")
    cfg.resume = True
    finetune(cfg)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k  # bit for bit: same data order, dropout masks, optimizer and LR
    la = [r for r in metrics(tmp_path / "a") if "loss" in r]
    lb = [r for r in metrics(tmp_path / "b") if "loss" in r]
    assert [r["step"] for r in lb] == list(range(1, 9))  # no duplicated or missing lines after resume
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]


def test_checkpoint_rotation_keeps_the_newest(tiny_gpt2, toy_data, tmp_path):
    from llmkit.finetune import finetune
    from llmkit.training.checkpoints import complete_checkpoints

    out = tmp_path / "run"
    finetune(_train_cfg(tiny_gpt2, toy_data / "train.txt", out, keep_checkpoints=2, max_steps=9))
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step-00000006", "step-00000008"]


def test_early_stopping_keeps_the_best_model(tiny_bert, toy_data, tmp_path):
    from llmkit.config import load_recipe
    from llmkit.finetune import finetune

    out = tmp_path / "run"
    cfg = load_recipe(None, ["train.early_stopping=1", "train.eval_every=2", "train.lr=0.3"],
                      {"model.name": str(tiny_bert), "task": "seq-cls", "data.train": str(toy_data / "train.csv"),
                       "data.eval": str(toy_data / "eval.csv"), "out": str(out), "quiet": True, "train.epochs": 20})
    finetune(cfg)  # lr 0.3 diverges: accuracy stops improving and the run stops early
    run = json.loads((out / "llmkit.json").read_text())["llmkit"]
    evals = [r for r in metrics(out) if "eval_accuracy" in r]
    assert run["stopped_early"] and run["steps"] < run["total_steps"]
    best = max(evals, key=lambda r: r["eval_accuracy"])
    assert run["metrics"]["eval_accuracy"] == best["eval_accuracy"]
    assert run["best_step"] == min(r["step"] for r in evals if r["eval_accuracy"] == best["eval_accuracy"])


def test_eval_split_holds_out_rows(tiny_bert, toy_data, tmp_path):
    from llmkit.config import load_recipe
    from llmkit.finetune import finetune

    out = tmp_path / "run"
    finetune(load_recipe(None, ["data.eval_split=0.25"], {"model.name": str(tiny_bert), "task": "seq-cls", "quiet": True,
                                                          "data.train": str(toy_data / "train.csv"), "out": str(out)}))
    run = json.loads((out / "llmkit.json").read_text())
    assert run["examples"] == {"train": 48, "eval": 16, "train_tokens": run["examples"]["train_tokens"]}
    assert "eval_accuracy" in run["llmkit"]["metrics"]


def test_evaluate_perplexity_matches_the_reference_computation(cli, tiny_gpt2, toy_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    code, out, err = cli("evaluate", "--model", tiny_gpt2, "--data", toy_data / "train.txt", "--block-size", "16", "--max-blocks", "5", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["tokens"] == 5 * 15 and res["blocks"] == 5
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    text = tok.decode(tok((toy_data / "train.txt").read_text()).input_ids[:80])
    ref = perplexity_with_plain_transformers(AutoModelForCausalLM.from_pretrained(tiny_gpt2), tok, text, 16)
    assert res["perplexity"] == pytest.approx(ref, rel=1e-4)
    code, out, _ = cli("evaluate", "--model", tiny_gpt2, "--data", toy_data / "train.txt", "--block-size", "16")
    assert code == 0 and out.startswith("perplexity ")


def test_every_epoch_gets_its_own_data_order(cli, tiny_gpt2, toy_data, tmp_path, monkeypatch):
    """Accelerate's loader re-sets the sampler's epoch at every pass; once, every epoch silently reused epoch 0's order."""
    from llmkit.data import examples as data

    seen: list[int] = []
    original = data.EpochSampler.__iter__

    def recording(self):
        seen.append(self.epoch)
        return original(self)

    monkeypatch.setattr(data.EpochSampler, "__iter__", recording)
    code, _, err = cli(*base_args(tiny_gpt2, toy_data / "train.txt", tmp_path / "out", "--block-size", "16", "--epochs", "3",
                                  "--batch-size", "16"))
    assert code == 0, err
    assert seen == [0, 1, 2]
