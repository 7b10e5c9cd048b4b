"""The import graph of ``stda_hf`` runs one way: no circles, no stage importing another, nothing but ``__main__``
importing the CLI (DESIGN.md, "Boundaries").

The graph is read from the source (every ``import`` statement, function-local ones included), not from what
Python happens to have loaded, so a lazy import inside a function counts like a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "stda_hf"

STAGES = ("fetch", "phantoms", "split", "generate", "label", "package", "push", "training", "explain")
"""One module (or package) per stage of the flow; a stage imports helpers and models, never another stage."""

ORCHESTRATORS = ("demo", "benchmark")
"""Run several stages in order: they may import stages, never the CLI."""

CLI = "stda_hf.cli"
ENTRY_POINTS = ("stda_hf.__main__",)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The ``stda_hf`` modules that ``path`` (module ``name``) imports, resolved to modules that exist."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {_existing(alias.name, known) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in known else _existing(base, known))
    return {m for m in found if m and m != name}


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    base = ".".join(parts[: len(parts) - node.level + 1])
    return f"{base}.{node.module}" if node.module else base


def _existing(name: str, known: set[str]) -> str:
    """``name`` or its nearest enclosing module that is part of ``stda_hf``; "" for other packages."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported(name, path, set(found)) for name, path in found.items()}


def group(name: str) -> str:
    """The layer unit of a module: ``stda_hf.<top>`` for stages and orchestrators (their submodules are one unit)."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else name


def kind(name: str) -> str:
    top = name.split(".")[1] if "." in name else ""
    if name == CLI:
        return "cli"
    if name in ENTRY_POINTS:
        return "entry"
    if top in STAGES:
        return "stage"
    if top in ORCHESTRATORS:
        return "orchestrator"
    return "helper"


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def forbidden(edges: dict[str, set[str]]) -> list[str]:
    """Every import that breaks the layer rules, as ``importer -> imported (why)``."""
    allowed = {
        "entry": {"cli", "helper"},
        "cli": {"stage", "orchestrator", "helper"},
        "orchestrator": {"stage", "orchestrator", "helper"},
        "stage": {"helper"},
        "helper": {"helper"},
    }
    bad = []
    for src, targets in sorted(edges.items()):
        for dst in sorted(targets):
            same_unit = group(src) == group(dst) and kind(src) in ("stage", "orchestrator")
            if not same_unit and kind(dst) not in allowed[kind(src)]:
                bad.append(f"{src} -> {dst} ({kind(src)} imports {kind(dst)})")
    return bad


def test_the_package_has_no_import_circle():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_no_stage_or_helper_imports_a_stage_or_the_cli():
    assert forbidden(graph()) == [], "\n".join(forbidden(graph()))


def cli_names_imported(path: Path) -> set[str]:
    """The names ``path`` imports from ``stda_hf.cli`` (``*`` for ``import stda_hf.cli``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module == CLI:
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.Import) and any(alias.name == CLI for alias in node.names):
            names.add("*")
    return names


def test_scripts_outside_the_package_use_the_cli_only_as_an_entry_point():
    """``train.py`` and the benchmark scripts take their plumbing from ``config`` and ``errors``; a wrapper may
    hand its arguments to ``stda_hf.cli.main`` (an entry point), nothing else."""
    scripts = [ROOT / "train.py", *sorted((ROOT / "benchmarks").glob("*.py"))]
    plumbing = {p.name: cli_names_imported(p) - {"main"} for p in scripts}
    assert {name: used for name, used in plumbing.items() if used} == {}


def test_the_checker_sees_a_circle_and_a_sideways_import():
    edges = {"stda_hf.a": {"stda_hf.b"}, "stda_hf.b": {"stda_hf.a"}}
    assert find_cycle(edges) == ["stda_hf.a", "stda_hf.b", "stda_hf.a"]
    sideways = {"stda_hf.training": {"stda_hf.explain"}, "stda_hf.real": {"stda_hf.utils"}}
    assert forbidden(sideways) == ["stda_hf.training -> stda_hf.explain (stage imports stage)"]


def test_the_checker_resolves_relative_and_function_local_imports(tmp_path):
    known = {"stda_hf", "stda_hf.models", "stda_hf.models.vgg", "stda_hf.errors", "stda_hf.real"}
    source = tmp_path / "vgg.py"
    source.write_text(
        "from .. import LABELS\nfrom ..errors import StdaError\nimport numpy\n"
        "def f():\n    from stda_hf.real import RealFolder\n"
    )
    assert imported("stda_hf.models.vgg", source, known) == {"stda_hf", "stda_hf.errors", "stda_hf.real"}
