"""Preference tuning: the losses against plain formulas, response masks per template, the pair formats and their
errors, step 0 at ln 2, the reference cache, resume, and a tiny model that learns the preferences."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from llmkit.data.formats import Conversation
from llmkit.data.pairs import Pair, encode_pairs, pair
from llmkit.errors import UsageError
from tests.test_chat import TEMPLATES, _runs, _tokenizer

# ------------------------------------------------------------------------------------------ the losses


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# hand-made (policy chosen, policy rejected, ref chosen, ref rejected, |chosen|, |rejected|)
PAIRS = [(-12.0, -15.5, -13.0, -14.0, 4, 6), (-3.2, -2.9, -3.0, -3.1, 2, 3), (-40.0, -41.0, -39.5, -42.5, 9, 7)]


def _plain(objective: str, beta: float, gamma: float, pc: float, pr: float, rc: float, rr: float, nc: int, nr: int) -> float:
    """The papers' formulas, written out per pair with math only."""
    if objective == "dpo":
        return -math.log(_sigmoid(beta * ((pc - rc) - (pr - rr))))
    if objective == "ipo":
        return ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
    if objective == "simpo":
        return -math.log(_sigmoid(beta * (pc / nc - pr / nr) - gamma))
    odds = lambda avg: math.exp(avg) / (1 - math.exp(avg))  # noqa: E731
    return -beta * math.log(_sigmoid(math.log(odds(pc / nc)) - math.log(odds(pr / nr))))  # orpo, without its NLL term


@pytest.mark.parametrize("objective", ["dpo", "ipo", "simpo", "orpo"])
def test_losses_equal_the_plain_formulas(objective):
    import torch

    from llmkit.training.preference import PreferenceLoss, preference_losses

    beta, gamma = 0.3, 0.4
    cols = [torch.tensor(c, dtype=torch.float64) for c in zip(*PAIRS, strict=True)]
    losses, _, _ = preference_losses(objective, beta, cols[0], cols[1], cols[4], cols[5], cols[2], cols[3], gamma)
    expected = [_plain(objective, beta, gamma, *p) for p in PAIRS]
    assert losses.tolist() == pytest.approx(expected, rel=1e-9)

    # the whole loss of a batch: the mean, plus the chosen tokens' mean NLL for ORPO and for --sft-weight (RPO)
    class Scored(PreferenceLoss):  # log-probs given, not computed by a model
        def terms(self, model, batch):
            import llmkit.training.preference as pref

            real = pref.sequence_logps
            pref.sequence_logps = lambda m, b, sparse: (torch.cat([cols[0], cols[1]]), torch.cat([cols[4], cols[5]]))
            try:
                return super().terms(model, batch)
            finally:
                pref.sequence_logps = real

    batch = {"reference": torch.stack([cols[2], cols[3]], 1)}
    nll = -sum(p[0] for p in PAIRS) / sum(p[4] for p in PAIRS)
    loss, metrics = Scored(objective, beta, sft_weight=0.5, simpo_gamma=gamma).terms(None, batch)
    extra = nll if objective == "orpo" else 0.0
    assert float(loss) == pytest.approx(sum(expected) / len(expected) + extra + 0.5 * nll, rel=1e-9)
    if objective == "dpo":
        assert metrics["rewards/chosen"].tolist() == pytest.approx([beta * (p[0] - p[2]) for p in PAIRS])
        assert metrics["rewards/accuracy"].tolist() == [float((p[0] - p[2]) > (p[1] - p[3])) for p in PAIRS]


# ------------------------------------------------------------------------------------------ data


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_response_masks_are_exactly_the_response_and_its_end_of_turn(name):
    from llmkit.data.chat import ChatEncoder

    tok = _tokenizer(name)
    enc = ChatEncoder(tok, TEMPLATES[name][0])
    eot = TEMPLATES[name][3]
    # a conversational prompt with an earlier assistant turn: that turn is context, not response
    p = pair({"prompt": [{"role": "user", "content": "Once upon a time?"}, {"role": "assistant", "content": "there was a fox."},
                         {"role": "user", "content": "And then?"}],
              "chosen": [{"role": "assistant", "content": "The quick brown fox jumps."}],
              "rejected": [{"role": "assistant", "content": "To be, or not to be."}]}, "pairs.jsonl:line 1")
    out, kept, identical = encode_pairs(enc, [p], ["pairs.jsonl:line 1"], 512)
    assert kept == [0] and identical == []
    for ids_col, labels_col, reply in (("input_ids", "labels", "The quick brown fox jumps."),
                                       ("rejected_ids", "rejected_labels", "To be, or not to be.")):
        ids, labels = out[ids_col][0], out[labels_col][0]
        (run,) = _runs(labels)  # one run of learned tokens: the response
        assert tok.decode(run) == reply + eot
        # and it is the end of the rendering of prompt + response, tokenized once (the chat SFT encoding)
        full, _ = enc.encode(Conversation([*p.prompt, {"role": "assistant", "content": reply}], "x", 3))
        assert ids == full


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_pair_shapes():
    strings = pair({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, "w")
    assert strings == Pair([{"role": "user", "content": "2+2?"}], [{"role": "assistant", "content": "4"}],
                           [{"role": "assistant", "content": "5"}])
    user = {"role": "user", "content": "2+2?"}
    conversational = pair({"prompt": [user], "chosen": [{"role": "assistant", "content": "4"}],
                           "rejected": [{"role": "assistant", "content": "5"}]}, "w")
    implicit = pair({"chosen": [user, {"role": "assistant", "content": "4"}], "rejected": [user, {"role": "assistant", "content": "5"}]}, "w")
    assert strings == conversational == implicit


@pytest.mark.parametrize("row, message", [
    ({"prompt": "hi", "chosen": "a"}, "no 'rejected'"),
    ({"prompt": "hi", "rejected": "a"}, "no 'chosen'"),
    ({"chosen": "a", "rejected": "b"}, "no 'prompt'"),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]}, "share no first message"),
    ({"prompt": "hi", "chosen": "", "rejected": "b"}, "empty content"),
    ({"prompt": "hi", "chosen": 5, "rejected": "b"}, "must be text or a list of messages"),
])
def test_bad_pairs_are_one_line_errors(row, message):
    with pytest.raises(UsageError, match=message):
        pair(row, "pairs.jsonl:line 3")


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("prefs")
    qa = [("What colour is the sky?", "blue", "green"), ("What do cows drink?", "water", "oil"), ("Say hello.", "hello world", "go away"),
          ("Which animal jumps?", "the quick brown fox", "the lazy dog")]
    _write(d / "train.jsonl", [{"prompt": q, "chosen": c, "rejected": r} for q, c, r in qa * 8])
    _write(d / "eval.jsonl", [{"chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": c}],
                               "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]} for q, c, r in qa])
    return d


def _dpo(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--objective", "dpo", "--model", str(model), "--data", str(data), "--out", str(out), "--mixed-precision", "no",
            "--batch-size", "8", *extra]


def test_bad_preference_input_is_one_line_and_writes_nothing(tiny_llama, tiny_bert, prefs, toy_data, tmp_path, cli):
    out = tmp_path / "run"
    same = _write(tmp_path / "same.jsonl", [{"prompt": "hi", "chosen": "a", "rejected": "a"}] * 3)
    missing = _write(tmp_path / "missing.jsonl", [{"prompt": "hi", "chosen": "a", "rejected": "b"}, {"prompt": "hi", "chosen": "a"}])
    cases = [
        (_dpo(tiny_llama, missing, out), "missing.jsonl:line 2: no 'rejected'"),
        (_dpo(tiny_llama, same, out), "every pair's chosen response is identical"),
        (_dpo(tiny_bert, toy_data / "train.csv", out, "--task", "seq-cls"), "--task seq-cls is not for --objective dpo"),
        (_dpo(tiny_llama, toy_data / "train.txt", out), "--objective dpo needs preference pairs"),
        (["finetune", "--model", str(tiny_llama), "--data", str(prefs / "train.jsonl"), "--out", str(out)], "--objective dpo"),
        (_dpo(tiny_llama, prefs / "train.jsonl", out, "--packing"), "--packing is not for --objective dpo"),
        (_dpo(tiny_llama, prefs / "train.jsonl", out, "--beta", "0"), "--beta must be > 0"),
        (["finetune", "--model", str(tiny_llama), "--data", str(toy_data / "train.txt"), "--out", str(out), "--beta", "0.2"],
         "--beta is for preference objectives"),
    ]
    for args, message in cases:
        code, _, err = cli(*args)
        assert code == 2, (args, err)
        assert message in err and "Traceback" not in err
        assert not out.exists()


def test_identical_pairs_and_prompts_that_fill_the_block_are_dropped_and_counted(tiny_llama, tmp_path, cli):
    rows = ([{"prompt": "hi", "chosen": "a", "rejected": "a"}] + [{"prompt": "word " * 80, "chosen": "x", "rejected": "y"}]
            + [{"prompt": "hi", "chosen": "hello world", "rejected": "go away"}] * 4)
    code, _, err = cli(*_dpo(tiny_llama, _write(tmp_path / "p.jsonl", rows), tmp_path / "run", "--block-size", "32", "--max-steps", "1"))
    assert code == 0, err
    assert "dropped 1 of 6 pairs of" in err and "identical" in err
    assert "dropped 1 of 6 rows of" in err and "cut off entirely by --block-size 32" in err
    record = json.loads((tmp_path / "run" / "llmkit.json").read_text())
    assert record["examples"]["train"] == 4


# ------------------------------------------------------------------------------------------ training


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_step_zero_has_loss_ln2_and_rewards_zero(method, tiny_llama, prefs, tmp_path, cli):
    # one step whose loss is measured before any update: the policy is the reference
    out = tmp_path / "run"
    code, _, err = cli(*_dpo(tiny_llama, prefs / "train.jsonl", out, "--method", method, "--max-steps", "1", "--set", "train.log_every=1"))
    assert code == 0, err
    (first,) = [r for r in _metrics(out) if "loss" in r]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first[name] == pytest.approx(0, abs=1e-5)


def test_reference_cache_is_reused_and_invalidated(tiny_llama, prefs, tmp_path, cli):
    args = ("--max-steps", "2", "--max-train-samples", "16")
    code, _, err = cli(*_dpo(tiny_llama, prefs / "train.jsonl", tmp_path / "a", *args))
    assert code == 0 and "reference log-probs of the training pairs" in err and "(computing once)" in err
    code, _, err = cli(*_dpo(tiny_llama, prefs / "train.jsonl", tmp_path / "b", *args))
    assert code == 0 and "(found)" in err and "(computing once)" not in err
    # what they depend on: the pairs (fewer rows), and the starting weights (another model)
    code, _, err = cli(*_dpo(tiny_llama, prefs / "train.jsonl", tmp_path / "c", "--max-steps", "2", "--max-train-samples", "8"))
    assert code == 0 and "(computing once)" in err
    code, _, err = cli(*_dpo(tmp_path / "a", prefs / "train.jsonl", tmp_path / "d", *args))
    assert code == 0 and "(computing once)" in err


def test_resume_after_a_kill_is_bit_identical(tiny_llama, prefs, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import llmkit.training.checkpoints as checkpoints
    from llmkit.config import load_recipe
    from llmkit.finetune import finetune

    def cfg(out: Path, resume: bool = False):
        c = load_recipe(None, [], {"model.name": str(tiny_llama), "data.train": str(prefs / "train.jsonl"), "out": str(out),
                                   "objective": "dpo", "train.batch_size": 4, "train.max_steps": 6, "train.save_every": 2,
                                   "train.lr": 1e-3, "train.mixed_precision": "no", "quiet": True, "train.log_every": 1})
        c.resume = resume
        return c

    finetune(cfg(tmp_path / "a"))
    real_save = checkpoints.save_checkpoint

    def save_then_die(accelerator, root, state, *args, **kwargs):
        path = real_save(accelerator, root, state, *args, **kwargs)
        if state.step == 4:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg(tmp_path / "b"))
    monkeypatch.setattr(checkpoints, "save_checkpoint", real_save)
    finetune(cfg(tmp_path / "b", resume=True))
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    for k in a:
        assert (a[k] == b[k]).all(), k
    assert [r["loss"] for r in _metrics(tmp_path / "a") if "loss" in r] == [r["loss"] for r in _metrics(tmp_path / "b") if "loss" in r]


@pytest.fixture(scope="module")
def dpo_run(tiny_llama, prefs, tmp_path_factory) -> Path:
    from llmkit.cli import main

    out = tmp_path_factory.mktemp("runs") / "dpo"
    with pytest.raises(SystemExit) as e:
        main(_dpo(tiny_llama, prefs / "train.jsonl", out, "--eval-data", str(prefs / "eval.jsonl"), "--method", "lora",
                  "--max-steps", "24", "--lr", "2e-2", "--quiet", "--set", "train.log_every=4"))
    assert e.value.code == 0
    return out


def test_dpo_learns_the_preferences_and_reports_them(dpo_run, prefs, tiny_llama, cli):
    rows = _metrics(dpo_run)
    logged = [r for r in rows if "loss" in r]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy", "logps/chosen", "logps/rejected"):
        assert name in logged[-1] and f"eval_{name}" in rows[-1]
    assert logged[-1]["loss"] < logged[0]["loss"] - 0.05 and logged[-1]["rewards/margins"] > 0
    assert (dpo_run / "loss.png").exists() and (dpo_run / "adapter_model.safetensors").exists()

    code, out, err = cli("evaluate", "--model", dpo_run, "--data", prefs / "eval.jsonl", "--json", "--quiet")
    assert code == 0, err
    result = json.loads(out)
    assert result["task"] == "preference" and result["pairs"] == 4
    assert result["preference_accuracy"] > 0.9  # the reference: the adapter's base, the adapter off
    assert result["reference"] == str(tiny_llama)
    # the starting model, against itself, prefers nothing
    code, out, _ = cli("evaluate", "--model", tiny_llama, "--data", prefs / "eval.jsonl", "--json", "--quiet", "--reference", tiny_llama)
    assert json.loads(out)["preference_accuracy"] == 0.0


def test_dpo_output_is_a_chat_model(dpo_run):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dpo_run)
    model = AutoPeftModelForCausalLM.from_pretrained(dpo_run)
    text = tok.apply_chat_template([{"role": "user", "content": "What colour is the sky?"}], add_generation_prompt=True, tokenize=False)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert tok.chat_template and json.loads((dpo_run / "llmkit.json").read_text())["objective"] == "dpo"


# ------------------------------------------------------------------------------------------ the reference, per batch


@pytest.fixture(scope="module")
def many_prefs(tmp_path_factory) -> Path:
    words = "red blue green sky sea fox dog cat sun moon tree leaf".split()
    rows = [{"prompt": f"Say {words[i % 12]} {i}.", "chosen": f"{words[i % 12]} {words[(i * 5) % 12]}" + " yes" * (i % 4),
             "rejected": f"{words[(i + 3) % 12]} no" + " no" * (i % 3)} for i in range(200)]
    return _write(tmp_path_factory.mktemp("many") / "pairs.jsonl", rows)


def _cached_rows(cache: Path) -> dict[int, list[float]]:
    from safetensors.torch import load_file

    (folder,) = [d for d in cache.iterdir() if d.is_dir()]  # one reference key
    rows = {}
    for f in folder.glob("rows-*.safetensors"):
        t = load_file(str(f))
        rows.update(zip(t["index"].tolist(), t["logps"].tolist(), strict=True))
    return rows


@pytest.mark.parametrize("method", ["lora", "full"])
def test_reference_covers_only_the_rows_drawn_and_equals_the_up_front_pass(method, tiny_llama, many_prefs, tmp_path, cli, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    import llmkit.training.reference as reference
    from llmkit.data.examples import IndexedExamples
    from llmkit.training.preference import PreferenceCollator, pair_logps

    drawn, seen = [], {}
    real_call, real_init = reference.BatchReference.__call__, IndexedExamples.__init__
    monkeypatch.setattr(reference.BatchReference, "__call__", lambda self, batch: drawn.extend(batch["index"].tolist()) or real_call(self, batch))
    monkeypatch.setattr(IndexedExamples, "__init__", lambda self, examples: seen.setdefault("train", examples) and real_init(self, examples))
    cache = tmp_path / "cache"
    code, _, err = cli(*_dpo(tiny_llama, many_prefs, tmp_path / "run", "--method", method, "--max-steps", "2", "--batch-size", "2",
                             "--set", f"preference.cache_dir={cache}"))
    assert code == 0, err
    rows = _cached_rows(cache)
    assert sorted(rows) == sorted(set(drawn)) and len(drawn) == 4  # 2 steps x 2 pairs of 200: only those were computed
    assert "(computing once) for 4 of the 4 pairs the run draws" in err

    # the old way: every pair, before training, with the model as built, in batches of 8 in data order
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    up_front = pair_logps(model, seen["train"], PreferenceCollator(0), batch_size=8)
    assert len(up_front) == 200
    for i, values in rows.items():
        assert values == pytest.approx(up_front[i].tolist(), abs=1e-5)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_reuses_the_cached_reference_rows(method, tiny_llama, many_prefs, tmp_path, monkeypatch):
    import llmkit.training.checkpoints as checkpoints
    import llmkit.training.reference as reference
    from llmkit.config import load_recipe
    from llmkit.finetune import finetune

    def cfg(resume: bool = False):
        c = load_recipe(None, [], {"model.name": str(tiny_llama), "data.train": str(many_prefs), "out": str(tmp_path / "run"),
                                   "objective": "dpo", "method": method, "train.batch_size": 2, "train.max_steps": 4,
                                   "train.save_every": 2, "train.mixed_precision": "no", "quiet": True,
                                   "preference.cache_dir": str(tmp_path / "cache")})
        c.resume = resume
        return c

    computed: list[list[int]] = [[]]
    real_add = reference.ReferenceCache.add
    monkeypatch.setattr(reference.ReferenceCache, "add", lambda self, index, logps: computed[-1].extend(index) or real_add(self, index, logps))
    real_save = checkpoints.save_checkpoint

    def save_then_die(accelerator, root, state, *args, **kwargs):
        path = real_save(accelerator, root, state, *args, **kwargs)
        if state.step == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg())
    monkeypatch.setattr(checkpoints, "save_checkpoint", real_save)
    computed.append([])
    finetune(cfg(resume=True))
    first, resumed = computed
    # the killed run's rows were on disk: the resumed run computes none of them again, only the rows still to draw
    # (a full fine-tune computed every row it would draw before step 1; LoRA the first two steps' rows)
    assert not set(first) & set(resumed)
    assert sorted(set(first) | set(resumed)) == sorted(_cached_rows(tmp_path / "cache")) and len(_cached_rows(tmp_path / "cache")) == 8
    assert len(resumed) == (0 if method == "full" else 4)
