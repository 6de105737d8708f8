"""The import graph of the qlfast package (read with ast, nothing imported): no cycle, no import from a lower layer to
a higher one, and no module importing an entry point (qlfast.train, qlfast.eval).

Every import statement counts, at module level or inside a function (a lazy import is still a dependency). Importing
qlfast.a.b also runs the package qlfast.a's __init__, so it is an edge to that package too, unless the importer lives
in qlfast.a itself (its package is always imported first).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top: a module may import its own layer and the layers below it. kernels/ (installed as qlfast.kernels)
# knows nothing of qlfast; the pure-torch references sit under the ops that dispatch to them; the entry points are
# the top and nothing imports them.
LAYERS = [
    ("qlfast", "qlfast.kernels"),
    ("qlfast.ref",),
    ("qlfast.ops",),
    ("qlfast.model",),
    ("qlfast.parallel",),
    ("qlfast.rollout",),
    ("qlfast.reward",),
    ("qlfast.rl", "qlfast.metrics"),
    ("qlfast.data",),
    ("qlfast.config",),
    ("qlfast.planner",),
    ("qlfast.evaluation",),
    ("qlfast.trainer",),
    ("qlfast.train", "qlfast.eval", "qlfast.plan", "qlfast.testing"),
]
ENTRY_POINTS = {"qlfast.train", "qlfast.eval", "qlfast.plan"}

def _modules() -> dict[str, Path]:
    mods = {}
    for base, prefix in ((ROOT / "qlfast", "qlfast"), (ROOT / "kernels", "qlfast.kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = [prefix, *path.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]  # qlfast.a for qlfast.a.b; never the root


def _graph() -> dict[tuple[str, str], str]:
    """-> {(importer, imported): the import it comes from} over qlfast's modules."""
    mods = _modules()
    edges = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for target in targets:
                if not target.startswith("qlfast") or target == mod:
                    continue
                while target not in mods:  # `import qlfast.x.y` of a non-module attribute: its module
                    target = target.rpartition(".")[0]
                key = (mod, target)
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                edges[key] = where
                for pkg in _ancestors(target):
                    if pkg not in _ancestors(mod) and pkg != mod and (mod, pkg) not in edges:
                        edges[(mod, pkg)] = f"{where} (runs {pkg.replace('.', '/')}/__init__.py)"
    return edges


def _layer(mod: str) -> int:
    best = None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (mod == name or mod.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (i, name)
    assert best is not None, f"{mod} is in no layer: add it to LAYERS"
    return best[0]


def test_no_import_cycle():
    graph: dict[str, set[str]] = {}
    for a, b in _graph():
        graph.setdefault(a, set()).add(b)
    # Tarjan's strongly connected components: any component of two or more modules is a cycle
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_import_from_a_lower_layer_to_a_higher_one():
    bad = [f"{a} -> {b} ({where})" for (a, b), where in sorted(_graph().items()) if _layer(a) < _layer(b)]
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_module_imports_an_entry_point():
    bad = [f"{a} -> {b} ({where})" for (a, b), where in sorted(_graph().items()) if b in ENTRY_POINTS]
    assert not bad, "the entry points are imported by the library:\n" + "\n".join(bad)


def test_the_checks_see_what_they_check():
    """The graph holds the imports it must (a check that sees no edges passes vacuously)."""
    edges = _graph()
    assert ("qlfast.train", "qlfast.trainer.rl_step") in edges and ("qlfast.eval", "qlfast.evaluation") in edges
    assert ("qlfast.model.qwen", "qlfast.ops") in edges  # through ops/__init__.py
    assert ("qlfast.rollout.parity", "qlfast.rollout") not in edges  # its own package
    assert _layer("qlfast.trainer.rl_step") > _layer("qlfast.ops.policy_loss") > _layer("qlfast.ref.attention")
