"""The package's import graph: one-way flow (issue 17).

The graph is built with :mod:`ast` over ``src/imgclust`` — every ``import`` / ``from ... import``
anywhere in a module (module level, inside functions, under ``TYPE_CHECKING``) is an edge, so a
lazy import that hides a cycle at runtime still counts. Two rules:

* no import cycles among imgclust modules (a failure lists the modules of each cycle and one
  closed path through them);
* the lower layers (data, backbones, features, train, losses, heads, refine, consensus) never
  import ``imgclust.api``, ``imgclust.run`` or ``imgclust.cli``.

An import of a module's own ancestor package (``from imgclust import __version__`` inside
``imgclust.api``) is not an edge: Python initialises the ancestors before the module anyway.
Dynamic imports through :func:`importlib.import_module` (the backbone registry loading its
families, ``imgclust.api``'s deprecated re-exports of the names that moved to ``imgclust.run``)
are not edges either: they run only when asked for, after the importing module is loaded.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "src" / "imgclust"
LOWER = ("data", "backbones", "features", "train", "losses", "heads", "refine", "consensus")
UPPER = ("imgclust.api", "imgclust.run", "imgclust.cli")


def module_files(root: Path = PKG) -> dict[str, Path]:
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def import_graph(root: Path = PKG) -> dict[str, set[str]]:
    """module -> the imgclust modules it imports (anywhere in the file)."""
    mods = module_files(root)

    def resolve(name: str) -> str | None:  # the longest imgclust module that ``name`` names
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                deps.update(r for a in node.names if (r := resolve(a.name)))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([node.module] if node.module else []))
                for a in node.names:  # ``from imgclust import api`` imports the module imgclust.api
                    r = resolve(f"{base}.{a.name}") if f"{base}.{a.name}" in mods else resolve(base)
                    if r:
                        deps.add(r)
        graph[mod] = {d for d in deps if d != mod and not mod.startswith(d + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def closed_path(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """One cycle through the first module of a strongly connected component (BFS back to it)."""
    members, start = set(comp), comp[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:  # walk the predecessors back from v to start
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def test_graph_sees_function_level_imports():
    g = import_graph()
    # imported inside a function body only: the graph must still see it (a cycle could hide there)
    assert "imgclust.choosek" in g["imgclust.validate"]
    assert "imgclust.backbones.registry" in g["imgclust.backbones"]
    assert len(g) > 100


def test_cycle_finder_reports_a_planted_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    (comp,) = cycles(g)
    assert comp == ["a", "b", "c"]
    assert closed_path(g, comp) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    g = import_graph()
    found = cycles(g)
    msg = "\n".join(f"cycle among {comp}: {' -> '.join(closed_path(g, comp))}" for comp in found)
    assert not found, "import cycles in src/imgclust:\n" + msg


def test_lower_layers_never_import_api_run_or_cli():
    g = import_graph()
    bad = sorted(
        f"{mod} imports {dep}"
        for mod, deps in g.items()
        if any(mod == f"imgclust.{layer}" or mod.startswith(f"imgclust.{layer}.") for layer in LOWER)
        for dep in deps
        if dep in UPPER
    )
    assert not bad, "lower layers importing api/run/cli:\n" + "\n".join(bad)


def test_no_private_names_imported_across_modules():
    """``from imgclust.x import _private`` from another module: a private function used as an API."""
    bad = []
    for mod, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("imgclust") and not node.level:
                bad += [f"{mod} imports {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")
                        and node.module != mod and not node.module.startswith(mod + ".")
                        and not mod.startswith(node.module + ".")]
    assert not bad, "private names used across modules:\n" + "\n".join(sorted(bad))
