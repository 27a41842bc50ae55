"""The engine's layers: no import circles, no arrows back up, no private reached from outside."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import gpuctx.engine
from gpuctx.engine import Scheduler, Session

ROOT = pathlib.Path(__file__).resolve().parent.parent
PKG = ROOT / "gpuctx"


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    for p in sorted((ROOT / "magics").glob("*.py")):
        mods["gpuctx.magics" if p.stem == "__init__" else f"gpuctx.magics.{p.stem}"] = p
    return mods


def _imports(name: str, path: pathlib.Path, known: set[str], top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):   # annotations only: never run, so no edge
        if hasattr(node, "body") and isinstance(node.body, list):
            node.body = [n for n in node.body if not (isinstance(n, ast.If) and isinstance(n.test, ast.Name)
                                                        and n.test.id == "TYPE_CHECKING")]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            cands = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        elif isinstance(node, ast.Import):
            cands = [a.name for a in node.names]
        else:
            continue
        out |= {c for c in cands if c in known and c != name}
    return out


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods), top_level_only) for m, p in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    for start in graph:
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, iter(sorted(graph[nxt]))))
    return None


def test_no_import_circles_even_counting_lazy_imports():
    # The one edge left out: the magics import the package root, whose load_ipython_extension
    # imports them when IPython asks (%load_ext gpuctx). The root is the whole public API, so
    # the extension (the top layer) uses it like any notebook does.
    graph = {m: d - {"gpuctx"} for m, d in _graph(top_level_only=False).items()}
    assert _cycle(graph) is None
    assert _cycle(_graph(top_level_only=True)) is None


def test_no_arrow_back_up_into_the_layers_above_the_engine():
    above = {"gpuctx", "gpuctx.api", "gpuctx.status", "gpuctx.magics", "gpuctx.sim", "gpuctx.__main__", "gpuctx.zoo",
             "gpuctx.cluster", "gpuctx.cluster._driver", "gpuctx.cluster._worker"}
    for mod, deps in _graph(top_level_only=False).items():
        if mod.startswith("gpuctx.engine"):
            assert not deps & above, (mod, deps & above)
        elif mod not in above:   # the layers below the engine never reach up into it
            assert not any(d.startswith("gpuctx.engine") for d in deps), (mod, deps)


def test_import_time_shows_no_engine_module_imported_twice_or_torch():
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import gpuctx"], capture_output=True,
                         text=True, check=True, cwd=ROOT).stderr
    names = [line.rsplit("|", 1)[-1].strip() for line in out.splitlines() if "|" in line]
    assert "gpuctx.engine.scheduler" in names and "torch" not in names
    assert len([n for n in names if n.startswith("gpuctx")]) == len({n for n in names if n.startswith("gpuctx")})


def _engine_privates() -> set[str]:
    names = {n for cls in (Scheduler, Session) for k in cls.__mro__ for n in vars(k) if n.startswith("_")
             and not n.startswith("__")}
    for p in (PKG / "engine").glob("*.py"):   # instance attributes set as self._x = ...
        for node in ast.walk(ast.parse(p.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.ctx, ast.Store)):
                names.add(node.attr)
    return names


def test_no_module_outside_the_engine_touches_an_engine_private():
    privates = _engine_privates()
    assert {"_cond", "_ledger", "_slots", "_device", "_granted"} <= privates
    found = []
    for mod, path in _modules().items():
        if mod.startswith("gpuctx.engine"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in privates
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                found.append(f"{mod}:{node.lineno} .{node.attr}")
    assert found == []


def test_the_engine_modules_are_small_and_the_facade_is_a_few_hundred_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (PKG / "engine").glob("*.py")}
    assert max(sizes.values()) <= 420, sizes
    facade = ast.parse((PKG / "engine" / "scheduler.py").read_text())
    cls = next(n for n in facade.body if isinstance(n, ast.ClassDef) and n.name == "Scheduler")
    assert cls.end_lineno - cls.lineno < 300
    assert gpuctx.engine.__all__
