"""The layout shows the architecture, and stays that way.

Parses the imports of every module under pipeline/, filters/ and generators/ (imports inside
functions included, since a lazy import is still a dependency) and checks:
- no import cycles between modules;
- the core (pipeline/) imports nothing from filters/ or generators/, and generators/
  nothing from filters/ (a stage that needs another stage builds it through the registry);
- no stage module imports ray: fan-out goes through pipeline/executor.py;
- no module imports another module's private (underscore) names;
- benchmarks import nothing from tests/;
- every registered stage lives in a file named after it, and no module is over the size
  limit without saying why in its docstring.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline import registry

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "filters", "generators")
MAX_LINES = 500
# Modules that may import ray: the executor (the one place stages reach Ray), the DAG tasks
# that submit Ray Jobs (the job client), and the vLLM teacher backend (ray.data.llm is its
# engine).
RAY_ALLOWED = {"pipeline.executor", "pipeline.orchestration.tasks", "generators.teacher.vllm"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(p): p
        for pkg in PACKAGES
        for p in sorted((REPO / pkg).rglob("*.py"))
        if "__pycache__" not in p.parts
    }


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) for every import in the file; `import a.b` gives ("a.b", [])."""
    tree = ast.parse(path.read_text(), str(path))
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.append((base, [alias.name for alias in node.names]))
    return out


def _resolve(module: str, names: list[str]) -> list[str]:
    """The project modules an import statement depends on."""
    found = []
    for name in names:
        if f"{module}.{name}" in MODULES:  # from pkg import submodule
            found.append(f"{module}.{name}")
    if module in MODULES and (not found or len(found) < len(names)):
        found.append(module)
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for mod, path in MODULES.items():
        deps = set()
        for module, names in _imports(path):
            deps.update(d for d in _resolve(module, names) if d != mod)
        graph[mod] = deps
    return graph


GRAPH = _graph()


def test_the_layout_parses_every_module():
    assert {"pipeline.stage", "pipeline.stage_runner", "pipeline.executor"} <= set(MODULES)


def test_no_import_cycles():
    # Tarjan's strongly connected components: any component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
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

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize(
    "package,forbidden",
    [("pipeline", ("filters", "generators")), ("generators", ("filters",))],
)
def test_layers_import_only_downwards(package, forbidden):
    bad = sorted(
        f"{mod} -> {dep}"
        for mod, deps in GRAPH.items()
        if mod.split(".")[0] == package
        for dep in deps
        if dep.split(".")[0] in forbidden
    )
    assert not bad, f"{package}/ must not import {forbidden}: {bad}"


def test_no_stage_module_imports_ray():
    bad = sorted(
        mod
        for mod, path in MODULES.items()
        if mod not in RAY_ALLOWED
        and any(m == "ray" or m.startswith("ray.") for m, _ in _imports(path))
    )
    assert not bad, f"these modules import ray; use pipeline.executor instead: {bad}"


def test_no_module_imports_another_modules_private_names():
    bad = sorted(
        f"{mod}: from {module} import {name}"
        for mod, path in MODULES.items()
        for module, names in _imports(path)
        if module.split(".")[0] in PACKAGES and module != mod
        for name in names
        if name.startswith("_") and not name.startswith("__")
    )
    assert not bad, f"private names imported across modules: {bad}"


def test_benchmarks_do_not_import_tests():
    bad = sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "benchmarks").glob("*.py")
        for module, _ in _imports(p)
        if module == "tests" or module.startswith("tests.")
    )
    assert not bad, f"benchmarks import from tests/: {bad}"


@pytest.mark.parametrize("name", registry.names())
def test_each_stage_lives_in_a_file_named_after_it(name):
    module, cls_name = registry.location(name)
    stem = module.rpartition(".")[2]
    family = module.split(".")[1] if module.count(".") >= 2 else ""
    # edu_annotate -> filters/edu/annotate.py; langid -> filters/langid.py
    assert stem == name or f"{family}_{stem}" == name or stem == name.removeprefix(family + "_"), (
        f"stage {name!r} is in {module}"
    )
    assert cls_name in MODULES[module].read_text()


def test_no_module_is_over_the_size_limit_without_a_reason():
    too_long = []
    for mod, path in MODULES.items():
        lines = path.read_text().count("\n")
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and "over 500 lines" not in doc:
            too_long.append(f"{mod} ({lines} lines)")
    assert not too_long, (
        f"modules over {MAX_LINES} lines whose docstring does not say why: {too_long}"
    )


def test_every_python_file_compiles():
    """Scripts no test imports (benchmarks, data builders) still compile: a symbol-table
    error such as a `global` after use is caught here, not when a user runs them."""
    bad = []
    for folder in ("pipeline", "filters", "generators", "benchmarks", "dags", "scripts", "data"):
        for p in sorted((REPO / folder).rglob("*.py")):
            try:
                compile(p.read_text(), str(p), "exec")
            except SyntaxError as e:
                bad.append(f"{p.relative_to(REPO)}: {e}")
    assert not bad, bad
