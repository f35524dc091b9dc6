"""`llmkit distill`: student construction, the KD loss, an end-to-end run per task, and every bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import make_tokenizer


def _save(model, tok, folder: Path) -> Path:
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    """4-layer teachers: GPT-2 and Llama causal LMs, a BERT classifier (labels neg / pos), and a GPT-NeoX LM."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    root = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    gtok = make_tokenizer(["<|endoftext|>"])
    gtok.eos_token = gtok.bos_token = "<|endoftext|>"
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(gtok), n_positions=64, n_embd=32, n_layer=4, n_head=4,
                                      bos_token_id=gtok.eos_token_id, eos_token_id=gtok.eos_token_id))
    ltok = make_tokenizer(["<s>", "</s>"])
    ltok.bos_token, ltok.eos_token = "<s>", "</s>"
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(ltok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         bos_token_id=ltok.bos_token_id, eos_token_id=ltok.eos_token_id))
    btok = make_tokenizer(["[PAD]", "[CLS]", "[SEP]", "[UNK]"])
    btok.pad_token, btok.cls_token, btok.sep_token, btok.unk_token = "[PAD]", "[CLS]", "[SEP]", "[UNK]"
    bert = BertForSequenceClassification(BertConfig(vocab_size=len(btok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                                    num_attention_heads=4, max_position_embeddings=128, pad_token_id=btok.pad_token_id,
                                                    num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1}))
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(gtok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=64))
    return {"gpt2": _save(gpt2, gtok, root / "gpt2"), "llama": _save(llama, ltok, root / "llama"),
            "bert": _save(bert, btok, root / "bert"), "neox": _save(neox, gtok, root / "neox")}


def _flags(teacher: Path, out: Path, data: Path, **extra: str) -> list[str]:
    args = ["distill", "--teacher", teacher, "--data", data, "--out", out, "--quiet", "--mixed-precision", "no"]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", v]
    return args


# ------------------------------------------------------------------------------------------- students


def test_kept_layers_are_evenly_spaced_with_first_and_last():
    from llmkit.training.students import kept_layers

    assert kept_layers(6, 3) == [0, 2, 5]  # the layers the no-KD baseline keeps
    assert kept_layers(12, 6) == [0, 2, 4, 7, 9, 11]
    picked = kept_layers(30, 15)
    assert picked[0] == 0 and picked[-1] == 29 and len(set(picked)) == 15 and picked == sorted(picked)
    assert kept_layers(4, 1) == [0]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_layer_extraction_copies_exactly_the_kept_layers(teachers, arch):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from llmkit.training.students import layer_stack, student_from_layers

    auto = AutoModelForSequenceClassification if arch == "bert" else AutoModelForCausalLM
    teacher = auto.from_pretrained(teachers[arch])
    student, kept = student_from_layers(teacher, 2)
    assert kept == [0, 3]
    assert student.config.num_hidden_layers == 2
    t_name, t_layers = layer_stack(teacher)
    s_name, s_layers = layer_stack(student)
    assert t_name == s_name and len(s_layers) == 2
    for s_idx, t_idx in enumerate(kept):
        for (n1, p1), (n2, p2) in zip(s_layers[s_idx].state_dict().items(), t_layers[t_idx].state_dict().items(), strict=True):
            assert n1 == n2 and torch.equal(p1, p2), n1
    t_state = teacher.state_dict()
    for name, value in student.state_dict().items():  # everything outside the layer stack is the teacher's
        if not name.startswith(s_name + "."):
            assert torch.equal(value, t_state[name]), name
    # a dropped middle layer is really gone: the student differs from the teacher
    ids = torch.tensor([[5, 6, 7, 8]])
    teacher.eval(), student.eval()
    with torch.no_grad():
        assert not torch.allclose(teacher(ids).logits, student(ids).logits)


def test_importance_drops_the_layer_that_changes_nothing(teachers):
    """A layer whose attention and MLP outputs are zeroed passes its input through: block influence 0, dropped first;
    the next removal is chosen by re-measuring the three that remain."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmkit.data.examples import Collator, ExampleSet
    from llmkit.training.students import choose_layers, layer_importance, student_from_layers

    teacher = AutoModelForCausalLM.from_pretrained(teachers["llama"]).eval()
    with torch.no_grad():
        teacher.model.layers[2].self_attn.o_proj.weight.zero_()
        teacher.model.layers[2].mlp.down_proj.weight.zero_()
    ids = torch.randint(5, 100, (2, 12))
    scores = layer_importance(teacher, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    assert len(scores) == 4 and scores[2] < 1e-6 and min(scores[i] for i in (0, 1, 3)) > 1e-4
    rows = ExampleSet([list(r) for r in ids.tolist()])
    assert choose_layers(teacher, rows, Collator(0, True), 3, 32, "cpu") == [0, 1, 3]
    two = choose_layers(teacher, rows, Collator(0, True), 2, 32, "cpu")
    left = student_from_layers(teacher, 3, [0, 1, 3])[0].eval()
    again = layer_importance(left, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    assert two == [k for j, k in enumerate([0, 1, 3]) if j != min(range(3), key=again.__getitem__)]
    # the hooks see what output_hidden_states reports (GPT-2: hidden_states[i] -> [i + 1], before the final norm)
    gpt2 = AutoModelForCausalLM.from_pretrained(teachers["gpt2"]).eval()
    got = layer_importance(gpt2, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    with torch.no_grad():
        hs = gpt2(ids, output_hidden_states=True).hidden_states
    for i in range(3):
        expect = float((1 - torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1)).mean())
        assert got[i] == pytest.approx(expect, rel=1e-4)


def test_layer_extraction_takes_any_block_list(teachers):
    """GPT-NeoX was refused when the stacks were a table of names; the block list is now found from the config."""
    from transformers import AutoModelForCausalLM

    from llmkit.training.students import layer_stack, student_from_layers

    student, kept = student_from_layers(AutoModelForCausalLM.from_pretrained(teachers["neox"]), 1)
    assert kept == [0] and student.config.num_hidden_layers == 1 and layer_stack(student)[0] == "gpt_neox.layers"


def test_resume_compares_the_resolved_selection(tmp_path):
    from llmkit.config import DistillConfig
    from llmkit.distill import Distill
    from llmkit.errors import UsageError

    (tmp_path / "llmkit.json").write_text(json.dumps({"llmkit": {}, "student": {"layer_selection": "even"}}))
    objective = Distill(DistillConfig(task="seq-cls"))
    objective.selection = "even"  # what `auto` resolves to for a classifier: the recorded run matches
    objective.check_resumed_selection(tmp_path)
    objective.selection = "importance"
    with pytest.raises(UsageError, match="resume with --layer-selection even"):
        objective.check_resumed_selection(tmp_path)


# ------------------------------------------------------------------------------------------------ loss


def test_kd_loss_is_zero_for_identical_logits_and_matches_a_hand_computation():
    import torch

    from llmkit.training.losses import kd_loss, kd_loss_topk

    torch.manual_seed(0)
    t = torch.randn(2, 3, 7)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert float(kd_loss(t, t, mask, 2.0)) == pytest.approx(0.0, abs=1e-6)

    s = torch.randn(2, 3, 7)
    s[0, 2] = 1e4  # a padding position with absurd logits: masked out, it must not count
    T = 3.0
    expected = []
    for b, p in [(0, 0), (0, 1), (1, 0)]:
        pt = [math.exp(x / T) for x in t[b, p].tolist()]
        ps = [math.exp(x / T) for x in s[b, p].tolist()]
        pt = [x / sum(pt) for x in pt]
        ps = [x / sum(ps) for x in ps]
        expected.append(sum(a * math.log(a / c) for a, c in zip(pt, ps, strict=True)))
    want = T * T * sum(expected) / 3
    assert float(kd_loss(s, t, mask, T)) == pytest.approx(want, rel=1e-5)
    # the cached top-k form equals the full one when k is the whole vocabulary
    top = t.topk(7, dim=-1)
    assert float(kd_loss_topk(s, top.values, top.indices, mask, T)) == pytest.approx(want, rel=1e-5)
    # and with fewer tokens it stays a proper (non-negative) divergence
    top3 = t.topk(3, dim=-1)
    assert float(kd_loss_topk(s, top3.values, top3.indices, mask, T)) >= 0


# ---------------------------------------------------------------------------------------------- end to end


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_distill_causal_lm_end_to_end(cli, teachers, toy_data, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "student"
    code, _, err = cli(*_flags(teachers["gpt2"], out, toy_data / "train.txt", eval_data=toy_data / "eval.txt", student_layers="2",
                               alpha="1.0", temperature="2.0", max_steps="24", lr="3e-3", batch_size="4", block_size="16",
                               layer_selection="even"),
                       "--set", "train.log_every=4")
    assert code == 0, err
    kl = [r["kd_loss"] for r in _metrics(out) if "kd_loss" in r]
    assert len(kl) == 6 and kl[-1] < 0.5 * kl[0], kl  # the student moves toward the teacher

    report = json.loads((out / "distill_report.json").read_text())
    t, s = report["teacher"], report["student"]
    assert (t["layers"], s["layers"]) == (4, 2) and s["kept_layers"] == [0, 3]
    assert s["parameters"] < t["parameters"] and s["size_bytes"] < t["size_bytes"]
    assert report["ratios"]["parameters"] == pytest.approx(s["parameters"] / t["parameters"], abs=1e-4)
    assert s["disk_bytes"] == (out / "model.safetensors").stat().st_size
    assert t["generation_tokens_per_s"] > 0 and s["generation_tokens_per_s"] > 0
    assert report["ratios"]["perplexity"] == pytest.approx(s["metrics"]["perplexity"] / t["metrics"]["perplexity"], rel=1e-3)

    # a plain transformers folder; llmkit evaluate agrees with the report
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.n_layer == 2 and student.config.use_cache
    code, stdout, err = cli("evaluate", "--model", out, "--data", toy_data / "eval.txt", "--block-size", "16", "--json")
    assert code == 0, err
    assert json.loads(stdout)["perplexity"] == pytest.approx(s["metrics"]["perplexity"], rel=1e-4)
    assert "Teacher and student" in (out / "README.md").read_text()
    assert (out / "loss.png").exists()
    assert json.loads((out / "llmkit.json").read_text())["llmkit"]["status"] == "done"
    with torch.no_grad():
        assert torch.isfinite(student(torch.tensor([[1, 2, 3]])).logits).all()


def test_distill_llama_with_hidden_state_loss(cli, teachers, toy_data, tmp_path):
    out = tmp_path / "student"
    code, _, err = cli(*_flags(teachers["llama"], out, toy_data / "train.txt", student_layers="2", hidden_weight="1.0",
                               max_steps="4", block_size="16", batch_size="4"), "--set", "train.log_every=2")
    assert code == 0, err
    rows = [r for r in _metrics(out) if "hidden_loss" in r]
    assert rows and all(0 <= r["hidden_loss"] <= 2 for r in rows)
    # the default selection (auto) is recorded as what it resolved to: importance for a causal LM
    assert json.loads((out / "llmkit.json").read_text())["student"]["layer_selection"] == "importance"


def test_distill_seq_cls_with_teacher_cache(cli, teachers, toy_data, tmp_path):
    cache = tmp_path / "cache"
    args = _flags(teachers["bert"], tmp_path / "a", toy_data / "train.csv", eval_data=toy_data / "eval.csv", task="seq-cls",
                  student_layers="2", max_steps="6", batch_size="8", cache_top_k="5")
    code, _, err = cli(*args, "--set", f"distill.cache_dir={cache}")
    assert code == 0, err
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    report = json.loads((tmp_path / "a" / "distill_report.json").read_text())
    assert report["student"]["metrics"]["accuracy"] >= 0 and report["teacher"]["inference_samples_per_s"] > 0
    assert report["settings"]["cache_top_k"] == 5
    # a classifier's default selection (auto) is even: first and last layer kept (issue 27), and llmkit.json says so
    assert report["student"]["kept_layers"] == [0, 3]
    assert json.loads((tmp_path / "a" / "llmkit.json").read_text())["student"]["layer_selection"] == "even"

    # a second student on the same teacher and data reuses the cache instead of running the teacher again
    args[args.index(tmp_path / "a")] = tmp_path / "b"
    code, _, err = cli(*args, "--set", f"distill.cache_dir={cache}", "--set", "train.lr=1e-4")
    assert code == 0, err
    assert [f.stat().st_mtime_ns for f in cache.glob("*.safetensors")] == [stamp]
    from transformers import AutoModelForSequenceClassification

    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "b")
    assert student.config.id2label == {0: "neg", 1: "pos"} and student.config.num_hidden_layers == 2


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def other_vocab_config(tmp_path) -> Path:
    from transformers import GPT2Config

    GPT2Config(vocab_size=1000, n_positions=64, n_embd=16, n_layer=1, n_head=2).save_pretrained(tmp_path / "small")
    return tmp_path / "small"


@pytest.mark.parametrize("case", ["vocab", "too_many_layers", "zero_layers", "temperature", "alpha", "selection", "both_students",
                                  "untrained_classifier"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(cli, teachers, toy_data, tmp_path, other_vocab_config, tiny_bert, case):
    out = tmp_path / "out"
    teacher, extra, expect = teachers["gpt2"], {}, ""
    if case == "vocab":
        extra, expect = {"student_config": other_vocab_config}, "vocabulary mismatch"
    elif case == "too_many_layers":
        extra, expect = {"student_layers": "4"}, "between 1 and 3"
    elif case == "zero_layers":
        extra, expect = {"student_layers": "0"}, "--student-layers must be >= 1"
    elif case == "temperature":
        extra, expect = {"temperature": "0"}, "--temperature must be > 0"
    elif case == "alpha":
        extra, expect = {"alpha": "1.5"}, "--alpha must be in [0, 1]"
    elif case == "selection":
        extra, expect = {"layer_selection": "best"}, "--layer-selection 'best' is not one of auto, importance, even"
    elif case == "both_students":
        extra, expect = {"student_layers": "2", "student_config": other_vocab_config}, "exclude each other"
    elif case == "untrained_classifier":
        teacher, extra, expect = tiny_bert, {"task": "seq-cls"}, "not a trained classifier"
    data = toy_data / ("train.csv" if case == "untrained_classifier" else "train.txt")
    code, _, err = cli(*_flags(teacher, out, data, block_size="16", max_steps="2", **extra))
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and expect in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()


def test_every_flag_is_a_recipe_key_and_recipes_load():
    from llmkit.commands.distill import FLAG_KEYS
    from llmkit.config import DistillConfig, keys, load_recipe

    assert set(FLAG_KEYS.values()) <= set(keys(DistillConfig()))
    recipes = sorted((Path(__file__).parent.parent / "recipes").glob("distill-*.yaml"))
    assert len(recipes) >= 3
    for recipe in recipes:
        cfg = load_recipe(recipe, ["out=runs/x"], cls=DistillConfig)
        cfg.validate()
        assert recipe.read_text().startswith("#") and "llmkit distill --recipe recipes/" + recipe.name in recipe.read_text()


# ---------------------------------------------------------------------------------------- the chunked loss


class _NoAutocast:
    def autocast(self):
        import contextlib

        return contextlib.nullcontext()


CHUNKED_CASES = [("Llama 3", "cache", False, {}), ("Llama 3", "cache", True, {}), ("Llama 3", "live", False, {}),
                 ("Llama 3", "live", True, {}), ("Gemma 3", "cache", False, {"final_logit_softcapping": 3.0})]


@pytest.mark.parametrize(("name", "teacher_side", "lora", "extra"), CHUNKED_CASES,
                         ids=[f"{n}-{t}-{'lora' if lora else 'full'}{'-softcap' if e else ''}" for n, t, lora, e in CHUNKED_CASES])
def test_chunked_distill_loss_equals_the_plain_one(name, teacher_side, lora, extra, tmp_path, monkeypatch):
    """DistillLoss with `chunked` (no tokens x vocabulary logits): the same loss, logged parts and gradients (1e-5) as
    the plain path, with ignore-index labels, padding, T = 2.5, alpha = 0.3, over several chunks (some partly ignored);
    against the top-k cache and (with the hidden cosine loss) the live teacher."""
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM

    from llmkit.config import KDConfig
    from llmkit.distill import DistillLoss, TeacherCache
    from llmkit.training import chunked_loss
    from llmkit.training.chunked_loss import supports_chunked_loss
    from tests.families import FAMILIES, build

    monkeypatch.setattr(chunked_loss, "CHUNK_ELEMENTS", 7 * 400)  # 7 rows a chunk: several chunks
    fam = FAMILIES[name]
    fam = dataclasses.replace(fam, extra={**fam.extra, **extra})
    folder = build(fam, tmp_path, layers=2)
    teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a teacher that disagrees with the student
    student = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(student, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
        for p in student.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.02)  # B starts at zero: make every LoRA weight matter
    student.train()
    assert supports_chunked_loss(student)
    vocab = teacher.config.vocab_size

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (3, 20), generator=g)
    labels = ids.clone()
    labels[0, :8] = -100  # a prompt that is not learned
    labels[2, -5:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, -5:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "index": torch.tensor([2, 0, 1])}
    kd = KDConfig(temperature=2.5, alpha=0.3, hidden_weight=0.7 if teacher_side == "live" else 0.0)
    cache = None
    if teacher_side == "cache":
        with torch.no_grad():
            top = teacher(input_ids=ids, attention_mask=mask).logits.topk(6, dim=-1)
        order = torch.tensor([1, 2, 0])  # the cache is in example order; the batch's rows are examples 2, 0, 1
        cache = TeacherCache(top.values.half()[order], top.indices.int()[order])

    results = {}
    for chunked in (False, True):
        loss_fn = DistillLoss("causal-lm", kd, _NoAutocast(), teacher=teacher if cache is None else None, cache=cache,
                              align=[0, 1], chunked=chunked)
        student.zero_grad()
        loss = loss_fn(student, dict(batch))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        results[chunked] = loss.detach(), {k: float(v) for k, v in loss_fn.log_extra().items()}, grads
    (want, want_parts, want_grads), (got, got_parts, got_grads) = results[False], results[True]
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got.item(), want.item())
    assert got_parts.keys() == want_parts.keys() >= {"ce_loss", "kd_loss"}
    assert ("hidden_loss" in got_parts) == (teacher_side == "live")
    for k in want_parts:
        assert got_parts[k] == pytest.approx(want_parts[k], abs=1e-5, rel=1e-5), k
    assert got_grads.keys() == want_grads.keys() and len(got_grads) > 2
    head = (student.get_base_model() if lora else student).get_output_embeddings().weight
    assert (head.grad is not None) != lora  # the head trained (full, tied to the embeddings in Gemma) or frozen (LoRA)
    for n in want_grads:
        assert torch.allclose(got_grads[n], want_grads[n], atol=1e-5, rtol=1e-4), (n, (got_grads[n] - want_grads[n]).abs().max().item())


def test_distill_with_the_cache_trains_the_same_chunked(cli, teachers, toy_data, tmp_path, monkeypatch):
    """End to end with distill.cache_top_k: train.chunked_loss (on by default) takes the chunked path, every step, and
    the run logs the same losses as with the plain path (--set train.chunked_loss=false)."""
    from llmkit.distill import DistillLoss

    calls = []
    real = DistillLoss.chunked_loss
    monkeypatch.setattr(DistillLoss, "chunked_loss", lambda self, *a: calls.append(1) or real(self, *a))
    cache = tmp_path / "cache"
    logged = {}
    for on in ("true", "false"):
        out = tmp_path / on
        code, _, err = cli(*_flags(teachers["llama"], out, toy_data / "train.txt", student_layers="2", alpha="0.4", temperature="2.0",
                                   max_steps="4", block_size="16", batch_size="4", cache_top_k="8", layer_selection="even"),
                           "--set", "train.log_every=1", "--set", f"distill.cache_dir={cache}", "--set", f"train.chunked_loss={on}")
        assert code == 0, err
        logged[on] = [(r["loss"], r["ce_loss"], r["kd_loss"]) for r in _metrics(out) if "kd_loss" in r]
        if on == "true":
            assert len(calls) == 4  # the chunked path, each of the 4 steps; none in the plain run
    assert len(calls) == 4 and len(logged["true"]) == len(logged["false"]) == 4
    assert len(list(cache.glob("*.safetensors"))) == 1  # the second run read the first one's cache
    for a, b in zip(logged["true"], logged["false"], strict=True):
        assert a == pytest.approx(b, abs=1e-4), (a, b)
    assert logged["true"][0][2] > 0
