"""The package's shape, read from its source with ast (nothing is imported or run).

Walks every import of attnpipe/**/*.py, the three CLIs and scripts/*.py, imports inside functions
included, and fails on:
- an import cycle between attnpipe modules (`a` imports `b` imports ... `a`);
- a private name (`_x`) of another module, imported (`from m import _x`) or reached through an
  imported module (`m._x`);
- a CLI of 250 lines or more (the CLIs are argparse plus one library call);
- a script (a CLI or scripts/*.py) importing another script.
Imports under `if TYPE_CHECKING:` never run, so they do not count towards cycles.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = "attnpipe"
CLIS = ("extract_attention.py", "visualize_attention.py", "analyze_attention.py")
MAX_CLI_LINES = 250


@dataclass(frozen=True)
class Import:
    source: str  # the importing file, relative to the root
    line: int
    module: str  # the module imported from (absolute; for `import a.b` that is "a.b")
    names: tuple[str, ...]  # the names of `from module import names`; () for `import module`
    bound: tuple[str, ...]  # the local names bound: each name's `as` name, or for `import a.b`, "a"
    runtime: bool  # False under `if TYPE_CHECKING:`


def module_name(path: Path, root: Path) -> str:
    """attnpipe/store/reader.py -> attnpipe.store.reader; a package's __init__.py -> the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, root: Path) -> list[Import]:
    """Every import statement of a file, at any depth, relative imports made absolute."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    source = path.relative_to(root).as_posix()
    here = module_name(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found: list[Import] = []

    def visit(node: ast.AST, runtime: bool) -> None:
        if isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, runtime)
            return
        if isinstance(node, ast.Import):
            found.extend(Import(source, node.lineno, alias.name, (), (alias.asname or alias.name.split(".")[0],),
                                runtime) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append(Import(source, node.lineno, module, tuple(a.name for a in node.names),
                                tuple(a.asname or a.name for a in node.names), runtime))
        for child in ast.iter_child_nodes(node):
            visit(child, runtime)

    visit(tree, True)
    return found


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


class Project:
    """The files walked and the attnpipe modules they may import."""

    def __init__(self, root: Path):
        self.root = root
        self.package_files = sorted((root / PACKAGE).rglob("*.py"))
        self.clis = [root / name for name in CLIS if (root / name).is_file()]
        self.scripts = sorted((root / "scripts").glob("*.py"))
        self.modules = {module_name(path, root): path for path in self.package_files}
        self.script_names = {path.stem for path in self.clis + self.scripts}

    @property
    def files(self) -> list[Path]:
        return self.package_files + self.clis + self.scripts

    def resolve(self, imp: Import) -> list[str]:
        """The attnpipe modules an import loads by name: `from pkg import mod` is the module pkg.mod,
        `from pkg import name` the package pkg, `import a.b.c` the longest known module."""
        if imp.names:
            if imp.module not in self.modules:
                return []
            targets = {f"{imp.module}.{n}" if f"{imp.module}.{n}" in self.modules else imp.module
                       for n in imp.names}
            return sorted(targets)
        parts = imp.module.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in self.modules:
                return [".".join(parts[:end])]
        return []

    def graph(self) -> dict[str, dict[str, Import]]:
        """module -> {imported module: the first import making that edge}, runtime imports only."""
        edges: dict[str, dict[str, Import]] = {name: {} for name in self.modules}
        for name, path in self.modules.items():
            for imp in imports_of(path, self.root):
                if imp.runtime:
                    for target in self.resolve(imp):
                        edges[name].setdefault(target, imp)
        return edges


def cycles(edges: dict[str, dict[str, Import]]) -> list[list[str]]:
    """The strongly connected components with more than one module, or a module importing itself
    (Tarjan's algorithm), each as its modules in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, {}):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges.get(node, {}):
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return found


def describe_cycle(component: list[str], edges: dict[str, dict[str, Import]]) -> str:
    members = set(component)
    links = [f"{imp.source}:{imp.line} imports {target}"
             for node in component for target, imp in sorted(edges[node].items()) if target in members]
    return f"import cycle between {', '.join(component)}: " + "; ".join(links)


def private_imports(project: Project) -> list[str]:
    """`from m import _x` and `m._x` for attnpipe modules m other than the file's own."""
    problems = []
    for path in project.files:
        own = module_name(path, project.root)
        aliases: dict[str, str] = {}  # local name -> attnpipe module it is bound to
        for imp in imports_of(path, project.root):
            if imp.names:
                for name, local in zip(imp.names, imp.bound, strict=True):
                    full = f"{imp.module}.{name}"
                    if full in project.modules:
                        aliases[local] = full
                    elif is_private(name) and imp.module in project.modules and imp.module != own:
                        problems.append(f"{imp.source}:{imp.line}: imports the private name {name} of {imp.module}")
            elif imp.module.split(".")[0] == PACKAGE:  # `import a.b` binds a; `import a.b as m` binds a.b
                local = imp.bound[0]
                aliases[local] = imp.module if local != imp.module.split(".")[0] else local
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and is_private(node.attr):
                chain = dotted(node.value)
                if chain is None or chain.split(".")[0] not in aliases:
                    continue
                head, *rest = chain.split(".")
                module = ".".join([aliases[head], *rest])
                if module in project.modules and module != own:
                    problems.append(f"{path.relative_to(project.root).as_posix()}:{node.lineno}: "
                                    f"uses the private name {node.attr} of {module}")
    return problems


def dotted(node: ast.expr) -> str | None:
    """`a.b.c` as a string when the expression is a plain dotted name, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def script_imports(project: Project) -> list[str]:
    """A CLI or script importing another script (by name, through a sys.path entry), or `scripts.x`."""
    problems = []
    for path in project.clis + project.scripts:
        for imp in imports_of(path, project.root):
            names = [imp.module] + [f"{imp.module}.{n}" for n in imp.names]
            for name in names:
                top = name.split(".")[0]
                if top == "scripts" or (top in project.script_names and top != path.stem):
                    problems.append(f"{imp.source}:{imp.line}: imports the script {name}")
                    break
    return problems


@pytest.fixture(scope="module")
def project() -> Project:
    return Project(ROOT)


def test_no_import_cycle_between_attnpipe_modules(project):
    edges = project.graph()
    assert len(edges) > 30  # the walk found the package
    found = [describe_cycle(component, edges) for component in cycles(edges)]
    assert not found, "\n".join(found)


def test_no_private_name_imported_from_another_module(project):
    problems = private_imports(project)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", CLIS)
def test_cli_is_thin(name):
    lines = len((ROOT / name).read_text(encoding="utf-8").splitlines())
    assert lines < MAX_CLI_LINES, f"{name} has {lines} lines; a CLI is argparse and one library call"


def test_no_script_imports_another_script(project):
    assert len(project.scripts) >= 5 and len(project.clis) == 3
    problems = script_imports(project)
    assert not problems, "\n".join(problems)


# The checks themselves, on a small made-up project: each must catch what it is for.


def write_project(root: Path, files: dict[str, str]) -> Project:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return Project(root)


def test_checks_catch_cycles_private_names_and_script_imports(tmp_path):
    project = write_project(tmp_path, {
        "attnpipe/__init__.py": "",
        "attnpipe/a.py": "from attnpipe.b import helper\n",
        "attnpipe/b.py": "def helper():\n    from attnpipe import a  # inside a function: still a cycle\n",
        "attnpipe/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from attnpipe import d\n",
        "attnpipe/d.py": "from attnpipe import c\nfrom attnpipe.a import _secret\n",
        "attnpipe/pkg/__init__.py": "from .inner import thing\n",
        "attnpipe/pkg/inner.py": "from attnpipe import pkg\npkg._hidden()\nfrom attnpipe import __version__\n",
        "scripts/one.py": "import two\nfrom attnpipe import pkg\nprint(pkg.inner._x, pkg.__doc__)\n",
        "scripts/two.py": "from attnpipe.pkg import inner\n",
    })
    found = cycles(project.graph())
    assert ["attnpipe.a", "attnpipe.b"] in found  # the function-level import closes it
    assert ["attnpipe.pkg", "attnpipe.pkg.inner"] in found  # a relative import, resolved
    assert not any("attnpipe.c" in component for component in found)  # TYPE_CHECKING only
    assert "attnpipe.pkg.inner" not in project.graph()["attnpipe.pkg.inner"]
    problems = private_imports(project)
    assert any("attnpipe/d.py:2" in p and "_secret" in p for p in problems)
    assert any("attnpipe/pkg/inner.py:2" in p and "_hidden" in p for p in problems)
    assert any("scripts/one.py:3" in p and "_x of attnpipe.pkg.inner" in p for p in problems)
    assert len(problems) == 3  # __version__ and __doc__ are not private
    assert script_imports(project) == ["scripts/one.py:1: imports the script two"]
