"""Layer extraction on any decoder whose blocks are a ModuleList: tiny random models of each family, built from configs.

For each: keeping every layer reproduces the teacher's logits exactly; keeping layers 1 and 2 equals the teacher run
with layers 0 and 3 bypassed (so the per-layer config, e.g. Gemma 3's sliding / full pattern, followed the layers);
`generate` with a KV cache agrees with generation without one; save + reload keeps the logits; block influence
runs on the blocks found.
"""

from __future__ import annotations

import pytest

IDS = dict(vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, **IDS)
GEMMA3_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def build(arch: str):
    import torch
    import transformers as t

    torch.manual_seed(0)
    if arch == "gpt2":
        model = t.GPT2LMHeadModel(t.GPT2Config(n_positions=128, n_embd=32, n_layer=4, n_head=4, **IDS))
    elif arch == "gemma3":
        model = t.Gemma3ForCausalLM(t.Gemma3TextConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, query_pre_attn_scalar=16, sliding_window=32, layer_types=GEMMA3_TYPES, max_position_embeddings=128, **IDS))
    elif arch == "qwen3_moe":  # layers 0 and 3 dense (mlp_only_layers), 1 and 2 mixtures of experts
        model = t.Qwen3MoeForCausalLM(t.Qwen3MoeConfig(**SMALL, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                                       moe_intermediate_size=16, mlp_only_layers=[0, 3]))
    elif arch == "deepseek_v3":  # the first two layers dense (first_k_dense_replace), the rest mixtures of experts
        model = t.DeepseekV3ForCausalLM(t.DeepseekV3Config(
            **{**SMALL, "num_key_value_heads": 4}, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
            n_group=1, topk_group=1, first_k_dense_replace=2, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=8))
    else:
        name = {"qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral", "phi3": "Phi3", "olmo2": "Olmo2", "granite": "Granite",
                "llama": "Llama", "gpt_neox": "GPTNeoX"}[arch]
        extra = {"head_dim": 8} if arch == "qwen3" else {}
        model = getattr(t, f"{name}ForCausalLM")(getattr(t, f"{name}Config")(**SMALL, **extra))
    return model.eval()


def bypassing(model, dropped: list[int]):
    """Hooks that make the `dropped` blocks pass their input through unchanged."""
    from llmkit.training.students import layer_stack

    def hook(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return [layer_stack(model)[1][i].register_forward_hook(hook, with_kwargs=True) for i in dropped]


ARCHS = ["llama", "gpt2", "gemma3", "qwen2", "qwen3", "mistral", "phi3", "olmo2", "granite", "gpt_neox", "qwen3_moe", "deepseek_v3"]


@pytest.mark.parametrize("arch", ARCHS)
def test_any_decoder_keeps_layers_consistently(arch, tmp_path):
    import torch

    from llmkit.training.students import count_layers, keep_layers, layer_importance, student_from_layers

    teacher = build(arch)
    ids = torch.randint(3, 128, (2, 40))  # longer than Gemma 3's sliding window (32): sliding and full attention differ
    with torch.no_grad():
        want = teacher(ids, use_cache=False).logits
        assert torch.equal(keep_layers(teacher, [0, 1, 2, 3]).eval()(ids, use_cache=False).logits, want)

        student, kept = student_from_layers(teacher, 2, [1, 2])
        student.eval()
        assert kept == [1, 2] and count_layers(student) == 2 and student.config.num_hidden_layers == 2
        handles = bypassing(teacher, [0, 3])
        try:
            bypassed = teacher(ids, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        assert torch.allclose(student(ids, use_cache=False).logits, bypassed, atol=1e-5)
    types = getattr(teacher.config, "layer_types", None)
    if types is not None:
        assert student.config.layer_types == [types[1], types[2]]
    if arch == "gemma3":
        assert student.config.layer_types == ["full_attention", "sliding_attention"]
    if arch == "qwen3_moe":
        assert student.config.mlp_only_layers == []  # both kept layers are mixtures of experts
    if arch == "deepseek_v3":
        assert student.config.first_k_dense_replace == 1  # kept layer 1 is dense, kept layer 2 is not

    # generation with a KV cache (one slot per kept layer) agrees with generation without one
    prompt = ids[:1, :36]
    with torch.no_grad():
        cached = student.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, return_dict_in_generate=True)
        plain = student.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached.sequences, plain) and len(cached.past_key_values.layers) == 2

    student.save_pretrained(tmp_path)
    reloaded = type(student).from_pretrained(tmp_path).eval()
    assert count_layers(reloaded) == 2 and getattr(reloaded.config, "layer_types", None) == getattr(student.config, "layer_types", None)
    with torch.no_grad():
        assert torch.equal(reloaded(ids, use_cache=False).logits, student(ids, use_cache=False).logits)

    scores = layer_importance(teacher, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    assert len(scores) == 4 and all(s > 0 for s in scores)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("budget", ["all", "none", "crossed mid-pass"])
def test_rescoring_after_a_removal_equals_a_pass_of_the_shortened_model(arch, budget, monkeypatch):
    """LayerScores re-runs only the blocks after a removed one, on their recorded inputs and arguments (masks,
    position embeddings, per layer type); its scores must be those of the shortened model's own full pass. Without
    the memory for every input (none kept, or the budget used up during the first pass) it re-runs from the first block."""
    import torch

    import llmkit.training.students as students

    teacher = build(arch)
    one_input = 3 * 40 * teacher.get_input_embeddings().weight.shape[1] * 4  # the first batch's hidden states, fp32
    monkeypatch.setattr(students, "CACHE_BYTES", {"all": 2 << 30, "none": 0, "crossed mid-pass": one_input + 1}[budget])
    keep_inputs = budget == "all"
    ids = torch.randint(3, 128, (3, 40))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # padding: only real tokens count
    batches = [{"input_ids": ids, "attention_mask": mask}, {"input_ids": ids[:1, :20], "attention_mask": mask[:1, :20]}]
    scores = students.LayerScores(teacher, batches)
    assert scores.keep_inputs is keep_inputs
    assert students.layer_importance(teacher, iter(batches)) == [scores.scores[j] for j in scores.kept]  # batches read once
    for layer in (1, 0):  # a middle one, then the first
        scores.remove(layer)
        want = students.layer_importance(students.keep_layers(teacher, scores.kept).eval(), batches)
        assert [scores.scores[j] for j in scores.kept] == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_student_config_reindexes_per_layer_lists_and_leaves_the_rest():
    from transformers import LlamaConfig

    from llmkit.training.students import student_config

    cfg = LlamaConfig(num_hidden_layers=4, eos_token_id=[2, 3, 4, 5], architectures=["LlamaForCausalLM"])
    cfg.no_rope_layers = [1, 0, 1, 1]  # one entry per layer (SmolLM3)
    cfg.mlp_only_layers = [0, 3]  # layer indices (Qwen-MoE)
    cfg.first_k_dense_replace = 3  # DeepSeek: layers 0-2 dense
    cfg.block_sizes = (8, 16)  # a list of another length: not per layer
    new = student_config(cfg, [1, 3])
    assert new.num_hidden_layers == 2 and new.no_rope_layers == [0, 1] and new.mlp_only_layers == [1]
    assert new.first_k_dense_replace == 1 and new.block_sizes == (8, 16)
    assert new.eos_token_id == [2, 3, 4, 5] and new.architectures == ["LlamaForCausalLM"]
    assert cfg.num_hidden_layers == 4 and cfg.no_rope_layers == [1, 0, 1, 1]  # the teacher's config is untouched


def test_a_model_without_a_block_list_is_a_usage_error():
    import torch
    from transformers import LlamaConfig

    from llmkit.errors import UsageError
    from llmkit.training.students import layer_stack

    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = LlamaConfig(num_hidden_layers=3)
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))  # not the declared 3

    with pytest.raises(UsageError, match="--student-config"):
        layer_stack(Odd())


def test_auto_selection_keeps_an_encoders_first_layer():
    """The regression of issue 27: `importance` as the default dropped MiniLM's first layer (kept 2, 4, 5 of 6; 0.951x
    the teacher's accuracy against 0.999x for evenly spaced 0, 2, 5). Here layer 0 of a BERT classifier is made
    near-identity, so block influence drops it first; the default selection for a classifier must keep it all the same."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from llmkit.config import StudentConfig
    from llmkit.data.examples import Collator, ExampleSet
    from llmkit.training.students import choose_layers, kept_layers, layer_importance, resolve_selection, student_from_layers

    torch.manual_seed(0)
    teacher = BertForSequenceClassification(BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                                       num_attention_heads=4, max_position_embeddings=64, num_labels=2,
                                                       initializer_range=0.2)).eval()
    with torch.no_grad():
        for dense in (teacher.bert.encoder.layer[0].attention.output.dense, teacher.bert.encoder.layer[0].output.dense):
            dense.weight.zero_()
            dense.bias.zero_()
    ids = torch.randint(3, 128, (8, 12))
    scores = layer_importance(teacher, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    assert scores[0] < min(scores[1:]) / 100, scores
    by_importance = choose_layers(teacher, ExampleSet([list(r) for r in ids.tolist()]), Collator(0, True), 2, 32, "cpu")
    assert 0 not in by_importance  # what plain importance as the default would keep

    selection = resolve_selection(StudentConfig().layer_selection, "seq-cls")
    assert selection == "even"
    _, kept = student_from_layers(teacher, 2, None if selection == "even" else by_importance)
    assert kept == kept_layers(4, 2) == [0, 3]
    assert resolve_selection(StudentConfig().layer_selection, "causal-lm") == "importance"
    assert resolve_selection("importance", "seq-cls") == "importance"  # an explicit choice stands
