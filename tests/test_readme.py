"""README.md is a script: every ```bash and ```python block runs, in order, as written, in a fresh folder.

What a new user types is what runs. The only additions are the caps the README itself documents for a quick
trial of a training command (`--max-steps`, `--max-train-samples`, `--max-eval-samples`), added to `llmkit
finetune` / `llmkit distill` lines that do not set them (larger values a line sets are lowered to them, and
`--max-examples` of answer generation to 16), so the whole README takes minutes, not hours. Blocks
after a `<!-- readme-test: skip (why) -->` comment are not run (set-up, benchmarks); lines marked `# needs the
Hub` are skipped because tests never use the network. After each block, every `--out PATH` and `> FILE` it
names must exist.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((.+?)\)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")
QUICK_TRIAL = {"--max-steps": "2", "--max-train-samples": "64", "--max-eval-samples": "16"}
TRAINING = re.compile(r"\bllmkit (finetune|distill)\b")
# larger values a README line sets itself are lowered to the quick trial's (and answers generated to 16)
LOWER = [(re.compile(r"(--max-steps[ =]|train\.max_steps=)(\d+)"), 2), (re.compile(r"(--max-train-samples[ =])(\d+)"), 64),
         (re.compile(r"(--max-examples[ =])(\d+)"), 16)]


@dataclass
class Block:
    line: int  # where the block starts in README.md
    lang: str
    code: str
    skip: str | None


def readme_blocks(text: str) -> list[Block]:
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m.group(1):
            i += 1
            continue
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP.search(before)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        blocks.append(Block(i + 1, m.group(1), "\n".join(lines[i + 1:end]), skip.group(1) if skip else None))
        i = end + 1
    return blocks


def commands(code: str) -> list[str]:
    """Shell commands, with backslash-continued lines joined."""
    out, cur = [], ""
    for line in code.splitlines():
        cur += line
        if line.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        if cur.strip():
            out.append(cur)
        cur = ""
    return out


def quick_trial(cmd: str) -> str:
    """Add the documented quick-trial caps a training command does not set itself, and lower larger ones it sets."""
    if "llmkit " in cmd:
        for pattern, cap in LOWER:
            cmd = pattern.sub(lambda m, cap=cap: m.group(1) + str(min(int(m.group(2)), cap)), cmd)
    m = TRAINING.search(cmd)
    if not m:
        return cmd
    setting = {"--max-steps": "max_steps", "--max-train-samples": "max_train_samples", "--max-eval-samples": "max_eval_samples"}
    extra = [f"{flag} {value}" for flag, value in QUICK_TRIAL.items() if flag not in cmd and setting[flag] not in cmd]
    return cmd[:m.end()] + "".join(f" {e}" for e in extra) + cmd[m.end():]


def outputs(cmd: str) -> list[str]:
    if cmd.lstrip().startswith("#"):
        return []
    code = cmd.split(" #")[0]
    return re.findall(r"--out[ =](\S+)", code) + re.findall(r"(?<![0-9&])>\s*([\w./-]+)", code)


def test_quick_trial_and_outputs_parse():
    cmd = "llmkit finetune --recipe r.yaml --set train.max_steps=10 --out runs/x   # a comment"
    assert quick_trial(cmd) == ("llmkit finetune --max-train-samples 64 --max-eval-samples 16 --recipe r.yaml "
                                "--set train.max_steps=2 --out runs/x   # a comment")
    assert quick_trial("llmkit distill --max-steps 1 --max-train-samples 200 --out s") == (
        "llmkit distill --max-eval-samples 16 --max-steps 1 --max-train-samples 64 --out s")
    assert quick_trial("llmkit evaluate --model m --max-examples 200") == "llmkit evaluate --model m --max-examples 16"
    assert quick_trial("llmkit generate hi") == "llmkit generate hi"
    assert outputs("llmkit generate --json > out.jsonl 2>/dev/null") == ["out.jsonl"]
    assert outputs("curl -s x > /dev/null") == ["/dev/null"]
    assert outputs("# SmolLM2 (30 layers) -> 15 layers") == []
    assert commands("a \\\n  b\nc") == ["a    b", "c"]


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path):
    if not (SHARED / "data").is_dir():
        pytest.skip(f"the README's data paths need {SHARED / 'data'}")
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared").symlink_to(SHARED)  # the README's ../shared/data/... paths, from the fresh folder
    for name in ("recipes", "benchmarks"):
        (work / name).symlink_to(REPO / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "LLMKIT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("LLMKIT_GGUF_TYPE", None)
    ran = []
    for block in readme_blocks((REPO / "README.md").read_text(encoding="utf-8")):
        if block.skip or block.lang not in ("bash", "python"):
            continue
        if block.lang == "python":
            script = block.code
            argv = [sys.executable, "-"]
            expected: list[str] = []
        else:
            cmds = [quick_trial(c) for c in commands(block.code) if "# needs the Hub" not in c]
            script = "set -euo pipefail\n" + "\n".join(cmds) + "\n"
            argv = ["bash", "-s"]
            expected = [o for c in cmds for o in outputs(c)]
        started = time.monotonic()
        try:
            res = subprocess.run(argv, input=script, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
        except subprocess.TimeoutExpired:
            pytest.fail(f"README.md line {block.line}: the block did not finish in 30 min:\n{script}")
        assert res.returncode == 0, (f"README.md line {block.line} failed (exit {res.returncode}):\n{script}\n"
                                     f"--- stdout\n{res.stdout[-3000:]}\n--- stderr\n{res.stderr[-5000:]}")
        missing = [o for o in expected if not (work / o).exists() and not Path(o).exists()]
        assert not missing, f"README.md line {block.line}: {missing} not written by\n{script}"
        ran.append(block.line)
        print(f"README.md line {block.line}: {block.lang} block ran in {time.monotonic() - started:.0f} s", flush=True)
    assert len(ran) >= 8  # the README's runnable blocks (a parse that finds none must not pass)
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)  # GGUF exports and kept bases: hundreds of MB
