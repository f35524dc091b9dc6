"""The same command under torchrun with 2 CPU processes (gloo) gives the 1-process result at the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_two_processes_match_one_process(tiny_gpt2, toy_data, tmp_path):
    from safetensors.torch import load_file

    # Dropout off: each process draws its own masks, so with dropout the runs could only match statistically.
    model = tmp_path / "model"
    shutil.copytree(tiny_gpt2, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    (model / "config.json").write_text(json.dumps(cfg))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    common = ["finetune", "--model", str(model), "--data", str(toy_data / "train.txt"), "--block-size", "16",
              "--max-steps", "6", "--lr", "1e-3", "--mixed-precision", "no", "--quiet", "--set", "train.log_every=1"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "llmkit", *common, "--batch-size", "8", "--out", str(one)], check=True, env=env, timeout=300)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "llmkit", *common, "--batch-size", "4", "--out", str(two)],
                          env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def losses(out: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line]

    assert len(losses(one)) == len(losses(two)) == 6
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-4, k
    run = json.loads((two / "llmkit.json").read_text())["llmkit"]
    assert run["status"] == "done" and run["steps"] == 6


SEEN_BY_EACH_RANK = r'''
import json, sys
from torch.utils.data import DataLoader
from transformers import AutoTokenizer
from llmkit.config import load_recipe
from llmkit.data.examples import Collator, EpochSampler
from llmkit.data.examples import IndexedExamples
from llmkit.data.prepare import prepare_data
from llmkit.training.lifecycle import make_accelerator

model, data, out = sys.argv[1:4]
cfg = load_recipe(None, [], {"data.train": data, "data.block_size": 8})
acc = make_accelerator(cfg.train)
with acc.main_process_first():  # as finetune does: the main process prepares, the others open what it wrote
    prepared = prepare_data(cfg, AutoTokenizer.from_pretrained(model), main=acc.is_main_process)
train = prepared.train.head(len(prepared.train) // 4 * 4)
loader = acc.prepare(DataLoader(IndexedExamples(train), batch_size=2, sampler=EpochSampler(len(train), 0, 4),
                                collate_fn=Collator(0, causal=True)))
seen = [i for batch in loader for i in batch["index"].tolist()]
json.dump({"rank": acc.process_index, "seen": seen, "n": len(train), "folder": str(prepared.folder)},
          open(f"{out}-{acc.process_index}.json", "w"))
'''


@pytest.mark.slow
def test_two_processes_prepare_once_and_see_disjoint_examples(tiny_gpt2, toy_data, tmp_path):
    script = tmp_path / "seen.py"
    script.write_text(SEEN_BY_EACH_RANK)
    cache = tmp_path / "cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "LLMKIT_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                           str(tiny_gpt2), str(toy_data / "train.txt"), str(tmp_path / "seen")],
                          env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("preparing data into") == 1  # only the main process built it
    ranks = [json.loads((tmp_path / f"seen-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["folder"] == ranks[1]["folder"] and len(list((cache / "data").iterdir())) == 1
    a, b = set(ranks[0]["seen"]), set(ranks[1]["seen"])
    assert a and b and a.isdisjoint(b) and a | b == set(range(ranks[0]["n"]))
