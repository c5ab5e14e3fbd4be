"""The house rule of DESIGN.md: every import points down a layer (or sideways, without a circle).

Each module's imports are read from its source (every `import`, at any depth, so a lazy import
inside a function counts as much as one at the top), and each library module is also imported
alone in a fresh interpreter, which must not load a module of a layer above it.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [  # bottom first; a module may import from its own layer or any layer below
    ["errors", "hub", "data", "nf4", "gptq", "smollm2"],  # leaves
    ["qwen2", "generate", "t5", "encoder", "lora", "metrics", "deploy", "gridtune"],  # models and maths
    ["filters", "online", "baselines", "cloud", "augment", "rewrite"],  # the paper's pieces
    ["scale", "options", "appendix", "report", "cdcda"],  # the method: shards and plan, its options, its report, the pipeline
    ["experiments", "server", "efficiency"] + sorted(f"bench/{p.stem}" for p in (ROOT / "bench").glob("*.py")),
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
SCRIPTS = set(LAYERS[-1])


def source(name: str) -> Path:
    return ROOT / ("data/__init__.py" if name == "data" else f"{name}.py")


def project_imports(name: str) -> dict[str, bool]:
    """The project modules `name` imports -> whether at the top level (False: inside a function)."""
    tree = ast.parse(source(name).read_text())
    top = {id(node) for node in tree.body}
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for imported in names:
            if imported in LAYER:
                found[imported] = found.get(imported, False) or id(node) in top
    return found


def test_every_module_has_a_layer():
    modules = {p.stem for p in ROOT.glob("*.py")} | {"data"}
    modules |= {f"bench/{p.stem}" for p in (ROOT / "bench").glob("*.py")}
    assert modules == set(LAYER), "a new module needs its place in LAYERS (DESIGN.md)"


@pytest.mark.parametrize("name", sorted(LAYER))
def test_imports_point_down(name):
    for imported, at_top in project_imports(name).items():
        assert LAYER[imported] <= LAYER[name], f"{name} (layer {LAYER[name]}) imports {imported} (layer {LAYER[imported]})"
        assert imported not in SCRIPTS, f"{name} imports the script {imported}"
        assert at_top or name in SCRIPTS, f"{name} imports {imported} inside a function: import it at the top"


def test_no_import_circle():
    graph = {name: set(project_imports(name)) for name in LAYER}
    done, path = set(), []

    def visit(name):
        if name in path:
            pytest.fail("import circle: " + " -> ".join(path[path.index(name):] + [name]))
        if name not in done:
            path.append(name)
            for imported in sorted(graph[name]):
                visit(imported)
            path.pop()
            done.add(name)
    for name in sorted(graph):
        visit(name)


@pytest.mark.parametrize("name", sorted(n for n in LAYER if n not in SCRIPTS))
def test_importing_alone_loads_nothing_above(name):
    code = f"import sys, {name}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    above = sorted(m for m in out.stdout.split() if LAYER.get(m, -1) > LAYER[name])
    assert not above, f"importing {name} loads {above}, from a layer above it"
