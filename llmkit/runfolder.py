"""What an llmkit output folder holds, by name, and the one way llmkit reads and writes JSON.

    OUT/
      config.json, model.safetensors       (full / merged)   or   adapter_config.json, adapter_model.safetensors (LoRA)
      tokenizer files
      llmkit.json       RECORD: the resolved recipe + run facts (llmkit loads adapters' base models from it)
      metrics.jsonl     METRICS: one JSON object per logged step and per evaluation
      loss.png          LOSS_PLOT: train / eval loss curves
      README.md         model card: final metrics, the command that made it, how to load it
      checkpoints/      CHECKPOINTS: resumable checkpoints (step-*) and the best weights (best-*)
      .tmp-model/       TMP_MODEL: the model folder being written; its files are renamed into OUT when complete

Every module that touches a run folder takes these names from here, so the layout is written down once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmkit.atomic import write_atomic
from llmkit.errors import UsageError

RECORD = "llmkit.json"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"
CHECKPOINTS = "checkpoints"
TMP_MODEL = ".tmp-model"


def read_json(path: Path, *, strict: bool = True) -> dict[str, Any]:
    """A JSON object from `path`: {} when the file is missing or holds something else than an object.

    A file that exists but does not parse is a damaged folder: a UsageError saying so (`strict`), or {} where the
    caller only looks around (listing models, reading a checkpoint's state that a crash may have cut short).
    """
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        if not strict:
            return {}
        raise UsageError(f"{path} is not valid JSON ({e}); the folder that holds it is damaged") from None
    return data if isinstance(data, dict) else {}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` through a temporary file and a rename: a reader sees the old file or the new one, never half."""
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def read_record(out: Path) -> dict[str, Any] | None:
    """The llmkit.json of a run folder, or None if `out` is not an llmkit run."""
    data = read_json(out / RECORD, strict=False)
    return data if "llmkit" in data else None


def read_metrics(out: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows; a half-written last line (a killed run) is skipped."""
    path = out / METRICS
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
