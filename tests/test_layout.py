"""The package's layout: no import cycle, modules of a readable size, every method module listed."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = "flexmerge"
MAX_LINES = 600
LONG_MODULES: dict[str, str] = {
    # module: why it may be longer than MAX_LINES (none today)
}


def package_modules(root: Path = SRC, pkg: str = PKG) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``)."""
    out = {}
    for p in sorted((root / pkg).rglob("*.py")):
        parts = list(p.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return out


def import_graph(mods: dict[str, tuple[Path, bool]], pkg: str = PKG) -> dict[str, set[str]]:
    """Module -> package modules it imports anywhere in its text (top level, inside functions,
    under ``TYPE_CHECKING``): a design dependency either way. Importing ``a.b`` counts as an edge
    to ``a.b`` only, not to the parent packages Python also runs."""
    graph = {}
    for name, (path, is_pkg) in mods.items():
        here = name if is_pkg else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                subs = {f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in mods}
                found.update(subs)
                if node.module or len(subs) < len(node.names):
                    found.add(mod)
        graph[name] = {m for m in found if m in mods and m not in (name, pkg)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / PKG
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import x\n")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from ..c import y\n")
    (pkg / "c.py").write_text("from flexmerge import a\n")
    (pkg / "d.py").write_text("from . import c\n")
    graph = import_graph(package_modules(tmp_path))
    assert graph["flexmerge.a"] == {"flexmerge.sub.b", "flexmerge.sub"}
    assert cycles(graph) == [["flexmerge.a", "flexmerge.c", "flexmerge.sub.b"]]


def test_no_import_cycle_inside_the_package():
    found = cycles(import_graph(package_modules()))
    assert not found, f"import cycles: {found}"


def test_no_module_over_600_lines_without_a_reason():
    mods = package_modules()
    long = {name: len(path.read_text().splitlines()) for name, (path, _) in mods.items()}
    long = {name: n for name, n in long.items() if n > MAX_LINES}
    assert set(long) <= set(LONG_MODULES), f"modules over {MAX_LINES} lines: {long}"
    assert set(LONG_MODULES) <= set(mods), "LONG_MODULES names a module that does not exist"


def test_no_module_shadowed_by_a_package():
    """``x.py`` beside a package ``x/`` is never imported (the package wins): edits to it are lost."""
    shadowed = [str(p.relative_to(SRC)) for p in (SRC / PKG).rglob("*.py")
                if (p.with_suffix("") / "__init__.py").is_file()]
    assert not shadowed, f"modules shadowed by a package of the same name: {shadowed}"


def test_every_method_module_is_listed_for_discovery():
    """A module under methods/ that registers a method must be in ``_all.METHOD_MODULES``
    (otherwise its method would be silently missing from the registry)."""
    from flexmerge.methods import _all

    registering = set()
    for p in (SRC / PKG / "methods").glob("*.py"):
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(
                    (isinstance(d, ast.Name) and d.id == "register")
                    or (isinstance(d, ast.Attribute) and d.attr == "register") for d in node.decorator_list):
                registering.add(p.stem)
    assert registering, "no registered method found: the check itself is broken"
    missing = registering - set(_all.METHOD_MODULES)
    assert not missing, f"method modules missing from flexmerge/methods/_all.py: {sorted(missing)}"


def test_method_discovery_fails_loudly(monkeypatch):
    from flexmerge.methods import _all

    real = importlib.import_module

    def broken(name, *args, **kw):
        if name == "flexmerge.methods.dare":
            raise ModuleNotFoundError("No module named 'flexmerge.methods.dare'", name=name)
        return real(name, *args, **kw)

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ImportError, match="flexmerge.methods.dare"):
        importlib.reload(_all)
    monkeypatch.undo()
    importlib.reload(_all)


def test_documented_imports_still_work():
    from flexmerge.evaluate import SweepResult, load_callable, parse_sizes, sweep  # noqa: F401
    from flexmerge.runtime import MultiTaskModel, _hf_config_dir, _Routed  # noqa: F401
