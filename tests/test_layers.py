"""The import graph of ``stda_hf`` runs one way, folder by folder (docs/architecture.md, "Layers").

Shared layers, bottom up: ``core`` (and the package root's constants), ``data``, ``models``, ``attribution``,
``metrics``. A stage folder (``fetch``, ``generate``, ``label``, ``dataset``, ``training``, ``explain``) imports the
shared layers and itself, never another stage. Orchestrators (``demo``, ``benchmark``) and the CLI import a stage
only through its public face (``stda_hf.<stage>``), never its internals; nothing but ``__main__`` imports the CLI.

The graph is read from the source (every ``import`` statement, function-local ones included), not from what
Python happens to have loaded, so a lazy import inside a function counts like a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "stda_hf"

LAYERS = ("core", "data", "models", "attribution", "metrics")
"""The shared layers, bottom up: each may import the ones before it and itself."""

STAGES = ("fetch", "generate", "label", "dataset", "training", "explain")
"""One folder per stage of the flow; a stage imports the shared layers and itself, never another stage."""

ORCHESTRATORS = ("demo", "benchmark")
"""Run several stages in order: they may import stages (their public face), never the CLI."""

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


def unit(name: str) -> str:
    """The folder a module belongs to: ``core`` for the package root, else the first name below ``stda_hf``."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "core"


def kind(name: str) -> str:
    if name == CLI:
        return "cli"
    if name in ENTRY_POINTS:
        return "entry"
    top = unit(name)
    if top in STAGES:
        return "stage"
    if top in ORCHESTRATORS:
        return "orchestrator"
    if top in LAYERS:
        return "layer"
    return "unknown"


def why_forbidden(src: str, dst: str) -> str | None:
    """Why ``src`` may not import ``dst``, or None when the import keeps to the layers."""
    a, b = kind(src), kind(dst)
    if unit(src) == unit(dst):
        return None
    if "unknown" in (a, b):
        return f"{src if a == 'unknown' else dst} sits in no known folder: add it to LAYERS, STAGES or ORCHESTRATORS"
    if b == "cli" and a != "entry":
        return "only the entry point imports the CLI"
    if b == "entry":
        return "nothing imports the entry point"
    if a == "layer":
        return (
            None if b == "layer" and LAYERS.index(unit(dst)) < LAYERS.index(unit(src)) else f"{a} imports {b}"
        )
    if a == "stage":
        return None if b == "layer" else "stage imports another stage"
    if b == "stage" and dst != f"stda_hf.{unit(dst)}":
        return "imports a stage's internals (use its public face, stda_hf.<stage>)"
    return None


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
    return [
        f"{src} -> {dst} ({why})"
        for src, targets in sorted(edges.items())
        for dst in sorted(targets)
        if (why := why_forbidden(src, dst))
    ]


def test_the_package_has_no_import_circle():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_every_import_keeps_to_the_folder_layers():
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
    sideways = {
        "stda_hf.label.stage": {"stda_hf.generate.engines", "stda_hf.core.utils", "stda_hf.label.teacher"}
    }
    assert forbidden(sideways) == [
        "stda_hf.label.stage -> stda_hf.generate.engines (stage imports another stage)"
    ]


def test_the_checker_refuses_internals_upward_imports_and_unknown_folders():
    edges = {
        "stda_hf.demo": {"stda_hf.generate", "stda_hf.generate.stage"},
        "stda_hf.data.split": {"stda_hf.models.vgg", "stda_hf.core.fileio"},
        "stda_hf.core.utils": {"stda_hf.cli"},
        "stda_hf.gadgets": {"stda_hf.core.utils"},
    }
    assert forbidden(edges) == [
        "stda_hf.core.utils -> stda_hf.cli (only the entry point imports the CLI)",
        "stda_hf.data.split -> stda_hf.models.vgg (layer imports layer)",
        "stda_hf.demo -> stda_hf.generate.stage (imports a stage's internals (use its public face, stda_hf.<stage>))",
        "stda_hf.gadgets -> stda_hf.core.utils (stda_hf.gadgets sits in no known folder: add it to LAYERS, STAGES or "
        "ORCHESTRATORS)",
    ]


def test_every_stage_and_layer_is_a_folder():
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert folders == set(LAYERS) | set(STAGES) | {"benchmark"}
    modules_at_top = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules_at_top == {"__init__", "__main__", "cli", "demo"}


def test_the_checker_resolves_relative_and_function_local_imports(tmp_path):
    known = {"stda_hf", "stda_hf.models", "stda_hf.models.vgg", "stda_hf.core.errors", "stda_hf.data.real"}
    source = tmp_path / "vgg.py"
    source.write_text(
        "from .. import LABELS\nfrom ..core.errors import StdaError\nimport numpy\n"
        "def f():\n    from stda_hf.data.real import RealFolder\n"
    )
    assert imported("stda_hf.models.vgg", source, known) == {
        "stda_hf",
        "stda_hf.core.errors",
        "stda_hf.data.real",
    }
