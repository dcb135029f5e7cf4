"""The house's shape, read from the source alone (ast; nothing is imported).

Imports run one way, from the command line down to the errors (docs/ARCHITECTURE.md):
cli -> library -> evaluation -> student -> teacher -> store -> inputs -> _runtime -> errors.
No import circles (lazy imports inside functions count), no module over ~400 lines,
no public function named like its module, and every package says what it owns.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "softlabels"
# lowest first; a module may import its own wing and any wing below it
WINGS = ("errors", "_version", "_runtime", "inputs", "store", "teacher", "student", "evaluation", "library", "cli", "__main__")
MAX_LINES = 420


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Modules of softlabels that ``name`` imports, anywhere in its body (lazy imports too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            candidates = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found.update(c for c in candidates if c in MODULES and c != name and not name.startswith(c + "."))
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _wing(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None  # the package itself: the public API, above every wing



def test_no_import_circles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_imports_run_down_the_pipeline():
    up = []
    for name, targets in GRAPH.items():
        wing = _wing(name)
        if wing is None:
            continue
        for t in targets:
            tw = _wing(t)
            if tw is None:
                up.append(f"{name} -> {t} (the package's public API)")
            elif WINGS.index(tw) > WINGS.index(wing):
                up.append(f"{name} -> {t}")
    assert not up, "imports that run back up: " + "; ".join(sorted(up))


def test_every_wing_is_known_and_the_top_is_small():
    entries = sorted(p.name for p in PACKAGE.iterdir() if not p.name.startswith((".", "__pycache__")) and p.name != "py.typed")
    wings = {p.stem for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__")} | {"errors", "_version"}
    assert wings <= set(WINGS), wings - set(WINGS)
    assert len(entries) <= 12, entries  # eight packages and four modules


@pytest.mark.parametrize("name", sorted(n for n, p in MODULES.items() if p.name == "__init__.py"))
def test_every_package_says_what_it_owns(name):
    doc = ast.get_docstring(ast.parse(MODULES[name].read_text())) or ""
    assert len(doc.split()) >= 12, f"{name}: a one-paragraph docstring saying what it owns and may import"



def test_no_module_is_long():
    long = {n: len(p.read_text().splitlines()) for n, p in MODULES.items()}
    assert not {n: k for n, k in long.items() if k > MAX_LINES}, sorted(long.items(), key=lambda kv: -kv[1])[:5]


def test_no_public_function_is_named_like_its_module():
    clashes = []
    for name, path in MODULES.items():
        leaf = name.rpartition(".")[2]
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == leaf:
                clashes.append(name)
    assert not clashes, clashes
