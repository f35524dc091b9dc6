"""The code's shape, checked: a module's folder is its layer, imports flow one way between layers (the one
declaration below), no circles, no borrowed private names, no module past ~500 lines without a reason at its
top, and the README's code map is the one rendered from this declaration (`python tests/test_layout.py`
rewrites it after a change)."""

from __future__ import annotations

import ast
import importlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "llmkit"
README = ROOT.parent / "README.md"

# The modules that stay in the llmkit/ root, by role (a package's role is its __init__ docstring's first line).
ROOT_MODULES = {
    "foundations": (["config", "errors", "machine", "progress", "atomic", "runfolder"],
                    "foundations: recipes and flags, exit codes, CPU facts, progress bars, crash-safe writes, run-folder names"),
    "capabilities": (["finetune", "distill", "evaluate", "quantize"],
                     "capabilities: each command's work, described on the layers below (training commands are an Objective)"),
    "cli": (["cli", "__main__"], "the CLI entry point: the Typer app, exit codes for every LlmkitError"),
}
# The layers, lowest first, and what each may import besides the foundations and itself. This is the one declaration.
MAY_IMPORT: dict[str, list[str]] = {
    "foundations": [],
    "models": [],
    "data": ["models"],
    "export": ["models", "data"],
    "inference": ["models", "export"],
    "training": ["models", "data"],
    "serving": ["models", "inference"],
    "capabilities": ["models", "data", "export", "inference", "training"],
    "commands": ["models", "data", "export", "inference", "training", "serving", "capabilities"],
    "cli": ["commands"],
}
MAX_LINES = 500
MAX_ROOT_MODULES = 14


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 1:
        return "foundations"  # the package root: the version and the lazy public names
    if (ROOT / parts[1]).is_dir():
        return parts[1]
    return next((role for role, (names, _) in ROOT_MODULES.items() if parts[1] in names), "unplaced")


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
    assert sorted(name for name in modules() if layer(name) not in MAY_IMPORT) == []


def test_the_root_holds_only_capabilities_foundations_and_the_cli():
    root = sorted(p.stem for p in ROOT.glob("*.py"))
    assert len(root) <= MAX_ROOT_MODULES, root


def test_imports_flow_down_and_take_no_private_names():
    known = modules()
    wrong = []
    for name, path in known.items():
        here = layer(name)
        allowed = {here, "foundations", *MAY_IMPORT[here]}
        for target, imported in imports(name, path, known):
            if target in known and layer(target) not in allowed:
                wrong.append(f"{name} ({here}) imports {target} ({layer(target)})")
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
            if nxt == "llmkit" or known[nxt].name == "__init__.py":  # package roots only re-export, lazily
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


def test_inside_llmkit_imports_name_the_defining_module():
    """Re-exports are for users: inside llmkit an import names the module that defines the name, so the layer check
    above sees the real edge (a package's __init__ would hide it)."""
    known = modules()
    wrong = [f"{name} imports {target}.{imported}" for name, path in known.items()
             for target, imported in imports(name, path, known)
             if imported and target in known and known[target].name == "__init__.py" and target != "llmkit"
             and f"{target}.{imported}" not in known]
    assert wrong == []


@pytest.mark.parametrize("package", ["llmkit", *sorted(f"llmkit.{p.name}" for p in ROOT.iterdir() if (p / "__init__.py").exists())])
def test_public_names_load_and_shadow_no_module(package):
    module = importlib.import_module(package)
    for name in getattr(module, "__all__", []):
        assert not (ROOT.parent / package.replace(".", "/") / f"{name}.py").exists(), f"{package}.{name} is also a module"
        assert getattr(module, name) is not None


@pytest.mark.parametrize("name", sorted(modules()))
def test_modules_stay_readable(name):
    path = modules()[name]
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_LINES or "Over 500 lines because" in "\n".join(lines[:30]), f"{path}: {len(lines)} lines"


def test_fit_is_one_screen():
    tree = ast.parse((ROOT / "training" / "loop.py").read_text(encoding="utf-8"))
    fit = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "fit")
    assert fit.end_lineno - fit.lineno < 100


def code_map() -> str:
    """The README's code map: the layers, highest first, each with its files and role."""
    rows = []
    for group in reversed(MAY_IMPORT):
        if group in ROOT_MODULES:
            names, role = ROOT_MODULES[group]
            files = " ".join(f"{n}.py" for n in names)
        else:
            package = ROOT / group
            role = ast.get_docstring(ast.parse((package / "__init__.py").read_text(encoding="utf-8"))).splitlines()[0]
            files = f"{group}/ " + " ".join(sorted(p.name for p in package.glob("*.py") if p.name != "__init__.py"))
        may = ", ".join(MAY_IMPORT[group]) or "nothing"
        rows.append(f"{files}\n    {role}\n    imports: {may}{'' if group == 'foundations' else ' (and the foundations)'}")
    return "```text\n" + "\n".join(rows) + "\n```"


MAP = re.compile(r"(<!-- code-map: .*? -->\n)(.*?)(\n<!-- /code-map -->)", re.S)


def test_readme_code_map_is_the_declared_one():
    found = MAP.search(README.read_text(encoding="utf-8"))
    assert found, "README.md has no <!-- code-map: ... --> block"
    assert found.group(2) == code_map(), "the README's code map is stale: run `python tests/test_layout.py`"


if __name__ == "__main__":
    text = README.read_text(encoding="utf-8")
    README.write_text(MAP.sub(lambda m: m.group(1) + code_map() + m.group(3), text), encoding="utf-8")
    sys.exit(0)
