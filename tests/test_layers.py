"""The house rules of the tree (README, "The core and its extras"): every import of the core
points down a layer (or sideways, without a circle), the core imports no extra, and what
`python cdcda.py` pulls in stays a read of one sitting.

Each module's imports are read from its source (every `import`, at any depth, so a lazy import
inside a function counts as much as one at the top), and each core module is also imported
alone in a fresh interpreter, which must not load a module of a layer above it or any extra.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [  # the core, bottom first; a module may import from its own layer or any layer below
    ["errors", "hub", "data", "nf4", "labels", "tokenizer"],  # leaves
    ["qwen2", "generate", "encoder", "lora", "train", "metrics", "options"],  # models, maths, the settings
    ["filters", "augment", "rewrite"],  # the paper's pieces
    ["report", "runner"],  # the harness: the run around the method
    ["cdcda"],  # the method, one user on one screen, and the command that runs it
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
EXTRAS = ("cloud", "deployment", "embedded", "experiments", "online", "scale")  # one folder per concern
# what `python cdcda.py` may pull in: lines of code (not blank, comment or docstring); 2,271 before
# the core was reorganised (issue 28, which asks for 2,000), 2,383 after it, with PEFT's adapters,
# the service's batching and constrained labels in the core and every line within 100 characters
CODE_LINES = 2400
CHAIN = 7  # the longest chain of imports among the core's modules (A imports B, which imports C, ...)
LINE = 100  # characters of a line of the core


def source(name: str) -> Path:
    """The file of a module named as Python does ("deployment.deploy", "data")."""
    path = ROOT.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def extra_modules() -> list[str]:
    return sorted(f"{folder}.{p.stem}".removesuffix(".__init__") for folder in EXTRAS
                  for p in (ROOT / folder).glob("*.py"))


MODULES = set(LAYER) | set(extra_modules())


def project_imports(name: str) -> dict[str, bool]:
    """The project modules `name` imports -> whether at the top level (False: inside a function).
    `from deployment import deploy` imports deployment.deploy."""
    tree = ast.parse(source(name).read_text())
    top = {id(node) for node in tree.body}
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for imported in names:
            while imported and imported not in MODULES:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                found[imported] = found.get(imported, False) or id(node) in top
    return found


def test_every_module_has_a_place():
    core = {p.stem for p in ROOT.glob("*.py")} | {"data"}
    assert core == set(LAYER), "a new top-level module needs its place in LAYERS, or its extra's folder"
    folders = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"data"}
    assert folders == set(EXTRAS), "a new folder is an extra: add it to EXTRAS (README: the core and its extras)"


@pytest.mark.parametrize("name", sorted(LAYER))
def test_core_imports_point_down_and_never_into_an_extra(name):
    for imported, at_top in project_imports(name).items():
        assert imported in LAYER, f"the core module {name} imports {imported}, from an extra"
        assert LAYER[imported] <= LAYER[name], f"{name} (layer {LAYER[name]}) imports {imported} (layer {LAYER[imported]})"
        assert at_top, f"{name} imports {imported} inside a function: import it at the top"


@pytest.mark.parametrize("name", extra_modules())
def test_extras_import_the_core_and_library_modules_only(name):
    for imported in project_imports(name):
        assert not imported.endswith(".__main__"), f"{name} imports the script {imported}"


def test_no_import_circle():
    graph = {name: set(project_imports(name)) for name in MODULES}
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


@pytest.mark.parametrize("name", sorted(LAYER))
def test_importing_a_core_module_alone_loads_nothing_above_and_no_extra(name):
    code = f"import sys, {name}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = out.stdout.split()
    above = sorted(m for m in loaded if LAYER.get(m, -1) > LAYER[name])
    extras = sorted(m for m in loaded if m.split(".")[0] in EXTRAS)
    assert not above and not extras, f"importing {name} loads {above + extras}"


def code_lines(source_text: str) -> int:
    """Lines that are not blank, a comment, or a module's, class's or function's docstring."""
    docs = set()
    for node in ast.walk(ast.parse(source_text)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docs |= set(range(first.lineno, first.end_lineno + 1))
    return sum(1 for i, line in enumerate(source_text.splitlines(), 1)
               if line.strip() and not line.strip().startswith("#") and i not in docs)


def closure() -> set[str]:
    seen, todo = set(), ["cdcda"]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += project_imports(name)
    return seen


def test_code_lines_count_code_only():
    text = '"""A module."""\nimport os\n\n# a comment\ndef f():\n    """Its doc,\n    two lines."""\n    return 1\n'
    assert code_lines(text) == 3  # import, def, return


def test_the_main_command_pulls_in_the_core_alone_and_a_read_of_one_sitting():
    seen = closure()
    assert seen <= set(LAYER), f"python cdcda.py pulls in extras: {sorted(seen - set(LAYER))}"
    lines = {name: code_lines(source(name).read_text()) for name in seen}
    assert sum(lines.values()) <= CODE_LINES, f"{sum(lines.values())} code lines: {sorted(lines.items())}"
    sizes = {name: len(source(name).read_text().splitlines()) for name in seen}
    assert max(sizes.values()) <= 350, f"a module over 350 lines: {max(sizes, key=sizes.get)}"


def test_the_core_is_a_flat_house():
    graph = {name: set(project_imports(name)) & set(LAYER) for name in LAYER}

    def longest(name) -> list[str]:
        return [name] + max((longest(d) for d in graph[name]), key=len, default=[])
    chain = longest("cdcda")
    assert len(chain) <= CHAIN, " > ".join(chain)


@pytest.mark.parametrize("name", sorted(LAYER))
def test_no_line_of_the_core_is_long(name):
    long = [i for i, line in enumerate(source(name).read_text().splitlines(), 1) if len(line) > LINE]
    assert not long, f"{source(name).name}: lines {long} are over {LINE} characters"
