"""8-bit quantization: size, perplexity and speed of every method against fp32, one run.

SmolLM2-135M (the bundled model) and a tiny GPT-2 (built here from a config: GPT-2's weights need the Hub),
perplexity on 16 x 256 tokens of ../shared/data/tinyshakespeare/validation.txt, greedy generation tokens/s
(transformers fp32 before; after: transformers for int8 / bnb-int8, llama.cpp for gguf-q8_0).
Targets (SmolLM2): int8 ppl +<=1%, >=1.5x tokens/s, <=30% of fp32 size; gguf-q8_0 ppl +<=0.5%, <=30% size,
>=5x the fp32 transformers tokens/s. Bars to beat measured here (GUIDE §3): naive per-tensor dynamic int8
+420% ppl; bitsandbytes +3.0%, no speed-up, 41% of the fp32 footprint.

Usage: python benchmarks/quantize.py [--models smollm2,gpt2-tiny] [--methods int8,bnb-int8,gguf-q8_0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from _common import LLMKIT, SHARED, first_line, run


def tiny_gpt2(folder: Path) -> Path:
    """A small GPT-2 (4 layers, 256 wide, GPT-2's real 1024 positions) trained for a few steps so it is not uniform."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    text = (SHARED / "data" / "tinyshakespeare" / "train.txt").read_text()[:200_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=2048, special_tokens=["<|endoftext|>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(hf_tok), n_positions=1024, n_embd=256, n_layer=4, n_head=4,
                                       bos_token_id=hf_tok.eos_token_id, eos_token_id=hf_tok.eos_token_id))
    ids = torch.tensor(hf_tok(text)["input_ids"][: 64 * 128]).view(64, 128)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(60):
        batch = ids[(step * 8) % 64:(step * 8) % 64 + 8]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    return folder


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="smollm2,gpt2-tiny")
    p.add_argument("--methods", default="int8,bnb-int8,gguf-q8_0")
    a = p.parse_args()
    print(first_line(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="llmkit-bench-quant-"))
    val = SHARED / "data" / "tinyshakespeare" / "validation.txt"
    try:
        for name in a.models.split(","):
            model = "smollm2-135m" if name == "smollm2" else str(tiny_gpt2(work / "gpt2-tiny"))
            for method in a.methods.split(","):
                out = work / f"{name}-{method}" if method != "gguf-q8_0" else work / f"{name}.gguf"
                text, wall = run([*LLMKIT, "quantize", "--model", model, "--method", method, "--out", out, "--eval-data", val,
                                  "--json", "--quiet", "--force"], f"{name} {method}")
                r = json.loads(text[text.index("{"): text.rindex("}") + 1])
                b, q, ratio = r["before"], r["after"], r["ratios"]
                print(f"{name:9s} {method:9s} size_ratio={ratio['disk']:.3f} mem_ratio={ratio['memory']:.3f} "
                      f"ppl_fp32={b['perplexity']:.3f} ppl_8bit={q['perplexity']:.3f} ppl_change={100 * (ratio['perplexity'] - 1):+.2f}% "
                      f"tok_s_fp32={b['tokens_per_s']:.1f} tok_s_8bit={q['tokens_per_s']:.1f} tok_s_ratio={ratio['tokens_per_s']:.2f} "
                      f"wall_s={wall:.0f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
