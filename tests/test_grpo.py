"""`--objective grpo`: the formulas on hand-made numbers, rewards, bad input, seeded rollouts, resume, learning a toy reward."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

# ------------------------------------------------------------------------------------------ formulas


def test_group_advantages_match_the_plain_formula():
    import torch

    from llmkit.training.grpo import group_advantages

    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of 4; the second carries no signal
    adv, std = group_advantages(r, 4, "group")
    g1 = [1, 0, 0, 1]
    m, s = 0.5, math.sqrt(sum((x - 0.5) ** 2 for x in g1) / 3)  # unbiased std
    assert adv[:4].tolist() == pytest.approx([(x - m) / (s + 1e-4) for x in g1], rel=1e-6)
    assert adv[4:].tolist() == [0.0] * 4
    assert std.tolist() == pytest.approx([s, 0.0])
    adv_none, _ = group_advantages(r, 4, "none")
    assert adv_none.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    adv_batch, _ = group_advantages(r, 4, "batch")
    assert adv_batch.tolist() == pytest.approx((adv_none / (r.std() + 1e-4)).tolist(), rel=1e-6)


def _hand_batch():
    import torch

    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.3, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the second completion has 2 tokens
    adv = torch.tensor([1.5, -0.5])
    return logps, mask, adv


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_each_loss_aggregation_matches_its_formula(loss_type):
    from llmkit.training.grpo import policy_loss

    logps, mask, adv = _hand_batch()
    loss, stats = policy_loss(logps, logps.detach(), adv, mask, loss_type, 0.2, max_new_tokens=4)
    # ratio 1: every token's loss is -A; completion 1 has 3 tokens of -1.5, completion 2 has 2 tokens of +0.5
    expected = {"grpo": ((-1.5 * 3) / 3 + (0.5 * 2) / 2) / 2,  # per-sequence mean, then mean
                "dr_grpo": (-1.5 * 3 + 0.5 * 2) / (2 * 4),  # sum / (completions x max_new_tokens)
                "dapo": (-1.5 * 3 + 0.5 * 2) / 5}[loss_type]  # token mean over the batch
    assert float(loss) == pytest.approx(expected)
    assert float(stats["clip_fraction"]) == 0.0
    assert "kl" not in stats


def test_the_clip_takes_the_gradient_away_outside_the_trust_region():
    import torch

    from llmkit.training.grpo import policy_loss

    old = torch.zeros(1, 2)
    logps = torch.tensor([[math.log(1.5), math.log(0.9)]], requires_grad=True)  # ratios 1.5 (clipped at 1.2) and 0.9
    loss, stats = policy_loss(logps, old, torch.tensor([1.0]), torch.ones(1, 2), "dapo", 0.2, 2)
    assert float(loss.detach()) == pytest.approx(-(1.2 + 0.9) / 2)
    loss.backward()
    assert logps.grad[0, 0] == 0  # clipped: no gradient
    assert float(logps.grad[0, 1]) == pytest.approx(-0.9 / 2)  # d(-ratio A / 2)/dlogp = -ratio / 2
    assert float(stats["clip_fraction"]) == pytest.approx(0.5)
    # with a negative advantage the low side clips: ratio 0.5 < 0.8 -> -(0.8 * -1) would be min'd with -(0.5 * -1)
    loss, stats = policy_loss(torch.tensor([[math.log(0.5)]]), torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1), "dapo", 0.2, 1)
    assert float(loss) == pytest.approx(0.8) and float(stats["clip_fraction"]) == 1.0


def test_the_kl_term_is_the_k3_estimate_weighted_by_beta():
    import torch

    from llmkit.training.grpo import policy_loss

    logps, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    loss, stats = policy_loss(logps, logps, torch.tensor([0.0]), torch.ones(1, 2), "dapo", 0.2, 2, beta=0.1, ref_logps=ref)
    k3 = [math.exp(d) - d - 1 for d in (-0.5, 1.0)]
    assert float(stats["kl"]) == pytest.approx(sum(k3) / 2)
    assert float(loss) == pytest.approx(0.1 * sum(k3) / 2)


@pytest.mark.parametrize("family", ["Llama 3", "GPT-2", "Gemma 3", "Qwen 3", "Phi-3", "OLMo 2"])
def test_each_prompt_computed_once_gives_the_full_forwards_logps_and_gradients(family, tmp_path):
    """The prompt-once forward (shared_prompt_logps) against every row run whole: left-padded prompts of different
    lengths (Gemma's longer than its sliding window), completions of different lengths, LoRA gradients included."""
    import torch
    from families import FAMILIES, build
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmkit.training.grpo import completion_logps, shares_prompt

    folder = build(FAMILIES[family], tmp_path / "m")
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False))
    assert shares_prompt(model)
    g, width, clen = 3, 24, 5
    prompt_lens, vocab = [24, 9], model.config.vocab_size
    ids = torch.zeros(len(prompt_lens) * g, width + clen, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for k in range(ids.shape[0]):
        p, c = prompt_lens[k // g], [5, 3, 1][k % g]
        ids[k, width - p:width] = torch.randint(3, vocab, (p,), generator=torch.Generator().manual_seed(k // g))
        ids[k, width:width + c] = torch.randint(3, vocab, (c,))
        mask[k, width - p:width + c] = 1
    results = []
    for group in (1, g):
        model.zero_grad()
        logps = completion_logps(model, ids, mask, clen, temperature=0.7, group=group)
        real = mask[:, width:].bool()
        (logps[real] * torch.linspace(-1, 1, int(real.sum()))).sum().backward()
        grads = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "lora_" in n])
        results.append((logps[real].detach(), grads))
    (full, full_grad), (shared, shared_grad) = results
    torch.testing.assert_close(shared, full, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(shared_grad, full_grad, atol=2e-5, rtol=1e-3)
    base = model.get_base_model()  # gradient checkpointing turns the cache off: every row runs whole then
    (getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable)()
    assert not shares_prompt(model)


# ------------------------------------------------------------------------------------------ rewards


def test_builtin_rewards():
    from llmkit.training.rewards import load_reward, normalise

    assert normalise("  Positive. \n") == "positive"
    prompts, completions = ["p"] * 4, ["Positive.", "negative", "it is positive!", "  POSITIVE  "]
    exact = load_reward("exact:answer")(prompts, completions, answer=["positive", "positive", "positive", None])
    assert exact == [1.0, 0.0, 0.0, None]  # None: the row has no answer, the reward does not apply
    assert load_reward("contains:answer")(prompts, completions, answer=["positive"] * 4) == [1.0, 0.0, 1.0, 1.0]
    assert load_reward("regex:(yes|no)")(["p"] * 3, ["yes", " no ", "maybe"]) == [1.0, 1.0, 0.0]
    assert load_reward("json")(["p"] * 2, ['{"a": 1}', "{a: 1}"]) == [1.0, 0.0]
    length = load_reward("length:max=2")(["p"] * 3, ["one", "one two three", "a b c d e"])  # no tokenizer: words
    assert length == [1.0, 0.5, 0.0]


def test_a_reward_that_raises_or_miscounts_stops_naming_function_step_and_row(tmp_path):
    from llmkit.errors import UsageError
    from llmkit.training.rewards import load_reward, score

    f = tmp_path / "rw.py"
    f.write_text("def boom(prompts, completions, **kw):\n    raise ValueError('bad answer')\n"
                 "def short(prompts, completions, **kw):\n    return [1.0]\n"
                 "def maybe(prompts, completions, **kw):\n    return [None, 0.5]\n")
    with pytest.raises(UsageError, match=r"reward .*rw.py:boom raised ValueError: bad answer \(step 3, prompt p.jsonl:line 7\)"):
        score([load_reward(f"{f}:boom")], ["a", "b"], ["x", "y"], {}, 3, ["p.jsonl:line 7", "p.jsonl:line 8"])
    with pytest.raises(UsageError, match=r"short returned 1 values for 2 completions \(step 5, prompt p.jsonl:line 7\)"):
        score([load_reward(f"{f}:short")], ["a", "b"], ["x", "y"], {}, 5, ["p.jsonl:line 7", "p.jsonl:line 8"])
    assert score([load_reward(f"{f}:maybe")], ["a", "b"], ["x", "y"], {}, 1, ["r1", "r2"]) == [[None, 0.5]]


def test_none_rewards_count_as_zero_in_the_sum_and_stay_out_of_their_own_mean(tiny_llama, tmp_path):
    """Through GRPOLoss.generate: a reward that does not apply to a completion neither helps nor hurts it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.config import RLConfig
    from llmkit.data.prompts import PromptSet
    from llmkit.inference.rollouts import RolloutRequest
    from llmkit.training.grpo import GRPOLoss
    from llmkit.training.rewards import Reward

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    prompts = PromptSet([{"ids": [1, 5, 6], "prompt": "a", "columns": {}, "where": "x:line 1"}], "k")

    class Fixed:  # a backend that returns fixed completions: the test is about the scoring
        name, stop_ids = "fixed", [tok.eos_token_id]

        def sync(self, model): ...

        def generate(self, request):
            return [[7, 8], [7], [9, 9, 9], [10]]

        def close(self): ...

    always = Reward("one", lambda prompts, completions, **kw: [1.0, 1.0, 0.0, 0.0])
    sparse = Reward("some", lambda prompts, completions, **kw: [None, 2.0, None, 2.0])
    rl = RLConfig(num_generations=4, max_new_tokens=3, log_rollouts_every=0)
    loss = GRPOLoss(prompts, Fixed(), [always, sparse], [1.0, 0.5], rl, tokenizer=tok, request=RolloutRequest, pad_id=0, seed=0,
                    grad_accum=1, out=tmp_path)
    rb = loss.generate(model, [0], 0, 0)
    assert rb.stats["reward"] == pytest.approx((1 + 2 + 0 + 1) / 4)  # totals 1, 1+0.5*2, 0, 0+0.5*2
    assert rb.stats["reward/some"] == pytest.approx(2.0) and rb.stats["reward/one"] == pytest.approx(0.5)
    assert rb.stats["clipped_ratio"] == pytest.approx(1 / 4)  # only [9, 9, 9] reached max_new_tokens without EOS
    assert rb.completion_mask.sum(-1).tolist() == [2, 1, 3, 1]
    assert rb.stats["zero_signal_groups"] == 0
    same = Reward("same", lambda prompts, completions, **kw: [1.0] * len(completions))
    for mode, tokens in (("keep", 7), ("drop", 0)):
        rl = RLConfig(num_generations=4, max_new_tokens=3, log_rollouts_every=0, zero_signal=mode)
        flat = GRPOLoss(prompts, Fixed(), [same], [], rl, tokenizer=tok, request=RolloutRequest, pad_id=0, seed=0, grad_accum=1,
                        out=tmp_path).generate(model, [0], 0, 0)
        assert flat.stats["zero_signal_groups"] == 1 and flat.advantages.tolist() == [0.0] * 4
        assert int(flat.completion_mask.sum()) == tokens  # drop: out of the token average


def test_resample_replaces_zero_signal_groups_with_other_prompts_that_carry_a_signal(tiny_llama, tmp_path):
    """rl.zero_signal=resample (DAPO's dynamic sampling): a group whose rewards are all equal is replaced by the group
    of a fresh prompt that has a signal, drawn under the step's seed; with no rounds left it is dropped."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.config import RLConfig
    from llmkit.data.prompts import PromptSet
    from llmkit.inference.rollouts import RolloutRequest
    from llmkit.training.grpo import GRPOLoss
    from llmkit.training.rewards import Reward

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    rows = [{"ids": [1, 20 + k], "prompt": p, "columns": {}, "where": f"x:line {k + 1}"} for k, p in enumerate(["a", "b", "c", "d"])]
    prompts = PromptSet(rows, "k")
    calls = []

    class Fixed:
        name, stop_ids = "fixed", [tok.eos_token_id]

        def sync(self, model): ...

        def generate(self, request):
            calls.append(len(request.prompts))
            return [[7, 8], [7], [9, 9, 9], [10]] * len(request.prompts)

        def close(self): ...

    # only prompt "c" tells its completions apart
    signal = Reward("c", lambda prompts, completions, **kw: [float(p == "c" and len(c) % 2) for p, c in zip(prompts, completions, strict=True)])

    def run(rounds: int):
        calls.clear()
        rl = RLConfig(num_generations=4, max_new_tokens=3, log_rollouts_every=0, zero_signal="resample", resample_rounds=rounds)
        return GRPOLoss(prompts, Fixed(), [signal], [], rl, tokenizer=tok, request=RolloutRequest, pad_id=0, seed=0, grad_accum=1,
                        out=tmp_path).generate(model, [0], 0, 0)

    rb = run(3)  # the pool holds b, c and d: three rounds are enough to reach c whatever the order
    assert rb.stats["zero_signal_groups"] == 1 and rb.stats["resampled_groups"] == 1
    assert rb.input_ids[0, :2].tolist() == [1, 22]  # row c's prompt took the slot
    assert rb.advantages.abs().sum() > 0 and int(rb.completion_mask.sum()) == 7
    assert calls[0] == 1 and len(calls) >= 2
    first = list(calls)
    again = run(3)
    assert calls == first and again.input_ids.equal(rb.input_ids)  # drawn under the step's seed: the same again
    none = run(0)  # no rounds: dropped, as rl.zero_signal=drop
    assert none.stats["resampled_groups"] == 0 and int(none.completion_mask.sum()) == 0 and calls == [1]


# ------------------------------------------------------------------------------------------ bad input


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmkit", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"question {i}"}], "answer": "yes"}) + "\n" for i in range(8)))
    return p


def test_bad_input_exits_2_with_one_line_and_writes_nothing(tiny_llama, prompts_file, tmp_path):
    rw = tmp_path / "rw.py"
    rw.write_text("NOT_CALLABLE = 3\ndef two_args(a, b):\n    return []\ndef good(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    no_prompt = tmp_path / "np.jsonl"
    no_prompt.write_text('{"question": "hi", "answer": "yes"}\n')
    long_prompt = tmp_path / "long.jsonl"
    long_prompt.write_text(json.dumps({"prompt": "hello world " * 60, "answer": "yes"}) + "\n")
    base = ["finetune", "--objective", "grpo", "--model", str(tiny_llama), "--method", "lora", "--max-steps", "1", "--quiet"]
    cases = {
        "missing file": (["--data", str(prompts_file), "--reward", str(tmp_path / "nope.py") + ":f"], "no such file"),
        "missing function": (["--data", str(prompts_file), "--reward", f"{rw}:absent"], "has no function 'absent'"),
        "not callable": (["--data", str(prompts_file), "--reward", f"{rw}:NOT_CALLABLE"], "not a function"),
        "wrong signature": (["--data", str(prompts_file), "--reward", f"{rw}:two_args"], "must take (prompts, completions, **kwargs)"),
        "unknown reward": (["--data", str(prompts_file), "--reward", "bleu"], "not a reward"),
        "missing column": (["--data", str(prompts_file), "--reward", "exact:label"], "no column 'label'"),
        "no prompt column": (["--data", str(no_prompt), "--reward", "exact:answer"], "no 'prompt' column"),
        "one generation": (["--data", str(prompts_file), "--reward", "exact:answer", "--num-generations", "1"], "--num-generations must be >= 2"),
        "over the context": (["--data", str(long_prompt), "--reward", f"{rw}:good", "--max-new-tokens", "64"], "over"),
        "seq-cls": (["--data", str(prompts_file), "--reward", "exact:answer", "--task", "seq-cls"], "--task seq-cls is not for --objective grpo"),
        "packing": (["--data", str(prompts_file), "--reward", "exact:answer", "--packing"], "--packing is not for --objective grpo"),
        "no reward": (["--data", str(prompts_file)], "needs at least one --reward"),
        "weights": (["--data", str(prompts_file), "--reward", "exact:answer", "--reward-weights", "1,2"], "one per reward"),
    }
    for name, (args, message) in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        r = _cli(*base, *args, "--out", str(out), cwd=tmp_path)
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert r.returncode == 2, (name, r.stderr[-2000:])
        assert len(lines) == 1 and message in lines[0], (name, r.stderr[-2000:])
        assert not out.exists(), name


# ------------------------------------------------------------------------------------------ rollouts


def test_transformers_rollouts_are_seeded_batched_and_leave_train_mode_and_rng_alone(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.inference.rollouts import RolloutRequest, TransformersRollouts

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.train()
    ro = TransformersRollouts(model, tok)
    prompts = [[1, 20, 21, 22], [1, 30]]  # different lengths: left padding
    req = RolloutRequest(prompts, num_generations=3, max_new_tokens=5, temperature=1.0, top_p=1.0, seed=7)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = ro.generate(req)
    after = torch.rand(1)
    assert before == after  # the global RNG (dropout, data) is not consumed by rollouts
    assert model.training
    assert len(a) == 6 and all(1 <= len(c) <= 5 for c in a)
    assert ro.generate(req) == a
    assert ro.generate(RolloutRequest(prompts, 3, 5, 1.0, 1.0, seed=8)) != a
    assert len({tuple(c) for c in a[:3]}) > 1  # a group holds different samples
    # left padding changes nothing: prompt 1 alone samples what it sampled beside a longer prompt... under greedy
    greedy = RolloutRequest(prompts, 1, 4, 1e-4, 1.0, seed=0)
    alone = RolloutRequest([prompts[1]], 1, 4, 1e-4, 1.0, seed=0)
    assert ro.generate(greedy)[1] == ro.generate(alone)[0]


def test_open_rollouts_picks_transformers_and_explains_a_missing_backend(tiny_llama, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.errors import UsageError
    from llmkit.inference.rollouts import TransformersRollouts, open_rollouts

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert isinstance(open_rollouts("transformers", model, tok, model_ref="x", max_context=128), TransformersRollouts)
    with pytest.raises(UsageError, match="--rollout-backend"):
        open_rollouts("vllm", model, tok, model_ref="x", max_context=128)
    monkeypatch.setitem(sys.modules, "llmkit.inference.llama_rollouts", None)  # as if the module were absent
    with pytest.raises(UsageError, match=r"llama\.cpp is not available"):
        open_rollouts("llama.cpp", model, tok, model_ref="x", max_context=128)
    assert isinstance(open_rollouts("auto", model, tok, model_ref="x", max_context=128), TransformersRollouts)


# ------------------------------------------------------------------------------------------ end to end


def _cfg(model: Path, data: Path, out: Path, **extra):
    from llmkit.config import load_recipe

    flags = {"model.name": str(model), "data.train": str(data), "out": str(out), "objective": "grpo", "method": "lora",
             "rl.rewards": ["exact:answer"], "rl.num_generations": 4, "rl.max_new_tokens": 4, "rl.rollout_backend": "transformers",
             "rl.log_rollouts_every": 1, "train.batch_size": 2, "train.max_steps": 4, "train.lr": 1e-2, "train.mixed_precision": "no",
             "train.scheduler": "constant", "train.log_every": 1, "quiet": True, **extra}
    return load_recipe(None, [], flags)


@pytest.mark.parametrize("steps_per_generation", [1, 2])
def test_resume_after_a_kill_gives_the_same_rollouts_and_losses(steps_per_generation, tiny_llama, prompts_file, tmp_path, monkeypatch):
    import llmkit.training.checkpoints as checkpoints
    from llmkit.finetune import finetune

    extra = {"train.save_every": 1, "rl.steps_per_generation": steps_per_generation, "rl.reward_weights": [1.0, 0.2],
             "rl.rewards": ["exact:answer", "length:max=2"], "rl.beta": 0.05}
    finetune(_cfg(tiny_llama, prompts_file, tmp_path / "a", **extra))
    real_save = checkpoints.save_checkpoint

    def save_then_die(accelerator, root, state, *args, **kwargs):
        path = real_save(accelerator, root, state, *args, **kwargs)
        if state.step == 3:  # mid-cycle with steps_per_generation 2: the kept rollouts must be found
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        finetune(_cfg(tiny_llama, prompts_file, tmp_path / "b", **extra))
    monkeypatch.setattr(checkpoints, "save_checkpoint", real_save)
    cfg = _cfg(tiny_llama, prompts_file, tmp_path / "b", **extra)
    cfg.resume = True
    finetune(cfg)

    def metrics(run: str) -> list[dict]:
        return [json.loads(ln) for ln in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    def rollouts(run: str) -> list[tuple]:
        rows = [json.loads(ln) for ln in (tmp_path / run / "rollouts.jsonl").read_text().splitlines()]
        return [(r["step"], r["row"], r["completion"], r["reward"]) for r in rows]

    ma, mb = metrics("a"), metrics("b")
    assert [m["step"] for m in mb] == [1, 2, 3, 4]
    for x, y in zip(ma, mb, strict=True):
        for key in ("loss", "reward", "kl", "completion_length", "clip_fraction"):
            assert x[key] == pytest.approx(y[key], abs=1e-6), (x["step"], key)
    assert rollouts("a") == rollouts("b")
    assert len(rollouts("a")) == 4 * 2 * 4 // steps_per_generation  # logged at each generation: B x G each


def test_a_tiny_model_learns_to_answer_yes(tmp_path):
    """A word-level Llama (random init) learns "always answer with the word yes" from the reward alone."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from llmkit.finetune import finetune

    words = ["<pad>", "<s>", "</s>", "yes", "no", "maybe", "question", "answer", *[str(i) for i in range(10)],
             *[f"w{i}" for i in range(12)]]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="maybe")))
    tok._tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.pad_token, tok.bos_token, tok.eos_token = "<pad>", "<s>", "</s>"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model_dir = tmp_path / "words"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i} {j} answer", "answer": "yes"}) + "\n" for i in range(10) for j in range(4)))
    evals = tmp_path / "eval.jsonl"
    evals.write_text("".join(json.dumps({"prompt": f"question {j} {i} answer", "answer": "yes"}) + "\n" for i in range(5) for j in range(4)))
    out = tmp_path / "run"
    cfg = _cfg(model_dir, data, out, **{"method": "full", "rl.rewards": ["regex:yes( .*)?"], "rl.num_generations": 8,
                                        "rl.max_new_tokens": 2, "train.batch_size": 4, "train.max_steps": 12, "train.lr": 3e-2,
                                        "data.eval": str(evals), "train.eval_every": 12, "rl.log_rollouts_every": 4})
    finetune(cfg)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in rows if "eval_pass_rate" in r]
    assert evaluated and evaluated[-1]["eval_pass_rate"] >= 0.9, rows
    trained = [r for r in rows if "reward" in r]
    assert trained[0]["reward"] < 0.2  # it did not know to start with (1 word in 29)
    assert trained[-1]["reward"] >= 0.9  # sampled answers too, not only the greedy one


def test_cli_end_to_end_output_loads_with_plain_transformers_and_peft(tiny_llama, prompts_file, tmp_path):
    out = tmp_path / "run"
    r = _cli("finetune", "--objective", "grpo", "--model", str(tiny_llama), "--method", "lora", "--data", str(prompts_file),
             "--reward", "exact:answer", "--reward", "length:max=3", "--reward-weights", "1,0.5", "--num-generations", "4",
             "--max-new-tokens", "4", "--rollout-backend", "transformers", "--max-steps", "2", "--batch-size", "2",
             "--set", "train.log_every=1", "--set", "rl.loss=dr_grpo", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("reward", "reward_std", "reward/exact:answer", "reward/length:max=3", "completion_length", "clipped_ratio",
                "zero_signal_groups", "clip_fraction", "rollout_tokens_per_s", "train_tokens_per_s"):
        assert key in rows[-1], key
    logged = [json.loads(ln) for ln in (out / "rollouts.jsonl").read_text().splitlines()]
    assert set(logged[0]) >= {"prompt", "completion", "rewards", "reward"} and set(logged[0]["rewards"]) == {"exact:answer", "length:max=3"}
    assert (out / "loss.png").exists()
    record = json.loads((out / "llmkit.json").read_text())
    assert record["rl"]["rewards"] == ["exact:answer", "length:max=3"] and record["rl"]["loss"] == "dr_grpo"
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("question", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=2, do_sample=False).shape[1] >= ids["input_ids"].shape[1]
    from llmkit.evaluate import evaluate_data

    result = evaluate_data(str(out), str(prompts_file), rewards=["exact:answer", "regex:.*"], max_new_tokens=3)
    assert result["prompts"] == 8 and result["per_reward"]["regex:.*"] == 1.0
    assert result["reward"] == pytest.approx(result["per_reward"]["exact:answer"] + 1.0)
    assert result["pass_rate"] == pytest.approx(result["per_reward"]["exact:answer"])  # regex always passes: exact decides


def test_a_reward_raising_during_training_stops_the_run_in_one_line(tiny_llama, prompts_file, tmp_path):
    rw = tmp_path / "late.py"
    rw.write_text("def late(prompts, completions, **kw):\n    if 'question 5' in str(prompts[0]):\n        raise KeyError('score')\n"
                  "    return [0.0] * len(completions)\n")
    r = _cli("finetune", "--objective", "grpo", "--model", str(tiny_llama), "--method", "lora", "--data", str(prompts_file),
             "--reward", f"{rw}:late", "--num-generations", "2", "--max-new-tokens", "2", "--rollout-backend", "transformers",
             "--batch-size", "1", "--epochs", "1", "--set", "train.group_by_length=false", "--out", str(tmp_path / "run"), cwd=tmp_path)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(errors) == 1 and "late.py:late raised KeyError" in errors[0] and "prompts.jsonl:line 6" in errors[0], errors
    assert "Traceback" not in r.stderr


def test_estimate_memory_counts_every_completion_of_the_batch(tiny_llama):
    from llmkit.config import load_recipe
    from llmkit.training.memory import estimate, model_shape

    def activations(objective: str, processes: int, **rl) -> float:
        flags = {"model.name": str(tiny_llama), "method": "lora", "objective": objective, "data.block_size": 64, "train.batch_size": 2,
                 **({"rl.rewards": ["exact:answer"], **rl} if objective == "grpo" else {})}
        cfg = load_recipe(None, [], flags)
        return estimate(model_shape(cfg), cfg, processes, "cpu").activations

    # two processes (DDP): every row runs whole, 2 prompts x G sequences per forward, not 2 rows
    sft, g4, g8 = (activations("sft", 2), activations("grpo", 2, **{"rl.num_generations": 4}),
                   activations("grpo", 2, **{"rl.num_generations": 8}))
    assert g4 > 3 * sft and g8 > 1.9 * g4
    # one process: each prompt once, the G completions (8 tokens) on its repeated keys and values
    short = {"rl.max_new_tokens": 8}
    one4, one8 = activations("grpo", 1, **short, **{"rl.num_generations": 4}), activations("grpo", 1, **short, **{"rl.num_generations": 8})
    assert one4 < one8 < activations("grpo", 2, **short, **{"rl.num_generations": 8}) / 2


def test_two_processes_train_and_count_each_eval_prompt_once(tiny_llama, prompts_file, tmp_path):
    import os

    evals = tmp_path / "eval.jsonl"
    evals.write_text("".join(prompts_file.read_text().splitlines(keepends=True)[:3]))  # 3 rows over 2 processes: one is padding
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "llmkit",
                           "finetune", "--objective", "grpo", "--model", str(tiny_llama), "--method", "lora", "--data", str(prompts_file),
                           "--eval-data", str(evals), "--reward", "exact:answer", "--num-generations", "2", "--max-new-tokens", "3",
                           "--rollout-backend", "transformers", "--max-steps", "2", "--batch-size", "2", "--set", "train.log_every=1",
                           "--set", "rl.log_rollouts_every=1", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval_prompts"] for r in rows if "eval_prompts" in r] == [3]
    assert all("reward" in r for r in rows if "loss" in r)


def test_llama_cpp_rollouts_get_the_weights_of_every_optimizer_step(tiny_llama, prompts_file, tmp_path, monkeypatch):
    """The real loop (fused AdamW, grad_accum 2): each step's rollouts sample from that step's weights. Fused AdamW
    leaves no version bump on the tensors; a sync that looked for one kept the first step's adapter for the whole run."""
    pytest.importorskip("llama_cpp")
    from llmkit.finetune import finetune
    from llmkit.inference.llama_rollouts import LlamaCppRollouts

    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    sent: list[float] = []  # what each transfer carried: the sum of |B| over the adapter
    real = LlamaCppRollouts._sync_adapter

    def recording(self, model):
        sent.append(sum(float(p.detach().abs().sum()) for n, p in model.named_parameters() if "lora_B" in n))
        return real(self, model)

    monkeypatch.setattr(LlamaCppRollouts, "_sync_adapter", recording)
    varied = tmp_path / "varied.py"  # different completions score differently: every group carries a gradient
    varied.write_text("def varied(prompts, completions, **columns):\n    return [float(sum(map(ord, c)) % 5) for c in completions]\n")
    finetune(_cfg(tiny_llama, prompts_file, tmp_path / "run", **{"rl.rollout_backend": "llama.cpp", "train.max_steps": 3,
                                                               "train.grad_accum": 2, "train.batch_size": 1,
                                                               "rl.rewards": [f"{varied}:varied"]}))
    assert len(sent) == 3  # once per optimizer step, not per micro-batch
    assert sent[0] == 0.0  # B starts at 0
    assert 0.0 not in sent[1:] and len(set(sent)) == 3  # and each step's transfer carries that step's new weights


def test_lr_default_is_higher_for_grpo_with_lora_and_an_explicit_lr_wins(tiny_llama, prompts_file, tmp_path):
    from llmkit.config import GRPO_LORA_LR, LR, load_recipe

    def lr(**flags) -> float:
        cfg = load_recipe(None, [], {"model.name": str(tiny_llama), "data.train": str(prompts_file), "out": str(tmp_path / "o"),
                                     "method": "lora", **flags})
        cfg.validate()
        return cfg.train.lr

    grpo = {"objective": "grpo", "rl.rewards": ["exact:answer"]}
    assert lr(**grpo) == GRPO_LORA_LR == 3e-4
    assert lr(**grpo, **{"train.lr": 1e-5}) == 1e-5
    assert lr(**grpo, method="full") == lr() == LR == 5e-5
