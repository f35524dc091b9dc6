"""Tiny models built from configs, tokenizers trained in the test: no download, ever."""

from __future__ import annotations

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported anywhere
# GGUF conversions of test models (generate's llama.cpp cache) go to a throwaway folder, not the user's cache
os.environ.setdefault("LLMKIT_CACHE", tempfile.mkdtemp(prefix="llmkit-test-cache-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

CORPUS = [
    "Once upon a time there was a little model that wanted to write stories.",
    "The quick brown fox jumps over the lazy dog, again and again.",
    "To be, or not to be, that is the question.",
    "Hello world! Language models continue text one token at a time.",
    "All the world's a stage, and all the men and women merely players.",
] * 4
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(special: list[str]):
    """A byte-level BPE (GPT-2 style) trained on CORPUS in a few milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """GPT-2 with its quirks: Conv1D layers, no pad token, a short (64-token) context."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tok = make_tokenizer(["<|endoftext|>"])
    tok.eos_token = tok.bos_token = "<|endoftext|>"
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    out = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Llama with BOS/EOS, no pad token, and a chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = make_tokenizer(["<s>", "</s>", "<|user|>", "<|assistant|>"])
    tok.bos_token, tok.eos_token = "<s>", "</s>"
    tok.chat_template = CHAT_TEMPLATE
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def cli(capsys):
    """Run `llmkit ARGS...` in-process; returns (exit code, stdout, stderr)."""
    from llmkit.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        out, err = capsys.readouterr()
        code = exit_info.value.code
        return (code if isinstance(code, int) else 1), out, err

    return run


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A BERT encoder (no LM head), with a WordPiece-free byte-level tokenizer that has [CLS]/[SEP]/[PAD]."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    tok = make_tokenizer(["[PAD]", "[CLS]", "[SEP]", "[UNK]"])
    tok.pad_token, tok.cls_token, tok.sep_token, tok.unk_token = "[PAD]", "[CLS]", "[SEP]", "[UNK]"
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    out = tmp_path_factory.mktemp("tiny-bert")
    model = BertModel(cfg)
    model.config.architectures = ["BertModel"]
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    """Memorisable data: a text file, and a sentiment CSV whose label is obvious from one word."""
    import random

    d = tmp_path_factory.mktemp("data")
    (d / "train.txt").write_text("\n".join(CORPUS * 3), encoding="utf-8")
    (d / "eval.txt").write_text("\n".join(CORPUS[:5]), encoding="utf-8")
    rng = random.Random(0)
    good = ["great fun", "a lovely film", "wonderful and warm", "great acting", "lovely story"]
    bad = ["dull and slow", "a boring mess", "awful acting", "dull story", "boring film"]
    rows = ["text,label"] + [f"{rng.choice(good)},pos" if i % 2 else f"{rng.choice(bad)},neg" for i in range(64)]
    (d / "train.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (d / "eval.csv").write_text("\n".join(rows[:17]) + "\n", encoding="utf-8")
    return d
