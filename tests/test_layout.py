"""The layout of the library, read from its source with `ast` (issue #16).

- no import cycle between the package's own modules, counting module-level and function-level
  imports, relative and absolute (a lazy import inside a function still "imports back up");
- no library file over 400 lines (the issue's check); files over 300 lines (the aim for
  non-kernel files) are listed in the test's output;
- no file outside ``fastprompt/methods/`` names a method (the default job's method aside).

The installed package is ``fastprompt`` with the top-level folders ``kernels/`` and ``export/``
mounted as ``fastprompt.kernels`` and ``fastprompt.export`` (setup.py), so those folders are read
under those names. Imports inside ``if TYPE_CHECKING:`` blocks never run and are not counted;
``importlib.import_module`` calls are not seen (they are the lazy registries' business).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "fastprompt"
#: source folder -> dotted package it is installed as (setup.py's MOUNTED)
SOURCES = {"fastprompt": "fastprompt", "kernels": "fastprompt.kernels",
           "export": "fastprompt.export"}
MAX_LINES = 400
AIM_LINES = 300  # the aim for files outside kernels/ (issue #16: "files ≲ 300 lines")


def library_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the installed package."""
    modules = {}
    for folder, dotted in SOURCES.items():
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([dotted, *parts])] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node that can run (anywhere, TYPE_CHECKING blocks left out)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(module: str, is_package: bool, node, known: set[str]) -> set[str]:
    """The package's own modules an import statement loads (the deepest known name)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            here = module.split(".") if is_package else module.split(".")[:-1]
            base_parts = here[:len(here) - node.level + 1]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        # `from pkg import sub` loads pkg.sub when that is a module, else pkg itself
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    targets = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            targets.add(name)
    return targets


def import_graph() -> dict[str, set[str]]:
    files = library_files()
    known = set(files)
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        graph[module] = set().union(*(_resolve(module, is_package, n, known)
                                      for n in _imports(tree)))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, iters = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while path:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_find_cycle_sees_a_cycle():
    """The checker itself: a cycle through a function-level relative import is found."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    known = {"fastprompt.data", "fastprompt.data.builtin", "fastprompt.data.generated"}
    tree = ast.parse("def f():\n    from .generated import loader\n")
    (node,) = _imports(tree)
    assert _resolve("fastprompt.data.builtin", False, node, known) == {"fastprompt.data.generated"}
    node = ast.parse("from . import builtin").body[0]
    assert _resolve("fastprompt.data", True, node, known) == {"fastprompt.data.builtin"}
    node = ast.parse("from ..data import generated").body[0]
    assert _resolve("fastprompt.pretrain.corpus", False, node, known | {"fastprompt.pretrain"}) \
        == {"fastprompt.data.generated"}
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import fastprompt.data\n")
    assert [n.module for n in _imports(tree)] == ["typing"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle) + \
        " (move the shared piece into a module both import, so imports go one way)"


def test_no_library_file_over_400_lines(capsys):
    sizes = {path: len(path.read_text(encoding="utf-8").splitlines())
             for path in library_files().values()}
    too_long = {str(p.relative_to(ROOT)): n for p, n in sizes.items() if n > MAX_LINES}
    assert not too_long, f"library files over {MAX_LINES} lines: {too_long}"
    over_aim = {str(p.relative_to(ROOT)): n for p, n in sizes.items()
                if n > AIM_LINES and p.relative_to(ROOT).parts[0] != "kernels"}
    if over_aim:
        with capsys.disabled():
            print(f"\n[layout] files over {AIM_LINES} lines (aim, outside kernels/): {over_aim}")


# ---------------------------------------------------------------------------------------------
# No library file outside fastprompt/methods/ names a method
# ---------------------------------------------------------------------------------------------

def registered_method_names() -> set[str]:
    """The names passed to ``@register("...")`` in the files fastprompt/methods/ registers."""
    names = set()
    for path in sorted((ROOT / "fastprompt" / "methods").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "register"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                names.add(node.args[0].value)
    return names


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


#: where the default job's method may be named: the CLI's ``default=`` and TrainConfig's field
DEFAULT_METHOD_FILES = ("fastprompt/train.py", "fastprompt/config.py")


def _allowed_default(rel: Path, node: ast.Constant, parents: dict[int, ast.AST]) -> bool:
    """The one allowed mention: the default method, as ``default="maple"`` (argparse) or as the
    default of a field named ``method`` (``method: str = "maple"``), in DEFAULT_METHOD_FILES."""
    parent = parents.get(id(node))
    if rel.as_posix() not in DEFAULT_METHOD_FILES:
        return False
    return (isinstance(parent, ast.keyword) and parent.arg == "default") or (
        isinstance(parent, ast.AnnAssign) and getattr(parent.target, "id", None) == "method")


def mentions_in(rel: Path, source: str, names: set[str]) -> list[str]:
    """'file:line: 'name'' for every string constant of `source` that is one of `names`
    (comments never reach the AST; docstrings and the allowed default are left out)."""
    tree = ast.parse(source)
    docs = _docstring_nodes(tree)
    parents = {id(c): p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    hits = [node for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and node.value in names and id(node) not in docs
            and not _allowed_default(rel, node, parents)]
    return [f"{rel.as_posix()}:{n.lineno}: {n.value!r}"
            for n in sorted(hits, key=lambda n: (n.lineno, n.col_offset))]


def method_mentions() -> list[str]:
    """Every mention of a registered method's name in a library file outside methods/."""
    names = registered_method_names()
    found = []
    for path in library_files().values():
        rel = path.relative_to(ROOT)
        if rel.parts[:2] != ("fastprompt", "methods"):
            found += mentions_in(rel, path.read_text(encoding="utf-8"), names)
    return sorted(found)


def test_mentions_checker_finds_names_and_skips_docstrings_and_the_default():
    src = ('"""coop in a docstring"""\n# "coop" in a comment\n'
           'p.add_argument("--method", default="maple")\n'
           'class TrainConfig:\n    method: str = "maple"\n'
           'if method == "coop":\n    pass\n')
    names = {"coop", "maple"}
    assert mentions_in(Path("fastprompt/table.py"), src, names) == [
        "fastprompt/table.py:3: 'maple'", "fastprompt/table.py:5: 'maple'",
        "fastprompt/table.py:6: 'coop'"]
    assert mentions_in(Path("fastprompt/train.py"), src, names) == ["fastprompt/train.py:6: 'coop'"]


def test_registered_method_names_are_read():
    assert {"zeroshot", "coop", "cocoop", "maple", "ivlp", "mma", "lamm", "coop+lamm",
            "maple+lamm"} <= registered_method_names()


def test_no_file_outside_methods_names_a_method():
    mentions = method_mentions()
    assert not mentions, "method names outside fastprompt/methods/:\n" + "\n".join(mentions)
