"""Helpers for the reliability suite (tests/reliability): subprocess runs of the CLI, weight comparison, and the check report.

`benchmarks/reliability.py` runs this suite with LLMKIT_RELIABILITY_REPORT=FILE; each check appends the
figure it measured (max weight difference, seconds to exit, inputs fuzzed...) there, one JSON line each.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = Path(__file__).with_name("_child.py")


def record(check: int, name: str, figure: str) -> None:
    """Report what a check measured (printed by benchmarks/reliability.py)."""
    path = os.environ.get("LLMKIT_RELIABILITY_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"check": check, "name": name, "figure": figure}) + "\n")


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.pop("LLMKIT_TEST_STEP_DELAY", None)
    env.pop("LLMKIT_TEST_KILL_AT", None)
    env.pop("LLMKIT_TEST_HOLD_AT", None)
    env.update(extra)
    return env


def start(args: list[str], **env: str) -> subprocess.Popen:
    """`llmkit ARGS` in a new process (faults from env, see _child.py); stdout/stderr captured."""
    return subprocess.Popen([sys.executable, str(CHILD), *map(str, args)], env=child_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHILD), *map(str, args)], env=child_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def logged_steps(out: Path) -> list[int]:
    """Optimizer steps logged so far (tolerates the half-written last line of a running or killed process)."""
    steps = []
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in row:
            steps.append(row["step"])
    return steps


def wait_until(proc: subprocess.Popen, cond, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (exit {proc.returncode}) before the condition held:\n{proc.stderr.read()}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out waiting for the condition")
        time.sleep(0.01)


def max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def metrics_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
