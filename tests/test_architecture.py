"""The import structure: no circles between modules or between the stages (subpackages).

Built from the source with ``ast`` (no import runs). Every ``import`` counts, at module level or
inside a function, except those under ``if TYPE_CHECKING:`` (annotations only). The stages are the
subpackages of ``stat_core`` and its top-level modules; ``stat_app`` sits above all of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("stat_core", "stat_app")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports (TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path.read_text())
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]
            if not any(n in modules for n in names):  # names inside ``base``, not its submodules
                names.append(base)
        else:
            continue
        for name in names:
            # the longest project module the name refers to (a module, or a name inside one)
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != me:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _stage(module: str) -> str:
    """``stat_core.methods.stat.analysis`` -> ``stat_core.methods``; top-level modules are their own stage."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_between_modules():
    graph = _graph()
    assert len(graph) > 40  # the whole tree was read
    cycle = _cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_import_circle_between_stages():
    graph = _graph()
    stages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        stages.setdefault(_stage(module), set()).update(_stage(t) for t in targets if _stage(t) != _stage(module))
    cycle = _cycle(stages)
    assert cycle is None, "stages import each other: " + " -> ".join(cycle)


def test_the_library_never_imports_the_app():
    graph = _graph()
    offenders = sorted(m for m, targets in graph.items()
                       if m.startswith("stat_core") and any(t.startswith("stat_app") for t in targets))
    assert offenders == []


@pytest.mark.parametrize("package", ["stat_core", "stat_app"])
def test_no_relative_import_climbs_out_of_its_package(package):
    """``from ..x import y`` would climb a floor; imports name their module absolutely or within the package."""
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 1:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert bad == []


def _library_patches(source: str) -> list[str]:
    """Assignments to an attribute of a ``stat_core`` module (``P.CONSTANT = …``, ``setattr(A, …)``) in
    ``source``: how a benchmark would vary a setting behind the library's back."""
    tree = ast.parse(source)
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("stat_core")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stat_core"):
            for a in node.names:  # a submodule imported by name (functions and classes are not patched here)
                if a.name[:1].islower() and (ROOT / (node.module.replace(".", "/")) / f"{a.name}.py").exists() \
                        or (ROOT / node.module.replace(".", "/") / a.name / "__init__.py").exists():
                    modules.add(a.asname or a.name)
    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
            if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in modules:
                found.append(f"line {node.lineno}: {t.value.id}.{t.attr} = …")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" \
                and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in modules:
            found.append(f"line {node.lineno}: setattr({node.args[0].id}, …)")
    return found


def test_the_patch_finder_finds_a_patch():
    assert _library_patches("import stat_core.pipeline as P\nP.SENSITIVITY_BATCH = 4\n") == \
        ["line 2: P.SENSITIVITY_BATCH = …"]
    assert _library_patches("from stat_core.methods.stat import analysis as A\nsetattr(A, 'f', None)\n") == \
        ["line 2: setattr(A, …)"]
    assert _library_patches("from stat_core.surgery.plan import PrunePlan\nPrunePlan.x = 1\n") == []


def test_benchmarks_vary_settings_through_the_api_not_by_patching_the_library():
    found = {path.name: _library_patches(path.read_text()) for path in sorted((ROOT / "benchmarks").glob("*.py"))}
    assert not {name: hits for name, hits in found.items() if hits}


def _names_compared(path: Path, names: set[str]) -> list[str]:
    """``x == "name"``, ``"name" != x``, ``x in ("name", …)`` in ``path`` for any of ``names``: a
    special case for one method or one family written outside the place that describes it."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        for side in [node.left, *node.comparators]:
            values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
            for v in values:
                if isinstance(v, ast.Constant) and v.value in names:
                    hits.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return hits


def _library_files(outside: str) -> list[Path]:
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")) if not p.is_relative_to(ROOT / outside)]


def test_the_name_finder_finds_a_comparison(tmp_path):
    path = ROOT / "stat_core" / "_probe_names.py"
    try:
        path.write_text("a = m == 'stat'\nb = 'flap' in x\nc = k in ('qwen2', 'z')\nd = {'stat': 1}\n")
        assert len(_names_compared(path, {"stat", "flap", "qwen2"})) == 3
    finally:
        path.unlink()


def test_no_method_name_is_compared_outside_the_methods():
    """A method's special behaviour is an attribute or a hook of its class, never ``if method == "x"``
    in the pipeline, the app or a report."""
    from stat_core.methods.registry import method_names
    hits = [h for p in _library_files("stat_core/methods") for h in _names_compared(p, set(method_names()))]
    assert hits == []


def test_no_family_name_is_compared_outside_the_adapters():
    """A family's quirks live in its one record (:data:`stat_core.adapters.registry.FAMILIES`)."""
    from stat_core.adapters.registry import FAMILIES
    hits = [h for p in _library_files("stat_core/adapters") for h in _names_compared(p, set(FAMILIES))]
    assert hits == []


def test_only_the_pipeline_sequences_the_stages():
    """Calibrate → plan → cut is written once (:mod:`stat_core.pipeline`); the CLI, the app, the
    streaming runner and the benchmarks call it. A module that calls both the planner and the
    surgery is a second sequence."""
    stages = {"plan_pruning", "apply_plan_"}
    # Research scripts that open STAT's stages on purpose (re-weighted allocations, saved plans cut
    # with this box's corrections): what they measure is a variant no user runs.
    experiments = {"benchmarks/stat_experiments.py"}
    offenders = []
    for path in _library_files("stat_core/methods") + sorted((ROOT / "benchmarks").glob("*.py")):
        if path == ROOT / "stat_core" / "pipeline.py":
            continue
        called = {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", None)
                  for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)}
        if stages <= called and str(path.relative_to(ROOT)) not in experiments:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_every_public_name_of_the_package_resolves():
    """``stat_core.<name>`` for every name in ``__all__`` (loaded on first use: a moved module would
    otherwise fail only when a user reaches for it)."""
    import stat_core

    for name in stat_core.__all__:
        assert getattr(stat_core, name) is not None, name
    assert stat_core.stat_prune_.__module__ == "stat_core.pipeline"
