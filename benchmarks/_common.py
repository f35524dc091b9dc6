"""Helpers shared by the fine-tuning benchmarks: run a command, time it, parse `key=value` lines."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
LLMKIT = [sys.executable, "-m", "llmkit"]
# The CPU features that decide which precision and kernels are fast (GUIDE §3: bf16 only pays with AMX).
CPU_FLAGS = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni")


def cpu_line() -> str:
    """`cpu: Intel(R) Xeon(R) ... (2 cores) amx_bf16=no amx_int8=no avx512_bf16=yes avx512_vnni=yes`.

    Machines differ from session to session by up to 2x, so every benchmark prints what it ran on first.
    """
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    name = value.strip()
                elif key.strip() in ("flags", "Features"):  # x86 / ARM
                    flags = set(value.split())
                    break
    except OSError:  # not Linux: the name alone
        pass
    return f"cpu: {name} ({os.cpu_count()} cores) " + " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in CPU_FLAGS)


def run(cmd: list[str], label: str) -> tuple[str, float]:
    """Run a command to completion; returns (stdout + stderr, wall seconds). A failure ends the benchmark."""
    t = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"{label} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr, wall


def fields(text: str, prefix: str) -> dict[str, float]:
    """`peer_trainer train_s=12.3 samples_per_s=45.6` -> {'train_s': 12.3, 'samples_per_s': 45.6}."""
    line = next(line for line in text.splitlines() if line.startswith(prefix))
    return {k: float(v) for k, v in re.findall(r"(\w+)=([-\d.]+)", line)}


def run_facts(out: Path) -> dict:
    return json.loads((out / "llmkit.json").read_text())["llmkit"]
