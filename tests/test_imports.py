"""The package's imports form a stack: no cycle, and the library never imports what sits above it.

Every module of `myfla_gla` is parsed with `ast` (nothing is imported): module-level imports and those inside
functions, absolute and relative (`from . import x`, `from ..ops import chunk`), and `importlib.import_module`
/ `__import__` calls with a literal name. Each import becomes an edge to the package module that runs it.

- **No cycle**, among all modules, module-level and function-level imports alike.
- **The library** (`utils`, `checks`, `_plain`, `cache`, `ops`, `modules`, `layers`, `models`) imports only
  the library. Everything else sits above it: the harness (`testing`), the benchmark (`bench`), the floor
  (`floor`), the command line (`__main__`), `distributed`, `export`, and any module added later until it is
  listed here. `_plain` is the library's stand-in for transformers' classes (the cache and models build on it),
  not the command line's.
- **The top level** (`myfla_gla/__init__.py`) is the package's front door, neither library nor above it: it
  imports the library and then the harness, so a library module that imports the top level (`import myfla_gla`,
  `from myfla_gla import x`, `from .. import x` for a name that is not a submodule) imports the harness, and
  fails. Python runs a package's `__init__` before any submodule; that implicit step is not an edge here, since
  the top level runs first and imports the library in order.
"""
import ast
import textwrap
from pathlib import Path

import pytest

PACKAGE = 'myfla_gla'
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
LIBRARY = ('utils', 'checks', '_plain', 'cache', 'ops', 'modules', 'layers', 'models')
ABOVE = ('testing', 'bench', 'floor', '__main__', 'distributed', 'export')  # must exist and be outside the library


def is_library(mod: str, package: str = PACKAGE) -> bool:
    return any(mod == f'{package}.{p}' or mod.startswith(f'{package}.{p}.') for p in LIBRARY)


def modules(root: Path) -> dict[str, Path]:
    "Dotted name -> file, for every module of the package at `root`."
    out = {}
    for path in sorted(root.rglob('*.py')):
        parts = (root.name,) + path.relative_to(root).with_suffix('').parts
        out['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
    return out


def _literal_imports(node: ast.Call) -> list[tuple[str, int]]:
    "`importlib.import_module('x')`, `import_module('.x', __package__)`, `__import__('x')`: [(name, level)]."
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if name not in ('import_module', '__import__') or not node.args:
        return []
    arg = node.args[0]
    if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
        return []
    text = arg.value
    level = len(text) - len(text.lstrip('.')) if name == 'import_module' else 0
    return [(text[level:], level)]


def imported_names(tree: ast.AST, package: str) -> list[str]:
    "The absolute dotted names a module's code imports (`package`: the package its relative imports start from)."
    def absolute(base: str, level: int) -> str:
        if not level:
            return base
        up = package.split('.')[:len(package.split('.')) - level + 1]
        return '.'.join(up + ([base] if base else []))

    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = absolute(node.module or '', node.level)
            # `from a import b`: b is a submodule or a name defined in a; resolving decides which
            names += [f'{base}.{a.name}' if a.name != '*' else base for a in node.names]
        elif isinstance(node, ast.Call):
            names += [absolute(n, lvl) for n, lvl in _literal_imports(node)]
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    "Module -> the package's modules it imports (anywhere in its code)."
    mods = modules(root)

    def resolve(name):  # the longest module name that `name` starts with: the module that runs
        while name and name not in mods:
            name = name.rpartition('.')[0]
        return name or None

    graph = {}
    for mod, path in mods.items():
        package = mod if path.name == '__init__.py' else mod.rpartition('.')[0]
        tree = ast.parse(path.read_text(), filename=str(path))
        targets = {resolve(n) for n in imported_names(tree, package) if n.split('.')[0] == root.name}
        graph[mod] = {t for t in targets if t and t != mod}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    "One closed path (`[a, b, ..., a]`) through each strongly connected component of more than one module."
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v); on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w); low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop(); on.discard(w); comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_closed_path(graph, comp) for comp in comps]


def _closed_path(graph, comp):
    "A cycle inside the component `comp`, from its first module back to it (breadth-first, shortest)."
    start = min(comp)
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:  # back at the start: walk the predecessors from v
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return path[::-1] + [start]
                if w not in prev:
                    prev[w] = v; nxt.append(w)
        frontier = nxt
    return sorted(comp)


def layer_violations(graph: dict[str, set[str]], package: str = PACKAGE) -> list[str]:
    "`'a imports b'` for each import from a library module of a module that is not the library's."
    return [f'{m} (library) imports {t}' for m in sorted(graph) if is_library(m, package)
            for t in sorted(graph[m]) if not is_library(t, package)]


def test_package_has_no_import_cycle():
    cycles = find_cycles(import_graph(ROOT))
    assert not cycles, 'import cycles:\n' + '\n'.join(' -> '.join(c) for c in cycles)


def test_library_imports_only_the_library():
    graph = import_graph(ROOT)
    for name in ABOVE:  # the modules above the library exist (a rename would silently drop them otherwise)
        assert f'{PACKAGE}.{name}' in graph and not is_library(f'{PACKAGE}.{name}'), name
    bad = layer_violations(graph)
    assert not bad, '\n'.join(bad)


def test_graph_sees_the_package_imports():
    "The parser finds known edges of each kind (a parser that saw nothing would pass the two tests above)."
    graph = import_graph(ROOT)
    assert f'{PACKAGE}.ops.chunk' in graph[f'{PACKAGE}.layers.gla']          # relative, module level
    assert f'{PACKAGE}.testing' in graph[PACKAGE]                            # the top level imports the harness
    assert f'{PACKAGE}.utils' in graph[f'{PACKAGE}.testing']                 # the harness imports the library
    assert sum(map(len, graph.values())) > 50, sum(map(len, graph.values()))


def _write_package(tmp_path, files):
    root = tmp_path / 'pkg'
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


def test_checker_reports_cycles_and_library_imports(tmp_path):
    "Each kind of import the test claims to read, planted in a small package, is found."
    root = _write_package(tmp_path, {
        '__init__.py': 'from .utils import *\nfrom .testing import helper\n',
        'utils.py': 'import os\ndef f():\n    from .ops import chunk\n',                # function-level, relative
        'ops/__init__.py': '',
        'ops/chunk.py': 'def g():\n    import importlib\n    importlib.import_module("pkg.utils")\n',
        'ops/recurrent.py': 'from .. import testing\n',                                  # library -> harness
        'layers/gla.py': 'import pkg\n',                                                 # library -> top level
        'models/gla.py': 'from ..layers import gla\n',
        'testing.py': 'from pkg.ops.chunk import g\n',
    })
    graph = import_graph(root)
    assert graph['pkg.utils'] == {'pkg.ops.chunk'}
    assert graph['pkg.ops.chunk'] == {'pkg.utils'}
    assert graph['pkg.models.gla'] == {'pkg.layers.gla'}
    assert find_cycles(graph) == [['pkg.ops.chunk', 'pkg.utils', 'pkg.ops.chunk']]
    assert layer_violations(graph, 'pkg') == ['pkg.layers.gla (library) imports pkg',
                                              'pkg.ops.recurrent (library) imports pkg.testing']
