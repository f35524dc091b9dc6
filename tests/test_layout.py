"""The code's shape, checked: imports flow one way through the layers, no circles, no borrowed private names,
no module past ~500 lines without a reason at its top. A new module must be placed in LAYERS to pass."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "llmkit"

# Lower numbers are lower layers; a module may import its own layer or lower ones, never a higher one.
LAYERS = {
    # low-level: no llmkit imports beyond this layer
    "llmkit": 0, "llmkit.errors": 0, "llmkit.machine": 0, "llmkit.progress": 0, "llmkit.config": 0, "llmkit.runfolder": 0,
    "llmkit.losses": 0, "llmkit.chunked_loss": 0,
    # models: resolving and loading them
    "llmkit.int8": 1, "llmkit.gguf_base": 1, "llmkit.models": 1, "llmkit.qlora": 1, "llmkit.meta_build": 1,
    # shared machinery: data, the run lifecycle and loop, evaluation, generation backends, GGUF, serving engine
    "llmkit.datafiles": 2, "llmkit.chat": 2, "llmkit.data": 2, "llmkit.datarows": 2, "llmkit.encoding": 2,
    "llmkit.streaming": 2, "llmkit.prepare": 2, "llmkit.sharding": 2, "llmkit.checkpoints": 2, "llmkit.evaluation": 2,
    "llmkit.train": 2, "llmkit.outputs": 2, "llmkit.pairs": 2, "llmkit.preference": 2, "llmkit.run": 2, "llmkit.lora": 2, "llmkit.students": 2,
    "llmkit.speedups": 2,
    "llmkit.generation": 2, "llmkit.gguf_tokenizer": 2, "llmkit.gguf_convert": 2, "llmkit.gguf": 2, "llmkit.backends": 2,
    "llmkit.backends.transformers": 2, "llmkit.backends.llama_cpp": 2, "llmkit.serving": 2, "llmkit.serving.job": 2,
    "llmkit.serving.protocol": 2, "llmkit.serving.llama_batch": 2, "llmkit.serving.engine": 2, "llmkit.trackers": 2,
    # capabilities: one per command
    "llmkit.finetune": 3, "llmkit.distill": 3, "llmkit.evaluate": 3, "llmkit.quantization": 3, "llmkit.serve": 3,
    "llmkit.memory": 3, "llmkit.catalog": 3, "llmkit.terminal_chat": 3,
    # the CLI
    "llmkit.commands": 4, "llmkit.commands.options": 4, "llmkit.cli": 5, "llmkit.__main__": 5,
    **{f"llmkit.commands.{c}": 4 for c in ("chat", "distill", "evaluate", "finetune", "generate", "models", "prepare", "quantize", "serve")},
}
MAX_LINES = 500


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str]]:
    """(imported module, imported name) for every llmkit import in the module, at any depth (lazy ones too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((full, "") if full in known else (base, alias.name))
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
    return [(m, n) for m, n in found if m == "llmkit" or m.startswith("llmkit.")]


def test_every_module_has_a_layer():
    assert sorted(set(modules()) - set(LAYERS)) == []


def test_imports_flow_down_and_take_no_private_names():
    known = modules()
    wrong = []
    for name, path in known.items():
        for target, imported in imports(name, path, known):
            if target != name and LAYERS.get(target, 99) > LAYERS[name]:
                wrong.append(f"{name} (layer {LAYERS[name]}) imports {target} (layer {LAYERS.get(target)})")
            if imported.startswith("_") and not imported.startswith("__"):
                wrong.append(f"{name} imports the private {target}.{imported}")
    assert wrong == []


def test_no_import_circles():
    known = modules()
    graph = {name: {t for t, _ in imports(name, path, known) if t in known and t != name} for name, path in known.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt == "llmkit":  # the package root holds only the version
                continue
            if state.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, node])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            assert visit(start, []) is None


@pytest.mark.parametrize("name", sorted(modules()))
def test_modules_stay_readable(name):
    path = modules()[name]
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_LINES or "Over 500 lines because" in "\n".join(lines[:30]), f"{path}: {len(lines)} lines"


def test_fit_is_one_screen():
    tree = ast.parse((ROOT / "train.py").read_text(encoding="utf-8"))
    fit = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "fit")
    assert fit.end_lineno - fit.lineno < 100
